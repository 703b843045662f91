#!/usr/bin/env python
"""The prepared GPU check (scripts/gpu_check.sh runs it): on one GPU in bf16, random-initialised Qwen3 shapes
(~0.6 B and ~1.7 B parameters, vocabulary 151,936, the project's own tokenizer over numbers) and 256
UltraFeedback-like pairs (prompts 12-590 tokens, responses 8-490; the chosen response sorted, the rejected
not: something a loss can learn), built here, nothing downloaded:

  correctness  the 0.6 B model's log-probs, shared prompt + packed and plain, against an independent fp32
               forward of each sequence alone (fp32: 1e-5 relative; bf16: reported, 3e-2 allowed); the
               precompute cache (bf16) against the same; train's first loss ln 2 and a loss that falls
  train        per model: precompute tokens/s, 20 training steps under ZeRO-3 (zero3.json, NCCL, one rank)
               and --deepspeed auto: tokens/s, MFU, peak max_memory_allocated against dpo-ds plan's prediction
  trl          the same pairs and batch under TRL 1.16 (bf16, sdpa): online reference and
               precompute_ref_log_probs, beside dpo_ds (scripts/bench_workers.py), step time and CUDA peak
  long_rows    one pair of 8k and of 16k tokens, --tiled_mlp off and on: step time and peak memory

MFU = model FLOPs per second / the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s): 6·N·tokens for the
decoder (N without the embedding; forward + backward) + 6·H·V per scored response token for the head
(dpo_ds computes the head on response tokens only); gradient checkpointing's recompute (2·N·tokens more)
and attention's T² terms are not counted (hardware FLOPs are higher). Each part runs while the budget lasts
and is skipped with a note after that; the result files are written after every part, so one call always
returns them. --cpu-smoke: the same on a tiny model in fp32 on this CPU, in a few minutes (tests/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")]
GPU = {"models": {"0.6b": (1024, 3072, 28, 16, 8), "1.7b": (2048, 6144, 28, 16, 8)}, "vocab": 151936,
       "pairs": 256, "max_length": 2048, "steps": 20, "micro": 4, "accum": 2, "trl_steps": 10, "long": (8192, 16384),
       "lr": 1e-4}
SMOKE = {"models": {"tiny": (64, 192, 2, 4, 2)}, "vocab": 1024, "pairs": 48, "max_length": 1024, "steps": 6,
         "micro": 2, "accum": 1, "trl_steps": 5, "long": (256,), "lr": 1e-3}


class Check:
    """The run's inputs, budget and results (written after every part)."""

    def __init__(self, a):
        self.a, self.t0, self.work = a, time.time(), os.path.join(a.work, "gpu_check")
        self.s = SMOKE if a.cpu_smoke else GPU
        os.makedirs(self.work, exist_ok=True)
        self.result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
                       "budget_s": a.budget, "parts": {}}

    def left(self) -> float:
        return self.a.budget - (time.time() - self.t0)

    def run(self, *cmd, env=None) -> subprocess.CompletedProcess:
        """A phase as a user runs it (python -m ...), stopped when the budget runs out."""
        try:
            p = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT,
                               timeout=max(10.0, self.left()), env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired as e:
            self.log(cmd, f"timed out after {e.timeout:.0f} s", e.stdout or "", e.stderr or "")
            raise
        self.log(cmd, f"exit {p.returncode}", p.stdout, p.stderr)
        if p.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed ({p.returncode}): "
                               f"{(p.stderr.strip().splitlines() or ['?'])[-1][:400]}")
        return p

    def log(self, cmd, how: str, stdout, stderr) -> None:
        """Each phase's command and the end of its output, in $OUT/gpu_check.log."""
        tail = lambda x: (x.decode() if isinstance(x, bytes) else x)[-3000:]  # noqa: E731
        with open(os.path.join(self.a.out, "gpu_check.log"), "a") as f:
            f.write(f"\n=== {' '.join(map(str, cmd))} ({how}, at {time.time() - self.t0:.0f} s)\n"
                    f"{tail(stdout)}\n--- stderr\n{tail(stderr)}\n")

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.time() - self.t0, 1)
        for name, text in (("gpu_check.json", json.dumps(self.result, indent=1, default=str)),
                           ("gpu_check.md", report(self.result))):
            path = os.path.join(self.a.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous file whole


def device_facts() -> dict:
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for name in ("transformers", "deepspeed", "datasets", "peft", "trl", "accelerate", "pyarrow", "huggingface_hub"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a fact too
            facts[name] = f"missing ({type(e).__name__}: {str(e)[:300]})"
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return facts


def report(r: dict) -> str:
    lines = [f"# dpo_ds GPU check ({r['mode']}, {r['started']}, {r.get('elapsed_s')} s of {r['budget_s']})", "",
             "```", json.dumps(r.get("facts", {})), "```", ""]
    for part, res in r["parts"].items():
        lines += [f"## {part}", "", "| figure | value |", "|---|---|"]
        flat = res if isinstance(res, dict) else {"result": res}
        for k, v in flat.items():
            if isinstance(v, dict):
                v = ", ".join(f"{kk} {vv:.4g}" if isinstance(vv, float) else f"{kk} {vv}" for kk, vv in v.items())
            elif isinstance(v, float):
                v = f"{v:.4g}"
            lines.append(f"| {k} | {v} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where gpu_check.json and gpu_check.md go")
    p.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp"), help="models, data, runs (large)")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 480; smoke 600)")
    p.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true")
    a = p.parse_args(argv)
    a.budget = a.budget or (600.0 if a.cpu_smoke else 480.0)
    os.makedirs(a.out, exist_ok=True)
    from gpu_check_parts import build_inputs, part_correctness, part_long_rows, part_train, part_trl

    c = Check(a)
    c.result["facts"] = device_facts()
    c.write()
    try:
        paths = build_inputs(c)
    except Exception as e:  # noqa: BLE001 - the result file says what stopped the check
        c.result["parts"]["inputs"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        c.write()
        return 1
    names = list(paths["models"])
    parts = [(f"train_{names[0]}", lambda: part_train(c, paths, names[0])),  # in order of what matters most
             ("correctness", lambda: part_correctness(c, paths)), ("trl", lambda: part_trl(c, paths)),
             ("long_rows", lambda: part_long_rows(c, paths)),
             *((f"train_{n}", (lambda n=n: part_train(c, paths, n, first=False))) for n in names[1:])]
    for name, fn in parts:
        if c.left() < 30:
            c.result["parts"][name] = {"skipped": f"budget: {c.left():.0f} s left"}
            continue
        t = time.time()
        try:
            c.result["parts"][name] = {**fn(), "seconds": round(time.time() - t, 1)}
        except Exception as e:  # noqa: BLE001 - one part's failure is its result; the others still run
            c.result["parts"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                                       "seconds": round(time.time() - t, 1)}
        c.write()
    first = c.result["parts"].get(f"train_{names[0]}", {}).get("zero3", {})
    if isinstance(first, dict) and "first_loss" in first:  # bf16 policy against a bf16 cache of other batches
        gap = abs(first["first_loss"] - math.log(2))
        c.result["parts"]["correctness"]["first_loss_minus_ln2"] = gap
        c.result["parts"]["correctness"]["first_loss_ln2"] = gap < (2e-3 if a.cpu_smoke else 1e-2)
        c.result["parts"]["correctness"]["loss_falls"] = first["loss_falls"]
    c.write()
    print(f"gpu_check: {os.path.join(a.out, 'gpu_check.md')} ({c.result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
