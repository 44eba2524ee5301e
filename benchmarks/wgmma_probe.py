"""What Hopper's wgmma tile multiplies, register by register.

The fused kernels' wgmma tile (csrc/cuda/wgmma_tile.cuh) was written and checked against the CPU
emulator's reading of the PTX ISA (tests/emulator/runtime.h): the shared-memory descriptors, the
128- and 64-byte swizzles, the accumulator layout. If the hardware reads any of them otherwise, the
op's tests fail with wrong losses, which say little about why. This script runs one tile
(the op arcface_ext::wgmma_tile_probe, one block, every thread's 64 accumulators and class-norm sum
written out), in each of its variants (64- and 32-deep streaming slices, the resident x tile), on
inputs whose products name their operands:

    rows-classes@k  x[r, k] = r + 1, x[r, k+1] = 1; w[j, k] = 1, w[j, k+1] = 256 (j + 1), zeros elsewhere:
                    the tile's (r, j) is (r + 1) + 256 (j + 1), so each register says which row of x and
                    which class of w it multiplied (k in the first chunk, the last chunk of the first
                    slice, and a middle chunk of the second);
    depth-of-w      x[r, k] = [k = r], w[j, k] = k + 1 (D = 128): (r, j) is r + 1 when x's depth k pairs
                    with w's depth k; another value v says it met w's depth v - 1;
    depth-of-x      the same with the operands' roles swapped: (r, j) is j + 1;
    random, edges,  Gaussian inputs against an fp64 product (D = 192; 100 rows x 77 classes x D = 200,
    deep            whose missing rows, classes and depth must come out as zeros; D = 512, the resident
                    tile's largest), with the class norms.

Every value is an integer below 2^16 with at most 8 significant bits in each operand, so bf16, fp16
and the fp32 accumulator hold them exactly: a right tile matches to the bit. For each case it prints one
line; for a case that fails, the wrong registers decoded (what the register was meant to hold, what it
holds) and hints: a tile whose values are all there but in other registers is the accumulator layout;
wrong rows only where r % 8 != 0 are the swizzle.

The `weight` tile is the backward's class-outer tile (op arcface_ext::wgmma_weight_tile_probe, bf16):
S = w·xᵀ (64 classes x 64 rows, m64n32k16 a warpgroup) and P = g·x (64 classes x 512 depth columns,
m64n256k16 with x read along its depth, MN-major: the layout no other tile uses), on

    s rows-classes@k  as rows-classes@k for S, with g the identity (P[m, d] = x[m, d]);
    p rows            x[n, d] = n + 1, g the identity or reversed (g[m, 63 - m] = 1): P[m, d] names the
                      row of x that class m's column d met;
    p depth           x[n, d] = (d % 256) + 1, negated for d >= 256, g the identity: P[m, d] names the
                      depth column it holds (the sign, which warpgroup's half);
    random, edges     Gaussian x, w and g against fp64 (D = 512; 37 rows x 50 classes x D = 264).

    python benchmarks/wgmma_probe.py                           # a GPU of compute capability 9.0, sm_90a build
    ARCFACE_EXT_EMULATE_CUDA=1 python benchmarks/wgmma_probe.py   # the CPU emulator (tests/emulator)

gpu_check.sh runs it before its cuda-wgmma stage, one process a tile (a fault in one tile leaves the
CUDA context unusable; the others still run). Exit status 1 if a case fails.
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

# The repository root first, as the other benchmarks do: a package built in place (setup.py
# build_ext --inplace, gpu_check.sh's fallback) is found there, not from benchmarks/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ROWS = CLASSES = 128
THREADS = 256


def register_coordinates():
    """(row, class) of every accumulator register, (256, 64) each: thread t = 128 g + 32 q + lane holds in
    acc[4 j + 2 h + e] row 64 g + 16 q + lane / 4 + 8 h and class 8 j + 2 (lane % 4) + e (wgmma's
    m64nNk16 layout for a warpgroup; wgmma_tile_row / wgmma_tile_class in wgmma_tile.cuh)."""
    t = torch.arange(THREADS).view(-1, 1)
    i = torch.arange(64).view(1, -1)
    j, h, e = i // 4, i // 2 % 2, i % 2
    lane = t % 32
    row = (t // 128) * 64 + (t // 32 % 4) * 16 + lane // 4 + 8 * h
    col = 8 * j + 2 * (lane % 4) + e
    return row.expand(THREADS, 64), col.expand(THREADS, 64)


def describe_thread(t):
    return f"thread {t} (warpgroup {t // 128}, warp {t // 32 % 4}, lane {t % 32})"


@dataclass
class Case:
    name: str
    x: torch.Tensor  # fp64, values exact in 16 bits
    w: torch.Tensor
    exact: bool = True  # integer products: compare bit for bit
    decode: object = None  # (value, meant row, meant class) -> what the register multiplied
    problems: list = field(default_factory=list)


def rows_classes_case(depth, k):
    dim = 2 * depth
    x = torch.zeros(ROWS, dim, dtype=torch.float64)
    w = torch.zeros(CLASSES, dim, dtype=torch.float64)
    x[:, k] = torch.arange(1, ROWS + 1)
    x[:, k + 1] = 1
    w[:, k] = 1
    w[:, k + 1] = 256 * torch.arange(1, CLASSES + 1)

    def decode(v, row, col):
        if v != int(v):
            return None
        r, j = int(v) % 256 - 1, int(v) // 256 - 1
        return f"row {r}, class {j}" if 0 <= r < ROWS and 0 <= j < CLASSES else None

    return Case(f"rows-classes@{k}", x, w, decode=decode)


def depth_case(swap):
    dim = 128
    one_hot = torch.eye(ROWS, dim, dtype=torch.float64)
    ramp = torch.arange(1, dim + 1, dtype=torch.float64).expand(CLASSES, dim).clone()
    x, w = (ramp, one_hot) if swap else (one_hot, ramp)
    def decode(v, row, col):
        if v != int(v) or not 1 <= v <= dim:
            return None
        return f"w's depth {col} met x's depth {int(v) - 1}" if swap else f"x's depth {row} met w's depth {int(v) - 1}"

    return Case("depth-of-x" if swap else "depth-of-w", x, w, decode=decode)


def random_case(name, rows, classes, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    return Case(name, x, w, exact=False)


TILES = ("64", "32", "resident", "weight")  # wgmma_tile_probe's variants, and the class-outer tile


def cases(tile):
    depth = 32 if tile == "32" else 64
    return [rows_classes_case(depth, 0), rows_classes_case(depth, depth - 8), rows_classes_case(depth, depth + 24),
            depth_case(False), depth_case(True), random_case("random", ROWS, CLASSES, 192, 0),
            random_case("edges", 100, 77, 200, 1), random_case("deep", ROWS, CLASSES, 512, 2)]


def check(case, registers, dtype):
    """The problems of one case's (256, 65) registers; an empty list when the tile is right."""
    x, w = case.x.to(dtype).double(), case.w.to(dtype).double()
    assert torch.equal(x, case.x) or not case.exact, "the probe's values must be exact in 16 bits"
    expected = torch.zeros(ROWS, CLASSES, dtype=torch.float64)
    expected[:x.shape[0], :w.shape[0]] = x @ w.T
    row, col = register_coordinates()
    want = expected[row, col]
    got = registers[:, :64].double()
    if case.exact:
        wrong = got != want
    else:
        scale = torch.zeros(ROWS, CLASSES, dtype=torch.float64)
        scale[:x.shape[0], :w.shape[0]] = x.abs() @ w.abs().T
        wrong = ((got - want).abs() > 1e-5 * scale[row, col]) | ~got.isfinite()
        wrong |= (scale[row, col] == 0) & (got != 0)  # past the ends: zeros, exactly
    problems = []
    count = int(wrong.sum())
    if count:
        problems.append(f"{count} of {wrong.numel()} registers wrong")
        distinct = want.unique().numel() == want.numel()  # else a permutation proves nothing
        if distinct and torch.equal(got.flatten().sort().values, want.flatten().sort().values):
            problems.append("hint: every value of the tile is there, in other registers: the accumulator "
                            "layout differs from wgmma_tile_row / wgmma_tile_class")
        rows_hit = sorted({int(r) % 8 for r in row[wrong]})
        cols_hit = sorted({int(c) % 8 for c in col[wrong]})
        problems.append(f"wrong registers' rows % 8: {rows_hit}; classes % 8: {cols_hit}"
                        + (" (hint: rows % 8 = 0 are right: the swizzle)" if 0 not in rows_hit else ""))
        for t, i in wrong.nonzero().tolist()[:8]:
            meant = f"row {int(row[t, i])}, class {int(col[t, i])} = {float(want[t, i]):g}"
            found = case.decode(float(got[t, i]), int(row[t, i]), int(col[t, i])) if case.decode else None
            problems.append(f"{describe_thread(t)} acc[{i}]: meant {meant}; holds {float(got[t, i]):g}"
                            + (f" ({found})" if found else ""))
    # The class norms: threads 2c and 2c + 1 hold the two halves of class c's sum of squares.
    norms = registers[:, 64].double().view(CLASSES, 2).sum(1)
    want_norms = torch.zeros(CLASSES, dtype=torch.float64)
    want_norms[:w.shape[0]] = (w * w).sum(1)
    bad = ((norms - want_norms).abs() > 1e-5 * want_norms) | ~norms.isfinite()
    if bool(bad.any()):
        c = int(bad.nonzero()[0])
        problems.append(f"class norms: {int(bad.sum())} of {CLASSES} wrong; class {c}: {float(norms[c]):g}, "
                        f"meant {float(want_norms[c]):g}")
    return problems


OUTER = 64  # the class-outer tile's classes, rows (and g's sides)
OUTER_DEPTH = 512


def weight_register_coordinates():
    """(class, row) of S's registers, (256, 16), and (class, depth column) of P's, (256, 128): thread
    t = 128 g + 32 q + lane holds in register 4 j + 2 h + e class 16 q + lane / 4 + 8 h and row
    32 g + 8 j + 2 (lane % 4) + e of S (j < 4), depth column 256 g + 8 j + 2 (lane % 4) + e of P (j < 32)."""
    t = torch.arange(THREADS).view(-1, 1)
    lane, wg = t % 32, t // 128
    coordinates = []
    for registers, step in ((16, 32), (128, 256)):
        i = torch.arange(registers).view(1, -1)
        j, h, e = i // 4, i // 2 % 2, i % 2
        klass = (t // 32 % 4) * 16 + lane // 4 + 8 * h
        other = wg * step + 8 * j + 2 * (lane % 4) + e
        coordinates.append((klass.expand(THREADS, registers), other.expand(THREADS, registers)))
    return coordinates


@dataclass
class WeightCase:
    name: str
    x: torch.Tensor  # fp64 (rows, D)
    w: torch.Tensor  # fp64 (classes, D)
    g: torch.Tensor  # fp64 (64, 64)
    exact: bool = True
    decode_p: object = None  # value of P -> what it met
    problems: list = field(default_factory=list)


def weight_cases():
    eye = torch.eye(OUTER, dtype=torch.float64)
    cases = []
    for k in (0, 56, 88):
        x = torch.zeros(OUTER, 128, dtype=torch.float64)
        w = torch.zeros(OUTER, 128, dtype=torch.float64)
        x[:, k] = torch.arange(1, OUTER + 1)
        x[:, k + 1] = 1
        w[:, k] = 1
        w[:, k + 1] = 256 * torch.arange(1, OUTER + 1)
        cases.append(WeightCase(f"s rows-classes@{k}", x, w, eye))
    one_hot = torch.eye(OUTER, OUTER_DEPTH, dtype=torch.float64)
    rows = torch.arange(1, OUTER + 1, dtype=torch.float64).view(-1, 1).expand(OUTER, OUTER_DEPTH).clone()
    met_row = lambda v: f"met x row {int(v) - 1}" if v == int(v) and 1 <= v <= OUTER else None  # noqa: E731
    cases.append(WeightCase("p rows", rows, one_hot, eye, decode_p=met_row))
    cases.append(WeightCase("p rows reversed", rows, one_hot, eye.flip(1), decode_p=met_row))
    columns = torch.arange(OUTER_DEPTH, dtype=torch.float64) % 256 + 1
    columns[256:] *= -1
    depth = columns.expand(OUTER, OUTER_DEPTH).clone()
    cases.append(WeightCase("p depth", depth, one_hot, eye, decode_p=lambda v: (
        f"holds depth column {int(abs(v)) - 1 + (256 if v < 0 else 0)}" if v == int(v) and 1 <= abs(v) <= 256
        else None)))
    generator = torch.Generator().manual_seed(3)
    for name, rows_, classes, dim in (("random", OUTER, OUTER, OUTER_DEPTH), ("edges", 37, 50, 264)):
        cases.append(WeightCase(name, torch.randn(rows_, dim, generator=generator, dtype=torch.float64),
                                torch.randn(classes, dim, generator=generator, dtype=torch.float64),
                                torch.randn(OUTER, OUTER, generator=generator, dtype=torch.float64), exact=False))
    return cases


def check_weight(case, registers):
    """The problems of one class-outer case's (256, 144) registers; an empty list when both GEMMs are right."""
    x, w, g = (t.to(torch.bfloat16).double() for t in (case.x, case.w, case.g))
    assert not case.exact or (torch.equal(x, case.x) and torch.equal(w, case.w)), "values must be exact in bf16"
    xp = torch.zeros(OUTER, OUTER_DEPTH, dtype=torch.float64)
    xp[:x.shape[0], :x.shape[1]] = x
    wp = torch.zeros(OUTER, OUTER_DEPTH, dtype=torch.float64)
    wp[:w.shape[0], :w.shape[1]] = w
    (s_class, s_row), (p_class, p_col) = weight_register_coordinates()
    problems = []
    for name, product, scale, got, first, second, decode in (
            ("S", wp @ xp.T, wp.abs() @ xp.abs().T, registers[:, :16], s_class, s_row, None),
            ("P", g @ xp, g.abs() @ xp.abs(), registers[:, 16:], p_class, p_col, case.decode_p)):
        want = product[first, second]
        got = got.double()
        if case.exact:
            wrong = got != want
        else:
            wrong = ((got - want).abs() > 1e-5 * scale[first, second]) | ~got.isfinite()
            wrong |= (scale[first, second] == 0) & (got != 0)
        count = int(wrong.sum())
        if not count:
            continue
        problems.append(f"{name}: {count} of {wrong.numel()} registers wrong")
        distinct = want.unique().numel() == want.numel()
        if distinct and torch.equal(got.flatten().sort().values, want.flatten().sort().values):
            problems.append(f"hint: every value of {name} is there, in other registers: the accumulator layout")
        what = "row" if name == "S" else "depth column"
        for t, i in wrong.nonzero().tolist()[:8]:
            meant = f"class {int(first[t, i])}, {what} {int(second[t, i])} = {float(want[t, i]):g}"
            found = decode(float(got[t, i])) if decode else None
            problems.append(f"{describe_thread(t)} {name}[{i}]: meant {meant}; holds {float(got[t, i]):g}"
                            + (f" ({found})" if found else ""))
    return problems


def run_weight(op, device):
    """Each class-outer case through `op` (wgmma_weight_tile_probe), bf16: the cases with their problems."""
    results = []
    for case in weight_cases():
        registers = op(*(t.to(device, torch.bfloat16) for t in (case.x, case.w, case.g))).cpu()
        case.problems = check_weight(case, registers)
        results.append(case)
    return results


def run(op, tile, dtype, device):
    """Each case of the `tile` variant in `dtype` through `op` (wgmma_tile_probe): the cases, each with
    its problems (none when the tile is right)."""
    results = []
    for case in cases(tile):
        registers = op(case.x.to(device, dtype), case.w.to(device, dtype), tile).cpu()
        case.problems = check(case, registers, dtype)
        results.append(case)
    return results


def probe_ops():
    """(ops, device): the ops (wgmma_tile_probe and wgmma_weight_tile_probe) on a GPU, or the emulated
    CUDA source's with ARCFACE_EXT_EMULATE_CUDA=1."""
    if os.environ.get("ARCFACE_EXT_EMULATE_CUDA", "0") not in ("", "0"):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import emulator

        return emulator.load(), "cpu"
    import arcface_ext

    if not arcface_ext.extension_available():
        raise SystemExit("wgmma_probe: arcface_ext._C is not built")
    return torch.ops.arcface_ext, "cuda"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", nargs="+", default=list(TILES), choices=TILES)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    args = parser.parse_args(argv)
    ops, device = probe_ops()
    failed = 0
    for tile in args.tiles:
        for name in args.dtypes:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
            if tile == "weight" and dtype != torch.bfloat16:
                continue  # the class-outer tile is bf16's
            results = (run_weight(ops.wgmma_weight_tile_probe, device) if tile == "weight"
                       else run(ops.wgmma_tile_probe, tile, dtype, device))
            for case in results:
                status = "ok" if not case.problems else "FAILED"
                print(f"wgmma probe: {tile} {name} {case.name}: {status}")
                for line in case.problems:
                    print(f"    {line}")
                failed += bool(case.problems)
    print(f"wgmma probe: {failed} case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
