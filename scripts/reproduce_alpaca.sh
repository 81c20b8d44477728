#!/usr/bin/env bash
# Reproduce Stanford Alpaca end to end: 52K instructions from the 175 seed tasks with an
# OpenAI-compatible teacher, a LLaMA-7B fine-tune (full with FSDP, LoRA or QLoRA), an evaluation
# on the user-oriented set, and an HTML report. Every step is a `corral` or `accelerate` command;
# --dry-run prints them all without running anything.
#
#   scripts/reproduce_alpaca.sh --dry-run
#   scripts/reproduce_alpaca.sh --teacher-base-url http://localhost:8000/v1 --teacher-model MODEL \
#       --method full --gpus 8
#   scripts/reproduce_alpaca.sh --scaled-down      # the same recipe, tiny, on this CPU (minutes)
#   scripts/reproduce_alpaca.sh --estimate ...     # what the generation would cost, nothing else
#   scripts/reproduce_alpaca.sh --score-filter 4.5 ...   # train on the judge's best records only
#   scripts/reproduce_alpaca.sh --recipe vicuna ...      # multi-turn: self-chat data, Vicuna format
#   scripts/reproduce_alpaca.sh --recipe dpo ...         # Alpaca SFT, then judged pairs and DPO
#
# Each step resumes where it stopped when the script is run again with the same arguments:
# generation continues its journal and training picks up its last checkpoint (resume=auto).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
shared="$(cd "$here/.." && pwd)/shared/data/self-instruct"

dry_run=0
scaled_down=0
estimate=0
score_filter=
method=full
gpus=8
base_model=meta-llama/Llama-2-7b-hf
teacher_base_url=${OPENAI_BASE_URL:-}
teacher_model=gpt-4o-mini
num_instructions=52000
seed_tasks=$shared/seed_tasks.jsonl
eval_set=$shared/user_oriented_instructions.jsonl
eval_limit=252
out=runs/alpaca_reproduction
recipe=alpaca

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF

Options:
  --dry-run                 print every command, run none
  --recipe alpaca|vicuna|dpo  alpaca (default); vicuna: conversations by self-chat from the
                            seeds, trained in the Vicuna v1.1 format with the loss on every
                            assistant turn; dpo: the Alpaca SFT run, then answer pairs from the
                            teacher and the SFT run judged in both orders, DPO from the SFT
                            adapter, and the DPO run judged against its SFT parent
  --scaled-down             embedded model as teacher and base, a few records, CPU presets
  --estimate                only estimate the generation (requests, tokens, time, cost)
  --score-filter MIN        score every record with the judge (the teacher) and train only on
                            those scored MIN or more (AlpaGasus-style), via corral score + audit
  --method full|lora|qlora  training recipe (default: $method)
  --gpus N                  GPUs on this machine (default: $gpus)
  --base-model NAME         model to fine-tune (default: $base_model)
  --teacher-base-url URL    OpenAI-compatible teacher endpoint (default: \$OPENAI_BASE_URL, or OpenAI)
  --teacher-model NAME      teacher model id (default: $teacher_model); also the judge
  --num-instructions N      instructions to generate (default: $num_instructions)
  --seed-tasks PATH         Self-Instruct seed tasks (default: the 175 original seeds)
  --eval-set PATH           user-oriented evaluation set (evaluation only, never training)
  --out DIR                 where everything is written (default: $out)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --recipe) recipe=$2; shift ;;
    --scaled-down) scaled_down=1 ;;
    --estimate) estimate=1 ;;
    --score-filter) score_filter=$2; shift ;;
    --method) method=$2; shift ;;
    --gpus) gpus=$2; shift ;;
    --base-model) base_model=$2; shift ;;
    --teacher-base-url) teacher_base_url=$2; shift ;;
    --teacher-model) teacher_model=$2; shift ;;
    --num-instructions) num_instructions=$2; shift ;;
    --seed-tasks) seed_tasks=$2; shift ;;
    --eval-set) eval_set=$2; shift ;;
    --out) out=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$0: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$recipe" in
  alpaca|vicuna|dpo) ;;
  *) echo "$0: --recipe must be alpaca, vicuna or dpo, got '$recipe'" >&2; exit 2 ;;
esac
# DPO continues a LoRA adapter (its reference is that adapter, frozen).
[ "$recipe" = dpo ] && [ "$method" = full ] && method=lora
[ "$recipe" = dpo ] && [ "$method" != lora ] && {
  echo "$0: --recipe dpo trains LoRA adapters (--method lora)" >&2; exit 2; }
case "$method" in
  full|lora|qlora) ;;
  *) echo "$0: --method must be full, lora or qlora, got '$method'" >&2; exit 2 ;;
esac

# Commands run from the repository root; its .venv (from `make install`) is used when present.
corral=corral accelerate=accelerate
[ -x "$here/.venv/bin/corral" ] && corral=.venv/bin/corral accelerate=.venv/bin/accelerate

step=0
run() {
  step=$((step + 1))
  printf '\n[%d] %s\n' "$step" "$*"
  if [ "$dry_run" = 0 ]; then
    (cd "$here" && "$@")
  fi
}

if [ "$scaled_down" = 1 ]; then
  # The same four steps, sized for a CPU: the embedded model teaches itself a few records.
  [ "$method" = full ] && method=lora
  [ "$out" = runs/alpaca_reproduction ] && out=runs/alpaca_scaled_down
fi
[ "$recipe" != alpaca ] && out="${out/alpaca_/${recipe}_}"
data="$out/alpaca_data.json"
[ "$recipe" = vicuna ] && data="$out/conversations.json"   # ShareGPT JSON, not Alpaca records
train_data="$data"
[ -n "$score_filter" ] && train_data="$out/alpaca_data_best.json"
run_dir="$out/run_$method"

if [ "$scaled_down" = 1 ]; then
  generate=("$corral" generate --config configs/data_gen/embedded_demo.yaml
    --num-instructions 8 --output "$data")
  [ -f "$seed_tasks" ] && generate+=(--seed-tasks "$seed_tasks")
  train=("$accelerate" launch --config_file configs/accelerate/single_device.yaml train.py
    --config configs/training/smoke.yaml "data=$train_data" "output_dir=$run_dir" "method=$method"
    val_size=2 max_steps=12 resume=auto)
  conversations=("$corral" generate --config configs/data_gen/embedded_demo.yaml
    --mode conversations turns=2 --num-instructions 4 --output "$data")
  train_vicuna=("$accelerate" launch --config_file configs/accelerate/single_device.yaml train.py
    --config configs/training/vicuna_smoke.yaml "data=$data" "output_dir=$run_dir" val_size=1
    max_steps=8 resume=auto)
  # A 135M judge picks by position (0 of 6 pairs consistent in both orders on the smoke
  # records), so judged pairs from it are empty: the scaled-down DPO step trains on the 40
  # hand-written pairs of the smoke preset instead; the full recipe judges with the teacher.
  preferences=()
  train_dpo=("$accelerate" launch --config_file configs/accelerate/single_device.yaml train.py
    --config configs/training/dpo_smoke.yaml "init_adapter=$run_dir" "output_dir=$out/run_dpo"
    max_steps=8 resume=auto)
  score=("$corral" score "$data" --judge embedded --output "$out/alpaca_data_scored.json")
  base_model=embedded
  evaluate=("$corral" eval --eval-set "$eval_set" --base embedded --tuned "$run_dir" --limit 3
    --max-new-tokens 48 --judge embedded --output "$out/eval.json")
else
  [ -f "$seed_tasks" ] || {
    echo "$0: seed tasks not found at $seed_tasks: get seed_tasks.jsonl from the Self-Instruct" \
      "release (175 tasks) and pass --seed-tasks PATH" >&2
    [ "$dry_run" = 1 ] || exit 2
  }
  generate=("$corral" generate --config configs/data_gen/alpaca.yaml --seed-tasks "$seed_tasks"
    --num-instructions "$num_instructions" --model "$teacher_model" --output "$data")
  [ -n "$teacher_base_url" ] && generate+=(--base-url "$teacher_base_url")
  case "$method" in
    full) accel_config=configs/accelerate/fsdp.yaml; preset=configs/training/alpaca_full_7b.yaml ;;
    lora) accel_config=configs/accelerate/ddp.yaml; preset=configs/training/alpaca_lora_7b.yaml ;;
    qlora) accel_config=configs/accelerate/ddp.yaml; preset=configs/training/qlora_7b.yaml ;;
  esac
  [ "$gpus" -le 1 ] && accel_config=configs/accelerate/single_device.yaml
  train=("$accelerate" launch --config_file "$accel_config" --num_processes "$gpus" train.py
    --config "$preset" "model=$base_model" "data=$train_data" "output_dir=$run_dir" resume=auto)
  score=("$corral" score "$data" --judge-base-url "${teacher_base_url:-https://api.openai.com/v1}"
    --judge-model "$teacher_model" --output "$out/alpaca_data_scored.json")
  evaluate=("$corral" eval --eval-set "$eval_set" --base "$base_model" --tuned "$run_dir"
    --limit "$eval_limit" --judge-model "$teacher_model" --output "$out/eval.json")
  evaluate+=(--judge-base-url "${teacher_base_url:-https://api.openai.com/v1}")
  conversations=("${generate[@]}" --mode conversations turns=3)
  train_vicuna=("$accelerate" launch --config_file configs/accelerate/fsdp.yaml --num_processes
    "$gpus" train.py --config configs/training/vicuna_7b.yaml "model=$base_model" "data=$data"
    "output_dir=$run_dir" resume=auto)
  [ "$gpus" -le 1 ] && train_vicuna=("$accelerate" launch --config_file
    configs/accelerate/single_device.yaml train.py --config configs/training/vicuna_7b.yaml
    "model=$base_model" "data=$data" "output_dir=$run_dir" method=qlora resume=auto)
  preferences=("$corral" generate --mode preferences --model "$teacher_model"
    "preference_prompts=$data" "answer_sources=[teacher,$run_dir]" --output "$out/preferences.json")
  [ -n "$teacher_base_url" ] && preferences+=(--base-url "$teacher_base_url")
  train_dpo=("$accelerate" launch --config_file "$accel_config" --num_processes "$gpus" train.py
    --config configs/training/dpo_7b.yaml "model=$base_model" "data=$out/preferences.json"
    "init_adapter=$run_dir" "output_dir=$out/run_dpo" resume=auto)
  if [ -z "${OPENAI_API_KEY:-}" ] && [ "$dry_run" = 0 ]; then
    echo "note: OPENAI_API_KEY is not set; a hosted teacher will refuse the requests" >&2
  fi
fi

if [ ! -f "$eval_set" ]; then
  echo "note: evaluation set not found at $eval_set; pass --eval-set (Self-Instruct's" \
    "user_oriented_instructions.jsonl). Skipping evaluation." >&2
  evaluate=()
fi

if [ "$estimate" = 1 ]; then
  run "${generate[@]}" --estimate
  printf '\nDone%s: estimated only; the estimate is beside %s\n' \
    "$([ "$dry_run" = 1 ] && echo ' (dry run: nothing was run)')" "$data"
  exit 0
fi
if [ "$recipe" = vicuna ]; then
  # Vicuna: multi-turn conversations (ShareGPT JSON) instead of single instructions.
  run "${conversations[@]}"
  run "${train_vicuna[@]}"
  [ ${#evaluate[@]} -gt 0 ] && run "${evaluate[@]}"
  report=("$corral" report "$run_dir")
  [ ${#evaluate[@]} -gt 0 ] && report+=("$out/eval.json")
  run "${report[@]}" --output "$out/report.html"
  printf '\nDone%s. Everything is under %s:\n' "$([ "$dry_run" = 1 ] && echo ' (dry run: nothing was run)')" "$out"
  printf '  data      %s\n  run       %s\n  report    %s\n' "$data" "$run_dir" "$out/report.html"
  exit 0
fi
run "${generate[@]}"
if [ -n "$score_filter" ]; then
  run "${score[@]}"
  run "$corral" audit "$out/alpaca_data_scored.json" --min-score "$score_filter" --fix "$train_data"
fi
run "${train[@]}"
if [ "$recipe" = dpo ]; then
  # DeepSpeed-Chat's second stage, by DPO: pairs judged in both orders, then DPO from the SFT run.
  if [ ${#preferences[@]} -gt 0 ]; then
    run "${preferences[@]}"
  else
    echo "note: scaled down, DPO trains on configs/training/smoke_preferences.jsonl (hand-written" \
      "pairs): the embedded model is too small to judge pairs consistently" >&2
  fi
  run "${train_dpo[@]}"
  if [ ${#evaluate[@]} -gt 0 ]; then
    # The DPO run against its SFT parent, with the same judge.
    for i in "${!evaluate[@]}"; do
      case "${evaluate[$i]}" in
        --base) evaluate[i + 1]=$run_dir ;;
        --tuned) evaluate[i + 1]=$out/run_dpo ;;
      esac
    done
  fi
  run_dir="$out/run_dpo"
fi
[ ${#evaluate[@]} -gt 0 ] && run "${evaluate[@]}"
report=("$corral" report "$data" "$run_dir")
[ ${#evaluate[@]} -gt 0 ] && report+=("$out/eval.json")
[ -f "$seed_tasks" ] && report+=(--seed-tasks "$seed_tasks")
run "${report[@]}" --output "$out/report.html"

printf '\nDone%s. Everything is under %s:\n' "$([ "$dry_run" = 1 ] && echo ' (dry run: nothing was run)')" "$out"
printf '  data      %s\n  run       %s\n  eval      %s\n  report    %s\n' \
  "$data" "$run_dir" "$out/eval.json" "$out/report.html"
