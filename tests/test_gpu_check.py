"""benchmarks/gpu_check.sh is the GPU machine's one call, and a GPU session has minutes of device time:
a stage that names an impl, a profile path, a probe tile or a kernel that no longer exists would
waste it. These tests read the script and check every such name against the scripts and the CUDA
source here, without a GPU."""
import pathlib
import re
import subprocess

import pytest

from conftest import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def option_values(option):
    """The values the script gives `option` (a word, or a single-quoted string), comments excluded."""
    text = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [quoted or word
            for quoted, word in re.findall(rf"(?<=\s){re.escape(option)}\s+(?:'([^']*)'|([^\s'\\]+))", text)]


def array_values(name):
    """The words of the script's bash array `name=(...)`."""
    match = re.search(rf"^{name}=\(([^)]*)\)", SCRIPT.read_text(), re.M)
    assert match, name
    return match.group(1).split()


def listed(option, array):
    """The names the script gives `option` in comma-separated lists, `{}` standing for each word of
    `array` (the stages that run `each` of them in a process of its own)."""
    names = {name for value in option_values(option) for name in value.split(",")}
    if "{}" in names:
        names = (names - {"{}"}) | set(array_values(array))
    return names


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_default_stage_is_known():
    text = SCRIPT.read_text()
    known = set(re.search(r'KNOWN=" ([^"]*) "', text).group(1).split())
    defaults = set(re.search(r"STAGES=\(([^)]*)\)\n", text.split("[[ ${#STAGES[@]} -eq 0 ]] && ", 1)[1]).group(1)
                   .split())
    assert defaults <= known, defaults - known
    cases = set(re.findall(r"^    ([a-z0-9-]+)\)", text, re.M))
    assert known - {"--source-hash"} <= cases, (known - {"--source-hash"}) - cases


def test_every_benchmark_impl_is_one_bench_loss_has():
    impls = listed("--impls", "WGMMA_IMPLS")
    assert {"ours", "ours-wgmma", "ours-wgmma-resident", "ours-wgmma-weight", "floor"} <= impls
    assert set(array_values("WGMMA_IMPLS")) == {impl for impl in load_benchmark("bench_loss").IMPLS
                                               if impl.startswith("ours-wgmma")}
    assert impls <= set(load_benchmark("bench_loss").IMPLS), impls - set(load_benchmark("bench_loss").IMPLS)


def test_every_profile_path_is_one_profile_loss_has():
    paths = listed("--paths", "WGMMA_PATHS")
    assert {"fused", "wgmma", "wgmma-resident", "wgmma-weight"} <= paths
    assert set(array_values("WGMMA_PATHS")) == {path for path in load_benchmark("profile_loss").PATHS
                                               if path.startswith("wgmma")}
    assert paths <= set(load_benchmark("profile_loss").PATHS), paths - set(load_benchmark("profile_loss").PATHS)


def test_the_probe_runs_every_tile_in_a_process_of_its_own():
    probe = load_benchmark("wgmma_probe")
    line = (r'^\s+run_stage wgmma-probe .* benchmarks/wgmma_probe.py --tiles \{\} \\\n'
            r'\s+-- "\$\{WGMMA_TILES\[@\]\}"$')
    assert re.search(line, SCRIPT.read_text(), re.M)
    assert set(probe.TILES) == {"64", "32", "resident", "weight"} == set(array_values("WGMMA_TILES"))


def test_each_runs_a_command_a_value_and_goes_on_after_a_failure(tmp_path):
    # The script's `each`, run by bash as the stages run it.
    function = re.search(r"^each\(\) \{.*?^\}\n", SCRIPT.read_text(), re.M | re.S).group(0)
    script = function + 'each sh -c "echo {}; [ {} != b ]" -- a b c; echo "rc=$?"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.stdout.split() == ["---", "a", "a", "---", "b", "b", "---", "c", "c", "rc=1"], result.stdout


def kernel_names():
    source = (ROOT / "csrc" / "cuda" / "margin_softmax_kernel.cu").read_text()
    return set(re.findall(r"__global__ void(?: __launch_bounds__\([^)]*\))?\s+(\w+)\(", source))


def alternatives(pattern):
    """The concrete names a pattern of alternatives and one-level groups stands for:
    'a_(b|c)_d|e' -> ['a_b_d', 'a_c_d', 'e']."""
    tops, depth, start = [], 0, 0
    for i, char in enumerate(pattern + "|"):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "|" and depth == 0:
            tops.append(pattern[start:i])
            start = i + 1
    out = []
    for top in tops:
        group = re.search(r"\(([^()]*)\)", top)
        out += [top.replace(group.group(0), choice) for choice in group.group(1).split("|")] if group else [top]
    return out


def test_alternatives():
    assert alternatives("a_(b|c)_d|e") == ["a_b_d", "a_c_d", "e"]


@pytest.mark.parametrize("pattern", sorted({value[len("regex:"):] for value in option_values("-k")
                                            if value.startswith("regex:")}))
def test_every_ncu_kernel_filter_matches_each_kernel_it_names(pattern):
    # ncu -k 'regex:...' profiles the kernels whose names the pattern finds: each name it stands for
    # must be a kernel of the CUDA source.
    names = kernel_names()
    assert {"fused_forward_kernel", "fused_forward_wgmma_kernel", "fused_backward_wgmma_resident_kernel"} <= names
    for concrete in alternatives(pattern):
        assert any(re.search(concrete, name) for name in names), (pattern, concrete, sorted(names))


def test_every_test_that_forces_a_wgmma_tile_is_in_the_wgmma_stage():
    # The cuda stage runs tests/test_cuda.py -k "not wgmma" and cuda-wgmma runs -k wgmma, so that a
    # tile the hardware reads otherwise than the emulator cannot use up the other paths' --maxfail (or
    # crash their run). A test that always turns a wgmma tile on must say wgmma in its name; otherwise
    # it runs with the others and never in cuda-wgmma (session 18 found three such). Tests that turn it
    # on for some parameters only get it from their ids ("fused-wgmma", "wgmma-weight").
    import ast

    source = (ROOT / "tests" / "test_cuda.py").read_text()
    forced = re.compile(r'use_wgmma\(monkeypatch, True\)|setenv\("ARCFACE_EXT_WGMMA", "(?!0")')
    def forces(test):  # a statement of the test's own body, not one under a condition
        return any(isinstance(statement, ast.Expr) and forced.search(ast.get_source_segment(source, statement))
                   for statement in test.body)

    offenders = [node.name for node in ast.parse(source).body
                 if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and forces(node)
                 and "wgmma" not in node.name]
    assert not offenders, f"rename to say wgmma: {offenders}"


# ---- the whole script, run with stand-ins for python and the GPU tools ---------------------------
# The one call's control flow (stage order, the time budget, `each`'s processes, a stage that fails
# or a build that does not load) checked end to end here, where only its names were before.

FAKE_PYTHON = r"""#!/usr/bin/env bash
args="$*"
printf '%s\n' "${args//$'\n'/ }" >> "$STUB_LOG"
case "$*" in
  *"import xdist"*|*"import pytest_timeout"*) exit 1 ;;  # the plugins are absent here
  *"CUDA kernels registered"*)
    [[ -n ${STUB_NO_KERNELS:-} ]] && { echo "AssertionError: no CUDA kernels" >&2; exit 1; }
    echo "CUDA kernels registered"; exit 0 ;;
  *"import torch; print"*) echo "torch (stand-in)"; exit 0 ;;
esac
[[ -n ${STUB_FAIL:-} && "$*" == *"$STUB_FAIL"* ]] && { echo "stand-in: fault in $*"; exit 134; }
exit 0
"""
# ncu and compute-sanitizer run the program after their options; nvidia-smi and nvcc say who they are.
WRAPPER = '#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 != "$PYTHON" ]]; do shift; done\nexec "$@"\n'
STAND_INS = {"python": FAKE_PYTHON, "ncu": WRAPPER, "compute-sanitizer": WRAPPER,
             "nvidia-smi": "#!/bin/sh\necho 'NVIDIA H200 (stand-in)'\n",
             "nvcc": "#!/bin/sh\necho nvcc; echo stand-in\n"}
DEFAULT_STAGE_RUNS = ["build", "cuda", "wgmma-probe", "cuda-wgmma", "bench", "bench-wgmma", "memcheck",
                      "memcheck-wgmma", "profile", "profile-wgmma", "profile-100k", "host", "ncu-wgmma",
                      "ncu-resident", "ncu-weight", "ncu", "ncu-stalls", "racecheck-wgmma", "racecheck", "train",
                      "sweep-16MiB", "sweep-64MiB", "sweep-128MiB", "sweep-256MiB", "suite"]


def dry_run(tmp_path, *stages, budget=565, **env):
    """Runs gpu_check.sh with the stand-ins; (return code, summary lines, python's command lines)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "python.log"
    environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
                       OUT=str(out), GPU_CHECK_BUDGET=str(budget), STUB_LOG=str(log), **env)
    result = subprocess.run(["bash", str(SCRIPT), *stages], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=120)
    summary = (out / "summary.log").read_text().splitlines() if (out / "summary.log").exists() else []
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, summary, calls, result.stdout + result.stderr


def stage_lines(summary):
    """{stage name: its summary line} for the stages that ran or were skipped."""
    return {line.split()[0]: line for line in summary if re.match(r"\S+\s+(rc=|skipped)", line)}


def test_a_dry_run_of_every_default_stage(tmp_path):
    rc, summary, calls, output = dry_run(tmp_path)
    assert rc == 0, output[-3000:]
    lines = stage_lines(summary)
    assert list(lines) == DEFAULT_STAGE_RUNS, summary
    assert all("rc=0" in line for line in lines.values()), summary
    assert summary[0] == "NVIDIA H200 (stand-in)"
    # One process per wgmma variant, each named once: a fault in one must not end the others.
    for tile in array_values("WGMMA_TILES"):
        assert sum(f"benchmarks/wgmma_probe.py --tiles {tile}" in call for call in calls) == 1, tile
    for impl in array_values("WGMMA_IMPLS"):
        assert sum(f"--impls ours,{impl} " in call for call in calls) == 1, impl
    for path in array_values("WGMMA_PATHS"):
        assert any(call.endswith(f"benchmarks/profile_loss.py --paths {path}") for call in calls), path
    assert sum("benchmarks/sanitize_case.py wgmma" in call for call in calls) == 2  # memcheck, racecheck


def test_a_failing_variant_leaves_the_others_and_the_later_stages_running(tmp_path):
    rc, summary, calls, output = dry_run(tmp_path, "cuda", "bench-wgmma", STUB_FAIL="--tiles 64")
    lines = stage_lines(summary)
    assert "rc=134" in lines["wgmma-probe"], summary
    assert all("rc=0" in lines[name] for name in ("cuda", "cuda-wgmma", "bench-wgmma")), summary
    assert all(any(f"--tiles {tile}" in call for call in calls) for tile in ("32", "resident", "weight"))


@pytest.mark.parametrize("env", [{"STUB_FAIL": "pip install"}, {"STUB_NO_KERNELS": "1"}],
                         ids=["compile-error", "no-kernels"])
def test_a_build_without_cuda_kernels_stops_the_call(tmp_path, env):
    rc, summary, calls, output = dry_run(tmp_path, "build", "cuda", "bench", **env)
    assert "cuda" not in stage_lines(summary) and "bench" not in stage_lines(summary), summary
    assert any("the other stages were not run" in line or "were not run" in line for line in summary), summary
    assert not any("-m pytest" in call for call in calls), calls


def test_stages_past_the_budget_are_skipped_and_said_so(tmp_path):
    # 50 s of budget leave 35 after the summary's 15: the test stages (minimum 30, 10, 20) run, the
    # benchmark (minimum 60) does not.
    rc, summary, calls, output = dry_run(tmp_path, "cuda", "bench", budget=50)
    lines = stage_lines(summary)
    assert all("rc=0" in lines[name] for name in ("cuda", "wgmma-probe", "cuda-wgmma")), summary
    assert "skipped" in lines["bench"] and "needs 60" in lines["bench"], summary
    assert not any("bench_loss.py" in call for call in calls), calls


def test_the_optional_stages_run(tmp_path):
    rc, summary, calls, output = dry_run(tmp_path, "fuzz", "max-c", "bench-core", "loader")
    assert rc == 0 and all("rc=0" in line for line in stage_lines(summary).values()), output[-3000:]
    assert list(stage_lines(summary)) == ["fuzz", "max-c", "bench-core", "loader"], summary
    assert any(call.endswith("tests/test_fuzz.py") for call in calls), calls
    assert any("benchmarks/bench_loader.py --device cuda" in call for call in calls), calls


@pytest.mark.parametrize("name", ["bench_loss", "bench_int8"])
def test_a_benchmark_killed_as_it_writes_its_results_keeps_the_file_of_before(name, tmp_path, monkeypatch):
    # gpu_check.sh runs the benchmarks under time limits, and a kill (or a full disk) during the write
    # truncated the results file, the earlier rows with it: they are written to a temporary, then renamed.
    import json

    bench = load_benchmark(name)
    write = (lambda rows, out: bench.write_rows(rows, out)) if name == "bench_loss" else \
        (lambda rows, out: bench.write_rows(out, {"git": "abc"}, rows))
    out = str(tmp_path / "results" / "rows.json")
    write([{"impl": "ours", "ms": 1.0}], out)
    before = pathlib.Path(out).read_text()
    dump = json.dump

    def killed_half_way(content, f, **kwargs):
        f.write(json.dumps(content)[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        write([{"impl": "ours", "ms": 1.0}, {"impl": "eager", "ms": 3.0}], out)
    monkeypatch.setattr(json, "dump", dump)
    assert pathlib.Path(out).read_text() == before and json.loads(before)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["rows.json"]
