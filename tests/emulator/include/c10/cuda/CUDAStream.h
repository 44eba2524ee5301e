// Stand-in for c10/cuda/CUDAStream.h in the emulator build: one stream (a sentinel value that
// ::emu::launch checks), and launches are synchronous.
#pragma once
#include <c10/core/Device.h>

#include "../../cuda_runtime.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return ::emu::current_stream(); }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
