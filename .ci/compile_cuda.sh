#!/usr/bin/env bash
# Proves without a GPU that every CUDA source of arcface_ext compiles for sm_80, sm_90 and sm_90a
# (Hopper's arch-specific target, whose code alone has the wgmma tile: setup.py's default list).
#
# The CPU torch wheel has no CUDA headers, so this fetches the CUDA build of the same torch
# version (the default manylinux wheel on the package index, about 0.5 GB; only its torch/include,
# about 60 MB, is kept, in a cache folder outside the clone that later runs on the machine reuse)
# and compiles csrc/cuda/*.cu (and csrc/cuda/*.cpp) to object files with the flags torch's
# CUDAExtension uses. The sources include no cuBLAS header,
# so nvcc with the CUDA runtime headers is all that is needed. Any compile error, any warning
# raised in csrc/, and any ptxas "Potential Performance Loss" or "warpgroup.wait is injected"
# advisory (a serialised wgmma pipeline, a wait ptxas added) fails the script. The ptxas
# resource report (registers, shared memory, spills
# per kernel) is written to build/cuda-compile/ptxas.log and summarised.
#
# Environment: PYTHON (python3), NVCC (nvcc), CUDA_ARCHS ("80 90 90a"), TORCH_VERSION (the installed
# torch's), ARCFACE_CUDA_HEADERS (the cache folder, by default ~/.cache/arcface_ext/cuda-headers),
# JOBS (2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
CUDA_ARCHS=${CUDA_ARCHS:-"80 90 90a"}
JOBS=${JOBS:-2}
CACHE=${ARCFACE_CUDA_HEADERS:-${XDG_CACHE_HOME:-$HOME/.cache}/arcface_ext/cuda-headers}
OUT=$ROOT/build/cuda-compile
START=$SECONDS

log() { echo "compile_cuda: $*" >&2; }

command -v "$NVCC" >/dev/null || { log "nvcc not found (set NVCC)"; exit 1; }
TORCH_VERSION=${TORCH_VERSION:-$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')}
PY_TAG=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
INCLUDE=$CACHE/torch-$TORCH_VERSION/torch/include

# ---- the CUDA build's headers ------------------------------------------------------------
if [[ ! -f $INCLUDE/.complete ]]; then
  log "fetching the CUDA build of torch $TORCH_VERSION for its headers"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The machine's pip configuration points at a local folder holding the CPU wheel, which would
  # win; ignore the config files and that variable so the package index's default wheel arrives.
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 --python-version "$PY_TAG" \
    "torch==$TORCH_VERSION" -d "$tmp" >&2
  wheel=$(ls "$tmp"/torch-*.whl)
  log "got $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
  rm -rf "$CACHE/torch-$TORCH_VERSION"
  mkdir -p "$CACHE/torch-$TORCH_VERSION"
  "$PYTHON" - "$wheel" "$CACHE/torch-$TORCH_VERSION" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith("torch/include/")])
EOF
  if [[ ! -f $INCLUDE/ATen/cuda/CUDAContext.h || ! -f $INCLUDE/c10/cuda/CUDAStream.h ]]; then
    log "$(basename "$wheel") has no CUDA headers: not the CUDA build of torch"
    exit 1
  fi
  touch "$INCLUDE/.complete"
  rm -rf "$tmp"
  trap - EXIT
fi

# ---- the flags torch's CUDAExtension would use (see setup.py) ------------------------------
mapfile -t TORCH_NVCC_FLAGS < <("$PYTHON" -c '
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
print("\n".join(COMMON_NVCC_FLAGS))')
CXX11_ABI=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
PY_INCLUDE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
CUDA_INCLUDE=$(dirname "$(command -v "$NVCC")")/../include
[[ -f $CUDA_INCLUDE/cuda_runtime.h ]] || CUDA_INCLUDE=${CUDA_HOME:-/usr/local/cuda}/include
DEFINES=(-DWITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
         "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI")
INCLUDES=(-I"$INCLUDE" -I"$INCLUDE/torch/csrc/api/include" -I"$PY_INCLUDE")
GENCODE=()
for arch in $CUDA_ARCHS; do GENCODE+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
# setup.py's default list also embeds sm_80's PTX (8.0+PTX), for GPUs newer than Hopper.
[[ " $CUDA_ARCHS " == *" 80 "* ]] && GENCODE+=(-gencode "arch=compute_80,code=compute_80")
# As setup.py: a build with sm_90a code tells the host code it may choose the wgmma tile.
[[ " $CUDA_ARCHS " == *" 90a "* ]] && DEFINES+=(-DARCFACE_EXT_SM90A)
# The C++ standard torch's BuildExtension passes where setup.py names none (torch 2.13's headers need
# C++20, torch 2.4's build with C++17).
CXX_STD=$("$PYTHON" -c '
import inspect, re, torch.utils.cpp_extension as c
print(re.search(r"cpp_flag_prefix \+ .(c\+\+\d+).", inspect.getsource(c.BuildExtension)).group(1))')
NVCC_FLAGS=("${TORCH_NVCC_FLAGS[@]}" --compiler-options -fPIC -O3 "-std=$CXX_STD" -lineinfo
            --expt-relaxed-constexpr "${GENCODE[@]}" --threads 2 -Xptxas -v)

rm -rf "$OUT"
mkdir -p "$OUT"
mapfile -t CU_SOURCES < <(cd "$ROOT" && ls csrc/cuda/*.cu 2>/dev/null || true)
mapfile -t CPP_SOURCES < <(cd "$ROOT" && ls csrc/cuda/*.cpp 2>/dev/null || true)
if [[ ${#CU_SOURCES[@]} -eq 0 ]]; then
  log "no CUDA sources in csrc/cuda"
  exit 1
fi
log "torch $TORCH_VERSION headers, $("$NVCC" --version | tail -1), -std=$CXX_STD, archs: $CUDA_ARCHS"

compile_one() {  # source -> object; its compiler output in $OUT/<name>.log
  local src=$1 name
  name=$(basename "$src")
  if [[ $src == *.cu ]]; then
    (cd "$ROOT" && "$NVCC" -c "$src" -o "$OUT/$name.o" "${DEFINES[@]}" "${INCLUDES[@]}" \
      "${NVCC_FLAGS[@]}") >"$OUT/$name.log" 2>&1
  else
    (cd "$ROOT" && "${CXX:-c++}" -c "$src" -o "$OUT/$name.o" -O3 "-std=$CXX_STD" -fPIC -Wall \
      "${DEFINES[@]}" "${INCLUDES[@]}" -I"$CUDA_INCLUDE") >"$OUT/$name.log" 2>&1
  fi
}

declare -A PIDS=()
failed=0
running=0
for src in "${CU_SOURCES[@]}" "${CPP_SOURCES[@]}"; do
  [[ -n $src ]] || continue
  compile_one "$src" &
  PIDS[$!]=$src
  running=$((running + 1))
  if ((running >= JOBS)); then
    wait -n || true
    running=$((running - 1))
  fi
done
for pid in "${!PIDS[@]}"; do
  if ! wait "$pid" 2>/dev/null; then :; fi
done
# `wait -n` loses exit codes, so judge each source by its object file and its log.
for src in "${CU_SOURCES[@]}" "${CPP_SOURCES[@]}"; do
  [[ -n $src ]] || continue
  name=$(basename "$src")
  if [[ ! -s $OUT/$name.o ]] || grep -qE "(error|Error)[ :]" "$OUT/$name.log"; then
    log "FAILED: $src"
    # The errors with their context; torch's own header warnings (C++20 bit-field initialisers
    # under -std=c++17, as older torch builds) would only bury them.
    grep -E -B2 -A4 "(error|Error)[ :]" "$OUT/$name.log" | head -80 >&2
    failed=1
  elif grep -E "csrc/[^ ]*\([0-9]+\): warning|csrc/[^ ]*:[0-9]+:[0-9]+: warning" "$OUT/$name.log" >&2; then
    log "FAILED: warnings in $src (above)"
    failed=1
  elif grep -E "Potential Performance Loss|warpgroup.wait is injected" "$OUT/$name.log" >&2; then
    # ptxas's C75xx advisories: a wgmma pipeline it serialised (its accumulators touched while in
    # flight, too few registers for it, ...), or a wait it had to add where the source has none.
    # The code still runs, but without the overlap the tile was built for (or with a wait nobody
    # placed), so it is an error here as a warning in csrc/ is.
    log "FAILED: ptxas serialised a wgmma pipeline or added a wait to it in $src (above)"
    failed=1
  else
    log "ok: $src"
  fi
done

# ---- resource report ------------------------------------------------------------------------
cat "$OUT"/*.cu.log 2>/dev/null | grep -E "^ptxas info|bytes stack frame" >"$OUT/ptxas.log" || true
if [[ -s $OUT/ptxas.log ]]; then
  "$PYTHON" - "$OUT/ptxas.log" <<'EOF' >&2
import re, subprocess, sys
lines = open(sys.argv[1]).read().splitlines()
# ptxas prints, per entry function: "Compiling entry function", "Function properties", the
# stack frame / spill line, then "Used N registers".
rows, name, arch, spill = [], None, None, (0, 0)
for line in lines:
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
    if m:
        name, arch, spill = m.group(1), m.group(2), (0, 0)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spill = (int(m.group(2)), int(m.group(3)))
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append([arch, int(m.group(1)), int(smem.group(1)) if smem else 0, name, *spill])
        name = None
try:
    names = subprocess.run(["c++filt"], input="\n".join(r[3] for r in rows), capture_output=True,
                           text=True).stdout.splitlines()
except OSError:
    names = [r[3] for r in rows]
print(f"{'arch':6} {'regs':>4} {'smem':>5} {'spill st/ld':>11}  kernel")
for r, pretty in sorted(zip(rows, names), key=lambda t: (t[0][0], t[1])):
    pretty = re.sub(r"\(.*", "", pretty.replace("arcface_ext::(anonymous namespace)::", ""))
    print(f"{r[0]:6} {r[1]:>4} {r[2]:>5} {r[4]:>5}/{r[5]:<5}  {pretty}")
spills = [r for r in rows if r[4] or r[5]]
print(f"{len(rows)} kernels, {len(spills)} with spills")
EOF
fi
log "done in $((SECONDS - START)) s"
exit $failed
