#!/usr/bin/env bash
# scripts/slurm/submit.sh: the two-phase job on Slurm: precompute, then train once precompute has succeeded (if it
# fails, train is cancelled, never started against a missing cache). Prints both job ids.
#   scripts/slurm/submit.sh --model /ckpt/sft --data data/uf --ref_cache cache/uf --output_dir runs/uf \
#       [--nodes 1] [--gpus-per-node 8] [--tasks-per-node G] [--precompute FLAG]... [--sbatch OPTION]... \
#       [-- train's flags, e.g. --deepspeed ds_configs/zero3.json --beta 0.1]
#   --precompute FLAG   a flag for precompute only (repeat it: --precompute --deepspeed
#                       --precompute ds_configs/zero3_inference.json)
#   --sbatch OPTION     an sbatch option for both jobs (repeat it: --sbatch --partition=gpu --sbatch --time=24:00:00)
# Both jobs run scripts/slurm/dpo.sbatch from the directory this is run in (their logs go there: dpo-precompute-N.out,
# dpo-train-M.out), in this environment (dpo-ds on PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nodes=1 gpus=8 tasks="" model="" data="" cache="" out=""
pre=() sb=() train=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --tasks-per-node) tasks="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --ref_cache) cache="$2"; shift 2 ;;
    --output_dir) out="$2"; shift 2 ;;
    --precompute) pre+=("$2"); shift 2 ;;
    --sbatch) sb+=("$2"); shift 2 ;;
    --) shift; train=("$@"); break ;;
    *) echo "error: unknown argument $1 (scripts/slurm/submit.sh --help: the lines at its top)" >&2; exit 2 ;;
  esac
done
if [ -z "$model" ] || [ -z "$data" ] || [ -z "$cache" ] || [ -z "$out" ]; then
  sed -n '2,12p' "$0" >&2
  echo "error: give --model, --data, --ref_cache and --output_dir" >&2
  exit 2
fi
each=(--nodes "$nodes" --ntasks-per-node "${tasks:-$gpus}" --gpus-per-node "$gpus" ${sb[@]+"${sb[@]}"})
first=$(sbatch --parsable -J dpo-precompute "${each[@]}" "$here/dpo.sbatch" precompute \
        --model "$model" --data "$data" --output_dir "$cache" ${pre[@]+"${pre[@]}"})
first=${first%%;*}
second=$(sbatch --parsable -J dpo-train "${each[@]}" --dependency="afterok:$first" --kill-on-invalid-dep=yes \
         "$here/dpo.sbatch" train --model "$model" --data "$data" --ref_cache "$cache" --output_dir "$out" \
         ${train[@]+"${train[@]}"})
second=${second%%;*}
echo "precompute: job $first (log dpo-precompute-$first.out)"
echo "train: job $second (log dpo-train-$second.out): starts when job $first has succeeded, cancelled if it fails"
