#!/usr/bin/env bash
# One device call does all GPU verification: build with CUDA, run the CUDA tests, time the attention
# kernels, run compute-sanitizer (memcheck, and racecheck on the attention kernels), then the other
# GPU benchmarks. Logs land in $OUT (the device tool brings them back). Each step has its own time
# limit so one hang cannot eat the lease; the steps come in order of importance, so a call cut short
# by its own limit still returns the results that matter most.
# Usage (repo root): bash benchmarks/gpu_run.sh [full|tests|sanitize|bench|kernel|round4]
#   tests: build + CUDA tests; sanitize: + memcheck/racecheck; bench: build + benchmarks; full: all
#   kernel: build + CUDA tests + the attention kernel benchmark + an ncu profile of the attention
#           kernels (NO_NCU=1 skips it; ncu needs a runtime that exposes the counters)
#   round4: issue 12 in one call: build, info, CUDA tests, then benchmarks/pdl.py (bf16, with the
#           Liger-Kernel row and the host-overhead table), cmha_padded.py, cmha_gqa.py,
#           host_overhead.py and attn_cuda_kernel.py; step limits sum to 500 s (expected ~300 s): run
#           it with timeout_s 560.
#           SKIP_TESTS=1 leaves out the tests (a quicker rerun of the benchmarks).
# Baselines that are not on the GPU machine (Liger-Kernel, cut-cross-entropy) come as wheels: run
#   bash benchmarks/fetch_wheels.sh here first (it fills the git-ignored wheels/), and pass
#   carry=["wheels"] to the device call; this script installs wheels/*.whl when the folder exists.
# What comes back from $OUT (at most 8 files): info.txt (nvidia-smi, wheel install, complexformer.info),
#   build.log, cuda_tests.txt, bench.txt (every benchmark, in order, each under a "=== name" line),
#   sanitize.txt (memcheck + racecheck), cmha_cuda.md and cmha_cuda.png (cmha.py), ncu_*.txt (kernel
#   mode, 3 files): full returns 7 files, kernel 7, round4 4.
# Knobs: TEST_PATHS (default tests/; e.g. "$PWD/tests --ignore=$PWD/tests/test_pdl_cuda.py"),
#   TEST_FILTER (added to -m cuda), KERNEL_ARGS (benchmarks/attn_cuda_kernel.py), CMHA_ARGS
#   (benchmarks/cmha.py), PDL_ARGS (benchmarks/pdl.py; round4 default "--no-compile --skip-counts"),
#   PADDED_ARGS (cmha_padded.py), GQA_ARGS (cmha_gqa.py), SKIP_PDL_BENCH=1, SKIP_FUSED_BENCH=1,
#   NO_SAN=1 (full without sanitizers), SKIP_TESTS=1, *_TIMEOUT per step.
set -u
OUT=${OUT:-/tmp/cf-out}
mkdir -p "$OUT"
REPO=$(pwd)
MODE=${1:-full}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=dev
step() { echo; echo "=== $* ($(date +%T))"; }
want() { for m in "$@"; do [ "$MODE" = "$m" ] && return 0; done; return 1; }
# bench NAME TIMEOUT TAIL CMD...: one benchmark, run from the repo root, appended to $OUT/bench.txt
bench() {
  local name=$1 tmo=$2 tl=$3; shift 3
  step "$name"
  echo "=== $name: $* ($(date +%T))" >>"$OUT/bench.txt"
  (cd "$REPO" && timeout "$tmo" "$@" 2>&1) | tee -a "$OUT/bench.txt" | tail -"$tl"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc" | tee -a "$OUT/bench.txt"
}
if want round4; then  # limits that fit one device call (see the header); any *_TIMEOUT set wins
  : "${BUILD_TIMEOUT:=170}" "${INFO_TIMEOUT:=30}" "${TEST_TIMEOUT:=120}" "${BENCH_PDL_TIMEOUT:=60}"
  : "${BENCH_PADDED_TIMEOUT:=40}" "${BENCH_GQA_TIMEOUT:=25}" "${BENCH_HOST_TIMEOUT:=20}" "${BENCH_KERNEL_TIMEOUT:=35}"
  : "${PDL_ARGS:=--no-compile --skip-counts}"
  # the smoke test and the attention API (return_lse, dlse: new since the last card) first, in case
  # the step limit cuts the rest (pytest drops the repeats the folder brings)
  : "${TEST_PATHS:=$REPO/tests/test_cuda_smoke.py $REPO/tests/test_attn_api_cuda.py $REPO/tests}"
fi

step gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/info.txt"
if [ -d "$REPO/wheels" ] && ls "$REPO"/wheels/*.whl >/dev/null 2>&1; then
  step wheels
  python3 -m pip install -q --no-index --no-deps "$REPO"/wheels/*.whl 2>&1 | tee -a "$OUT/info.txt" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] && ls "$REPO"/wheels | tee -a "$OUT/info.txt" || echo "wheel install failed (continuing)" | tee -a "$OUT/info.txt"
fi

step build
export COMPLEXFORMER_CUDA_ARCHS=${COMPLEXFORMER_CUDA_ARCHS:-90} MAX_JOBS=16 COMPLEXFORMER_WERROR=1
timeout ${BUILD_TIMEOUT:-400} python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
rc=$?; grep -E "complexformer:|error|warning" "$OUT/build.log" | grep -v "^ *gcc\|nvcc -c" | tail -15
[ $rc -eq 0 ] || { echo "BUILD FAILED rc=$rc"; tail -60 "$OUT/build.log"; exit 1; }

cd /tmp  # import the installed package, not the source tree
# scripts that put the repo root on sys.path (benchmarks) must find the extension there too
cp "$(python3 -c 'import complexformer._C as c; print(c.__file__)')" "$REPO/complexformer/"
step info
timeout ${INFO_TIMEOUT:-120} python3 -m complexformer.info 2>&1 | tee -a "$OUT/info.txt" | tail -4

if want tests sanitize full kernel round4 && [ -z "${SKIP_TESTS:-}" ]; then
  step cuda tests
  # -v into the log: if the step limit cuts the run, the log still says which tests passed
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest ${TEST_PATHS:-$REPO/tests} -m "cuda ${TEST_FILTER:-}" --runslow -v -rfE --tb=short \
    -p no:cacheprovider >"$OUT/cuda_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/cuda_tests.txt" | tail -40
fi

if want round4; then  # issue 12, in order of importance
  bench "pdl benchmark" "$BENCH_PDL_TIMEOUT" 40 python3 benchmarks/pdl.py --device cuda --dtype bfloat16 $PDL_ARGS
  bench "padded/packed CMHA benchmark" "$BENCH_PADDED_TIMEOUT" 30 python3 benchmarks/cmha_padded.py --device cuda ${PADDED_ARGS:-}
  bench "GQA CMHA benchmark" "$BENCH_GQA_TIMEOUT" 20 python3 benchmarks/cmha_gqa.py --device cuda ${GQA_ARGS:-}
  bench "host overhead" "$BENCH_HOST_TIMEOUT" 8 python3 benchmarks/host_overhead.py --device cuda
fi

if want bench full kernel round4; then
  bench "attention kernel benchmark" "${BENCH_KERNEL_TIMEOUT:-120}" "${KERNEL_TAIL:-20}" \
    python3 benchmarks/attn_cuda_kernel.py ${KERNEL_ARGS:-}
fi

if want kernel && [ -z "${NO_NCU:-}" ]; then
  step ncu
  # what bounds each attention kernel: tensor-pipe and shared-memory utilisation, stall reasons
  cd "$REPO"
  for k in attn_fwd_pre attn_bwd_dkdv attn_bwd_dq_kernel; do
    timeout ${NCU_TIMEOUT:-60} ncu --clock-control none -k regex:$k --launch-count 1 --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 benchmarks/attn_cuda_kernel.py --reps 1 --dims 64 >"$OUT/ncu_$k.txt" 2>&1
    echo "ncu $k rc=$?"; grep -E "Duration|Throughput|pipeline" "$OUT/ncu_$k.txt" | head -12
  done
  cd /tmp
fi

if want sanitize || { want full && [ -z "${NO_SAN:-}" ]; }; then
  step memcheck
  # Without the caching allocator every tensor is its own cudaMalloc, so overruns are caught.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${MEMCHECK_TIMEOUT:-150} compute-sanitizer --tool memcheck \
    --error-exitcode 9 python3 -m pytest "$REPO/tests/test_cuda_smoke.py" -q -p no:cacheprovider >/tmp/memcheck.txt 2>&1
  echo "memcheck rc=$?"; { echo "=== memcheck"; cat /tmp/memcheck.txt; } >>"$OUT/sanitize.txt"
  grep -E "ERROR SUMMARY|Invalid|passed|failed" /tmp/memcheck.txt | tail -8
  step racecheck
  timeout ${RACECHECK_TIMEOUT:-90} compute-sanitizer --tool racecheck --error-exitcode 9 \
    python3 -m pytest "$REPO/tests/test_cuda_smoke.py" -q -p no:cacheprovider >/tmp/racecheck.txt 2>&1
  echo "racecheck rc=$?"; { echo "=== racecheck"; cat /tmp/racecheck.txt; } >>"$OUT/sanitize.txt"
  grep -E "RACECHECK SUMMARY|hazard|passed|failed" /tmp/racecheck.txt | tail -8
fi

if want bench full; then
  bench "cmha benchmark" "${BENCH_CMHA_TIMEOUT:-120}" 25 python3 benchmarks/cmha.py --device cuda --out "$OUT" ${CMHA_ARGS:-}
  if [ -z "${SKIP_PDL_BENCH:-}" ]; then
    bench "pdl benchmark" "${BENCH_PDL_TIMEOUT:-150}" 40 python3 benchmarks/pdl.py --device cuda ${PDL_ARGS:-}
  fi
  if [ -z "${SKIP_FUSED_BENCH:-}" ]; then  # Liger-Kernel / cut-cross-entropy rows need their wheels installed
    bench "fused linear benchmark" "${BENCH_FUSED_TIMEOUT:-180}" 15 python3 benchmarks/fused_linear.py --device cuda
  fi
  bench "padded/packed CMHA benchmark" "${BENCH_PADDED_TIMEOUT:-60}" 30 python3 benchmarks/cmha_padded.py --device cuda ${PADDED_ARGS:-}
  bench "GQA CMHA benchmark" "${BENCH_GQA_TIMEOUT:-40}" 20 python3 benchmarks/cmha_gqa.py --device cuda ${GQA_ARGS:-}
  bench "host overhead" "${BENCH_HOST_TIMEOUT:-30}" 8 python3 benchmarks/host_overhead.py --device cuda
fi
step done
