"""A small forward+backward of the CUDA op for compute-sanitizer: every dtype, odd sizes, many
class chunks, ignored rows, a zero embedding and a zero class centre, both gradients, each
gradient alone, N = 0, and per-row margins. Run it as

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_case.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_case.py
    compute-sanitizer --tool initcheck python3 benchmarks/sanitize_case.py
    compute-sanitizer --tool synccheck python3 benchmarks/sanitize_case.py

Both CUDA paths run: the fused tensor-core kernels (16-bit inputs, D a multiple of 8) and the
cuBLAS path (ARCFACE_EXT_CUDA_FUSED=0, and every other input); bf16 cases whose block fits the
workspace keep the forward's gradient block (csrc/kept_block.h), one of them with a row the
forward recomputes.

It prints one line per case and exits non-zero if an output is not finite (sanitizer errors are
the sanitizer's to report). An argument picks a part: `mma` (everything but the wgmma tiles) or
`wgmma` (the Hopper wgmma tiles alone, compute capability 9.0); without one, both, wgmma last.
gpu_check.sh runs the parts in separate processes: a fault leaves the CUDA context unusable."""
import os
import sys

import torch

# From the checkout, as the other scripts: gpu_check.sh may have built the extension in place.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import arcface_ext  # noqa: E402


def case(n, dim, num_classes, dtype, *, workspace_bytes, needs=(True, True), seed=0, per_row=False,
         opposite=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    if n > 3:
        labels[1] = -1  # an ignored row
        if dtype != torch.float16:  # their gradients are scaled by 1/eps = 1e12: inf in fp16
            x[2] = 0  # a zero embedding
            w[labels[3]] = 0  # a zero class centre
    if opposite:  # row 4 points away from its centre and at another: the kept block recomputes it
        w[labels[4]] = -x[4]
        w[(labels[4] + 1) % num_classes] = x[4]
    x = x.to("cuda", dtype).requires_grad_(needs[0])
    w = w.to("cuda", dtype).requires_grad_(needs[1])
    labels = labels.cuda()
    arcface_ext.set_workspace_bytes(workspace_bytes)
    # Per-row margins (AdaFace-like, negative angular ones included) where asked.
    m2 = torch.linspace(-0.4, 0.5, n, device="cuda", dtype=torch.float64) if per_row else 0.5
    m3 = torch.linspace(0.0, 0.3, n, device="cuda", dtype=torch.float64) if per_row else 0.0
    loss, target_cosine = arcface_ext.combined_margin_loss(x, w, labels, s=64.0, m2=m2, m3=m3, reduction="none",
                                                           return_target_cosine=True)
    upstream = torch.linspace(-1.0, 2.0, n, device="cuda")
    loss.backward(upstream)
    torch.cuda.synchronize()
    outputs = [loss, target_cosine[labels != -1]]
    outputs += [t.grad for t, need in zip((x, w), needs) if need]
    finite = all(bool(t.isfinite().all()) for t in outputs)
    print(f"N={n:3d} D={dim:3d} C={num_classes:5d} {str(dtype):14s} workspace={workspace_bytes:>9d} "
          f"needs={needs}{' per-row margins' if per_row else ''}{' opposite row' if opposite else ''}: "
          f"{'ok' if finite else 'NON-FINITE'}")
    return finite


def main(argv=None):
    parts = (sys.argv[1:] if argv is None else argv) or ["mma", "wgmma"]
    if not set(parts) <= {"mma", "wgmma"}:
        raise SystemExit(f"sanitize_case: parts are mma and wgmma, got {parts}")
    ok = True
    if "mma" in parts:
        ok &= mma_cases()
    if "wgmma" in parts:
        if torch.cuda.get_device_capability() != (9, 0):
            print("the wgmma tiles run on compute capability 9.0 only: no wgmma cases")
        else:
            ok &= wgmma_cases()
    arcface_ext.set_workspace_bytes(None)
    return 0 if ok else 1


def mma_cases():
    ok = True
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        # 16-bit inputs with D a multiple of 8 take the fused tensor-core kernels by default; run
        # them on the cuBLAS path too.
        settings = ("1", "0") if dtype in (torch.bfloat16, torch.float16) else ("1",)
        for setting in settings:
            os.environ["ARCFACE_EXT_CUDA_FUSED"] = setting
            print(f"ARCFACE_EXT_CUDA_FUSED={setting}")
            ok &= case(37, 40, 1031, dtype, workspace_bytes=1)  # 256-class chunks, the last one 7 wide
            ok &= case(37, 40, 5003, dtype, workspace_bytes=64 << 20)  # one chunk, two 4096 segments
            ok &= case(300, 72, 1000, dtype, workspace_bytes=1)  # 3 row tiles, a partial depth slice
            if setting == "1" and dtype in (torch.bfloat16, torch.float16):
                # The fused kernels' blocks walk 2 + 1 row tiles, the class norms summed once a block
                # (the host picks one row tile a block at this size).
                os.environ["ARCFACE_EXT_ROW_TILES"] = "2"
                print("ARCFACE_EXT_ROW_TILES=2")
                ok &= case(300, 72, 1000, dtype, workspace_bytes=1)
                os.environ.pop("ARCFACE_EXT_ROW_TILES")
            ok &= case(37, 36, 1031, dtype, workspace_bytes=1)  # D not a multiple of 8: cuBLAS path
    os.environ.pop("ARCFACE_EXT_CUDA_FUSED")
    ok &= case(9, 24, 600, torch.float32, workspace_bytes=1, needs=(True, False))
    ok &= case(9, 24, 600, torch.bfloat16, workspace_bytes=1, needs=(False, True))
    ok &= case(9, 24, 600, torch.bfloat16, workspace_bytes=1, needs=(True, False))
    ok &= case(0, 24, 600, torch.float32, workspace_bytes=1)
    ok &= case(0, 24, 600, torch.bfloat16, workspace_bytes=1)
    ok &= case(37, 40, 1031, torch.bfloat16, workspace_bytes=1, per_row=True)
    ok &= case(37, 36, 1031, torch.float32, workspace_bytes=1, per_row=True)
    # The kept gradient block (bf16 whose N x C block fits the workspace): 3 row tiles, a partial
    # class tile, rows recomputed in the forward; on both paths, and with per-row margins.
    for setting in ("1", "0"):
        os.environ["ARCFACE_EXT_CUDA_FUSED"] = setting
        print(f"kept block, ARCFACE_EXT_CUDA_FUSED={setting}")
        ok &= case(300, 72, 1031, torch.bfloat16, workspace_bytes=64 << 20, opposite=True)
        ok &= case(37, 40, 1031, torch.bfloat16, workspace_bytes=64 << 20, needs=(True, False), per_row=True)
        ok &= case(37, 40, 1031, torch.bfloat16, workspace_bytes=64 << 20, needs=(False, True))
    os.environ.pop("ARCFACE_EXT_CUDA_FUSED")
    return ok


def wgmma_cases():
    # Never run on a GPU before session 14's: the fused kernels on Hopper's wgmma tile. 64-deep
    # slices (D = 200: the last an eighth full), one row tile a block, then 2 + 1 with the kept block
    # (bf16) or not (fp16); 32-deep slices with a wgmma in flight; the kept block with rows recomputed.
    ok = True
    os.environ["ARCFACE_EXT_CUDA_FUSED"] = "1"
    for dtype in (torch.bfloat16, torch.float16):
        os.environ["ARCFACE_EXT_WGMMA"] = "1"
        print("ARCFACE_EXT_WGMMA=1")
        ok &= case(300, 200, 1000, dtype, workspace_bytes=1)
        os.environ["ARCFACE_EXT_ROW_TILES"] = "2"
        ok &= case(300, 200, 1000, dtype, workspace_bytes=64 << 20)
        os.environ.pop("ARCFACE_EXT_ROW_TILES")
        os.environ["ARCFACE_EXT_WGMMA"] = "32"
        print("ARCFACE_EXT_WGMMA=32")
        ok &= case(300, 200, 1000, dtype, workspace_bytes=1)
        # The x tile resident (session 15), forward and backward: segments of several class tiles
        # (one chunk a class tile with the 1-byte workspace), and the kept block.
        os.environ["ARCFACE_EXT_WGMMA"] = "resident"
        print("ARCFACE_EXT_WGMMA=resident")
        ok &= case(300, 200, 1000, dtype, workspace_bytes=1)
        ok &= case(300, 200, 1000, dtype, workspace_bytes=64 << 20)
    # The backward's class-outer tile (session 17; bf16, the gradient block not kept): D = 264
    # (both warpgroups' halves of the depth, the second mostly zeros), chunks of one class tile.
    os.environ["ARCFACE_EXT_WGMMA"] = "resident-weight"
    os.environ["ARCFACE_EXT_KEEP_BLOCK"] = "0"
    print("ARCFACE_EXT_WGMMA=resident-weight")
    ok &= case(300, 264, 1000, torch.bfloat16, workspace_bytes=1)
    ok &= case(37, 264, 1000, torch.bfloat16, workspace_bytes=64 << 20)
    os.environ.pop("ARCFACE_EXT_KEEP_BLOCK")
    os.environ["ARCFACE_EXT_WGMMA"] = "1"
    print("kept block, ARCFACE_EXT_WGMMA=1")
    ok &= case(300, 72, 1031, torch.bfloat16, workspace_bytes=64 << 20, opposite=True)
    os.environ.pop("ARCFACE_EXT_WGMMA")
    os.environ.pop("ARCFACE_EXT_CUDA_FUSED")
    return ok


if __name__ == "__main__":
    sys.exit(main())
