"""pytorch-metric-learning's margin losses against arcface-ext's modules: the same weights and
inputs in fp64, 8 of 64 rows pointing away from their class centre (θ past π − m), the loss and both
gradients compared. Needs pytorch-metric-learning (``pip install pytorch-metric-learning``; not a
dependency of this project: tests/test_other_libraries.py checks the same maths without it).

    python benchmarks/compare_other_libraries.py
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's arcface_ext
import arcface_ext  # noqa: E402

N, D, C, FLIPPED = 64, 32, 37, 8


def embeddings(centres: torch.Tensor, labels: torch.Tensor, norm: float | None) -> torch.Tensor:
    """N embeddings, the first FLIPPED near the opposite of their class's centre; of norm ``norm`` if given."""
    x = torch.randn(N, D, dtype=torch.float64)
    x[:FLIPPED] = -centres[labels[:FLIPPED]] + 0.05 * torch.randn(FLIPPED, D, dtype=torch.float64)
    return x if norm is None else x / x.norm(dim=1, keepdim=True) * norm


def compare(name: str, theirs: torch.nn.Module, ours: torch.nn.Module, k: int = 1, norm: float | None = None) -> None:
    weight = theirs.W.detach().double()  # theirs: (D, C·k); ours: (C·k, D), the same order
    theirs.W.data = weight.clone()
    with torch.no_grad():
        ours.weight.copy_(weight.t())
    labels = torch.randint(0, C, (N,))
    x = embeddings(weight.t()[::k], labels, norm)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_theirs, loss_ours = theirs(x_theirs, labels), ours(x_ours, labels)
    loss_theirs.backward()
    loss_ours.backward()

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    print(f"| {name} | {loss_theirs.item():.10f} | {loss_ours.item():.10f} | "
          f"{abs(loss_theirs.item() - loss_ours.item()):.1e} | {relative(x_theirs.grad, x_ours.grad):.1e} | "
          f"{relative(theirs.W.grad.t(), ours.weight.grad):.1e} |")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    try:
        import pytorch_metric_learning
        from pytorch_metric_learning import losses
    except ImportError:
        sys.exit("this comparison needs pytorch-metric-learning (pip install pytorch-metric-learning)")
    torch.manual_seed(0)
    print(f"pytorch-metric-learning {pytorch_metric_learning.__version__}, torch {torch.__version__}, "
          f"arcface_ext {arcface_ext.__version__}; N {N}, D {D}, C {C}, fp64, {FLIPPED} rows past π − m\n")
    print("| theirs vs ours | their loss | our loss | loss difference | embeddings' gradient, relative "
          "| centres' gradient, relative |")
    print("|---|---|---|---|---|---|")
    f64 = {"dtype": torch.float64}
    m = math.radians(28.6)  # their default margin, in degrees
    compare("ArcFaceLoss() vs ArcFaceLoss(s=64, m=radians(28.6))",
            losses.ArcFaceLoss(C, D), arcface_ext.ArcFaceLoss(C, D, s=64.0, m=m, **f64))
    compare("ArcFaceLoss(margin=50, scale=30) vs ArcFaceLoss(s=30, m=radians(50))",
            losses.ArcFaceLoss(C, D, margin=50, scale=30),
            arcface_ext.ArcFaceLoss(C, D, s=30.0, m=math.radians(50), **f64))
    compare("CosFaceLoss() vs CosFaceLoss(s=64, m=0.35)",
            losses.CosFaceLoss(C, D), arcface_ext.CosFaceLoss(C, D, s=64.0, m=0.35, **f64))
    compare("SubCenterArcFaceLoss() vs SubCenterMarginLoss(k=3, m2=radians(28.6))",
            losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D),
            arcface_ext.SubCenterMarginLoss(C, D, k=3, s=64.0, m2=m, **f64), k=3)
    # Theirs scales each row by its embedding's norm: equal to ours at s = that norm in the loss and the
    # centres' gradient where every norm is the same, not in the embeddings' gradient (theirs flows through
    # the norm), and not at all where the norms vary.
    compare("SphereFaceLoss(margin=4) vs SphereFaceLoss(m=4, s=10), every norm 10",
            losses.SphereFaceLoss(C, D, margin=4), arcface_ext.SphereFaceLoss(C, D, m=4, s=10.0, **f64), norm=10.0)
    compare("SphereFaceLoss(margin=4) vs SphereFaceLoss(m=4, s=10), norms varying",
            losses.SphereFaceLoss(C, D, margin=4), arcface_ext.SphereFaceLoss(C, D, m=4, s=10.0, **f64))


if __name__ == "__main__":
    main()
