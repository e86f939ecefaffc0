#!/usr/bin/env bash
# One GPU run: build the extension, print mae_fast.info, run the `gpu`-marked tests, run the GPU
# benchmarks (training step first, then a profile of the ViT-B/16 step by kernel category, then
# the fused ops), append the rows to benchmarks/results/results.csv, write the device's markdown
# report and chart there, and print a short summary table last. Sized for one H200 in < 8 minutes,
# no network. Every stage has a timeout; a failed or timed-out stage is reported and the later
# stages still run (pytest is stopped with SIGINT, so the rows measured so far are still written).
# Raw logs go to $MAE_FAST_RESULTS_DIR/gpu_logs/, which is not committed.
#
#   MAE_FAST_COMMIT=<sha> bash benchmarks/gpu_run.sh     # the sha where the tree has no .git
#   bash benchmarks/gpu_run.sh --dry-run                 # the stages and their time limits, nothing run
#   bash benchmarks/gpu_run.sh --help
#
# A full run does not fit a 10-minute limit (each compiled provider compiles for about a minute).
# Two calls on one warm machine, with one MAE_FAST_BENCH_DATE for both, make one run:
#   1) MAE_FAST_GPU_BUDGET_S=420 MAE_FAST_BENCH_PROVIDERS=mae_fast,mae_fast_pred,reference,hf,vit_pytorch
#   2) MAE_FAST_GPU_STAGES=info,bench-step,report
#      MAE_FAST_BENCH_PROVIDERS=mae_fast_graphed,mae_fast_compiled,reference_compiled (budget: what is left)
# The opt-in providers (own attention kernels, fused add + LayerNorm) run when named:
#   MAE_FAST_BENCH_PROVIDERS=mae_fast,mae_fast_triton_attn,mae_fast_fused,mae_fast_triton_attn_fused,reference
#   MAE_FAST_BENCH_OPS=attention MAE_FAST_PROFILE_PROVIDERS=mae_fast,mae_fast_graphed MAE_FAST_PROFILE_S=150
#
# Environment knobs (defaults in brackets):
#   MAE_FAST_GPU_BUDGET_S [450]  wall-clock budget of the whole script; stages shrink to fit
#   MAE_FAST_GPU_STAGES [all]    the stages to run (build, info, gpu-tests, bench-step, profile,
#                                bench-ops, report), e.g. "info,bench-step,report" for a second call on
#                                a warm machine; bench-step then takes the time of the stages left out
#   MAE_FAST_BENCH_CASES, MAE_FAST_BENCH_PROVIDERS, MAE_FAST_BENCH_ROUNDS   see benchmarks/steps.py
#   MAE_FAST_GPU_TEST_JOBS [4]   concurrent pytest processes of the gpu-tests stage
#   MAE_FAST_BENCH_OPS [all]     the op suites of bench-ops, e.g. "attention,add_layer_norm"
#                                (benchmarks/test_bench_<op>.py)
#   MAE_FAST_PROFILE_CASE [official-vit_b16], MAE_FAST_PROFILE_PROVIDERS [mae_fast,reference]
#                                what benchmarks/profile_step.py profiles
#   MAE_FAST_PROFILE_S [45]      the profile stage's time (a compiled provider compiles first: ~120)
#   MAE_FAST_RESULTS_DIR [benchmarks/results]   where results.csv, <gpu>.md/.png and gpu_logs/ go
#   TORCH_CUDA_ARCH_LIST [9.0]   only the H200's arch: half the nvcc time of the default 8.0;9.0+PTX
# Where $OUT is set (a runner's output folder) the results folder, logs included, is archived
# there at the end as gpu_results.tgz.
set -uo pipefail
DRY_RUN=0
case "${1:-}" in
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -n|--dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--dry-run | --help]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
T0=$(date +%s)
BUDGET=${MAE_FAST_GPU_BUDGET_S:-450}
RES=${MAE_FAST_RESULTS_DIR:-benchmarks/results}
LOGS=$RES/gpu_logs  # not committed: benchmarks/results/gpu_logs/ is in .gitignore
(( DRY_RUN )) || mkdir -p "$LOGS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# one run id for every pytest session of this script: report.py groups rows by (device, date)
export MAE_FAST_BENCH_DATE=${MAE_FAST_BENCH_DATE:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}
unset TRITON_INTERPRET
SUMMARY=()

elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME MAX_SECONDS END_BY_SECONDS command...: runs with timeout min(MAX, END_BY - elapsed)
wanted() { [[ ",${MAE_FAST_GPU_STAGES:-all}," == *",all,"* || ",${MAE_FAST_GPU_STAGES:-}," == *",$1,"* ]]; }

stage() {
  local name=$1 max=$2 end_by=$3; shift 3
  wanted "$name" || return 0
  local left=$(( end_by - $(elapsed) )) limit=$max
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    SUMMARY+=("$(printf '%-12s skipped: no time left (%ss elapsed)' "$name" "$(elapsed)")")
    echo "=== [$name] skipped: no time left"
    return 0
  fi
  echo "=== [$name] (timeout ${limit}s, $(elapsed)s elapsed): $*"
  if (( DRY_RUN )); then
    SUMMARY+=("$(printf '%-12s would run with a %ss timeout' "$name" "$limit")")
    return 0
  fi
  local s rc
  s=$(date +%s)
  # SIGINT to the whole process group (timeout without --foreground): pytest then still writes
  # its results; SIGKILL 15 s later if anything hangs
  timeout -s INT -k 15 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - s )) status="ok"
  if (( rc == 124 || rc == 137 || rc == 130 )); then status="TIMED OUT after ${took}s (rc $rc)"
  elif (( rc != 0 )); then status="FAILED (rc $rc)"; fi
  SUMMARY+=("$(printf '%-12s %-28s %4ss  log: %s' "$name" "$status" "$took" "$LOGS/$name.log")")
  return 0
}

build() {
  # `python -m pip`: a bare `pip` there can be another Python's, which has no torch (a build with no
  # extension, installed where the benchmarks' python does not look)
  local pipi="python -m pip install --no-build-isolation --no-deps --no-index -q"
  MAX_JOBS=16 $pipi -e . || { echo "!! pip install -e failed; trying a plain install"; MAX_JOBS=16 $pipi .; }
  local check="import torch, mae_fast.kernels.patchify, mae_fast._C"
  python -c "$check" && return 0
  echo "!! the install does not give mae_fast.kernels and mae_fast._C; building the extension in place"
  echo "!! (PYTHONPATH has the repo root) and linking mae_fast/kernels to kernels/"
  [ -e mae_fast/kernels ] || ln -s ../kernels mae_fast/kernels
  MAX_JOBS=16 python setup.py build_ext --inplace && python -c "$check"
}

verify() {
  python -m mae_fast.info
  python - <<'EOF'
import importlib, sys
from mae_fast.info import missing_cuda_kernels
missing = missing_cuda_kernels()
if missing:  # the ops would silently take their PyTorch fallbacks on CUDA
    print(f"!! missing {', '.join(missing)}: benchmark numbers are then not mae_fast's kernels")
for name in ("transformers", "vit_pytorch", "triton"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except ImportError:
        print(f"{name}: not installed (its benchmark provider is skipped)")
sys.exit(1 if missing else 0)
EOF
}

bench_opts() {  # pytest-benchmark may be missing there: benchmarks/conftest.py then has a stand-in
  python -c "import pytest_benchmark" 2>/dev/null && echo "--benchmark-columns=median,rounds"
  return 0
}

bench_step() {
  # the suite skips what would not fit before its own deadline (the stage timeout is the backstop)
  MAE_FAST_BENCH_DEADLINE=$(( $(date +%s) + $1 - 10 )) \
    python -m pytest benchmarks/test_bench_step.py -q -p no:cacheprovider --bench-results "$RES/results.csv" \
    $(bench_opts)
}

bench_ops() {
  local files=() op
  if [ -n "${MAE_FAST_BENCH_OPS:-}" ]; then
    for op in ${MAE_FAST_BENCH_OPS//,/ }; do files+=("benchmarks/test_bench_$op.py"); done
  else
    files=($(ls benchmarks/test_bench_*.py | grep -v test_bench_step.py))
  fi
  python -m pytest "${files[@]}" -q -p no:cacheprovider --bench-results "$RES/results.csv" $(bench_opts)
}

profile() {  # where the ViT-B/16 step's time goes, by kernel category, and the GPU-busy fraction
  python -m benchmarks.profile_step --case "${MAE_FAST_PROFILE_CASE:-official-vit_b16}" \
    --providers "${MAE_FAST_PROFILE_PROVIDERS:-mae_fast,reference}" --steps 5 --out "$LOGS/profile.md"
}

gpu_tests() {
  # the most telling first (the kernels are the ones used, model parity, no host sync), the slow
  # many-shape sweeps last, dealt round-robin to MAE_FAST_GPU_TEST_JOBS [4] concurrent pytest
  # processes: their Triton compiles (CPU work, most of a GPU test's time) run in parallel
  local first="test_extension test_models test_attention test_patchify test_masked_mse_loss test_add_layer_norm test_tokens"
  local files=() f i r rc=0 jobs=${MAE_FAST_GPU_TEST_JOBS:-4} all
  all=$(find tests -name 'test_*.py' | sort)
  for f in $first; do files+=($(grep "/$f\.py\$" <<< "$all")); done
  for f in $all; do [[ " $first " == *" $(basename "$f" .py) "* ]] || files+=("$f"); done
  local -a groups=() pids=()
  for i in "${!files[@]}"; do groups[i % jobs]+=" ${files[i]}"; done
  # the stage's timeout sends SIGINT to every process: the jobs' pytest then writes its summary
  # (background jobs start with SIGINT ignored: the wrapper restores Python's handler), and this
  # shell waits for them
  trap 'echo "=== gpu-tests: interrupted, waiting for the jobs to write their summaries"' INT
  local run='import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))'
  for i in "${!groups[@]}"; do
    # a test module whose imports are missing there (hypothesis, transformers) must not stop the rest
    python -c "$run" -m gpu ${groups[i]} -q -p no:cacheprovider --continue-on-collection-errors --durations=5 \
      > "$LOGS/gpu-tests-$i.log" 2>&1 &
    pids[i]=$!
  done
  for i in "${!pids[@]}"; do
    while kill -0 "${pids[i]}" 2>/dev/null; do wait "${pids[i]}"; done
    wait "${pids[i]}"; r=$?
    (( r == 0 || r == 5 )) || rc=1  # 5: no GPU test in the group
    echo "--- gpu-tests job $i (rc $r):${groups[i]}"
    cat "$LOGS/gpu-tests-$i.log"
  done
  return $rc
}

gpu_name() { python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>/dev/null || echo NVIDIA; }

report() {
  local dev; dev=$(gpu_name)
  python -m benchmarks.report --csv "$RES/results.csv" --outdir "$RES" --device "$dev" --profile "$LOGS/profile.md" \
    > "$LOGS/report.md"
}

export ROOT RES LOGS
export -f build verify bench_opts bench_step profile gpu_tests bench_ops gpu_name report

echo "mae_fast GPU run: $(date -u), budget ${BUDGET}s, run id $MAE_FAST_BENCH_DATE, commit ${MAE_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
else
  echo "nvidia-smi: not found"
fi

stage build 200 $(( BUDGET - 250 )) build
stage info 40 $(( BUDGET - 230 )) verify
stage gpu-tests 150 $(( BUDGET - 200 )) gpu_tests
# what the stages after bench-step need (profile, bench-ops 45 s, report 25 s), where they run
PROFILE_S=${MAE_FAST_PROFILE_S:-45}
STEP_END=$(( BUDGET - 25 - $(wanted profile && echo "$PROFILE_S" || echo 0) - $(wanted bench-ops && echo 45 || echo 0) ))
STEP_LIMIT=$(( STEP_END - $(elapsed) ))
stage bench-step "$STEP_LIMIT" "$STEP_END" bench_step "$STEP_LIMIT"
stage profile "$PROFILE_S" $(( BUDGET - 25 - $(wanted bench-ops && echo 45 || echo 0) )) profile
stage bench-ops 120 $(( BUDGET - 25 )) bench_ops
stage report 30 "$BUDGET" report

if (( ! DRY_RUN )) && [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # one archive: a runner may return few files
  tar czf "$OUT/gpu_results.tgz" "$RES" && echo "archived $RES to \$OUT/gpu_results.tgz"
fi

echo
echo "=============================== summary ($(elapsed)s) ==============================="
for line in "${SUMMARY[@]}"; do echo "$line"; done
(( DRY_RUN )) && exit 0
python -m benchmarks.report --csv "$RES/results.csv" --device "$(gpu_name)" --summary 2>&1 | tail -45
