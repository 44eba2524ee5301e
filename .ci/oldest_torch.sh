#!/usr/bin/env bash
# The oldest torch that pyproject.toml admits (torch>=2.4), checked as the newest is: in a venv of its
# own, on a copy of the tracked files (an editable build puts _C.so in the source folder, and this one
# is for another torch's ABI), the extension built against it, the README's test command, the CUDA
# tests on the emulator that run its GEMMs (torch < 2.8 has no GEMM with fp32 output for 16-bit
# inputs: gemm_acc_out upcasts), and every CUDA source compiled against its headers for sm_80.
#
# numpy is the last 1.x beside it (pyproject admits any numpy; the other stages install 2.x): pinned in
# the same install as the extras, whose newest onnx would otherwise pull numpy 2 back in.
#
# Environment: OLDEST_TORCH (2.4.1), OLDEST_NUMPY (numpy<2), OLDEST_TORCH_DIR (build/oldest-torch;
# emptied first). The venv (about 5 GB: the CUDA build of torch and its libraries, as PyPI has no CPU
# build) is removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=${OLDEST_TORCH:-2.4.1}
NUMPY_SPEC=${OLDEST_NUMPY:-numpy<2}
WORK=${OLDEST_TORCH_DIR:-$ROOT/build/oldest-torch}
START=$SECONDS

log() { echo "oldest_torch: $*" >&2; }

rm -rf "$WORK"
mkdir -p "$WORK/tree"
trap 'rm -rf "$WORK/venv"' EXIT
(cd "$ROOT" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$WORK/tree"

python3 -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$TORCH_VERSION" ninja "$NUMPY_SPEC" "setuptools>=77" wheel
cd "$WORK/tree"
python -m pip install -q --no-build-isolation -e ".[train,test]" "$NUMPY_SPEC"
python -c "import arcface_ext, torch; assert arcface_ext.extension_available(), 'arcface_ext._C did not load'"
log "torch $(python -c 'import torch; print(torch.__version__)'), numpy $(python -c 'import numpy; print(numpy.__version__)') installed and the extension built ($((SECONDS - START)) s)"

python -m pytest -q
ARCFACE_EXT_EMULATE_CUDA=1 python -m pytest -q tests/test_cuda.py \
    -k "upcast or matches_reference or many_class_chunks or kept or reduce_loss"
CUDA_ARCHS=80 bash .ci/compile_cuda.sh
log "done in $((SECONDS - START)) s"
