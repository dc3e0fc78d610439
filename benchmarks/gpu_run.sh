#!/usr/bin/env bash
# One device call does all GPU verification: build with CUDA, run the CUDA tests, run them again
# under compute-sanitizer (memcheck, and racecheck on the attention kernels), then the GPU
# benchmarks. Logs land in $OUT (the device tool brings them back). Each step has its own time
# limit so one hang cannot eat the lease.
# Usage (repo root): bash benchmarks/gpu_run.sh [full|tests|sanitize|bench|kernel]
#   tests: build + CUDA tests; sanitize: + memcheck/racecheck; bench: build + benchmarks; full: all
#   kernel: build + the attention kernel tests + the kernel benchmark + an ncu profile of the
#           attention kernels (one launch each; skipped where ncu cannot read the counters)
# TEST_PATHS (default: all of tests/) narrows the CUDA tests.
set -u
OUT=${OUT:-/tmp/cf-out}
mkdir -p "$OUT"
REPO=$(pwd)
MODE=${1:-full}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=dev
step() { echo; echo "=== $* ($(date +%T))"; }

step gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

step build
export COMPLEXFORMER_CUDA_ARCHS=${COMPLEXFORMER_CUDA_ARCHS:-90} MAX_JOBS=16 COMPLEXFORMER_WERROR=1
timeout ${BUILD_TIMEOUT:-400} python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
rc=$?; grep -E "complexformer:|error|warning" "$OUT/build.log" | grep -v "^ *gcc" | tail -15
[ $rc -eq 0 ] || { echo "BUILD FAILED rc=$rc"; tail -60 "$OUT/build.log"; exit 1; }

cd /tmp  # import the installed package, not the source tree
# scripts that put the repo root on sys.path (benchmarks) must find the extension there too
cp "$(python3 -c 'import complexformer._C as c; print(c.__file__)')" "$REPO/complexformer/"
step info
timeout ${INFO_TIMEOUT:-120} python3 -m complexformer.info 2>&1 | tee "$OUT/info.txt"

if [ "$MODE" != "bench" ]; then
  step cuda tests
  # -v into the log: if the step limit cuts the run, the log still says which tests passed
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest ${TEST_PATHS:-$REPO/tests} -m "cuda ${TEST_FILTER:-}" -v -rfE --tb=short \
    -p no:cacheprovider >"$OUT/cuda_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/cuda_tests.txt" | tail -40
fi

if [ "$MODE" = "bench" ] || [ "$MODE" = "full" ]; then
  step benchmarks
  cd "$REPO"
  timeout ${BENCH_PDL_TIMEOUT:-120} python3 benchmarks/pdl.py --device cuda 2>&1 | tee "$OUT/bench_pdl.txt" | tail -25
  timeout ${BENCH_KERNEL_TIMEOUT:-90} python3 benchmarks/cmha_cuda_kernel.py 2>&1 | tee "$OUT/bench_cmha_kernel.txt" | tail -20
  timeout ${BENCH_CMHA_TIMEOUT:-120} python3 benchmarks/cmha.py --device cuda --out "$OUT" ${CMHA_ARGS:-} 2>&1 \
    | tee "$OUT/bench_cmha.txt" | tail -25
  cd /tmp
fi

if [ "$MODE" = "kernel" ]; then
  step kernel benchmark
  cd "$REPO"
  timeout ${BENCH_KERNEL_TIMEOUT:-120} python3 benchmarks/cmha_cuda_kernel.py ${KERNEL_ARGS:-} 2>&1 \
    | tee "$OUT/bench_cmha_kernel.txt" | tail -20
  if [ -z "${NO_NCU:-}" ]; then
  step ncu
  # what bounds each attention kernel: tensor-pipe and shared-memory utilisation, stall reasons
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k "regex:attn_(fwd|bwd)_\w*pre" --launch-count 6 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats \
    python3 benchmarks/cmha_cuda_kernel.py --variants prerot --reps 1 --no-ws >"$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"; grep -E "attn_|Duration|Compute \(SM\) Throughput|Memory Throughput|Shared|Tensor|Achieved Occupancy|Registers|One or More|Stall" "$OUT/ncu.txt" | head -80
  fi
  cd /tmp
fi

if [ "$MODE" = "sanitize" ] || { [ "$MODE" = "full" ] && [ -z "${NO_SAN:-}" ]; }; then
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
step done
