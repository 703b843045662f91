#!/usr/bin/env bash
# scripts/sweep.sh [RUN_DIR]: a β × loss sweep against ONE reference cache, on the demo's data (README: Losses).
#   the demo's prepare + precompute (skipped when RUN_DIR already holds them) -> one training per (loss, β),
#   2 ranks, ZeRO-3 -> each trained model evaluated twice: with its own loss, and with plain DPO at β 0.1
#   (one yardstick for all) -> RUN_DIR/sweep.md
# Smaller: SWEEP_STEPS=20 SWEEP_LOSSES="sigmoid ipo" SWEEP_BETAS="0.1" scripts/sweep.sh runs/sweep_quick
source "$(dirname "$0")/_venv.sh"
RUN="${1:-runs/sweep}"
STEPS="${SWEEP_STEPS:-100}"
LOSSES="${SWEEP_LOSSES:-sigmoid ipo apo_zero sigmoid+sft}"   # '+' joins a mixture (weights 1 and 0.2)
BETAS="${SWEEP_BETAS:-0.05 0.1 0.5}"
PORT="${SWEEP_PORT:-$(python -c 'from dpo_ds.dist import free_port; print(free_port())')}"
mkdir -p "$RUN"
start=$SECONDS

if [ ! -f "$RUN/ref_cache/manifest.json" ]; then
  python -m dpo_ds.tiny --output_dir "$RUN/tiny" --num_examples "${SWEEP_EXAMPLES:-2000}"
  python scripts/prepare_dpo.py --dataset "$RUN/tiny/prefs.jsonl" --tokenizer "$RUN/tiny/model" \
    --output_dir "$RUN/data" --eval_fraction 0.1
  deepspeed --num_gpus 2 --master_port "$PORT" --module dpo_ds.precompute \
    --model "$RUN/tiny/model" --data "$RUN/data" --output_dir "$RUN/ref_cache" --batch_size 16 --shard_size 256
fi

for loss in $LOSSES; do
  types="${loss//+/ }"
  weights=""
  [ "$types" != "$loss" ] && weights="--loss_weights 1 0.2"
  for beta in $BETAS; do
    out="$RUN/${loss}_beta${beta}"
    echo "=== $loss, β $beta -> $out ==="
    # shellcheck disable=SC2086
    deepspeed --num_gpus 2 --master_port "$PORT" --module dpo_ds.train \
      --deepspeed ds_configs/zero3_cpu.json --config scripts/demo_job.json --max_steps "$STEPS" \
      --eval_every 0 --save_every 0 --loss_type $types $weights --beta "$beta" \
      --model "$RUN/tiny/model" --data "$RUN/data" --ref_cache "$RUN/ref_cache" --output_dir "$out" \
      > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
    # shellcheck disable=SC2086
    python -m dpo_ds.evaluate --model "$out/final" --data "$RUN/data" --ref_cache "$RUN/ref_cache" \
      --loss_type $types $weights --beta "$beta" --output "$out/eval_own.json" > /dev/null 2>&1
    python -m dpo_ds.evaluate --model "$out/final" --data "$RUN/data" --ref_cache "$RUN/ref_cache" \
      --loss_type sigmoid --beta 0.1 --output "$out/eval_dpo.json" > /dev/null 2>&1
  done
done

python - "$RUN" "$LOSSES" "$BETAS" <<'EOF' | tee "$RUN/sweep.md"
import json, sys
run, losses, betas = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print("| --loss_type | --beta | own loss | DPO loss (β 0.1) | rewards/accuracies | logps/win_rate | logps/chosen |")
print("|---|---|---|---|---|---|---|")
for loss in losses:
    for beta in betas:
        own, dpo = (json.load(open(f"{run}/{loss}_beta{beta}/eval_{k}.json")) for k in ("own", "dpo"))
        name = loss.replace("+", " ") + (" (1, 0.2)" if "+" in loss else "")
        print(f"| {name} | {beta} | {own['loss']:.4f} | {dpo['loss']:.4f} | {dpo['rewards/accuracies']:.3f} | "
              f"{dpo['logps/win_rate']:.3f} | {dpo['logps/chosen']:.2f} |")
EOF
echo "sweep finished in $((SECONDS - start)) s"
