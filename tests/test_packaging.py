"""The source distribution carries everything the extension is compiled from: every file under
csrc/ (CUDA sources and headers too, whichever machine makes the sdist), so that a wheel built
from it elsewhere compiles; and the built extension shares the process's C++ runtime."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked_sources():
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        listed = subprocess.run(["git", "ls-files", "csrc"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    # A copy of the tree inside another checkout (.ci/oldest_torch.sh's, under build/) is not one.
    if os.path.realpath(top) != os.path.realpath(REPO):
        pytest.skip("needs a git checkout of this tree")
    return {line for line in listed.stdout.splitlines() if line}


@pytest.mark.slow
def test_sdist_holds_every_source_and_header(tmp_path):
    sources = tracked_sources()
    assert {"csrc/margin.h", "csrc/checks.h", "csrc/cuda/margin_softmax_kernel.cu"} <= sources
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(sources - packed)
    assert not missing, f"the sdist lacks {missing}: see MANIFEST.in"
    assert {"README.md", "docs/api.md", "arcface_ext/functional.py"} <= packed
    assert "arcface_ext/py.typed" in packed, "the sdist lacks the PEP 561 marker arcface_ext/py.typed: see MANIFEST.in"
    assert not [name for name in packed if name.startswith("tests/")], "a partial test suite in the sdist"


@pytest.mark.slow
def test_wheel_carries_the_py_typed_marker(tmp_path):
    # A wheel's Python files are build_py's output (the extension aside). Without arcface_ext/py.typed beside them
    # (pyproject.toml's package-data; setuptools 69 and later add one by themselves too), mypy skips the installed
    # package: "module is installed, but missing library stubs or py.typed marker".
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "arcface_ext" / "functional.py").is_file()
    assert (tmp_path / "arcface_ext" / "py.typed").is_file(), "the wheel would lack arcface_ext/py.typed"


def test_extension_uses_the_shared_cxx_runtime():
    # A second, static libstdc++ inside _C.so (what a g++ whose library path finds libstdc++.a
    # first makes) has its own uninitialised locale: on the H200 image every error message with a
    # number in it segfaulted; on Debian's g++ 12 the number is silently dropped. setup.py names
    # the shared runtime by its soname.
    arcface_ext = pytest.importorskip("arcface_ext")
    if not arcface_ext.extension_available():
        pytest.skip("the extension is not built")
    if shutil.which("nm") is None:
        pytest.skip("needs binutils' nm")
    import arcface_ext._C as ext
    listed = subprocess.run(["nm", "-D", "--defined-only", ext.__file__], capture_output=True, text=True, check=True)
    defined = {line.split()[-1] for line in listed.stdout.splitlines() if line.strip()}
    assert not {"__cxa_throw", "__cxa_get_globals"} & defined, f"{ext.__file__} carries its own libstdc++"


def build_arguments(monkeypatch, *, cuda, **env):
    """What setup.py would hand CUDAExtension (cuda=True: FORCE_CUDA=1, no toolkit needed) or, for a
    CPU-only build, CppExtension."""
    import runpy

    import setuptools
    import torch.utils.cpp_extension as cpp_extension

    for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):  # setup.py sets the first: restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("FORCE_CUDA", "1" if cuda else "0")
    if not cuda:
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setattr(cpp_extension, "CUDAExtension" if cuda else "CppExtension",
                        lambda name, sources, **kwargs: dict(kwargs, sources=sources))
    runpy.run_path(os.path.join(REPO, "setup.py"), run_name="setup")
    (extension,) = captured["ext_modules"]
    return extension


def test_cuda_build_compiles_its_architectures_side_by_side(monkeypatch):
    # nvcc compiles a source's architectures one after another unless told --threads (8.0 and 9.0a:
    # 174 s alone, 112 s side by side on 2 cores); MAX_JOBS caps it.
    extension = build_arguments(monkeypatch, cuda=True, MAX_JOBS="8")
    nvcc = extension["extra_compile_args"]["nvcc"]
    assert nvcc[nvcc.index("--threads") + 1] == "2"  # the default list's two architectures
    assert ("ARCFACE_EXT_SM90A", None) in extension["define_macros"]
    assert "csrc/cuda/margin_softmax_kernel.cu" in extension["sources"]
    assert "--threads" not in build_arguments(monkeypatch, cuda=True, MAX_JOBS="1")["extra_compile_args"]["nvcc"]
    assert "--threads" not in build_arguments(monkeypatch, cuda=True,
                                              TORCH_CUDA_ARCH_LIST="9.0a")["extra_compile_args"]["nvcc"]


def test_cuda_build_against_torch_before_2_8_says_its_gemms_upcast(monkeypatch, capfd):
    # Torch < 2.8 has no GEMM with fp32 output for 16-bit inputs: the kernels then upcast (see
    # gemm_acc_out), and the build says so.
    import torch

    monkeypatch.setattr(torch, "__version__", "2.7.1+cu128")
    build_arguments(monkeypatch, cuda=True)
    assert "torch 2.7.1+cu128 has no GEMM with fp32 output for 16-bit inputs" in capfd.readouterr().err
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    build_arguments(monkeypatch, cuda=True)
    assert "no GEMM with fp32 output" not in capfd.readouterr().err


def test_build_leaves_out_openmp_where_the_compiler_lacks_it(monkeypatch, tmp_path, capfd):
    # Apple's clang rejects -fopenmp: the install must still build (the CPU kernels then run on one
    # thread), where passing the flag unconditionally failed it.
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    extension = build_arguments(monkeypatch, cuda=False, CXX="g++")
    assert "-fopenmp" in extension["extra_compile_args"]["cxx"] and "-fopenmp" in extension["extra_link_args"]
    compiler = tmp_path / "clang-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; '
                        'exit 1; }; done\nexec g++ "$@"\n')
    compiler.chmod(0o755)
    extension = build_arguments(monkeypatch, cuda=False, CXX=str(compiler))
    # (its `omp simd` loops still vectorise: -fopenmp-simd needs no OpenMP runtime)
    assert "-fopenmp-simd" in extension["extra_compile_args"]["cxx"]
    assert "-fopenmp" not in extension["extra_compile_args"]["cxx"] + extension["extra_link_args"]
    assert "the CPU kernels will run on one thread" in capfd.readouterr().err


def run_lowest_pins(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, ".ci", "lowest_pins.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_extras_have_lower_bounds_that_the_oldest_torch_stage_installs():
    # numpy 1.x broke every training run unseen, as every CI stage installed the newest numpy: each
    # requirement of the extras the tests use says the oldest version it works with, and
    # .ci/oldest_torch.sh installs exactly those (lowest_pins.py's pins, in each of its pip commands).
    pytest.importorskip("tomllib")
    result = run_lowest_pins("train", "onnx", "test")
    assert result.returncode == 0, result.stderr
    pins = dict(line.split("==") for line in result.stdout.splitlines())
    assert {"numpy", "pillow", "matplotlib", "tqdm", "pyyaml", "onnx", "onnxruntime", "pytest"} <= set(pins)
    assert pins["numpy"].startswith("1."), "the oldest numpy admitted is a 1.x: CI tests it"
    with open(os.path.join(REPO, ".ci", "oldest_torch.sh"), encoding="utf-8") as f:
        stage = f.read()
    assert "lowest_pins.py train test" in stage
    installs = [line for line in stage.splitlines()
                if line.startswith("python -m pip install") and ("torch==" in line or ".[train,test]" in line)]
    assert len(installs) == 2 and all('"${PINS[@]}"' in line for line in installs), installs


def test_lowest_pins_takes_the_highest_bound_and_rejects_a_requirement_without_one(tmp_path):
    pytest.importorskip("tomllib")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project.optional-dependencies]\n'
                         'a = ["numpy>=1.24.2", "Py_YAML >= 6.0, <7"]\nb = ["numpy>=1.25.0,!=1.26.1"]\nc = ["tqdm"]\n')
    result = run_lowest_pins("--pyproject", str(pyproject), "a", "b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["numpy==1.25.0", "py-yaml==6.0"]
    for extras, message in ((["a", "c"], "extra 'c': 'tqdm' has no lower bound"), (["d"], "no extra 'd'")):
        result = run_lowest_pins("--pyproject", str(pyproject), *extras)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = run_lowest_pins("--pyproject", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "--pyproject" in result.stderr and "Traceback" not in result.stderr


def test_lowest_pins_names_a_requirement_form_it_does_not_read(tmp_path):
    # A requirement with a marker or extras (valid PEP 508, each with its lower bound here), or a URL, was said
    # to have "no lower bound": the one line says what the script does not read.
    pytest.importorskip("tomllib")
    pyproject = tmp_path / "pyproject.toml"
    for requirement in ("tomli>=1.1; python_version < '3.11'", "onnx[reference]>=1.15.0",
                        "pkg @ https://example.org/pkg-1.0.tar.gz"):
        pyproject.write_text(f'[project.optional-dependencies]\na = ["{requirement}"]\n')
        result = run_lowest_pins("--pyproject", str(pyproject), "a")
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.splitlines() == [f"lowest_pins.py: extra 'a': {requirement!r} has extras, a marker or a "
                                              "URL, which this script does not read (name>=VERSION[,...] only)"]
