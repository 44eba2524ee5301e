#!/usr/bin/env bash
# The oldest torch that pyproject.toml admits (torch>=2.4), checked as the newest is: in a venv of its
# own, on a copy of the tracked files (an editable build puts _C.so in the source folder, and this one
# is for another torch's ABI), the extension built against it, the README's test command, the CUDA
# tests on the emulator that run its GEMMs (torch < 2.8 has no GEMM with fp32 output for 16-bit
# inputs: gemm_acc_out upcasts), and every CUDA source compiled against its headers for sm_80.
#
# Beside it, the lowest version of each requirement of the train and test extras that pyproject.toml
# admits (.ci/lowest_pins.py reads them there: numpy 1.x, Pillow, matplotlib, onnx, onnxruntime, pytest,
# ...; the other stages install the newest), pinned with == in each install, so that no later install
# upgrades one behind the stage's back (the newest onnx would pull numpy 2 back in).
#
# Environment: OLDEST_TORCH (2.4.1), OLDEST_TORCH_DIR (build/oldest-torch; emptied first). The venv
# (about 5 GB: the CUDA build of torch and its libraries, as PyPI has no CPU build) is removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=${OLDEST_TORCH:-2.4.1}
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
cd "$WORK/tree"
PINS_TEXT=$(python .ci/lowest_pins.py train test)  # (an assignment, so that set -e sees it fail)
mapfile -t PINS <<<"$PINS_TEXT"
python -m pip install -q "torch==$TORCH_VERSION" ninja "setuptools>=77" wheel "${PINS[@]}"
python -m pip install -q --no-build-isolation -e ".[train,test]" "${PINS[@]}"
python -c "import arcface_ext, torch; assert arcface_ext.extension_available(), 'arcface_ext._C did not load'"
log "torch $(python -c 'import torch; print(torch.__version__)') installed, the extension built ($((SECONDS - START)) s)"
# What pip installed, against the pins: the lowest versions pyproject admits, each checked.
python - "${PINS[@]}" <<'PY' >&2
import re
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    got = version(name)
    print(f"oldest_torch: {name} {got}")
    if re.sub(r"(\.0)+$", "", got) != re.sub(r"(\.0)+$", "", wanted):
        sys.exit(f"oldest_torch: {name} {got} installed, not the pinned {wanted}")
PY

python -m pytest -q --runslow
ARCFACE_EXT_EMULATE_CUDA=1 python -m pytest -q tests/test_cuda.py \
    -k "upcast or matches_reference or many_class_chunks or kept or reduce_loss"
CUDA_ARCHS=80 bash .ci/compile_cuda.sh
log "done in $((SECONDS - START)) s"
