"""scripts/gpu_check.py's inputs and parts: each part a function of the driver's Check (`c`: its settings `c.s`,
working directory `c.work`, budget `c.left()`, and `c.run(...)`, a phase as a user runs it) that returns its
figures. The parts know nothing else of the driver."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s: the MFU's denominator


def build_inputs(c) -> dict:
    """The tokenizer, the pairs, prepared, and the first model (the others are built by their parts) -> paths."""
    from bench import length_mix

    from dpo_ds.tiny import build_tokenizer

    w = c.work
    length_mix(f"{w}/pairs.jsonl", c.s["pairs"], sorted_chosen=True)  # chosen sorted: something to learn
    tok = build_tokenizer([" ".join(map(str, range(40))), "sort ascending: descending", "user assistant system"])
    paths = {"data": f"{w}/prep", "models": {name: f"{w}/model_{name}" for name in c.s["models"]}, "tokenizer": tok}
    first = build_model(c, paths, next(iter(c.s["models"])))
    c.run("-m", "dpo_ds.prepare", "--dataset", f"{w}/pairs.jsonl", "--tokenizer", first, "--output_dir",
          paths["data"], "--max_length", c.s["max_length"], "--eval_fraction", 0.05)
    return paths


def build_model(c, paths: dict, name: str) -> str:
    """A random-initialised Qwen3 of `name`'s shape with the check's tokenizer (once; on the GPU when there is
    one, bf16 there) -> its directory."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    (h, inter, layers, heads, kv), tok = c.s["models"][name], paths["tokenizer"]
    dtype, path = (torch.bfloat16 if torch.cuda.is_available() else torch.float32), paths["models"][name]
    if os.path.isfile(f"{path}/config.json"):
        return path
    config = Qwen3Config(vocab_size=c.s["vocab"], hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=h // heads,
                         max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the phases run in their own processes: leave them the GPU
    return path


def part_correctness(c, paths: dict) -> dict:
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
            with torch.no_grad():  # (pair_logps moves the model's inputs to its device, as in training)
                p = pair_logps(SequenceLogps(model, layout=layout), build(rows, layout, pad))
            got = torch.cat([p.chosen.logps, p.rejected.logps]).float().tolist()
            out[f"{name}_{str(dtype)[6:]}_max_rel"] = max(abs(g - x) / abs(x) for g, x in zip(got, want))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
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


def train_run(c, model: str, data: str, cache: str, name: str, ds: str, steps: int, *extra,
              micro: int | None = None, accum: int | None = None) -> dict:
    out = f"{c.work}/run_{name}"
    subprocess.run(["rm", "-rf", out])
    c.run("-m", "dpo_ds.train", "--model", model, "--data", data, "--ref_cache", cache, "--output_dir", out,
          "--deepspeed", ds, "--max_steps", steps, "--warmup_steps", 1, "--learning_rate", c.s["lr"], "--log_every", 1,
          "--eval_every", 0, "--save_every", -1, "--micro_batch_size", micro or c.s["micro"],
          "--grad_accum", accum or c.s["accum"],
          "--report_to", "none", *extra)
    rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    subprocess.run(["rm", "-rf", f"{out}/final"])  # (no checkpoints: --save_every -1)
    train = [r for r in rows if r["split"] == "train"]
    peak = max(r.get("memory/peak_allocated_bytes", r.get("memory/peak_rss_bytes", 0)) for r in train)
    res = {"first_loss": train[0]["loss"], "last_loss": train[-1]["loss"], "peak_gib": peak / 2 ** 30,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[min(3, len(train) - 1):]),
           "loss_falls": statistics.mean(r["loss"] for r in train[-(len(train) // 3):]) < train[0]["loss"] - 1e-3}
    if c.a.cpu_smoke:  # the CPU's plan runs probes (minutes); on CUDA the prediction is arithmetic
        return res
    try:
        plan = json.loads(c.run("-m", "dpo_ds.plan", "--check_run", out, "--json").stdout.strip().splitlines()[-1])
        res["planned_gib"] = plan["phases"]["train"]["predicted_peak_bytes"] / 2 ** 30
        res["plan_error"] = plan.get("measured", {}).get("error")
    except Exception as e:  # noqa: BLE001 - the plan is a figure of the part, not the part
        res["plan"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def mfu(c, model: str, tokens_per_s: float, fraction: float):
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


def attempt(fn) -> dict:
    """fn()'s figures, or its error: one run's failure or timeout does not lose the part's other figures."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded in the result file
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


def part_train(c, paths: dict, name: str, first: bool = True) -> dict:
    """Precompute, then training under ZeRO-3 and --deepspeed auto (the larger model: auto alone)."""
    model, data, cache = build_model(c, paths, name), paths["data"], f"{c.work}/cache_{name}"
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
        res = attempt(lambda: train_run(c, model, data, cache, f"{name}_{label}", ds, c.s["steps"]))
        if "tokens_per_s" in res:
            res["mfu"] = mfu(c, model, res["tokens_per_s"], fraction)
        out[label] = res
        c.result["parts"][f"train_{name}"] = out  # what is measured stays, whatever comes next
        c.write()
    out["response_fraction"] = fraction
    return out


def part_trl(c, paths: dict) -> dict:
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


def part_long_rows(c, paths: dict) -> dict:
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
            res = attempt(lambda: train_run(c, model, f"{d}/prep", f"{d}/cache", f"long_{length}_{tiled}", "auto",
                                            3, *(["--tiled_mlp"] if tiled else []), micro=1, accum=1))
            out[f"{length}_tiled_{tiled}"] = {k: res[k] for k in ("tokens_per_s", "peak_gib", "planned_gib", "error")
                                               if k in res}
            c.write()
    return out
