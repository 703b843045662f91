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
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
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
        p = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT,
                           timeout=max(10.0, self.left()), env={**os.environ, **(env or {})})
        if p.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed ({p.returncode}): "
                               f"{(p.stderr.strip().splitlines() or ['?'])[-1][:400]}")
        return p

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.time() - self.t0, 1)
        with open(os.path.join(self.a.out, "gpu_check.json"), "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        with open(os.path.join(self.a.out, "gpu_check.md"), "w") as f:
            f.write(report(self.result))


def device_facts() -> dict:
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for name in ("transformers", "deepspeed", "datasets", "peft", "trl", "accelerate", "pyarrow", "huggingface_hub"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a fact too
            facts[name] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return facts


def pairs(path: str, n: int, seed: int = 0) -> None:
    """UltraFeedback-like lengths in numbers (one token each: prompts 12-590, responses 8-490, log-normal) with
    something to learn: the chosen response is sorted ascending, the rejected one is not."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = lambda k, sort=False: " ".join(map(str, np.sort(rng.integers(0, 40, k)) if sort else  # noqa: E731
                                               rng.integers(0, 40, k)))
    prompt = np.clip(rng.lognormal(np.log(110), 0.8, n), 12, 590).astype(int)
    response = np.clip(rng.lognormal(np.log(90), 0.8, (2, n)), 8, 490).astype(int)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "sort ascending: " + words(prompt[i]), "chosen": words(response[0, i], True),
                                "rejected": words(response[1, i])}) + "\n")


def build_inputs(c: Check) -> dict:
    """The tokenizer, the pairs, prepared, and each model (random weights, bf16 on CUDA) -> paths."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from dpo_ds.tiny import build_tokenizer

    w, dtype = c.work, torch.bfloat16 if torch.cuda.is_available() else torch.float32
    pairs(f"{w}/pairs.jsonl", c.s["pairs"])
    tok = build_tokenizer([" ".join(map(str, range(40))), "sort ascending: descending", "user assistant system"])
    paths = {"data": f"{w}/prep", "models": {}}
    for name, (h, inter, layers, heads, kv) in c.s["models"].items():
        path = f"{w}/model_{name}"
        if not os.path.isfile(f"{path}/config.json"):
            config = Qwen3Config(vocab_size=c.s["vocab"], hidden_size=h, intermediate_size=inter,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                 head_dim=h // heads,
                                 max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=None,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            torch.manual_seed(0)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
            del model
        paths["models"][name] = path
    first = next(iter(paths["models"].values()))
    c.run("-m", "dpo_ds.prepare", "--dataset", f"{w}/pairs.jsonl", "--tokenizer", first, "--output_dir",
          paths["data"], "--max_length", c.s["max_length"], "--eval_fraction", 0.05)
    return paths


def part_correctness(c: Check, paths: dict) -> dict:
    """Layouts and precision against an independent fp32 forward of each sequence alone (the 0.6 B model)."""
    import datasets
    import torch
    from independent import naive_sequence_logps
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.batch import build, collate
    from dpo_ds.model.layout import Layout
    from dpo_ds.model.logps import SequenceLogps, pair_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = next(iter(paths["models"].values()))
    rows = [datasets.load_from_disk(f"{paths['data']}/train")[i] for i in range(6)]
    pad = 0
    batch = collate(rows, pad_id=pad)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    want = []
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            ids, labels = batch["input_ids"][i:i + 1, :n].to(device), batch["labels"][i:i + 1, :n].to(device)
            want.append(float(naive_sequence_logps(model, ids, torch.ones_like(ids), labels)))
    out = {"pairs": len(rows), "independent": "fp32 forward of each sequence alone, float64 log_softmax"}
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        for name, layout in (("shared_packed", Layout(share_prompt=True, packing=True)),
                             ("plain", Layout(share_prompt=False, packing=False))):
            built = {k: v.to(device) if torch.is_tensor(v) else v for k, v in build(rows, layout, pad).items()}
            with torch.no_grad():
                p = pair_logps(SequenceLogps(model, layout=layout), built)
            got = torch.cat([p.chosen.logps, p.rejected.logps]).float().tolist()
            out[f"{name}_{str(dtype)[6:]}_max_rel"] = max(abs(g - x) / abs(x) for g, x in zip(got, want))
    del model
    cache = f"{c.work}/cache_{next(iter(paths['models']))}"
    if os.path.isdir(cache):
        from dpo_ds.cache.read import open_cache

        values = open_cache(cache, paths["data"], verify=False).values("train", [r["example_id"] for r in rows])
        got = [float(v) for v in list(values["ref_chosen_logps"]) + list(values["ref_rejected_logps"])]
        out["cache_max_rel"] = max(abs(g - x) / abs(x) for g, x in zip(got, want))
    out["pass"] = bool(out["shared_packed_float32_max_rel"] < 1e-5 and out["plain_float32_max_rel"] < 1e-5 and \
        out["shared_packed_bfloat16_max_rel"] < 3e-2 and out.get("cache_max_rel", 0) < 3e-2)
    return out


def response_fraction(data: str) -> float:
    """Scored (response) tokens per computed token in the shared-prompt layout: the head's share."""
    import datasets

    ds = datasets.load_from_disk(f"{data}/train")
    resp = sum(sum(x != -100 for x in r["chosen_labels"]) + sum(x != -100 for x in r["rejected_labels"]) for r in ds)
    prompt = sum(r["chosen_labels"].count(-100) for r in ds)
    return resp / (resp + prompt)


def train_run(c: Check, model: str, data: str, cache: str, name: str, ds: str, steps: int, *extra) -> dict:
    out = f"{c.work}/run_{name}"
    subprocess.run(["rm", "-rf", out])
    c.run("-m", "dpo_ds.train", "--model", model, "--data", data, "--ref_cache", cache, "--output_dir", out,
          "--deepspeed", ds, "--max_steps", steps, "--warmup_steps", 1, "--learning_rate", c.s["lr"], "--log_every", 1,
          "--eval_every", 0, "--save_every", 0, "--micro_batch_size", c.s["micro"], "--grad_accum", c.s["accum"],
          "--report_to", "none", *extra)
    rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    subprocess.run(["rm", "-rf", f"{out}/checkpoints", f"{out}/final"])  # GBs each: the disk holds one run's
    train = [r for r in rows if r["split"] == "train"]
    peak = max(r.get("memory/peak_allocated_bytes", r.get("memory/peak_rss_bytes", 0)) for r in train)
    res = {"first_loss": train[0]["loss"], "last_loss": train[-1]["loss"], "peak_gib": peak / 2 ** 30,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[min(3, len(train) - 1):]),
           "loss_falls": statistics.mean(r["loss"] for r in train[-(len(train) // 3):]) < train[0]["loss"] - 1e-3}
    if c.a.cpu_smoke:  # the CPU's plan runs probes (minutes); on CUDA the prediction is arithmetic
        return res
    try:
        plan = json.loads(c.run("-m", "dpo_ds.plan", "--check", out, "--json").stdout.strip().splitlines()[-1])
        res["planned_gib"] = plan["phases"]["train"]["predicted_peak_bytes"] / 2 ** 30
        res["plan_error"] = plan.get("measured", {}).get("error")
    except Exception as e:  # noqa: BLE001 - the plan is a figure of the part, not the part
        res["plan"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def mfu(c: Check, model: str, tokens_per_s: float, fraction: float):
    import torch
    from transformers import AutoConfig

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    cfg = AutoConfig.from_pretrained(model)
    h, inter, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    n = layers * (h * (2 * h + 2 * kv) + 3 * h * inter)  # attention q, o + k, v; the MLP's three matrices
    flops_per_token = 6 * n + 6 * h * v * fraction
    return (flops_per_token * tokens_per_s / peak) if peak else None


def part_train(c: Check, paths: dict, name: str, first: bool = True) -> dict:
    """Precompute, then training under ZeRO-3 and --deepspeed auto (the larger model: auto alone)."""
    model, data, cache = paths["models"][name], paths["data"], f"{c.work}/cache_{name}"
    subprocess.run(["rm", "-rf", cache])
    t = time.time()
    c.run("-m", "dpo_ds.precompute", "--model", model, "--data", data, "--output_dir", cache, "--batch_size", 8)
    stats = json.load(open(f"{cache}/manifest.json"))["stats"]
    out = {"precompute": {"wall_s": time.time() - t, "tokens_per_s": stats.get("tokens_per_s"),
                          "padding": stats.get("padding_fraction"), "memory": stats.get("memory")}}
    fraction = response_fraction(data)
    zero3 = os.path.join(ROOT, "ds_configs", "zero3.json" if not c.a.cpu_smoke else "zero3_cpu.json")
    for label, ds in (("zero3", zero3), ("auto", "auto")) if first else (("auto", "auto"),):
        if c.left() < 30:
            out[label] = "skipped: budget"
            continue
        res = train_run(c, model, data, cache, f"{name}_{label}", ds, c.s["steps"])
        res["mfu"] = mfu(c, model, res["tokens_per_s"], fraction)
        out[label] = res
    out["response_fraction"] = fraction
    return out


def part_trl(c: Check, paths: dict) -> dict:
    """dpo_ds (--deepspeed auto) and TRL online / precompute, one process each, the same pairs and batch."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return {"skipped": "trl is not installed"}
    name = next(iter(paths["models"]))
    model, cache, result = paths["models"][name], f"{c.work}/cache_{name}", f"{c.work}/trl.jsonl"
    open(result, "w").close()
    common = ["--model", model, "--data", paths["data"], "--cache", cache, "--steps", c.s["trl_steps"],
              "--micro", c.s["micro"], "--accum", c.s["accum"], "--result", result,
              "--trl_bf16", int(not c.a.cpu_smoke)]
    workers = os.path.join(ROOT, "scripts", "bench_workers.py")
    c.run(workers, "--worker", "train", "--mode", "cached", "--out", f"{c.work}/w", "--ds", "auto", *common)
    for mode in ("trl_online", "trl_precompute"):
        if c.left() < 30:
            break
        c.run(workers, "--worker", "trl", "--mode", mode, "--out", f"{c.work}/trl", *common)
    rows = {r["mode"]: r for r in map(json.loads, open(result))}
    out = {m: {k: r.get(k) for k in ("median_step_s", "peak_cuda_mb", "peak_rss_mb_per_rank")} for m, r in rows.items()}
    for m in ("trl_online", "trl_precompute"):
        if m in rows:
            out[f"dpo_ds_vs_{m}"] = rows["cached"]["median_step_s"] / rows[m]["median_step_s"]
    return out


def part_long_rows(c: Check, paths: dict) -> dict:
    """One pair per length (prompt and responses half and half), 3 steps, --tiled_mlp off and on."""
    name = next(iter(paths["models"]))
    model, out = paths["models"][name], {}
    for length in c.s["long"]:
        d = f"{c.work}/long_{length}"
        with open(f"{d}.jsonl", "w") as f:
            for i in range(4):
                words = [str((i + j) % 40) for j in range(length)]
                f.write(json.dumps({"prompt": " ".join(words[:length // 2]), "chosen": " ".join(words[length // 2:]),
                                    "rejected": " ".join(reversed(words[length // 2:]))}) + "\n")
        c.run("-m", "dpo_ds.prepare", "--dataset", f"{d}.jsonl", "--tokenizer", model, "--output_dir", f"{d}/prep",
              "--max_length", length + 16, "--max_prompt_length", length // 2 + 8, "--eval_fraction", 0.25)
        c.run("-m", "dpo_ds.precompute", "--model", model, "--data", f"{d}/prep", "--output_dir", f"{d}/cache",
              "--batch_size", 1)
        for tiled in (False, True):
            if c.left() < 40:
                out[f"{length}_tiled_{tiled}"] = "skipped: budget"
                continue
            c.s = {**c.s, "micro": 1, "accum": 1}
            res = train_run(c, model, f"{d}/prep", f"{d}/cache", f"long_{length}_{tiled}",
                            "auto", 3, *(["--tiled_mlp"] if tiled else []))
            out[f"{length}_tiled_{tiled}"] = {k: res[k] for k in ("tokens_per_s", "peak_gib", "planned_gib")
                                               if k in res}
    return out


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
    if isinstance(first, dict) and "first_loss" in first:
        c.result["parts"]["correctness"]["first_loss_ln2"] = abs(first["first_loss"] - math.log(2)) < 2e-3
        c.result["parts"]["correctness"]["loss_falls"] = first["loss_falls"]
    c.write()
    print(f"gpu_check: {os.path.join(a.out, 'gpu_check.md')} ({c.result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
