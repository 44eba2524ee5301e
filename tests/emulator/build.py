"""Builds csrc/cuda/margin_softmax_kernel.cu for the CPU emulator (runtime.h) and loads it.

The source is compiled as it is, host code included, with four mechanical rewrites that plain C++
cannot express otherwise: every launch ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::emu::launch(kernel, "kernel", grid, block, smem, stream)(args)``, the dynamic shared array becomes a
pointer to the emulated block's dynamic shared memory, each static shared array (in the .cu and in the
.cuh headers, whose rewritten copies sit beside the generated source) becomes an
``::emu::SharedArray``, which checks its bounds and races, and the CUDA registration becomes the ops
``arcface_ext_emulated::margin_softmax_forward`` / ``margin_softmax_backward`` (same schema as the
real ops, defaults included; they take CPU tensors, which play the part of device memory). The stand-in headers in
``include/`` replace the CUDA runtime, cuda_fp16 and c10/cuda headers.

With ARCFACE_EMU_ASAN=1 the build is instrumented by AddressSanitizer (its own build folder): an
out-of-bounds read or write of a kernel, in global or shared memory, then stops the process with a
report, as compute-sanitizer's memcheck would on a GPU. The process must load the ASan runtime first,
and libstdc++ with it (else ASan cannot find the real __cxa_throw when an op raises):

    LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \
        ASAN_OPTIONS=detect_leaks=0 ARCFACE_EMU_ASAN=1 ARCFACE_EXT_EMULATE_CUDA=1 python -m pytest tests/test_cuda.py

``load()`` builds once per process (torch.utils.cpp_extension caches the build by its source,
which embeds a hash of every header it includes) and returns ``torch.ops.arcface_ext_emulated``.
"""
import hashlib
import os
import pathlib
import re

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNEL = ROOT / "csrc" / "cuda" / "margin_softmax_kernel.cu"
HEADERS = sorted([*(ROOT / "csrc").glob("*.h"), *(ROOT / "csrc" / "cuda").glob("*.cuh"), HERE / "runtime.h",
                  *(HERE / "include").rglob("*.h")])

LAUNCH = re.compile(r"<<<(.*?)>>>\s*\(", re.S)
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\[\];")
STATIC_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)((?:\[[^\]]+\])+);")
# reinterpret_cast<T*>( with T possibly a template (`ValuePair<at::BFloat16>`).
POINTER_CAST = re.compile(r"reinterpret_cast<((?:[^<>;()]|<[^<>;()]*>)*\*)\s*>\s*\(")
REGISTRATION = "TORCH_LIBRARY_IMPL(arcface_ext, CUDA, m)"

# mm with fp32 output for 16-bit operands (what the cuBLAS path asks of at::mm_out) has no CPU
# kernel in ATen; the emulated device gets one that multiplies in fp32, as cuBLAS accumulates.
EXTRA = r"""
namespace arcface_ext_emulator {
at::Tensor& mm_dtype_out(const at::Tensor& self, const at::Tensor& mat2, at::ScalarType out_dtype, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == out_dtype, "mm.dtype_out: out has the wrong dtype");
  TORCH_CHECK(out.size(0) == self.size(0) && out.size(1) == mat2.size(1), "mm.dtype_out: out has the wrong shape");
  out.copy_(at::mm(self.to(at::kFloat), mat2.to(at::kFloat)));
  return out;
}
}  // namespace arcface_ext_emulator

TORCH_LIBRARY_IMPL(aten, CPU, m) { m.impl("mm.dtype_out", &arcface_ext_emulator::mm_dtype_out); }

// The names of the kernels launched since the last call, one a line, in launch order.
std::string take_launch_log() {
  std::string names;
  for (const std::string& name : ::emu::launch_log()) names += name + "\n";
  ::emu::launch_log().clear();
  return names;
}
TORCH_LIBRARY_FRAGMENT(arcface_ext_emulated, m) { m.def("take_launch_log() -> str", &take_launch_log); }
"""


def kernel_expression_start(text, end):
    """Where the kernel expression that ends just before text[end] begins: a possibly qualified
    name with template arguments (`cuda::fused_forward_kernel<kBFloat16, scalar_t>`)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {"<": -1, ">": 1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def real_schema(name):
    """The schema of arcface_ext::<name> without its namespace, as arcface_ext._C defines it."""
    import arcface_ext  # noqa: F401  (loads the real library)

    schema = str(getattr(torch.ops.arcface_ext, name).default._schema)
    return schema.split("::", 1)[1]


def rewrite_shared_arrays(text):
    """`__shared__ T name[A][B];` -> `static ::emu::SharedArray<T, A, B> name("name");` (race
    detection and bounds checks on every element access); no other __shared__ may remain."""
    def array(match):
        dims = ", ".join(d.strip() for d in re.findall(r"\[([^\]]+)\]", match.group(3)))
        return f'static ::emu::SharedArray<{match.group(1)}, {dims}> {match.group(2)}("{match.group(2)}");'

    text = STATIC_SHARED.sub(array, text)
    if "__shared__" in text:
        raise RuntimeError("a __shared__ declaration the emulator build does not rewrite")
    return text


def rewrite_pointer_casts(text):
    """`reinterpret_cast<T*>(p)` -> `::emu::aligned_cast<T*>(p)`, which checks that p is aligned for T
    (a vector load or store through a misaligned pointer faults on a GPU)."""
    return POINTER_CAST.sub(r"::emu::aligned_cast<\1>(", text)


def rewrite(source):
    """The kernel source as the emulator compiles it (see the module docstring)."""
    out, position, launches = [], 0, 0
    for match in LAUNCH.finditer(source):
        start = kernel_expression_start(source, match.start())
        kernel = source[start:match.start()].strip()
        if not re.fullmatch(r"[\w:]+(<[^;{}]*>)?", kernel):
            raise RuntimeError(f"cannot parse the kernel of a launch: {kernel!r}")
        if start < position:
            raise RuntimeError("overlapping launches")
        out.append(source[position:start])
        name = kernel.split("<")[0].split("::")[-1]
        out.append(f"::emu::launch({kernel}, \"{name}\", {' '.join(match.group(1).split())})(")
        position = match.end()
        launches += 1
    out.append(source[position:])
    text = "".join(out)
    if launches == 0:
        raise RuntimeError("no kernel launches found")
    text, shared = DYNAMIC_SHARED.subn(r"\1* \2 = ::emu::dynamic_shared<\1>();", text)
    if shared == 0:
        raise RuntimeError("no dynamic shared memory declaration found")
    text = rewrite_pointer_casts(rewrite_shared_arrays(text))
    if text.count(REGISTRATION) != 1:
        raise RuntimeError("expected one CUDA registration block")
    text = text.replace(REGISTRATION, "TORCH_LIBRARY(arcface_ext_emulated, m)")
    head, tail = text.rsplit("TORCH_LIBRARY(arcface_ext_emulated, m)", 1)
    tail, registered = re.subn(r'm\.impl\("(\w+)"', lambda m: f'm.def("{real_schema(m.group(1))}"', tail)
    if registered == 0:
        raise RuntimeError("no op registrations found")
    return head + "TORCH_LIBRARY(arcface_ext_emulated, m)" + tail, launches


def generated_source():
    digest = hashlib.sha256()
    for header in HEADERS:
        digest.update(header.read_bytes())
    body, launches = rewrite(KERNEL.read_text())
    return (f"// Generated by tests/emulator/build.py from {KERNEL.relative_to(ROOT)} ({launches} launches "
            f"rewritten); headers {digest.hexdigest()[:16]}. Do not edit.\n"
            "#define ARCFACE_EXT_EMULATE 1\n"
            "#define ARCFACE_EXT_SM90A 1\n"  # the emulated GPU runs the wgmma tile (sm_90a) too
            f'#line 1 "{KERNEL}"\n{body}\n{EXTRA}')


_LOADED = None


def write_if_changed(path, text):
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def load(verbose=False):
    """Builds (or reuses) the emulated kernels and returns torch.ops.arcface_ext_emulated."""
    global _LOADED
    if _LOADED is None:
        from torch.utils import cpp_extension

        asan = os.environ.get("ARCFACE_EMU_ASAN", "0") not in ("", "0")
        default_dir = ROOT / "build" / ("cuda_emulator_asan" if asan else "cuda_emulator")
        build_dir = pathlib.Path(os.environ.get("ARCFACE_EMU_BUILD_DIR", default_dir))
        build_dir.mkdir(parents=True, exist_ok=True)
        # The CUDA headers the kernel includes ("reductions.cuh", ...), with their shared arrays
        # rewritten, beside the generated source: a quoted include finds them there first.
        for header in sorted((ROOT / "csrc" / "cuda").glob("*.cuh")):
            write_if_changed(build_dir / header.name,
                             f'#line 1 "{header}"\n' + rewrite_pointer_casts(rewrite_shared_arrays(header.read_text())))
        write_if_changed(build_dir / "margin_softmax_kernel_emulated.cpp", generated_source())
        source = build_dir / "margin_softmax_kernel_emulated.cpp"
        sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
        cpp_extension.load(
            name="arcface_ext_cuda_emulated_asan" if asan else "arcface_ext_cuda_emulated", sources=[str(source)],
            build_directory=str(build_dir),
            extra_include_paths=[str(HERE / "include"), str(HERE), str(ROOT / "csrc" / "cuda")],
            extra_cflags=["-O1" if asan else "-O2", "-Wno-unknown-pragmas", "-Wno-attributes", *sanitize],
            extra_ldflags=[*sanitize, "-l:libstdc++.so.6"],  # the shared C++ runtime, as setup.py links it
            is_python_module=False, verbose=verbose)
        _LOADED = torch.ops.arcface_ext_emulated
    return _LOADED
