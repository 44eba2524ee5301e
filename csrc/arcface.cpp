// Declares the arcface_ext operators once; csrc/cpu and csrc/cuda register their kernels.
//
// The module `arcface_ext._C` carries no Python functions: importing it runs the static
// registrations below and in the per-device kernel files.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module so that `import arcface_ext._C` loads this library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(arcface_ext, m) {
  // `row_margins`, when given, is an (N, 2) float64 tensor of per-row (m2, m3) that replaces the
  // scalars m2 and m3 (AdaFace's and ElasticFace's per-sample margins); it gets no gradient.
  // Per-row loss, the row's log-sum-exp (saved for backward) and the clamped target cosine, each 0
  // at ignored rows (the Python layer marks those cosines NaN). Never materialises the N x C logits.
  // A shard of the classes: `weight` holds classes [class_offset, class_offset + C) of
  // `num_classes` (-1: just its own C) and labels index all of them. A row whose target lies in
  // another shard is counted without a target column: its loss is then the shard's log-sum-exp
  // (target logit 0) and its target cosine 0, and the caller combines the shards' statistics.
  // check_labels=False skips the CUDA op's check of the labels' values and of the per-row margins'
  // finiteness, each a device sync: a row with an out-of-range label then gets a NaN loss and no
  // gradient, and a non-finite margin a NaN loss and gradient (as inside a CUDA graph capture, where
  // no check can read its answer back). The CPU op checks either way: there it costs no sync.
  m.def(
      "margin_softmax_forward(Tensor embeddings, Tensor weight, Tensor labels, float s, float m1, "
      "float m2, float m3, float lambda_, int ignore_index, bool straight_through, "
      "int workspace_bytes, int class_offset=0, int num_classes=-1, Tensor? row_margins=None, "
      "bool check_labels=True) -> (Tensor loss, Tensor logsumexp, Tensor target_cosine)");
  // Gradients of sum_i grad_loss[i] * loss[i]; a gradient that is not needed comes back empty.
  // `logsumexp` may be a combination over shards (the whole softmax's): the shard's gradients
  // are then its part of the whole loss's. check_labels=False skips the labels' value check (a
  // device sync on CUDA): the autograd formula passes it, the forward having checked the same
  // labels (saved for backward, so version-checked). Out-of-range labels then get no gradient.
  // (Inside a CUDA graph capture the CUDA ops cannot read a check's answer back: they skip it, and
  // a row with an out-of-range label gets a NaN loss and no gradient.)
  m.def(
      "margin_softmax_backward(Tensor grad_loss, Tensor embeddings, Tensor weight, Tensor labels, "
      "Tensor logsumexp, float s, float m1, float m2, float m3, float lambda_, int ignore_index, "
      "bool straight_through, int workspace_bytes, bool needs_embeddings_grad, "
      "bool needs_weight_grad, int class_offset=0, int num_classes=-1, Tensor? row_margins=None, "
      "bool check_labels=True) -> (Tensor grad_embeddings, Tensor grad_weight)");
  // A bf16 training step's forward and backward through the kept gradient block (csrc/kept_block.h):
  // the forward also returns, as one uint8 tensor, what the backward's GEMMs start from, so that
  // the backward recomputes no cosine. CUDA only; the Autograd formula of margin_softmax_forward
  // takes this pair where the block fits the workspace (the whole softmax, no class shard).
  m.def(
      "margin_softmax_forward_kept(Tensor embeddings, Tensor weight, Tensor labels, float s, float m1, "
      "float m2, float m3, float lambda_, int ignore_index, bool straight_through, int workspace_bytes, "
      "Tensor? row_margins=None, bool check_labels=True) -> "
      "(Tensor loss, Tensor logsumexp, Tensor target_cosine, Tensor kept)");
  m.def(
      "margin_softmax_backward_kept(Tensor grad_loss, Tensor embeddings, Tensor weight, Tensor labels, "
      "Tensor kept, float s, float m1, float m2, float m3, float lambda_, int ignore_index, "
      "bool straight_through, bool needs_embeddings_grad, bool needs_weight_grad, "
      "Tensor? row_margins=None) -> (Tensor grad_embeddings, Tensor grad_weight)");
  // The training step in one call: the loss summed (or, with mean, averaged) over counted rows,
  // the target cosines, and the loss's gradients, computed in the same pass (the backward only
  // scales them). Keeps the cosines between its two passes when they fit the workspace.
  m.def(
      "margin_softmax_train(Tensor embeddings, Tensor weight, Tensor labels, float s, float m1, "
      "float m2, float m3, float lambda_, int ignore_index, bool straight_through, "
      "int workspace_bytes, bool mean, bool needs_embeddings_grad, bool needs_weight_grad, "
      "Tensor? row_margins=None) -> "
      "(Tensor loss, Tensor target_cosine, Tensor grad_embeddings, Tensor grad_weight)");
  // The loss over the rows whose label is not ignore_index: their sum, or with `mean` their sum over
  // their count (at least 1), summed in double. A training step's reduction in one kernel, where
  // ATen's `(labels != ignore_index).sum().clamp_min(1)` and `loss.sum() / count` took five (and two
  // more in the backward).
  m.def("reduce_loss(Tensor loss, Tensor labels, int ignore_index, bool mean) -> Tensor");
  // Its gradient: (N,) of grad at counted rows (grad / count with `mean`), 0 at ignored rows.
  m.def("reduce_loss_backward(Tensor grad, Tensor labels, int ignore_index, bool mean) -> Tensor");
  // A diagnostic (CUDA, sm_90a builds on compute capability 9.0 only): one 128 x 128 tile of x·wᵀ on
  // the fused kernels' wgmma tile, variant `tile` ("64" or "32": streaming slices of that depth;
  // "resident": the x tile resident), returned as each thread's accumulator registers and class-norm
  // sum, (256, 65) float32. benchmarks/wgmma_probe.py reads it.
  m.def("wgmma_tile_probe(Tensor x, Tensor w, str tile) -> Tensor");
  // The same for the backward's class-outer tile (fused_weight_gradient_wgmma_kernel): S = w·xᵀ (x and w
  // at most 64 rows) and P = g·x (g 64 x 64), bf16, as (256, 144) float32: each thread's 16 registers of
  // S, then its 128 of P.
  m.def("wgmma_weight_tile_probe(Tensor x, Tensor w, Tensor g) -> Tensor");
}
