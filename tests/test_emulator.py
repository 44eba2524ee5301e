"""The CUDA source on the CPU emulator (tests/emulator), a few cases in the main suite: both CUDA
paths and every dtype against the CPU op, tile edges in all three dimensions, a class shard, and the
schedule that makes a cp.async stage reused too early visible. The whole of tests/test_cuda.py runs
on the emulator with ARCFACE_EXT_EMULATE_CUDA=1 (CI does both).

The emulator builds the .cu file with the host compiler (about 20 s, cached in build/cuda_emulator)."""
import platform
import re
import shutil
import subprocess

import pytest
import torch

import arcface_ext
import emulator
from conftest import TOLERANCES, assert_close_report, load_benchmark
from emulator import build

pytestmark = [
    pytest.mark.skipif(not arcface_ext.extension_available(), reason="arcface_ext._C is not built"),
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                       reason="the emulator's fibers are written for x86-64 Linux"),
    pytest.mark.slow,  # (its first test builds the emulator: half a minute)
]

def op_args(workspace_bytes=1 << 26):
    """(s, m1, m2, m3, lambda_, ignore_index, straight_through, workspace_bytes) of the ops."""
    return (64.0, 1.0, 0.3, 0.2, 0.0, -1, False, workspace_bytes)


@pytest.fixture(scope="module")
def emulated():
    return build.load()


def inputs(n, dim, num_classes, dtype, *, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[:3] = torch.tensor([0, num_classes - 1, -1])  # first class, last class, an ignored row
    grad = torch.randn(n, generator=generator, dtype=torch.float64)
    return x, w, labels, grad


def forward_backward(ops, x, w, labels, grad, workspace_bytes=1 << 26, **extra):
    args = op_args(workspace_bytes)
    loss, lse, cosine = ops.margin_softmax_forward(x, w, labels, *args, **extra)
    grad = grad.to(loss.dtype)
    gx, gw = ops.margin_softmax_backward(grad, x, w, labels, lse, *args, True, True, **extra)
    return {"loss": loss, "logsumexp": lse, "target_cosine": cosine, "grad_embeddings": gx, "grad_weight": gw}


def cpu_op(name, *args, **kwargs):
    """The real CPU op `name` (torch.ops.arcface_ext), also where ARCFACE_EXT_EMULATE_CUDA=1 routes the
    CPU kernels to the emulator: else these tests would compare the emulator with itself."""
    with emulator.suspended():
        return getattr(torch.ops.arcface_ext, name)(*args, **kwargs)


class CpuOps:
    """forward_backward's `ops` for the real CPU op (cpu_op)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: cpu_op(name, *args, **kwargs)


def assert_same_as_cpu_op(ours, cpu):
    for name, expected in cpu.items():
        actual = ours[name]
        assert actual.dtype == expected.dtype, name
        atol, rtol = TOLERANCES[actual.dtype]
        # 16-bit gradients: the CUDA path rounds the gradient block and the result, the CPU op once.
        roundings = 3 if actual.dtype in (torch.float16, torch.bfloat16) else 1
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        assert_close_report(actual.double(), expected.double(), atol=roundings * atol * max(scale, 1.0),
                            rtol=roundings * rtol, name=name)


def race_on_one_sm(monkeypatch, row_tiles=None):
    """The racing schedule (warps run ahead of each other, copies land as soon as they are issued) on
    one SM; ARCFACE_EXT_ROW_TILES set to `row_tiles`, or the host's choice when None."""
    monkeypatch.setenv("ARCFACE_EMU_SCHEDULE", "greedy")
    monkeypatch.setenv("ARCFACE_EMU_CP_ASYNC", "issue")
    monkeypatch.setenv("ARCFACE_EMU_SM_COUNT", "1")
    if row_tiles is None:
        monkeypatch.delenv("ARCFACE_EXT_ROW_TILES", raising=False)
    else:
        monkeypatch.setenv("ARCFACE_EXT_ROW_TILES", row_tiles)


# N = 130: two row tiles, the second with 2 rows; D = 72: three depth slices, the last a quarter full;
# C = 300: three class tiles, the last partial.
CASES = [("fused", torch.bfloat16), ("fused", torch.float16), ("cublas", torch.bfloat16),
         ("cublas", torch.float32), ("cublas", torch.float64)]


@pytest.mark.parametrize("path, dtype", CASES, ids=[f"{p}-{str(d)[6:]}" for p, d in CASES])
def test_matches_the_cpu_op(emulated, monkeypatch, path, dtype):
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "1" if path == "fused" else "0")
    x, w, labels, grad = inputs(130, 72, 300, dtype, seed=1)
    emulated.take_launch_log()
    ours = forward_backward(emulated, x, w, labels, grad)
    launched = emulated.take_launch_log().split()
    assert ("fused_forward_kernel" in launched) == (path == "fused"), launched
    assert ("fused_backward_kernel" in launched) == (path == "fused"), launched
    assert_same_as_cpu_op(ours, forward_backward(CpuOps(), x, w, labels, grad))


def test_class_shard(emulated):
    # Classes [200, 500) of 700: rows whose targets are elsewhere count with no target column.
    x, w, labels, grad = inputs(40, 64, 700, torch.bfloat16, seed=2)
    shard = dict(class_offset=200, num_classes=700)
    ours = forward_backward(emulated, x, w[200:500], labels, grad, **shard)
    assert_same_as_cpu_op(ours, forward_backward(CpuOps(), x, w[200:500], labels, grad, **shard))


@pytest.mark.parametrize("depth", ["3", "4", "5", "auto-sm80", "auto-sm90", "auto-sm86"])
def test_pipeline_depths_under_the_racing_schedule(emulated, monkeypatch, depth):
    # Warps racing ahead of each other, copies landing as soon as they are issued: a prefetch into a
    # stage that another warp still reads would change the result. D = 160: five slices a tile, so
    # every stage is reused; one SM and a 1000-byte workspace make the forward's segments runs of 2
    # class tiles, whose pipeline crosses from one tile into the next. Each depth the kernels are
    # built for, and the host's own choice for an sm_80 (3), an sm_90 (4) and an sm_86 (3) shared
    # memory.
    race_on_one_sm(monkeypatch)
    if depth.startswith("auto"):
        monkeypatch.delenv("ARCFACE_EXT_TILE_STAGES", raising=False)
        monkeypatch.setenv("ARCFACE_EMU_SMEM_PER_SM", {"auto-sm80": "167936", "auto-sm90": "233472",
                                                       "auto-sm86": "102400"}[depth])
    else:
        monkeypatch.setenv("ARCFACE_EXT_TILE_STAGES", depth)
    x, w, labels, grad = inputs(40, 160, 1100, torch.bfloat16, seed=3)
    emulated.take_launch_log()
    ours = forward_backward(emulated, x, w, labels, grad, workspace_bytes=1000)
    launched = emulated.take_launch_log().split()
    stages = {"auto-sm80": 3, "auto-sm90": 4, "auto-sm86": 3}.get(depth) or int(depth)
    for kernel in ("fused_forward_kernel", "fused_backward_kernel"):
        assert launched[launched.index(kernel) + 1] == f"smem:{stages * 20480}", launched
    assert_same_as_cpu_op(ours, forward_backward(CpuOps(), x, w, labels, grad, workspace_bytes=1000))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("setting, grid", [(None, "1x6"), ("2", "2x6"), ("1", "3x6"), ("9", "1x6")],
                         ids=["auto", "two", "one", "more-than-there-are"])
def test_blocks_walk_several_row_tiles(emulated, monkeypatch, dtype, setting, grid):
    # A fused block walks several row tiles of its class tiles and sums the class norms in the first
    # only: the backward's a row tile after another, the forward's in passes over its segment. N =
    # 300: three row tiles, the last with 44 rows; C = 700: six class tiles, the last partial. With
    # one SM the host's choice is all three row tiles a block, in both kernels;
    # ARCFACE_EXT_ROW_TILES=2 splits them 2 + 1. Under the racing schedule a tile that started
    # before the previous one's copy-out had finished, or norms read before any were summed, would
    # show.
    race_on_one_sm(monkeypatch, setting)
    x, w, labels, grad = inputs(300, 72, 700, dtype, seed=7)
    emulated.take_launch_log()
    ours = forward_backward(emulated, x, w, labels, grad)
    launched = emulated.take_launch_log().split()
    for kernel in ("fused_forward_kernel", "fused_backward_kernel"):
        assert launched[launched.index(kernel) + 2] == f"grid:{grid}", (kernel, launched)
    assert_same_as_cpu_op(ours, forward_backward(CpuOps(), x, w, labels, grad))


@pytest.mark.parametrize("setting, workspace_bytes, grid",
                         [(None, 7200, "3x3"), ("3", 7200, "3x3"), (None, 1 << 26, "1x5"), ("2", 1 << 26, "2x5")],
                         ids=["auto-small", "three-small", "auto", "two"])
def test_forward_passes_need_a_segment_a_class_tile(emulated, monkeypatch, setting, workspace_bytes, grid):
    # Blocks that walk several row tiles do so over a segment of one class tile (a longer one would
    # be read again from DRAM a pass later on a GPU). N = 300 (three row tiles), C = 600 (five class
    # tiles): with 64 MiB the forward takes the three row tiles a block (ARCFACE_EXT_ROW_TILES=2:
    # 2 + 1), five segments. A 7,200-byte workspace holds the statistics of 3 segments only, not of
    # 5: one row tile a block, segments of 2, 2 and 1 class tiles, whatever ARCFACE_EXT_ROW_TILES says.
    race_on_one_sm(monkeypatch, setting)
    x, w, labels, _ = inputs(300, 40, 600, torch.bfloat16, seed=8)
    args = op_args(workspace_bytes)
    emulated.take_launch_log()
    ours = emulated.margin_softmax_forward(x, w, labels, *args)
    launched = emulated.take_launch_log().split()
    assert launched[launched.index("fused_forward_kernel") + 2] == f"grid:{grid}", launched
    expected = cpu_op("margin_softmax_forward", x, w, labels, *args)
    for name, a, e in zip(("loss", "logsumexp", "target_cosine"), ours, expected):
        assert_close_report(a, e, atol=1e-5 * max(float(e.abs().max()), 1.0), rtol=1e-5, name=name)


@pytest.mark.parametrize("depth", ["64", "32", "resident"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("setting, workspace_bytes, grid",
                         [("1", 7200, "3x3"), ("1", 1 << 26, "3x9"), (None, 1 << 26, "1x9"), ("2", 1 << 26, "2x9")],
                         ids=["segments-of-several-tiles", "one-row-tile", "auto", "two"])
def test_the_wgmma_tiles_under_the_racing_schedule(emulated, monkeypatch, dtype, setting, workspace_bytes, grid,
                                                   depth):
    # The fused kernels on Hopper's wgmma tile (ARCFACE_EXT_WGMMA=1): its 3-stage pipeline of 64-deep
    # slices in the 128-byte swizzle, read by the emulated wgmma through its descriptors when the
    # thread waits; the forward's runs of tiles and passes, the backward's tiles one at a time.
    # Both slice shapes: 64 deep in 3 stages (ARCFACE_EXT_WGMMA=64), 32 deep in 6 with a wgmma group in
    # flight across the barrier (32). D = 200: four 64-deep slices a tile (seven 32-deep ones), the
    # last partial, so every stage is reused within a tile and across tiles; N = 300: three row tiles,
    # the last with 44 rows; C = 1100: nine class tiles, the
    # last partial; 7,200 bytes of workspace make segments of 4, 4 and 1 class tiles. Under the racing
    # schedule a stage refilled while a wgmma could still read it, or read before its copies were
    # fenced for the async proxy, fails or changes the result.
    # The resident x tile (ARCFACE_EXT_WGMMA=resident): one row tile a block whatever the setting, its
    # four 16 KB slices loaded with the first W slice and read by every tile of the segment, W in 5
    # stages with a wgmma group in flight across the barrier, and each tile's epilogue run beside the
    # next tile's first slice (two accumulator arrays in turn); about 4 blocks an SM, so 9 class tiles
    # go in segments of 6 and 3 (the last tile on either array). The backward likewise, with 3 W
    # stages and its gradient tile staged beside them, over each chunk's class tiles.
    race_on_one_sm(monkeypatch, setting)
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", depth)
    x, w, labels, grad = inputs(300, 200, 1100, dtype, seed=9)
    emulated.take_launch_log()
    ours = forward_backward(emulated, x, w, labels, grad, workspace_bytes=workspace_bytes)
    launched = emulated.take_launch_log().split()
    at = launched.index("fused_forward_wgmma_kernel")
    smem = (8 + 5) * 16384 + 1024 if depth == "resident" else 3 * 32768 + 1024
    assert launched[at + 1:at + 3] == [f"smem:{smem}", f"grid:{'3x2' if depth == 'resident' else grid}"], launched
    if depth == "resident":
        at = launched.index("fused_backward_wgmma_resident_kernel")
        assert launched[at + 1] == f"smem:{(8 + 3) * 16384 + 128 * 136 * 2 + 1024}", launched
    else:
        at = launched.index("fused_backward_wgmma_kernel")
        assert launched[at + 1] == f"smem:{3 * 32768 + 1024}", launched
    assert "fused_forward_kernel" not in launched and "fused_backward_kernel" not in launched, launched
    cpu = forward_backward(CpuOps(), x, w, labels, grad, workspace_bytes=workspace_bytes)
    assert_same_as_cpu_op(ours, cpu)


def test_a_bad_wgmma_setting_is_named(emulated, monkeypatch):
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", "yes")
    x, w, labels, _ = inputs(8, 32, 50, torch.bfloat16, seed=6)
    with pytest.raises(ValueError,
                       match="ARCFACE_EXT_WGMMA must be 0, 1, 64, 32, resident or resident-weight, got 'yes'"):
        emulated.margin_softmax_forward(x, w, labels, *op_args())


def test_the_wgmma_probe_decodes_a_tile_read_otherwise(emulated):
    # benchmarks/wgmma_probe.py on registers as a GPU with another reading of the PTX ISA would give
    # them (the emulator's right ones, rearranged): an accumulator layout with the row and class
    # halves of each register quad swapped is named as a layout, and a tile whose operands' chunks
    # were read unswizzled (rows of x past the first of each 8 read as zeros) as wrong values, each
    # decoded as the (row, class) it multiplied.
    probe = load_benchmark("wgmma_probe")
    case = probe.rows_classes_case(64, 0)
    registers = emulated.wgmma_tile_probe(case.x.to(torch.bfloat16), case.w.to(torch.bfloat16), "64")
    assert probe.check(case, registers, torch.bfloat16) == []
    swapped = registers.clone()
    swapped[:, 1:64:4], swapped[:, 2:64:4] = registers[:, 2:64:4], registers[:, 1:64:4]
    problems = probe.check(case, swapped, torch.bfloat16)
    assert problems[0] == "8192 of 16384 registers wrong", problems
    assert "the accumulator layout differs" in problems[1], problems
    assert "thread 0 (warpgroup 0, warp 0, lane 0) acc[1]: meant row 0, class 1 = 513; holds 265 (row 8, class 0)" \
        in problems, problems
    row, _ = probe.register_coordinates()
    unswizzled = torch.where(row % 8 == 0, registers[:, :64], 0.0)
    problems = probe.check(case, torch.cat([unswizzled, registers[:, 64:]], 1), torch.bfloat16)
    assert problems[0] == "14336 of 16384 registers wrong", problems
    assert not any("layout" in line for line in problems), problems
    assert "(hint: rows % 8 = 0 are right: the swizzle)" in problems[1], problems


def test_the_wgmma_tile_probe_names_bad_arguments(emulated):
    x = torch.zeros(128, 64, dtype=torch.bfloat16)
    assert emulated.wgmma_tile_probe(x, x, "64").shape == (256, 65)
    with pytest.raises(ValueError, match="tile must be '64', '32' or 'resident', got '48'"):
        emulated.wgmma_tile_probe(x, x, "48")
    with pytest.raises(ValueError, match="at most 128 rows each"):
        emulated.wgmma_tile_probe(torch.zeros(129, 64, dtype=torch.bfloat16), x, "64")
    with pytest.raises(ValueError, match="must both be bfloat16 or both float16"):
        emulated.wgmma_tile_probe(x, x.half(), "64")
    with pytest.raises(ValueError, match="a positive multiple of 8"):
        emulated.wgmma_tile_probe(x[:, :60], x[:, :60], "64")
    wide = torch.zeros(8, 520, dtype=torch.bfloat16)
    assert emulated.wgmma_tile_probe(wide, wide, "32").shape == (256, 65)
    with pytest.raises(ValueError, match="at most 512 for this tile"):
        emulated.wgmma_tile_probe(wide, wide, "resident")


def test_the_wgmma_weight_tile_probe_names_bad_arguments(emulated):
    x = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert emulated.wgmma_weight_tile_probe(x, x, x).shape == (256, 144)
    with pytest.raises(ValueError, match="x and w hold at most 64 rows each"):
        emulated.wgmma_weight_tile_probe(torch.zeros(65, 64, dtype=torch.bfloat16), x, x)
    with pytest.raises(ValueError, match="x, w and g must be bfloat16"):
        emulated.wgmma_weight_tile_probe(x, x, x.half())
    with pytest.raises(ValueError, match=r"g must be \(64, 64\)"):
        emulated.wgmma_weight_tile_probe(x, x, x[:, :32])
    with pytest.raises(ValueError, match="a positive multiple of 8 \\(at most 512\\)"):
        wide = torch.zeros(8, 520, dtype=torch.bfloat16)
        emulated.wgmma_weight_tile_probe(wide, wide, x)


def test_a_bad_row_tile_count_is_named(emulated, monkeypatch):
    monkeypatch.delenv("ARCFACE_EXT_ROW_TILES", raising=False)
    x, w, labels, grad = inputs(8, 32, 50, torch.bfloat16, seed=6)
    _, lse, _ = emulated.margin_softmax_forward(x, w, labels, *op_args())
    monkeypatch.setenv("ARCFACE_EXT_ROW_TILES", "0")
    message = "ARCFACE_EXT_ROW_TILES must be a positive count, got '0'"
    with pytest.raises(ValueError, match=message):
        emulated.margin_softmax_forward(x, w, labels, *op_args())
    with pytest.raises(ValueError, match=message):
        emulated.margin_softmax_backward(grad.float(), x, w, labels, lse, *op_args(), True, True)


def test_a_bad_pipeline_depth_is_named(emulated, monkeypatch):
    monkeypatch.setenv("ARCFACE_EXT_TILE_STAGES", "8")
    x, w, labels, _ = inputs(8, 32, 50, torch.bfloat16, seed=6)
    with pytest.raises(ValueError, match="ARCFACE_EXT_TILE_STAGES must be 3 to 5, got '8'"):
        emulated.margin_softmax_forward(x, w, labels, *op_args())
    # 5 stages (100 KB) do not fit the 99 KB a block may have on an sm_86, sm_89 or sm_120 GPU; 4 do.
    monkeypatch.setenv("ARCFACE_EMU_SMEM_PER_SM", "102400")
    monkeypatch.setenv("ARCFACE_EXT_TILE_STAGES", "5")
    with pytest.raises(ValueError, match="ARCFACE_EXT_TILE_STAGES=5 needs 110592 bytes of shared memory a "
                                         "block; this GPU allows 101376"):
        emulated.margin_softmax_forward(x, w, labels, *op_args())
    monkeypatch.setenv("ARCFACE_EXT_TILE_STAGES", "4")
    emulated.margin_softmax_forward(x, w, labels, *op_args())


def test_rewrite():
    source = """
void f(cudaStream_t stream) {
  fused_kernel<kBFloat16, scalar_t><<<grid, kTileThreads, cuda::kTileSmemBytes, stream>>>(a, b);
  other_kernel<acc_t>
      <<<blocks(n), 256, 0, stream>>>(c);
}
__global__ void k() { extern __shared__ __align__(16) uint16_t tile_smem[]; }
TORCH_LIBRARY_IMPL(arcface_ext, CUDA, m) {
  m.impl("margin_softmax_forward", &forward);
}
"""
    text, launches = build.rewrite(source)
    assert launches == 2
    assert ('::emu::launch(fused_kernel<kBFloat16, scalar_t>, "fused_kernel", grid, kTileThreads, '
            'cuda::kTileSmemBytes, stream)(a, b);') in text
    assert '::emu::launch(other_kernel<acc_t>, "other_kernel", blocks(n), 256, 0, stream)(c);' in text
    assert "uint16_t* tile_smem = ::emu::dynamic_shared<uint16_t>();" in text
    assert 'TORCH_LIBRARY(arcface_ext_emulated, m)' in text
    assert re.search(r'm\.def\("margin_softmax_forward\(Tensor embeddings, '
                     r'.*Tensor\? row_margins=None, bool check_labels=True\) -> ', text)


def test_every_launch_of_the_kernel_source_is_rewritten():
    source = build.KERNEL.read_text()
    text, launches = build.rewrite(source)
    assert launches == source.count("<<<") > 0
    assert "<<<" not in text and ">>>" not in text


def test_pointer_casts_are_rewritten_to_checked_ones():
    source = """
*reinterpret_cast<uint4*>(grad_block + i * ld + j) = *reinterpret_cast<const uint4*>(staged + r * kPitch);
*reinterpret_cast<ValuePair<at::BFloat16>*>(out + 8 * ni) = pair;
const auto address = reinterpret_cast<uintptr_t>(x.data_ptr());
"""
    text = build.rewrite_pointer_casts(source)
    assert ("*::emu::aligned_cast<uint4*>(grad_block + i * ld + j) = "
            "*::emu::aligned_cast<const uint4*>(staged + r * kPitch);") in text
    assert "*::emu::aligned_cast<ValuePair<at::BFloat16>*>(out + 8 * ni) = pair;" in text
    assert "reinterpret_cast<uintptr_t>(x.data_ptr())" in text  # not a pointer: left alone


@pytest.fixture(scope="module")
def runtime_checks(tmp_path_factory):
    """tests/emulator/runtime_checks.cpp built against runtime.h: runs one of its kernels, returning
    what it printed (the emulator's error, or "ok")."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path_factory.mktemp("runtime_checks") / "runtime_checks"
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{build.HERE}", str(build.HERE / "runtime_checks.cpp"),
                    "-o", str(binary)], check=True, capture_output=True)

    def run(case):
        return subprocess.run([str(binary), case], capture_output=True, text=True, timeout=60).stdout.strip()
    return run


@pytest.mark.parametrize("case, error", [
    # A GPU may hang, or count the returned threads as arrived: CUDA leaves it undefined.
    ("barrier_after_an_early_return", "a barrier not every thread reaches"),
    # 'misaligned address' on a GPU; x86 reads across it.
    ("misaligned_vector_load", "which is not 16-byte aligned"),
    # Dynamic shared memory starts after the static arrays (at 6784 here, as in the fused forward), not
    # at a swizzle atom: a descriptor of the unrounded address multiplies misplaced rows on a GPU.
    ("wgmma_unrounded", "start address 6784 is not in a swizzle atom's first row"),
    ("aligned_vector_load", None),
    ("wgmma_rounded", None),
])
def test_the_runtime_refuses_what_a_gpu_faults_on(runtime_checks, case, error):
    printed = runtime_checks(case)
    if error is None:
        assert printed == "ok"
    else:
        assert error in printed, printed


@pytest.mark.parametrize("workspace_bytes, sm_count, num_classes",
                         [(1 << 26, "1", 4100), (1000, "1", 4100), (400, "1", 4100), (1 << 26, "132", 8192)],
                         ids=["64MiB", "small", "tiny", "one-tile-segments"])
def test_segments_of_several_tiles(emulated, monkeypatch, workspace_bytes, sm_count, num_classes):
    # The fused forward gives each block a segment of class tiles sized for ~16 blocks an SM: with
    # one SM and 33 class tiles, 17 segments of 2 tiles (the last one short); a 1000-byte workspace
    # (20 rows x 2 statistics x 4 bytes a segment) makes them 8 tiles long, a 400-byte one 32. A GPU
    # gets there only at a large C (C = 1M on an H100, with one row tile) or a tiny workspace. With
    # 132 SMs and 8192 classes, 64 segments of one tile: two warps' worth for finalize's block.
    monkeypatch.setenv("ARCFACE_EMU_SM_COUNT", sm_count)
    x, w, labels, grad = inputs(20, 32, num_classes, torch.bfloat16, seed=4)
    args = op_args(workspace_bytes)
    ours = emulated.margin_softmax_forward(x, w, labels, *args)
    expected = cpu_op("margin_softmax_forward", x, w, labels, *args)
    for name, a, e in zip(("loss", "logsumexp", "target_cosine"), ours, expected):
        assert_close_report(a, e, atol=1e-5 * max(float(e.abs().max()), 1.0), rtol=1e-5, name=name)
