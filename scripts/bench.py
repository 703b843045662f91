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
     ds_configs/zero0_cpu.json and --ds, one process each; then TRL under DeepSpeed (--ds) on the ranks of
     section 1, beside dpo_ds's cached step there (needs the `bench` extra; skipped without TRL).
                                         target: dpo_ds <= 0.75x TRL online, <= 1.0x TRL precompute
  6. the batch layout (dpo_ds.layout) on UltraFeedback-like lengths (prompts 12-590 tokens, responses 8-490,
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
import resource
import statistics
import subprocess
import sys
import time

LAYOUTS = {"new": {}, "plain": {"share_prompt": False, "packing": False}}  # new = the defaults (dpo_ds.layout)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dpo_ds.config import ModelConfig  # noqa: E402  (no torch import)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (run in their own processes)

def worker_train(a) -> None:
    """One short training run under the launcher; --mode cached or baseline. Rank 0 writes a JSON line."""
    import torch

    from dpo_ds import dist, engine
    from dpo_ds.config import InferenceConfig, TrainConfig
    from dpo_ds.data import load_split
    from dpo_ds.layout import lengths as layout_lengths
    from dpo_ds.logps import pair_logps
    from dpo_ds.ref_cache import RefLogps, open_verified
    from dpo_ds.train import global_batch, rank_micro_batches, train_step

    if not a.ds:
        sys.exit("--worker train needs --ds (a DeepSpeed config, e.g. ds_configs/zero0_cpu.json)")
    if a.profile >= a.steps:
        sys.exit(f"--profile {a.profile} must be below --steps {a.steps}: the first steps are the warm-up")

    dist.init()
    cfg = TrainConfig(model=a.model, data=a.data, ref_cache=a.cache, output_dir=a.out, deepspeed=a.ds, beta=a.beta,
                      learning_rate=1e-4, lr_schedule="constant", max_steps=a.steps, warmup_steps=0,
                      micro_batch_size=a.micro, grad_accum=a.accum, gradient_checkpointing=bool(a.gradient_checkpointing),
                      **LAYOUTS[a.layout])
    ds_cfg = engine.train_ds_config(cfg.deepspeed, cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm)
    t_start = time.time()
    ds = load_split(cfg.data, "train")
    policy = engine.training_engine(cfg, ds_cfg)
    if a.mode == "cached":
        reference = open_verified(cfg.ref_cache, cfg.data, cfg.model, ["train"]).reference("train")
    else:  # the second model: frozen, sharded like the policy, run on every micro-batch
        ref = engine.inference_engine(InferenceConfig(model=cfg.model, data=cfg.data, batch_size=a.micro, dtype="fp32",
                                                      deepspeed=os.path.join(ROOT, "ds_configs", "zero3_inference.json"),
                                                      **LAYOUTS[a.layout]))

        def reference(batch):
            with torch.no_grad():
                p = pair_logps(ref, batch, shared=cfg.ld_alpha is not None)
            return RefLogps(p.chosen_logps, p.rejected_logps, p.chosen_shared_logps, p.rejected_shared_logps)
    policy.train()
    lengths, size = layout_lengths(ds, engine.layout_of(policy)), a.micro * a.accum * dist.world_size()
    times, losses = [], []
    profiler = None
    for step in range(cfg.max_steps):
        if a.profile and step == cfg.max_steps - a.profile:  # the last --profile steps, after the warm-up
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=False)
            profiler.__enter__()
        t0 = time.time()
        micro = rank_micro_batches(global_batch(step, len(ds), size, cfg.seed), lengths, a.micro, a.accum)
        sums = train_step(policy, ds, reference, micro, cfg, 0, step)
        times.append(float(dist.all_reduce([time.time() - t0], op="max")[0]))
        losses.append(sums.mean()["loss"])
    if profiler is not None:
        profiler.__exit__(None, None, None)
        if dist.is_main():
            print_profile(profiler, a.profile, sum(times[-a.profile:]))
    rss = float(dist.all_reduce([peak_rss_mb()], op="max")[0])
    if dist.is_main():
        warm = times[min(3, len(times) - 1):]
        with open(a.result, "a") as f:
            f.write(json.dumps({"mode": a.mode, "beta": a.beta, "ranks": dist.world_size(), "ds": os.path.basename(a.ds or ""),
                                "layout": a.layout,
                                "median_step_s": statistics.median(warm),
                                "peak_rss_mb_per_rank": rss, "wall_s": time.time() - t_start,
                                "first_loss": losses[0]}) + "\n")


def worker_eval(a) -> None:
    """Seconds of dpo_ds.evaluate's work (step.split_metrics over the eval split, one process), after a warm-up
    pass, in --layout."""
    from dpo_ds import dist, engine
    from dpo_ds.batching import pad_and_eos
    from dpo_ds.config import EvalConfig
    from dpo_ds.data import load_split, load_tokenizer
    from dpo_ds.ref_cache import open_verified
    from dpo_ds.step import split_metrics

    dist.init()
    cfg = EvalConfig(model=a.model, data=a.data, ref_cache=a.cache, batch_size=a.batch, **LAYOUTS[a.layout])
    fn, ds = engine.inference_engine(cfg), load_split(a.data, "eval")
    reference = open_verified(a.cache, a.data, None, ["eval"]).reference("eval")
    pad = pad_and_eos(load_tokenizer(a.model))
    split_metrics(fn, ds, reference, cfg, cfg.batch_size, *pad)  # warm-up
    t0 = time.time()
    metrics = split_metrics(fn, ds, reference, cfg, cfg.batch_size, *pad)
    print(json.dumps({"layout": a.layout, "seconds": time.time() - t0, "pairs": len(ds), "loss": metrics["loss"]}))


def length_mix(path: str, n: int, seed: int = 0) -> None:
    """UltraFeedback-like lengths in the tiny model's words (one token per number): prompts 20-600 tokens,
    responses 10-500, log-normal with long tails; chosen and rejected lengths independent."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(map(str, rng.integers(0, 40, k)))  # noqa: E731
    prompt = np.clip(rng.lognormal(np.log(110), 0.8, n), 12, 590).astype(int)
    response = np.clip(rng.lognormal(np.log(90), 0.8, (2, n)), 8, 490).astype(int)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "sort ascending: " + words(prompt[i]), "chosen": words(response[0, i]),
                                "rejected": words(response[1, i])}) + "\n")


def print_profile(profiler, steps: int, seconds: float) -> None:
    """Where a step's time goes: dpo_ds's labelled parts (train.train_step) and the operators by self time."""
    events = profiler.key_averages()
    print(f"[profile] {steps} steps, {seconds / steps:.3f} s/step (wall, profiler on)")
    for e in sorted((e for e in events if e.key.startswith("dpo_ds.")), key=lambda e: -e.cpu_time_total):
        print(f"[profile] {e.key:<28} {e.cpu_time_total / 1e6 / steps:8.3f} s/step  ({e.count // steps} calls/step)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))


def trl_rows(model_dir: str, data_dir: str) -> list[dict]:
    """The prepared train split as TRL reads it: {prompt, chosen, response} text decoded from dpo_ds's token
    ids (prompt = the tokens before the first label), so both trainers see the same sequences."""
    from transformers import AutoTokenizer

    from dpo_ds.data import load_split
    from dpo_ds.encode import IGNORE

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for r in load_split(data_dir, "train"):
        n = next(i for i, label in enumerate(r["chosen_labels"]) if label != IGNORE)
        rows.append({"prompt": tok.decode(r["chosen_input_ids"][:n]), "chosen": tok.decode(r["chosen_input_ids"][n:]),
                     "rejected": tok.decode(r["rejected_input_ids"][n:])})
    return rows


def worker_trl(a) -> None:
    """TRL's DPOTrainer on the same model, pairs, micro-batch, accumulation and steps; --mode trl_online (a live
    reference model) or trl_precompute (precompute_ref_log_probs). Under the deepspeed launcher with a ZeRO
    config (--ds) it runs through HF Trainer's DeepSpeed integration, as TRL users do. Step time = the interval
    between optimizer steps (data loading included, as in dpo_ds's figure), median after 3 warm-up steps."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    world = int(os.environ.get("WORLD_SIZE", 1))
    if not torch.cuda.is_available():  # the same share of the cores per rank as dpo_ds's dist.init gives
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    times, marks = [], []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.time())
            times.append(marks[-1] - marks[-2])
            if a.profile and state.global_step == a.steps - a.profile:  # profile the last --profile steps
                profiler.__enter__()

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if a.profile else None

    t_start = time.time()
    configured = {}
    if a.ds and not torch.cuda.is_available():
        # Off CUDA, accelerate finds no backend for its DeepSpeed path and counts one process whatever the world
        # size (HF then fills train_batch_size for 1 rank and DeepSpeed refuses it). Set up the state the GPU path
        # would have - DeepSpeed's process group over gloo, all ranks counted - and let the Trainer use it.
        from accelerate import PartialState
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        configured = {"accelerator_config": {"use_configured_state": True}}
    tok = AutoTokenizer.from_pretrained(a.model)
    # From a file, with one datasets cache all ranks see: TRL's precompute mode maps on rank 0 and the other ranks
    # open rank 0's cache file (an in-memory dataset would keep it in rank 0's private temporary directory).
    rank = int(os.environ.get("RANK", 0))
    pairs = f"{a.out}/pairs.jsonl"
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        with open(pairs, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in trl_rows(a.model, a.data))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    ds = datasets.load_dataset("json", data_files=pairs, split="train", cache_dir=f"{a.out}/hf-cache")
    args = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.accum,
                     learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_steps=a.steps, beta=a.beta,
                     max_grad_norm=1.0, gradient_checkpointing=bool(a.gradient_checkpointing),
                     bf16=a.trl_bf16, fp16=False,  # TRL defaults to bf16; dpo_ds's bench configs run fp32
                     gradient_checkpointing_kwargs={"use_reentrant": False},
                     precompute_ref_log_probs=a.mode == "trl_precompute", max_length=None, report_to="none",
                     save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, seed=42, dataloader_num_workers=0,
                     use_cpu=not torch.cuda.is_available() and not a.ds, deepspeed=json.load(open(a.ds)) if a.ds else None, **configured)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        if rank == 0:
            print_profile(profiler, a.profile, sum(times[-a.profile:]))
    if rank == 0:
        with open(a.result, "a") as f:
            f.write(json.dumps({"mode": a.mode, "beta": a.beta, "ranks": world, "median_step_s":
                                statistics.median(times[min(3, len(times) - 1):]), "peak_rss_mb_per_rank": peak_rss_mb(),
                                "wall_s": time.time() - t_start, "trl": __import__("trl").__version__}) + "\n")


def worker_logp_memory(a) -> None:
    """Peak memory of one log-prob forward + backward at a Qwen-class vocabulary, in a fresh process."""
    import torch

    from dpo_ds.logps import sequence_logps

    torch.manual_seed(0)
    B, T, H, V = a.batch, a.seq, a.hidden, a.vocab

    class Backbone(torch.nn.Module):  # stands in for the transformer: hidden states that need gradients
        def __init__(self):
            super().__init__()
            self.h = torch.nn.Parameter(torch.randn(B, T, H) * 0.02)

        def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False):
            return type("Out", (), {"last_hidden_state": self.h})()

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.lm_head = Backbone(), torch.nn.Linear(H, V, bias=False)
            self.config = type("Config", (), {"model_type": "qwen2"})()  # a plain head: lm_head alone (dpo_ds.head)

        def get_decoder(self):
            return self.backbone

        def get_output_embeddings(self):
            return self.lm_head

    lm = LM()
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[:, : T // 4] = -100
    base = peak_rss_mb()  # ru_maxrss never falls: what follows must exceed what set-up already touched
    t0 = time.time()
    if a.mode == "chunked":
        logps, _ = sequence_logps(lm, ids, torch.ones_like(ids), labels, chunk_size=a.chunk)
    else:  # the naive way peers take: full [B, T, V] fp32 logits and log_softmax, kept for backward (not
        # logps.naive_sequence_logps: its float64 would double the figure we compare against)
        logits = lm.lm_head(lm.backbone.h).float()
        logp = logits[:, :-1].log_softmax(-1)
        tgt = labels[:, 1:]
        logps = (logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)).sum(1)
    logps.sum().backward()
    print(json.dumps({"mode": a.mode, "peak_mb": peak_rss_mb() - base, "seconds": time.time() - t0,
                      "logps0": float(logps[0])}))


def worker_bare_forward(a) -> None:
    """Tokens/s of a bare model(input_ids) over every prepared token, packed into rows without padding:
    rows as long as the median sequence, 2 x --batch of them per forward (the token count of a precompute
    batch of --batch pairs, chosen and rejected)."""
    import numpy as np
    import torch

    from dpo_ds import engine
    from dpo_ds.data import load_split, read_report

    model = engine.load_model(a.model, torch.float32).eval()
    stream = np.concatenate([np.asarray(x) for s in read_report(a.data)["counts"] for side in ("chosen", "rejected")
                             for x in load_split(a.data, s)[f"{side}_input_ids"]])
    row = int(np.median([len(x) for x in load_split(a.data, "train")["chosen_input_ids"]]))
    rows = torch.as_tensor(stream[: len(stream) // row * row].reshape(-1, row))
    with torch.no_grad():
        model(input_ids=rows[:2 * a.batch])  # one-time set-up excluded (precompute's figure includes it)
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(rows), 2 * a.batch):
            model(input_ids=rows[i:i + 2 * a.batch])
    print(json.dumps({"tokens": int(rows.numel()), "tokens_per_s": rows.numel() / (time.time() - t0)}))


# ---------------------------------------------------------------- the driver

def sh(cmd, **kw) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if p.returncode != 0:
        sys.exit(f"bench step failed: {' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def launch(a, *args) -> str:
    return sh(["deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(a.port), __file__, *map(str, args)])


def main():
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
    a = p.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    model, data, cache = f"{out}/model/model", f"{out}/data", f"{out}/cache"
    py = sys.executable
    print(f"[bench] model hidden {a.hidden} x {a.layers} layers, {a.examples} pairs, {a.ranks} ranks, {a.steps} steps")
    sh([py, "-m", "dpo_ds.tiny", "--output_dir", f"{out}/model", "--num_examples", str(a.examples),
        "--hidden_size", str(a.hidden), "--layers", str(a.layers), "--max_items", str(a.max_items)])
    sh([py, "-m", "dpo_ds.prepare", "--dataset", f"{out}/model/prefs.jsonl", "--tokenizer", model,
        "--output_dir", data, "--eval_fraction", "0.05"])

    # 2. precompute vs bare forward (one process each, same tokens)
    sh(["rm", "-rf", cache])
    t0 = time.time()
    sh(["deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(a.port), "--module", "dpo_ds.precompute",
        "--model", model, "--data", data, "--output_dir", cache, "--batch_size", "16", "--shard_size", "256"])
    precompute_wall = time.time() - t0
    stats = json.load(open(f"{cache}/manifest.json"))["stats"]
    sh(["rm", "-rf", f"{cache}-1"])
    sh([py, "-m", "dpo_ds.precompute", "--model", model, "--data", data, "--output_dir", f"{cache}-1",
        "--batch_size", "16", "--shard_size", "256"])
    one_rank = json.load(open(f"{cache}-1/manifest.json"))["stats"]
    bare = last_json(sh([py, __file__, "--worker", "bare", "--model", model, "--data", data, "--batch", "16"]))

    # 1 + 4. training steps and the beta sweep, cached vs two-model baseline
    result = f"{out}/train_runs.jsonl"
    open(result, "w").close()
    for mode in ("cached", "baseline"):
        for beta in a.sweep:
            launch(a, "--worker", "train", "--mode", mode, "--beta", beta, "--model", model, "--data", data,
                   "--cache", cache, "--out", f"{out}/run", "--ds", a.ds, "--steps", a.steps, "--micro", a.micro,
                   "--accum", a.accum, "--result", result, "--gradient_checkpointing", int(a.gradient_checkpointing))
    runs = [json.loads(line) for line in open(result)]
    pick = lambda mode, beta: next(r for r in runs if r["mode"] == mode and r["beta"] == beta)  # noqa: E731
    mid = a.sweep[len(a.sweep) // 2]
    cached, baseline = pick("cached", mid), pick("baseline", mid)

    # 5. dpo_ds beside TRL: one process each, then TRL under DeepSpeed on the ranks of section 1
    trainers_file = f"{out}/trainers.jsonl"
    open(trainers_file, "w").close()
    common = ["--model", model, "--data", data, "--cache", cache, "--steps", a.steps, "--micro", a.micro,
              "--accum", a.accum, "--result", trainers_file, "--gradient_checkpointing", int(a.gradient_checkpointing)]
    for ds_file in (os.path.join(ROOT, "ds_configs", "zero0_cpu.json"), a.ds):
        sh([py, __file__, "--worker", "train", "--mode", "cached", "--out", f"{out}/run", "--ds", ds_file,
            *map(str, common)])
    if importlib.util.find_spec("trl") is None:
        print("[bench] TRL is not installed (pip install -e .[bench]): no TRL column")
    else:
        for mode in ("trl_online", "trl_precompute"):
            sh([py, __file__, "--worker", "trl", "--mode", mode, "--out", f"{out}/trl", *map(str, common)])
        for mode in ("trl_online", "trl_precompute"):
            launch(a, "--worker", "trl", "--mode", mode, "--out", f"{out}/trl", "--ds", a.ds, *common)
    trainers = [json.loads(line) for line in open(trainers_file)]

    # 6. the batch layouts on UltraFeedback-like lengths: the defaults (shared prompt + packing) vs
    # --no-share_prompt --no-packing, at the default micro-batch and accumulation
    lay = f"{out}/layout"
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
        sh([py, __file__, *map(str, train), "--ds", os.path.join(ROOT, "ds_configs", "zero0_cpu.json")])
        launch(a, *train, "--ds", a.ds)
        lay_stats[name]["eval"] = last_json(sh([py, __file__, "--worker", "eval", "--layout", name, "--model", model,
                                                "--data", f"{lay}/data", "--cache", f"{lay}/cache-new", "--batch", "8"]))
    for r in map(json.loads, open(lay_file)):
        lay_stats[r["layout"]][f"train_{r['ranks']}"] = r

    # 3. log-prob memory
    mem = {m: last_json(sh([py, __file__, "--worker", "logp_memory", "--mode", m, "--vocab", str(a.vocab),
                            "--seq", str(a.seq), "--batch", str(a.logp_batch)]))
           for m in ("naive", "chunked")}

    report = {
        "machine": {"cpus": os.cpu_count(), "ranks": a.ranks, "device": "cpu" if not _cuda() else "cuda"},
        "settings": vars(a),
        "train_step": {"cached": cached, "baseline": baseline,
                       "step_time_ratio": cached["median_step_s"] / baseline["median_step_s"],
                       "rss_ratio": cached["peak_rss_mb_per_rank"] / baseline["peak_rss_mb_per_rank"]},
        "precompute": {"tokens_per_s": one_rank["tokens_per_s"], "bare_forward_tokens_per_s": bare["tokens_per_s"],
                       "ratio": one_rank["tokens_per_s"] / bare["tokens_per_s"],
                       "padding_fraction": one_rank["padding_fraction"],
                       f"tokens_per_s_{a.ranks}_ranks": stats["tokens_per_s"]},
        "logp_memory": {**mem, "ratio": mem["naive"]["peak_mb"] / max(mem["chunked"]["peak_mb"], 1e-9)},
        "trainers": trainers,
        "layouts": lay_stats,
        "amortisation": {"precompute_s": precompute_wall,
                         "cached_runs_s": sum(r["wall_s"] for r in runs if r["mode"] == "cached"),
                         "baseline_runs_s": sum(r["wall_s"] for r in runs if r["mode"] == "baseline"), "k": len(a.sweep)},
    }
    am = report["amortisation"]
    am["ratio"] = (am["precompute_s"] + am["cached_runs_s"]) / am["baseline_runs_s"]
    saved_per_step = baseline["median_step_s"] - cached["median_step_s"]
    am["break_even_steps_per_run"] = am["precompute_s"] / (am["k"] * saved_per_step) if saved_per_step > 0 else None
    with open(f"{out}/bench.json", "w") as f:
        json.dump(report, f, indent=2)
    ts, pc, lm = report["train_step"], report["precompute"], report["logp_memory"]
    rows = [
        ("train step, median s (cached / two-model)", f"{cached['median_step_s']:.3f} / {baseline['median_step_s']:.3f}",
         f"{ts['step_time_ratio']:.2f}x", "<= 0.75x"),
        ("peak RSS per rank, MB (cached / two-model)",
         f"{cached['peak_rss_mb_per_rank']:.0f} / {baseline['peak_rss_mb_per_rank']:.0f}", f"{ts['rss_ratio']:.2f}x", ""),
        ("precompute tok/s (1 rank) / bare forward", f"{pc['tokens_per_s']:.0f} / {pc['bare_forward_tokens_per_s']:.0f}",
         f"{pc['ratio']:.2f}x", ">= 0.9x"),
        ("precompute padding", f"{100 * pc['padding_fraction']:.1f}%", "", ""),
        (f"log-prob peak MB, V={a.vocab} T={a.seq} B={a.logp_batch} (naive / chunked)",
         f"{lm['naive']['peak_mb']:.0f} / {lm['chunked']['peak_mb']:.0f}", f"{lm['ratio']:.1f}x lower", ">= 8x"),
        (f"precompute + {am['k']} runs vs {am['k']} two-model runs, s",
         f"{am['precompute_s'] + am['cached_runs_s']:.0f} / {am['baseline_runs_s']:.0f}", f"{am['ratio']:.2f}x", ""),
        (f"  break-even run length (K={am['k']}), steps", f"{am['break_even_steps_per_run'] or float('nan'):.0f}", "", ""),
    ]
    by = {(t["mode"], t.get("ds", ""), t["ranks"]): t["median_step_s"] for t in trainers}
    online, pre = by.get(("trl_online", "", 1)), by.get(("trl_precompute", "", 1))
    for (mode, ds_name, _), seconds in by.items():
        if mode == "cached":
            ratio = f"{seconds / online:.2f}x / {seconds / pre:.2f}x" if online and pre else ""
            rows.append((f"1 process: dpo_ds ({ds_name}) step s, vs TRL online / precompute", f"{seconds:.3f}", ratio,
                         "<= 0.75x / 1.0x"))
    if online and pre:
        rows.append(("1 process: TRL step s (online / precompute_ref_log_probs)", f"{online:.3f} / {pre:.3f}", "", ""))
    online_n, pre_n = by.get(("trl_online", "", a.ranks)), by.get(("trl_precompute", "", a.ranks))
    if online_n and pre_n:
        rows.append((f"{a.ranks} ranks ZeRO-3: dpo_ds cached step s, vs TRL online / precompute",
                     f"{cached['median_step_s']:.3f}",
                     f"{cached['median_step_s'] / online_n:.2f}x / {cached['median_step_s'] / pre_n:.2f}x", "<= 0.75x / -"))
        rows.append((f"{a.ranks} ranks ZeRO-3: TRL step s (online / precompute_ref_log_probs)",
                     f"{online_n:.3f} / {pre_n:.3f}", "", ""))
    old, new = lay_stats["plain"], lay_stats["new"]
    per_pair = {k: v["precompute"]["slots"] / v["precompute"]["examples"] for k, v in lay_stats.items()}
    rows += [
        ("layout (UltraFeedback-like lengths), plain / new:", "", "", ""),
        ("  tokens computed per pair, padding included", f"{per_pair['plain']:.0f} / {per_pair['new']:.0f}",
         f"{per_pair['new'] / per_pair['plain']:.2f}x", ""),
        *((f"  train step s ({label}, micro 2 x accum 8)",
           f"{old[key]['median_step_s']:.2f} / {new[key]['median_step_s']:.2f}",
           f"{new[key]['median_step_s'] / old[key]['median_step_s']:.2f}x", "<= 0.7x")
          for key, label in (("train_1", "1 process, no ZeRO"), (f"train_{a.ranks}", f"{a.ranks} ranks, ZeRO-3"))),
        ("  precompute pairs/s (1 process)",
         f"{old['precompute']['examples_per_s']:.1f} / {new['precompute']['examples_per_s']:.1f}",
         f"{new['precompute']['examples_per_s'] / old['precompute']['examples_per_s']:.2f}x", ">= 1.4x"),
        ("  evaluate s (1 process)", f"{old['eval']['seconds']:.2f} / {new['eval']['seconds']:.2f}",
         f"{new['eval']['seconds'] / old['eval']['seconds']:.2f}x", ""),
        (f"  peak RSS per rank in training ({a.ranks} ranks), MB",
         f"{old[f'train_{a.ranks}']['peak_rss_mb_per_rank']:.0f} / {new[f'train_{a.ranks}']['peak_rss_mb_per_rank']:.0f}",
         "", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{w}}  {'value':>22}  {'ratio':>12}  target")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>22}  {r[2]:>12}  {r[3]}")
    print(f"\n-> {out}/bench.json")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    if "--worker" in sys.argv:
        w = argparse.ArgumentParser()
        w.add_argument("--worker")
        w.add_argument("--local_rank", type=int, default=-1)
        for name, kind, default in (("mode", str, None), ("beta", float, 0.1), ("model", str, None), ("data", str, None),
                                    ("cache", str, None), ("out", str, None), ("ds", str, None), ("steps", int, 20),
                                    ("micro", int, 4), ("accum", int, 2), ("result", str, None), ("vocab", int, 151936),
                                    ("seq", int, 2048), ("batch", int, 2), ("hidden", int, 256)):
            w.add_argument(f"--{name}", type=kind, default=default)
        w.add_argument("--chunk", type=int, default=ModelConfig.logp_chunk_size)  # the shipped default
        w.add_argument("--gradient_checkpointing", type=int, default=1)
        w.add_argument("--profile", type=int, default=0, help="profile the last N steps of a train worker")
        w.add_argument("--trl_bf16", type=int, default=0, help="TRL worker: its default bf16 autocast instead of fp32")
        w.add_argument("--layout", choices=list(LAYOUTS), default="new", help="dpo_ds workers: the batch layout")
        args = w.parse_args()
        {"train": worker_train, "trl": worker_trl, "logp_memory": worker_logp_memory,
         "bare": worker_bare_forward, "eval": worker_eval}[args.worker](args)
    else:
        main()
