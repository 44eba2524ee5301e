"""The dispatcher-level ops of arcface_ext: their fake (meta) kernels for torch.compile and
their autograd formula. Importing this module loads the compiled library `arcface_ext._C`."""
import torch

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    IMPORT_ERROR = error
else:
    IMPORT_ERROR = None


def _loss_dtype(embeddings):
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def margin_softmax_forward(embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index,
                           straight_through, workspace_bytes):
    """(loss per row, log-sum-exp per row, clamped target cosine per row)."""
    return torch.ops.arcface_ext.margin_softmax_forward(
        embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index, straight_through,
        workspace_bytes)


if IMPORT_ERROR is None:

    @torch.library.register_fake("arcface_ext::margin_softmax_forward")
    def _forward_fake(embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index,
                      straight_through, workspace_bytes):
        torch._check(embeddings.dim() == 2 and weight.dim() == 2 and labels.dim() == 1)
        torch._check(embeddings.shape[1] == weight.shape[1])
        torch._check(labels.shape[0] == embeddings.shape[0])
        loss = embeddings.new_empty((embeddings.shape[0],), dtype=_loss_dtype(embeddings))
        return loss, torch.empty_like(loss), torch.empty_like(loss)

    @torch.library.register_fake("arcface_ext::margin_softmax_backward")
    def _backward_fake(grad_loss, embeddings, weight, labels, logsumexp, s, m1, m2, m3, lambda_,
                       ignore_index, straight_through, workspace_bytes, needs_embeddings_grad,
                       needs_weight_grad):
        grad_embeddings = (embeddings.new_empty(embeddings.shape) if needs_embeddings_grad
                           else embeddings.new_empty((0,)))
        grad_weight = weight.new_empty(weight.shape) if needs_weight_grad else weight.new_empty((0,))
        return grad_embeddings, grad_weight

    def _setup_context(ctx, inputs, output):
        embeddings, weight, labels, *params = inputs
        _, logsumexp, target_cosine = output
        ctx.save_for_backward(embeddings, weight, labels, logsumexp)
        ctx.params = params  # s, m1, m2, m3, lambda_, ignore_index, straight_through, workspace
        ctx.mark_non_differentiable(logsumexp, target_cosine)

    def _backward(ctx, grad_loss, grad_logsumexp, grad_target_cosine):
        embeddings, weight, labels, logsumexp = ctx.saved_tensors
        needs_embeddings_grad, needs_weight_grad = ctx.needs_input_grad[:2]
        if grad_loss is None or not (needs_embeddings_grad or needs_weight_grad):
            return (None,) * (3 + len(ctx.params))
        grad_embeddings, grad_weight = torch.ops.arcface_ext.margin_softmax_backward(
            grad_loss, embeddings, weight, labels, logsumexp, *ctx.params,
            needs_embeddings_grad, needs_weight_grad)
        return ((grad_embeddings if needs_embeddings_grad else None),
                (grad_weight if needs_weight_grad else None)) + (None,) * (1 + len(ctx.params))

    torch.library.register_autograd("arcface_ext::margin_softmax_forward", _backward,
                                    setup_context=_setup_context)
