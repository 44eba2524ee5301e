// Host-side argument checks shared by the CPU and CUDA kernels: they run before any kernel,
// so bad input surfaces as a Python exception that names the argument.
#pragma once

#include <ATen/ATen.h>

namespace arcface_ext {

// The error for labels[row], which is neither ignore_index nor in [0, num_classes) (reads that one
// label: a device sync on CUDA, on the error path only).
inline void raise_bad_label(const at::Tensor& labels, int64_t row, int64_t ignore_index, int64_t num_classes,
                            int64_t weight_classes) {
  TORCH_CHECK_VALUE(false, "arcface_ext: labels[", row, "] = ", labels[row].item<int64_t>(),
                    " is out of range: labels must lie in [0, ", num_classes, ") (",
                    num_classes == weight_classes ? "the number of classes in weight" : "num_classes",
                    ") or equal ignore_index (", ignore_index, ")");
}

// num_classes as the ops take it: -1 means the weight's own classes, after class_offset.
inline int64_t resolved_num_classes(int64_t class_offset, int64_t num_classes, const at::Tensor& weight) {
  return num_classes < 0 ? class_offset + weight.size(0) : num_classes;
}

// `weight` holds classes [class_offset, class_offset + C) of `num_classes` (-1: exactly its own C,
// the unsharded case); labels are indices into all `num_classes`. A row whose label lies outside
// this weight's range is counted without a target column here (its target is in another shard).
inline void check_margin_softmax_inputs(const at::Tensor& embeddings, const at::Tensor& weight,
                                        const at::Tensor& labels, int64_t ignore_index,
                                        int64_t class_offset = 0, int64_t num_classes = -1,
                                        bool check_labels = true) {
  TORCH_CHECK(embeddings.dim() == 2, "arcface_ext: embeddings must be 2-D (N, D), got shape ",
              embeddings.sizes());
  TORCH_CHECK(weight.dim() == 2, "arcface_ext: weight must be 2-D (C, D), got shape ", weight.sizes());
  TORCH_CHECK(labels.dim() == 1, "arcface_ext: labels must be 1-D (N,), got shape ", labels.sizes());
  TORCH_CHECK(embeddings.size(1) == weight.size(1),
              "arcface_ext: embeddings (N, D) and weight (C, D) disagree on D: ", embeddings.sizes(),
              " vs ", weight.sizes());
  TORCH_CHECK(labels.size(0) == embeddings.size(0), "arcface_ext: labels has ", labels.size(0),
              " entries but embeddings has ", embeddings.size(0), " rows");
  TORCH_CHECK(weight.size(0) > 0, "arcface_ext: weight must hold at least one class centre");
  TORCH_CHECK(embeddings.size(1) > 0, "arcface_ext: embeddings and weight have no columns (D = 0): an ",
              "embedding holds at least one value");
  TORCH_CHECK(at::isFloatingType(embeddings.scalar_type()),
              "arcface_ext: embeddings must be floating point, got ", embeddings.scalar_type());
  TORCH_CHECK(embeddings.scalar_type() == weight.scalar_type(),
              "arcface_ext: embeddings and weight must share a dtype, got ", embeddings.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "arcface_ext: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(embeddings.device() == weight.device() && embeddings.device() == labels.device(),
              "arcface_ext: embeddings, weight and labels must be on one device, got ",
              embeddings.device(), ", ", weight.device(), " and ", labels.device());
  TORCH_CHECK_VALUE(class_offset >= 0, "arcface_ext: class_offset must be >= 0, got ", class_offset);
  if (num_classes < 0) {
    TORCH_CHECK_VALUE(num_classes == -1, "arcface_ext: num_classes must be -1 (weight's own C) or >= 1, got ",
                      num_classes);
    num_classes = resolved_num_classes(class_offset, num_classes, weight);
  }
  TORCH_CHECK_VALUE(class_offset + weight.size(0) <= num_classes, "arcface_ext: weight holds classes [",
                    class_offset, ", ", class_offset + weight.size(0), ") but num_classes is ", num_classes);
  if (labels.numel() == 0 || !check_labels) return;
  // A value check: one reduction (a device sync on CUDA), before anything indexes with a label.
  const at::Tensor bad =
      labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(num_classes)));
  if (bad.any().item<bool>()) {
    raise_bad_label(labels, bad.nonzero().select(1, 0)[0].item<int64_t>(), ignore_index, num_classes,
                    weight.size(0));
  }
}

// Per-row margins (AdaFace, ElasticFace): an (N, 2) float64 tensor of (m2_i, m3_i) on the
// embeddings' device, finite (one value check, a device sync on CUDA, unless `check_values` is
// false: inside a CUDA graph capture, where a non-finite margin gives its row a NaN loss and
// gradient instead). Returns its data, contiguous (kept alive in `storage`), or nullptr when none
// is given.
inline const double* row_margins_data(const c10::optional<at::Tensor>& row_margins, const at::Tensor& embeddings,
                                      at::Tensor& storage, bool check_values = true) {
  if (!row_margins.has_value() || !row_margins->defined()) return nullptr;
  const at::Tensor& m = *row_margins;
  const int64_t n = embeddings.size(0);
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == n && m.size(1) == 2,
                    "arcface_ext: row_margins must have shape (N, 2) = (", n, ", 2), got ", m.sizes());
  TORCH_CHECK_VALUE(m.scalar_type() == at::kDouble, "arcface_ext: row_margins must be float64, got ",
                    m.scalar_type());
  TORCH_CHECK_VALUE(m.device() == embeddings.device(), "arcface_ext: row_margins must be on the embeddings' device (",
                    embeddings.device(), "), got ", m.device());
  storage = m.detach().contiguous();
  if (n > 0 && check_values && !storage.isfinite().all().item<bool>()) {
    // Which column, on the error path only (one sync on the common one): m2 is column 0, m3 column 1.
    const bool m2_finite = storage.select(1, 0).isfinite().all().item<bool>();
    TORCH_CHECK_VALUE(false, "arcface_ext: the per-row margin ", m2_finite ? "m3" : "m2",
                      " must be finite (row_margins column ", m2_finite ? 1 : 0, " holds a NaN or an infinity)");
  }
  return storage.data_ptr<double>();
}

// The lazy backward's extra arguments: per-row tensors on the embeddings' device.
// `logsumexp` may be undefined: the backward from the kept gradient block takes none.
inline void check_margin_softmax_backward_inputs(const at::Tensor& grad_loss,
                                                 const at::Tensor& logsumexp,
                                                 const at::Tensor& embeddings) {
  const int64_t n = embeddings.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n,
              "arcface_ext: grad_loss must have shape (N,) = (", n, ",), got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.is_floating_point(), "arcface_ext: grad_loss must be floating-point, got ",
              grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.device() == embeddings.device(), "arcface_ext: grad_loss must be on the embeddings' device (",
              embeddings.device(), "), got ", grad_loss.device());
  if (!logsumexp.defined()) return;
  TORCH_CHECK(logsumexp.dim() == 1 && logsumexp.size(0) == n,
              "arcface_ext: logsumexp must have shape (N,) = (", n, ",), got ", logsumexp.sizes());
  TORCH_CHECK(logsumexp.device() == embeddings.device(),
              "arcface_ext: logsumexp must be on the embeddings' device (", embeddings.device(), "), got ",
              logsumexp.device());
}

// reduce_loss's and reduce_loss_backward's arguments: `values` (per_row: the loss, (N,); else its
// gradient, a scalar) floating point on the labels' device; labels (N,) int64, whose values are only
// compared with ignore_index.
inline void check_reduce_loss_inputs(const char* op, const at::Tensor& values, bool per_row, const at::Tensor& labels) {
  const char* name = per_row ? "loss" : "grad";
  TORCH_CHECK_VALUE(labels.dim() == 1, "arcface_ext: ", op, ": labels must be 1-D (N,), got shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, "arcface_ext: ", op, ": labels must be int64, got ",
                    labels.scalar_type());
  if (per_row) {
    TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == labels.size(0), "arcface_ext: ", op, ": ", name,
                      " must have shape (N,) = (", labels.size(0), ",) as labels, got ", values.sizes());
  } else {
    TORCH_CHECK_VALUE(values.dim() == 0, "arcface_ext: ", op, ": ", name, " must be a scalar, got shape ",
                      values.sizes());
  }
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, "arcface_ext: ", op,
                    ": ", name, " must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.device() == labels.device(), "arcface_ext: ", op, ": ", name,
                    " and labels must be on one device, got ", values.device(), " and ", labels.device());
}

}  // namespace arcface_ext
