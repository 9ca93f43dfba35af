// The backward kernels compiled by nvcc into resnext_kernels._C (backend "cuda").
#include "kernels/conv_bwd.cuh"
