// The forward kernels compiled by nvcc into resnext_kernels._C (backend "cuda").
#include "kernels/conv_fwd.cuh"
