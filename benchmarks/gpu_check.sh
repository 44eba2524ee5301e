#!/usr/bin/env bash
# Everything a GPU machine has to check, in one call that fits the device tool's 10-minute limit:
# build, the CUDA tests, compute-sanitizer, the benchmark, a kernel profile, then the rest.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh              # every stage, in the order below
#   OUT=/some/dir bash benchmarks/gpu_check.sh bench profile # chosen stages (after a build)
#
# Stages, most important first, each under its own time limit so that a hang costs one stage:
#   build     pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#   cuda      pytest tests/test_cuda.py (the CUDA op against the fp64 reference, both CUDA paths)
#   memcheck  compute-sanitizer --tool memcheck on benchmarks/sanitize_case.py
#   bench     benchmarks/bench_loss.py --device cuda --max-c 50000000 (results JSON copied to $OUT)
#   profile   benchmarks/profile_loss.py at C = 1M, fused and cuBLAS paths
#   sweep     ours and ours-cublas at C = 1M with a 16, 64 and 256 MiB workspace (NOTES.md, step 4)
#   racecheck compute-sanitizer --tool racecheck (the fused kernels stage tiles in shared memory)
#   suite     the rest of the test suite (tests/ without test_cuda.py)
# Each stage's output goes to $OUT/<stage>.log (both sanitizer stages to sanitize.log, the sweep to
# profile.log: the device tool returns at most 8 files); the device, and a summary of return codes and times, are printed
# last and kept in $OUT/summary.log.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/build/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(build cuda memcheck bench profile sweep racecheck suite)
SUMMARY=()

run_stage() {  # name, log name, time limit in seconds, command...
  local name=$1 log=$OUT/$2.log limit=$3 start=$SECONDS rc
  shift 3
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n 30 "$log"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4d s' "$name" "$rc" $((SECONDS - start)))")
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
}

DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1;
         "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1;
         git rev-parse --short HEAD 2>/dev/null)
echo "$DEVICE"

for stage in "${STAGES[@]}"; do
  case $stage in
    build) run_stage build build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e . ;;
    cuda) run_stage cuda cuda 180 "$PY" -m pytest -q -p no:cacheprovider --maxfail=40 -rf tests/test_cuda.py ;;
    memcheck) run_stage memcheck sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$PY" benchmarks/sanitize_case.py ;;
    bench)
      run_stage bench bench 300 "$PY" benchmarks/bench_loss.py --device cuda --max-c 50000000 \
        --out "$ROOT/benchmarks/results/gpu-check.json"
      cp "$ROOT/benchmarks/results/gpu-check.json" "$OUT/bench.json" 2>/dev/null ;;
    profile) run_stage profile profile 90 "$PY" benchmarks/profile_loss.py ;;
    sweep)
      for mib in 16 64 256; do
        run_stage "sweep-${mib}MiB" profile 90 "$PY" benchmarks/bench_loss.py --device cuda --C 1000000 \
          --impls ours,ours-cublas,floor --no-memory --workspace-bytes $((mib << 20)) --out "/tmp/sweep-${mib}MiB.json"
      done ;;
    racecheck) run_stage racecheck sanitize 150 compute-sanitizer --tool racecheck --error-exitcode 9 \
                 "$PY" benchmarks/sanitize_case.py ;;
    suite) run_stage suite suite 200 "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 -rf tests \
             --ignore tests/test_cuda.py ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

echo "=== summary"
{ echo "$DEVICE"; printf '%s\n' "${SUMMARY[@]}"; } | tee "$OUT/summary.log"
