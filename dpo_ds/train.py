"""Phase 2: DPO-train the single policy under DeepSpeed against the cached reference log-probs.

    deepspeed --num_gpus N --module dpo_ds.train --deepspeed ds_configs/zero3.json --model SFT_DIR \
        --data PREPARED_DIR --ref_cache CACHE_DIR --output_dir OUT [--config job.json] [--beta 0.1] ...
    deepspeed --hostfile hosts --module dpo_ds.train ...      # multi-node: the launcher's own hostfile
    python -m dpo_ds.train ...                                 # one plain process

Step s trains on global batch s of a seeded per-epoch permutation, sorted by length and dealt out as
micro-batches, so the data position is a function of the step: a resumed run continues the same trajectory.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from dpo_ds import config as C, dist, engine as E
from dpo_ds.batching import collate, pad_and_eos, pair_lengths, take
from dpo_ds.evaluate import evaluate, format_metrics
from dpo_ds.logps import SequenceLogps, pair_logps
from dpo_ds.loss import dpo_loss, finalize, metric_sums
from dpo_ds.prepare import load_split, load_tokenizer, read_report
from dpo_ds.ref_cache import open_cache
from dpo_ds.report import MetricsLog, plot

# settings a resumed run must share with the run it continues
RESUME_KEYS = ("model", "data", "ref_cache", "seed", "micro_batch_size", "grad_accum", "beta", "loss_type",
               "label_smoothing", "learning_rate", "lr_schedule", "warmup_steps", "max_steps")


def global_batch(step: int, n: int, size: int, seed: int) -> np.ndarray:
    """Row indices of global batch `step`: each epoch is a fresh seeded permutation; the tail is dropped."""
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * size:(k + 1) * size]


def my_micro_batches(rows: np.ndarray, lengths: np.ndarray, micro: int, grad_accum: int) -> list[np.ndarray]:
    """Sort the global batch by length (little padding), cut it into world x grad_accum micro-batches and
    deal micro-batch j to rank j % world. The step's examples do not depend on micro x accumulation."""
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    chunks = rows.reshape(dist.world_size() * grad_accum, micro)
    return [chunks[j] for j in range(dist.rank(), len(chunks), dist.world_size())]


def cached_reference(batch: dict):
    """The reference side of the loss, as phase 1 cached it (columns joined by example_id)."""
    return batch["ref_chosen_logps"], batch["ref_rejected_logps"]


def train_step(engine, ds, micro_batches, cfg: C.TrainConfig, pad_id: int, step: int, reference=cached_reference):
    """One optimizer step over this rank's micro-batches -> (metric sums, real tokens). `reference(batch)`
    gives (ref_chosen_logps, ref_rejected_logps); scripts/bench.py swaps in a live reference model."""
    sums, tokens = 0, 0
    for rows in micro_batches:
        batch = collate(take(ds, rows), pad_id)
        pc, pr, nc, nr = pair_logps(engine, batch)
        rc, rr = (t.to(pc.device) for t in reference(batch))
        losses = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing, nc, nr)
        loss = losses.mean()
        if dist.all_reduce([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
            raise C.UserError(f"non-finite loss at step {step + 1}; stopped before applying it. The last "
                              f"checkpoint in {cfg.output_dir}/checkpoints is intact: lower --learning_rate, "
                              f"check the data, or use fp32/bf16 rather than fp16")
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update (and the lr schedule) at the accumulation boundary
        sums = sums + metric_sums(losses, pc, pr, rc, rr, cfg.beta)
        tokens += int(batch["attention_mask"].sum())
    return sums, tokens


def check_resumable(cfg: C.TrainConfig, ckpt_dir: str) -> bool:
    """True when a checkpoint exists and may be continued; refuses a run of other settings."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        return False
    if cfg.resume == "never":
        raise C.UserError(f"{cfg.output_dir} already holds a run with checkpoints (--resume never); "
                          f"use a new --output_dir or --resume auto")
    saved_path = os.path.join(cfg.output_dir, "config.json")
    if os.path.isfile(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)["train"]
        changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise C.UserError(f"{cfg.output_dir} holds a run with other settings ({', '.join(changed)}); "
                              f"it cannot be resumed with these. Use a new --output_dir")
    return True


def rng_path(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{dist.rank():05d}.pt")


def save(engine, ckpt_dir: str, step: int, keep: int = 2) -> None:
    """A DeepSpeed checkpoint plus each rank's RNG state (dropout, if the model has any, continues exactly;
    the data order needs none: it is a function of seed and step)."""
    tag = f"step-{step:07d}"
    os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, rng_path(ckpt_dir, tag))  # before DeepSpeed writes `latest`, which marks it complete
    E.save_checkpoint(engine, ckpt_dir, tag, {"step": step})
    if dist.is_main():  # keep the newest `keep` checkpoints
        tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step-"))
        for tag in tags[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    dist.barrier()


def restore(engine, ckpt_dir: str) -> int:
    """Load the newest complete checkpoint and this rank's RNG state; the step to continue from."""
    start = (E.load_checkpoint(engine, ckpt_dir) or {}).get("step", 0)
    if start and os.path.isfile(rng_path(ckpt_dir, f"step-{start:07d}")):
        rng = torch.load(rng_path(ckpt_dir, f"step-{start:07d}"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return start


def load_data(cfg: C.TrainConfig):
    """(train, eval or None) with the verified cache's reference columns joined by example_id."""
    splits = [s for s in ("train", "eval") if s in read_report(cfg.data)["counts"]]
    cache = open_cache(cfg.ref_cache, cfg.data, model_dir=cfg.model, splits=splits)
    train_ds = cache.attach(load_split(cfg.data, "train"), "train")
    eval_ds = cache.attach(load_split(cfg.data, "eval"), "eval") if "eval" in splits else None
    if eval_ds is None:
        dist.print0(f"train: {cfg.data} has no eval split (prepared with --eval_fraction 0): no evaluation")
    return train_ds, eval_ds


def build_engine(cfg: C.TrainConfig, ds_config: dict):
    """The policy under DeepSpeed (built under zero.Init for ZeRO-3), wrapped so forwards return log-probs."""
    torch.manual_seed(cfg.seed)
    model = E.load_model(cfg.model, E.ds_dtype(ds_config), cfg.attn_implementation, cfg.trust_remote_code, ds_config)
    if cfg.gradient_checkpointing:
        E.enable_gradient_checkpointing(model)
    sync = E.zero_stage(ds_config) == 3  # ZeRO-3 forwards are collective: keep ranks' lm_head calls in step
    return E.training_engine(SequenceLogps(model, cfg.logp_chunk_size, sync), ds_config, cfg.learning_rate,
                             cfg.weight_decay, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule), sync


def run(cfg: C.TrainConfig) -> dict:
    E.init_distributed()
    E.check_model_dir(cfg.model)
    ds_config = E.train_ds_config(cfg.deepspeed, cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm)
    train_ds, eval_ds = load_data(cfg)
    global_size = cfg.micro_batch_size * cfg.grad_accum * dist.world_size()
    if len(train_ds) < global_size:
        raise C.UserError(f"the train split has {len(train_ds)} pairs, fewer than one global batch "
                          f"({cfg.micro_batch_size} micro x {cfg.grad_accum} accumulation x {dist.world_size()} ranks)")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id, eos_id = pad_and_eos(tokenizer)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    resuming = check_resumable(cfg, ckpt_dir)
    if dist.is_main():
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump({"train": C.to_dict(cfg), "deepspeed": ds_config, "world_size": dist.world_size()}, f, indent=2)

    engine, sync = build_engine(cfg, ds_config)
    start = restore(engine, ckpt_dir) if resuming else 0
    log = MetricsLog(cfg.output_dir, start) if dist.is_main() else None
    dist.print0(f"train: {'resuming at step ' + str(start) if start else 'starting'}; {len(train_ds)} train / "
                f"{len(eval_ds or [])} eval pairs, global batch {global_size}, {dist.world_size()} rank(s), "
                f"ZeRO stage {E.zero_stage(ds_config)}, gradient checkpointing {cfg.gradient_checkpointing}")

    def run_eval(step):
        if eval_ds is None:
            return {}
        engine.eval()
        metrics = evaluate(engine, eval_ds, cfg, cfg.micro_batch_size, pad_id, eos_id, sync)
        engine.train()
        if log:
            log.write(step, "eval", metrics)
            tqdm.write(f"eval @ {step}: {format_metrics(metrics)}")
        return metrics

    lengths = pair_lengths(train_ds)
    if start == 0 and cfg.eval_every:
        run_eval(0)  # the SFT model's own point on the eval curves: loss ln 2, rewards 0
    engine.train()
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", disable=not dist.is_main(),
               mininterval=2.0)
    window, window_tokens, t0 = 0, 0, time.time()
    for step in range(start, cfg.max_steps):
        lr = engine.get_lr()[0]
        rows = global_batch(step, len(train_ds), global_size, cfg.seed)
        sums, tokens = train_step(engine, train_ds, my_micro_batches(rows, lengths, cfg.micro_batch_size,
                                                                     cfg.grad_accum), cfg, pad_id, step)
        window, window_tokens = window + sums, window_tokens + tokens
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            total = dist.all_reduce(torch.cat([torch.as_tensor(window), torch.tensor([float(window_tokens)])]))
            metrics = {**finalize(total[:-1]), "lr": lr, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "tokens_per_s": float(total[-1]) / max(time.time() - t0, 1e-9)}
            if log:
                log.write(done, "train", metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            window, window_tokens, t0 = 0, 0, time.time()
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
            run_eval(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            save(engine, ckpt_dir, done)
    bar.close()
    final = run_eval(cfg.max_steps)
    E.export_hf(engine, cfg.model, os.path.join(cfg.output_dir, "final"))
    if log:
        log.close()
        print(f"train: done. final eval: {format_metrics(final)}\n  model -> {cfg.output_dir}/final, "
              f"curves -> {plot(cfg.output_dir)}, metrics -> {log.path}")
    dist.barrier()
    return final


def main(argv=None):
    C.main_guard(lambda: run(C.parse(C.TrainConfig, argv, prog="python -m dpo_ds.train")))


if __name__ == "__main__":
    main()
