// The calibration probe compiled by nvcc into resnext_kernels._C (resnext-bench device).
#include "kernels/probe.cuh"
