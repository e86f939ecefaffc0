#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stages' functions are called indirectly ("call$CALL", bash -c)
# mae_fast on one GPU machine (sized for one H200, no network) in two calls: build, check,
# measure, test. Each stage has a time limit inside the call's budget, the most valuable first;
# a stage that fails or runs out of time is reported and the later ones still run, except that the
# run STOPS after `info` where CUDA or a compiled kernel is missing (the numbers would then be
# PyTorch's fallbacks). The measurements and the summary are written with their provenance (commit,
# versions, device, run id) to the results folder; the short summary is printed last.
#
#   bash benchmarks/gpu_run.sh [--call 1] [--dry-run]   at most 9 minutes, the build included
#   bash benchmarks/gpu_run.sh --call 2 [--dry-run]     at most 5 minutes, on the same machine after call 1
#   bash benchmarks/gpu_run.sh --help
#
# On a runner that copies the tree without .git (name the commit, the output of `git rev-parse HEAD`,
# in place of <sha>), each call a command with a time limit:
#   run  command="MAE_FAST_COMMIT=<sha> bash benchmarks/gpu_run.sh --call 1"  timeout_s=570
#   run  command="MAE_FAST_COMMIT=<sha> bash benchmarks/gpu_run.sh --call 2"  timeout_s=290
# The two budgets (520 s + 250 s) and a machine's start (1-2 minutes) add up to about 15 minutes.
# Run the same command with --dry-run on any CPU first: a typo then fails in seconds.
#
# Call 1 (budget 520 s; seconds: at most / at least, else the stage is skipped):
#   build           150       pip install -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16); skipped when up to date
#   info             40       versions, GPU clocks, python -m mae_fast.info; STOP if a kernel is missing
#   attention        75 / 20  attention backends at the MAE shapes (ViT-B encoder 50 tokens d=64, decoder
#                             197 tokens d=32), forward and forward + backward
#   step-vit_b16    240 / 90  ViT-B/16 batch 256: eager, compiled, CUDA graphs, reference compiled,
#                             transformers' ViTMAE; images/s and peak memory
#   profile          75 / 30  kernel categories of the CUDA-graph step, host profile of the eager step
#   step-vit_l16    120 /100  ViT-L/16 batch 128 with CUDA graphs
#   gpu-tests      rest / 45  pytest -m gpu in parallel processes; the tests left over are named
#   report           25       <device>.md of the run, then the summary
# Call 2 (budget 250 s): build (up to date: skipped) and info as above, then
#   gpu-tests       150 / 45  the GPU tests call 1 did not report
#   ops              90 / 20  the op suites against eager (attention at the ViT-L shapes)
#   data             45 / 20  the data suite: CPU pipeline per worker, GPU decode backend
#   finetune         60 / 30  the fine-tuning step against timm's, eager and compiled
#   ops-compiled   rest / 30  the op suites' torch.compile baselines
#   report           25
# Packages: torch, triton, transformers, pytest, pytest-benchmark, pytest-timeout, matplotlib;
# no network is needed. vit-pytorch is not needed either: no
# stage measures the vit_pytorch provider, which is skipped with the reason where it is named.
#
# Knobs (environment; defaults in brackets):
#   MAE_FAST_GPU_BUDGET_S [520 | 250]  the call's wall-clock budget; the later stages shrink to fit
#   MAE_FAST_GPU_STAGES [all]          the stages to run, e.g. "info,step-vit_b16,report"
#   MAE_FAST_GPU_VIT_B_PROVIDERS [mae_fast,hf,mae_fast_compiled,mae_fast_graphed,reference_compiled]
#   MAE_FAST_GPU_VIT_L_PROVIDERS [mae_fast_graphed]
#   MAE_FAST_GPU_PROFILE_PROVIDERS [mae_fast_graphed,mae_fast]
#                                      providers of benchmarks/steps.py, measured in the order named
#   MAE_FAST_BENCH_ATTENTION_CASES [call 1: vit_b-encoder,vit_b-decoder; call 2: vit_l-encoder,vit_l-decoder]
#   MAE_FAST_GPU_OPS [add_layer_norm,tokens,patchify_loss,attention]   op suites (benchmarks/test_bench_<op>.py)
#   MAE_FAST_GPU_TESTS [tests]         where the gpu-marked tests are collected (paths or node ids)
#   MAE_FAST_GPU_TEST_JOBS [8]         concurrent pytest processes of gpu-tests
#   MAE_FAST_GPU_TEST_TIMEOUT_S [120]  one test's limit (pytest-timeout, where installed)
#   MAE_FAST_BENCH_ROUNDS, MAE_FAST_BENCH_WARMUP   measured / warm-up steps (benchmarks/test_bench_step.py)
#   MAE_FAST_RESULTS_DIR [benchmarks/results/gpu_logs]   results.csv, <device>.md/.png, profile.md,
#                                      gpu_tests.txt, summary-call<N>.txt, logs/ (not committed)
#   MAE_FAST_COMMIT, MAE_FAST_BENCH_DATE   provenance: the commit, and the run id (call 2 reuses call 1's)
#   TORCH_CUDA_ARCH_LIST [9.0]         the H200's arch only
# Where $OUT is set (a runner's output folder), gpu_call<N>.tgz (the results folder) and
# the main files beside it are copied there after every stage.
set -uo pipefail

usage() { sed -n '3,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
CALL=1 DRY_RUN=0
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) DRY_RUN=1 ;;
    --call) CALL=${2:-}; shift ;;
    --call=*) CALL=${1#--call=} ;;
    *) echo "usage: bash benchmarks/gpu_run.sh [--call 1|2] [--dry-run] | --help" >&2; exit 2 ;;
  esac
  shift
done
if [[ "$CALL" != 1 && "$CALL" != 2 ]]; then
  echo "usage: bash benchmarks/gpu_run.sh [--call 1|2] [--dry-run] | --help" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
python() { "$PYTHON" "$@"; }
BUDGET=${MAE_FAST_GPU_BUDGET_S:-$([ "$CALL" = 1 ] && echo 520 || echo 250)}
RESERVE=25  # the report and the summary, after every other stage
RES=${MAE_FAST_RESULTS_DIR:-benchmarks/results/gpu_logs}
LOGS=$RES/logs
VIT_B_PROVIDERS=${MAE_FAST_GPU_VIT_B_PROVIDERS:-mae_fast,hf,mae_fast_compiled,mae_fast_graphed,reference_compiled}
VIT_L_PROVIDERS=${MAE_FAST_GPU_VIT_L_PROVIDERS:-mae_fast_graphed}
PROFILE_PROVIDERS=${MAE_FAST_GPU_PROFILE_PROVIDERS:-mae_fast_graphed,mae_fast}
ATTENTION_CASES=${MAE_FAST_BENCH_ATTENTION_CASES:-$([ "$CALL" = 1 ] && echo vit_b-encoder,vit_b-decoder \
  || echo vit_l-encoder,vit_l-decoder)}
OPS=${MAE_FAST_GPU_OPS:-add_layer_norm,tokens,patchify_loss,attention}
TESTS=${MAE_FAST_GPU_TESTS:-tests}
JOBS=${MAE_FAST_GPU_TEST_JOBS:-8}
PER_TEST_S=${MAE_FAST_GPU_TEST_TIMEOUT_S:-120}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
unset TRITON_INTERPRET  # the GPU runs the compiled kernels
if [ -n "${MAE_FAST_BENCH_DATE:-}" ]; then RUN_ID=$MAE_FAST_BENCH_DATE
elif [ "$CALL" = 2 ] && [ -s "$RES/run_id" ]; then RUN_ID=$(cat "$RES/run_id")
else RUN_ID=$(date -u +%Y-%m-%dT%H:%M:%SZ); fi
export MAE_FAST_BENCH_DATE=$RUN_ID  # one run id for every pytest session of both calls: report.py's run

# ----------------------------------------------------------------------------- stage library
# `stage NAME MAX_S MIN_S WHAT FUNCTION ARGS...` plans (MODE=plan: the function only names its
# checks, `need`) or runs (MODE=run) one stage: FUNCTION ARGS under a timeout of
# min(MAX_S, what is left before the report's reserve), skipped where that is under MIN_S.
MODE=plan PLAN_ONLY=1 STOPPED="" FAILED=0
CHECKS=() PLAN=() STATUS=()
need() { CHECKS+=("$@"); }
elapsed() { echo $(( $(date +%s) - T0 )); }
wanted() { [[ ",${MAE_FAST_GPU_STAGES:-all}," == *",all,"* || ",${MAE_FAST_GPU_STAGES:-}," == *",$1,"* ]]; }

stage() {
  local name=$1 max=$2 min=$3 what=$4; shift 4
  STAGE_NAMES+=("$name")
  if [ "$MODE" = plan ]; then
    local shown=$max
    (( max >= 9999 )) && shown=rest
    PLAN+=("$(printf '%-14s %5s %5s  %s' "$name" "$shown" "${min/#0/-}" "$what")")
    "$@"
    return 0
  fi
  local line
  if ! wanted "$name"; then STATUS+=("$(printf '%-14s left out (MAE_FAST_GPU_STAGES)' "$name")"); return 0; fi
  if [ -n "$STOPPED" ] && [ "$name" != report ]; then
    STATUS+=("$(printf '%-14s not run: %s' "$name" "$STOPPED")"); return 0
  fi
  local end=$(( BUDGET - RESERVE )) limit=$max
  [ "$name" = report ] && end=$BUDGET
  (( end - $(elapsed) < limit )) && limit=$(( end - $(elapsed) ))
  if (( limit < min || limit < 5 )); then
    STATUS+=("$(printf '%-14s not run: %ss left of the budget, it needs %ss' "$name" "$(( limit < 0 ? 0 : limit ))" \
      "$(( min > 5 ? min : 5 ))")")
    echo "=== [$name] not run: no time left"
    return 0
  fi
  echo "=== [$name] $what (timeout ${limit}s, $(elapsed)s elapsed)"
  local s rc took status
  s=$(date +%s)
  # SIGINT to the stage's process group when the time is up: pytest still writes what it measured
  # and the test runner names what it did not run; SIGKILL 15 s later if anything hangs
  STAGE_LIMIT=$limit timeout -s INT -k 15 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$LOGS/call$CALL-$name.log"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - s )) status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMED OUT (rc $rc)"; FAILED=1
  elif (( rc != 0 )); then status="FAILED (rc $rc)"; FAILED=1; fi
  line=$(printf '%-14s %-18s %4ss of %4ss  log %s' "$name" "$status" "$took" "$limit" "$LOGS/call$CALL-$name.log")
  STATUS+=("$line")
  if [ "$name" = info ] && (( rc != 0 )); then
    STOPPED="the run stopped after info: no CUDA, or a compiled kernel missing"
  fi
  save_out
}

save_out() {  # runners may return only a few files: one archive, and the main files beside it
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu_call$CALL.tgz" -C "$(dirname "$RES")" "$(basename "$RES")" 2>/dev/null
  local f
  for f in results.csv profile.md gpu_tests.txt "summary-call$CALL.txt" "$(slug).md"; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
  return 0
}

gpu_name() { python -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo NVIDIA; }
slug() { echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/_/g; s/^_//; s/_$//'; }  # report.py's
bench_opts() {  # pytest-benchmark may be missing: benchmarks/conftest.py then has a stand-in
  python -c "import pytest_benchmark" 2>/dev/null && echo "--benchmark-columns=median,rounds"
  return 0
}
# shellcheck disable=SC2046  # bench_opts: zero or one word
bench_pytest() { python -m pytest -q -p no:cacheprovider --bench-results "$RES/results.csv" $(bench_opts) "$@"; }

# ----------------------------------------------------------------------------- stages

do_build() {
  if (( PLAN_ONLY )); then
    need "file setup.py pyproject.toml" "command timeout tar sha1sum" "module torch setuptools"; return 0
  fi
  local stamp=build/mae_fast_gpu_build.stamp key pipi
  key=$(cat setup.py pyproject.toml csrc/* 2>/dev/null | sha1sum | cut -c1-16)-$TORCH_CUDA_ARCH_LIST
  if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] \
      && python -c "import sys, mae_fast.info as i; sys.exit(bool(i.missing_cuda_kernels()))"; then
    echo "up to date (sources unchanged since the last build here, every kernel present): not rebuilt"
    return 0
  fi
  # `python -m pip`: a bare `pip` can be another Python's, which has no torch
  pipi="python -m pip install --no-build-isolation --no-deps --no-index -q"
  export MAX_JOBS=16 MAE_FAST_BUILD_EXT=cuda
  $pipi -e . || { echo "!! pip install -e failed; trying a plain install"; $pipi .; }
  local check="import torch, mae_fast.kernels.patchify, mae_fast._C"
  if ! python -c "$check"; then
    echo "!! the install does not give mae_fast.kernels and mae_fast._C: building the extension in place"
    [ -e mae_fast/kernels ] || ln -s ../kernels mae_fast/kernels
    python setup.py build_ext --inplace && python -c "$check" || return 1
  fi
  mkdir -p build && echo "$key" > "$stamp"
}

do_info() {
  if (( PLAN_ONLY )); then need "module mae_fast.info"; return 0; fi
  if command -v nvidia-smi > /dev/null; then
    local q=name,driver_version,memory.total,pstate,clocks.sm,clocks.max.sm
    q+=,clocks.mem,clocks.max.mem,power.limit,temperature.gpu
    nvidia-smi --format=csv --query-gpu="$q" 2>&1 | head -3
  else
    echo "nvidia-smi: not found"
  fi
  python - <<'EOF'
import platform
from importlib import metadata
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()})")
for name in ("triton", "transformers", "timm", "torchvision", "pytest", "pytest-benchmark", "pytest-timeout",
             "hypothesis", "vit-pytorch"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
EOF
  python -m mae_fast.info
  python - <<'EOF'
import sys
import torch
from mae_fast.info import missing_cuda_kernels
if not torch.cuda.is_available():
    sys.exit("STOP: torch sees no CUDA device")
missing = missing_cuda_kernels()
if missing:
    sys.exit(f"STOP: missing {', '.join(missing)}: CUDA would run their PyTorch fallbacks")
print("every compiled kernel is present")
EOF
}

do_attention() {  # $1: the cases of benchmarks/test_bench_attention.py
  if (( PLAN_ONLY )); then need "file benchmarks/test_bench_attention.py" "attention $1"; return 0; fi
  MAE_FAST_BENCH_ATTENTION_CASES=$1 bench_pytest benchmarks/test_bench_attention.py
}

do_step() {  # $1 cases, $2 providers of benchmarks/steps.py; the suite skips what would pass its deadline
  if (( PLAN_ONLY )); then need "file benchmarks/test_bench_step.py" "steps $1 $2"; return 0; fi
  MAE_FAST_BENCH_CASES=$1 MAE_FAST_BENCH_PROVIDERS=$2 MAE_FAST_BENCH_DEADLINE=$(( $(date +%s) + STAGE_LIMIT - 5 )) \
    bench_pytest benchmarks/test_bench_step.py
}

do_profile() {  # $1 case, $2 providers
  if (( PLAN_ONLY )); then need "module benchmarks.profile_step" "profile $1 $2"; return 0; fi
  python -m benchmarks.profile_step --case "$1" --providers "$2" --steps 5 --host-steps 3 --out "$RES/profile.md"
}

do_gpu_tests() {  # $1: --rest for the tests the earlier calls did not report
  if (( PLAN_ONLY )); then need "module benchmarks.gpu_run" "tests $TESTS"; return 0; fi
  # shellcheck disable=SC2086  # ${1:-} and TESTS: words
  python -m benchmarks.gpu_run tests --res "$RES" --call "$CALL" --budget-s $(( STAGE_LIMIT - GRACE_S - 5 )) \
    --jobs "$JOBS" --per-test-s "$PER_TEST_S" ${1:-} $TESTS
}
GRACE_S=10  # benchmarks/gpu_run.py's wait for the processes it stops (GRACE_S there)

do_ops() {  # $1: pytest -k expression over the op suites, $2 attention cases
  if (( PLAN_ONLY )); then need "ops $OPS" "attention $2"; return 0; fi
  local files=() op
  for op in ${OPS//,/ }; do
    [[ "$1" == compiled && "$op" == attention ]] || files+=("benchmarks/test_bench_$op.py")  # no compiled impl
  done
  (( ${#files[@]} )) || { echo "no op suite selected"; return 0; }
  MAE_FAST_BENCH_ATTENTION_CASES=$2 bench_pytest "${files[@]}" -k "$1"
}

do_suites() {  # benchmark files run as they are (each picks its GPU cases itself)
  if (( PLAN_ONLY )); then need "file $*"; return 0; fi
  bench_pytest "$@"
}

do_report() {
  if (( PLAN_ONLY )); then need "module benchmarks.report"; return 0; fi
  [ -f "$RES/results.csv" ] || { echo "no results to report"; return 0; }
  python -m benchmarks.report --csv "$RES/results.csv" --outdir "$RES" --device "$GPU_NAME" \
    --run "$RUN_ID" --profile "$RES/profile.md" > "$LOGS/call$CALL-report.md"
}

call1() {
  stage build 150 0 "build the extension" do_build
  stage info 40 0 "versions, clocks, mae_fast.info; stop if a kernel is missing" do_info
  stage attention 75 20 "attention backends, $ATTENTION_CASES, fwd and fwd+bwd" do_attention "$ATTENTION_CASES"
  stage step-vit_b16 240 90 "ViT-B/16 step: $VIT_B_PROVIDERS" do_step official-vit_b16 "$VIT_B_PROVIDERS"
  stage profile 75 30 "profile of the ViT-B/16 step: $PROFILE_PROVIDERS" \
    do_profile official-vit_b16 "$PROFILE_PROVIDERS"
  stage step-vit_l16 120 100 "ViT-L/16 step: $VIT_L_PROVIDERS" do_step official-vit_l16 "$VIT_L_PROVIDERS"
  stage gpu-tests 9999 45 "pytest -m gpu, $JOBS processes, as far as the budget reaches" do_gpu_tests
  stage report 25 0 "report of the run" do_report
}

call2() {
  stage build 150 0 "build the extension (skipped when up to date)" do_build
  stage info 40 0 "versions, clocks, mae_fast.info; stop if a kernel is missing" do_info
  stage gpu-tests 150 45 "pytest -m gpu: what call 1 did not report, $JOBS processes" do_gpu_tests --rest
  stage ops 90 20 "op suites $OPS against eager (attention $ATTENTION_CASES)" do_ops "not compiled" "$ATTENTION_CASES"
  stage data 45 20 "data pipeline: uint8 CPU pipeline vs torchvision's PIL one, GPU decode" \
    do_suites benchmarks/test_bench_data.py
  stage finetune 60 30 "fine-tuning step: VisionTransformer vs timm, eager and compiled" \
    do_suites benchmarks/test_bench_finetune.py
  stage ops-compiled 9999 30 "the op suites' torch.compile baselines" do_ops compiled "$ATTENTION_CASES"
  stage report 25 0 "report of the run" do_report
}

# ----------------------------------------------------------------------------- plan and checks

STAGE_NAMES=()
"call$CALL"
need "int MAE_FAST_GPU_BUDGET_S $BUDGET" "int MAE_FAST_GPU_TEST_JOBS $JOBS" \
  "int MAE_FAST_GPU_TEST_TIMEOUT_S $PER_TEST_S" \
  "stages ${MAE_FAST_GPU_STAGES:-all} $(IFS=,; echo "${STAGE_NAMES[*]}")" \
  "unset MAE_FAST_BENCH_CASES MAE_FAST_BENCH_PROVIDERS" \
  "knobs" "module benchmarks.gpu_run"
COMMIT=${MAE_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo "unknown (set MAE_FAST_COMMIT)")}
echo "mae_fast GPU run, call $CALL$( (( DRY_RUN )) && echo " (dry run: nothing is run)"): budget ${BUDGET}s" \
  "(${RESERVE}s of it kept for the report), run id $RUN_ID, commit $COMMIT, results in $RES"
printf '%-14s %5s %5s  %s\n' stage "max s" "min s" what
printf '%s\n' "${PLAN[@]}"
echo "checking ${#CHECKS[@]} things the stages need (names, files, modules, knobs)"
python -m benchmarks.gpu_run check "${CHECKS[@]}"
rc=$?
if (( DRY_RUN )); then
  if (( rc == 0 )); then echo "dry run: OK"; else echo "dry run: FAILED (above: what to fix)"; fi
  exit $(( rc ? 1 : 0 ))
fi
(( rc == 0 )) || { echo "not run: the checks above failed"; exit 2; }

# ----------------------------------------------------------------------------- run

mkdir -p "$LOGS"
echo "$RUN_ID" > "$RES/run_id"
MODE=run PLAN_ONLY=0
GPU_NAME=$(gpu_name)
export RES LOGS CALL RUN_ID PYTHON PLAN_ONLY OPS TESTS JOBS PER_TEST_S GRACE_S GPU_NAME
export -f python need gpu_name slug bench_opts bench_pytest do_build do_info do_attention do_step do_profile \
  do_gpu_tests do_ops do_suites do_report
STAGE_NAMES=()
"call$CALL"

SUMMARY=$RES/summary-call$CALL.txt
{
  echo "=============== mae_fast GPU run, call $CALL: $(elapsed)s of ${BUDGET}s, run id $RUN_ID," \
    "commit $COMMIT ==============="
  printf '%s\n' "${STATUS[@]}"
  [ -n "$STOPPED" ] && echo "STOPPED: $STOPPED (see $LOGS/call$CALL-info.log)"
  true
  echo
  python -m benchmarks.gpu_run summary --res "$RES" 2>&1
  echo
  where="results: $RES"
  [ -f "$RES/results.csv" ] && where+=": the rows of run $RUN_ID in results.csv"
  [ -f "$RES/$(slug).md" ] && where+=", $(slug).md"
  [ -n "${OUT:-}" ] && where+="; copied to \$OUT"
  echo "$where"
} > "$SUMMARY"
save_out
echo
cat "$SUMMARY"
[ -n "$STOPPED" ] && exit 3
exit "$FAILED"
