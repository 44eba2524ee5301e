// Stand-in for c10/cuda/CUDAException.h in the emulator build: launches run synchronously on the
// CPU and report their errors as exceptions, so the launch check has nothing left to do.
#pragma once
#include <c10/util/Exception.h>

#include "../../cuda_runtime.h"

#define C10_CUDA_CHECK(expr)                                                       \
  do {                                                                             \
    const cudaError_t emulated_error_ = (expr);                                    \
    TORCH_CHECK(emulated_error_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(emulated_error_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
