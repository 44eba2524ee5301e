// CPU kernel of the fused margin softmax: normalised cosine, combined margin, softmax
// cross-entropy and its gradient, walked over blocks of classes so that the N x C logits are
// never held. Each thread owns a contiguous run of class blocks; per block it computes the raw
// dot products x̂·w_jᵀ with one small GEMM (kept in cache), turns them into logits and softmax
// statistics in place, and in the backward recomputes them and feeds the gradient block
// straight into the two gradient GEMMs. Class centres are never normalised as a copy: their
// inverse norms scale the GEMM's columns (a rank-1 scaling) in the epilogue.
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
#include <cstdlib>
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

// ---- per-row epilogues ------------------------------------------------------------------

// Turns a row of raw dot products x̂·w_j into logits s * clamp(x̂·ŵ_j) in place; returns the max.
template <typename acc_t>
ARCFACE_VECTOR_CLONES acc_t logits_row(acc_t* row, const acc_t* inv_norm_w, int64_t width, acc_t s) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t j = 0; j < width; ++j) {
    const acc_t z = s * std::min(std::max(row[j] * inv_norm_w[j], acc_t(-1)), acc_t(1));
    row[j] = z;
    row_max = row_max > z ? row_max : z;
  }
  return row_max;
}

template <typename acc_t>
ARCFACE_VECTOR_CLONES acc_t sum_exp_row(const acc_t* row, int64_t width, acc_t shift) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < width; ++j) sum += exp_nonpositive(row[j] - shift);
  return sum;
}

// Replaces a row of raw dot products by the gradient w.r.t. them scaled by 1/‖w_j‖ (the GEMMs
// then multiply by the raw w_j), accumulating Σ_j g_j·cos_j per row and per column, which the
// normalisations' own gradients need. g_j = d loss / d cos_j = grad_row * s * softmax_j (zero
// where the cosine was clamped).
template <typename acc_t>
ARCFACE_VECTOR_CLONES acc_t gradient_row(acc_t* row, const acc_t* inv_norm_w, acc_t* column_dot,
                                         int64_t width, acc_t s, acc_t logsumexp, acc_t grad_s) {
  acc_t row_dot = 0;
#pragma omp simd reduction(+ : row_dot)
  for (int64_t j = 0; j < width; ++j) {
    const acc_t cosine = row[j] * inv_norm_w[j];
    const acc_t clamped = std::min(std::max(cosine, acc_t(-1)), acc_t(1));
    const acc_t inside = (cosine >= acc_t(-1) && cosine <= acc_t(1)) ? acc_t(1) : acc_t(0);
    const acc_t g = inside * grad_s * exp_nonpositive(s * clamped - logsumexp);
    row_dot += g * cosine;
    column_dot[j] += g * cosine;
    row[j] = g * inv_norm_w[j];
  }
  return row_dot;
}

// 1 / max(‖w_j‖, eps) for a block of class centres, and whether the norm was clamped.
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

// ---- shared set-up -------------------------------------------------------------------

struct TargetRow {
  bool counted = false;  // label != ignore_index
  int64_t label = 0;
  double cosine = 0;  // x̂·ŵ_y before clamping
  TargetMargin margin{0, 0};
};

// The target column of every row, from a direct dot product in double (N·D work).
template <typename scalar_t, typename acc_t>
std::vector<TargetRow> target_rows(const acc_t* xhat, const scalar_t* w, const int64_t* labels,
                                   int64_t n, int64_t dim, int64_t ignore_index,
                                   const MarginParams& params) {
  std::vector<TargetRow> rows(n);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      TargetRow& t = rows[i];
      t.counted = labels[i] != ignore_index;
      if (!t.counted) continue;
      t.label = labels[i];
      const scalar_t* wy = w + t.label * dim;
      const acc_t* xi = xhat + i * dim;
      double dot = 0, sq = 0;
      for (int64_t k = 0; k < dim; ++k) {
        const double wk = static_cast<double>(wy[k]);
        dot += static_cast<double>(xi[k]) * wk;
        sq += wk * wk;
      }
      t.cosine = dot / std::max(std::sqrt(sq), kNormEps);
      t.margin = target_margin(clamp_cosine(t.cosine), params);
    }
  });
  return rows;
}

struct Blocking {
  int64_t block;  // classes per block
  int64_t num_blocks;
  int64_t num_chunks;  // contiguous runs of blocks, one per thread

  int64_t chunk_begin(int64_t chunk) const { return num_blocks * chunk / num_chunks; }
};

// Picks the class block so that the per-thread buffers stay in cache and, together, within the
// workspace limit. The block never depends on the data, only on shapes and the thread count.
Blocking choose_blocking(int64_t n, int64_t c, int64_t dim, int64_t acc_size, bool converts_weight,
                         int64_t workspace_bytes) {
  static const int64_t kCacheBytes = std::getenv("ARCFACE_TUNE_CACHE") ? std::atoll(std::getenv("ARCFACE_TUNE_CACHE")) : 512 * 1024;
  constexpr int64_t kMinBlock = 16;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = std::max<int64_t>(n, 1);
  const int64_t per_class = acc_size * (rows + (converts_weight ? 2 * dim : 0) + 3);
  const int64_t fixed = acc_size * rows * dim;  // each thread's share of the embedding gradient
  const int64_t by_workspace = (workspace_bytes / threads - fixed) / per_class;
  int64_t block = std::min(kCacheBytes / (acc_size * rows), by_workspace);
  block = std::max(kMinBlock, block / kMinBlock * kMinBlock);
  block = std::min(block, c);
  Blocking b;
  b.block = block;
  b.num_blocks = (c + block - 1) / block;
  b.num_chunks = std::min(threads, b.num_blocks);
  return b;
}

MarginParams make_params(double s, double m1, double m2, double m3, double lambda, bool straight) {
  return MarginParams{s, m1, m2, m3, lambda, straight};
}

// The block's class centres in the accumulation type: a view when no conversion is needed.
template <typename scalar_t, typename acc_t>
at::Tensor weight_block(const at::Tensor& weight, int64_t c0, int64_t width, at::Tensor& convert_buf) {
  at::Tensor block = weight.narrow(0, c0, width);
  if (std::is_same<scalar_t, acc_t>::value) return block;
  at::Tensor out = convert_buf.narrow(0, 0, width);
  out.copy_(block);
  return out;
}

// ---- forward --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_cpu(
    const at::Tensor& embeddings_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
    double s, double m1, double m2, double m3, double lambda, int64_t ignore_index,
    bool straight_through, int64_t workspace_bytes) {
  check_margin_softmax_inputs(embeddings_in, weight_in, labels_in, ignore_index);
  at::AutoDispatchBelowAutograd below_autograd;
  // Detached: the parallel workers do not inherit this thread's dispatch guard.
  const at::Tensor embeddings = embeddings_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = embeddings.size(0), dim = embeddings.size(1), c = weight.size(0);
  const MarginParams params = make_params(s, m1, m2, m3, lambda, straight_through);

  const auto out_type = embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::zeros({n}, embeddings.options().dtype(out_type));
  at::Tensor logsumexp = at::zeros({n}, embeddings.options().dtype(out_type));
  at::Tensor target_cosine = at::zeros({n}, embeddings.options().dtype(out_type));
  if (n == 0) return {loss, logsumexp, target_cosine};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor x = embeddings.to(acc_type);
    const at::Tensor xhat =
        (x / at::linalg_vector_norm(x, 2, {1}, true).clamp_min(kNormEps)).contiguous();
    const int64_t* label_ptr = labels.data_ptr<int64_t>();
    const std::vector<TargetRow> targets = target_rows<scalar_t, acc_t>(
        xhat.data_ptr<acc_t>(), weight.data_ptr<scalar_t>(), label_ptr, n, dim, ignore_index, params);

    const bool converts = !std::is_same<scalar_t, acc_t>::value;
    const Blocking blocking =
        choose_blocking(n, c, dim, sizeof(acc_t), converts, workspace_bytes);
    // Running softmax statistics (max, sum of exp) per chunk and row, merged in chunk order
    // below, so the result does not depend on thread timing.
    std::vector<acc_t> chunk_max(blocking.num_chunks * n, -std::numeric_limits<acc_t>::infinity());
    std::vector<acc_t> chunk_sum(blocking.num_chunks * n, 0);

    at::parallel_for(0, blocking.num_chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) {
      at::Tensor dots = at::empty({n * blocking.block}, xhat.options());
      at::Tensor convert_buf =
          converts ? at::empty({blocking.block, dim}, xhat.options()) : at::Tensor();
      std::vector<acc_t> inv_norm(blocking.block);
      std::vector<uint8_t> unclamped(blocking.block);
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        acc_t* run_max = chunk_max.data() + chunk * n;
        acc_t* run_sum = chunk_sum.data() + chunk * n;
        for (int64_t b = blocking.chunk_begin(chunk); b < blocking.chunk_begin(chunk + 1); ++b) {
          const int64_t c0 = b * blocking.block;
          const int64_t width = std::min(blocking.block, c - c0);
          const at::Tensor wb = weight_block<scalar_t, acc_t>(weight, c0, width, convert_buf);
          inverse_norms(wb.data_ptr<acc_t>(), width, dim, inv_norm.data(), unclamped.data());
          at::Tensor block = dots.narrow(0, 0, n * width).view({n, width});
          at::mm_out(block, xhat, wb.t());
          acc_t* base = block.data_ptr<acc_t>();
          for (int64_t i = 0; i < n; ++i) {
            const TargetRow& t = targets[i];
            if (!t.counted) continue;
            acc_t* row = base + i * width;
            acc_t row_max = logits_row(row, inv_norm.data(), width, acc_t(s));
            const int64_t local = t.label - c0;
            if (local >= 0 && local < width) {
              // The target's logit carries the margin; recompute the row max without the
              // plain cosine's logit, which the margin has replaced.
              row[local] = static_cast<acc_t>(t.margin.logit);
              row_max = *std::max_element(row, row + width);
            }
            const acc_t row_sum = sum_exp_row(row, width, row_max);
            const acc_t new_max = std::max(run_max[i], row_max);
            run_sum[i] = run_sum[i] * std::exp(run_max[i] - new_max) +
                         row_sum * std::exp(row_max - new_max);
            run_max[i] = new_max;
          }
        }
      }
    });

    auto* loss_ptr = loss.data_ptr<acc_t>();
    auto* lse_ptr = logsumexp.data_ptr<acc_t>();
    auto* cos_ptr = target_cosine.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      const TargetRow& t = targets[i];
      if (!t.counted) continue;
      acc_t total_max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t k = 0; k < blocking.num_chunks; ++k) total_max = std::max(total_max, chunk_max[k * n + i]);
      acc_t total_sum = 0;
      for (int64_t k = 0; k < blocking.num_chunks; ++k)
        total_sum += chunk_sum[k * n + i] * std::exp(chunk_max[k * n + i] - total_max);
      lse_ptr[i] = total_max + std::log(total_sum);
      loss_ptr[i] = lse_ptr[i] - static_cast<acc_t>(t.margin.logit);
      cos_ptr[i] = static_cast<acc_t>(clamp_cosine(t.cosine));
    }
  });
  return {loss, logsumexp, target_cosine};
}

// ---- backward -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> margin_softmax_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& embeddings_in, const at::Tensor& weight_in,
    const at::Tensor& labels_in, const at::Tensor& logsumexp_in, double s, double m1, double m2,
    double m3, double lambda, int64_t ignore_index, bool straight_through, int64_t workspace_bytes,
    bool needs_embeddings_grad, bool needs_weight_grad) {
  check_margin_softmax_inputs(embeddings_in, weight_in, labels_in, ignore_index);
  const int64_t n = embeddings_in.size(0), dim = embeddings_in.size(1), c = weight_in.size(0);
  TORCH_CHECK(grad_loss_in.dim() == 1 && grad_loss_in.size(0) == n,
              "arcface_ext: grad_loss must have shape (N,) = (", n, ",), got ", grad_loss_in.sizes());
  TORCH_CHECK(logsumexp_in.dim() == 1 && logsumexp_in.size(0) == n,
              "arcface_ext: logsumexp must have shape (N,) = (", n, ",), got ", logsumexp_in.sizes());
  at::AutoDispatchBelowAutograd below_autograd;
  // Detached: the parallel workers do not inherit this thread's dispatch guard.
  const at::Tensor embeddings = embeddings_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const MarginParams params = make_params(s, m1, m2, m3, lambda, straight_through);

  at::Tensor grad_embeddings = needs_embeddings_grad ? at::zeros_like(embeddings) : at::empty({0}, embeddings.options());
  at::Tensor grad_weight = needs_weight_grad ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (n == 0) {
    if (needs_weight_grad) grad_weight.zero_();
    return {grad_embeddings, grad_weight};
  }
  if (!needs_embeddings_grad && !needs_weight_grad) return {grad_embeddings, grad_weight};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                  "margin_softmax_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor x = embeddings.to(acc_type);
    const at::Tensor norm_x = at::linalg_vector_norm(x, 2, {1}, true);
    const at::Tensor inv_norm_x = norm_x.clamp_min(kNormEps).reciprocal();
    const at::Tensor xhat = (x * inv_norm_x).contiguous();
    const at::Tensor grad_rows = grad_loss_in.detach().to(acc_type).contiguous();
    const at::Tensor lse = logsumexp_in.detach().to(acc_type).contiguous();
    const int64_t* label_ptr = labels.data_ptr<int64_t>();
    const acc_t* grad_ptr = grad_rows.data_ptr<acc_t>();
    const acc_t* lse_ptr = lse.data_ptr<acc_t>();
    const std::vector<TargetRow> targets = target_rows<scalar_t, acc_t>(
        xhat.data_ptr<acc_t>(), weight.data_ptr<scalar_t>(), label_ptr, n, dim, ignore_index, params);

    const bool converts = !std::is_same<scalar_t, acc_t>::value;
    const Blocking blocking =
        choose_blocking(n, c, dim, sizeof(acc_t), converts, workspace_bytes);
    // Each chunk accumulates its own share of d loss / d x̂ (and of Σ_j g_j cos_j), summed in
    // chunk order afterwards so the result does not depend on thread timing.
    at::Tensor chunk_grad_xhat =
        needs_embeddings_grad ? at::zeros({blocking.num_chunks, n, dim}, xhat.options()) : at::Tensor();
    std::vector<acc_t> chunk_row_dot(blocking.num_chunks * n, 0);

    at::parallel_for(0, blocking.num_chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) {
      at::Tensor dots = at::empty({n * blocking.block}, xhat.options());
      at::Tensor convert_buf =
          converts ? at::empty({blocking.block, dim}, xhat.options()) : at::Tensor();
      at::Tensor grad_w_buf = converts && needs_weight_grad
                                  ? at::empty({blocking.block, dim}, xhat.options())
                                  : at::Tensor();
      std::vector<acc_t> inv_norm(blocking.block);
      std::vector<uint8_t> unclamped(blocking.block);
      std::vector<acc_t> column_dot(blocking.block);
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        acc_t* row_dot = chunk_row_dot.data() + chunk * n;
        for (int64_t b = blocking.chunk_begin(chunk); b < blocking.chunk_begin(chunk + 1); ++b) {
          const int64_t c0 = b * blocking.block;
          const int64_t width = std::min(blocking.block, c - c0);
          const at::Tensor wb = weight_block<scalar_t, acc_t>(weight, c0, width, convert_buf);
          const acc_t* w_ptr = wb.data_ptr<acc_t>();
          inverse_norms(w_ptr, width, dim, inv_norm.data(), unclamped.data());
          std::fill(column_dot.begin(), column_dot.begin() + width, acc_t(0));
          at::Tensor block = dots.narrow(0, 0, n * width).view({n, width});
          at::mm_out(block, xhat, wb.t());
          acc_t* base = block.data_ptr<acc_t>();
          for (int64_t i = 0; i < n; ++i) {
            acc_t* row = base + i * width;
            const TargetRow& t = targets[i];
            const acc_t grad_s = grad_ptr[i] * acc_t(s);
            if (!t.counted || grad_ptr[i] == acc_t(0)) {
              std::fill(row, row + width, acc_t(0));
              continue;
            }
            const int64_t local = t.label - c0;
            const bool has_target = local >= 0 && local < width;
            // Park the target column outside [-1, 1] so the plain-cosine pass gives it g = 0;
            // its gradient, which goes through the margin, is written afterwards.
            if (has_target) row[local] = acc_t(2) / inv_norm[local];
            row_dot[i] += gradient_row(row, inv_norm.data(), column_dot.data(), width, acc_t(s),
                                       lse_ptr[i], grad_s);
            if (has_target) {
              const double inside = (t.cosine >= -1.0 && t.cosine <= 1.0) ? 1.0 : 0.0;
              const double p = std::exp(t.margin.logit - static_cast<double>(lse_ptr[i]));
              const double g = inside * static_cast<double>(grad_ptr[i]) * (p - 1.0) * t.margin.dlogit_dc;
              row_dot[i] += static_cast<acc_t>(g * t.cosine);
              column_dot[local] += static_cast<acc_t>(g * t.cosine);
              row[local] = static_cast<acc_t>(g) * inv_norm[local];
            }
          }
          if (needs_weight_grad) {
            // d loss / d w_j = (1/‖w_j‖) (Σ_i g_ij x̂_i - (Σ_i g_ij cos_ij) ŵ_j)
            at::Tensor gw = converts ? grad_w_buf.narrow(0, 0, width)
                                     : grad_weight.narrow(0, c0, width);
            at::mm_out(gw, block.t(), xhat);
            acc_t* gw_ptr = gw.data_ptr<acc_t>();
            for (int64_t j = 0; j < width; ++j) {
              if (!unclamped[j]) continue;
              const acc_t coef = column_dot[j] * inv_norm[j] * inv_norm[j];
              acc_t* gj = gw_ptr + j * dim;
              const acc_t* wj = w_ptr + j * dim;
              for (int64_t k = 0; k < dim; ++k) gj[k] -= coef * wj[k];
            }
            if (converts) grad_weight.narrow(0, c0, width).copy_(gw);
          }
          if (needs_embeddings_grad) chunk_grad_xhat[chunk].addmm_(block, wb);
        }
      }
    });

    if (needs_embeddings_grad) {
      // d loss / d x_i = (1/‖x_i‖) (Σ_j g_ij ŵ_j - (Σ_j g_ij cos_ij) x̂_i)
      at::Tensor grad_xhat = chunk_grad_xhat[0];
      for (int64_t k = 1; k < blocking.num_chunks; ++k) grad_xhat.add_(chunk_grad_xhat[k]);
      std::vector<acc_t> row_dot(n, 0);
      for (int64_t k = 0; k < blocking.num_chunks; ++k)
        for (int64_t i = 0; i < n; ++i) row_dot[i] += chunk_row_dot[k * n + i];
      const acc_t* xhat_ptr = xhat.data_ptr<acc_t>();
      const acc_t* norm_ptr = norm_x.data_ptr<acc_t>();
      acc_t* gx = grad_xhat.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) {
        if (norm_ptr[i] < acc_t(kNormEps)) continue;
        for (int64_t k = 0; k < dim; ++k) gx[i * dim + k] -= row_dot[i] * xhat_ptr[i * dim + k];
      }
      grad_embeddings.copy_(grad_xhat * inv_norm_x);
    }
  });
  return {grad_embeddings, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(arcface_ext, CPU, m) {
  m.impl("margin_softmax_forward", &margin_softmax_forward_cpu);
  m.impl("margin_softmax_backward", &margin_softmax_backward_cpu);
}

}  // namespace arcface_ext
