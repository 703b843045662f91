#!/usr/bin/env python
"""The workers of scripts/bench.py, each a process of its own (or a rank under the deepspeed launcher):

    train        a short dpo_ds training run through train.train_step: the cached reference, or a live one
    eval         dpo_ds.evaluate's work (objective.step.split_metrics) in a layout
    trl          TRL's DPOTrainer on the same model, pairs and batch (online reference or precompute)
    logp_memory  peak memory of the chunked log-probs vs a full log_softmax
    bare         a bare model forward over the same tokens, packed without padding

    python scripts/bench_workers.py --worker NAME ...   (scripts/bench.py runs them)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

LAYOUTS = {"new": {}, "plain": {"share_prompt": False, "packing": False}}  # new = the defaults (dpo_ds.model.layout)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench_measure import peak_cuda_mb, peak_rss_mb, print_profile  # noqa: E402

from dpo_ds.config import ModelConfig  # noqa: E402  (no torch import)


def live_reference(cfg, micro: int):
    """The two-model baseline's reference: the SFT model, frozen, sharded with ZeRO-3 like the policy, run on
    every micro-batch -> a function of a batch, as the cache's Reference."""
    import torch

    from dpo_ds import engine
    from dpo_ds.model.logps import pair_logps

    ref = engine.inference_engine(engine.ModelSpec.of(cfg), "fp32", os.path.join(ROOT, "ds_configs",
                                                                               "zero3_inference.json"), micro)

    def reference(batch):
        with torch.no_grad():
            return pair_logps(ref, batch, shared=cfg.length_desensitised)
    return reference


def lora(a) -> dict:
    """--lora_r as train's flags (α = 2r, as TRL's LoRA examples); 0: a full fine-tune."""
    return {"use_peft": bool(a.lora_r), "lora_r": a.lora_r or 16, "lora_alpha": 2 * (a.lora_r or 16)}


def worker_train(a) -> None:
    """One short training run under the launcher; --mode cached or baseline. Rank 0 writes a JSON line."""
    import torch

    from dpo_ds import dist, engine
    from dpo_ds.cache.read import open_verified
    from dpo_ds.config import TrainConfig
    from dpo_ds.data.order import global_batch, rank_micro_batches
    from dpo_ds.data.prepared import load_split, load_tokenizer
    from dpo_ds.model.batch import lengths as layout_lengths
    from dpo_ds.model.batch import longest_row, pad_and_eos
    from dpo_ds.model.logps import layout_of
    from dpo_ds.plan.choice import engine_config
    from dpo_ds.pretrained import AdapterSpec
    from dpo_ds.train import train_step

    if not a.ds:
        sys.exit("--worker train needs --ds (a DeepSpeed config, e.g. ds_configs/zero0_cpu.json, or auto)")
    if a.profile >= a.steps:
        sys.exit(f"--profile {a.profile} must be below --steps {a.steps}: the first steps are the warm-up")

    dist.init()
    cfg = TrainConfig(model=a.model, data=a.data, ref_cache=a.cache, output_dir=a.out, deepspeed=a.ds, beta=a.beta,
                      learning_rate=1e-4, lr_schedule="constant", max_steps=a.steps, warmup_steps=0,
                      micro_batch_size=a.micro, grad_accum=a.accum, gradient_checkpointing=bool(a.gradient_checkpointing),
                      **lora(a), **LAYOUTS[a.layout])
    t_start = time.time()
    ds = load_split(cfg.data, "train")
    ds_cfg, said = engine_config(cfg, None, lambda: longest_row(ds))  # as train chooses (--ds auto too)
    if said:
        dist.print0(said)
    specs = engine.ModelSpec.of(cfg), engine.TrainingSpec.of(cfg), ds_cfg, AdapterSpec.of(cfg)
    policy = engine.training_engine(*specs)
    if a.mode == "cached":
        reference = open_verified(cfg.ref_cache, cfg.data, cfg.model, ["train"]).reference("train")
    else:
        reference = live_reference(cfg, a.micro)
    policy.train()
    lengths, size = layout_lengths(ds, layout_of(policy)), a.micro * a.accum * dist.dp_size()
    pad_id = pad_and_eos(load_tokenizer(a.model))[0]
    times, losses, profiler = [], [], None
    for step in range(cfg.max_steps):
        if a.profile and step == cfg.max_steps - a.profile:  # the last --profile steps, after the warm-up
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=False)
            profiler.__enter__()
        t0 = time.time()
        micro = rank_micro_batches(global_batch(step, len(ds), size, cfg.seed), lengths, a.micro, a.accum)
        sums = train_step(policy, ds, reference, micro, cfg, pad_id, step)
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
                                "layout": a.layout, "lora_r": a.lora_r,
                                "median_step_s": statistics.median(warm), "peak_cuda_mb": peak_cuda_mb(),
                                "peak_rss_mb_per_rank": rss, "wall_s": time.time() - t_start,
                                "first_loss": losses[0]}) + "\n")


def worker_eval(a) -> None:
    """Seconds of dpo_ds.evaluate's work (step.split_metrics over the eval split, one process), after a warm-up
    pass, in --layout."""
    from dpo_ds import dist, engine
    from dpo_ds.cache.read import open_verified
    from dpo_ds.config import EvalConfig
    from dpo_ds.data.prepared import load_split, load_tokenizer
    from dpo_ds.model.batch import pad_and_eos
    from dpo_ds.objective.step import split_metrics

    dist.init()
    cfg = EvalConfig(model=a.model, data=a.data, ref_cache=a.cache, batch_size=a.batch, **LAYOUTS[a.layout])
    fn = engine.inference_engine(engine.ModelSpec.of(cfg), cfg.dtype, cfg.deepspeed, cfg.batch_size, stats=True)
    ds = load_split(a.data, "eval")
    reference = open_verified(a.cache, a.data, None, ["eval"]).reference("eval")
    pad = pad_and_eos(load_tokenizer(a.model))
    split_metrics(fn, ds, reference, cfg, cfg.batch_size, *pad)  # warm-up
    t0 = time.time()
    metrics = split_metrics(fn, ds, reference, cfg, cfg.batch_size, *pad)
    print(json.dumps({"layout": a.layout, "seconds": time.time() - t0, "pairs": len(ds), "loss": metrics["loss"]}))


def worker_logp_memory(a) -> None:
    """Peak memory of one log-prob forward + backward at a Qwen-class vocabulary, in a fresh process."""
    import torch

    from dpo_ds.model.logps import sequence_logps

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
            self.config = type("Config", (), {"model_type": "qwen2"})()  # a plain head: lm_head alone (dpo_ds.model.head)

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
        # tests/independent.py's naive_sequence_logps: its float64 would double the figure we compare against)
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

    from dpo_ds.data.prepared import load_split, read_report
    from dpo_ds.pretrained import load_model

    model = load_model(a.model, torch.float32).eval()
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


if __name__ == "__main__":
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
    w.add_argument("--lora_r", type=int, default=0, help="train and trl workers: LoRA of this rank (0: full)")
    w.add_argument("--trl_bf16", type=int, default=0, help="TRL worker: its default bf16 autocast instead of fp32")
    w.add_argument("--layout", choices=list(LAYOUTS), default="new", help="dpo_ds workers: the batch layout")
    args = w.parse_args()
    from bench_trl import worker_trl

    {"train": worker_train, "trl": worker_trl, "logp_memory": worker_logp_memory,
     "bare": worker_bare_forward, "eval": worker_eval}[args.worker](args)
