// The forward's kept gradient block: what margin_softmax_forward_kept hands to
// margin_softmax_backward_kept, so that the backward's GEMMs start from it instead of recomputing
// the cosines (bf16 training steps on CUDA whose N x C block fits the workspace; C around 100k at
// N = 512: MS1MV2's 85,742 classes).
//
// The block holds, for every row i and class j, H_ij = G_ij / f_i, where G is the backward's
// gradient block (d loss_i / d cos_ij / grad_loss_i / ‖w_j‖) and f_i a per-row factor. The forward
// cannot write G itself, which needs the row's log-sum-exp before any of its logits is stored;
// it writes s·exp(l_ij - S_i)/‖w_j‖ under a fixed per-row shift S_i instead, and
// f_i = exp(S_i - lse_i) (see margin_softmax_kernel.cu, "kept block"). Rows whose logits do not fit
// the fixed shift are written as G itself, with f_i = 1 ("recomputed" rows).
//
// One uint8 tensor, in this order (the fake kernel in arcface_ext/ops.py repeats the sizes):
//   H          N x pitch bf16, pitch = C rounded up to a multiple of 8 (16-byte rows)
//   factor     N floats
//   inv_norm   C floats, 1 / max(‖w_j‖, eps) as the forward's tiles computed it
//   recompute  N bytes, 1 where the row holds G itself
//   unclamped  C bytes, ‖w_j‖ >= eps
#pragma once

#include <cstdint>

namespace arcface_ext {

// The most classes a kept block takes: the CUDA recompute pass launches a block per 128 classes
// in grid.y, at most 65535 of them (8.4M classes; the block then fits the default workspace for a
// handful of rows only).
constexpr int64_t kMaxKeptClasses = int64_t{65535} * 128;

// What the workspace must hold beyond the block, per row: the fused forward's per-segment softmax
// statistics (8 bytes a row a segment) come out of what the block leaves, and 1,024 segments keep
// its grid wide (at N = 512 on 132 SMs its blocks walk the four row tiles of one class tile each: a
// segment a class tile, up to 131,072 classes). A block that left less would collapse the forward
// onto a few blocks.
constexpr int64_t kKeptRowReserve = 8 * 1024;

struct KeptLayout {
  int64_t pitch;
  int64_t factor_offset;
  int64_t inv_norm_offset;
  int64_t recompute_offset;
  int64_t unclamped_offset;
  int64_t bytes;
};

inline KeptLayout kept_layout(int64_t n, int64_t c) {
  KeptLayout layout;
  layout.pitch = (c + 7) / 8 * 8;
  layout.factor_offset = n * layout.pitch * 2;
  layout.inv_norm_offset = layout.factor_offset + n * 4;
  layout.recompute_offset = layout.inv_norm_offset + c * 4;
  layout.unclamped_offset = layout.recompute_offset + n;
  layout.bytes = layout.unclamped_offset + c;
  return layout;
}

}  // namespace arcface_ext
