// The same backward kernels compiled by g++ against the host SIMT emulator into
// resnext_kernels._C_emulated (backend "cuda_emulated").
#include "kernels/conv_bwd.cuh"
