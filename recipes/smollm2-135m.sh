#!/usr/bin/env bash
# Default adapter for the embedded SmolLM2-135M-Instruct: distil answers, train, benchmark.
#
#   recipes/smollm2-135m.sh OUT_DIR            # CPU settings (this project's 2-core reference machine)
#   GPU=1 recipes/smollm2-135m.sh OUT_DIR      # the same recipe with GPU sizes
#   ACCEPT_N=20 BENCH_N=20 ...                  # then measure: tau for every k, and wall clock
#
# Every size is an environment variable, so a run can be scaled to the time it has (TOTAL_SECONDS, if set,
# caps distill + train together). Stages are resumable: distill skips answered prompts (it answers them in a
# seeded random order, so a stopped run has every domain), train continues from its latest checkpoint (--resume).
# Training stops itself at TRAIN_SECONDS with its cosine schedule fitted to the steps that fit (--time-limit);
# INIT_ADAPTER=FOLDER continues an existing adapter.
set -euo pipefail

OUT=${1:?usage: recipes/smollm2-135m.sh OUT_DIR}
PROMPTS=${PROMPTS:-../shared/data/train/prompts.jsonl}
SUITE=${SUITE:-../shared/data/eval/dev.jsonl}
MASKSPEC=${MASKSPEC:-maskspec}
if [ "${GPU:-0}" = 1 ]; then
  : "${PER_DOMAIN:=1200}" "${MAX_NEW:=256}" "${DISTILL_BATCH:=256}" "${DISTILL_SECONDS:=210}"
  : "${STEPS:=3000}" "${BATCH:=16}" "${MAX_LENGTH:=768}" "${TRAIN_SECONDS:=270}" "${SAVE_EVERY:=250}"
  : "${BLOCK_ARGS:=}" "${DEVICE:=cuda}" "${TRAIN_FLAGS:=--bf16}"
else
  : "${PER_DOMAIN:=60}" "${MAX_NEW:=192}" "${DISTILL_BATCH:=16}" "${DISTILL_SECONDS:=2400}"
  : "${STEPS:=400}" "${BATCH:=2}" "${MAX_LENGTH:=512}" "${TRAIN_SECONDS:=5400}" "${SAVE_EVERY:=50}"
  : "${BLOCK_ARGS:=--max-blocks 48}" "${DEVICE:=cpu}" "${TRAIN_FLAGS:=--bf16 --cpu}"
fi
: "${K:=8}" "${RANK:=16}" "${ALPHA:=32}" "${LR:=5e-4}" "${SEED:=0}"

mkdir -p "$OUT"
start=$(date +%s)
echo "== distill: up to $PER_DOMAIN prompts per domain, answers up to $MAX_NEW tokens (limit ${DISTILL_SECONDS}s)"
timeout "$DISTILL_SECONDS" $MASKSPEC distill --prompts "$PROMPTS" --out "$OUT/distill.jsonl" \
  --per-domain "$PER_DOMAIN" --max-new-tokens "$MAX_NEW" --batch-size "$DISTILL_BATCH" --seed "$SEED" \
  --shuffle --device "$DEVICE" --no-progress || echo "distill stopped (status $?); training on what was answered"
wc -l "$OUT/distill.jsonl"
if [ -n "${TOTAL_SECONDS:-}" ]; then
  # A limit for the whole recipe: training gets what distillation left, less a minute for loading and saving.
  left=$(( TOTAL_SECONDS - ($(date +%s) - start) - 60 ))
  [ "$left" -lt "$TRAIN_SECONDS" ] && TRAIN_SECONDS=$left
  [ "$TRAIN_SECONDS" -ge 30 ] || { echo "TOTAL_SECONDS leaves no time to train"; exit 1; }
fi

echo "== train: k=$K rank=$RANK steps=$STEPS batch=$BATCH (limit ${TRAIN_SECONDS}s)"
resume=""
# An existing adapter folder is this recipe's earlier training output: continue it.
[ -d "$OUT/adapter" ] && resume="--resume"
init=""
[ -n "${INIT_ADAPTER:-}" ] && init="--init-adapter $INIT_ADAPTER"
set +e
# --time-limit ends training cleanly; the outer timeout (with room for loading, evaluation and saving) is a guard.
timeout "$(( TRAIN_SECONDS + 300 ))" $MASKSPEC train --data "$OUT/distill.jsonl" --out "$OUT/adapter" \
  --time-limit "$TRAIN_SECONDS" $init --k "$K" --rank "$RANK" --alpha "$ALPHA" --lr "$LR" --steps "$STEPS" \
  --batch-size "$BATCH" --max-length "$MAX_LENGTH" \
  --save-every "$SAVE_EVERY" --eval-every "$SAVE_EVERY" --seed "$SEED" --warmup "${WARMUP:-50}" $BLOCK_ARGS \
  $TRAIN_FLAGS $resume --no-progress
status=$?
set -e
if [ ! -f "$OUT/adapter/adapter.safetensors" ]; then
  latest=$(ls -d "$OUT"/adapter/checkpoints/step-* 2>/dev/null | tail -n 1)
  [ -n "$latest" ] || { echo "training produced no checkpoint (status $status)"; exit 1; }
  echo "train stopped (status $status); exporting $latest"
  cp "$latest"/adapter/adapter.safetensors "$latest"/adapter/adapter_config.json "$OUT/adapter/"
fi
echo "== recipe wall time: $(( $(date +%s) - start )) s"

if [ -n "${ACCEPT_N:-}" ]; then
  echo "== acceptance: tau for k = 1..$K, $ACCEPT_N prompts per domain"
  $MASKSPEC acceptance --adapter "$OUT/adapter" --suite "$SUITE" --n "$ACCEPT_N" \
    --max-new-tokens "${BENCH_MAX_NEW:-128}" --out "$OUT/acceptance" --device "$DEVICE"
fi

if [ -n "${BENCH_N:-}" ]; then
  echo "== bench: $BENCH_N prompts per domain"
  $MASKSPEC bench --adapter "$OUT/adapter" --suite "$SUITE" --n "$BENCH_N" --k "${BENCH_K:-1,2,4,8}" \
    --modes "${BENCH_MODES:-ar,quadratic}" --max-new-tokens "${BENCH_MAX_NEW:-128}" --out "$OUT/bench" \
    --device "$DEVICE" ${BENCH_FLAGS:-}
fi
