// CUDA kernel of the fused margin softmax: the same algorithm as csrc/cpu/margin_softmax_kernel.cpp,
// walked over chunks of classes so that the N x C logits are never held.
//
// Per chunk of classes: a small kernel computes the chunk's inverse class-centre norms; cuBLAS
// (through ATen, fp32 output even for 16-bit inputs) computes the raw dot products x_i·w_j; an
// epilogue kernel scales them by 1/‖x_i‖ and 1/‖w_j‖ (rank-1 normalisation on both sides: neither
// x nor W is ever copied normalised), clamps, puts the margin on the target column and reduces
// each (row, 4096-class segment) to softmax statistics, merged per row in a fixed order at the end.
// The backward recomputes the chunk, turns it into the gradient block and feeds that to the two
// gradient GEMMs; the normalisations' own gradients are projections, applied per row/class after
// the GEMMs (see class_gradient_kernel). No atomics: the same inputs give bit-identical results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "../kept_block.h"
#include "../margin.h"
#include "reductions.cuh"
#include "tensor_core_tile.cuh"
#include "wgmma_tile.cuh"

namespace arcface_ext {
namespace {

using cuda::kWarpSize;
using cuda::SoftmaxStats;

// The epilogues give each block one row and a segment of kSegment classes of the chunk: 256
// threads with 16 classes each in registers, strided so that a warp's loads are coalesced.
constexpr int kEpilogueThreads = 256;
constexpr int kEpilogueItems = 16;
constexpr int64_t kSegment = int64_t{kEpilogueThreads} * kEpilogueItems;
// Chunks are a multiple of this many classes (but the last), which keeps the GEMMs' leading
// dimensions aligned; it is also the smallest chunk whatever the workspace.
constexpr int64_t kChunkAlign = 256;
// Row- and class-wise kernels give one warp to each row of x or W.
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxGridY = 65535;

// What the N x C part needs to know about row i, from a direct dot product in double (N·D work).
struct RowTarget {
  double cosine;     // x̂_i·ŵ_y before clamping
  double logit;      // s (ψ - m3), the target column's logit
  double dlogit_dc;  // s dψ/dc
  double inv_norm;   // 1 / max(‖x_i‖, eps)
  int64_t label;           // the target's row of this weight; -1 when it is in another shard,
                           // kBadLabel when the label is out of range (then not counted)
  int32_t counted;         // label != ignore_index
  int32_t norm_unclamped;  // ‖x_i‖ >= eps: the normalisation's gradient is a projection
};

// RowTarget::label of a row whose label is neither ignore_index nor in [0, num_classes). The host's
// label check raises before any kernel sees one, except inside a CUDA graph capture, where it
// cannot read its answer back: the kernels then give the row a NaN loss and no gradient.
constexpr int64_t kBadLabel = -2;

// A NaN cosine (from a NaN or inf in x_i or w_j) stays NaN, as in the reference's clamp.
template <typename T>
__device__ __forceinline__ T clamp_unit(T c) {
  return cuda::min_nan(cuda::max_nan(c, T(-1)), T(1));
}

// The cosine of a raw dot product x_i·w_j: both normalisations as rank-1 scalings. Forward and
// backward use this one expression so that the recomputed cosines are bit-identical.
template <typename acc_t>
__device__ __forceinline__ acc_t cosine_of(acc_t dot, acc_t inv_norm_x, acc_t inv_norm_w) {
  return dot * inv_norm_x * inv_norm_w;
}

// e^(logit - shift) for the fused epilogues: logit <= shift, shift finite (the callers skip rows
// whose shift is -inf; a logit of -inf gives 0), scaled to base 2 and through the SFU.
__device__ __forceinline__ float exp_shifted(float logit, float shift) {
  constexpr float kLog2e = 1.4426950408889634f;
  return cuda::ex2_approx((logit - shift) * kLog2e);
}

// The kept block's row shift S_i (see kept_block.h). Every logit of row i is at most max(s, t_i),
// t_i the target logit; S_i stays within kKeptShiftRoom of t_i, so that the row's largest logit m_i
// (at least t_i) is at most kKeptShiftRoom below it and the entries that matter to the row stay
// clear of fp32's (and bf16's) underflow at e^-87. A row keeps the block only while m_i is at most
// kKeptMaxAbove above S_i (s·e^24/‖w_j‖ is far inside bf16's range); the forward's finalize checks
// that, and recomputes the others exactly.
constexpr float kKeptShiftRoom = 64.0f;
constexpr float kKeptMaxAbove = 24.0f;

__device__ __forceinline__ float kept_shift(float s, float target_logit) {
  return fminf(fmaxf(s, target_logit), target_logit + kKeptShiftRoom);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(*p);
}

// The gradient block is the A operand of the gradient GEMMs, stored in the input dtype. fp16
// saturates instead of overflowing to inf: its range ends at 65504, which s / ‖w_j‖ can pass for
// class centres of norm below ~1e-3 (a zero centre still contributes exactly zero to G·W).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t to_gemm_operand(acc_t v) {
  if constexpr (std::is_same<scalar_t, at::Half>::value) {
    v = cuda::min_nan(cuda::max_nan(v, acc_t(-65504)), acc_t(65504));
  }
  return static_cast<scalar_t>(v);
}

// ---- per-row and per-class set-up --------------------------------------------------------

// Row i's target: the norm of x_i, the target cosine and the margin (margin.h, in double).
// With scaled_xhat, also writes (grad_loss_i / max_k |grad_loss_k|) x̂_i, the B operand of the
// weight-gradient GEMM; the common factor keeps it in range for fp16 and is put back after. With
// row_factor (the kept block's f_i, see kept_block.h), the operand is f_i times that: the GEMM then
// sums G_ij = f_i H_ij.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    row_targets_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                       const int64_t* __restrict__ labels, int64_t n, int64_t dim, int64_t c,
                       int64_t class_offset, int64_t num_classes, int64_t ignore_index, MarginParams params,
                       RowTarget* __restrict__ rows,
                       const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ grad_max,
                       scalar_t* __restrict__ scaled_xhat, const acc_t* __restrict__ row_factor) {
  const int64_t i = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= n) return;  // the whole warp: the shuffles below need every lane
  const bool bad = labels[i] != ignore_index && (labels[i] < 0 || labels[i] >= num_classes);
  const bool counted = labels[i] != ignore_index && !bad;
  // A target in another shard of the classes: counted, but no column of this weight is its.
  const int64_t local = labels[i] - class_offset;
  const bool has_target = counted && local >= 0 && local < c;
  const scalar_t* xi = x + i * dim;
  const scalar_t* wy = w + (has_target ? local : 0) * dim;
  double xx = 0, xw = 0, ww = 0;
  for (int64_t k = lane; k < dim; k += kWarpSize) {
    const double xv = static_cast<double>(load_acc<scalar_t, acc_t>(xi + k));
    xx += xv * xv;
    if (has_target) {
      const double wv = static_cast<double>(load_acc<scalar_t, acc_t>(wy + k));
      xw += xv * wv;
      ww += wv * wv;
    }
  }
  xx = cuda::warp_sum(xx);
  xw = cuda::warp_sum(xw);
  ww = cuda::warp_sum(ww);
  const double norm_x = sqrt(xx);
  const double inv_norm_x = 1.0 / fmax(norm_x, kNormEps);
  if (lane == 0) {
    RowTarget t;
    t.label = bad ? kBadLabel : has_target ? local : -1;
    t.counted = counted;
    t.norm_unclamped = norm_x >= kNormEps;
    t.inv_norm = inv_norm_x;
    t.cosine = 0;
    t.logit = 0;
    t.dlogit_dc = 0;
    if (has_target) {
      t.cosine = xw * inv_norm_x / fmax(sqrt(ww), kNormEps);
      const TargetMargin margin = target_margin(clamp_cosine(t.cosine), row_params(params, i));
      t.logit = margin.logit;
      t.dlogit_dc = margin.dlogit_dc;
    }
    rows[i] = t;
  }
  if (scaled_xhat != nullptr) {
    const double g = static_cast<double>(grad_loss[i]);
    const double g_max = static_cast<double>(*grad_max);
    const double ratio = (counted && g_max > 0) ? g / g_max : 0.0;
    const double factor = row_factor != nullptr ? static_cast<double>(row_factor[i]) : 1.0;
    const acc_t scale = static_cast<acc_t>(ratio * inv_norm_x * factor);
    scalar_t* out = scaled_xhat + i * dim;
    for (int64_t k = lane; k < dim; k += kWarpSize)
      out[k] = static_cast<scalar_t>(load_acc<scalar_t, acc_t>(xi + k) * scale);
  }
}

// max_i |grad_loss_i| over the counted rows, into *grad_max (one block).
template <typename acc_t>
__global__ void __launch_bounds__(256)
    max_abs_grad_kernel(const acc_t* __restrict__ grad_loss, const int64_t* __restrict__ labels,
                        int64_t n, int64_t ignore_index, acc_t* __restrict__ grad_max) {
  acc_t m = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (labels[i] != ignore_index) m = fmax(m, fabs(grad_loss[i]));
  m = cuda::block_max_nonnegative<256>(m);
  if (threadIdx.x == 0) *grad_max = m;
}

// 1 / max(‖w_j‖, eps) for a chunk of class centres, and whether the norm was clamped.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    class_inverse_norms_kernel(const scalar_t* __restrict__ w, int64_t num_classes, int64_t dim,
                               acc_t* __restrict__ inv_norm, uint8_t* __restrict__ unclamped) {
  const int64_t j = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (j >= num_classes) return;
  const scalar_t* wj = w + j * dim;
  acc_t sq = 0;
  for (int64_t k = lane; k < dim; k += kWarpSize) {
    const acc_t v = load_acc<scalar_t, acc_t>(wj + k);
    sq += v * v;
  }
  sq = cuda::warp_sum(sq);
  if (lane == 0) {
    const acc_t norm = sqrt(sq);
    unclamped[j] = norm >= acc_t(kNormEps);
    inv_norm[j] = acc_t(1) / fmax(norm, acc_t(kNormEps));
  }
}

// ---- forward ------------------------------------------------------------------------------

// One block per (row, segment of the chunk): the logits s·clamp(cos) (the target column's
// replaced by the margin logit) reduced to softmax statistics in segment_max/segment_sum.
template <typename acc_t>
__global__ void __launch_bounds__(kEpilogueThreads)
    margin_softmax_forward_kernel(const acc_t* __restrict__ dots, int64_t width, int64_t c0,
                                  const acc_t* __restrict__ inv_norm_w,
                                  const RowTarget* __restrict__ rows, acc_t s,
                                  acc_t* __restrict__ segment_max, acc_t* __restrict__ segment_sum,
                                  int64_t segments_per_row, int64_t segment_offset) {
  const int64_t i = blockIdx.x;
  const RowTarget& t = rows[i];
  if (!t.counted) return;  // the whole block; ignored rows' statistics are never read
  const acc_t inv_norm_x = static_cast<acc_t>(t.inv_norm);
  const int64_t target = t.label - c0;  // outside [0, width) when the target is in another chunk
  const acc_t target_logit = static_cast<acc_t>(t.logit);
  const acc_t* row = dots + i * width;
  const int64_t j0 = int64_t{blockIdx.y} * kSegment + threadIdx.x;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  acc_t logit[kEpilogueItems];
  acc_t thread_max = kNegInf;
#pragma unroll
  for (int k = 0; k < kEpilogueItems; ++k) {
    const int64_t j = j0 + int64_t{k} * kEpilogueThreads;
    logit[k] = kNegInf;
    if (j < width) {
      const acc_t c = clamp_unit(cosine_of(row[j], inv_norm_x, inv_norm_w[j]));
      logit[k] = j == target ? target_logit : s * c;
    }
    thread_max = cuda::max_nan(thread_max, logit[k]);
  }
  SoftmaxStats<acc_t> stats{thread_max, acc_t(0)};
  if (thread_max != kNegInf) {
#pragma unroll
    for (int k = 0; k < kEpilogueItems; ++k) stats.sum += cuda::exp_acc(logit[k] - thread_max);
  }
  stats = cuda::block_merge_stats<kEpilogueThreads>(stats);
  if (threadIdx.x == 0) {
    const int64_t slot = i * segments_per_row + segment_offset + blockIdx.y;
    segment_max[slot] = stats.max;
    segment_sum[slot] = stats.sum;
  }
}

// d loss_i / d cos_iy / grad_loss_i at the target column: through the margin, from the direct dot
// product (double), with p from the target logit as the forward rounded it into the log-sum-exp
// (a lone class: p = 1); 0 where the target cosine was clamped. Every path forms it here.
template <typename acc_t>
__device__ __forceinline__ acc_t target_gradient(const RowTarget& t, acc_t lse) {
  const double inside = (t.cosine >= -1.0 && t.cosine <= 1.0) ? 1.0 : 0.0;
  const double logit = static_cast<double>(static_cast<acc_t>(t.logit));
  const double p = exp(logit - static_cast<double>(lse));
  return static_cast<acc_t>(inside * (p - 1.0) * t.dlogit_dc);
}

// The per-row part of the kept block (kept_block.h) that the forward's finalize writes; `factor`
// nullptr when there is no kept block.
struct KeptRows {
  at::BFloat16* block;     // H, rows `ld` apart
  int64_t ld;
  const float* inv_norm;   // the class norms, written by the forward's tiles
  float* factor;
  uint8_t* recompute;
  float s;
};

// Row i's factor f_i = exp(S_i - lse_i) and its target column, H_iy = G_iy / f_i (the forward's
// tiles wrote 0 there; G_iy as the backward kernels form it). A row whose largest logit rose more
// than kKeptMaxAbove above S_i, or whose H_iy would leave bf16's range, is marked for
// recomputation instead (kept_block_recompute, then f_i = 1).
template <typename acc_t>
__device__ void finish_kept_row(const KeptRows& kept, const RowTarget& t, int64_t i, acc_t row_max, acc_t lse) {
  const float shift = kept_shift(kept.s, static_cast<float>(t.logit));
  bool keep = static_cast<float>(row_max) - shift <= kKeptMaxAbove;  // false for NaN
  float factor = 1.0f;
  if (keep) {
    factor = expf(shift - static_cast<float>(lse));
    if (t.label >= 0) {
      const float q = target_gradient<float>(t, static_cast<float>(lse));
      const double h = static_cast<double>(q) * kept.inv_norm[t.label] *
                       exp(static_cast<double>(lse) - static_cast<double>(shift));
      keep = fabs(h) <= 1e38;  // bf16's largest finite value is 3.39e38; false for NaN
      if (keep) kept.block[i * kept.ld + t.label] = static_cast<at::BFloat16>(static_cast<float>(h));
    }
  }
  kept.factor[i] = keep ? factor : 1.0f;
  kept.recompute[i] = keep ? 0 : 1;
}

// One block per row: merges the segments' statistics into logsumexp, loss and target cosine, each
// thread a strided share of them and then the block's in a fixed order (bit-identical run to run).
// A block, not a warp, a row: the fused forward's blocks that walk several row tiles write a
// segment a class tile, 7,813 a row at C = 1M, and a warp a row left ~4 warps an SM to read them.
// Ignored rows get zeros (the Python layer marks their target cosines NaN): the outputs are
// created uninitialised, so every row is written here. With a kept block, also its row factors.
template <typename acc_t>
__global__ void __launch_bounds__(kEpilogueThreads)
    margin_softmax_finalize_kernel(const acc_t* __restrict__ segment_max,
                                   const acc_t* __restrict__ segment_sum, int64_t segments,
                                   const RowTarget* __restrict__ rows, int64_t n,
                                   acc_t* __restrict__ loss, acc_t* __restrict__ logsumexp,
                                   acc_t* __restrict__ target_cosine, KeptRows kept) {
  const int64_t i = blockIdx.x;
  if (i >= n) return;
  const RowTarget& t = rows[i];
  if (!t.counted) {
    if (threadIdx.x == 0) {
      logsumexp[i] = loss[i] = target_cosine[i] = acc_t(0);
      if (t.label == kBadLabel) loss[i] = target_cosine[i] = std::numeric_limits<acc_t>::quiet_NaN();
      if (kept.factor != nullptr) {
        kept.factor[i] = 0.0f;  // the row's H is zero (the fused forward's tiles zero it) and unused
        kept.recompute[i] = 0;
      }
    }
    return;
  }
  const acc_t* row_max = segment_max + i * segments;
  const acc_t* row_sum = segment_sum + i * segments;
  cuda::SoftmaxStats<acc_t> stats{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  for (int64_t k = threadIdx.x; k < segments; k += kEpilogueThreads)
    stats = cuda::merge_stats(stats, {row_max[k], row_sum[k]});
  stats = cuda::block_merge_stats<kEpilogueThreads>(stats);
  if (threadIdx.x == 0) {
    const acc_t lse = stats.max + cuda::log_acc(stats.sum);
    logsumexp[i] = lse;
    loss[i] = lse - static_cast<acc_t>(t.logit);
    target_cosine[i] = static_cast<acc_t>(clamp_cosine(t.cosine));
    if (kept.factor != nullptr) finish_kept_row(kept, t, i, stats.max, lse);
  }
}

// ---- backward -----------------------------------------------------------------------------

// One block per (row, segment of the chunk): replaces the raw dot products by
//   G_ij = (d loss_i / d cos_ij) / grad_loss_i / ‖w_j‖
// (s·softmax_ij off the target, (p_iy - 1)·s·dψ/dc on it, 0 where the cosine was clamped or the
// row does not count), in the GEMM input dtype. The per-row factor grad_loss_i is applied after
// the GEMMs, so G stays in [-s·max dψ/dc, s] / ‖w_j‖ whatever the loss scale.
// `dots` and `grad_block` may be the same memory (fp32/fp64): each element is read, then written,
// by one thread. grad_block's rows are `ld` apart. Without grad_loss (the kept block's forward, which
// runs before it exists) every counted row is written.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kEpilogueThreads)
    margin_softmax_backward_kernel(const acc_t* dots, scalar_t* grad_block, int64_t width, int64_t ld,
                                   int64_t c0, const acc_t* __restrict__ inv_norm_w,
                                   const RowTarget* __restrict__ rows,
                                   const acc_t* __restrict__ grad_loss,
                                   const acc_t* __restrict__ logsumexp, acc_t s) {
  const int64_t i = blockIdx.x;
  const RowTarget& t = rows[i];
  const bool active = t.counted && (grad_loss == nullptr || grad_loss[i] != acc_t(0));
  const acc_t inv_norm_x = static_cast<acc_t>(t.inv_norm);
  const acc_t lse = logsumexp[i];
  const int64_t target = t.label - c0;
  const acc_t* row = dots + i * width;
  scalar_t* out = grad_block + i * ld;
  const int64_t j0 = int64_t{blockIdx.y} * kSegment + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kEpilogueItems; ++k) {
    const int64_t j = j0 + int64_t{k} * kEpilogueThreads;
    if (j >= width) continue;
    acc_t q = 0;
    if (active) {
      if (j == target) {
        q = target_gradient<acc_t>(t, lse);
      } else {
        const acc_t cosine = cosine_of(row[j], inv_norm_x, inv_norm_w[j]);
        const acc_t inside = (cosine >= acc_t(-1) && cosine <= acc_t(1)) ? acc_t(1) : acc_t(0);
        q = inside * s * cuda::exp_acc(s * clamp_unit(cosine) - lse);
      }
    }
    out[j] = to_gemm_operand<scalar_t, acc_t>(q * inv_norm_w[j]);
  }
}

// One warp per class of the chunk: from P_j = Σ_i G_ij (grad_loss_i / grad_max) x̂_i (the GEMM
// Gᵀ·X̂), d loss / d w_j = grad_max (P_j - (P_j·ŵ_j) ŵ_j): the gradient w.r.t. ŵ_j projected off
// ŵ_j, which is the CPU kernel's "- (Σ_i g_ij cos_ij) ŵ_j / ‖w_j‖" term (Σ_i g_ij cos_ij =
// ŵ_j·Σ_i g_ij x̂_i). No projection where the norm was clamped (ŵ = w / eps is then linear).
// `p` and `grad_w` may be the same memory (every dtype but fp16 has the GEMM write P straight into
// grad_weight, see kPInGradWeight); P is then of the input dtype (p_t).
template <typename scalar_t, typename acc_t, typename p_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    class_gradient_kernel(const p_t* p, const scalar_t* __restrict__ w,
                          const acc_t* __restrict__ inv_norm_w,
                          const uint8_t* __restrict__ unclamped,
                          const acc_t* __restrict__ grad_max, int64_t num_classes, int64_t dim,
                          scalar_t* grad_w) {
  const int64_t j = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (j >= num_classes) return;
  const p_t* pj = p + j * dim;
  const scalar_t* wj = w + j * dim;
  const acc_t scale = *grad_max;
  scalar_t* out = grad_w + j * dim;
  // Up to D = 32·kCached (512 with 16 values a lane) the row stays in registers between the dot
  // product and the output, so P_j and w_j are read once, not twice (the kernel is bound by memory
  // traffic: 2.9 TB/s and a 41% L2 hit rate on the H200, session 8). Same sums in the same order as
  // the loop below.
  constexpr int kCached = 16;
  if (dim <= kCached * kWarpSize) {
    acc_t pc[kCached], wc[kCached];
    const int d = static_cast<int>(dim);
#pragma unroll
    for (int t = 0; t < kCached; ++t) {
      const int k = lane + t * kWarpSize;
      pc[t] = k < d ? load_acc<p_t, acc_t>(pj + k) : acc_t(0);
      wc[t] = k < d ? load_acc<scalar_t, acc_t>(wj + k) : acc_t(0);
    }
    acc_t coef = 0;
    if (unclamped[j]) {
      acc_t dot = 0;
#pragma unroll
      for (int t = 0; t < kCached; ++t)
        if (lane + t * kWarpSize < d) dot += pc[t] * wc[t];
      dot = cuda::warp_sum(dot);
      coef = dot * inv_norm_w[j] * inv_norm_w[j];
    }
#pragma unroll
    for (int t = 0; t < kCached; ++t) {
      const int k = lane + t * kWarpSize;
      if (k < d) out[k] = static_cast<scalar_t>(scale * (pc[t] - coef * wc[t]));
    }
    return;
  }
  acc_t coef = 0;
  if (unclamped[j]) {
    acc_t dot = 0;
    for (int64_t k = lane; k < dim; k += kWarpSize)
      dot += load_acc<p_t, acc_t>(pj + k) * load_acc<scalar_t, acc_t>(wj + k);
    dot = cuda::warp_sum(dot);
    coef = dot * inv_norm_w[j] * inv_norm_w[j];
  }
  for (int64_t k = lane; k < dim; k += kWarpSize)
    out[k] = static_cast<scalar_t>(scale * (load_acc<p_t, acc_t>(pj + k) - coef * load_acc<scalar_t, acc_t>(wj + k)));
}

// One warp per row: from A_i = Σ_j G_ij w_j = Σ_j (g_ij / grad_loss_i) ŵ_j,
// d loss / d x_i = grad_loss_i / ‖x_i‖ (A_i - (A_i·x̂_i) x̂_i) (no projection where the norm was
// clamped); zero at ignored rows. With row_factor, `a` holds Σ_j H_ij w_j of the kept block and
// A_i = f_i times that (kept_block.h).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    embedding_gradient_kernel(const acc_t* __restrict__ a, const scalar_t* __restrict__ x,
                              const RowTarget* __restrict__ rows,
                              const acc_t* __restrict__ grad_loss, int64_t n, int64_t dim,
                              scalar_t* __restrict__ grad_x, const acc_t* __restrict__ row_factor) {
  const int64_t i = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= n) return;
  const RowTarget& t = rows[i];
  scalar_t* out = grad_x + i * dim;
  if (!t.counted) {
    for (int64_t k = lane; k < dim; k += kWarpSize) out[k] = static_cast<scalar_t>(acc_t(0));
    return;
  }
  const acc_t* ai = a + i * dim;
  const scalar_t* xi = x + i * dim;
  const acc_t inv_norm_x = static_cast<acc_t>(t.inv_norm);
  acc_t dot = 0;
  if (t.norm_unclamped) {
    for (int64_t k = lane; k < dim; k += kWarpSize)
      dot += ai[k] * (load_acc<scalar_t, acc_t>(xi + k) * inv_norm_x);
    dot = cuda::warp_sum(dot);
  }
  acc_t scale = grad_loss[i] * inv_norm_x;
  if (row_factor != nullptr) scale *= row_factor[i];
  for (int64_t k = lane; k < dim; k += kWarpSize) {
    const acc_t xhat = load_acc<scalar_t, acc_t>(xi + k) * inv_norm_x;
    out[k] = static_cast<scalar_t>(scale * (ai[k] - dot * xhat));
  }
}

// The labels' value check in one launch: the first row whose label is neither ignore_index nor in
// [0, num_classes), or n if there is none, from one block (each thread's first bad row, then the
// smallest). The caller reads it back, the device sync the check needs, before any other kernel.
// (ATen's form of the same check is five elementwise launches and a reduction.)
constexpr int kLabelCheckThreads = 256;

__global__ void __launch_bounds__(kLabelCheckThreads)
    first_bad_label_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t ignore_index,
                           int64_t num_classes, int64_t* __restrict__ first_bad) {
  __shared__ int64_t warp_first[kLabelCheckThreads / kWarpSize];
  int64_t mine = n;
  for (int64_t i = threadIdx.x; i < n; i += kLabelCheckThreads) {
    const int64_t y = labels[i];
    if (y != ignore_index && (y < 0 || y >= num_classes)) {
      mine = i;
      break;
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    mine = std::min(mine, __shfl_xor_sync(0xffffffffu, mine, offset));
  if (threadIdx.x % kWarpSize == 0) warp_first[threadIdx.x / kWarpSize] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t first = warp_first[0];
    for (int k = 1; k < kLabelCheckThreads / kWarpSize; ++k) first = std::min<int64_t>(first, warp_first[k]);
    *first_bad = first;
  }
}

// reduce_loss in one block: the counted rows' loss summed in double (each thread its strided rows,
// then the warps in a fixed order, so the result is the same run to run), over their count with `mean`.
constexpr int kReduceThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_loss_kernel(const scalar_t* __restrict__ loss, const int64_t* __restrict__ labels, int64_t n,
                       int64_t ignore_index, bool mean, scalar_t* __restrict__ out) {
  __shared__ double warp_total[kReduceThreads / kWarpSize];
  __shared__ int64_t warp_counted[kReduceThreads / kWarpSize];
  double total = 0;
  int64_t counted = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) {
    if (labels[i] == ignore_index) continue;
    total += static_cast<double>(loss[i]);
    ++counted;
  }
  total = cuda::warp_sum(total);
  counted = cuda::warp_sum(counted);
  if (threadIdx.x % kWarpSize == 0) {
    warp_total[threadIdx.x / kWarpSize] = total;
    warp_counted[threadIdx.x / kWarpSize] = counted;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    total = warp_total[0];
    counted = warp_counted[0];
    for (int k = 1; k < kReduceThreads / kWarpSize; ++k) {
      total += warp_total[k];
      counted += warp_counted[k];
    }
    if (mean) total /= static_cast<double>(counted > 0 ? counted : 1);
    *out = static_cast<scalar_t>(total);
  }
}

// reduce_loss's gradient, in one block (every thread needs the count): grad, over the count with
// `mean` (divided in grad's dtype, as ATen's grad / count), at counted rows, 0 at ignored ones.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_loss_backward_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ labels, int64_t n,
                                int64_t ignore_index, bool mean, scalar_t* __restrict__ grad_rows) {
  __shared__ int64_t warp_counted[kReduceThreads / kWarpSize];
  scalar_t g = *grad;
  if (mean) {
    int64_t counted = 0;
    for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) counted += labels[i] != ignore_index;
    counted = cuda::warp_sum(counted);
    if (threadIdx.x % kWarpSize == 0) warp_counted[threadIdx.x / kWarpSize] = counted;
    __syncthreads();
    counted = 0;
    for (int k = 0; k < kReduceThreads / kWarpSize; ++k) counted += warp_counted[k];
    g /= static_cast<scalar_t>(counted > 0 ? counted : 1);
  }
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) grad_rows[i] = labels[i] == ignore_index ? scalar_t(0) : g;
}

// ---- fused tensor-core kernels (16-bit inputs, sm_80+) ---------------------------------------
//
// The GEMM and its epilogue in one kernel: a block computes a 128 x 128 tile of raw dot products
// with mma.sync (tensor_core_tile.cuh) and turns it, still in registers, into softmax statistics
// (forward) or the 16-bit gradient block (backward). The fp32 dot products never reach global
// memory. Same expressions as the cuBLAS path's epilogues (cosine_of, clamp_unit, the margin from
// RowTarget), so the two paths differ only in the order of the fp32 dot-product sums.

using cuda::kTileClasses;
using cuda::kTileRows;
using cuda::kTileThreads;
using cuda::tile_class;
using cuda::tile_row;

// After tile_run_gemm<kBFloat16, true, ...>: the tile's inverse class norms and clamp flags, as
// class_inverse_norms_kernel computes them, in shared memory for the whole block. The arrays are
// template parameters (shared float[128] and bool[128], or nullptr for no flags), so that the CPU
// emulator's checked shared arrays (tests/emulator) pass through as well.
template <typename InvNorms, typename Unclamped>
__device__ __forceinline__ void publish_class_norms(float norm_sq, InvNorms&& inv_norm, Unclamped&& unclamped) {
  norm_sq += __shfl_xor_sync(0xffffffffu, norm_sq, 1);
  if (threadIdx.x % 2 == 0) {
    const float norm = sqrtf(norm_sq);
    inv_norm[threadIdx.x / 2] = 1.0f / fmaxf(norm, static_cast<float>(kNormEps));
    if constexpr (!std::is_same<std::decay_t<Unclamped>, std::nullptr_t>::value) {
      unclamped[threadIdx.x / 2] = norm >= static_cast<float>(kNormEps);
    }
  }
  __syncthreads();
}

// The fused forward's row arrays for rows [row0, +128): each row's inverse norm, target logit and
// target; rows that do not count get finite, meaningless statistics, which finalize never reads.
// (Template arrays, as in publish_class_norms.)
template <typename InvNorms, typename TargetLogits, typename Targets>
__device__ __forceinline__ void load_tile_rows(const RowTarget* __restrict__ rows, int64_t n, int64_t row0,
                                               InvNorms&& row_inv_norm, TargetLogits&& row_target_logit,
                                               Targets&& row_target) {
  for (int r = threadIdx.x; r < kTileRows; r += kTileThreads) {
    const int64_t i = row0 + r;
    const bool counted = i < n && rows[i].counted;
    row_inv_norm[r] = counted ? static_cast<float>(rows[i].inv_norm) : 0.0f;
    row_target_logit[r] = counted ? static_cast<float>(rows[i].logit) : 0.0f;
    row_target[r] = counted ? rows[i].label : -1;
  }
}

// Two adjacent 16-bit values of a row, stored as one 32-bit word.
template <typename scalar_t>
struct alignas(2 * sizeof(scalar_t)) ValuePair {
  scalar_t value[2];
};

// The forward tiles' logit of a raw dot product: s·cos, -inf past the last class, the target logit
// (margin included, from row_targets) at the row's target column.
__device__ __forceinline__ float forward_logit(float dot, float inv_x, float inv_w, float s, bool past_end,
                                              bool is_target, float target_logit) {
  float logit = s * clamp_unit(cosine_of(dot, inv_x, inv_w));
  if (past_end) logit = -std::numeric_limits<float>::infinity();
  return is_target ? target_logit : logit;
}

// The kept block's factor for a row whose tile maximum is m: H_ij = s·exp(l_ij - S_i)/‖w_j‖ =
// exp(l_ij - m)·[s·exp(m - S_i)]/‖w_j‖. The cap keeps a row that will be recomputed finite (0·inf
// would be NaN), and s·e^80 is finite.
__device__ __forceinline__ float kept_row_scale(float s, float target_logit, float m) {
  const float shift = kept_shift(s, target_logit);
  return s * exp_shifted(fminf(m, shift + 80.0f), shift);
}

// After the first pass's tile GEMM: the class tile's inverse norms (and, with kKeep, clamp flags) in
// shared memory; with kKeep the blocks of the first row tile also hand them to the kept block.
template <bool kKeep, typename InvNorms, typename Unclamped>
__device__ __forceinline__ void publish_forward_class_norms(float norm_sq, InvNorms&& tile_inv_norm,
                                                           Unclamped&& tile_unclamped, int64_t col0, int64_t c,
                                                           float* __restrict__ class_inv_norm,
                                                           uint8_t* __restrict__ class_unclamped) {
  if constexpr (kKeep) {
    publish_class_norms(norm_sq, tile_inv_norm, tile_unclamped);
    if (blockIdx.x == 0) {
      for (int jl = threadIdx.x; jl < kTileClasses; jl += kTileThreads) {
        if (col0 + jl < c) {
          class_inv_norm[col0 + jl] = tile_inv_norm[jl];
          class_unclamped[col0 + jl] = tile_unclamped[jl];
        }
      }
    }
  } else {
    publish_class_norms(norm_sq, tile_inv_norm, nullptr);
  }
}

// Forward. Block (b, g) owns class tiles [g·tiles_per_segment, (g+1)·tiles_per_segment) and walks
// them in `passes` passes, one a row tile: rows [128 r, +128) for r = b·row_tiles_per_block + pass
// (one pass, one row tile a block, before session 13; see plan_fused_segments). In a pass it walks
// its tiles, reduces each row's logits of a tile to (max, Σexp) over the 4 lanes that hold them,
// folds that into running statistics (one lane of the quad keeps them), and at the pass's end
// merges the 4 warps that share a row in a fixed order and writes one (max, sum) per (row,
// segment g). A block that makes several passes has a segment of one class tile (the host's
// plan): the first pass sums its norms, which wait in shared memory for the others, and each pass
// reads the class tile again right after the previous one, from L2.
// With kKeep (bf16), it also writes the kept block (kept_block.h): H_ij = s·exp(l_ij - S_i)/‖w_j‖,
// from the exponentials the sum already took (exp(l - m) of the tile's row maximum m, times
// exp(m - S_i)); 0 at the target column (finalize writes it) and past the last class. Where the
// cosine was clamped, G is 0 and H is not: such a cosine passed ±1 by rounding, so x̂_i and ŵ_j are
// parallel and the projections of class_gradient_kernel and embedding_gradient_kernel remove the
// column's contribution all the same (tracking the clamp cost registers this kernel has not got).
// The blocks of the first row tile write the class norms.
template <bool kBFloat16, int kStages, bool kKeep = false>
__global__ void __launch_bounds__(kTileThreads, 2)
    fused_forward_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w, int64_t n,
                         int64_t c, int dim, const RowTarget* __restrict__ rows, float s,
                         int64_t tiles_per_segment,
                         float* __restrict__ segment_max, float* __restrict__ segment_sum,
                         int64_t segments, at::BFloat16* __restrict__ kept_block, int64_t kept_ld,
                         float* __restrict__ class_inv_norm, uint8_t* __restrict__ class_unclamped,
                         int row_tiles_per_block) {
  static_assert(!kKeep || kBFloat16, "the kept block is bf16 only (fp16's range is too narrow for its shift)");
  extern __shared__ __align__(16) uint16_t tile_smem[];
  __shared__ float row_inv_norm[kTileRows];
  __shared__ float row_target_logit[kTileRows];
  __shared__ int64_t row_target[kTileRows];
  __shared__ float part_max[4][kTileRows];
  __shared__ float part_sum[4][kTileRows];
  __shared__ float tile_inv_norm[kTileClasses];
  __shared__ bool tile_unclamped[kTileClasses];  // kKeep only
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  const int64_t first_row_tile = int64_t{blockIdx.x} * row_tiles_per_block;
  const int64_t passes = std::min<int64_t>(row_tiles_per_block, (n + kTileRows - 1) / kTileRows - first_row_tile);
  auto load_rows = [&](int64_t row0) {
    load_tile_rows(rows, n, row0, row_inv_norm, row_target_logit, row_target);
  };
  load_rows(first_row_tile * kTileRows);
  __syncthreads();

  // Each tile's statistics are reduced over the quad (the 4 lanes holding a row's 32 classes of
  // this warp) at once; lane q of the quad then keeps the running statistics of two of its eight
  // rows, k = q and q + 4 (k = 2 mi + h): 4 registers instead of 16 across the tile GEMM.
  const int quad_lane = threadIdx.x % 4;
  const int warp_n = threadIdx.x / 32 % 4;
  cuda::SoftmaxStats<float> running[2] = {{kNegInf, 0.0f}, {kNegInf, 0.0f}};

  const int64_t tiles = (c + kTileClasses - 1) / kTileClasses;
  const int64_t first = int64_t{blockIdx.y} * tiles_per_segment;
  const int64_t per_pass = std::min(first + tiles_per_segment, tiles) - first;
  // One pipeline over every pass's tiles: the next tile's first slices load during this epilogue,
  // the next pass's during the last tile's.
  const cuda::TileRun run = cuda::make_tile_run(x, n, first_row_tile * kTileRows, w, c, first * kTileClasses,
                                                per_pass, dim, passes);
  int64_t pass = 0, in_pass = 0;  // t = pass·per_pass + in_pass
  for (int64_t t = 0; t < run.tiles; ++t) {
    const int64_t tile = first + in_pass;
    const int64_t col0 = tile * kTileClasses;
    const int64_t row0 = (first_row_tile + pass) * kTileRows;
    cuda::TileAcc acc;
    float norm_sq;
    // (The previous tile's epilogue read the row arrays and tile_inv_norm before this tile's GEMM
    // barriers.)
    if (pass == 0) {
      cuda::tile_run_gemm<kBFloat16, true, kStages>(run, t, tile_smem, acc, norm_sq);
      publish_forward_class_norms<kKeep>(norm_sq, tile_inv_norm, tile_unclamped, col0, c, class_inv_norm,
                                         class_unclamped);
    } else {
      cuda::tile_run_gemm<kBFloat16, false, kStages>(run, t, tile_smem, acc, norm_sq);
      if (in_pass == 0) {  // a new pass: its row tile's rows
        load_rows(row0);
        __syncthreads();
      }
    }
    float inv_w[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) inv_w[ni][e] = tile_inv_norm[tile_class(ni, e)];
    // Column tile_class(ni, e) = first_col + 8 ni + e of the tile: the target and the end of the
    // classes compare in these 32-bit offsets, once a row and once a tile, not as 64-bit class
    // indices at every logit.
    const int first_col = tile_class(0, 0);
    const int64_t valid = std::min<int64_t>(c - col0, kTileClasses);
    cuda::SoftmaxStats<float> tile_stats[8];
    // Each logit is formed once, in place of its dot product, then reduced to (max, Σexp): the
    // session-8 H200 counters found the epilogue ~40% of the kernel's instructions when it formed
    // every logit twice, checked the class bounds as 64-bit indices and called expf.
    auto reduce_rows = [&](auto masked) {
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = tile_row(mi, h);
          const float inv_x = row_inv_norm[r];
          const int64_t target_col = row_target[r] - col0;
          const int target = target_col >= 0 && target_col < kTileClasses ? static_cast<int>(target_col) - first_col : -1;
          const float target_logit = row_target_logit[r];
          float m = kNegInf;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& value = acc[mi][ni][2 * h + e];
              value = forward_logit(value, inv_x, inv_w[ni][e], s,
                                    decltype(masked)::value && first_col + 8 * ni + e >= valid, target == 8 * ni + e,
                                    target_logit);
              m = cuda::max_nan(m, value);
            }
          m = cuda::max_nan(m, __shfl_xor_sync(0xffffffffu, m, 1));
          m = cuda::max_nan(m, __shfl_xor_sync(0xffffffffu, m, 2));
          float sum = 0.0f;
          if (m != kNegInf) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                float& value = acc[mi][ni][2 * h + e];
                const float p = exp_shifted(value, m);
                sum += p;
                if constexpr (kKeep) value = p;
              }
          }
          if constexpr (kKeep) {
            const int64_t i = row0 + r;
            if (i < n) {
              const float scale = kept_row_scale(s, target_logit, m);
              at::BFloat16* out = kept_block + i * kept_ld + (col0 + first_col);
#pragma unroll
              for (int ni = 0; ni < 4; ++ni) {
                ValuePair<at::BFloat16> pair;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  // (With m = -inf the values are still the logits, all -inf. A row that does not
                  // count has inv_x = 0, and a dot product past fp32's range would give it NaN
                  // cosines: its H is zero, as its factor is.)
                  const bool zero = m == kNegInf || inv_x == 0.0f || target == 8 * ni + e;
                  pair.value[e] = to_gemm_operand<at::BFloat16, float>(
                      zero ? 0.0f : acc[mi][ni][2 * h + e] * scale * inv_w[ni][e]);
                }
                // A full tile lies inside the row (C <= pitch); a partial one stops at the pitch.
                bool inside = true;
                if constexpr (decltype(masked)::value) inside = first_col + 8 * ni < kept_ld - col0;
                if (inside) *reinterpret_cast<ValuePair<at::BFloat16>*>(out + 8 * ni) = pair;
              }
            }
          }
          // (a + b) + (c + d) in every lane alike: fp addition is commutative.
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          tile_stats[2 * mi + h] = {m, sum};
        }
    };
    if (valid == kTileClasses) {
      reduce_rows(std::false_type{});
    } else {
      reduce_rows(std::true_type{});
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      cuda::SoftmaxStats<float> mine = tile_stats[4 * u];
#pragma unroll
      for (int q = 1; q < 4; ++q)
        if (quad_lane == q) mine = tile_stats[4 * u + q];  // selects, not a run-time index
      running[u] = cuda::merge_stats(running[u], mine);
    }

    if (++in_pass == per_pass) {
      // The pass's end: each row's statistics of this warp's 32-class columns sit in one lane; to
      // shared memory, then each row's four merged in a fixed order. (The next pass's GEMM
      // barriers come before these arrays are written again.)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int k = quad_lane + 4 * u;
        const int r = tile_row(k / 2, k % 2);
        part_max[warp_n][r] = running[u].max;
        part_sum[warp_n][r] = running[u].sum;
        running[u] = {kNegInf, 0.0f};
      }
      __syncthreads();
      for (int r = threadIdx.x; r < kTileRows; r += kTileThreads) {
        const int64_t i = row0 + r;
        if (i >= n) break;
        cuda::SoftmaxStats<float> stats{part_max[0][r], part_sum[0][r]};
#pragma unroll
        for (int k = 1; k < 4; ++k) stats = cuda::merge_stats(stats, {part_max[k][r], part_sum[k][r]});
        segment_max[i * segments + blockIdx.y] = stats.max;
        segment_sum[i * segments + blockIdx.y] = stats.sum;
      }
      in_pass = 0;
      ++pass;
    }
  }
}

// The forward on the wgmma tile (wgmma_tile.cuh: sm_90a, chosen by wgmma_tile_variant), in slices kVariant
// deep, or with the x tile resident (kVariant = kWgmmaResidentX: one pass a block, its row tile loaded
// once for all of its class tiles, so that only W streams from L2, and each tile's epilogue run beside
// the next tile's first slice): the same segments, passes, outputs and kept block as
// fused_forward_kernel, in the tile's accumulator layout.
// A thread holds two rows (h) of 32 classes each, and a row's 128 classes lie in one quad, so a tile's
// (max, Σexp) of a row is complete after two shuffles; the running statistics are the row's own, and
// a pass's end writes them from the quad's first lane, without the four-warp merge in shared memory.
// Its sums run in another order than fused_forward_kernel's (the tensor cores' and the quad's), so
// the two kernels agree to fp32 round-off, not bit for bit; each is deterministic.
template <bool kBFloat16, bool kKeep, int kVariant>
__global__ void __launch_bounds__(kTileThreads, kVariant == cuda::kWgmmaResidentX ? 1 : 2)
    fused_forward_wgmma_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w, int64_t n,
                               int64_t c, int dim, const RowTarget* __restrict__ rows, float s,
                               int64_t tiles_per_segment,
                               float* __restrict__ segment_max, float* __restrict__ segment_sum,
                               int64_t segments, at::BFloat16* __restrict__ kept_block, int64_t kept_ld,
                               float* __restrict__ class_inv_norm, uint8_t* __restrict__ class_unclamped,
                               int row_tiles_per_block) {
  static_assert(!kKeep || kBFloat16, "the kept block is bf16 only (fp16's range is too narrow for its shift)");
  extern __shared__ __align__(16) uint16_t tile_smem[];
  __shared__ float row_inv_norm[kTileRows];
  __shared__ float row_target_logit[kTileRows];
  __shared__ int64_t row_target[kTileRows];
  __shared__ float tile_inv_norm[kTileClasses];
  __shared__ bool tile_unclamped[kTileClasses];  // kKeep only
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  using Slice = cuda::WgmmaSliceOf<kVariant>;
  const cuda::WgmmaSmem smem = cuda::wgmma_smem<Slice>(tile_smem, dim);

  const int64_t first_row_tile = int64_t{blockIdx.x} * row_tiles_per_block;
  const int64_t passes = std::min<int64_t>(row_tiles_per_block, (n + kTileRows - 1) / kTileRows - first_row_tile);
  load_tile_rows(rows, n, first_row_tile * kTileRows, row_inv_norm, row_target_logit, row_target);
  __syncthreads();

  cuda::SoftmaxStats<float> running[2] = {{kNegInf, 0.0f}, {kNegInf, 0.0f}};
  const int64_t tiles = (c + kTileClasses - 1) / kTileClasses;
  const int64_t first = int64_t{blockIdx.y} * tiles_per_segment;
  const int64_t per_pass = std::min(first + tiles_per_segment, tiles) - first;
  const cuda::TileRun run = cuda::make_wgmma_run<Slice>(x, n, first_row_tile * kTileRows, w, c,
                                                        first * kTileClasses, per_pass, dim, passes);
  // Column wgmma_tile_class(j, e) = first_col + 8j + e: the target and the end of the classes compare
  // as 32-bit offsets from it.
  const int first_col = cuda::wgmma_tile_class(0, 0);
  // The epilogue of tile (row0, col0), its class norms in tile_inv_norm: each row's (max, Σexp) over
  // the tile, merged into `running` (and with kKeep the kept block). Masked: columns past the last
  // class are -inf (any tile may take it; only the last class tile needs it).
  auto reduce_rows = [&](cuda::WgmmaAcc& acc, int64_t row0, int64_t col0, auto masked) {
    const int64_t valid = std::min<int64_t>(c - col0, kTileClasses);
    float inv_x[2], target_logit[2], m[2];
    int target[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = cuda::wgmma_tile_row(h);
      inv_x[h] = row_inv_norm[r];
      const int64_t target_col = row_target[r] - col0;
      target[h] = target_col >= 0 && target_col < kTileClasses ? static_cast<int>(target_col) - first_col : -1;
      target_logit[h] = row_target_logit[r];
      m[h] = kNegInf;
    }
    // Each logit formed once, in place of its dot product; a class's inverse norm read once for both rows.
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float inv_w = tile_inv_norm[first_col + 8 * j + e];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& value = acc[4 * j + 2 * h + e];
          value = forward_logit(value, inv_x[h], inv_w, s, decltype(masked)::value && first_col + 8 * j + e >= valid,
                                target[h] == 8 * j + e, target_logit[h]);
          m[h] = cuda::max_nan(m[h], value);
        }
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[h] = cuda::max_nan(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
      m[h] = cuda::max_nan(m[h], __shfl_xor_sync(0xffffffffu, m[h], 2));
      // With kKeep the row's kept entries are written as their exponentials are taken (zeros where the
      // row has no finite logit; none for rows past n).
      float sum = 0.0f;
      const bool live = m[h] != kNegInf;
      const int64_t i = row0 + cuda::wgmma_tile_row(h);
      const bool keep_row = kKeep && i < n;
      if (live || keep_row) {
        [[maybe_unused]] const float scale = kKeep ? kept_row_scale(s, target_logit[h], m[h]) : 0.0f;
        [[maybe_unused]] at::BFloat16* out = kKeep ? kept_block + i * kept_ld + (col0 + first_col) : nullptr;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          [[maybe_unused]] ValuePair<at::BFloat16> pair;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = live ? exp_shifted(acc[4 * j + 2 * h + e], m[h]) : 0.0f;
            sum += p;
            if constexpr (kKeep) {
              const bool zero = !live || inv_x[h] == 0.0f || target[h] == 8 * j + e;
              pair.value[e] =
                  to_gemm_operand<at::BFloat16, float>(zero ? 0.0f : p * scale * tile_inv_norm[first_col + 8 * j + e]);
            }
          }
          if constexpr (kKeep) {
            bool inside = keep_row;
            if constexpr (decltype(masked)::value) inside = inside && first_col + 8 * j < kept_ld - col0;
            if (inside) {
              *reinterpret_cast<ValuePair<at::BFloat16>*>(out + 8 * j) = pair;
            }
          }
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      running[h] = cuda::merge_stats(running[h], {m[h], sum});
    }
  };
  auto reduce_tile = [&](cuda::WgmmaAcc& acc, int64_t row0, int64_t col0) {
    if (col0 + kTileClasses <= c) {
      reduce_rows(acc, row0, col0, std::false_type{});
    } else {
      reduce_rows(acc, row0, col0, std::true_type{});
    }
  };
  // A pass's end: every lane of a quad holds its rows' statistics; the first writes them.
  auto end_pass = [&](int64_t row0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = row0 + cuda::wgmma_tile_row(h);
      if (threadIdx.x % 4 == 0 && i < n) {
        segment_max[i * segments + blockIdx.y] = running[h].max;
        segment_sum[i * segments + blockIdx.y] = running[h].sum;
      }
      running[h] = {kNegInf, 0.0f};
    }
  };

  if constexpr (kVariant == cuda::kWgmmaResidentX) {
    // One pass. Tile t - 1's epilogue runs inside tile t's GEMM, once its first slice is on the
    // tensor cores (wgmma_run_gemm with a WgmmaPrevious); the tiles alternate two accumulator
    // arrays. Only the run's last tile can be the class range's partial last one, and it is finished
    // after the loop, with the mask; the others take the epilogue without it.
    const int64_t row0 = first_row_tile * kTileRows;
    cuda::WgmmaAcc acc_even, acc_odd;
    float norm_sq = 0.0f, norm_prev = 0.0f;
    int64_t col0_prev = 0;
    auto finish = [&](cuda::WgmmaAcc& acc, auto masked) {
      publish_forward_class_norms<kKeep>(norm_prev, tile_inv_norm, tile_unclamped, col0_prev, c, class_inv_norm,
                                         class_unclamped);
      // The logits go to registers of their own: ptxas serialises the pipeline if other instructions
      // write registers that are a wgmma's accumulators while a group is in flight (this tile's is).
      cuda::WgmmaAcc logits;
#pragma unroll
      for (int i = 0; i < 64; ++i) logits[i] = acc[i];
      reduce_rows(logits, row0, col0_prev, masked);
    };
    auto finish_even = [&] { finish(acc_even, std::false_type{}); };
    auto finish_odd = [&] { finish(acc_odd, std::false_type{}); };
    auto step = [&](int64_t t, cuda::WgmmaAcc& acc, auto previous) {
      norm_prev = norm_sq;  // tile t - 1's, which `previous` finishes
      cuda::wgmma_run_gemm<kBFloat16, true, Slice>(run, t, smem.base, smem.stages, acc, norm_sq, smem.x_base,
                                                   previous);
      col0_prev = (first + t) * kTileClasses;
    };
    for (int64_t t = 0; t < run.tiles; t += 2) {
      step(t, acc_even, cuda::wgmma_previous(acc_odd, finish_odd));
      if (t + 1 < run.tiles) step(t + 1, acc_odd, cuda::wgmma_previous(acc_even, finish_even));
    }
    norm_prev = norm_sq;
    cuda::wgmma_wait<0>(acc_even, acc_odd);  // the last tile's last group
    if (run.tiles % 2 == 1) {
      finish(acc_even, std::true_type{});
    } else {
      finish(acc_odd, std::true_type{});
    }
    end_pass(row0);
  } else {
    int64_t pass = 0, in_pass = 0;  // t = pass·per_pass + in_pass
    for (int64_t t = 0; t < run.tiles; ++t) {
      const int64_t col0 = (first + in_pass) * kTileClasses;
      const int64_t row0 = (first_row_tile + pass) * kTileRows;
      cuda::WgmmaAcc acc;
      float norm_sq;
      if (pass == 0) {
        cuda::wgmma_run_gemm<kBFloat16, true, Slice>(run, t, smem.base, smem.stages, acc, norm_sq);
        publish_forward_class_norms<kKeep>(norm_sq, tile_inv_norm, tile_unclamped, col0, c, class_inv_norm,
                                           class_unclamped);
      } else {
        cuda::wgmma_run_gemm<kBFloat16, false, Slice>(run, t, smem.base, smem.stages, acc, norm_sq);
        if (in_pass == 0) {  // a new pass: its row tile's rows
          load_tile_rows(rows, n, row0, row_inv_norm, row_target_logit, row_target);
          __syncthreads();
        }
      }
      reduce_tile(acc, row0, col0);
      if (++in_pass == per_pass) {
        end_pass(row0);
        in_pass = 0;
        ++pass;
      }
    }
  }
}

// One entry of the gradient block, G_ij/‖w_j‖ as the GEMMs take it, from the recomputed raw dot
// product: the target's q where the column is the row's target, else the softmax term (0 where the
// cosine was clamped, or the row does not count here, or the column is past the classes).
__device__ __forceinline__ float gradient_entry(float dot, bool counts, bool is_target, float inv_x, float inv_w,
                                                float lse, float target_q, float s) {
  float q = 0.0f;
  if (counts) {
    if (is_target) {
      q = target_q;
    } else {
      const float cosine = cosine_of<float>(dot, inv_x, inv_w);
      const float inside = (cosine >= -1.0f && cosine <= 1.0f) ? 1.0f : 0.0f;
      q = inside * s * exp_shifted(s * clamp_unit(cosine), lse);
    }
  }
  return q * inv_w;
}

// The gradient tiles' row arrays for rows [row0, +128) of a chunk of `width` classes from c0: whether a
// row is formed (counted, with a non-zero grad_loss, or with kRecompute marked in `recompute`), and for
// those its inverse norm, log-sum-exp, chunk-local target column (-1 if not in the chunk) and the
// target's q; zeros elsewhere. Returns whether this thread saw an active row. (Template arrays, as in
// publish_class_norms.)
template <bool kRecompute, typename Active, typename InvNorms, typename Lse, typename TargetQ, typename Targets>
__device__ __forceinline__ bool load_gradient_rows(const RowTarget* __restrict__ rows, int64_t n, int64_t row0,
                                                   int64_t c0, int64_t width, const float* __restrict__ grad_loss,
                                                   const float* __restrict__ logsumexp,
                                                   const uint8_t* __restrict__ recompute, Active&& row_active,
                                                   InvNorms&& row_inv_norm, Lse&& row_lse, TargetQ&& row_target_q,
                                                   Targets&& row_target) {
  bool any_active = false;
  for (int r = threadIdx.x; r < kTileRows; r += kTileThreads) {
    const int64_t i = row0 + r;
    bool active = i < n && rows[i].counted;
    if constexpr (kRecompute) {
      active = active && recompute[i] != 0;
    } else {
      active = active && grad_loss[i] != 0.0f;
    }
    any_active = any_active || active;
    row_active[r] = active;
    row_inv_norm[r] = 0.0f;
    row_lse[r] = 0.0f;
    row_target_q[r] = 0.0f;
    row_target[r] = -1;
    if (active) {
      const RowTarget& t = rows[i];
      row_inv_norm[r] = static_cast<float>(t.inv_norm);
      row_lse[r] = logsumexp[i];
      const int64_t target = t.label - c0;
      if (target >= 0 && target < width) {
        row_target[r] = target;
        row_target_q[r] = target_gradient<float>(t, logsumexp[i]);
      }
    }
  }
  return any_active;
}

// The first row tile's blocks hand the chunk's class norms to class_gradient_kernel (when it runs:
// chunk_inv_norm not null).
template <typename InvNorms, typename Unclamped>
__device__ __forceinline__ void hand_out_chunk_norms(int64_t col0, int64_t width, InvNorms&& tile_inv_norm,
                                                     Unclamped&& tile_unclamped, float* __restrict__ chunk_inv_norm,
                                                     uint8_t* __restrict__ chunk_unclamped) {
  if (chunk_inv_norm == nullptr) return;
  for (int jl = threadIdx.x; jl < kTileClasses; jl += kTileThreads) {
    if (col0 + jl < width) {
      chunk_inv_norm[col0 + jl] = tile_inv_norm[jl];
      chunk_unclamped[col0 + jl] = tile_unclamped[jl];
    }
  }
}

// What the gradient epilogues read of tile row r: whether it is formed, its inverse norm, log-sum-exp and
// target's q, and its target as an offset from this thread's first column (-1 outside the tile; the
// tile's columns compare as 32-bit offsets).
struct GradientRow {
  bool active;
  float inv_x;
  float lse;
  float target_q;
  int target;
};

template <typename Active, typename InvNorms, typename Lse, typename TargetQ, typename Targets>
__device__ __forceinline__ GradientRow gradient_row(int r, int64_t col0, int first_col, Active&& row_active,
                                                    InvNorms&& row_inv_norm, Lse&& row_lse, TargetQ&& row_target_q,
                                                    Targets&& row_target) {
  const int64_t target_col = row_target[r] - col0;
  return {row_active[r], row_inv_norm[r], row_lse[r], row_target_q[r],
          target_col >= 0 && target_col < kTileClasses ? static_cast<int>(target_col) - first_col : -1};
}

// A wgmma tile's gradient entries (gradient_entry), staged in shared memory as 16-bit GEMM operands:
// row r at staged + r·kStagedPitch; two rows a thread, 32 classes each (wgmma_tile_class(j, e) =
// first_col + 8j + e), the two adjacent columns e = 0, 1 stored as one 32-bit word.
constexpr int kStagedPitch = kTileClasses + 8;  // 272-byte rows: 16-byte aligned for the copy-out

template <typename scalar_t, typename Active, typename InvNorms, typename Lse, typename TargetQ, typename Targets,
          typename TileInvNorms>
__device__ __forceinline__ void stage_wgmma_gradient(const cuda::WgmmaAcc& acc, scalar_t* staged, int64_t col0,
                                                     int64_t valid, float s, Active&& row_active,
                                                     InvNorms&& row_inv_norm, Lse&& row_lse, TargetQ&& row_target_q,
                                                     Targets&& row_target, TileInvNorms&& tile_inv_norm) {
  const int first_col = cuda::wgmma_tile_class(0, 0);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = cuda::wgmma_tile_row(h);
    const GradientRow row =
        gradient_row(r, col0, first_col, row_active, row_inv_norm, row_lse, row_target_q, row_target);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      ValuePair<scalar_t> pair;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool in_range = first_col + 8 * j + e < valid;
        const float inv_w = in_range ? tile_inv_norm[first_col + 8 * j + e] : 0.0f;
        pair.value[e] = to_gemm_operand<scalar_t, float>(
            gradient_entry(acc[4 * j + 2 * h + e], row.active && in_range, row.target == 8 * j + e, row.inv_x, inv_w,
                           row.lse, row.target_q, s));
      }
      *reinterpret_cast<ValuePair<scalar_t>*>(staged + r * kStagedPitch + first_col + 8 * j) = pair;
    }
  }
}

// The staged tile written out in 16-byte rows: grad_block has row pitch ld, a multiple of 8 at least the
// chunk's width; columns past the width get the staged zeros; with kRecompute only active rows.
template <bool kRecompute, typename scalar_t, typename Active>
__device__ __forceinline__ void store_gradient_tile(const scalar_t* staged, scalar_t* __restrict__ grad_block,
                                                    int64_t n, int64_t ld, int64_t row0, int64_t col0,
                                                    Active&& row_active) {
  constexpr int kVectorsPerRow = kTileClasses / 8;
  for (int v = threadIdx.x; v < kTileRows * kVectorsPerRow; v += kTileThreads) {
    const int r = v / kVectorsPerRow;
    const int jl = (v % kVectorsPerRow) * 8;
    const int64_t i = row0 + r;
    const int64_t j = col0 + jl;
    if (i < n && j < ld && (!kRecompute || row_active[r]))
      *reinterpret_cast<uint4*>(grad_block + i * ld + j) =
          *reinterpret_cast<const uint4*>(staged + r * kStagedPitch + jl);
  }
}

// The gradient block's tile, for fused_backward_kernel and kept_block_recompute_kernel: the tile of
// rows [128 row_tile, +128) and chunk classes [128 t, +128) (t = blockIdx.y) is recomputed, G_ij
// formed exactly as margin_softmax_backward_kernel does, staged in shared memory (the pipeline's,
// free after the GEMM) and written out in 16-byte rows: grad_block has row pitch ld, a multiple of
// 8 at least `width`; the columns past `width` get zeros.
// The class tile's norms are summed when class_norms is set; otherwise they are the ones an earlier
// call of the same block left in shared memory (the same class tile, another row tile). A block
// may call it again at once: the row arrays are last read before the staging barrier, and the
// staged tile (the next GEMM's pipeline) is last read before the next call's first barrier.
// With kRecompute (the kept block's forward, before any grad_loss exists): only the counted rows
// marked in `recompute` are formed and written, the other rows of grad_block are left as they are,
// and a call whose 128 rows have none returns at once (one call a block, which sums the norms).
// With kWgmmaDepth (64 or 32; 0 is the mma.sync tile) the tile comes from wgmma_tile.cuh with slices
// that deep (sm_90a; kStages is then unused) and the epilogue walks its accumulator layout; the
// entries, the staging and the copy-out are the same.
template <bool kBFloat16, typename scalar_t, int kStages, bool kRecompute, int kWgmmaDepth = 0>
__device__ __forceinline__ void gradient_block_tile(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w_chunk,
                          int64_t n, int64_t width, int dim, int64_t c0,
                          const RowTarget* __restrict__ rows, const float* __restrict__ grad_loss,
                          const float* __restrict__ logsumexp, float s,
                          scalar_t* __restrict__ grad_block, int64_t ld,
                          float* __restrict__ chunk_inv_norm, uint8_t* __restrict__ chunk_unclamped,
                          const uint8_t* __restrict__ recompute, int64_t row_tile, bool class_norms) {
  extern __shared__ __align__(16) uint16_t tile_smem[];
  __shared__ float row_inv_norm[kTileRows];
  __shared__ float row_lse[kTileRows];
  __shared__ float row_target_q[kTileRows];
  __shared__ int64_t row_target[kTileRows];  // chunk-local target column, -1 if not in this chunk
  __shared__ bool row_active[kTileRows];
  __shared__ float tile_inv_norm[kTileClasses];
  __shared__ bool tile_unclamped[kTileClasses];

  const int64_t row0 = row_tile * kTileRows;
  const bool any_active = load_gradient_rows<kRecompute>(rows, n, row0, c0, width, grad_loss, logsumexp, recompute,
                                                         row_active, row_inv_norm, row_lse, row_target_q, row_target);
  if constexpr (kRecompute) {
    if (!__syncthreads_or(any_active)) return;  // the whole block alike
  } else {
    __syncthreads();
  }

  const int64_t col0 = int64_t{blockIdx.y} * kTileClasses;
  cuda::TileAcc acc;        // the mma.sync tile's
  cuda::WgmmaAcc acc_wgmma;  // the wgmma tile's
  float norm_sq;
  // The wgmma pipeline (and then the staged tile) from the first 1024-byte boundary.
  constexpr bool kWgmma = kWgmmaDepth != 0;
  using Slice = cuda::WgmmaSlice<kWgmma ? kWgmmaDepth : 64>;
  const cuda::WgmmaSmem smem = kWgmma ? cuda::wgmma_smem<Slice>(tile_smem, dim) : cuda::WgmmaSmem{0, 0, tile_smem};
  uint16_t* pipeline = smem.stages;
  // Two copies of the slice loop, so that neither carries the other's branch.
  if constexpr (kWgmma) {
    const cuda::TileRun run = cuda::make_wgmma_run<Slice>(x, n, row0, w_chunk, width, col0, 1, dim, 1);
    if (class_norms) {
      cuda::wgmma_run_gemm<kBFloat16, true, Slice>(run, 0, smem.base, pipeline, acc_wgmma, norm_sq);
    } else {
      cuda::wgmma_run_gemm<kBFloat16, false, Slice>(run, 0, smem.base, pipeline, acc_wgmma, norm_sq);
    }
  } else if (class_norms) {
    cuda::tile_gemm<kBFloat16, true, kStages>(x, n, row0, w_chunk, width, col0, dim, tile_smem, acc, norm_sq);
  } else {
    cuda::tile_gemm<kBFloat16, false, kStages>(x, n, row0, w_chunk, width, col0, dim, tile_smem, acc, norm_sq);
  }
  if (class_norms) {
    publish_class_norms(norm_sq, tile_inv_norm, tile_unclamped);
    if (row_tile == 0) {
      hand_out_chunk_norms(col0, width, tile_inv_norm, tile_unclamped, chunk_inv_norm, chunk_unclamped);
    }
  }

  constexpr int kPitch = kStagedPitch;
  static_assert(kTileRows * kPitch * 2 <= cuda::tile_smem_bytes(kStages), "staging tile fits the pipeline");
  static_assert(kTileRows * kPitch * 2 <= cuda::kWgmmaPipelineBytes, "and the wgmma one");
  scalar_t* staged = reinterpret_cast<scalar_t*>(pipeline);
  const int64_t valid = std::min<int64_t>(width - col0, kTileClasses);
  if constexpr (kWgmma) {
    stage_wgmma_gradient(acc_wgmma, staged, col0, valid, s, row_active, row_inv_norm, row_lse, row_target_q,
                         row_target, tile_inv_norm);
  } else {
  // Row by row, each row's values read from shared memory once; the class bounds and the target
  // compared as 32-bit offsets from this thread's first column (tile_class(ni, e) = first_col +
  // 8 ni + e), and the two adjacent columns e = 0, 1 stored as one 32-bit word.
  const int first_col = tile_class(0, 0);
  float inv_w[4][2];
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) inv_w[ni][e] = first_col + 8 * ni + e < valid ? tile_inv_norm[tile_class(ni, e)] : 0.0f;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = tile_row(mi, h);
      const GradientRow row =
          gradient_row(r, col0, first_col, row_active, row_inv_norm, row_lse, row_target_q, row_target);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        ValuePair<scalar_t> pair;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          pair.value[e] = to_gemm_operand<scalar_t, float>(
              gradient_entry(acc[mi][ni][2 * h + e], row.active && first_col + 8 * ni + e < valid,
                             row.target == 8 * ni + e, row.inv_x, inv_w[ni][e], row.lse, row.target_q, s));
        }
        *reinterpret_cast<ValuePair<scalar_t>*>(staged + r * kPitch + first_col + 8 * ni) = pair;
      }
    }
  }
  __syncthreads();
  store_gradient_tile<kRecompute>(staged, grad_block, n, ld, row0, col0, row_active);
}

// Backward: one chunk's gradient block from recomputed tiles (gradient_block_tile). Block (b, t)
// walks row tiles [b·row_tiles_per_block, +row_tiles_per_block) of class tile t, summing the class
// norms at the first only (see plan_backward_row_tiles).
template <bool kBFloat16, typename scalar_t, int kStages, int kWgmmaDepth>
__device__ __forceinline__ void walk_gradient_row_tiles(const uint16_t* __restrict__ x,
                                                        const uint16_t* __restrict__ w_chunk, int64_t n, int64_t width,
                                                        int dim, int64_t c0, const RowTarget* __restrict__ rows,
                                                        const float* __restrict__ grad_loss,
                                                        const float* __restrict__ logsumexp, float s,
                                                        scalar_t* __restrict__ grad_block, int64_t ld,
                                                        float* __restrict__ chunk_inv_norm,
                                                        uint8_t* __restrict__ chunk_unclamped, int row_tiles_per_block) {
  // (Row tiles fit an int: N < 2^31.)
  const int row_tiles = static_cast<int>((n + kTileRows - 1) / kTileRows);
  const int first = static_cast<int>(blockIdx.x) * row_tiles_per_block;
  const int last = std::min(first + row_tiles_per_block, row_tiles);
  for (int row_tile = first; row_tile < last; ++row_tile) {
    gradient_block_tile<kBFloat16, scalar_t, kStages, false, kWgmmaDepth>(
        x, w_chunk, n, width, dim, c0, rows, grad_loss, logsumexp, s, grad_block, ld, chunk_inv_norm, chunk_unclamped,
        nullptr, row_tile, row_tile == first);
  }
}

template <bool kBFloat16, typename scalar_t, int kStages>
__global__ void __launch_bounds__(kTileThreads, 2)
    fused_backward_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w_chunk, int64_t n,
                          int64_t width, int dim, int64_t c0, const RowTarget* __restrict__ rows,
                          const float* __restrict__ grad_loss, const float* __restrict__ logsumexp, float s,
                          scalar_t* __restrict__ grad_block, int64_t ld, float* __restrict__ chunk_inv_norm,
                          uint8_t* __restrict__ chunk_unclamped, int row_tiles_per_block) {
  walk_gradient_row_tiles<kBFloat16, scalar_t, kStages, 0>(x, w_chunk, n, width, dim, c0, rows, grad_loss,
                                                               logsumexp, s, grad_block, ld, chunk_inv_norm,
                                                               chunk_unclamped, row_tiles_per_block);
}

// The same on the wgmma tile (wgmma_tile.cuh: sm_90a, chosen by wgmma_tile_variant; 64- or 32-deep slices).
template <bool kBFloat16, typename scalar_t, int kDepth>
__global__ void __launch_bounds__(kTileThreads, 2)
    fused_backward_wgmma_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w_chunk, int64_t n,
                                int64_t width, int dim, int64_t c0, const RowTarget* __restrict__ rows,
                                const float* __restrict__ grad_loss, const float* __restrict__ logsumexp, float s,
                                scalar_t* __restrict__ grad_block, int64_t ld, float* __restrict__ chunk_inv_norm,
                                uint8_t* __restrict__ chunk_unclamped, int row_tiles_per_block) {
  walk_gradient_row_tiles<kBFloat16, scalar_t, cuda::kMinTileStages, kDepth>(
      x, w_chunk, n, width, dim, c0, rows, grad_loss, logsumexp, s, grad_block, ld, chunk_inv_norm, chunk_unclamped,
      row_tiles_per_block);
}

// The backward with the x tile resident (ARCFACE_EXT_WGMMA=resident; wgmma_tile.cuh): block (b, g) forms
// row tile b of the chunk's gradient block over segment g's class tiles, as the resident forward
// walks its segment: its 128 x rows loaded once, W's slices streaming through 3 stages across the
// segment's tiles (the next tile's first slices land during this tile's epilogue), the tile staged
// beside the pipeline (kWgmmaStagedBytes) and written out. Every tile sums its class norms. The same
// entries, staging and copy-out as gradient_block_tile; one block an SM (211 KB).
template <bool kBFloat16, typename scalar_t>
__global__ void __launch_bounds__(kTileThreads, 1)
    fused_backward_wgmma_resident_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w_chunk,
                                         int64_t n, int64_t width, int dim, int64_t c0,
                                         const RowTarget* __restrict__ rows, const float* __restrict__ grad_loss,
                                         const float* __restrict__ logsumexp, float s,
                                         scalar_t* __restrict__ grad_block, int64_t ld,
                                         float* __restrict__ chunk_inv_norm, uint8_t* __restrict__ chunk_unclamped,
                                         int64_t tiles_per_segment) {
  extern __shared__ __align__(16) uint16_t tile_smem[];
  __shared__ float row_inv_norm[kTileRows];
  __shared__ float row_lse[kTileRows];
  __shared__ float row_target_q[kTileRows];
  __shared__ int64_t row_target[kTileRows];
  __shared__ bool row_active[kTileRows];
  __shared__ float tile_inv_norm[kTileClasses];
  __shared__ bool tile_unclamped[kTileClasses];
  using Slice = cuda::WgmmaBackwardResidentSlice;
  const cuda::WgmmaSmem smem = cuda::wgmma_smem<Slice>(tile_smem, dim);
  scalar_t* staged = reinterpret_cast<scalar_t*>(smem.stages + Slice::stages * Slice::stage_bytes / 2);

  const int64_t row0 = int64_t{blockIdx.x} * kTileRows;
  load_gradient_rows<false>(rows, n, row0, c0, width, grad_loss, logsumexp, nullptr, row_active, row_inv_norm,
                            row_lse, row_target_q, row_target);
  __syncthreads();
  const int64_t tiles = (width + kTileClasses - 1) / kTileClasses;
  const int64_t first = int64_t{blockIdx.y} * tiles_per_segment;
  const int64_t count = std::min(first + tiles_per_segment, tiles) - first;
  const cuda::TileRun run =
      cuda::make_wgmma_run<Slice>(x, n, row0, w_chunk, width, first * kTileClasses, count, dim, 1);
  for (int64_t t = 0; t < run.tiles; ++t) {
    const int64_t col0 = (first + t) * kTileClasses;
    cuda::WgmmaAcc acc;
    float norm_sq;
    cuda::wgmma_run_gemm<kBFloat16, true, Slice>(run, t, smem.base, smem.stages, acc, norm_sq, smem.x_base);
    // (Its barrier orders the last tile's staging and copy-out reads before these writes.)
    publish_class_norms(norm_sq, tile_inv_norm, tile_unclamped);
    if (blockIdx.x == 0) {
      hand_out_chunk_norms(col0, width, tile_inv_norm, tile_unclamped, chunk_inv_norm, chunk_unclamped);
    }
    stage_wgmma_gradient(acc, staged, col0, std::min<int64_t>(width - col0, kTileClasses), s, row_active,
                         row_inv_norm, row_lse, row_target_q, row_target, tile_inv_norm);
    __syncthreads();
    store_gradient_tile<false>(staged, grad_block, n, ld, row0, col0, row_active);
  }
}

// The backward's class-outer tile (ARCFACE_EXT_WGMMA=resident-weight; bf16, D up to
// kWgmmaResidentMaxDim; wgmma_tile.cuh): block b owns the chunk's classes [64b, +64), their W rows
// resident in shared memory, and walks the 64-row tiles of x, each tile's x loaded while the previous
// one is multiplied. For each it forms
//   S = W_b·x_tileᵀ                     (m64n32k16: warpgroup g the tile's rows 32g .. +31),
//   G_ij from S as gradient_block_tile does, written class-major to grad_block_t (row pitch ldn) for
//        the embeddings' GEMM (not at all when grad_block_t is null: no embedding gradient asked
//        for, 1 GB of writes fewer at C = 1M), and G_ij (g_i / g_max) / ‖x_i‖ staged as the A operand of
//   P += G'·x_tile                      (m64n256k16, x read along its depth: warpgroup g the depth
//                                        columns 256g .. +255),
// so that after the last row tile P_j = Σ_i G_ij (g_i / g_max) x̂_i sits in registers, and
//   d loss / d w_j = g_max (P_j − (P_j·w_j) / ‖w_j‖² w_j)
// (class_gradient_kernel's expression) is written to grad_w. The backward then neither writes nor reads
// P (two C x D passes through memory) and runs no separate weight-gradient GEMM: the tile's second GEMM
// reads the x tile the first one already brought in. The block's class norms are summed once, from the
// resident W rows.
//
// Per row tile r, with x tile r in buffer r % 2: wait for x tile r; issue S; retire the previous tile's
// P group (wgmma_wait<1>: groups complete in order); a block barrier, after which the other buffer and
// the staged operand are free; load x tile r + 1 into the other buffer while S runs; retire S; form G
// and G'; a barrier; issue P += G'·x_tile r, left running while the next tile's x lands and its S is
// issued. Rows past N load as zeros and form no gradient; x's and w's depth columns past D (up to 512)
// load as zeros, so P's columns there are zero and never written.
__global__ void __launch_bounds__(kTileThreads, 1)
    fused_weight_gradient_wgmma_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w_chunk,
                                       int64_t n, int64_t width, int dim, int64_t c0,
                                       const RowTarget* __restrict__ rows, const float* __restrict__ grad_loss,
                                       const float* __restrict__ grad_max, const float* __restrict__ logsumexp,
                                       float s, at::BFloat16* __restrict__ grad_block_t, int64_t ldn,
                                       at::BFloat16* __restrict__ grad_w) {
  extern __shared__ __align__(16) uint16_t tile_smem[];
  __shared__ float row_inv_norm[kTileRows];
  __shared__ float row_lse[kTileRows];
  __shared__ float row_target_q[kTileRows];
  __shared__ int64_t row_target[kTileRows];
  __shared__ bool row_active[kTileRows];
  __shared__ float row_factor[cuda::kOuterRows];
  __shared__ float class_inv_norm[cuda::kOuterClasses];
  __shared__ bool class_unclamped[cuda::kOuterClasses];
  __shared__ float class_dot[2][cuda::kOuterClasses];
  const uint32_t raw = cuda::shared_address(tile_smem);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t w_tile = base;
  const uint32_t staged = base + 3 * cuda::kOuterTileBytes;
  const uint16_t* w_elems = tile_smem + (w_tile - raw) / 2;
  uint16_t* staged_elems = tile_smem + (staged - raw) / 2;
  auto x_tile = [&](int64_t r) { return base + (1 + static_cast<uint32_t>(r % 2)) * cuda::kOuterTileBytes; };

  const int g = threadIdx.x / 128;
  const int quad = threadIdx.x % 4;
  const int class_row = (threadIdx.x / 32 % 4) * 16 + threadIdx.x % 32 / 4;  // + 8h: the accumulators' M
  const int64_t col0 = int64_t{blockIdx.x} * cuda::kOuterClasses;               // chunk-local
  const int slices = (dim + 63) / 64;
  // The tiles hold all 8 slices whatever D, zeros past it: warpgroup g's P (and its correction) reads
  // slices 4g .. 4g+3 of x (and of w). Both warpgroups multiply whatever D (a wgmma behind a branch on
  // the warpgroup is serialised by ptxas, advisory C7520): below D = 257 the second one's P is zeros,
  // work wasted.
  constexpr int tile_slices = cuda::kWgmmaResidentMaxDim / 64;
  const bool has_columns = 256 * g < dim;  // this warpgroup's half of the depth exists
  const float g_max = *grad_max;

  cuda::outer_load_tile(w_tile, w_chunk, col0, width, dim, tile_slices);
  cuda::outer_load_tile(x_tile(0), x, 0, n, dim, tile_slices);
  cuda::cp_async_commit();

  float acc_s[16];
  float acc_p[128];
  const int64_t row_tiles = (n + cuda::kOuterRows - 1) / cuda::kOuterRows;
  for (int64_t r = 0; r < row_tiles; ++r) {
    const int64_t row0 = r * cuda::kOuterRows;
    // x tile r (and at r = 0 the W rows) landed, handed to the async proxy.
    cuda::cp_async_wait<0>();
    cuda::fence_proxy_async();
    __syncthreads();
    cuda::wgmma_pin(acc_s);
    cuda::wgmma_fence();
    cuda::outer_issue_s(acc_s, w_tile, x_tile(r), slices);
    cuda::wgmma_commit();
    // While S runs: this tile's row arrays (the last tile's epilogue read them before its P was issued),
    // and at the first tile the class norms from the W rows, 4 threads a class.
    load_gradient_rows<false>(rows, n, row0, c0, width, grad_loss, logsumexp, nullptr, row_active, row_inv_norm,
                              row_lse, row_target_q, row_target);
    if (threadIdx.x < cuda::kOuterRows)
      row_factor[threadIdx.x] =
          row_active[threadIdx.x] ? grad_loss[row0 + threadIdx.x] / g_max * row_inv_norm[threadIdx.x] : 0.0f;
    if (r == 0) {
      const int m = threadIdx.x / 4;
      float sum = 0.0f;
      for (int slice = 0; slice < slices; ++slice)
#pragma unroll
        for (int v = 0; v < 2; ++v)
          sum = cuda::sum_squares_8<true>(w_elems + cuda::outer_element(m, 64 * slice + 8 * (2 * quad + v)), sum);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (quad == 0) {
        const float norm = sqrtf(sum);
        class_inv_norm[m] = 1.0f / fmaxf(norm, static_cast<float>(kNormEps));
        class_unclamped[m] = norm >= static_cast<float>(kNormEps);
      }
    }
    // The last tile's P group retired (S stays in flight), then every warpgroup's: the other x buffer
    // and the staged operand are free, and this tile's arrays are written.
    cuda::wgmma_wait<1>(acc_s, acc_p);
    __syncthreads();
    if (r + 1 < row_tiles) cuda::outer_load_tile(x_tile(r + 1), x, row0 + cuda::kOuterRows, n, dim, tile_slices);
    cuda::cp_async_commit();
    cuda::wgmma_wait<0>(acc_s, acc_p);
    // G from S: thread holds class class_row + 8h, rows 32g + 8j + 2·quad + e in acc_s[4j + 2h + e].
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = class_row + 8 * h;
      const bool class_ok = col0 + m < width;
      const float inv_w = class_inv_norm[m];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int rl = 32 * g + 8 * j + 2 * quad;  // the pair's first row in the tile
        ValuePair<at::BFloat16> pair, scaled;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int rr = rl + e;
          const float entry = gradient_entry(acc_s[4 * j + 2 * h + e], row_active[rr] && class_ok,
                                             row_target[rr] == col0 + m, row_inv_norm[rr], inv_w, row_lse[rr],
                                             row_target_q[rr], s);
          pair.value[e] = to_gemm_operand<at::BFloat16, float>(entry);
          scaled.value[e] = to_gemm_operand<at::BFloat16, float>(entry * row_factor[rr]);
        }
        // (A second row past N lands in the pitch's padding, as a zero.)
        if (grad_block_t != nullptr && class_ok && row0 + rl < n) {
          *reinterpret_cast<ValuePair<at::BFloat16>*>(grad_block_t + (col0 + m) * ldn + row0 + rl) = pair;
        }
        *reinterpret_cast<ValuePair<at::BFloat16>*>(staged_elems + cuda::outer_element(m, rl)) = scaled;
      }
    }
    cuda::fence_proxy_async();
    __syncthreads();
    cuda::wgmma_pin(acc_p);
    cuda::wgmma_fence();
    cuda::outer_issue_p(acc_p, staged, x_tile(r), r != 0);
    cuda::wgmma_commit();
  }
  cuda::wgmma_wait<0>(acc_s, acc_p);
  cuda::cp_async_wait<0>();

  // d loss / d w_j = g_max (P_j − (P_j·w_j) ‖w_j‖⁻² w_j): thread holds class class_row + 8h, depth columns
  // 256g + 8j + 2·quad + e in acc_p[4j + 2h + e]; w from the resident rows (zeros past D).
  auto w_pair = [&](int m, int d) {
    return cuda::unpack_pair<true>(*reinterpret_cast<const uint32_t*>(w_elems + cuda::outer_element(m, d)));
  };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = class_row + 8 * h;
    float dot = 0.0f;
    if (has_columns) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const float2 wv = w_pair(m, 256 * g + 8 * j + 2 * quad);
        dot = fmaf(acc_p[4 * j + 2 * h], wv.x, fmaf(acc_p[4 * j + 2 * h + 1], wv.y, dot));
      }
    }
    dot += __shfl_xor_sync(0xffffffffu, dot, 1);
    dot += __shfl_xor_sync(0xffffffffu, dot, 2);
    if (quad == 0) class_dot[g][m] = dot;
  }
  __syncthreads();
  if (!has_columns) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = class_row + 8 * h;
    if (col0 + m >= width) continue;
    const float inv_w = class_inv_norm[m];
    const float coef = class_unclamped[m] ? (class_dot[0][m] + class_dot[1][m]) * inv_w * inv_w : 0.0f;
    at::BFloat16* out = grad_w + (col0 + m) * dim;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int d = 256 * g + 8 * j + 2 * quad;
      if (d < dim) {
        const float2 wv = w_pair(m, d);
        ValuePair<at::BFloat16> pair;
        pair.value[0] = static_cast<at::BFloat16>(g_max * (acc_p[4 * j + 2 * h] - coef * wv.x));
        pair.value[1] = static_cast<at::BFloat16>(g_max * (acc_p[4 * j + 2 * h + 1] - coef * wv.y));
        *reinterpret_cast<ValuePair<at::BFloat16>*>(out + d) = pair;
      }
    }
  }
}

// The kept block's forward: G itself at the rows finalize marked for recomputation (kept_block.h),
// over all classes; blocks whose rows have none return at once.
template <int kStages>
__global__ void __launch_bounds__(kTileThreads, 2)
    kept_block_recompute_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w, int64_t n,
                                int64_t c, int dim, const RowTarget* __restrict__ rows,
                                const float* __restrict__ logsumexp, float s, at::BFloat16* __restrict__ block,
                                int64_t ld, const uint8_t* __restrict__ recompute) {
  gradient_block_tile<true, at::BFloat16, kStages, true>(x, w, n, c, dim, 0, rows, nullptr, logsumexp, s, block,
                                                         ld, nullptr, nullptr, recompute, blockIdx.x, true);
}

// One wgmma tile, as the fused kernels compute it, written out register by register: thread t's
// acc[i] at out[65t + i] and its class-norm sum at out[65t + 64] (the op wgmma_tile_probe, a
// diagnostic: benchmarks/wgmma_probe.py decodes what the hardware multiplied from structured inputs).
template <bool kBFloat16, int kVariant>
__global__ void __launch_bounds__(kTileThreads)
    wgmma_tile_probe_kernel(const uint16_t* __restrict__ x, int64_t rows, const uint16_t* __restrict__ w,
                            int64_t classes, int dim, float* __restrict__ out) {
  extern __shared__ __align__(16) uint16_t tile_smem[];
  using Slice = cuda::WgmmaSliceOf<kVariant>;
  const cuda::WgmmaSmem smem = cuda::wgmma_smem<Slice>(tile_smem, dim);
  const cuda::TileRun run = cuda::make_wgmma_run<Slice>(x, rows, 0, w, classes, 0, 1, dim, 1);
  cuda::WgmmaAcc acc;
  float norm_sq;
  cuda::wgmma_run_gemm<kBFloat16, true, Slice>(run, 0, smem.base, smem.stages, acc, norm_sq, smem.x_base);
  float* mine = out + 65 * threadIdx.x;
#pragma unroll
  for (int i = 0; i < 64; ++i) mine[i] = acc[i];
  mine[64] = norm_sq;
}

// The class-outer tile's two GEMMs (fused_weight_gradient_wgmma_kernel) on given operands, written out
// register by register: S = w·xᵀ, thread t's 16 at out[144t + i], and P = g·x with x read along its
// depth, its 128 at out[144t + 16 + i] (zeros past D). x
// (rows, D) and w (classes, D) at most 64 rows each, g (64, 64), bf16; g staged as the kernel stages its
// gradient tile (the op wgmma_weight_tile_probe, a diagnostic: benchmarks/wgmma_probe.py).
__global__ void __launch_bounds__(kTileThreads)
    wgmma_weight_tile_probe_kernel(const uint16_t* __restrict__ x, int64_t rows, const uint16_t* __restrict__ w,
                                   int64_t classes, const uint16_t* __restrict__ g, int dim, float* __restrict__ out) {
  extern __shared__ __align__(16) uint16_t tile_smem[];
  const uint32_t raw = cuda::shared_address(tile_smem);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t w_tile = base, x_tile = base + cuda::kOuterTileBytes, staged = base + 3 * cuda::kOuterTileBytes;
  uint16_t* staged_elems = tile_smem + (staged - raw) / 2;
  const int slices = (dim + 63) / 64;
  cuda::outer_load_tile(w_tile, w, 0, classes, dim, cuda::kWgmmaResidentMaxDim / 64);
  cuda::outer_load_tile(x_tile, x, 0, rows, dim, cuda::kWgmmaResidentMaxDim / 64);
  cuda::cp_async_commit();
  for (int i = threadIdx.x; i < cuda::kOuterClasses * cuda::kOuterRows; i += kTileThreads)
    staged_elems[cuda::outer_element(i / cuda::kOuterRows, i % cuda::kOuterRows)] = g[i];
  cuda::cp_async_wait<0>();
  cuda::fence_proxy_async();
  __syncthreads();
  float acc_s[16];
  float acc_p[128];
  cuda::wgmma_fence();
  cuda::outer_issue_s(acc_s, w_tile, x_tile, slices);
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>(acc_s);
  cuda::wgmma_fence();
  cuda::outer_issue_p(acc_p, staged, x_tile, false);
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>(acc_s, acc_p);
  float* mine = out + 144 * threadIdx.x;
#pragma unroll
  for (int i = 0; i < 16; ++i) mine[i] = acc_s[i];
#pragma unroll
  for (int i = 0; i < 128; ++i) mine[16 + i] = acc_p[i];
}

// ---- host side ----------------------------------------------------------------------------

struct ClassChunks {
  int64_t width;     // classes per chunk; the last chunk may be narrower
  int64_t count;     // number of chunks
  int64_t segments;  // epilogue segments per row, over all chunks

  int64_t begin(int64_t k) const { return k * width; }
  int64_t width_of(int64_t k, int64_t num_classes) const {
    return std::min(width, num_classes - k * width);
  }
};

int64_t segments_in(int64_t width) { return (width + kSegment - 1) / kSegment; }

// Picks the chunk width so that the per-chunk buffers, `per_class` bytes a class, fit the
// workspace limit: a multiple of kChunkAlign (at least that, at most C).
// `max_width` keeps the chunk's grid within CUDA's 65535 blocks in y: 4096-class segments on the
// cuBLAS path, 128-class tiles on the fused one.
ClassChunks plan_class_chunks(int64_t c, int64_t per_class, int64_t workspace_bytes, int64_t max_width) {
  int64_t width = std::max<int64_t>(workspace_bytes, 0) / std::max<int64_t>(per_class, 1);
  width = std::max(kChunkAlign, width / kChunkAlign * kChunkAlign);
  width = std::min(width, max_width / kChunkAlign * kChunkAlign);
  width = std::min(width, c);
  ClassChunks chunks;
  chunks.width = width;
  chunks.count = (c + width - 1) / width;
  chunks.segments = (chunks.count - 1) * segments_in(width) +
                    segments_in(chunks.width_of(chunks.count - 1, c));
  return chunks;
}

// Where the weight-gradient GEMM writes P = Gᵀ·X̃: straight into grad_weight's rows, in the input
// dtype, for every dtype but fp16 (class_gradient_kernel then corrects the rows in place). bf16
// has fp32's range, and rounding P to it costs no more than the rounding of G and X̃ that the GEMM
// multiplies already (each P_j carries an error of ~2^-9 Σ_i |G_ij| |X̃_i| from them), while it
// halves the memory the GEMM writes and the kernel reads (at C = 1M, 2 GB of fp32 each way). fp16
// keeps P in fp32: a sum over the rows may pass fp16's 65504 where no single G_ij did.
template <typename scalar_t>
constexpr bool kPInGradWeight = !std::is_same<scalar_t, at::Half>::value;

// The cuBLAS path's bytes a class. The backward's needs set them (forward and backward then walk
// the same chunks, so the recomputed dot products are bit-identical to the forward's):
//   fp32/fp64:   N acc_t (the dot products, overwritten by the gradient block)
//   bf16:        N floats (the dot products) + N 16-bit values (the gradient block)
//   fp16:        max(N, D) floats (the dot products, later the fp32 weight-gradient block)
//                + N 16-bit values (the gradient block)
//   every dtype: the inverse norm and the clamp flag.
// Outside the workspace, O(N·D + N·C/4096): the per-row targets, the fp32 d loss / d x̂ and the
// scaled x̂ operand, and the per-segment softmax statistics.
template <typename scalar_t, typename acc_t>
int64_t cublas_bytes_per_class(int64_t n, int64_t dim) {
  constexpr int64_t scalar_size = sizeof(scalar_t), acc_size = sizeof(acc_t);
  const int64_t dots = kPInGradWeight<scalar_t> ? n : std::max(n, dim);
  return dots * acc_size + (scalar_size != acc_size ? n * scalar_size : 0) + acc_size + 1;
}

// The fused backward's bytes a class: the 16-bit gradient block (N values) and, when d loss / d W
// is needed in fp16, its fp32 GEMM output (D floats; bf16's goes to grad_weight). The dot products
// are never stored. Outside the workspace, as on the cuBLAS path: the chunk's inverse norms and
// clamp flags (5 bytes a class) and the O(N·D) buffers.
template <typename scalar_t>
int64_t fused_backward_bytes_per_class(int64_t n, int64_t dim, bool needs_weight_grad) {
  return n * 2 + (needs_weight_grad && !kPInGradWeight<scalar_t> ? dim * 4 : 0);
}

// Whether a grid of `blocks` equal blocks keeps the GPU busy: two blocks an SM (the fused kernels'
// occupancy) in every round but the last, which is at least 80% full, or at least four rounds.
bool fills_waves(int64_t blocks, int sm_count) {
  const int64_t slots = 2 * int64_t{std::max(sm_count, 1)};
  const int64_t rounds = (blocks + slots - 1) / slots;
  return blocks >= 4 * slots || (blocks >= slots && 5 * blocks >= 4 * rounds * slots);
}

// ARCFACE_EXT_ROW_TILES (read at every call, for measuring and for the sanitizers): how many row
// tiles a fused block walks, forward and backward, instead of the host's choice; 1 is one row tile a
// block, the layout before session 13. 0 when unset.
int64_t row_tiles_setting() {
  const char* setting = std::getenv("ARCFACE_EXT_ROW_TILES");
  if (setting == nullptr) return 0;
  const int64_t value = std::atoll(setting);
  TORCH_CHECK_VALUE(value >= 1, "arcface_ext: ARCFACE_EXT_ROW_TILES must be a positive count, got '", setting, "'");
  return value;
}

// How many row tiles a fused block walks over one class tile, whose norms it then sums once: the
// ARCFACE_EXT_ROW_TILES setting, else the most whose grid (`class_tiles` blocks for each group of
// row tiles) still fills the waves (fewer, longer blocks leave a longer idle tail); evened out over
// the row tiles (5 row tiles go 3 + 2, not 4 + 1).
int row_tiles_a_block(int64_t row_tiles, int64_t class_tiles, int sm_count) {
  int64_t k = std::min(row_tiles, row_tiles_setting());
  if (k == 0) {
    k = row_tiles;
    while (k > 1 && !fills_waves((row_tiles + k - 1) / k * class_tiles, sm_count)) --k;
  }
  const int64_t groups = (row_tiles + k - 1) / k;
  return static_cast<int>((row_tiles + groups - 1) / groups);
}

// How the fused forward splits the work among blocks: `row_tiles_per_block` row tiles (passes) and
// `tiles_per_segment` class tiles a block (its statistics merged in registers), `count` segments.
// With one row tile a block it aims at ~16 blocks per SM (several waves of two resident blocks, so
// the last wave's idle tail stays small), with at least one tile a block and the 2·N·count floats of
// statistics within the workspace; the blocks of a segment's row tiles run side by side and read
// its class tiles from L2 nearly together.
// Several passes take their class norms from the first (about 35 of a depth slice's ~150
// instructions less), over a segment of one class tile: a longer segment would be read again a pass
// later, after every other block had streamed as much of W through L2 (at C = 1M with segments of
// 3 tiles, ~100 MB against the H200's 50 MB of L2: W read from DRAM once a pass instead of once).
// The host takes the most passes (up to all the row tiles) whose grid still fills the waves, when
// the statistics of a segment a class tile fit the workspace: at N = 512, 4 at C = 100k and 1M
// (7,813 blocks of 4 tiles at 1M). ARCFACE_EXT_ROW_TILES sets the passes instead (one pass when
// those statistics do not fit).
// one_row_tile (the wgmma tile with its x tile resident: one block an SM, which loads its row tile once
// for the whole segment) takes one pass a block whatever the setting, and aims at ~4 blocks an SM:
// four waves, with segments long enough that the x tile's load is a small share of a block's reads
// (1/7 at N = 512 and C = 100k, 1/60 at 1M).
struct FusedSegments {
  int64_t tiles_per_segment;
  int64_t count;
  int row_tiles_per_block;
};

// Class tiles a segment for a resident x tile's blocks (one row tile each, one block an SM): about 4
// blocks an SM, at least one tile a segment, at most kMaxGridY segments.
int64_t resident_tiles_per_segment(int64_t row_tiles, int64_t tiles, int sm_count) {
  int64_t per = std::max<int64_t>(1, row_tiles * tiles / (4 * int64_t{std::max(sm_count, 1)}));
  while ((tiles + per - 1) / per > kMaxGridY) per *= 2;
  return per;
}

FusedSegments plan_fused_segments(int64_t n, int64_t c, int64_t workspace_bytes, int sm_count,
                                  bool one_row_tile = false) {
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t tiles = (c + kTileClasses - 1) / kTileClasses;
  if (!one_row_tile && n * tiles * 2 * int64_t{sizeof(float)} <= workspace_bytes && tiles <= kMaxGridY) {
    const int per_block = row_tiles_a_block(row_tiles, tiles, sm_count);
    if (per_block > 1) return {1, tiles, per_block};
  }
  auto segments = [&](int64_t p) { return (tiles + p - 1) / p; };
  int64_t per = one_row_tile ? resident_tiles_per_segment(row_tiles, tiles, sm_count)
                             : std::max<int64_t>(1, row_tiles * tiles / (16 * int64_t{std::max(sm_count, 1)}));
  while (per < tiles &&
         (n * segments(per) * 2 * int64_t{sizeof(float)} > workspace_bytes || segments(per) > kMaxGridY))
    per = std::min(per * 2, tiles);
  return {per, segments(per), 1};
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// How many of a class tile's row tiles one block of fused_backward_kernel walks (row_tiles_a_block).
// Every row tile's block used to sum the class tile's norms again (about 35 of the ~150
// instructions of a depth slice in the H200 SASS, session 13): 4 at N = 512 with the 128 MiB
// default at C = 1M.
int plan_backward_row_tiles(int64_t n, int64_t width, int sm_count) {
  return row_tiles_a_block((n + kTileRows - 1) / kTileRows, (width + kTileClasses - 1) / kTileClasses, sm_count);
}

// Whether the device runs the fused kernels' tensor-core tile: sm_80+, with code built for it (a
// build whose code for this GPU comes from pre-sm_80 PTX has no tile; its kernels would trap).
// Asked once per device (the host time of a step counts at C ~ 100k).
bool device_runs_tile_kernels(int device) {
  static std::mutex mutex;
  static std::map<int, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  bool runs = device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 8;
  if (runs) {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fused_forward_kernel<true, cuda::kMinTileStages>));
    runs = attributes.ptxVersion >= 80;
  }
  known.emplace(device, runs);
  return runs;
}

// Whether the fused tensor-core kernels take a call: 16-bit inputs whose rows are whole 16-byte
// vectors (D a multiple of 8, both bases 16-byte aligned) on an sm_80+ GPU, unless the
// environment says ARCFACE_EXT_CUDA_FUSED=0 (read at every call; the cuBLAS path then runs, for
// comparison). Everything else takes the cuBLAS path.
bool use_fused_kernels(const at::Tensor& x, const at::Tensor& w) {
  const auto type = x.scalar_type();
  if (type != at::kHalf && type != at::kBFloat16) return false;
  const int64_t dim = x.size(1);
  if (dim == 0 || dim % 8 != 0 || dim > std::numeric_limits<int>::max()) return false;
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0)
    return false;
  if (!device_runs_tile_kernels(x.get_device())) return false;
  const char* setting = std::getenv("ARCFACE_EXT_CUDA_FUSED");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// The dynamic shared memory a kernel's pipeline needs beyond the default 48 KB, opted into once per
// kernel, depth and device (the attribute persists): later calls, a CUDA graph capture's among
// them, make no runtime call.
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, int device) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> done;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), bytes, device);
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

template <typename Kernel>
void allow_tile_smem(Kernel kernel, int stages, int device) {
  allow_smem(kernel, cuda::tile_smem_bytes(stages), device);
}

// Raises unless the wgmma tile can run here: a build with sm_90a code (TORCH_CUDA_ARCH_LIST with 9.0a,
// setup.py's default; it defines ARCFACE_EXT_SM90A) and a GPU of compute capability 9.0. `asker`
// names what asked for the tile.
void check_wgmma_runs(int device, const std::string& asker) {
#if defined(ARCFACE_EXT_SM90A)
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major == 9 && minor == 0, "arcface_ext: ", asker, " needs a GPU of compute capability 9.0 (its "
              "sm_90a code runs nowhere else); this one is ", major, ".", minor);
#else
  (void)device;
  TORCH_CHECK(false, "arcface_ext: ", asker, " asks for the wgmma tile, but this build has no sm_90a code (build "
              "it with 9.0a in TORCH_CUDA_ARCH_LIST)");
#endif
}

// The wgmma tile variant a name stands for: "64", "32" (streaming slices of that depth) or "resident"
// (cuda::kWgmmaResidentX); 0 for any other name.
int wgmma_variant_named(c10::string_view name) {
  return name == "64" ? 64 : name == "32" ? 32 : name == "resident" ? cuda::kWgmmaResidentX : 0;
}

// ARCFACE_EXT_WGMMA (read at every call): 1 or 64 runs the fused forward's and backward's tiles on
// wgmma (fused_forward_wgmma_kernel, fused_backward_wgmma_kernel) in 64-deep slices; 32 in 32-deep
// slices with a wgmma group kept in flight across the barrier; `resident` with the x tile resident in
// shared memory (fused_forward_wgmma_kernel<..., kWgmmaResidentX>, fused_backward_wgmma_resident_kernel:
// one row tile a block; D up to cuda::kWgmmaResidentMaxDim, else 64-deep slices); `resident-weight` the
// same tiles, and d loss / d W formed in the backward's own tile (wgmma_weight_gradient_tile); 0 or
// unset, the mma.sync tile (wgmma_tile.cuh; 32 and the resident ones for measuring). Off by default until a GPU has
// measured it (NOTES.md, sessions 14-15); asked for where it cannot run (check_wgmma_runs), it raises
// rather than quietly measuring the other kernel. Returns the variant for depth `dim`: 64, 32,
// cuda::kWgmmaResidentX, or 0 for mma.sync.
int wgmma_tile_variant(int device, int64_t dim) {
  const char* setting = std::getenv("ARCFACE_EXT_WGMMA");
  if (setting == nullptr || std::strcmp(setting, "0") == 0) return 0;
  const int variant = std::strcmp(setting, "1") == 0                 ? 64
                      : std::strcmp(setting, "resident-weight") == 0 ? cuda::kWgmmaResidentX
                                                                       : wgmma_variant_named(setting);
  TORCH_CHECK_VALUE(variant != 0, "arcface_ext: ARCFACE_EXT_WGMMA must be 0, 1, 64, 32, resident or resident-weight, "
                    "got '", setting, "'");
  check_wgmma_runs(device, std::string("ARCFACE_EXT_WGMMA=") + setting);
  // The resident x tile holds D up to kWgmmaResidentMaxDim; past it the kernels take 64-deep slices.
  return variant == cuda::kWgmmaResidentX && dim > cuda::kWgmmaResidentMaxDim ? 64 : variant;
}

// ARCFACE_EXT_WGMMA=resident-weight (for measuring): the resident tiles, and a bf16 backward that needs
// d loss / d W forms it in its own tile (fused_weight_gradient_wgmma_kernel) instead of the cuBLAS GEMM
// and class_gradient_kernel; D up to cuda::kWgmmaResidentMaxDim. Call after wgmma_tile_variant, which
// checks that the setting can run.
bool wgmma_weight_gradient_tile(int64_t dim) {
  const char* setting = std::getenv("ARCFACE_EXT_WGMMA");
  return setting != nullptr && std::strcmp(setting, "resident-weight") == 0 && dim <= cuda::kWgmmaResidentMaxDim;
}

// Calls f(std::integral_constant<int, depth>{}) for a wgmma slice depth of 64 or 32.
template <typename F>
void with_wgmma_depth(int depth, F&& f) {
  if (depth == 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    TORCH_INTERNAL_ASSERT(depth == 64);
    f(std::integral_constant<int, 64>{});
  }
}

// The same for a wgmma tile variant: 64, 32 or cuda::kWgmmaResidentX.
template <typename F>
void with_wgmma_variant(int variant, F&& f) {
  if (variant == cuda::kWgmmaResidentX) {
    f(std::integral_constant<int, cuda::kWgmmaResidentX>{});
  } else {
    with_wgmma_depth(variant, f);
  }
}

// A bound on the static shared memory of the fused tile kernels, beside their pipeline's dynamic
// stages (6,784 bytes by ptxas for sm_90a, session 22), and the runtime's reserve.
constexpr int kTileStaticSmemBound = 8192;

// The fused kernels' pipeline depth: ARCFACE_EXT_TILE_STAGES (3, 4 or 5; read at every call, for
// measuring; one that does not fit a block of this GPU is an error), else the deepest of 3 and 4
// that keeps two blocks an SM (4 on sm_90's 228 KB, 3 on sm_80's 164 KB and on the 100 KB of
// sm_86, sm_89 and sm_120).
int fused_tile_stages(int device) {
  if (const char* setting = std::getenv("ARCFACE_EXT_TILE_STAGES")) {
    const int stages = std::atoi(setting);
    TORCH_CHECK_VALUE(stages >= cuda::kMinTileStages && stages <= cuda::kMaxTileStages,
                      "arcface_ext: ARCFACE_EXT_TILE_STAGES must be ", cuda::kMinTileStages, " to ",
                      cuda::kMaxTileStages, ", got '", setting, "'");
    // (5 stages do not fit the 99 KB a block of an sm_86, sm_89 or sm_120 GPU may have: a clear
    // error here rather than cudaFuncSetAttribute's "invalid argument".)
    const int per_block = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    TORCH_CHECK_VALUE(cuda::tile_smem_bytes(stages) + kTileStaticSmemBound <= per_block,
                      "arcface_ext: ARCFACE_EXT_TILE_STAGES=", stages, " needs ",
                      cuda::tile_smem_bytes(stages) + kTileStaticSmemBound,
                      " bytes of shared memory a block; this GPU allows ", per_block);
    return stages;
  }
  const int per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  return 2 * (cuda::tile_smem_bytes(4) + kTileStaticSmemBound) <= per_sm ? 4 : cuda::kMinTileStages;
}

// Calls f(std::integral_constant<int, stages>{}): the kernels are instantiated for each depth.
template <typename F>
void with_tile_stages(int stages, F&& f) {
  switch (stages) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: TORCH_CHECK(false, "arcface_ext: no fused kernels for a ", stages, "-stage pipeline");
  }
}

template <typename scalar_t>
const uint16_t* raw_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<scalar_t>());
}

// Kernels called from here re-enter the dispatcher (at::mm_out and friends): they must neither
// record autograd history nor be recast by autocast.
struct BelowAutogradAndAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autograd_dispatch_keyset |
                                           c10::autocast_dispatch_keyset};
};

// at::mm_out with an fp32 out for 16-bit operands (cuBLAS with fp32 output) arrived in torch 2.8.
#define ARCFACE_EXT_MIXED_GEMM (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))

// The most scratch an upcast GEMM takes beyond its output: its operands' fp32 copies, a slice of the
// inner dimension at a time (ARCFACE_EXT_GEMM_UPCAST_SCRATCH=<bytes> sets it, for the tests).
int64_t upcast_scratch_bytes() {
  const char* setting = std::getenv("ARCFACE_EXT_GEMM_UPCAST_SCRATCH");
  if (setting == nullptr) return int64_t{32} << 20;
  const int64_t bytes = std::atoll(setting);
  TORCH_CHECK_VALUE(bytes >= 1, "arcface_ext: ARCFACE_EXT_GEMM_UPCAST_SCRATCH must be a positive number of bytes, "
                    "got '", setting, "'");
  return bytes;
}

// out = a·b in fp32 for 16-bit a and b where torch has no mixed-dtype GEMM (or
// ARCFACE_EXT_GEMM_UPCAST=1 asks for it): fp32 GEMMs over slices of the inner dimension, whose fp32
// copies of the operands are exact (a product of two 16-bit values is exact in fp32, and TF32, if
// the user allows it, holds fp16 and bf16 values exactly too). Correct, and slower than cuBLAS's
// mixed-dtype GEMM on tensor cores.
void gemm_upcast_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0), inner = a.size(1), n = b.size(1);
  if (inner == 0) {
    out.zero_();
    return;
  }
  const int64_t per_slice = std::max<int64_t>(1, (m + n) * int64_t{sizeof(float)});
  const int64_t step = std::clamp<int64_t>(upcast_scratch_bytes() / per_slice, 1, inner);
  for (int64_t k0 = 0; k0 < inner; k0 += step) {
    const int64_t len = std::min(step, inner - k0);
    const at::Tensor a32 = a.narrow(1, k0, len).to(out.scalar_type());
    const at::Tensor b32 = b.narrow(0, k0, len).to(out.scalar_type());
    if (k0 == 0) {
      at::mm_out(out, a32, b32);
    } else {
      out.addmm_(a32, b32);
    }
  }
}

bool upcast_gemms() {
  if (!ARCFACE_EXT_MIXED_GEMM) {
    TORCH_WARN_ONCE("arcface_ext was built against torch ", TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR,
                    ", which has no GEMM with fp32 output for 16-bit inputs (torch 2.8 has): the loss's "
                    "cuBLAS GEMMs upcast their 16-bit operands to fp32 instead: as accurate, and slower. "
                    "Build it against torch >= 2.8 for full speed.");
    return true;
  }
  const char* setting = std::getenv("ARCFACE_EXT_GEMM_UPCAST");
  return setting != nullptr && std::strcmp(setting, "0") != 0;
}

// out = a·b with out in the accumulation dtype: for 16-bit a and b, cuBLAS with fp32 output (the
// cosine is never rounded to 16 bits), otherwise the plain GEMM.
void gemm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else if (upcast_gemms()) {
    gemm_upcast_out(out, a, b);
  } else {
#if ARCFACE_EXT_MIXED_GEMM
    at::mm_out(out, a, b, out.scalar_type());
#endif
  }
}

int64_t blocks_for_warps(int64_t warps) { return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock; }

// check_margin_softmax_inputs' label check on the GPU (contiguous int64 labels, on the current
// device): one launch and one 8-byte read-back instead of six launches and one.
// Inside a CUDA graph capture nothing can be read back (the kernels have not run, and a sync is not
// allowed): the check is skipped there, and a bad row gets a NaN loss and no gradient instead
// (kBadLabel), so that the replayed step shows it without corrupting the model.
bool current_stream_is_capturing() {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
  return capture != cudaStreamCaptureStatusNone;
}

void check_labels_cuda(const at::Tensor& labels, const at::Tensor& weight, int64_t ignore_index,
                       int64_t class_offset, int64_t num_classes, bool capturing) {
  const int64_t n = labels.numel();
  if (n == 0 || capturing) return;
  num_classes = resolved_num_classes(class_offset, num_classes, weight);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor first_bad = at::empty({1}, labels.options());
  first_bad_label_kernel<<<1, kLabelCheckThreads, 0, stream>>>(labels.data_ptr<int64_t>(), n, ignore_index,
                                                               num_classes, first_bad.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t row = first_bad.item<int64_t>();
  if (row < n) raise_bad_label(labels, row, ignore_index, num_classes, weight.size(0));
}

MarginParams make_params(double s, double m1, double m2, double m3, double lambda, bool straight,
                         const double* row_margins) {
  return MarginParams{s, m1, m2, m3, lambda, straight, row_margins};
}

RowTarget* row_targets_ptr(const at::Tensor& storage) {
  return reinterpret_cast<RowTarget*>(storage.data_ptr<uint8_t>());
}

template <typename scalar_t, typename acc_t>
void launch_row_targets(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                        int64_t class_offset, int64_t num_classes, int64_t ignore_index, const MarginParams& params,
                        RowTarget* rows,
                        const acc_t* grad_loss, const acc_t* grad_max, scalar_t* scaled_xhat,
                        cudaStream_t stream, const acc_t* row_factor = nullptr) {
  const int64_t n = x.size(0), dim = x.size(1);
  row_targets_kernel<scalar_t, acc_t><<<blocks_for_warps(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), n, dim, w.size(0),
      class_offset, num_classes, ignore_index, params, rows, grad_loss, grad_max, scaled_xhat, row_factor);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_class_inverse_norms(const at::Tensor& w_chunk, acc_t* inv_norm, uint8_t* unclamped,
                                cudaStream_t stream) {
  const int64_t width = w_chunk.size(0), dim = w_chunk.size(1);
  class_inverse_norms_kernel<scalar_t, acc_t>
      <<<blocks_for_warps(width), kWarpsPerBlock * kWarpSize, 0, stream>>>(
          w_chunk.data_ptr<scalar_t>(), width, dim, inv_norm, unclamped);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One chunk's class norms and raw dot products x·w_jᵀ (fp32 for 16-bit inputs), shared by the
// forward and the backward so that the backward recomputes exactly the forward's values.
template <typename scalar_t, typename acc_t>
at::Tensor chunk_dot_products(const at::Tensor& x, const at::Tensor& w_chunk, at::Tensor& dots_buffer,
                              acc_t* inv_norm, uint8_t* unclamped, cudaStream_t stream) {
  launch_class_inverse_norms<scalar_t, acc_t>(w_chunk, inv_norm, unclamped, stream);
  const int64_t n = x.size(0), width = w_chunk.size(0);
  at::Tensor dots = dots_buffer.narrow(0, 0, n * width).view({n, width});
  gemm_acc_out(dots, x, w_chunk.t());
  return dots;
}

// ---- forward ------------------------------------------------------------------------------

// The kept block's parts (kept_block.h) as typed views of its uint8 tensor.
struct KeptViews {
  KeptLayout layout;
  at::Tensor block;      // (N, C) bf16, rows `layout.pitch` apart
  at::Tensor factor;     // (N,) float
  at::Tensor inv_norm;   // (C,) float
  at::Tensor recompute;  // (N,) uint8
  at::Tensor unclamped;  // (C,) uint8
};

KeptViews kept_views(const at::Tensor& kept, int64_t n, int64_t c) {
  KeptViews v;
  v.layout = kept_layout(n, c);
  const KeptLayout& l = v.layout;
  v.block = kept.narrow(0, 0, l.factor_offset).view(at::kBFloat16).view({n, l.pitch}).narrow(1, 0, c);
  v.factor = kept.narrow(0, l.factor_offset, n * 4).view(at::kFloat);
  v.inv_norm = kept.narrow(0, l.inv_norm_offset, c * 4).view(at::kFloat);
  v.recompute = kept.narrow(0, l.recompute_offset, n);
  v.unclamped = kept.narrow(0, l.unclamped_offset, c);
  return v;
}

// With `kept` (bf16 only), also writes the kept block (kept_block.h): on the fused path the
// forward's tiles write H, finalize the row factors and target columns, and the fused backward
// kernel recomputes the rows that did not fit their shift (its blocks return at once when none
// did); on the cuBLAS path a second pass over the chunks writes G itself (every factor 1).
template <typename scalar_t>
void margin_softmax_forward_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                                 const MarginParams& params, int64_t ignore_index, int64_t class_offset,
                                 int64_t num_classes, int64_t workspace_bytes, bool fused, at::Tensor& loss,
                                 at::Tensor& logsumexp, at::Tensor& target_cosine,
                                 const KeptViews* kept = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kBFloat16 = std::is_same<scalar_t, at::BFloat16>::value;
  const int64_t n = x.size(0), dim = x.size(1), c = w.size(0);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(kept == nullptr || kBFloat16, "arcface_ext: the kept gradient block needs bf16 inputs");
  at::BFloat16* kept_block = nullptr;
  KeptRows kept_rows{nullptr, 0, nullptr, nullptr, nullptr, static_cast<float>(params.s)};
  if (kept != nullptr) {
    kept_block = kept->block.data_ptr<at::BFloat16>();
    kept_rows = KeptRows{kept_block, kept->layout.pitch, kept->inv_norm.data_ptr<float>(),
                         kept->factor.data_ptr<float>(), kept->recompute.data_ptr<uint8_t>(),
                         static_cast<float>(params.s)};
  }

  const at::Tensor rows = at::empty({n * int64_t{sizeof(RowTarget)}}, x.options().dtype(at::kByte));
  RowTarget* rows_ptr = row_targets_ptr(rows);
  launch_row_targets<scalar_t, acc_t>(x, w, labels, class_offset, num_classes, ignore_index, params, rows_ptr, nullptr,
                                      nullptr, nullptr, stream);

  if constexpr (!std::is_same<scalar_t, acc_t>::value) {
    if (fused) {
      // One launch over all classes (the class norms come out of the tiles themselves).
      const int wgmma = wgmma_tile_variant(x.get_device(), dim);
      const FusedSegments segments =
          plan_fused_segments(n, c, workspace_bytes, device_attribute(cudaDevAttrMultiProcessorCount, x.get_device()),
                              /*one_row_tile=*/wgmma == cuda::kWgmmaResidentX);
      const at::Tensor segment_max = at::empty({n, segments.count}, acc_options);
      const at::Tensor segment_sum = at::empty({n, segments.count}, acc_options);
      // Passes share one class tile's norms (fused_forward_kernel).
      TORCH_INTERNAL_ASSERT(segments.row_tiles_per_block == 1 || segments.tiles_per_segment == 1);
      const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
      const dim3 grid(static_cast<unsigned>((row_tiles + segments.row_tiles_per_block - 1) / segments.row_tiles_per_block),
                      static_cast<unsigned>(segments.count));
      const int stages = fused_tile_stages(x.get_device());
      // (Both kernels take the same arguments.)
      with_tile_stages(stages, [&](auto depth) {
        constexpr int kStages = decltype(depth)::value;
        auto launch = [&](auto keep) {
          constexpr bool kKeep = decltype(keep)::value;
          float* inv_norm_out = kept != nullptr ? kept->inv_norm.data_ptr<float>() : nullptr;
          uint8_t* unclamped_out = kept != nullptr ? kept->unclamped.data_ptr<uint8_t>() : nullptr;
          const int64_t kept_ld = kept != nullptr ? kept->layout.pitch : 0;
          if (wgmma != 0) {
            with_wgmma_variant(wgmma, [&](auto variant) {
              constexpr int kVariant = decltype(variant)::value;
              constexpr int kSmem = cuda::wgmma_variant_smem_bytes<kVariant>();
              allow_smem(fused_forward_wgmma_kernel<kBFloat16, kKeep, kVariant>, kSmem, x.get_device());
              fused_forward_wgmma_kernel<kBFloat16, kKeep, kVariant><<<grid, kTileThreads, kSmem, stream>>>(
                      raw_bits<scalar_t>(x), raw_bits<scalar_t>(w), n, c, static_cast<int>(dim), rows_ptr,
                      static_cast<acc_t>(params.s), segments.tiles_per_segment, segment_max.data_ptr<acc_t>(),
                      segment_sum.data_ptr<acc_t>(), segments.count, kept_block, kept_ld, inv_norm_out,
                      unclamped_out, segments.row_tiles_per_block);
            });
          } else {
            allow_tile_smem(fused_forward_kernel<kBFloat16, kStages, kKeep>, kStages, x.get_device());
            fused_forward_kernel<kBFloat16, kStages, kKeep><<<grid, kTileThreads, cuda::tile_smem_bytes(kStages), stream>>>(
                raw_bits<scalar_t>(x), raw_bits<scalar_t>(w), n, c, static_cast<int>(dim), rows_ptr,
                static_cast<acc_t>(params.s), segments.tiles_per_segment, segment_max.data_ptr<acc_t>(),
                segment_sum.data_ptr<acc_t>(), segments.count, kept_block, kept_ld, inv_norm_out, unclamped_out,
                segments.row_tiles_per_block);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if constexpr (kBFloat16) {
          if (kept != nullptr) {
            launch(std::true_type{});
            return;
          }
        }
        launch(std::false_type{});
      });
      margin_softmax_finalize_kernel<acc_t><<<static_cast<unsigned>(n), kEpilogueThreads, 0, stream>>>(
          segment_max.data_ptr<acc_t>(), segment_sum.data_ptr<acc_t>(), segments.count, rows_ptr, n,
          loss.data_ptr<acc_t>(), logsumexp.data_ptr<acc_t>(), target_cosine.data_ptr<acc_t>(), kept_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if constexpr (kBFloat16) {
        if (kept != nullptr) {
          // The rows finalize marked: G itself, from recomputed tiles (a block with none of them
          // returns at once).
          const dim3 recompute_grid(static_cast<unsigned>((n + kTileRows - 1) / kTileRows),
                                    static_cast<unsigned>((c + kTileClasses - 1) / kTileClasses));
          with_tile_stages(stages, [&](auto depth) {
            constexpr int kStages = decltype(depth)::value;
            allow_tile_smem(kept_block_recompute_kernel<kStages>, kStages, x.get_device());
            kept_block_recompute_kernel<kStages><<<recompute_grid, kTileThreads, cuda::tile_smem_bytes(kStages), stream>>>(
                raw_bits<scalar_t>(x), raw_bits<scalar_t>(w), n, c, static_cast<int>(dim), rows_ptr,
                logsumexp.data_ptr<acc_t>(), static_cast<acc_t>(params.s), kept->block.data_ptr<at::BFloat16>(),
                kept->layout.pitch, kept->recompute.data_ptr<uint8_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      }
      return;
    }
  }

  const ClassChunks chunks = plan_class_chunks(
      c, cublas_bytes_per_class<scalar_t, acc_t>(n, dim), workspace_bytes,
      kSegment * kMaxGridY);
  at::Tensor dots_buffer = at::empty({n * chunks.width}, acc_options);
  const at::Tensor inv_norm_w = at::empty({chunks.width}, acc_options);
  const at::Tensor unclamped_w = at::empty({chunks.width}, x.options().dtype(at::kByte));
  const at::Tensor segment_max = at::empty({n, chunks.segments}, acc_options);
  const at::Tensor segment_sum = at::empty({n, chunks.segments}, acc_options);

  int64_t segment_offset = 0;
  for (int64_t k = 0; k < chunks.count; ++k) {
    const int64_t c0 = chunks.begin(k), width = chunks.width_of(k, c);
    const at::Tensor w_chunk = w.narrow(0, c0, width);
    at::Tensor dots = chunk_dot_products<scalar_t, acc_t>(
        x, w_chunk, dots_buffer, inv_norm_w.data_ptr<acc_t>(), unclamped_w.data_ptr<uint8_t>(), stream);
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(segments_in(width)));
    margin_softmax_forward_kernel<acc_t><<<grid, kEpilogueThreads, 0, stream>>>(
        dots.data_ptr<acc_t>(), width, c0, inv_norm_w.data_ptr<acc_t>(), rows_ptr,
        static_cast<acc_t>(params.s), segment_max.data_ptr<acc_t>(),
        segment_sum.data_ptr<acc_t>(), chunks.segments, segment_offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    segment_offset += segments_in(width);
  }

  margin_softmax_finalize_kernel<acc_t><<<static_cast<unsigned>(n), kEpilogueThreads, 0, stream>>>(
      segment_max.data_ptr<acc_t>(), segment_sum.data_ptr<acc_t>(), chunks.segments, rows_ptr, n,
      loss.data_ptr<acc_t>(), logsumexp.data_ptr<acc_t>(), target_cosine.data_ptr<acc_t>(),
      KeptRows{nullptr, 0, nullptr, nullptr, nullptr, 0.0f});
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (kBFloat16 && kept != nullptr) {
    // G itself for every row, as the cuBLAS backward forms it (the same chunks, so the same dot
    // products), written into the kept block's columns; every factor 1.
    for (int64_t k = 0; k < chunks.count; ++k) {
      const int64_t c0 = chunks.begin(k), width = chunks.width_of(k, c);
      acc_t* chunk_inv_norm = kept->inv_norm.data_ptr<acc_t>() + c0;
      at::Tensor dots = chunk_dot_products<scalar_t, acc_t>(x, w.narrow(0, c0, width), dots_buffer, chunk_inv_norm,
                                                            kept->unclamped.data_ptr<uint8_t>() + c0, stream);
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(segments_in(width)));
      margin_softmax_backward_kernel<scalar_t, acc_t><<<grid, kEpilogueThreads, 0, stream>>>(
          dots.data_ptr<acc_t>(), kept->block.data_ptr<scalar_t>() + c0, width, kept->layout.pitch, c0,
          chunk_inv_norm, rows_ptr, nullptr, logsumexp.data_ptr<acc_t>(), static_cast<acc_t>(params.s));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    kept->factor.fill_(1.0f);
    kept->recompute.fill_(1);
  }
}

// Both forward ops: with `keep` (bf16, the whole softmax) the kept gradient block (kept_block.h) is
// the fourth output, counted against the workspace; otherwise that output is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& embeddings_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
    double s, double m1, double m2, double m3, double lambda, int64_t ignore_index,
    bool straight_through, int64_t workspace_bytes, int64_t class_offset, int64_t num_classes,
    const c10::optional<at::Tensor>& row_margins_in, bool check_labels, bool keep) {
  check_margin_softmax_inputs(embeddings_in, weight_in, labels_in, ignore_index, class_offset, num_classes,
                              /*check_labels=*/false);
  const c10::cuda::CUDAGuard device_guard(embeddings_in.device());
  const at::Tensor labels = labels_in.contiguous();
  // check_labels=False (the caller's choice) and a capture both skip the values' checks, each a sync.
  const bool check = check_labels && !current_stream_is_capturing();
  check_labels_cuda(labels, weight_in, ignore_index, class_offset, num_classes, /*capturing=*/!check);
  at::Tensor row_margins_storage;
  const double* row_margins = row_margins_data(row_margins_in, embeddings_in, row_margins_storage, check);
  const BelowAutogradAndAutocast below;
  const at::Tensor embeddings = embeddings_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const int64_t n = embeddings.size(0), c = weight.size(0);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "arcface_ext: too many rows (", n, ")");
  const MarginParams params = make_params(s, m1, m2, m3, lambda, straight_through, row_margins);

  const auto out_type = embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // margin_softmax_finalize_kernel writes every row (zeros at ignored ones): no fill launches.
  at::Tensor loss = at::empty({n}, embeddings.options().dtype(out_type));
  at::Tensor logsumexp = at::empty({n}, embeddings.options().dtype(out_type));
  at::Tensor target_cosine = at::empty({n}, embeddings.options().dtype(out_type));
  at::Tensor kept;
  if (keep) {
    const int64_t kept_bytes = kept_layout(n, c).bytes;
    kept = at::empty({kept_bytes}, embeddings.options().dtype(at::kByte));
    // The block is part of the workspace: the forward's own buffers get what it leaves.
    workspace_bytes = std::max<int64_t>(workspace_bytes - kept_bytes, 0);
  }
  if (n == 0) return {loss, logsumexp, target_cosine, kept};
  const bool fused = use_fused_kernels(embeddings, weight);
  const KeptViews views = keep ? kept_views(kept, n, c) : KeptViews{};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_forward_cuda", [&] {
    margin_softmax_forward_impl<scalar_t>(embeddings, weight, labels, params, ignore_index, class_offset,
                                          resolved_num_classes(class_offset, num_classes, weight),
                                          workspace_bytes, fused, loss, logsumexp, target_cosine,
                                          keep ? &views : nullptr);
  });
  return {loss, logsumexp, target_cosine, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, double s, double m1,
    double m2, double m3, double lambda, int64_t ignore_index, bool straight_through, int64_t workspace_bytes,
    int64_t class_offset, int64_t num_classes, const c10::optional<at::Tensor>& row_margins, bool check_labels) {
  at::Tensor loss, logsumexp, target_cosine, kept;
  std::tie(loss, logsumexp, target_cosine, kept) =
      forward_cuda(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                   workspace_bytes, class_offset, num_classes, row_margins, check_labels, /*keep=*/false);
  return {loss, logsumexp, target_cosine};
}

void check_kept_dtypes(const at::Tensor& embeddings, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(embeddings.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "arcface_ext: ",
              op, " takes bf16 embeddings and weight, got ", embeddings.scalar_type(), " and ",
              weight.scalar_type());
}

// The forward of a bf16 training step that also returns the kept gradient block (kept_block.h),
// for margin_softmax_backward_kept. The autograd formula (csrc/autograd.cpp) calls it when the
// block fits the workspace.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_kept_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, double s, double m1,
    double m2, double m3, double lambda, int64_t ignore_index, bool straight_through, int64_t workspace_bytes,
    const c10::optional<at::Tensor>& row_margins, bool check_labels) {
  check_kept_dtypes(embeddings, weight, "margin_softmax_forward_kept");
  TORCH_CHECK_VALUE(weight.dim() != 2 || weight.size(0) <= kMaxKeptClasses, "arcface_ext: margin_softmax_forward_kept "
                    "takes at most ", kMaxKeptClasses, " classes, got ", weight.size(0));
  return forward_cuda(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                      workspace_bytes, 0, -1, row_margins, check_labels, /*keep=*/true);
}

// ---- backward -----------------------------------------------------------------------------

template <typename scalar_t>
void margin_softmax_backward_impl(const at::Tensor& grad_rows, const at::Tensor& x,
                                  const at::Tensor& w, const at::Tensor& labels,
                                  const at::Tensor& lse, const MarginParams& params,
                                  int64_t ignore_index, int64_t class_offset, int64_t num_classes,
                                  int64_t workspace_bytes, bool fused,
                                  bool needs_embeddings_grad, bool needs_weight_grad,
                                  at::Tensor& grad_embeddings, at::Tensor& grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool converts = !std::is_same<scalar_t, acc_t>::value;
  fused = fused && converts;
  const int64_t n = x.size(0), dim = x.size(1), c = w.size(0);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ClassChunks chunks = plan_class_chunks(
      c,
      fused ? fused_backward_bytes_per_class<scalar_t>(n, dim, needs_weight_grad)
            : cublas_bytes_per_class<scalar_t, acc_t>(n, dim),
      workspace_bytes, (fused ? int64_t{kTileClasses} : kSegment) * kMaxGridY);
  const acc_t* grad_ptr = grad_rows.data_ptr<acc_t>();

  const at::Tensor grad_max = at::empty({1}, acc_options);
  max_abs_grad_kernel<acc_t><<<1, 256, 0, stream>>>(grad_ptr, labels.data_ptr<int64_t>(), n,
                                                    ignore_index, grad_max.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor rows = at::empty({n * int64_t{sizeof(RowTarget)}}, x.options().dtype(at::kByte));
  RowTarget* rows_ptr = row_targets_ptr(rows);
  const int wgmma = fused ? wgmma_tile_variant(x.get_device(), dim) : 0;
  // d loss / d W from the backward's own class-outer tile (bf16; see wgmma_weight_gradient_tile), which
  // writes the gradient block class-major: no weight-gradient GEMM, no class_gradient_kernel.
  const bool weight_tile = std::is_same<scalar_t, at::BFloat16>::value && needs_weight_grad &&
                           wgmma == cuda::kWgmmaResidentX && wgmma_weight_gradient_tile(dim);
  // (grad_loss_i / grad_max) x̂_i in the GEMM dtype: the B operand of d loss / d W.
  const bool weight_gemm = needs_weight_grad && !weight_tile;
  const at::Tensor scaled_xhat = weight_gemm ? at::empty({n, dim}, x.options()) : at::Tensor();
  launch_row_targets<scalar_t, acc_t>(
      x, w, labels, class_offset, num_classes, ignore_index, params, rows_ptr, grad_ptr, grad_max.data_ptr<acc_t>(),
      weight_gemm ? scaled_xhat.data_ptr<scalar_t>() : nullptr, stream);

  // The cuBLAS path keeps the chunk's dot products (fp32 for 16-bit inputs), which for fp16 later
  // hold the fp32 weight-gradient block; fp32/fp64 overwrite them with the gradient block in place.
  // The fused path computes the gradient block straight from its tiles (row pitch a multiple of 8),
  // needs the fp32 block only for fp16's d loss / d W, and its tiles compute the class norms.
  const bool p_buffer = needs_weight_grad && !kPInGradWeight<scalar_t>;
  const int64_t block_pitch = fused ? (chunks.width + 7) / 8 * 8 : chunks.width;
  const int64_t row_pitch = (n + 7) / 8 * 8;  // the class-outer tile's class-major block's
  const int64_t dots_per_class = fused ? (p_buffer ? dim : 0) : (p_buffer ? std::max(n, dim) : n);
  at::Tensor dots_buffer = at::empty({dots_per_class * chunks.width}, acc_options);
  at::Tensor grad_block_buffer =
      converts ? at::empty({weight_tile ? chunks.width * row_pitch : n * block_pitch}, x.options()) : dots_buffer;
  const at::Tensor inv_norm_w = at::empty({chunks.width}, acc_options);
  const at::Tensor unclamped_w = at::empty({chunks.width}, x.options().dtype(at::kByte));
  const int stages = fused ? fused_tile_stages(x.get_device()) : 0;
  const int sm_count = fused ? device_attribute(cudaDevAttrMultiProcessorCount, x.get_device()) : 0;
  // A = Σ_j G_ij w_j, accumulated over chunks in fp32 (fp64 for fp64); the first chunk's GEMM
  // writes it, so it needs no zero fill.
  at::Tensor grad_xhat = needs_embeddings_grad ? at::empty({n, dim}, acc_options) : at::Tensor();
  at::Tensor grad_xhat_chunk =
      converts && needs_embeddings_grad && chunks.count > 1 ? at::empty({n, dim}, acc_options) : at::Tensor();

  for (int64_t k = 0; k < chunks.count; ++k) {
    const int64_t c0 = chunks.begin(k), width = chunks.width_of(k, c);
    const at::Tensor w_chunk = w.narrow(0, c0, width);
    acc_t* chunk_inv_norm = inv_norm_w.data_ptr<acc_t>();
    uint8_t* chunk_unclamped = unclamped_w.data_ptr<uint8_t>();
    // (The class-outer tile's block is class-major, in a buffer sized for it: its view comes below.)
    at::Tensor grad_block =
        weight_tile ? at::Tensor()
        : fused     ? grad_block_buffer.narrow(0, 0, n * block_pitch).view({n, block_pitch}).narrow(1, 0, width)
                    : grad_block_buffer.narrow(0, 0, n * width).view({n, width});
    if (fused) {
      if constexpr (converts) {
        constexpr bool kBFloat16 = std::is_same<scalar_t, at::BFloat16>::value;
        const int row_tiles_per_block = plan_backward_row_tiles(n, width, sm_count);
        const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
        const dim3 grid(static_cast<unsigned>((row_tiles + row_tiles_per_block - 1) / row_tiles_per_block),
                        static_cast<unsigned>((width + kTileClasses - 1) / kTileClasses));
        if (weight_tile) {
          constexpr int kSmem = cuda::kOuterSmemBytes;
          if (k == 0) allow_smem(fused_weight_gradient_wgmma_kernel, kSmem, x.get_device());
          at::BFloat16* grad_block_t = needs_embeddings_grad ? grad_block_buffer.data_ptr<at::BFloat16>() : nullptr;
          fused_weight_gradient_wgmma_kernel<<<static_cast<unsigned>((width + cuda::kOuterClasses - 1) /
                                                                     cuda::kOuterClasses),
                                               kTileThreads, kSmem, stream>>>(
              raw_bits<scalar_t>(x), raw_bits<scalar_t>(w_chunk), n, width, static_cast<int>(dim), c0, rows_ptr,
              grad_ptr, grad_max.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), static_cast<acc_t>(params.s), grad_block_t,
              row_pitch, grad_weight.narrow(0, c0, width).data_ptr<at::BFloat16>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          grad_block = grad_block_buffer.narrow(0, 0, width * row_pitch).view({width, row_pitch}).narrow(1, 0, n).t();
        } else if (wgmma == cuda::kWgmmaResidentX) {
          const int64_t class_tiles = (width + kTileClasses - 1) / kTileClasses;
          const int64_t per = resident_tiles_per_segment(row_tiles, class_tiles, sm_count);
          const dim3 resident_grid(static_cast<unsigned>(row_tiles),
                                   static_cast<unsigned>((class_tiles + per - 1) / per));
          constexpr int kSmem = cuda::kWgmmaBackwardResidentSmemBytes;
          if (k == 0) allow_smem(fused_backward_wgmma_resident_kernel<kBFloat16, scalar_t>, kSmem, x.get_device());
          fused_backward_wgmma_resident_kernel<kBFloat16, scalar_t><<<resident_grid, kTileThreads, kSmem, stream>>>(
              raw_bits<scalar_t>(x), raw_bits<scalar_t>(w_chunk), n, width, static_cast<int>(dim), c0, rows_ptr,
              grad_ptr, lse.data_ptr<acc_t>(), static_cast<acc_t>(params.s), grad_block_buffer.data_ptr<scalar_t>(),
              block_pitch, needs_weight_grad ? chunk_inv_norm : nullptr, needs_weight_grad ? chunk_unclamped : nullptr,
              per);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else if (wgmma != 0) {
          with_wgmma_depth(wgmma, [&](auto slice_depth) {
            constexpr int kDepth = decltype(slice_depth)::value;
            if (k == 0)
              allow_smem(fused_backward_wgmma_kernel<kBFloat16, scalar_t, kDepth>, cuda::wgmma_smem_bytes(),
                         x.get_device());
            fused_backward_wgmma_kernel<kBFloat16, scalar_t, kDepth>
                <<<grid, kTileThreads, cuda::wgmma_smem_bytes(), stream>>>(
                    raw_bits<scalar_t>(x), raw_bits<scalar_t>(w_chunk), n, width, static_cast<int>(dim), c0, rows_ptr,
                    grad_ptr, lse.data_ptr<acc_t>(), static_cast<acc_t>(params.s),
                    grad_block_buffer.data_ptr<scalar_t>(), block_pitch, needs_weight_grad ? chunk_inv_norm : nullptr,
                    needs_weight_grad ? chunk_unclamped : nullptr, row_tiles_per_block);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        } else {
          with_tile_stages(stages, [&](auto depth) {
            constexpr int kStages = decltype(depth)::value;
            if (k == 0) allow_tile_smem(fused_backward_kernel<kBFloat16, scalar_t, kStages>, kStages, x.get_device());
            fused_backward_kernel<kBFloat16, scalar_t, kStages>
                <<<grid, kTileThreads, cuda::tile_smem_bytes(kStages), stream>>>(
                    raw_bits<scalar_t>(x), raw_bits<scalar_t>(w_chunk), n, width, static_cast<int>(dim), c0,
                    rows_ptr, grad_ptr, lse.data_ptr<acc_t>(), static_cast<acc_t>(params.s),
                    grad_block_buffer.data_ptr<scalar_t>(), block_pitch,
                    needs_weight_grad ? chunk_inv_norm : nullptr, needs_weight_grad ? chunk_unclamped : nullptr,
                    row_tiles_per_block);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      }
    } else {
      at::Tensor dots = chunk_dot_products<scalar_t, acc_t>(
          x, w_chunk, dots_buffer, inv_norm_w.data_ptr<acc_t>(), unclamped_w.data_ptr<uint8_t>(), stream);
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(segments_in(width)));
      margin_softmax_backward_kernel<scalar_t, acc_t><<<grid, kEpilogueThreads, 0, stream>>>(
          dots.data_ptr<acc_t>(), grad_block.data_ptr<scalar_t>(), width, width, c0,
          inv_norm_w.data_ptr<acc_t>(), rows_ptr, grad_ptr, lse.data_ptr<acc_t>(),
          static_cast<acc_t>(params.s));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    if (needs_embeddings_grad) {
      if (k == 0) {
        gemm_acc_out(grad_xhat, grad_block, w_chunk);
      } else if (converts) {
        gemm_acc_out(grad_xhat_chunk, grad_block, w_chunk);
        grad_xhat.add_(grad_xhat_chunk);
      } else {
        grad_xhat.addmm_(grad_block, w_chunk);
      }
    }
    if (weight_gemm) {
      at::Tensor grad_w_chunk = grad_weight.narrow(0, c0, width);
      using p_t = std::conditional_t<kPInGradWeight<scalar_t>, scalar_t, acc_t>;
      // P goes straight into grad_weight's rows (see kPInGradWeight); fp16 gets it in fp32 in
      // the dot-product buffer (which the gradient block has replaced by now on the cuBLAS path).
      at::Tensor p = kPInGradWeight<scalar_t> ? grad_w_chunk : dots_buffer.narrow(0, 0, width * dim).view({width, dim});
      gemm_acc_out(p, grad_block.t(), scaled_xhat);
      class_gradient_kernel<scalar_t, acc_t, p_t>
          <<<blocks_for_warps(width), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              p.data_ptr<p_t>(), w_chunk.data_ptr<scalar_t>(), chunk_inv_norm, chunk_unclamped,
              grad_max.data_ptr<acc_t>(), width, dim, grad_w_chunk.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  if (needs_embeddings_grad) {
    embedding_gradient_kernel<scalar_t, acc_t>
        <<<blocks_for_warps(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
            grad_xhat.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), rows_ptr, grad_ptr, n, dim,
            grad_embeddings.data_ptr<scalar_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The backward from the forward's kept block (kept_block.h): G = diag(f)·H, so
//   Σ_j G_ij w_j = f_i (H·W)_i   (the row factor applied by embedding_gradient_kernel) and
//   Σ_i G_ij X̃_i = (Hᵀ·X̃')_j with X̃'_i = f_i X̃_i   (row_targets_kernel scales the operand),
// then the same projections as margin_softmax_backward_impl. No cosine is recomputed.
void margin_softmax_backward_kept_impl(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& labels, const KeptViews& kept, const MarginParams& params,
                                       int64_t ignore_index, bool needs_embeddings_grad, bool needs_weight_grad,
                                       at::Tensor& grad_embeddings, at::Tensor& grad_weight) {
  using scalar_t = at::BFloat16;
  using acc_t = float;
  const int64_t n = x.size(0), dim = x.size(1), c = w.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const acc_t* grad_ptr = grad_rows.data_ptr<acc_t>();
  const at::Tensor grad_max = at::empty({1}, grad_rows.options());
  max_abs_grad_kernel<acc_t><<<1, 256, 0, stream>>>(grad_ptr, labels.data_ptr<int64_t>(), n, ignore_index,
                                                    grad_max.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor rows = at::empty({n * int64_t{sizeof(RowTarget)}}, x.options().dtype(at::kByte));
  RowTarget* rows_ptr = row_targets_ptr(rows);
  const at::Tensor scaled_xhat = needs_weight_grad ? at::empty({n, dim}, x.options()) : at::Tensor();
  const acc_t* factor = kept.factor.data_ptr<acc_t>();
  launch_row_targets<scalar_t, acc_t>(x, w, labels, 0, c, ignore_index, params, rows_ptr, grad_ptr,
                                      grad_max.data_ptr<acc_t>(),
                                      needs_weight_grad ? scaled_xhat.data_ptr<scalar_t>() : nullptr, stream,
                                      factor);
  if (needs_weight_grad) {
    // P = Hᵀ·X̃' straight into grad_weight (kPInGradWeight), corrected in place.
    gemm_acc_out(grad_weight, kept.block.t(), scaled_xhat);
    class_gradient_kernel<scalar_t, acc_t, scalar_t><<<blocks_for_warps(c), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        grad_weight.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), kept.inv_norm.data_ptr<acc_t>(),
        kept.unclamped.data_ptr<uint8_t>(), grad_max.data_ptr<acc_t>(), c, dim, grad_weight.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (needs_embeddings_grad) {
    at::Tensor grad_xhat = at::empty({n, dim}, grad_rows.options());
    gemm_acc_out(grad_xhat, kept.block, w);
    embedding_gradient_kernel<scalar_t, acc_t><<<blocks_for_warps(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        grad_xhat.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), rows_ptr, grad_ptr, n, dim,
        grad_embeddings.data_ptr<scalar_t>(), factor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Both backward ops: from the log-sum-exp (recomputing the cosines), or from the kept block
// (`kept` defined; `logsumexp` then undefined, the whole softmax).
std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& embeddings_in, const at::Tensor& weight_in,
    const at::Tensor& labels_in, const at::Tensor& logsumexp_in, const at::Tensor& kept_in, double s, double m1,
    double m2, double m3, double lambda, int64_t ignore_index, bool straight_through, int64_t workspace_bytes,
    bool needs_embeddings_grad, bool needs_weight_grad, int64_t class_offset, int64_t num_classes,
    const c10::optional<at::Tensor>& row_margins_in, bool check_labels) {
  check_margin_softmax_inputs(embeddings_in, weight_in, labels_in, ignore_index, class_offset, num_classes,
                              /*check_labels=*/false);
  check_margin_softmax_backward_inputs(grad_loss_in, logsumexp_in, embeddings_in);
  const int64_t n = embeddings_in.size(0), c = weight_in.size(0);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "arcface_ext: too many rows (", n, ")");
  if (kept_in.defined()) {
    const int64_t bytes = kept_layout(n, c).bytes;
    TORCH_CHECK(kept_in.scalar_type() == at::kByte && kept_in.dim() == 1 && kept_in.size(0) == bytes &&
                    kept_in.device() == embeddings_in.device(),
                "arcface_ext: kept must be margin_softmax_forward_kept's uint8 block of ", bytes, " bytes for N = ",
                n, " and C = ", c, " on the embeddings' device, got ", kept_in.scalar_type(), " ", kept_in.sizes(),
                " on ", kept_in.device());
  }
  const c10::cuda::CUDAGuard device_guard(embeddings_in.device());
  const at::Tensor labels = labels_in.contiguous();
  // The training backward (check_labels false) has the labels and margins its forward checked: no
  // second sync, and no capture query.
  const bool check = check_labels && !current_stream_is_capturing();
  if (check) {
    check_labels_cuda(labels, weight_in, ignore_index, class_offset, num_classes, /*capturing=*/false);
  }
  at::Tensor row_margins_storage;
  const double* row_margins = row_margins_data(row_margins_in, embeddings_in, row_margins_storage, check);
  const BelowAutogradAndAutocast below;
  const at::Tensor embeddings = embeddings_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const MarginParams params = make_params(s, m1, m2, m3, lambda, straight_through, row_margins);

  at::Tensor grad_embeddings = needs_embeddings_grad ? at::empty_like(embeddings)
                                                     : at::empty({0}, embeddings.options());
  at::Tensor grad_weight = needs_weight_grad ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (n == 0) {
    if (needs_weight_grad) grad_weight.zero_();
    return {grad_embeddings, grad_weight};
  }
  if (!needs_embeddings_grad && !needs_weight_grad) return {grad_embeddings, grad_weight};

  if (kept_in.defined()) {
    const at::Tensor kept = kept_in.detach().contiguous();
    margin_softmax_backward_kept_impl(grad_loss_in.detach().to(at::kFloat).contiguous(), embeddings, weight, labels,
                                      kept_views(kept, n, c), params, ignore_index, needs_embeddings_grad,
                                      needs_weight_grad, grad_embeddings, grad_weight);
    return {grad_embeddings, grad_weight};
  }
  const bool fused = use_fused_kernels(embeddings, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor grad_rows = grad_loss_in.detach().to(acc_type).contiguous();
    const at::Tensor lse = logsumexp_in.detach().to(acc_type).contiguous();
    margin_softmax_backward_impl<scalar_t>(grad_rows, embeddings, weight, labels, lse, params,
                                           ignore_index, class_offset,
                                           resolved_num_classes(class_offset, num_classes, weight), workspace_bytes,
                                           fused, needs_embeddings_grad,
                                           needs_weight_grad, grad_embeddings, grad_weight);
  });
  return {grad_embeddings, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& logsumexp, double s, double m1, double m2, double m3, double lambda, int64_t ignore_index,
    bool straight_through, int64_t workspace_bytes, bool needs_embeddings_grad, bool needs_weight_grad,
    int64_t class_offset, int64_t num_classes, const c10::optional<at::Tensor>& row_margins, bool check_labels) {
  return backward_cuda(grad_loss, embeddings, weight, labels, logsumexp, at::Tensor(), s, m1, m2, m3, lambda,
                       ignore_index, straight_through, workspace_bytes, needs_embeddings_grad, needs_weight_grad,
                       class_offset, num_classes, row_margins, check_labels);
}

// The labels are not checked again (the autograd formula passes the forward's, saved and so
// unchanged); out-of-range ones get no gradient.
std::tuple<at::Tensor, at::Tensor> margin_softmax_backward_kept_cuda(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& kept, double s, double m1, double m2, double m3, double lambda, int64_t ignore_index,
    bool straight_through, bool needs_embeddings_grad, bool needs_weight_grad,
    const c10::optional<at::Tensor>& row_margins) {
  check_kept_dtypes(embeddings, weight, "margin_softmax_backward_kept");
  TORCH_CHECK(kept.defined(), "arcface_ext: margin_softmax_backward_kept needs the kept block");
  return backward_cuda(grad_loss, embeddings, weight, labels, at::Tensor(), kept, s, m1, m2, m3, lambda,
                       ignore_index, straight_through, /*workspace_bytes=*/0, needs_embeddings_grad,
                       needs_weight_grad, 0, -1, row_margins, /*check_labels=*/false);
}

// ---- the loss's reduction -------------------------------------------------------------------

at::Tensor reduce_loss_cuda(const at::Tensor& loss_in, const at::Tensor& labels_in, int64_t ignore_index, bool mean) {
  check_reduce_loss_inputs("reduce_loss", loss_in, /*per_row=*/true, labels_in);
  const c10::cuda::CUDAGuard device_guard(loss_in.device());
  const at::Tensor loss = loss_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor out = at::empty({}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "reduce_loss_cuda", [&] {
    reduce_loss_kernel<scalar_t><<<1, kReduceThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        loss.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), labels.size(0), ignore_index, mean,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor reduce_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& labels_in, int64_t ignore_index,
                                     bool mean) {
  check_reduce_loss_inputs("reduce_loss_backward", grad, /*per_row=*/false, labels_in);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor grad_rows = at::empty({labels.size(0)}, grad.options());
  if (labels.size(0) == 0) return grad_rows;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "reduce_loss_backward_cuda", [&] {
    reduce_loss_backward_kernel<scalar_t><<<1, kReduceThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), labels.size(0), ignore_index, mean,
        grad_rows.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_rows;
}

// ---- diagnostics ----------------------------------------------------------------------------

// One wgmma tile of x·wᵀ as the fused kernels compute it, every thread's registers as they come out of
// the tensor cores (wgmma_tile_probe_kernel): (256, 65) float32. x (R, D) and w (K, D): 16-bit, one
// dtype, R and K at most 128, D a positive multiple of 8 (at most kWgmmaResidentMaxDim for the resident
// tile); `tile` the variant: "64" or "32" (streaming slices of that depth) or "resident" (the x tile
// resident in shared memory).
at::Tensor wgmma_tile_probe_cuda(const at::Tensor& x_in, const at::Tensor& w_in, c10::string_view tile) {
  const int variant = wgmma_variant_named(tile);
  TORCH_CHECK_VALUE(variant != 0, "arcface_ext: wgmma_tile_probe: tile must be '64', '32' or 'resident', got '",
                    tile, "'");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && w_in.dim() == 2, "arcface_ext: wgmma_tile_probe: x and w must be 2-D, got ",
                    x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK_VALUE(x_in.scalar_type() == w_in.scalar_type() &&
                        (x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kHalf),
                    "arcface_ext: wgmma_tile_probe: x and w must both be bfloat16 or both float16, got ",
                    x_in.scalar_type(), " and ", w_in.scalar_type());
  const int64_t dim = x_in.size(1);
  const int64_t max_dim = variant == cuda::kWgmmaResidentX ? cuda::kWgmmaResidentMaxDim
                                                            : std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(w_in.size(1) == dim && dim > 0 && dim % 8 == 0 && dim <= max_dim,
                    "arcface_ext: wgmma_tile_probe: x and w need one depth, a positive multiple of 8 (at most ",
                    max_dim, " for this tile); got ", x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK_VALUE(x_in.size(0) <= kTileRows && w_in.size(0) <= kTileClasses,
                    "arcface_ext: wgmma_tile_probe: x and w hold at most ", kTileRows, " rows each, got ",
                    x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK_VALUE(x_in.device() == w_in.device(), "arcface_ext: wgmma_tile_probe: x and w must be on one device, "
                    "got ", x_in.device(), " and ", w_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  check_wgmma_runs(x_in.get_device(), "wgmma_tile_probe");
  // A fresh contiguous copy: 16-byte aligned bases, as the tile's copies need.
  const at::Tensor x = x_in.detach().clone(at::MemoryFormat::Contiguous);
  const at::Tensor w = w_in.detach().clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({kTileThreads, 65}, x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  with_wgmma_variant(variant, [&](auto variant_constant) {
    constexpr int kVariant = decltype(variant_constant)::value;
    constexpr int kSmem = cuda::wgmma_variant_smem_bytes<kVariant>();
    auto launch = [&](auto bf16_flag) {
      constexpr bool kBFloat16 = decltype(bf16_flag)::value;
      allow_smem(wgmma_tile_probe_kernel<kBFloat16, kVariant>, kSmem, x.get_device());
      wgmma_tile_probe_kernel<kBFloat16, kVariant><<<1, kTileThreads, kSmem, stream>>>(
          static_cast<const uint16_t*>(x.data_ptr()), x.size(0), static_cast<const uint16_t*>(w.data_ptr()),
          w.size(0), static_cast<int>(dim), out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (bf16) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return out;
}

// The class-outer tile's two GEMMs on given operands (wgmma_weight_tile_probe_kernel): (256, 144) float32,
// each thread's 16 registers of S = w·xᵀ, then its 128 of P = g·x. x (R, D) and w (K, D) bf16, R and K at
// most 64, D a positive multiple of 8 at most kWgmmaResidentMaxDim; g (64, 64) bf16.
at::Tensor wgmma_weight_tile_probe_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& g_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && w_in.dim() == 2 && g_in.dim() == 2,
                    "arcface_ext: wgmma_weight_tile_probe: x, w and g must be 2-D, got ", x_in.sizes(), ", ",
                    w_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kBFloat16 && w_in.scalar_type() == at::kBFloat16 &&
                        g_in.scalar_type() == at::kBFloat16,
                    "arcface_ext: wgmma_weight_tile_probe: x, w and g must be bfloat16, got ", x_in.scalar_type(), ", ",
                    w_in.scalar_type(), " and ", g_in.scalar_type());
  const int64_t dim = x_in.size(1);
  TORCH_CHECK_VALUE(w_in.size(1) == dim && dim > 0 && dim % 8 == 0 && dim <= cuda::kWgmmaResidentMaxDim,
                    "arcface_ext: wgmma_weight_tile_probe: x and w need one depth, a positive multiple of 8 (at most ",
                    cuda::kWgmmaResidentMaxDim, "); got ", x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK_VALUE(x_in.size(0) <= cuda::kOuterRows && w_in.size(0) <= cuda::kOuterClasses,
                    "arcface_ext: wgmma_weight_tile_probe: x and w hold at most 64 rows each, got ", x_in.sizes(),
                    " and ", w_in.sizes());
  TORCH_CHECK_VALUE(g_in.size(0) == cuda::kOuterClasses && g_in.size(1) == cuda::kOuterRows,
                    "arcface_ext: wgmma_weight_tile_probe: g must be (64, 64), got ", g_in.sizes());
  TORCH_CHECK_VALUE(x_in.device() == w_in.device() && x_in.device() == g_in.device(),
                    "arcface_ext: wgmma_weight_tile_probe: x, w and g must be on one device, got ", x_in.device(), ", ",
                    w_in.device(), " and ", g_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  check_wgmma_runs(x_in.get_device(), "wgmma_weight_tile_probe");
  const at::Tensor x = x_in.detach().clone(at::MemoryFormat::Contiguous);
  const at::Tensor w = w_in.detach().clone(at::MemoryFormat::Contiguous);
  const at::Tensor g = g_in.detach().clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({kTileThreads, 144}, x.options().dtype(at::kFloat));
  allow_smem(wgmma_weight_tile_probe_kernel, cuda::kOuterSmemBytes, x.get_device());
  wgmma_weight_tile_probe_kernel<<<1, kTileThreads, cuda::kOuterSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint16_t*>(x.data_ptr()), x.size(0), static_cast<const uint16_t*>(w.data_ptr()), w.size(0),
      static_cast<const uint16_t*>(g.data_ptr()), static_cast<int>(dim), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(arcface_ext, CUDA, m) {
  m.impl("margin_softmax_forward", &margin_softmax_forward_cuda);
  m.impl("margin_softmax_backward", &margin_softmax_backward_cuda);
  m.impl("margin_softmax_forward_kept", &margin_softmax_forward_kept_cuda);
  m.impl("margin_softmax_backward_kept", &margin_softmax_backward_kept_cuda);
  m.impl("reduce_loss", &reduce_loss_cuda);
  m.impl("reduce_loss_backward", &reduce_loss_backward_cuda);
  m.impl("wgmma_tile_probe", &wgmma_tile_probe_cuda);
  m.impl("wgmma_weight_tile_probe", &wgmma_weight_tile_probe_cuda);
}

}  // namespace arcface_ext
