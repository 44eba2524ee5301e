// CPU kernel of the fused margin softmax: normalised cosine, combined margin, softmax
// cross-entropy and its gradient, walked over blocks of classes so that the extra memory is
// bounded by the workspace, whatever N and C.
//
// Each thread owns a contiguous run of class blocks. Per block one small GEMM gives the raw dot
// products x̂·w_jᵀ (kept in cache); the class centres are never normalised as a copy: their
// inverse norms scale the GEMM's columns (a rank-1 scaling). A first pass turns the cosines into
// softmax statistics (log-sum-exp per row); a second pass turns them into the gradient block
// g_ij / ‖w_j‖ and feeds it straight into the two gradient GEMMs.
//
// Between the passes the cosines are either recomputed (one more GEMM: the lazy backward, and
// the training op when the workspace is small) or, in the training op, kept in the workspace
// when a block of rows × all classes fits in it (three GEMMs, the floor).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../margin.h"

// The per-element loops below are written branch-free so that the compiler vectorises them; on
// x86-64 with GCC they are also compiled for AVX2+FMA and picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ARCFACE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ARCFACE_VECTOR_CLONES
#endif

namespace arcface_ext {
namespace {

// exp(x) for x <= 0 in float, Cephes' range reduction and polynomial (about 1 ulp), without
// branches so it vectorises. Arguments below -87 return about 1e-38 instead of underflowing.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // Round to nearest with the 1.5 * 2^23 trick (vectorises without SSE4.1's roundps).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename acc_t>
inline acc_t clamp_unit(acc_t c) {
  return std::min(std::max(c, acc_t(-1)), acc_t(1));
}

// ---- per-row epilogues (cache-resident rows of one class block) ------------------------

// Raw dot products x̂·w_j -> cosines x̂·ŵ_j (unclamped), in place.
template <typename acc_t>
ARCFACE_VECTOR_CLONES void scale_columns(acc_t* row, const acc_t* inv_norm_w, int64_t width) {
  for (int64_t j = 0; j < width; ++j) row[j] *= inv_norm_w[j];
}

template <typename acc_t>
ARCFACE_VECTOR_CLONES acc_t max_logit(const acc_t* cosine, int64_t lo, int64_t hi, acc_t s) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t j = lo; j < hi; ++j) {
    const acc_t z = s * clamp_unit(cosine[j]);
    row_max = row_max > z ? row_max : z;
  }
  return row_max;
}

template <typename acc_t>
ARCFACE_VECTOR_CLONES acc_t sum_exp_logits(const acc_t* cosine, int64_t lo, int64_t hi, acc_t s,
                                           acc_t shift) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = lo; j < hi; ++j) sum += exp_nonpositive(s * clamp_unit(cosine[j]) - shift);
  return sum;
}

// Replaces cosines (non-target columns lo..hi) by g_j / ‖w_j‖, where
// g_j = d loss / d cos_j = grad_row * s * softmax_j, zero where the cosine was clamped (as
// torch.clamp's gradient is). Adds g_j·cos_j to column_dot[j] and returns their sum over the
// range: the normalisations' own gradients need both.
template <typename acc_t>
ARCFACE_VECTOR_CLONES acc_t gradient_row(acc_t* row, const acc_t* inv_norm_w, acc_t* column_dot,
                                         int64_t lo, int64_t hi, acc_t s, acc_t logsumexp,
                                         acc_t grad_s) {
  acc_t row_dot = 0;
#pragma omp simd reduction(+ : row_dot)
  for (int64_t j = lo; j < hi; ++j) {
    const acc_t cosine = row[j];
    const acc_t inside = (cosine >= acc_t(-1) && cosine <= acc_t(1)) ? acc_t(1) : acc_t(0);
    const acc_t g = inside * grad_s * exp_nonpositive(s * clamp_unit(cosine) - logsumexp);
    row_dot += g * cosine;
    column_dot[j] += g * cosine;
    row[j] = g * inv_norm_w[j];
  }
  return row_dot;
}

// 1 / max(‖w_j‖, eps) for a block of class centres, and whether the norm was not clamped.
template <typename acc_t>
void inverse_norms(const acc_t* w, int64_t rows, int64_t dim, acc_t* inv_norm, uint8_t* unclamped) {
  for (int64_t j = 0; j < rows; ++j) {
    const acc_t* wj = w + j * dim;
    acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < dim; ++k) sq += wj[k] * wj[k];
    const acc_t norm = std::sqrt(sq);
    unclamped[j] = norm >= acc_t(kNormEps);
    inv_norm[j] = acc_t(1) / std::max(norm, acc_t(kNormEps));
  }
}

// ---- one call's shared state -----------------------------------------------------------

struct TargetRow {
  bool counted = false;  // label != ignore_index
  int64_t label = -1;    // the target's row of this weight; -1 when it is in another shard
  double cosine = 0;  // x̂·ŵ_y before clamping
  TargetMargin margin{0, 0};
};

struct Blocking {
  int64_t block = 0;  // classes per block
  int64_t num_blocks = 0;
  int64_t num_chunks = 0;  // contiguous runs of blocks, one per thread

  int64_t chunk_begin(int64_t chunk) const { return num_blocks * chunk / num_chunks; }
};

constexpr int64_t kCacheBytes = 512 * 1024;  // one block of dot products: about an L2 cache
constexpr int64_t kMinBlock = 16;

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Each thread's scratch besides the block of dot products: converted class centres and their
// gradient (16-bit weights only), its share of d loss / d x̂, a few per-class scalars.
int64_t chunk_bytes(int64_t rows, int64_t block, int64_t dim, int64_t acc_size, bool converts) {
  return acc_size * (rows * dim + (converts ? 2 * block * dim : 0) + 3 * block);
}

// The class block for `rows` rows: its dot products stay in cache and all threads' buffers
// stay within the workspace. It depends on shapes and the thread count only, never on data.
Blocking choose_blocking(int64_t rows, int64_t c, int64_t dim, int64_t acc_size, bool converts,
                         int64_t workspace_bytes) {
  rows = std::max<int64_t>(rows, 1);
  const int64_t threads = num_threads();
  const int64_t per_class = acc_size * (rows + (converts ? 2 * dim : 0) + 3);
  const int64_t by_workspace = (workspace_bytes / threads - acc_size * rows * dim) / per_class;
  int64_t block = std::min(kCacheBytes / (acc_size * rows), by_workspace);
  block = std::max(kMinBlock, block / kMinBlock * kMinBlock);
  Blocking b;
  b.block = std::min(block, c);
  b.num_blocks = (c + b.block - 1) / b.block;
  b.num_chunks = std::min(threads, b.num_blocks);
  return b;
}

template <typename scalar_t>
struct MarginSoftmax {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kConverts = !std::is_same<scalar_t, acc_t>::value;

  at::Tensor weight;  // (C, D) contiguous, input dtype
  at::Tensor xhat;  // (N, D) normalised embeddings, acc_t
  at::Tensor norm_x;  // (N, 1) ‖x_i‖, acc_t
  std::vector<TargetRow> targets;
  MarginParams params;
  int64_t n, c, dim;

  MarginSoftmax(const at::Tensor& embeddings, const at::Tensor& weight_in, const at::Tensor& labels,
                const MarginParams& p, int64_t ignore_index, int64_t class_offset = 0)
      : weight(weight_in), params(p), n(embeddings.size(0)), c(weight_in.size(0)),
        dim(embeddings.size(1)) {
    const at::Tensor x = embeddings.to(c10::CppTypeToScalarType<acc_t>::value);
    norm_x = at::linalg_vector_norm(x, 2, {1}, true);
    xhat = (x / norm_x.clamp_min(kNormEps)).contiguous();
    targets = target_rows(labels.data_ptr<int64_t>(), ignore_index, class_offset);
  }

  // The target column of every row, from a direct dot product in double (N·D work). A target in
  // another shard leaves the row counted with label -1: no column of this weight matches it, and
  // its target logit, cosine and margin derivative stay 0.
  std::vector<TargetRow> target_rows(const int64_t* labels, int64_t ignore_index,
                                     int64_t class_offset) const {
    std::vector<TargetRow> rows(n);
    const acc_t* xh = xhat.data_ptr<acc_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        TargetRow& t = rows[i];
        t.counted = labels[i] != ignore_index;
        const int64_t local = labels[i] - class_offset;
        if (!t.counted || local < 0 || local >= c) continue;
        t.label = local;
        const scalar_t* wy = w + t.label * dim;
        const acc_t* xi = xh + i * dim;
        double dot = 0, sq = 0;
        for (int64_t k = 0; k < dim; ++k) {
          const double wk = static_cast<double>(wy[k]);
          dot += static_cast<double>(xi[k]) * wk;
          sq += wk * wk;
        }
        t.cosine = dot / std::max(std::sqrt(sq), kNormEps);
        t.margin = target_margin(clamp_cosine(t.cosine), row_params(params, i));
      }
    });
    return rows;
  }

  Blocking blocking(int64_t rows, int64_t workspace_bytes) const {
    return choose_blocking(rows, c, dim, sizeof(acc_t), kConverts, workspace_bytes);
  }

  // Rows of the training op's row blocks when their cosines fit the workspace next to the
  // threads' scratch; 0 when they do not (then the cosines are recomputed instead).
  int64_t stored_rows(int64_t workspace_bytes) const {
    constexpr int64_t kMinStoredRows = 64;  // fewer rows per GEMM would starve it
    const int64_t threads = num_threads();
    for (int64_t rows = n; rows >= 1;) {
      const Blocking b = blocking(rows, workspace_bytes);
      const int64_t stored = sizeof(acc_t) * rows * b.num_blocks * b.block;
      if (stored + threads * chunk_bytes(rows, b.block, dim, sizeof(acc_t), kConverts) <= workspace_bytes) {
        // Several row blocks would accumulate a 16-bit weight gradient in 16 bits: keep one.
        if (rows == n || (!kConverts && rows >= kMinStoredRows)) return rows;
        return 0;
      }
      if (rows <= kMinStoredRows) return 0;
      rows = std::max<int64_t>(kMinStoredRows, rows / 2);
    }
    return 0;
  }

  // The block's class centres in the accumulation type: a view when no conversion is needed.
  at::Tensor weight_block(int64_t c0, int64_t width, at::Tensor& convert_buf) const {
    at::Tensor block = weight.narrow(0, c0, width);
    if (!kConverts) return block;
    at::Tensor out = convert_buf.narrow(0, 0, width);
    out.copy_(block);
    return out;
  }

  // Cosines of rows [r0, r0 + rows) with the classes of block b, into `out` (rows x width).
  void cosine_block(int64_t r0, int64_t rows, const at::Tensor& wb, const acc_t* inv_norm,
                    at::Tensor& out) const {
    at::mm_out(out, xhat.narrow(0, r0, rows), wb.t());
    acc_t* base = out.data_ptr<acc_t>();
    const int64_t width = wb.size(0);
    for (int64_t i = 0; i < rows; ++i) scale_columns(base + i * width, inv_norm, width);
  }

  // Pass 1 over rows [r0, r0 + rows): the log-sum-exp of every counted row. With `store`, the
  // cosines of block b are kept at store + b * rows * block for pass 2.
  void softmax_statistics(int64_t r0, int64_t rows, const Blocking& bl, acc_t* store,
                          acc_t* logsumexp) const {
    // Running (max, sum of exp) per chunk and row, merged in chunk order below, so the result
    // does not depend on thread timing.
    std::vector<acc_t> chunk_max(bl.num_chunks * rows, -std::numeric_limits<acc_t>::infinity());
    std::vector<acc_t> chunk_sum(bl.num_chunks * rows, 0);
    at::parallel_for(0, bl.num_chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) {
      at::Tensor dots = store ? at::Tensor() : at::empty({rows * bl.block}, xhat.options());
      at::Tensor convert_buf = kConverts ? at::empty({bl.block, dim}, xhat.options()) : at::Tensor();
      std::vector<acc_t> inv_norm(bl.block);
      std::vector<uint8_t> unclamped(bl.block);
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        acc_t* run_max = chunk_max.data() + chunk * rows;
        acc_t* run_sum = chunk_sum.data() + chunk * rows;
        for (int64_t b = bl.chunk_begin(chunk); b < bl.chunk_begin(chunk + 1); ++b) {
          const int64_t c0 = b * bl.block;
          const int64_t width = std::min(bl.block, c - c0);
          const at::Tensor wb = weight_block(c0, width, convert_buf);
          inverse_norms(wb.data_ptr<acc_t>(), width, dim, inv_norm.data(), unclamped.data());
          at::Tensor block =
              store ? at::from_blob(store + b * rows * bl.block, {rows, width}, xhat.options())
                    : dots.narrow(0, 0, rows * width).view({rows, width});
          cosine_block(r0, rows, wb, inv_norm.data(), block);
          const acc_t* base = block.data_ptr<acc_t>();
          const acc_t s = static_cast<acc_t>(params.s);
          for (int64_t i = 0; i < rows; ++i) {
            const TargetRow& t = targets[r0 + i];
            if (!t.counted) continue;
            const acc_t* row = base + i * width;
            // The target's logit carries the margin: leave its plain cosine out of the row.
            const int64_t local = t.label - c0;
            const bool has_target = local >= 0 && local < width;
            const int64_t split = has_target ? local : width;
            const int64_t resume = has_target ? local + 1 : width;
            const acc_t target_logit = static_cast<acc_t>(t.margin.logit);
            acc_t row_max = std::max(max_logit(row, 0, split, s), max_logit(row, resume, width, s));
            if (has_target) row_max = std::max(row_max, target_logit);
            acc_t row_sum = sum_exp_logits(row, 0, split, s, row_max) +
                            sum_exp_logits(row, resume, width, s, row_max);
            if (has_target) row_sum += std::exp(target_logit - row_max);
            if (row_max == -std::numeric_limits<acc_t>::infinity()) continue;  // empty range
            const acc_t new_max = std::max(run_max[i], row_max);
            run_sum[i] = run_sum[i] * std::exp(run_max[i] - new_max) +
                         row_sum * std::exp(row_max - new_max);
            run_max[i] = new_max;
          }
        }
      }
    });
    for (int64_t i = 0; i < rows; ++i) {
      if (!targets[r0 + i].counted) continue;
      acc_t total_max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t k = 0; k < bl.num_chunks; ++k) total_max = std::max(total_max, chunk_max[k * rows + i]);
      acc_t total_sum = 0;
      for (int64_t k = 0; k < bl.num_chunks; ++k)
        total_sum += chunk_sum[k * rows + i] * std::exp(chunk_max[k * rows + i] - total_max);
      logsumexp[r0 + i] = total_max + std::log(total_sum);
    }
  }

  // Pass 2 over rows [r0, r0 + rows): gradients of Σ_i grad_rows[i] · loss_i. Fills grad_xhat
  // (rows x D, d loss / d x̂ before the normalisation's projection) and row_dot (Σ_j g_ij cos_ij)
  // when defined; writes (or, with accumulate_weight, adds) d loss / d W into grad_weight when
  // defined. Reads the cosines from `store` when given, else recomputes them.
  void accumulate_gradients(int64_t r0, int64_t rows, const Blocking& bl, acc_t* store,
                            const acc_t* grad_rows, const acc_t* logsumexp, at::Tensor grad_xhat,
                            acc_t* row_dot, at::Tensor grad_weight, bool accumulate_weight) const {
    const bool needs_x = grad_xhat.defined(), needs_w = grad_weight.defined();
    // Each chunk accumulates its own share of d loss / d x̂ and of row_dot, summed in chunk
    // order afterwards, so the result does not depend on thread timing.
    at::Tensor chunk_grad_xhat = needs_x ? at::zeros({bl.num_chunks, rows, dim}, xhat.options()) : at::Tensor();
    std::vector<acc_t> chunk_row_dot(bl.num_chunks * rows, 0);
    const at::Tensor xhat_rows = xhat.narrow(0, r0, rows);
    at::parallel_for(0, bl.num_chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) {
      at::Tensor dots = store ? at::Tensor() : at::empty({rows * bl.block}, xhat.options());
      at::Tensor convert_buf = kConverts ? at::empty({bl.block, dim}, xhat.options()) : at::Tensor();
      at::Tensor grad_w_buf = kConverts && needs_w ? at::empty({bl.block, dim}, xhat.options()) : at::Tensor();
      std::vector<acc_t> inv_norm(bl.block);
      std::vector<uint8_t> unclamped(bl.block);
      std::vector<acc_t> column_dot(bl.block);
      const acc_t s = static_cast<acc_t>(params.s);
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        acc_t* chunk_dot = chunk_row_dot.data() + chunk * rows;
        for (int64_t b = bl.chunk_begin(chunk); b < bl.chunk_begin(chunk + 1); ++b) {
          const int64_t c0 = b * bl.block;
          const int64_t width = std::min(bl.block, c - c0);
          const at::Tensor wb = weight_block(c0, width, convert_buf);
          const acc_t* w_ptr = wb.data_ptr<acc_t>();
          inverse_norms(w_ptr, width, dim, inv_norm.data(), unclamped.data());
          std::fill(column_dot.begin(), column_dot.begin() + width, acc_t(0));
          at::Tensor block;
          if (store) {
            block = at::from_blob(store + b * rows * bl.block, {rows, width}, xhat.options());
          } else {
            block = dots.narrow(0, 0, rows * width).view({rows, width});
            cosine_block(r0, rows, wb, inv_norm.data(), block);
          }
          acc_t* base = block.data_ptr<acc_t>();
          for (int64_t i = 0; i < rows; ++i) {
            acc_t* row = base + i * width;
            const TargetRow& t = targets[r0 + i];
            const acc_t grad_row = grad_rows[r0 + i];
            if (!t.counted || grad_row == acc_t(0)) {
              std::fill(row, row + width, acc_t(0));
              continue;
            }
            const int64_t local = t.label - c0;
            const bool has_target = local >= 0 && local < width;
            const int64_t split = has_target ? local : width;
            const int64_t resume = has_target ? local + 1 : width;
            const acc_t lse = logsumexp[r0 + i];
            const acc_t grad_s = grad_row * s;
            chunk_dot[i] += gradient_row(row, inv_norm.data(), column_dot.data(), 0, split, s, lse, grad_s) +
                            gradient_row(row, inv_norm.data(), column_dot.data(), resume, width, s, lse, grad_s);
            if (has_target) {
              // The target's gradient goes through the margin: g = grad (p - 1) s dψ/dc, with p
              // from the logit as the forward rounded it into the log-sum-exp.
              const double inside = (t.cosine >= -1.0 && t.cosine <= 1.0) ? 1.0 : 0.0;
              const double p = std::exp(static_cast<double>(static_cast<acc_t>(t.margin.logit)) -
                                        static_cast<double>(lse));
              const double g = inside * static_cast<double>(grad_row) * (p - 1.0) * t.margin.dlogit_dc;
              chunk_dot[i] += static_cast<acc_t>(g * t.cosine);
              column_dot[local] += static_cast<acc_t>(g * t.cosine);
              row[local] = static_cast<acc_t>(g) * inv_norm[local];
            }
          }
          if (needs_w) {
            // d loss / d w_j = (1/‖w_j‖) (Σ_i g_ij x̂_i - (Σ_i g_ij cos_ij) ŵ_j)
            at::Tensor out = grad_weight.narrow(0, c0, width);
            at::Tensor gw = kConverts ? grad_w_buf.narrow(0, 0, width) : out;
            if (accumulate_weight && !kConverts) {
              gw.addmm_(block.t(), xhat_rows);
            } else {
              at::mm_out(gw, block.t(), xhat_rows);
            }
            acc_t* gw_ptr = gw.data_ptr<acc_t>();
            for (int64_t j = 0; j < width; ++j) {
              if (!unclamped[j]) continue;
              const acc_t coef = column_dot[j] * inv_norm[j] * inv_norm[j];
              acc_t* gj = gw_ptr + j * dim;
              const acc_t* wj = w_ptr + j * dim;
              for (int64_t k = 0; k < dim; ++k) gj[k] -= coef * wj[k];
            }
            if (kConverts) accumulate_weight ? out.add_(gw) : out.copy_(gw);
          }
          if (needs_x) chunk_grad_xhat[chunk].addmm_(block, wb);
        }
      }
    });
    if (!needs_x) return;
    grad_xhat.copy_(chunk_grad_xhat[0]);
    for (int64_t k = 1; k < bl.num_chunks; ++k) grad_xhat.add_(chunk_grad_xhat[k]);
    for (int64_t k = 0; k < bl.num_chunks; ++k)
      for (int64_t i = 0; i < rows; ++i) row_dot[i] += chunk_row_dot[k * rows + i];
  }

  // d loss / d x_i = (1/‖x_i‖) (Σ_j g_ij ŵ_j - (Σ_j g_ij cos_ij) x̂_i): the normalisation's
  // projection, skipped where ‖x_i‖ was clamped (as clamp_min's gradient is).
  at::Tensor embeddings_gradient(at::Tensor grad_xhat, const std::vector<acc_t>& row_dot) const {
    const acc_t* xh = xhat.data_ptr<acc_t>();
    const acc_t* norm = norm_x.data_ptr<acc_t>();
    acc_t* gx = grad_xhat.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (norm[i] < acc_t(kNormEps)) continue;
      for (int64_t k = 0; k < dim; ++k) gx[i * dim + k] -= row_dot[i] * xh[i * dim + k];
    }
    return grad_xhat / norm_x.clamp_min(kNormEps);
  }
};

MarginParams make_params(double s, double m1, double m2, double m3, double lambda, bool straight,
                         const double* row_margins) {
  return MarginParams{s, m1, m2, m3, lambda, straight, row_margins};
}

at::ScalarType loss_type(const at::Tensor& embeddings) {
  return embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- ops ------------------------------------------------------------------------------

// The op's inputs, checked, detached (the parallel workers do not inherit the caller's dispatch
// guard, so nothing they touch may require grad) and contiguous.
struct OpInputs {
  at::Tensor embeddings, weight, labels;
};

OpInputs prepare_inputs(const at::Tensor& embeddings, const at::Tensor& weight,
                        const at::Tensor& labels, int64_t ignore_index, int64_t class_offset = 0,
                        int64_t num_classes = -1, bool check_labels = true) {
  check_margin_softmax_inputs(embeddings, weight, labels, ignore_index, class_offset, num_classes, check_labels);
  return {embeddings.detach().contiguous(), weight.detach().contiguous(), labels.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_cpu(
    const at::Tensor& embeddings_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
    double s, double m1, double m2, double m3, double lambda, int64_t ignore_index,
    bool straight_through, int64_t workspace_bytes, int64_t class_offset, int64_t num_classes,
    const c10::optional<at::Tensor>& row_margins_in, bool /*check_labels: checked anyway, no sync here*/) {
  const OpInputs inputs =
      prepare_inputs(embeddings_in, weight_in, labels_in, ignore_index, class_offset, num_classes);
  const at::Tensor &embeddings = inputs.embeddings, &weight = inputs.weight, &labels = inputs.labels;
  at::Tensor row_margins_storage;
  const double* row_margins = row_margins_data(row_margins_in, embeddings, row_margins_storage);
  at::AutoDispatchBelowAutograd below_autograd;
  const int64_t n = embeddings.size(0);
  const auto options = embeddings.options().dtype(loss_type(embeddings));
  at::Tensor loss = at::zeros({n}, options);
  at::Tensor logsumexp = at::zeros({n}, options);
  at::Tensor target_cosine = at::zeros({n}, options);
  if (n == 0) return {loss, logsumexp, target_cosine};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MarginSoftmax<scalar_t> problem(embeddings, weight, labels,
                                          make_params(s, m1, m2, m3, lambda, straight_through, row_margins),
                                          ignore_index, class_offset);
    acc_t* lse = logsumexp.data_ptr<acc_t>();
    problem.softmax_statistics(0, n, problem.blocking(n, workspace_bytes), nullptr, lse);
    acc_t* loss_ptr = loss.data_ptr<acc_t>();
    acc_t* cos_ptr = target_cosine.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      const TargetRow& t = problem.targets[i];
      if (!t.counted) continue;
      loss_ptr[i] = lse[i] - static_cast<acc_t>(t.margin.logit);
      cos_ptr[i] = static_cast<acc_t>(clamp_cosine(t.cosine));
    }
  });
  return {loss, logsumexp, target_cosine};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& embeddings_in, const at::Tensor& weight_in,
    const at::Tensor& labels_in, const at::Tensor& logsumexp_in, double s, double m1, double m2,
    double m3, double lambda, int64_t ignore_index, bool straight_through, int64_t workspace_bytes,
    bool needs_embeddings_grad, bool needs_weight_grad, int64_t class_offset, int64_t num_classes,
    const c10::optional<at::Tensor>& row_margins_in, bool check_labels) {
  const OpInputs inputs =
      prepare_inputs(embeddings_in, weight_in, labels_in, ignore_index, class_offset, num_classes, check_labels);
  const at::Tensor &embeddings = inputs.embeddings, &weight = inputs.weight;
  at::Tensor labels = inputs.labels;
  if (!check_labels) {
    // Unchecked labels out of [0, num_classes) get no gradient, as on CUDA (there: inside a CUDA
    // graph). A plain loop: ATen's masked_fill and its comparisons cost ~15 µs a step on small N.
    const int64_t total = resolved_num_classes(class_offset, num_classes, weight_in);
    const int64_t* values = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) {
      if (values[i] != ignore_index && (values[i] < 0 || values[i] >= total)) {
        labels = labels.clone();
        int64_t* fixed = labels.data_ptr<int64_t>();
        for (int64_t k = i; k < labels.numel(); ++k)
          if (fixed[k] != ignore_index && (fixed[k] < 0 || fixed[k] >= total)) fixed[k] = ignore_index;
        break;
      }
    }
  }
  check_margin_softmax_backward_inputs(grad_loss_in, logsumexp_in, embeddings_in);
  at::Tensor row_margins_storage;
  const double* row_margins = row_margins_data(row_margins_in, embeddings, row_margins_storage);
  const int64_t n = embeddings_in.size(0);
  at::AutoDispatchBelowAutograd below_autograd;

  at::Tensor grad_embeddings = needs_embeddings_grad ? at::zeros_like(embeddings) : at::empty({0}, embeddings.options());
  // Every class block writes its rows of grad_weight, so only an empty batch needs zeros.
  at::Tensor grad_weight = !needs_weight_grad ? at::empty({0}, weight.options())
                           : n == 0           ? at::zeros_like(weight)
                                              : at::empty_like(weight);
  if (n == 0 || !(needs_embeddings_grad || needs_weight_grad)) return {grad_embeddings, grad_weight};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const MarginSoftmax<scalar_t> problem(embeddings, weight, labels,
                                          make_params(s, m1, m2, m3, lambda, straight_through, row_margins),
                                          ignore_index, class_offset);
    const at::Tensor grad_rows = grad_loss_in.detach().to(acc_type).contiguous();
    const at::Tensor lse = logsumexp_in.detach().to(acc_type).contiguous();
    at::Tensor grad_xhat = needs_embeddings_grad ? at::empty({n, problem.dim}, problem.xhat.options()) : at::Tensor();
    std::vector<acc_t> row_dot(n, 0);
    problem.accumulate_gradients(0, n, problem.blocking(n, workspace_bytes), nullptr,
                                 grad_rows.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), grad_xhat,
                                 row_dot.data(), needs_weight_grad ? grad_weight : at::Tensor(),
                                 false);
    if (needs_embeddings_grad) grad_embeddings.copy_(problem.embeddings_gradient(grad_xhat, row_dot));
  });
  return {grad_embeddings, grad_weight};
}

// Loss reduced over counted rows (sum, or mean) and its gradients, in one call: the training
// step's forward and backward together. The cosines are kept between the two passes when a
// block of rows fits the workspace, else recomputed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_train_cpu(
    const at::Tensor& embeddings_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
    double s, double m1, double m2, double m3, double lambda, int64_t ignore_index,
    bool straight_through, int64_t workspace_bytes, bool mean, bool needs_embeddings_grad,
    bool needs_weight_grad, const c10::optional<at::Tensor>& row_margins_in) {
  const OpInputs inputs = prepare_inputs(embeddings_in, weight_in, labels_in, ignore_index);
  const at::Tensor &embeddings = inputs.embeddings, &weight = inputs.weight, &labels = inputs.labels;
  at::Tensor row_margins_storage;
  const double* row_margins = row_margins_data(row_margins_in, embeddings, row_margins_storage);
  at::AutoDispatchBelowAutograd below_autograd;
  const int64_t n = embeddings.size(0);
  const auto options = embeddings.options().dtype(loss_type(embeddings));
  at::Tensor loss = at::zeros({}, options);
  at::Tensor target_cosine = at::zeros({n}, options);
  at::Tensor grad_embeddings = needs_embeddings_grad ? at::zeros_like(embeddings) : at::empty({0}, embeddings.options());
  at::Tensor grad_weight = !needs_weight_grad ? at::empty({0}, weight.options())
                           : n == 0           ? at::zeros_like(weight)
                                              : at::empty_like(weight);
  if (n == 0) return {loss, target_cosine, grad_embeddings, grad_weight};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MarginSoftmax<scalar_t> problem(embeddings, weight, labels,
                                          make_params(s, m1, m2, m3, lambda, straight_through, row_margins),
                                          ignore_index);
    int64_t counted = 0;
    for (const TargetRow& t : problem.targets) counted += t.counted;
    const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(std::max<int64_t>(counted, 1)) : acc_t(1);
    std::vector<acc_t> lse(n, 0), grad_rows(n, scale), row_dot(n, 0);
    at::Tensor grad_xhat = needs_embeddings_grad ? at::empty({n, problem.dim}, problem.xhat.options()) : at::Tensor();

    const int64_t stored_rows = problem.stored_rows(workspace_bytes);
    const int64_t rows_per_block = stored_rows > 0 ? stored_rows : n;
    const Blocking bl = problem.blocking(rows_per_block, workspace_bytes);
    const at::Tensor store = stored_rows > 0 ? at::empty({rows_per_block * bl.num_blocks * bl.block},
                                                         problem.xhat.options())
                                             : at::Tensor();
    for (int64_t r0 = 0; r0 < n; r0 += rows_per_block) {
      const int64_t rows = std::min(rows_per_block, n - r0);
      acc_t* kept = stored_rows > 0 ? store.data_ptr<acc_t>() : nullptr;
      problem.softmax_statistics(r0, rows, bl, kept, lse.data());
      if (needs_embeddings_grad || needs_weight_grad) {
        problem.accumulate_gradients(r0, rows, bl, kept, grad_rows.data(), lse.data(),
                                     needs_embeddings_grad ? grad_xhat.narrow(0, r0, rows) : at::Tensor(),
                                     row_dot.data() + r0,
                                     needs_weight_grad ? grad_weight : at::Tensor(), r0 > 0);
      }
    }
    if (needs_embeddings_grad) grad_embeddings.copy_(problem.embeddings_gradient(grad_xhat, row_dot));

    acc_t total = 0;
    acc_t* cos_ptr = target_cosine.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      const TargetRow& t = problem.targets[i];
      if (!t.counted) continue;
      total += lse[i] - static_cast<acc_t>(t.margin.logit);
      cos_ptr[i] = static_cast<acc_t>(clamp_cosine(t.cosine));
    }
    loss.fill_(total * scale);
  });
  return {loss, target_cosine, grad_embeddings, grad_weight};
}

// The loss over the counted rows: their sum in double, in row order, over their count with `mean`.
at::Tensor reduce_loss_cpu(const at::Tensor& loss_in, const at::Tensor& labels_in, int64_t ignore_index, bool mean) {
  check_reduce_loss_inputs("reduce_loss", loss_in, /*per_row=*/true, labels_in);
  const at::Tensor loss = loss_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* label = labels.data_ptr<int64_t>();
  double total = 0;
  int64_t counted = 0;
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "reduce_loss_cpu", [&] {
    const scalar_t* value = loss.data_ptr<scalar_t>();
    for (int64_t i = 0; i < loss.size(0); ++i) {
      if (label[i] == ignore_index) continue;
      total += static_cast<double>(value[i]);
      ++counted;
    }
  });
  if (mean) total /= static_cast<double>(std::max<int64_t>(counted, 1));
  return at::full({}, total, loss.options());
}

// reduce_loss's gradient: grad (over the count with `mean`, divided in grad's dtype) at counted rows.
at::Tensor reduce_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& labels_in, int64_t ignore_index,
                                    bool mean) {
  check_reduce_loss_inputs("reduce_loss_backward", grad, /*per_row=*/false, labels_in);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = labels.size(0);
  const int64_t* label = labels.data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t i = 0; i < n; ++i) counted += label[i] != ignore_index;
  at::Tensor grad_rows = at::empty({n}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "reduce_loss_backward_cpu", [&] {
    scalar_t g = grad.item<scalar_t>();
    if (mean) g /= static_cast<scalar_t>(std::max<int64_t>(counted, 1));
    scalar_t* out = grad_rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = label[i] == ignore_index ? scalar_t(0) : g;
  });
  return grad_rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(arcface_ext, CPU, m) {
  m.impl("margin_softmax_forward", &margin_softmax_forward_cpu);
  m.impl("margin_softmax_backward", &margin_softmax_backward_cpu);
  m.impl("margin_softmax_train", &margin_softmax_train_cpu);
  m.impl("reduce_loss", &reduce_loss_cpu);
  m.impl("reduce_loss_backward", &reduce_loss_backward_cpu);
}

}  // namespace arcface_ext
