#!/usr/bin/env bash
# The first GPU run, prepared (issue 21): every check that needs a CUDA GPU, in one call of about 8
# minutes at most, with one summary file.
#
#   bench/gpu_check.sh [OUTDIR]        run on a machine with a GPU; summary: OUTDIR/gpu_check.md
#                                      (OUTDIR defaults to $OUT, else bench/.cache/gpu_check)
#   bench/gpu_check.sh --dry-run       on any machine: list what would run and check that every
#                                      referenced test id, benchmark and benchmark flag exists
#
# PYTHON (default: .venv/bin/python, else python3) must have the project with a CUDA build of torch,
# nvidia-dali for the installed CUDA, and ray. Each check has its own time limit; the limits add up
# to 465 s, so the whole script stays under 8 minutes even when every check runs out of time. A failed
# or timed-out check does not stop the others; the exit status is non-zero if any failed.
set -u

REPO=${GPU_CHECK_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$REPO" || exit 2
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-bench/.cache/gpu_check}}

# Test ids the checks name, one array per test folder: the folders' conftest modules share a name, so
# one pytest process per folder (the whole suite collects them in an order that works; a mixed list of
# ids does not). The dry run collects each id, so a renamed or deleted test is caught before a GPU run.
TRAINER_GPU=(
  tests/trainer/test_trainer_gpu.py::test_tiny_training_run_on_gpu
  tests/trainer/test_trainer_gpu.py::test_dali_mixed_decode_matches_cpu_decode
)
TRAINER_REAL_SIZE=(tests/trainer/test_trainer_gpu.py::test_real_size_recipe_builds_and_takes_a_bf16_step)
# CPU-meant trainer tests, run on the GPU machine too: they pin themselves to the CPU (train.device=cpu),
# so they must pass there exactly as here (exact resume at 1e-6, the 2-process gloo torchrun).
TRAINER_CPU=(
  tests/trainer/test_trainer_run.py::test_stop_and_resume_matches_uninterrupted_run
  tests/trainer/test_trainer_run.py::test_torchrun_two_processes_gloo_ddp_and_fsdp_equal_one_process
)
CLIP_GPU=(
  tests/clip/test_models.py::test_dali_mixed_gpu_within_tolerance
  tests/clip/test_models.py::test_dali_gpu_on_corrupt_gif_mpo_bomb_and_a_real_device_oom
  tests/clip/test_clip_stage.py::test_top_fraction_scores_on_the_gpu_through_ray
)
RECAPTION_GPU=(
  tests/recaption/test_recaption_stage.py::test_real_cuda_out_of_memory_frees_the_failed_batch_before_the_retry
  tests/recaption/test_recaption_stage.py::test_bf16_on_gpu
)
TEST_GROUPS=(TRAINER_GPU TRAINER_REAL_SIZE TRAINER_CPU CLIP_GPU RECAPTION_GPU)
NAMED=("${TRAINER_GPU[@]}" "${TRAINER_REAL_SIZE[@]}" "${CLIP_GPU[@]}" "${RECAPTION_GPU[@]}")
DESELECT=""
for id in "${NAMED[@]}"; do DESELECT+=" --deselect $id"; done
PYTEST="$PY -m pytest -q -p no:cacheprovider"

# name | seconds | command   (benchmarks: their GPU halves run when CUDA is present; small sizes)
# Limits sum to 465 s. "other_gpu_marked" catches gpu tests added later and not named above (exit 5,
# nothing collected, counts as ok).
CHECKS=(
  "environment|10|nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c 'import torch, nvidia.dali as d; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), d.__version__)'"
  "trainer_gpu|60|$PYTEST -m gpu ${TRAINER_GPU[*]}"
  "trainer_cpu_pinned|60|$PYTEST ${TRAINER_CPU[*]}"
  "clip_gpu|60|$PYTEST -m gpu ${CLIP_GPU[*]}"
  "recaption_gpu|40|$PYTEST -m gpu ${RECAPTION_GPU[*]}"
  "other_gpu_marked|25|$PYTEST -m gpu tests$DESELECT"
  "bench_clip|40|$PY bench/clip.py --images 32 --batch 32 --repeats 1"
  "bench_train_loader|40|$PY bench/train_loader.py --photos 64 --images 128 --batch 64 --repeats 1 --gpu-steps 10"
  "bench_recaption|40|$PY bench/recaption.py --images 16 --sizes 4,16 --gpu-images 64 --gpu-sizes 8,32"
  "trainer_real_size|90|$PYTEST -m gpu ${TRAINER_REAL_SIZE[*]}"
)

dry_run() {
  local status=0 total=0 entry name secs cmd bench flag group id out
  for entry in "${CHECKS[@]}"; do
    IFS='|' read -r name secs cmd <<<"$entry"
    echo "would run [$name, ${secs}s]: $cmd"
    if [[ $cmd =~ bench/([a-z_]+\.py)(.*) ]]; then
      bench="bench/${BASH_REMATCH[1]}"
      if [[ ! -f $bench ]]; then echo "MISSING benchmark: $bench"; status=1; continue; fi
      for flag in $(grep -oE -- '--[a-z][a-z-]*' <<<"${BASH_REMATCH[2]}"); do
        grep -q -- "add_argument(\"$flag\"" "$bench" || { echo "MISSING flag $flag in $bench"; status=1; }
      done
    fi
  done
  # Collect every referenced test id, one folder at a time (no GPU needed to collect).
  for group in "${TEST_GROUPS[@]}"; do
    local -n ids=$group
    total=$(( total + ${#ids[@]} ))
    # collect the files (a missing id would make pytest collect nothing), then look for each id
    out=$($PYTEST --collect-only $(printf '%s\n' "${ids[@]%%::*}" | sort -u) 2>&1)
    for id in "${ids[@]}"; do  # exact: the id itself or its parametrised cases "id[...]"
      awk -v id="$id" '$0 == id || index($0, id "[") == 1 { found = 1 } END { exit !found }' <<<"$out" \
        || { echo "MISSING test: $id"; status=1; }
    done
    unset -n ids
  done
  [[ $status == 0 ]] && echo "dry run: ${#CHECKS[@]} checks, $total test ids, all present"
  return $status
}

if [[ $DRY == 1 ]]; then
  dry_run
  exit $?  # never falls through to running the checks
fi

mkdir -p "$OUTDIR"
summary="$OUTDIR/gpu_check.md"
failed=0
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo
  echo "| check | status | seconds | result |"
  echo "|---|---|---|---|"
} >"$summary"
for entry in "${CHECKS[@]}"; do
  IFS='|' read -r name secs cmd <<<"$entry"
  log="$OUTDIR/$name.log"
  echo "== $name (limit ${secs}s): $cmd" | tee "$log"
  start=$(date +%s)
  timeout --kill-after=10 "$secs" bash -c "$cmd" >>"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  [[ $name == other_gpu_marked && $rc == 5 ]] && rc=0  # pytest: nothing else is marked gpu
  case $rc in 0) state=ok ;; 124|137) state="timed out"; failed=1 ;; *) state="failed ($rc)"; failed=1 ;; esac
  # The line that says what happened: pytest's tally, a benchmark's ratios, or the last line.
  result=$(grep -E "(passed|failed|error|skipped)( |,|$)|ratio:|GPU ratio|img/s|samples/s" "$log" | tail -3 | tr '\n' ' ' | tr '|' '/')
  [[ -z $result ]] && result=$(tail -1 "$log" | tr '|' '/')
  echo "| $name | $state | $took | ${result:0:400} |" >>"$summary"
  echo "   -> $state in ${took}s"
done
{
  echo
  echo "Logs: $OUTDIR/<check>.log. Commands:"
  for entry in "${CHECKS[@]}"; do IFS='|' read -r name secs cmd <<<"$entry"; echo "- $name: \`$cmd\`"; done
} >>"$summary"
cat "$summary"
exit $failed
