// Warp and block reductions for the CUDA kernels, including the merge of softmax statistics
// (running max, sum of exp). Every reduction has a fixed shape (xor butterflies, then warp 0
// over the warps' results), so the same inputs give bit-identical results run to run.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <limits>

namespace arcface_ext {
namespace cuda {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// max and min that propagate NaN, where fmax and fmin drop it: a NaN or inf in an input must
// reach the loss and the gradients, as it does in the reference, so that a training loop's NaN
// check or a GradScaler sees it. On sm_80+ one instruction each (max.NaN), as fmaxf is.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a > b || a != a) ? a : b;
#endif
}

__device__ __forceinline__ float min_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a < b || a != a) ? a : b;
#endif
}

__device__ __forceinline__ double max_nan(double a, double b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ double min_nan(double a, double b) { return (a < b || a != a) ? a : b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = max_nan(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Softmax statistics of a set of logits: max m and sum of exp(logit - m). The empty set is
// (-inf, 0). Merging is commutative bit for bit (fp addition and max are), so a butterfly leaves
// every lane with the same value.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T>
__device__ __forceinline__ SoftmaxStats<T> merge_stats(SoftmaxStats<T> a, SoftmaxStats<T> b) {
  const T m = max_nan(a.max, b.max);  // a NaN sum stays NaN
  if (m == -std::numeric_limits<T>::infinity()) return {m, T(0)};  // both empty
  return {m, a.sum * exp_acc(a.max - m) + b.sum * exp_acc(b.max - m)};
}

template <typename T>
__device__ __forceinline__ SoftmaxStats<T> warp_merge_stats(SoftmaxStats<T> stats) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const SoftmaxStats<T> other{__shfl_xor_sync(0xffffffffu, stats.max, offset),
                                __shfl_xor_sync(0xffffffffu, stats.sum, offset)};
    stats = merge_stats(stats, other);
  }
  return stats;
}

// Merges the statistics of every thread of the block; the result is valid in thread 0.
// kThreads must be a multiple of the warp size and at most 32 warps.
template <int kThreads, typename T>
__device__ __forceinline__ SoftmaxStats<T> block_merge_stats(SoftmaxStats<T> stats) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "block shape");
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ T shared_max[kWarps];
  __shared__ T shared_sum[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  stats = warp_merge_stats(stats);
  if (kWarps == 1) return stats;
  if (lane == 0) {
    shared_max[warp] = stats.max;
    shared_sum[warp] = stats.sum;
  }
  __syncthreads();
  if (warp == 0) {
    stats = lane < kWarps ? SoftmaxStats<T>{shared_max[lane], shared_sum[lane]}
                          : SoftmaxStats<T>{-std::numeric_limits<T>::infinity(), T(0)};
    stats = warp_merge_stats(stats);
  }
  return stats;
}

// Max of non-negative values over the block; the result is valid in thread 0.
template <int kThreads, typename T>
__device__ __forceinline__ T block_max_nonnegative(T value) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ T shared[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  value = warp_max(value);
  if (kWarps == 1) return value;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) value = warp_max(lane < kWarps ? shared[lane] : T(0));
  return value;
}

}  // namespace cuda
}  // namespace arcface_ext
