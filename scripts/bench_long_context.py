#!/usr/bin/env python
"""python scripts/bench_long_context.py [--out runs/bench_long] [--lengths 2048 4096 8192 16384] [--ranks 2]

Benchmark (not a test) of sequence parallelism: one DPO training step (ZeRO-3, gradient checkpointing, fp32,
the plain layout: a pair is two rows of T tokens, prompt T/2 + response T/2) on a small Qwen3 (hidden 256,
8 layers, 8 heads, 4 KV heads, MLP 1024, vocabulary 32,000), for each sequence length T:
  K = 1 on one rank, and K = --ranks (every rank in one sequence-parallel group), same pair, same step;
  with --tiled_mlp also K = --ranks with dpo_ds.train's --tiled_mlp (DeepSpeed's TiledMLP in every layer).
Per configuration: median step time over --steps steps after one warm-up step, and per rank (the largest
rank's) the peak resident memory (ru_maxrss) and its part above what a step leaves behind (weights,
optimizer state, DeepSpeed's buffers): the step's transient memory, activations and their temporaries. Large
allocations are returned to the system when freed (MALLOC_MMAP_THRESHOLD_), so the resident figure is live
memory. Each configuration runs in its own launch, so each peak is its own. Prints a table, writes
OUT/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def build_model(out: str) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = os.path.join(out, "model")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=65536,
                      tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)  # no tokenizer: the bench feeds ids
    return path


def worker(a) -> None:
    import torch

    from dpo_ds import dist, engine
    from dpo_ds.model.batch import build
    from dpo_ds.model.layout import PLAIN
    from dpo_ds.model.logps import pair_logps

    dist.init(sequence_parallel_size=a.sp)
    ds = engine.train_ds_config(os.path.join(ROOT, "ds_configs", "zero3_cpu.json"), 1, 1, 1.0)
    spec = engine.ModelSpec(a.model, "sdpa", share_prompt=False, packing=False, sequence_parallel_size=a.sp)
    training = engine.TrainingSpec(learning_rate=1e-6, max_steps=100, lr_schedule="constant", seed=0,
                                   tiled_mlp=bool(a.tiled_mlp))
    policy = engine.training_engine(spec, training, ds)
    policy.train()  # HF models load in eval mode, where gradient checkpointing is off
    g = torch.Generator().manual_seed(0)
    half = a.length // 2
    prompt = torch.randint(10, 32000, (half,), generator=g).tolist()
    sides = [torch.randint(10, 32000, (a.length - half,), generator=g).tolist() for _ in range(2)]
    row = {"example_id": 0, **{f"{k}_input_ids": prompt + s for k, s in zip(("chosen", "rejected"), sides)},
           **{f"{k}_labels": [-100] * half + s for k, s in zip(("chosen", "rejected"), sides)}}
    batch = build([row], PLAIN, 0)
    times, resident = [], []
    for _ in range(a.steps + 1):
        t0 = time.perf_counter()
        p = pair_logps(policy, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (p.chosen.logps - p.rejected.logps)).mean()
        policy.backward(loss)
        policy.step()
        times.append(time.perf_counter() - t0)
        resident.append(current_rss_mb())  # what a step leaves: weights, optimizer state, DeepSpeed's buffers
    peak, transient = dist.all_reduce([rss_mb()], op="max")[0].item(), dist.all_reduce(
        [rss_mb() - min(resident)], op="max")[0].item()
    if dist.is_main():
        print(json.dumps({"length": a.length, "K": a.sp, "ranks": dist.world_size(), "tiled_mlp": bool(a.tiled_mlp),
                          "step_s": statistics.median(times[1:]), "peak_rss_mb": peak, "transient_mb": transient,
                          "resident_mb": min(resident), "loss": float(loss)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_long")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tiled_mlp", action="store_true", help="also K = --ranks with TiledMLP")
    p.add_argument("--port", type=int, default=29544)
    if "--worker" in sys.argv:  # the launcher puts --local_rank first
        w = argparse.ArgumentParser()
        w.add_argument("--worker")
        w.add_argument("--local_rank", type=int, default=-1)
        for name in ("length", "sp", "steps", "tiled_mlp"):
            w.add_argument(f"--{name}", type=int)
        w.add_argument("--model")
        return worker(w.parse_args())
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = build_model(a.out)
    configs = [(1, 1, 0), (a.ranks, a.ranks, 0)] + ([(a.ranks, a.ranks, 1)] if a.tiled_mlp else [])
    rows = []
    for length in a.lengths:
        for ranks, sp, tiled in configs:
            cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(a.port), os.path.abspath(__file__),
                   "--worker", "train", "--length", str(length), "--sp", str(sp), "--steps", str(a.steps),
                   "--tiled_mlp", str(tiled), "--model", model]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536"})
            lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
            if out.returncode or not lines:
                print(f"T={length} K={sp}{' tiled' if tiled else ''}: failed ({out.returncode})\n{out.stderr[-2000:]}")
                continue
            rows.append(lines[-1])
            r = lines[-1]
            print(f"T={length:6d} K={sp} {'tiled MLP ' if tiled else ''}ranks={ranks}: step {r['step_s']:.2f} s, "
                  f"peak RSS/rank {r['peak_rss_mb']:.0f} MB ({r['transient_mb']:.0f} MB transient), "
                  f"loss {r['loss']:.5f}", flush=True)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
