"""Builds arcface_ext._C: the CPU kernels always, the CUDA kernels when CUDA is available or
FORCE_CUDA=1. Honours TORCH_CUDA_ARCH_LIST (default "8.0+PTX;9.0a": A100 and the other sm_8x GPUs,
Hopper, whose arch-specific sm_90a code also has the wgmma tile, and through the sm_80 PTX, which the
driver compiles at first use, the GPUs after them), MAX_JOBS and DEBUG=1."""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(message):
    print(f"arcface_ext setup: {message}", file=sys.stderr)


def _openmp_flags():
    """["-fopenmp"] where the C++ compiler builds and links OpenMP code; else ["-fopenmp-simd"] where it
    takes that (the kernels' `omp simd` loops, no runtime needed), else []. Apple's clang has no
    OpenMP runtime: there the CPU kernels' at::parallel_for runs on one thread, instead of the install
    failing."""
    import shlex
    import subprocess
    import sysconfig
    import tempfile

    compiler = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    probes = (("-fopenmp", "#include <omp.h>\nint threads() { return omp_get_max_threads(); }\n", ["-shared", "-fPIC"]),
              ("-fopenmp-simd",
               "void twice(float* x, int n) {\n#pragma omp simd\n  for (int i = 0; i < n; ++i) x[i] *= 2;\n}\n",
               ["-c"]))
    with tempfile.TemporaryDirectory() as folder:
        source, output = os.path.join(folder, "probe.cpp"), os.path.join(folder, "probe.o")
        for flag, code, mode in probes:
            with open(source, "w") as f:
                f.write(code)
            try:
                result = subprocess.run([*compiler, flag, *mode, source, "-o", output], capture_output=True,
                                        timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if result.returncode == 0:
                if flag != "-fopenmp":
                    _log(f"{compiler[0]} does not build OpenMP code (-fopenmp): the CPU kernels will run on one thread")
                return [flag]
    _log(f"{compiler[0]} takes neither -fopenmp nor -fopenmp-simd: the CPU kernels will run on one thread")
    return []


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = force_cuda or (torch.cuda.is_available() and CUDA_HOME is not None)

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math lets the branch-free epilogue loops vectorise (clamps become vmaxps).
    openmp = _openmp_flags()
    # No -std: torch's BuildExtension passes the standard its headers need (C++17 in torch 2.11,
    # C++20 in 2.13; 2.15's headers do not compile as C++17).
    cxx = opt + [*openmp, "-fno-trapping-math", "-fno-math-errno"]
    # Python's own flags (sysconfig's CFLAGS) ask for -g: the CPU build's _C.so carried 10 MB of debug
    # information nobody asked for. DEBUG=1 keeps it.
    if not debug:
        cxx.append("-g0")
    # torch ships its own libgomp.so.1; linking by that soname reuses the copy torch has loaded.
    # The shared C++ runtime, named by its soname ahead of the driver's own -lstdc++. A g++ whose
    # library path finds libstdc++.a first (the GPU image's CXX: a wrapper passing -B to a gcc
    # folder, where -lstdc++ found the archive) otherwise puts a second, static libstdc++ in _C.so,
    # with its own uninitialised locale: every error message with a number in it segfaulted there.
    # A plain -lstdc++ finds that archive too; the soname cannot. test_packaging.py checks _C.so.
    link = [f for f in openmp if f == "-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])
    if not with_cuda:
        _log(f"building CPU-only (torch {torch.__version__}; set FORCE_CUDA=1 to build CUDA kernels)")
        return [CppExtension("arcface_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]

    # Without the PTX, a GPU newer than Hopper (compute capability 10.x, 12.x) would find no code for
    # any kernel: every CUDA call would fail.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    arches = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
    defines = [("WITH_CUDA", None)]
    if any(a.startswith("9.0a") for a in arches):
        # The host code may then choose the wgmma tile on a compute capability 9.0 GPU. Plain 9.0 code
        # beside it would leave the driver two builds to load there, one of them without the tile.
        defines.append(("ARCFACE_EXT_SM90A", None))
        if "9.0" in arches:
            arches = [a for a in arches if a != "9.0"]
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arches)
            _log("dropped 9.0 from TORCH_CUDA_ARCH_LIST: 9.0a builds the same GPUs' code")
    cuda_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    sources += [os.path.relpath(p, ROOT) for p in cuda_sources]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    # One nvcc call per source compiles every architecture in turn; --threads compiles them side by
    # side, within MAX_JOBS where it is set: 8.0 and 9.0a compiled in 112 s instead of 174 s on 2 cores
    # (.ci/compile_cuda.sh, session 18).
    # (Not -split-compile: its output can differ from one build to the next.)
    threads = min(len(arches), int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    if threads > 1:
        nvcc += ["--threads", str(threads)]
    _log(f"building CPU+CUDA for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"(CUDA_HOME={CUDA_HOME}, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')})")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 8):
        _log(f"torch {torch.__version__} has no GEMM with fp32 output for 16-bit inputs (2.8 has): the CUDA "
             "kernels will upcast those GEMMs' operands to fp32, as accurate and slower")
    return [CUDAExtension("arcface_ext._C", sources, define_macros=defines,
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
