// The autograd formula of arcface_ext::margin_softmax_forward, for every device: the backward is
// the margin_softmax_backward op, plus the per-row margins' gradient when they require one.
//
// It lives in C++ (registered for the Autograd key, as torchvision's ops do) rather than in
// torch.library.register_autograd: the Python formula cost ~110 µs of host time a training step on
// the CI machine, a third of the step at small shapes (benchmarks/NOTES.md, "Session 9").
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "kept_block.h"

namespace arcface_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// dψ/dm2 at the clamped target cosines, branch by branch as margin.h's ψ (and reference.py's
// margin_psi_dm2): ArcFace's branch holds ψ at 1 below θ + m2 = 0 and continues it linearly past
// π; the general branch is (-1)^k cos(m1θ + m2) - 2k.
at::Tensor margin_psi_dm2(const at::Tensor& cosine, double m1, const at::Tensor& m2, double lambda) {
  const at::Tensor theta = at::acos(cosine);
  at::Tensor dm2;
  if (m1 == 1.0) {
    const at::Tensor angle = theta + m2;
    dm2 = at::where(angle <= M_PI, -at::sin(angle), -(at::sin(m2) + m2 * at::cos(m2)));
    dm2 = at::where(angle < 0, at::zeros_like(dm2), dm2);
  } else {
    const at::Tensor t = m1 * theta + m2;
    const at::Tensor odd = at::remainder(at::floor(t / M_PI), 2) != 0;
    dm2 = at::where(odd, at::sin(t), -at::sin(t));
  }
  return lambda > 0 ? dm2 / (1 + lambda) : dm2;
}

// d(Σ grad_loss·loss)/d row_margins, (N, 2): loss_i = lse_i - s(ψ_i - m3_i) and the target's
// softmax probability is exp(-loss_i), so d loss_i/d m3_i = s(1 - p_i) and
// d loss_i/d m2_i = -s(1 - p_i)·dψ/dm2. Ignored rows get 0.
at::Tensor row_margins_grad(const at::Tensor& grad_loss, const at::Tensor& loss, const at::Tensor& target_cosine,
                            const at::Tensor& labels, const at::Tensor& row_margins, double s, double m1,
                            double lambda, int64_t ignore_index, int64_t num_classes) {
  // Rows that count for nothing: ignored ones, and those whose label is out of range, which the
  // forward was told not to check (check_labels=False: a NaN loss and target cosine, no gradient).
  const at::Tensor ignored = (labels == ignore_index) | (labels < 0) | (labels >= num_classes);
  const at::Tensor cosine = target_cosine.to(at::kDouble).masked_fill(ignored, 0);
  const at::Tensor weight =
      (grad_loss.to(at::kDouble) * s * (1 - at::exp(-loss.to(at::kDouble)))).masked_fill(ignored, 0);
  const at::Tensor dm2 = margin_psi_dm2(cosine, m1, row_margins.select(1, 0), lambda);
  return at::stack({-weight * dm2, weight}, 1);
}

// The backward formulas run their ops without a graph: create_graph=True would silently get none.
void check_no_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "arcface_ext.combined_margin_loss does not support double backward (create_graph=True): "
              "its gradients are computed without a graph");
}

using KeptForwardOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Whether a call's forward keeps the gradient block for its backward (kept_block.h): a bf16
// training step over the whole softmax (no class shard) whose block fits the workspace, on a
// device with a kernel for the kept ops (CUDA; the CPU emulator of the CUDA source in the tests),
// unless the environment says ARCFACE_EXT_KEEP_BLOCK=0 (read at every call, for measuring).
bool keep_gradient_block(const at::Tensor& embeddings, const at::Tensor& weight, int64_t workspace_bytes,
                         int64_t class_offset, int64_t num_classes) {
  if (!at::GradMode::is_enabled() || !(embeddings.requires_grad() || weight.requires_grad())) return false;
  if (embeddings.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16) return false;
  if (embeddings.dim() != 2 || weight.dim() != 2 || embeddings.size(0) == 0) return false;  // (the op raises)
  if (class_offset != 0 || (num_classes != -1 && num_classes != weight.size(0))) return false;
  const int64_t n = embeddings.size(0);
  if (kept_layout(n, weight.size(0)).bytes + n * kKeptRowReserve > workspace_bytes) return false;
  if (weight.size(0) > kMaxKeptClasses) return false;  // the step recomputes instead
  const char* setting = std::getenv("ARCFACE_EXT_KEEP_BLOCK");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
  const c10::DispatchKey key = embeddings.is_cuda()  ? c10::DispatchKey::CUDA
                               : embeddings.is_cpu() ? c10::DispatchKey::CPU
                                                     : c10::DispatchKey::Undefined;
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("arcface_ext::margin_softmax_forward_kept", "");
  return key != c10::DispatchKey::Undefined && op.hasKernelForDispatchKey(key);
}

class MarginSoftmax : public torch::autograd::Function<MarginSoftmax> {
 public:
  // forward's arguments: the op's, in its schema's order, then `keep` (keep_gradient_block's
  // answer) and `statistics` (the backward returns one gradient each, undefined for all but
  // embeddings, weight and row_margins).
  static constexpr size_t kNumInputs = 17;
  static constexpr size_t kRowMargins = 13;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& embeddings, const at::Tensor& weight,
                               const at::Tensor& labels, double s, double m1, double m2, double m3,
                               double lambda, int64_t ignore_index, bool straight_through,
                               int64_t workspace_bytes, int64_t class_offset, int64_t num_classes,
                               const std::optional<at::Tensor>& row_margins, bool check_labels, bool keep,
                               std::pair<at::Tensor, at::Tensor>* statistics) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("arcface_ext::margin_softmax_forward", "")
                               .typed<ForwardOutput(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                    double, double, double, double, int64_t, bool, int64_t,
                                                    int64_t, int64_t, const std::optional<at::Tensor>&, bool)>();
    static const auto kept_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("arcface_ext::margin_softmax_forward_kept", "")
            .typed<KeptForwardOutput(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                                     double, double, int64_t, bool, int64_t, const std::optional<at::Tensor>&,
                                     bool)>();
    at::Tensor loss, logsumexp, target_cosine, kept;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (keep) {
        std::tie(loss, logsumexp, target_cosine, kept) =
            kept_op.call(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                         workspace_bytes, row_margins, check_labels);
      } else {
        std::tie(loss, logsumexp, target_cosine) =
            op.call(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                    workspace_bytes, class_offset, num_classes, row_margins, check_labels);
      }
    }
    // Differentiable per-row margins (MagFace's) take their gradient from each row's loss and
    // target cosine, which the forward returned.
    // Saved: embeddings, weight, labels, logsumexp, the kept block (undefined when not kept),
    // then row_margins when given, then loss and target_cosine when row_margins need a gradient
    // (the backward reads which from the count).
    const bool margins_grad = row_margins.has_value() && row_margins->requires_grad();
    variable_list saved = {embeddings, weight, labels, logsumexp, kept};
    if (row_margins.has_value()) saved.push_back(*row_margins);
    if (margins_grad) saved.insert(saved.end(), {loss, target_cosine});
    ctx->save_for_backward(saved);
    ctx->saved_data["s"] = s;
    ctx->saved_data["m1"] = m1;
    ctx->saved_data["m2"] = m2;
    ctx->saved_data["m3"] = m3;
    ctx->saved_data["lambda"] = lambda;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["straight_through"] = straight_through;
    ctx->saved_data["workspace_bytes"] = workspace_bytes;
    ctx->saved_data["class_offset"] = class_offset;
    ctx->saved_data["num_classes"] = num_classes;
    // The log-sum-exp and the target cosine leave through `statistics`, not as the Function's
    // outputs: outside its graph, they are not differentiable (what mark_non_differentiable says,
    // which compiled autograd does not support in a C++ Function).
    *statistics = {logsumexp, target_cosine};
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_no_double_backward();
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("arcface_ext::margin_softmax_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                double, double, double, double, double, int64_t, bool, int64_t, bool, bool, int64_t, int64_t,
                const std::optional<at::Tensor>&, bool)>();
    static const auto kept_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("arcface_ext::margin_softmax_backward_kept", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, double, double, double,
                                                      double, double, int64_t, bool, bool, bool,
                                                      const std::optional<at::Tensor>&)>();
    variable_list grads(kNumInputs);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const bool has_row_margins = saved.size() > 5;
    const bool margins_grad = saved.size() > 6;
    const at::Tensor& kept = saved[4];
    // The edges are the tensor inputs': embeddings, weight, labels, row_margins (when given).
    const bool needs_embeddings_grad = ctx->needs_input_grad(0);
    const bool needs_weight_grad = ctx->needs_input_grad(1);
    const bool needs_margins_grad = margins_grad && ctx->needs_input_grad(3);
    const double s = ctx->saved_data["s"].toDouble();
    const double m1 = ctx->saved_data["m1"].toDouble();
    const double lambda = ctx->saved_data["lambda"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t class_offset = ctx->saved_data["class_offset"].toInt();
    const int64_t num_classes = ctx->saved_data["num_classes"].toInt();
    const at::Tensor& labels = saved[2];
    const std::optional<at::Tensor> row_margins =
        has_row_margins ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    TORCH_CHECK(!needs_margins_grad || (class_offset == 0 && num_classes == -1),
                "arcface_ext: differentiable row_margins need the whole softmax (no class shard)");
    if (needs_embeddings_grad || needs_weight_grad) {
      // The forward checked these labels (saved above, so unchanged since), or was told not to
      // (check_labels=False: a row with a bad label has a NaN loss and gets no gradient): no second
      // check, which on CUDA is a device sync in the middle of the step.
      at::Tensor grad_embeddings, grad_weight;
      const double m2 = ctx->saved_data["m2"].toDouble(), m3 = ctx->saved_data["m3"].toDouble();
      const bool straight_through = ctx->saved_data["straight_through"].toBool();
      if (kept.defined()) {
        std::tie(grad_embeddings, grad_weight) =
            kept_op.call(grad_loss, saved[0], saved[1], labels, kept, s, m1, m2, m3, lambda, ignore_index,
                         straight_through, needs_embeddings_grad, needs_weight_grad, row_margins);
      } else {
        std::tie(grad_embeddings, grad_weight) =
            op.call(grad_loss, saved[0], saved[1], labels, saved[3], s, m1, m2, m3, lambda, ignore_index,
                    straight_through, ctx->saved_data["workspace_bytes"].toInt(), needs_embeddings_grad,
                    needs_weight_grad, class_offset, num_classes, row_margins,
                    /*check_labels=*/false);
      }
      if (needs_embeddings_grad) grads[0] = grad_embeddings;
      if (needs_weight_grad) grads[1] = grad_weight;
    }
    if (needs_margins_grad) {
      grads[kRowMargins] =
          row_margins_grad(grad_loss, saved[6], saved[7], labels, *row_margins, s, m1, lambda, ignore_index,
                           saved[1].size(0));
    }
    return grads;
  }
};

ForwardOutput margin_softmax_forward_autograd(const at::Tensor& embeddings, const at::Tensor& weight,
                                              const at::Tensor& labels, double s, double m1, double m2, double m3,
                                              double lambda, int64_t ignore_index, bool straight_through,
                                              int64_t workspace_bytes, int64_t class_offset, int64_t num_classes,
                                              const std::optional<at::Tensor>& row_margins, bool check_labels) {
  std::pair<at::Tensor, at::Tensor> statistics;
  const bool keep = keep_gradient_block(embeddings, weight, workspace_bytes, class_offset, num_classes);
  const variable_list outputs =
      MarginSoftmax::apply(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                           workspace_bytes, class_offset, num_classes, row_margins, check_labels, keep,
                           &statistics);
  return {outputs[0], statistics.first, statistics.second};
}

using TrainOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Tensors that only record operations (FakeTensor, functional tensors: torch.compile tracing the
// backward, compiled autograd): the saved gradients must not be scaled in place under them.
bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// The one-call training op: its forward returns the loss's gradients too, so the backward only
// scales them by the upstream gradient.
class MarginSoftmaxTrain : public torch::autograd::Function<MarginSoftmaxTrain> {
 public:
  // forward's arguments: the op's 15 and `outputs` (one gradient each, the first two defined).
  static constexpr size_t kNumInputs = 16;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& embeddings, const at::Tensor& weight,
                               const at::Tensor& labels, double s, double m1, double m2, double m3,
                               double lambda, int64_t ignore_index, bool straight_through,
                               int64_t workspace_bytes, bool mean, bool needs_embeddings_grad,
                               bool needs_weight_grad, const std::optional<at::Tensor>& row_margins,
                               TrainOutput* outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("arcface_ext::margin_softmax_train", "")
                               .typed<TrainOutput(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                  double, double, double, double, int64_t, bool, int64_t, bool,
                                                  bool, bool, const std::optional<at::Tensor>&)>();
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      *outputs = op.call(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                         workspace_bytes, mean, needs_embeddings_grad, needs_weight_grad, row_margins);
    }
    ctx->save_for_backward({std::get<2>(*outputs), std::get<3>(*outputs)});
    // The target cosine and the gradients leave outside the Function's graph (not differentiable;
    // see MarginSoftmax::forward).
    return {std::get<0>(*outputs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_no_double_backward();
    variable_list grads(kNumInputs);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    bool eager = !traced(grad_loss);
    for (const at::Tensor& grad : saved) eager = eager && !traced(grad);
    // Each saved gradient remembers the grad_loss it was scaled by in place: a backward pass that
    // asks for one input alone (autograd.grad(loss, embeddings), backward(inputs=...)) leaves the
    // other one unscaled for a later pass.
    static const char* const kAppliedScale[2] = {"applied_scale_embeddings", "applied_scale_weight"};
    std::optional<bool> scalable;
    for (int k = 0; k < 2; ++k) {
      if (!ctx->needs_input_grad(k)) continue;
      const auto applied = ctx->saved_data.find(kAppliedScale[k]);
      if (eager && applied != ctx->saved_data.end()) {
        grads[k] = saved[k] * (grad_loss / applied->second.toTensor());
        continue;
      }
      // A zero or non-finite scale would lose the gradients a retained graph still needs. (One
      // scalar read per step; on CUDA a synchronisation.)
      if (eager && !scalable.has_value())
        scalable = (at::isfinite(grad_loss) & (grad_loss != 0)).all().item<bool>();
      if (eager && *scalable) {
        // Scaled in place, the saved gradients reach autograd without a second C x D buffer
        // (through variable_data, so that a retained graph can run backward again: later calls
        // rescale out of place).
        saved[k].variable_data().mul_(grad_loss);
        grads[k] = saved[k];
        ctx->saved_data[kAppliedScale[k]] = grad_loss.detach().clone();
      } else {
        grads[k] = saved[k] * grad_loss;
      }
    }
    return grads;
  }
};

TrainOutput margin_softmax_train_autograd(const at::Tensor& embeddings, const at::Tensor& weight,
                                          const at::Tensor& labels, double s, double m1, double m2, double m3,
                                          double lambda, int64_t ignore_index, bool straight_through,
                                          int64_t workspace_bytes, bool mean, bool needs_embeddings_grad,
                                          bool needs_weight_grad, const std::optional<at::Tensor>& row_margins) {
  TrainOutput outputs;
  const variable_list loss =
      MarginSoftmaxTrain::apply(embeddings, weight, labels, s, m1, m2, m3, lambda, ignore_index, straight_through,
                                workspace_bytes, mean, needs_embeddings_grad, needs_weight_grad, row_margins,
                                &outputs);
  return {loss[0], std::get<1>(outputs), std::get<2>(outputs), std::get<3>(outputs)};
}

// reduce_loss: its backward writes each row's gradient in one kernel, which the margin-softmax
// backward takes as its grad_loss as it is (float, contiguous: no copy).
class ReduceLoss : public torch::autograd::Function<ReduceLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& loss, const at::Tensor& labels,
                               int64_t ignore_index, bool mean) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("arcface_ext::reduce_loss", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
    at::Tensor reduced;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      reduced = op.call(loss, labels, ignore_index, mean);
    }
    ctx->save_for_backward({labels});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["mean"] = mean;
    return {reduced};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_no_double_backward();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("arcface_ext::reduce_loss_backward", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
    variable_list grads(4);
    const at::Tensor& grad = grad_outputs[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return grads;
    grads[0] = op.call(grad, ctx->get_saved_variables()[0], ctx->saved_data["ignore_index"].toInt(),
                       ctx->saved_data["mean"].toBool());
    return grads;
  }
};

at::Tensor reduce_loss_autograd(const at::Tensor& loss, const at::Tensor& labels, int64_t ignore_index, bool mean) {
  return ReduceLoss::apply(loss, labels, ignore_index, mean)[0];
}

}  // namespace
}  // namespace arcface_ext

TORCH_LIBRARY_IMPL(arcface_ext, Autograd, m) {
  m.impl("margin_softmax_forward", &arcface_ext::margin_softmax_forward_autograd);
  m.impl("margin_softmax_train", &arcface_ext::margin_softmax_train_autograd);
  m.impl("reduce_loss", &arcface_ext::reduce_loss_autograd);
}
