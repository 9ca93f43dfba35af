// The calibration probe compiled by g++ against the host SIMT emulator into
// resnext_kernels._C_emulated (the CPU rehearsal of scripts/gpu_check.sh).
#include "kernels/probe.cuh"
