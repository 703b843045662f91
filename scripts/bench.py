#!/usr/bin/env python
"""python scripts/bench.py [--out runs/bench] [--hidden 256 --layers 6 --examples 1200 --steps 30 --ranks 2]

Benchmarks (not tests): prints a table and writes OUT/bench.json. Same model, data and steps, side by side:
  1. training step: cached reference (one model) vs the two-model baseline (the same loop with a frozen
     reference model run online every step, sharded with ZeRO-3 like the policy, as peers without a cache do):
     median step time and peak resident memory per rank.              target: step time <= 0.75x baseline
  2. precompute throughput vs a bare `model(input_ids)` forward over the same tokens packed without padding,
     and the padding fraction.                                          target: >= 0.9x
  3. log-prob memory at vocabulary 151,936 and sequence 2048 (forward + backward): chunked vs the naive
     full log_softmax.                                                  target: >= 8x lower peak
  4. amortisation: wall time of precompute + K training runs (a beta sweep) vs K baseline runs.
  5. the trainer users would otherwise run: TRL's DPOTrainer (online reference, and precompute_ref_log_probs),
     same model, token ids, micro-batch, accumulation, steps and precision (fp32), beside dpo_ds with
     ds_configs/zero0_cpu.json and --deepspeed auto (train's default), one process each (step time and peak
     RSS), and the same with LoRA r 16 (TRL's peft_config: its reference is the adapter-disabled model); then TRL
     under DeepSpeed (--ds) on the ranks of section 1, beside dpo_ds's cached step there (needs the `bench`
     extra; skipped without TRL).
                                         target: dpo_ds <= 0.75x TRL online, <= 1.0x TRL precompute
  6. the batch layout (dpo_ds.model.layout) on UltraFeedback-like lengths (prompts 12-590 tokens, responses 8-490,
     log-normal): the defaults (shared prompt + packing) vs --no-share_prompt --no-packing: tokens computed
     per pair, precompute pairs/s, training step (1 process without ZeRO, and the ranks of section 1 with
     --ds) at micro-batch 2 x accumulation 8, evaluate time, peak memory.
                                         target: step <= 0.7x, precompute >= 1.4x
Defaults finish in about twenty minutes on 2 CPU cores; scale up with the flags on a GPU machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "scripts", "bench_workers.py")  # each worker a process (or a rank) of its own
ZERO0 = os.path.join(ROOT, "ds_configs", "zero0_cpu.json")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import build_report, layout_rows, print_table, table_rows, trainer_rows  # noqa: E402


def sh(cmd, **kw) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if p.returncode != 0:
        sys.exit(f"bench step failed: {' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def launch(a, *args) -> str:
    return sh(["deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(a.port), WORKERS, *map(str, args)])


def length_mix(path: str, n: int, seed: int = 0, sorted_chosen: bool = False) -> None:
    """UltraFeedback-like lengths in the tiny model's words (one token per number): prompts 20-600 tokens,
    responses 10-500, log-normal with long tails; chosen and rejected lengths independent. `sorted_chosen`:
    the chosen response sorted ascending (the same draws), something a loss can learn (scripts/gpu_check.py)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = lambda k, sort=False: " ".join(map(str, (np.sort if sort else np.asarray)(rng.integers(0, 40, k))))  # noqa: E731
    prompt = np.clip(rng.lognormal(np.log(110), 0.8, n), 12, 590).astype(int)
    response = np.clip(rng.lognormal(np.log(90), 0.8, (2, n)), 8, 490).astype(int)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "sort ascending: " + words(prompt[i]),
                                "chosen": words(response[0, i], sorted_chosen),
                                "rejected": words(response[1, i])}) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--examples", type=int, default=1200)
    p.add_argument("--max_items", type=int, default=40, help="numbers per tiny example, at most (sequence length)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--sweep", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="betas of the amortisation sweep")
    p.add_argument("--ds", default=os.path.join(ROOT, "ds_configs", "zero3_cpu.json"))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--logp_batch", type=int, default=2)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--layout_examples", type=int, default=400, help="pairs of the UltraFeedback-like length mix")
    p.add_argument("--layout_steps", type=int, default=8, help="training steps per layout (3 of them warm-up)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="in both the cached and the two-model runs")
    return p.parse_args(argv)


def make_inputs(a, out: str) -> tuple[str, str]:
    """The tiny model of --hidden x --layers and its prepared data -> (model dir, data dir)."""
    model, data, py = f"{out}/model/model", f"{out}/data", sys.executable
    print(f"[bench] model hidden {a.hidden} x {a.layers} layers, {a.examples} pairs, {a.ranks} ranks, {a.steps} steps")
    sh([py, "-m", "dpo_ds.tiny", "--output_dir", f"{out}/model", "--num_examples", str(a.examples),
        "--hidden_size", str(a.hidden), "--layers", str(a.layers), "--max_items", str(a.max_items)])
    sh([py, "-m", "dpo_ds.prepare", "--dataset", f"{out}/model/prefs.jsonl", "--tokenizer", model,
        "--output_dir", data, "--eval_fraction", "0.05"])
    return model, data


def section_precompute(a, model: str, data: str, cache: str) -> dict:
    """2. precompute (the ranks of section 1, then one process) vs a bare forward over the same tokens."""
    py = sys.executable
    sh(["rm", "-rf", cache])
    t0 = time.time()
    sh(["deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(a.port), "--module", "dpo_ds.precompute",
        "--model", model, "--data", data, "--output_dir", cache, "--batch_size", "16", "--shard_size", "256"])
    wall = time.time() - t0
    stats = json.load(open(f"{cache}/manifest.json"))["stats"]
    sh(["rm", "-rf", f"{cache}-1"])
    sh([py, "-m", "dpo_ds.precompute", "--model", model, "--data", data, "--output_dir", f"{cache}-1",
        "--batch_size", "16", "--shard_size", "256"])
    one_rank = json.load(open(f"{cache}-1/manifest.json"))["stats"]
    bare = last_json(sh([py, WORKERS, "--worker", "bare", "--model", model, "--data", data, "--batch", "16"]))
    return {"wall": wall, "stats": stats, "one_rank": one_rank, "bare": bare}


def section_train(a, out: str, model: str, data: str, cache: str) -> list[dict]:
    """1 + 4. training steps and the beta sweep, cached vs the two-model baseline -> one row per run."""
    result = f"{out}/train_runs.jsonl"
    open(result, "w").close()
    for mode in ("cached", "baseline"):
        for beta in a.sweep:
            launch(a, "--worker", "train", "--mode", mode, "--beta", beta, "--model", model, "--data", data,
                   "--cache", cache, "--out", f"{out}/run", "--ds", a.ds, "--steps", a.steps, "--micro", a.micro,
                   "--accum", a.accum, "--result", result, "--gradient_checkpointing", int(a.gradient_checkpointing))
    return [json.loads(line) for line in open(result)]


def section_trainers(a, out: str, model: str, data: str, cache: str) -> list[dict]:
    """5. dpo_ds beside TRL: one process each, then TRL under DeepSpeed on the ranks of section 1."""
    py, trainers_file = sys.executable, f"{out}/trainers.jsonl"
    open(trainers_file, "w").close()
    common = ["--model", model, "--data", data, "--cache", cache, "--steps", a.steps, "--micro", a.micro,
              "--accum", a.accum, "--result", trainers_file, "--gradient_checkpointing", int(a.gradient_checkpointing)]
    for ds_file in (ZERO0, "auto"):  # train's default; ZeRO-3 asked for on one rank runs as stage 0 too
        sh([py, WORKERS, "--worker", "train", "--mode", "cached", "--out", f"{out}/run", "--ds", ds_file,
            *map(str, common)])
    if importlib.util.find_spec("trl") is None:
        print("[bench] TRL is not installed (pip install -e .[bench]): no TRL column")
    else:
        for mode in ("trl_online", "trl_precompute"):
            sh([py, WORKERS, "--worker", "trl", "--mode", mode, "--out", f"{out}/trl", *map(str, common)])
        for mode in ("trl_online", "trl_precompute"):
            launch(a, "--worker", "trl", "--mode", mode, "--out", f"{out}/trl", "--ds", a.ds, *common)
    # LoRA (r 16 on every projection of the decoder layers), one process each: TRL's reference is the same
    # model with the adapters disabled, run online or precomputed
    sh([py, WORKERS, "--worker", "train", "--mode", "cached", "--out", f"{out}/run", "--ds", "auto", "--lora_r", "16",
        *map(str, common)])
    if importlib.util.find_spec("trl") is not None:
        for mode in ("trl_online", "trl_precompute"):
            sh([py, WORKERS, "--worker", "trl", "--mode", mode, "--out", f"{out}/trl", "--lora_r", "16",
                *map(str, common)])
    return [json.loads(line) for line in open(trainers_file)]


def section_layouts(a, out: str, model: str) -> dict:
    """6. the batch layouts on UltraFeedback-like lengths: the defaults (shared prompt + packing) vs
    --no-share_prompt --no-packing, at the default micro-batch and accumulation."""
    py, lay = sys.executable, f"{out}/layout"
    length_mix(f"{out}/layout-prefs.jsonl", a.layout_examples)
    sh([py, "-m", "dpo_ds.prepare", "--dataset", f"{out}/layout-prefs.jsonl", "--tokenizer", model, "--output_dir",
        f"{lay}/data", "--eval_fraction", "0.1", "--max_length", "1024", "--max_prompt_length", "600"])
    layouts = {"plain": ["--no-share_prompt", "--no-packing"], "new": []}
    lay_stats = {name: {} for name in layouts}
    for name, flags in layouts.items():
        sh(["rm", "-rf", f"{lay}/cache-{name}"])
        sh([py, "-m", "dpo_ds.precompute", "--model", model, "--data", f"{lay}/data", "--output_dir",
            f"{lay}/cache-{name}", "--batch_size", "8", *flags])
        lay_stats[name]["precompute"] = json.load(open(f"{lay}/cache-{name}/manifest.json"))["stats"]
    lay_file = f"{lay}/train_runs.jsonl"
    open(lay_file, "w").close()
    for name in layouts:
        train = ["--worker", "train", "--mode", "cached", "--layout", name, "--model", model, "--data", f"{lay}/data",
                 "--cache", f"{lay}/cache-new", "--out", f"{lay}/run", "--steps", a.layout_steps, "--micro", 2,
                 "--accum", 8, "--result", lay_file, "--gradient_checkpointing", 1]
        sh([py, WORKERS, *map(str, train), "--ds", ZERO0])
        launch(a, *train, "--ds", a.ds)
        lay_stats[name]["eval"] = last_json(sh([py, WORKERS, "--worker", "eval", "--layout", name, "--model", model,
                                                "--data", f"{lay}/data", "--cache", f"{lay}/cache-new", "--batch", "8"]))
    for r in map(json.loads, open(lay_file)):
        lay_stats[r["layout"]][f"train_{r['ranks']}"] = r
    return lay_stats


def section_memory(a) -> dict:
    """3. log-prob memory: the chunked head vs a full log_softmax, forward + backward."""
    return {m: last_json(sh([sys.executable, WORKERS, "--worker", "logp_memory", "--mode", m, "--vocab", str(a.vocab),
                             "--seq", str(a.seq), "--batch", str(a.logp_batch)]))
            for m in ("naive", "chunked")}


def main():
    a = parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    model, data = make_inputs(a, out)
    cache = f"{out}/cache"
    pre = section_precompute(a, model, data, cache)
    runs = section_train(a, out, model, data, cache)
    trainers = section_trainers(a, out, model, data, cache)
    lay_stats = section_layouts(a, out, model)
    report = build_report(a, pre, runs, trainers, lay_stats, section_memory(a))
    with open(f"{out}/bench.json", "w") as f:
        json.dump(report, f, indent=2)
    print_table(table_rows(a, report) + trainer_rows(a, report) + layout_rows(a, lay_stats))
    print(f"\n-> {out}/bench.json")


if __name__ == "__main__":
    main()
