// Stand-in for cuda_fp16.h in the emulator build: the one fp16 type and conversion the kernels use.
#pragma once
#include "cuda_runtime.h"

struct __half2 {
  uint16_t x, y;
};

inline float2 __half22float2(__half2 pair) {
  return make_float2(::emu::half_bits_to_float(pair.x, false), ::emu::half_bits_to_float(pair.y, false));
}
