// Kernels that a GPU faults on (or multiplies garbage with) and that the emulator (runtime.h) must
// refuse, for tests/test_emulator.py: run as `runtime_checks <case>`, it prints the emulator's error, or "ok".
#include "runtime.h"

#include <cstdio>
#include <string>

namespace {

// Some threads of the block return; the others meet at a barrier.
void barrier_after_an_early_return() {
  if (threadIdx.x >= 32) return;
  __syncthreads();
}

// A 16-byte vector read 8 bytes into an aligned buffer.
void misaligned_vector_load() {
  alignas(16) static unsigned char buffer[32] = {};
  const uint4 v = *::emu::aligned_cast<const uint4*>(buffer + 8);
  (void)v;
}

void aligned_vector_load() {
  alignas(16) static unsigned char buffer[32] = {};
  const uint4 v = *::emu::aligned_cast<const uint4*>(buffer + 16);
  (void)v;
}

// One wgmma (128-byte swizzle, K-major A and B) on operands at the start of dynamic shared memory,
// its address rounded up to the swizzle's 1024-byte atom or not.
uint64_t descriptor(uint32_t address) {
  return uint64_t{(address >> 4) & 0x3fffu} | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

template <bool kRound>
void wgmma_on_dynamic_shared_memory() {
  unsigned char* smem = ::emu::dynamic_shared<unsigned char>();
  uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if (kRound) base = (base + 1023u) & ~1023u;
  float acc[64];
  ::emu::wgmma_m64n128k16(acc, descriptor(base), descriptor(base + 8192), true, false);
  ::emu::wgmma_commit();
  ::emu::wgmma_wait(0);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "";
  const size_t smem = 8192 + 16384 + 1024;
  try {
    if (which == "barrier_after_an_early_return") {
      ::emu::run_grid(nullptr, which.c_str(), dim3(1), dim3(64), 0, [] { barrier_after_an_early_return(); });
    } else if (which == "misaligned_vector_load") {
      ::emu::run_grid(nullptr, which.c_str(), dim3(1), dim3(32), 0, [] { misaligned_vector_load(); });
    } else if (which == "aligned_vector_load") {
      ::emu::run_grid(nullptr, which.c_str(), dim3(1), dim3(32), 0, [] { aligned_vector_load(); });
    } else if (which == "wgmma_unrounded") {
      ::emu::run_grid(nullptr, which.c_str(), dim3(1), dim3(128), smem, [] { wgmma_on_dynamic_shared_memory<false>(); });
    } else if (which == "wgmma_rounded") {
      ::emu::run_grid(nullptr, which.c_str(), dim3(1), dim3(128), smem, [] { wgmma_on_dynamic_shared_memory<true>(); });
    } else {
      std::printf("unknown case %s\n", which.c_str());
      return 2;
    }
  } catch (const std::exception& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
