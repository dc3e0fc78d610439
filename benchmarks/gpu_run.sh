#!/usr/bin/env bash
# One device call does all GPU verification: build with CUDA, run the CUDA tests, time the attention
# kernels, run compute-sanitizer (memcheck, and racecheck on the attention kernels), then the other
# GPU benchmarks. Logs land in $OUT (the device tool brings them back). Each step has its own time
# limit so one hang cannot eat the lease; the steps come in order of importance, so a call cut short
# by its own limit still returns the results that matter most.
# Usage (repo root): bash benchmarks/gpu_run.sh [full|tests|sanitize|bench|kernel]
#   tests: build + CUDA tests; sanitize: + memcheck/racecheck; bench: build + benchmarks; full: all
#   kernel: build + CUDA tests + the attention kernel benchmark + an ncu profile of the attention
#           kernels (NO_NCU=1 skips it; ncu needs a runtime that exposes the counters)
# Knobs: TEST_PATHS (default tests/; e.g. "$PWD/tests --ignore=$PWD/tests/test_pdl_cuda.py"),
#   TEST_FILTER (added to -m cuda), KERNEL_ARGS (benchmarks/attn_cuda_kernel.py), CMHA_ARGS
#   (benchmarks/cmha.py), SKIP_PDL_BENCH=1, SKIP_FUSED_BENCH=1, NO_SAN=1 (full without sanitizers),
#   *_TIMEOUT per step.
set -u
OUT=${OUT:-/tmp/cf-out}
mkdir -p "$OUT"
REPO=$(pwd)
MODE=${1:-full}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=dev
step() { echo; echo "=== $* ($(date +%T))"; }
want() { for m in "$@"; do [ "$MODE" = "$m" ] && return 0; done; return 1; }

step gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

step build
export COMPLEXFORMER_CUDA_ARCHS=${COMPLEXFORMER_CUDA_ARCHS:-90} MAX_JOBS=16 COMPLEXFORMER_WERROR=1
timeout ${BUILD_TIMEOUT:-400} python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
rc=$?; grep -E "complexformer:|error|warning" "$OUT/build.log" | grep -v "^ *gcc\|nvcc -c" | tail -15
[ $rc -eq 0 ] || { echo "BUILD FAILED rc=$rc"; tail -60 "$OUT/build.log"; exit 1; }

cd /tmp  # import the installed package, not the source tree
# scripts that put the repo root on sys.path (benchmarks) must find the extension there too
cp "$(python3 -c 'import complexformer._C as c; print(c.__file__)')" "$REPO/complexformer/"
step info
timeout ${INFO_TIMEOUT:-120} python3 -m complexformer.info 2>&1 | tee "$OUT/info.txt" | tail -4

if want tests sanitize full kernel; then
  step cuda tests
  # -v into the log: if the step limit cuts the run, the log still says which tests passed
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest ${TEST_PATHS:-$REPO/tests} -m "cuda ${TEST_FILTER:-}" --runslow -v -rfE --tb=short \
    -p no:cacheprovider >"$OUT/cuda_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/cuda_tests.txt" | tail -40
fi

if want bench full kernel; then
  step attention kernel benchmark
  cd "$REPO"
  timeout ${BENCH_KERNEL_TIMEOUT:-120} python3 benchmarks/attn_cuda_kernel.py ${KERNEL_ARGS:-} 2>&1 \
    | tee "$OUT/bench_cmha_kernel.txt" | tail -${KERNEL_TAIL:-20}
  cd /tmp
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
    --error-exitcode 9 python3 -m pytest "$REPO/tests/test_cuda_smoke.py" -q -p no:cacheprovider >"$OUT/memcheck.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/memcheck.txt" | tail -8
  step racecheck
  timeout ${RACECHECK_TIMEOUT:-90} compute-sanitizer --tool racecheck --error-exitcode 9 \
    python3 -m pytest "$REPO/tests/test_cuda_smoke.py" -q -p no:cacheprovider >"$OUT/racecheck.txt" 2>&1
  echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|hazard|passed|failed" "$OUT/racecheck.txt" | tail -8
fi

if want bench full; then
  step benchmarks
  cd "$REPO"
  timeout ${BENCH_CMHA_TIMEOUT:-120} python3 benchmarks/cmha.py --device cuda --out "$OUT" ${CMHA_ARGS:-} 2>&1 \
    | tee "$OUT/bench_cmha.txt" | tail -25
  if [ -z "${SKIP_PDL_BENCH:-}" ]; then
    timeout ${BENCH_PDL_TIMEOUT:-120} python3 benchmarks/pdl.py --device cuda 2>&1 | tee "$OUT/bench_pdl.txt" | tail -25
  fi
  if [ -z "${SKIP_FUSED_BENCH:-}" ]; then  # Liger-Kernel / cut-cross-entropy rows need their wheels installed
    timeout ${BENCH_FUSED_TIMEOUT:-180} python3 benchmarks/fused_linear.py --device cuda 2>&1 \
      | tee "$OUT/bench_fused_linear.txt" | tail -15
  fi
  cd /tmp
fi
step done
