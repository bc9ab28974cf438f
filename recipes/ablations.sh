#!/usr/bin/env bash
# Ablations at one training budget: the full loss, without the latent-consistency loss, and without the sampler
# (drafts = the base head's argmax at the masks). Each variant trains from scratch with the same data, seed,
# steps and sizes, then `maskspec acceptance` measures tokens per pass for k = 1..K on the dev suite.
#
#   DATA=out/distill.jsonl recipes/ablations.sh OUT_DIR
#
# DATA is a distilled answer file (`maskspec distill`, or the first stage of recipes/smollm2-135m.sh).
# Linear vs quadratic decoding needs no training: `maskspec bench --modes linear,quadratic` measures it.
set -euo pipefail

OUT=${1:?usage: DATA=distill.jsonl recipes/ablations.sh OUT_DIR}
DATA=${DATA:?set DATA to a distilled answer file}
SUITE=${SUITE:-../shared/data/eval/dev.jsonl}
MASKSPEC=${MASKSPEC:-maskspec}
: "${K:=4}" "${RANK:=16}" "${ALPHA:=32}" "${LR:=1e-3}" "${STEPS:=100}" "${BATCH:=4}" "${MAX_LENGTH:=320}"
: "${BLOCK_ARGS:=--max-blocks 24}" "${TRAIN_FLAGS:=--bf16 --cpu}" "${SEED:=0}"
: "${EVAL_N:=8}" "${EVAL_MAX_NEW:=64}" "${VARIANTS:=full no-lcm no-sampler}"

mkdir -p "$OUT"
for variant in $VARIANTS; do
  case "$variant" in
    full) weights="" ;;
    no-lcm) weights="--lcm-weight 0" ;;
    no-sampler) weights="--sampler-weight 0" ;;
    *) echo "unknown variant $variant (full, no-lcm, no-sampler)"; exit 2 ;;
  esac
  if [ ! -f "$OUT/$variant/adapter.safetensors" ]; then
    echo "== train $variant: k=$K rank=$RANK steps=$STEPS batch=$BATCH $weights"
    start=$(date +%s)
    $MASKSPEC train --data "$DATA" --out "$OUT/$variant" --k "$K" --rank "$RANK" --alpha "$ALPHA" --lr "$LR" \
      --steps "$STEPS" --batch-size "$BATCH" --max-length "$MAX_LENGTH" --warmup 10 --save-every "$STEPS" \
      --seed "$SEED" $BLOCK_ARGS $TRAIN_FLAGS $weights --no-progress
    echo "== $variant trained in $(( $(date +%s) - start )) s"
  fi
  # Greedy answers depend on the base model only: decoded once, reused for every variant.
  $MASKSPEC acceptance --adapter "$OUT/$variant" --suite "$SUITE" --n "$EVAL_N" --max-new-tokens "$EVAL_MAX_NEW" \
    --drafters sampler,head --answers "$OUT/answers.json" --out "$OUT/$variant/acceptance"
done
