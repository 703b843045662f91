#!/usr/bin/env bash
# scripts/demo.sh [RUN_DIR]: the whole two-phase DPO job on the embedded tiny model, 2 CPU ranks.
#   prepare -> precompute (deepspeed, 2 ranks) -> evaluate SFT -> train (deepspeed, 2 ranks, ZeRO-3,
#   gradient checkpointing) -> evaluate the trained model -> before/after table + report.png
# Smaller: DEMO_EXAMPLES=300 DEMO_STEPS=20 scripts/demo.sh runs/quick
source "$(dirname "$0")/_venv.sh"
RUN="${1:-runs/demo}"
EXAMPLES="${DEMO_EXAMPLES:-2000}"
STEPS="${DEMO_STEPS:-200}"
PORT="${DEMO_PORT:-$(python -c 'from dpo_ds.dist import free_port; print(free_port())')}"
STAGE() { echo; echo "=== $* ==="; }
rm -rf "$RUN" && mkdir -p "$RUN"
start=$SECONDS

STAGE "1/6 embedded default: tiny Qwen3 + synthetic 'sort' preferences ($EXAMPLES pairs)"
dpo-ds tiny --output_dir "$RUN/tiny" --num_examples "$EXAMPLES"

STAGE "2/6 prepare"
dpo-ds prepare --dataset "$RUN/tiny/prefs.jsonl" --tokenizer "$RUN/tiny/model" \
  --output_dir "$RUN/data" --eval_fraction 0.1

STAGE "3/6 precompute reference log-probs (deepspeed launcher, 2 ranks)"
deepspeed --num_gpus 2 --master_port "$PORT" --no_python dpo-ds precompute \
  --model "$RUN/tiny/model" --data "$RUN/data" --output_dir "$RUN/ref_cache" --batch_size 16 --shard_size 256
dpo-ds verify "$RUN/ref_cache" --data "$RUN/data" --model "$RUN/tiny/model"

STAGE "4/6 evaluate the SFT model (before)"
dpo-ds evaluate --model "$RUN/tiny/model" --data "$RUN/data" --ref_cache "$RUN/ref_cache" \
  --output "$RUN/eval_before.json"

STAGE "5/6 train (deepspeed launcher, 2 ranks, ZeRO-3, gradient checkpointing, $STEPS steps)"
deepspeed --num_gpus 2 --master_port "$PORT" --no_python dpo-ds train \
  --deepspeed ds_configs/zero3_cpu.json --config scripts/demo_job.json --max_steps "$STEPS" \
  --model "$RUN/tiny/model" --data "$RUN/data" --ref_cache "$RUN/ref_cache" --output_dir "$RUN/train"

STAGE "6/6 evaluate the trained model (after)"
dpo-ds evaluate --model "$RUN/train/final" --data "$RUN/data" --ref_cache "$RUN/ref_cache" \
  --output "$RUN/eval_after.json"

python scripts/demo_summary.py "$RUN"
echo "curves: $RUN/train/report.png   TensorBoard: tensorboard --logdir $RUN/train/tensorboard"
echo "demo finished in $((SECONDS - start)) s"
