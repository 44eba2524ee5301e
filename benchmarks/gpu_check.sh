#!/usr/bin/env bash
# Everything a GPU machine has to check, in one call inside the device tool's limits (10 minutes a
# command, 15 minutes of device time a session, the machine's start included): build, the CUDA
# tests, the benchmark, compute-sanitizer, a kernel profile, then the rest.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh              # every stage, in the order below
#   OUT=/some/dir bash benchmarks/gpu_check.sh bench profile # chosen stages (after a build)
#
# The whole script keeps to GPU_CHECK_BUDGET seconds (default 520, for a `run` with timeout_s 600):
# each stage runs under the smaller of its own limit and the time left, and a stage that would get
# less than its minimum is skipped and says so. Stages, most important first:
#   build     pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0a whatever the
#             environment says: the wgmma tiles' sm_90a code with the rest; MAX_JOBS=16); if pip cannot
#             install there (not for a compile error), setup.py build_ext --inplace. The call stops
#             if the extension then does not load with its CUDA kernels.
#   cuda      pytest tests/test_cuda.py -k "not wgmma" (the CUDA op against the fp64 reference, both
#             CUDA paths), then benchmarks/wgmma_probe.py (each wgmma tile, its registers decoded; one
#             process a tile) and the wgmma tiles' tests in a run of their own (cuda-wgmma, no
#             --maxfail). With pytest-xdist a test whose kernel faults ends its worker (conftest.py),
#             which is replaced; with pytest-timeout a test that hangs ends after 60 s.
#   bench     benchmarks/bench_loss.py --device cuda, C = 1e5 and 1e6, every impl but the wgmma ones and
#             the chunked path's whole-matrix forms (subcenter, filtered, curricular: bf16 operands); the
#             results JSON is $OUT/bench.json, written (and its rows printed) after each C (an impl that
#             fails, e.g. a refused graph capture, is left out and said so)
#   bench-wgmma each wgmma impl (ours-wgmma, ours-wgmma32, ours-wgmma-resident, ours-wgmma-weight) against
#             ours at C = 1e5 and 1e6, one process each, to bench.log
#   max-c     (not in the default list: a44eedd's run found ours >= 50M, eager 10.4M) the largest C that
#             fits for ours and eager (45 s), to bench.log
#   depth     (not in the default list: 3, 4 and 5 stages timed alike on the H200, session 8) ours at
#             C = 1e5 and 1e6 with a 3-, 4- and 5-stage pipeline (ARCFACE_EXT_TILE_STAGES), to bench.log
#   rows      (not in the default list) ours and ours-recompute at C = 1e5 and 1e6 with blocks walking 1,
#             2 and 4 row tiles (ARCFACE_EXT_ROW_TILES), to bench.log
#   bench-core (not in the default list) the bench without the sampled impls: ours, ours-recompute,
#             ours-one-row-tile, the four ours-wgmma*, ours-unchecked, ours-graphed, ours-cublas, eager,
#             compiled and floor at C = 1e5 and 1e6 (~45 s), for a short call; the results JSON is
#             $OUT/bench.json
#   memcheck  compute-sanitizer --tool memcheck on benchmarks/sanitize_case.py, the wgmma cases in a
#             process of their own (memcheck-wgmma)
#   profile   benchmarks/profile_loss.py at C = 1M (fused, one-row-tile and cuBLAS, then each wgmma path
#             in a process of its own: profile-wgmma) and 100k (fused, which keeps the gradient block
#             there, and recompute, which does not); then benchmarks/host_overhead.py (µs of host time
#             a step, tiny inputs)
#   ncu       Nsight Compute on one launch or two of each kernel: the wgmma forward and backward
#             (ncu-wgmma, C = 1M), the resident x tile's (ncu-resident), the backward's class-outer
#             tile (ncu-weight), then the mma.sync fused kernels at C = 100k (ncu, the recompute path
#             as in session 8) and their warp stall reasons (ncu-stalls), to profile.log
#   racecheck compute-sanitizer --tool racecheck (the fused kernels stage tiles in shared memory): the
#             wgmma cases first (racecheck-wgmma), then the others
#   train     the trainer end to end on the GPU: r50 at 112 px on synthetic faces, bf16, 60 steps
#             (its images/s in metrics.jsonl, appended to profile.log)
#   sweep     ours and ours-cublas at C = 100k and 1M with a 16, 64, 128 and 256 MiB workspace
#   suite     the rest of the test suite (tests/ without test_cuda.py, the slow tests too) under the
#             machine's torch
#   fuzz      (not in the default list) tests/test_fuzz.py for 90 s: random shapes, dtypes, margins and
#             path switches against the fp64 reference, to cuda.log
#   loader    (not in the default list) benchmarks/bench_loader.py: the trainer's data loader on 4,096
#             packed 112 px JPEG faces with 1, 4, 8 and 16 workers, images/s delivered to the GPU, to
#             profile.log (is a trainer's images/s its loader's?)
# Each stage's output goes to $OUT/<stage>.log (both sanitizer stages to sanitize.log, the sweep to
# profile.log: the device tool returns at most 8 files); the device, and a summary of return codes
# and times, are printed last and kept in $OUT/summary.log.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/build/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# 9.0a whatever the environment says (GPU.md's recipe exports 9.0, whose build has no wgmma code at all);
# GPU_CHECK_ARCH_LIST overrides it.
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${GPU_CHECK_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-520}))
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(build cuda bench bench-wgmma memcheck profile ncu racecheck train sweep suite)
KNOWN=" build cuda bench bench-wgmma bench-core max-c depth rows memcheck profile ncu racecheck train suite sweep fuzz loader --source-hash "
for stage in "${STAGES[@]}"; do  # before anything runs: a typo must not end the call halfway
  [[ $KNOWN == *" $stage "* ]] || { echo "unknown stage $stage; stages:$KNOWN"; exit 2; }
done
SUMMARY=()
# The wgmma variants (never run on a GPU before session 14), one process each where a stage runs
# several: a kernel fault leaves its process's CUDA context unusable, and the others must still run.
# The probe's tiles, the benchmark's impls and the profile's paths:
WGMMA_TILES=(64 32 resident weight)
WGMMA_IMPLS=(ours-wgmma ours-wgmma32 ours-wgmma-resident ours-wgmma-weight)
WGMMA_PATHS=(wgmma wgmma32 wgmma-resident wgmma-weight)
# each COMMAND... -- VALUE...: COMMAND once a value, the value in place of the word {}, one process
# each, going on after a failure; the last failure's status.
each() {
  local cmd=() arg value rc=0
  while [[ $1 != -- ]]; do cmd+=("$1"); shift; done
  shift
  for value in "$@"; do
    echo "--- $value"
    "${cmd[@]//\{\}/$value}" || rc=$?
  done
  return $rc
}
export -f each

run_stage() {  # name, log name, time limit (s), minimum worth running (s), command...
  local name=$1 log=$OUT/$2.log limit=$3 minimum=$4 start=$SECONDS left rc
  shift 4
  left=$((DEADLINE - SECONDS - 15))  # 15 s for the summary and the copies
  if ((left < minimum)); then
    SUMMARY+=("$(printf '%-14s skipped: %d s left, needs %d' "$name" "$left" "$minimum")")
    echo "${SUMMARY[-1]}" >>"$OUT/summary.log"
    echo "=== $name: skipped ($left s left of the budget, needs $minimum)" | tee -a "$log"
    return 3  # not run: a skipped build stops the stages that need it
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  SUMMARY+=("$(printf '%-14s rc=%-3s %4d s' "$name" "$rc" $((SECONDS - start)))")
  echo "${SUMMARY[-1]}" >>"$OUT/summary.log"  # as it goes: a call cut off still leaves the lines so far
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
  return $rc
}

# pyproject.toml's license is an SPDX string, which setuptools reads from 77 on; an older one there (no
# network to upgrade it) gets the table form in this copy of the tree, rather than a failed build.
if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
  echo "setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>&1) is older than 77: pyproject.toml's" \
       "license written as a table in this copy"
  sed -i 's/^license = "MIT".*$/license = { text = "MIT" }/' pyproject.toml
fi

# The fallback is for a pip that cannot install here, not for a compile error (which it would repeat).
BUILD="$PY -m pip install --no-build-isolation --no-deps -v -e . || {
  if grep -qE '\\): error|: error:|ninja: build stopped' '$OUT/build.log'; then exit 1; fi
  echo 'pip could not install the package; building the extension in place instead'
  $PY setup.py build_ext --inplace; }"

source_hash() { find csrc arcface_ext setup.py -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \
                  -o -name '*.py' \) | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12; }
if [[ ${1:-} == --source-hash ]]; then source_hash; exit 0; fi

DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1;
         "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1;
         nvcc --version 2>&1 | tail -n 2 | head -n 1;
         git rev-parse --short HEAD 2>/dev/null;
         # The device tool's copy can carry a stale .git (session 8: HEAD a44eedd, tree 978a749): the
         # sources' own hash, which `bash benchmarks/gpu_check.sh --source-hash` prints for a checkout.
         echo "source hash $(source_hash)")
echo "$DEVICE"
echo "$DEVICE" >"$OUT/summary.log"
ARCFACE_EXT_SOURCE_HASH=$(source_hash)  # into bench_loss.py's rows
export ARCFACE_EXT_SOURCE_HASH

# pytest-xdist (on the GPU image) isolates a crash: a test that kills its worker is reported and the
# worker replaced, where a single process would end the stage (the first H200 run lost 18% of the CUDA
# tests to one segfault that way).
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-p xdist --max-worker-restart 100)
# pytest-timeout (on the GPU image): a test that hangs (a wgmma kernel waiting forever) ends its
# process after 60 s, with its stack, instead of holding the stage to its limit, where pytest would
# print none of the failures' tracebacks; under xdist its worker is replaced.
TIMEOUT=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && TIMEOUT=(--timeout 60 --timeout-method thread)

for stage in "${STAGES[@]}"; do
  case $stage in
    build)
      echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >>"$OUT/build.log"
      if ! run_stage build build 200 60 bash -c "$BUILD"; then
        SUMMARY+=("build failed: the stages that need the extension were not run")
        break
      fi
      # Without the CUDA kernels every CUDA test would skip and its stage say rc=0: stop here instead.
      if ! "$PY" -c '
import arcface_ext, torch
assert arcface_ext.extension_available(), "arcface_ext._C did not load"
assert torch._C._dispatch_has_kernel_for_dispatch_key("arcface_ext::margin_softmax_forward", "CUDA"), "no CUDA kernels"
print("CUDA kernels registered")' 2>&1 | tee -a "$OUT/build.log"; then
        SUMMARY+=("build: the extension does not load with CUDA kernels (build.log): the other stages were not run")
        break
      fi
      # The C++ runtime must be the process's shared one (setup.py's -l:libstdc++.so.6): 0 expected.
      so=$(ls arcface_ext/_C*.so 2>/dev/null | head -n 1)
      echo "CXX=${CXX:-unset}; ${so:-no arcface_ext/_C*.so}: __cxa_throw defined $(nm -D --defined-only ${so:-/dev/null} \
        2>/dev/null | grep -c ' __cxa_throw$') time(s)" | tee -a "$OUT/build.log" ;;
    # -v: one line a test in cuda.log, so that a stage cut off by its limit still says what ran.
    # The wgmma tiles' tests (never run on a GPU before session 14) in a run of their own, after the
    # rest: if the hardware reads the tile otherwise than the emulator, their failures must not use up
    # --maxfail before the other paths have run.
    cuda) run_stage cuda cuda 150 30 "$PY" -m pytest -v -p no:cacheprovider --maxfail=40 -rf --durations=10 \
            ${XDIST[@]+"${XDIST[@]}"} ${XDIST[@]+-n 4} ${TIMEOUT[@]+"${TIMEOUT[@]}"} \
            -o faulthandler_timeout=120 tests/test_cuda.py -k "not wgmma"
          # Each wgmma tile register by register on inputs whose products name their operands: if the
          # hardware reads a tile otherwise than the emulator, this decodes how (seconds a tile).
          run_stage wgmma-probe cuda 45 10 bash -c 'each "$@"' _ "$PY" benchmarks/wgmma_probe.py --tiles {} \
            -- "${WGMMA_TILES[@]}"
          # No --maxfail: the 64-deep tile's ~100 tests come first in the file, and had they all failed,
          # the other tiles' would never have run. The stage's limit bounds it.
          run_stage cuda-wgmma cuda 90 20 "$PY" -m pytest -v -p no:cacheprovider -rf \
            ${XDIST[@]+"${XDIST[@]}"} ${XDIST[@]+-n 4} ${TIMEOUT[@]+"${TIMEOUT[@]}"} \
            -o faulthandler_timeout=60 tests/test_cuda.py -k wgmma ;;
    bench)  # every impl but the wgmma ones (bench-wgmma): a fault there must not cost the others
      run_stage bench bench 150 60 "$PY" benchmarks/bench_loss.py --device cuda --repeats 7 \
        --impls ours,ours-recompute,ours-one-row-tile,ours-unchecked,ours-graphed,ours-cublas,eager,compiled,floor,ours-sampled,eager-sampled,subcenter,filtered,curricular \
        --out "$OUT/bench.json" ;;
    max-c)  # (not in the default list: a44eedd's run found ours >= 50M, eager 10.4M) the largest C that fits
      run_stage max-c bench 90 40 "$PY" benchmarks/bench_loss.py --device cuda --repeats 3 --C 100000 \
        --impls ours,eager --no-memory --max-c 50000000 --max-c-seconds 45 --out /tmp/max-c.json ;;
    bench-wgmma)  # each wgmma tile (session 14 on) against ours, one process each, to bench.log
      run_stage bench-wgmma bench 100 25 bash -c 'each "$@"' _ "$PY" benchmarks/bench_loss.py --device cuda \
        --repeats 7 --C 100000 1000000 --impls ours,{} --no-memory --out /tmp/bench-{}.json -- "${WGMMA_IMPLS[@]}" ;;
    bench-core)
      run_stage bench-core bench 90 40 "$PY" benchmarks/bench_loss.py --device cuda --repeats 7 \
        --impls ours,ours-recompute,ours-one-row-tile,ours-wgmma,ours-wgmma32,ours-wgmma-resident,ours-wgmma-weight,ours-unchecked,ours-graphed,ours-cublas,eager,compiled,floor \
        --out "$OUT/bench.json" ;;
    depth)  # the fused kernels' pipeline depth (3 on sm_80, 4 by default on sm_90; NOTES.md session 7)
      for d in 3 4 5; do
        run_stage "depth-$d" bench 40 20 env ARCFACE_EXT_TILE_STAGES=$d "$PY" benchmarks/bench_loss.py --device cuda \
          --C 100000 1000000 --impls ours,floor --no-memory --warmup 2 --out "/tmp/depth-$d.json"
      done ;;
    rows)  # row tiles a fused block walks (the host takes 4 at N = 512; NOTES.md session 13)
      for k in 1 2 4; do
        run_stage "rows-$k" bench 40 20 env ARCFACE_EXT_ROW_TILES=$k "$PY" benchmarks/bench_loss.py --device cuda \
          --C 100000 1000000 --impls ours,ours-recompute,floor --no-memory --warmup 2 --out "/tmp/rows-$k.json"
      done ;;
    memcheck) run_stage memcheck sanitize 100 40 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$PY" benchmarks/sanitize_case.py mma
              run_stage memcheck-wgmma sanitize 60 20 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$PY" benchmarks/sanitize_case.py wgmma ;;
    profile)
      # one-row-tile: the fused kernels as before session 13 (each row tile's block sums the norms);
      # wgmma, wgmma32: the fused kernels' tiles on Hopper's wgmma, 64- and 32-deep slices (session 14).
      run_stage profile profile 60 20 "$PY" benchmarks/profile_loss.py --paths fused,one-row-tile,cublas
      run_stage profile-wgmma profile 60 15 bash -c 'each "$@"' _ "$PY" benchmarks/profile_loss.py --paths {} \
        -- "${WGMMA_PATHS[@]}"
      # At C = 100k about half the measured step had no kernel running (by arithmetic, session 7).
      # fused keeps the gradient block there (bf16, 100 MB in the 128 MiB workspace); recompute does not.
      run_stage profile-100k profile 40 15 "$PY" benchmarks/profile_loss.py --C 100000 --paths fused,recompute
      # The host's share of a step, on inputs too small for the kernels to matter (session 9).
      run_stage host profile 20 8 "$PY" benchmarks/host_overhead.py --device cuda ;;
    # Nsight Compute, the wgmma tiles first (never profiled), then the mma.sync tiles (session 8's
    # counters; their stall reasons never printed). --kill yes ends the program once its launches are
    # profiled: ncu prints its sections only when the program exits, so a stage cut off by its limit
    # while the program ran on would print nothing.
    ncu)
      # The wgmma tiles (session 14): counters and stalls of the forward and the first backward launch,
      # at 1M (where bf16 recomputes: the block does not fit).
      run_stage ncu-wgmma profile 60 30 ncu --clock-control none --target-processes all --kill yes \
        -k 'regex:fused_(forward|backward)_wgmma_kernel' -c 2 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        "$PY" benchmarks/profile_loss.py --paths wgmma
      # The resident x tile (session 15): L2 throughput against the streaming tile's, forward and backward.
      run_stage ncu-resident profile 45 30 ncu --clock-control none --target-processes all --kill yes \
        -k 'regex:fused_(forward_wgmma|backward_wgmma_resident)_kernel' -c 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        "$PY" benchmarks/profile_loss.py --paths wgmma-resident
      # The backward's class-outer tile (session 17): S, the gradient block and d loss / d W in one
      # kernel, whose x tiles stream from L2 (64 KB a 64-row tile, read by every block).
      run_stage ncu-weight profile 45 30 ncu --clock-control none --target-processes all --kill yes \
        -k 'regex:fused_weight_gradient_wgmma_kernel' -c 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        "$PY" benchmarks/profile_loss.py --paths wgmma-weight
      # Why the fused tiles ran at a quarter of cuBLAS's rate (H200, session 7): L2 traffic, latency
      # or the tensor pipe. One launch of each fused kernel at C = 100k, hardware counters.
      run_stage ncu profile 90 40 ncu --clock-control none --target-processes all --kill yes \
        -k 'regex:fused_(forward|backward)_kernel|class_gradient_kernel' -c 8 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        "$PY" benchmarks/profile_loss.py --C 100000 --paths recompute
      # What the warps wait on (session 8 found the forward latency-bound, 59% of cycles with no
      # warp ready, but the sections above print no stall breakdown): stalls per issued
      # instruction by reason, for the forward and the first backward launch. Its own run, so that
      # a metric name this ncu lacks costs only these lines.
      run_stage ncu-stalls profile 45 30 ncu --clock-control none --target-processes all --kill yes \
        -k 'regex:fused_(forward|backward)_kernel' -c 2 \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        "$PY" benchmarks/profile_loss.py --C 100000 --paths recompute ;;
    # The wgmma tiles first: their shared memory has never been race-checked; the others had 0 hazards
    # in session 8 (a44eedd).
    racecheck) run_stage racecheck-wgmma sanitize 60 25 compute-sanitizer --tool racecheck --error-exitcode 9 \
                 "$PY" benchmarks/sanitize_case.py wgmma
               run_stage racecheck sanitize 90 40 compute-sanitizer --tool racecheck --error-exitcode 9 \
                 "$PY" benchmarks/sanitize_case.py mma ;;
    train)
      run_stage train profile 100 50 "$PY" -m train --network r50 --image-size 112 --batch-size 128 \
        --synthetic-identities 1000 --synthetic-images-per-identity 16 --val-targets none --amp bf16 \
        --loss-amp bf16 --max-steps 60 --warmup-steps 0 --log-every 10 --eval-every 0 --save-every 0 \
        --num-workers 8 --no-plots --no-tensorboard --output /tmp/gpu-check-train
      cat /tmp/gpu-check-train/metrics.jsonl >> "$OUT/profile.log" 2>/dev/null ;;
    suite) run_stage suite suite 200 60 "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 -rf --runslow tests \
             ${XDIST[@]+"${XDIST[@]}"} ${XDIST[@]+-n 8} \
             --ignore tests/test_cuda.py ;;
    fuzz) run_stage fuzz cuda 120 30 env ARCFACE_FUZZ_SECONDS=90 "$PY" -m pytest -q -s -p no:cacheprovider \
            tests/test_fuzz.py ;;
    loader) run_stage loader profile 90 40 "$PY" benchmarks/bench_loader.py --device cuda --workers 1,4,8,16 \
              --out /tmp/loader.json ;;
    sweep)
      for mib in 16 64 128 256; do
        run_stage "sweep-${mib}MiB" profile 40 25 "$PY" benchmarks/bench_loss.py --device cuda --C 100000 1000000 \
          --impls ours,ours-cublas,floor --no-memory --warmup 2 --workspace-bytes $((mib << 20)) \
          --out "/tmp/sweep-${mib}MiB.json"
      done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

echo "=== summary"
{ echo "$DEVICE"; printf '%s\n' "${SUMMARY[@]}"; } | tee "$OUT/summary.log"
