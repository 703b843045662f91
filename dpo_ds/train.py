"""Phase 2: DPO-train the single policy under DeepSpeed against the cached reference log-probs.

    deepspeed --num_gpus N --module dpo_ds.train --deepspeed ds_configs/zero3.json --model SFT_DIR \
        --data PREPARED_DIR --ref_cache CACHE_DIR --output_dir OUT [--config job.json] [--beta 0.1] ...
    deepspeed --hostfile hosts --module dpo_ds.train ...      # multi-node: the launcher's own hostfile
    python -m dpo_ds.train ...                                 # one plain process

Step s trains on global batch s of a seeded per-epoch permutation, sorted by length and dealt out as
micro-batches, so the data position is a function of the step: a resumed run continues the same trajectory.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import psutil
import torch
from torch.profiler import record_function
from tqdm import tqdm

from dpo_ds import dist, engine, model_card, owner, trackers
from dpo_ds.batching import pad_and_eos, take
from dpo_ds.config import TrainConfig, main_guard, on_fault, parse, resume_keys, to_dict
from dpo_ds.data import load_split, read_report
from dpo_ds.errors import UserError
from dpo_ds.files import atomic_json, read_json
from dpo_ds.layout import build
from dpo_ds.layout import lengths as layout_lengths
from dpo_ds.loss import MetricSums
from dpo_ds.ref_cache import describe_difference, open_verified, precision_warning
from dpo_ds.report import MetricsLog, format_metrics, plot, read_metrics
from dpo_ds.step import batch_losses, split_metrics


def global_batch(step: int, n: int, size: int, seed: int) -> np.ndarray:
    """Row indices of global batch `step`: each epoch is a fresh seeded permutation; the tail is dropped."""
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * size:(k + 1) * size]


def rank_micro_batches(rows: np.ndarray, lengths: np.ndarray, micro: int, grad_accum: int) -> list[np.ndarray]:
    """Sort the global batch by length (little padding), cut it into D x grad_accum micro-batches and deal
    micro-batch j to data-parallel rank j % D (D = world / --sequence_parallel_size: the ranks of a sequence-
    parallel group share theirs). The step's examples do not depend on micro x accumulation."""
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    chunks = rows.reshape(dist.dp_size() * grad_accum, micro)
    return [chunks[j] for j in range(dist.dp_rank(), len(chunks), dist.dp_size())]


def train_step(policy, ds, reference, micro_batches, cfg: TrainConfig, pad_id: int, step: int,
               bco_delta: float = 0.0) -> MetricSums:
    """One optimizer step of the training engine `policy` over this rank's micro-batches -> their metric
    sums. `reference(batch)` gives RefLogps: the cache's, or in scripts/bench.py a live reference model."""
    sums = MetricSums()
    for rows in micro_batches:  # the labelled ranges name the parts of a step in a profile (scripts/bench.py)
        with record_function("dpo_ds.data"):
            batch = build(take(ds, rows), engine.layout_of(policy), pad_id)
        with record_function("dpo_ds.forward_and_loss"):
            losses, batch_sums = batch_losses(policy, batch, reference, cfg, bco_delta)
            loss = losses.mean()
        with record_function("dpo_ds.finite_check"):
            if dist.all_reduce([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
                raise UserError(f"non-finite loss at step {step + 1}; stopped before applying it. The last "
                                f"checkpoint in {cfg.output_dir}/checkpoints is intact: lower --learning_rate, "
                                f"check the data, or use fp32/bf16 rather than fp16")
        with record_function("dpo_ds.backward"):
            policy.backward(loss)
        with record_function("dpo_ds.engine_step"):
            policy.step()  # DeepSpeed applies the update (and the lr schedule) at the accumulation boundary
        sums = sums + batch_sums
    return sums


# inputs named by path: a resumed run compares what they hold (the reference cache's fingerprint covers the
# model's weights, the tokenizer, the prepared data and the dtype), not how they are spelt
BY_CONTENT = ("model", "data", "ref_cache")


def saved_run(cfg: TrainConfig, ds_config: dict, reference: dict) -> dict:
    """What OUT/config.json records: the settings, the DeepSpeed config, the ranks, the cache's fingerprint."""
    return {"train": to_dict(cfg), "deepspeed": ds_config, "world_size": dist.world_size(), "reference": reference}


def continue_as_started(cfg: TrainConfig) -> None:
    """A run saved before --disable_dropout existed trained with the model's dropout: resumed, it keeps it
    (on every rank: each reads the shared OUT/config.json)."""
    path = os.path.join(cfg.output_dir, "config.json")
    if os.path.isfile(os.path.join(cfg.output_dir, "checkpoints", "latest")) and os.path.isfile(path):
        try:
            saved = read_json(path).get("train", {})
        except (OSError, ValueError, AttributeError):
            return  # check_resumable names what is wrong with it
        if "disable_dropout" not in saved:
            cfg.disable_dropout = False


def check_resumable(cfg: TrainConfig, ckpt_dir: str, now: dict) -> bool:
    """True when a checkpoint exists and may be continued with `now` (a `saved_run`); refuses, naming each old
    and new value, a run that cannot: other settings, inputs, ZeRO stage, precision or number of ranks."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        return False
    if cfg.resume == "never":
        raise UserError(f"{cfg.output_dir} already holds a run with checkpoints (--resume never); "
                        f"use a new --output_dir or --resume auto")
    saved_path = os.path.join(cfg.output_dir, "config.json")
    if not os.path.isfile(saved_path):
        return True
    saved = read_json(saved_path)
    old = saved["train"]  # as a config again: settings added since then take their defaults
    old = to_dict(TrainConfig(**{k: v for k, v in old.items() if k in to_dict(cfg)}))
    changed = []
    for key in resume_keys(TrainConfig):
        was, new = old.get(key), getattr(cfg, key)
        if key in BY_CONTENT:
            if "reference" in saved:
                continue
            was, new = os.path.realpath(was), os.path.realpath(new)  # a run saved before fingerprints were
        if was != new:
            changed.append(f"--{key} {was} -> {new}")
    if saved.get("reference", now["reference"]) != now["reference"]:
        what = describe_difference(now["reference"], saved["reference"])
        changed.append(f"the reference cache's inputs ({what}) differ from the run's")
    for name, get in (("ZeRO stage", engine.zero_stage), ("precision", engine.ds_dtype)):
        was, new = get(saved["deepspeed"]), get(now["deepspeed"])
        if was != new:
            changed.append(f"{name} {was} -> {new} (--deepspeed)")
    if saved.get("world_size", now["world_size"]) != now["world_size"]:
        changed.append(f"ranks {saved['world_size']} -> {now['world_size']}")
    if changed:
        raise UserError(f"{cfg.output_dir} holds a run that cannot continue with these settings: "
                        f"{'; '.join(changed)}. Rerun with the run's own settings, or use a new --output_dir")
    return True


def rng_path(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{dist.rank():05d}.pt")


class RewardMean:
    """bco_pair's δ: the mean reward β·ρ over every response of the steps before this one (all ranks), so a
    step's loss does not depend on how its micro-batches are dealt across ranks or accumulation."""

    def __init__(self, mean: float = 0.0, count: float = 0.0):
        self.mean, self.count = mean, count

    def update(self, step_sums: MetricSums) -> None:
        """`step_sums`: one step's metric sums over every rank."""
        n = 2 * step_sums["pairs"]
        total = step_sums["rewards/chosen"] + step_sums["rewards/rejected"]
        self.mean, self.count = (self.mean * self.count + total) / (self.count + n), self.count + n


class Window:
    """The train metrics summed since the last logged line (each rank its own share). Carried across a
    checkpoint, so a run resumed between two log lines logs the same averages as an uninterrupted one."""

    def __init__(self):
        self.sums, self.t0 = MetricSums(), time.time()

    def add(self, sums: MetricSums) -> None:
        self.sums = self.sums + sums

    def reduce(self) -> tuple[MetricSums, float]:
        """(metric sums over every rank, seconds since the window opened): collective."""
        return self.sums.all_reduce(), time.time() - self.t0

    def state(self) -> dict:
        sums, seconds = self.reduce()
        return {"sums": sums.as_dict(), "seconds": seconds}

    def restore(self, state: dict) -> None:
        if dist.is_main():  # the reduced window lives on rank 0 alone, so the next reduce counts it once
            self.sums, self.t0 = MetricSums(state["sums"]), time.time() - state["seconds"]


def save(policy, ckpt_dir: str, step: int, window: Window, counters: dict, keep: int = 2) -> None:
    """A DeepSpeed checkpoint plus each rank's RNG state (dropout, if the model has any, continues exactly;
    the data order needs none: it is a function of seed and step), the open metrics window and the run's
    `counters` (cumulative tokens, bco_pair's δ)."""
    tag = f"step-{step:07d}"
    os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, rng_path(ckpt_dir, tag))  # before DeepSpeed writes `latest`, which marks it complete
    engine.save_checkpoint(policy, ckpt_dir, tag, {"step": step, "window": window.state(), **counters})
    if dist.is_main():  # keep the newest `keep` checkpoints
        tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step-"))
        for old in tags[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def restore(policy, ckpt_dir: str, window: Window) -> tuple[int, dict]:
    """Load the newest complete checkpoint, this rank's RNG state and the metrics window -> (the step to
    continue from, the saved counters)."""
    client = engine.load_checkpoint(policy, ckpt_dir) or {}
    start = client.get("step", 0)
    if "window" in client:
        window.restore(client["window"])
    if start and os.path.isfile(rng_path(ckpt_dir, f"step-{start:07d}")):
        rng = torch.load(rng_path(ckpt_dir, f"step-{start:07d}"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return start, {k: client[k] for k in ("num_tokens", "bco_mean", "bco_count") if k in client}


def load_data(cfg: TrainConfig, dtype):
    """(train split, its Reference, eval split or None, its Reference or None, the cache's fingerprint). Rank 0
    alone hashes the data, the cache and the model's weights; the other ranks read what it verified. Warns when
    the training `dtype` is not the cache's."""
    splits = [s for s in ("train", "eval") if s in dist.on_main(lambda: read_report(cfg.data))["counts"]]
    cache = open_verified(cfg.ref_cache, cfg.data, cfg.model, splits, cfg.trust_remote_code)
    shared = cfg.ld_alpha is not None
    data = dist.on_every_rank(lambda: {s: load_split(cfg.data, s) for s in splits})
    fp = cache.manifest["fingerprint"]
    warning = precision_warning(cache, "train", engine.dtype_name(dtype), cfg.beta)
    if warning:
        dist.print0(warning)
    if "eval" not in splits:
        dist.print0(f"train: {cfg.data} has no eval split (prepared with --eval_fraction 0): no evaluation")
        return data["train"], cache.reference("train", shared), None, None, fp
    return data["train"], cache.reference("train", shared), data["eval"], cache.reference("eval", shared), fp


class Job:
    """What the loop needs, built by `set_up`."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def evaluate(self, step: int) -> dict:
        if self.eval_ds is None:
            return {}
        self.policy.eval()
        metrics = split_metrics(self.policy, self.eval_ds, self.eval_reference, self.cfg, self.cfg.micro_batch_size,
                                self.pad_id, self.eos_id, self.bco.mean)
        self.policy.train()
        if self.log:
            self.log.write(step, "eval", metrics)
            tqdm.write(f"eval @ {step}: {format_metrics(metrics)}")
        return metrics


def open_log(cfg: TrainConfig, start: int) -> MetricsLog | None:
    """Rank 0's metrics.jsonl and --report_to trackers; a tracker that fails to start stops every rank."""
    opened = []
    dist.on_main(lambda: opened.append(MetricsLog(cfg.output_dir, start, trackers.open_all(
        trackers.chosen(cfg.report_to), cfg.output_dir, cfg.run_name, to_dict(cfg), start))))
    return opened[0] if opened else None


def set_up(cfg: TrainConfig) -> Job:
    """Data and cache (verified once), the saved config, the engine, and the checkpoint to continue from."""
    launched = psutil.Process().create_time()
    dist.check_shared_dir(cfg.output_dir, "--output_dir")  # checkpoints are written by every rank, read by all
    tokenizer = engine.open_model_dir(cfg)
    ds_config = engine.train_ds_config(cfg.deepspeed, cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm)
    train_ds, train_reference, eval_ds, eval_reference, reference = load_data(cfg, engine.ds_dtype(ds_config))
    global_size = cfg.micro_batch_size * cfg.grad_accum * dist.dp_size()
    if len(train_ds) < global_size:
        raise UserError(f"the train split has {len(train_ds)} pairs, fewer than one global batch "
                        f"({cfg.micro_batch_size} micro x {cfg.grad_accum} accumulation x {dist.dp_size()} "
                        f"data-parallel ranks)")
    cfg.set_epochs(len(train_ds) // global_size)
    pad_id, eos_id = pad_and_eos(tokenizer)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    continue_as_started(cfg)
    run = saved_run(cfg, ds_config, reference)
    resuming = dist.on_main(lambda: check_resumable(cfg, ckpt_dir, run))  # before anything is rewritten
    if dist.is_main():
        atomic_json(os.path.join(cfg.output_dir, "config.json"), run)
    policy = engine.training_engine(cfg, ds_config)
    window = Window()
    start, counters = restore(policy, ckpt_dir, window) if resuming else (0, {})
    log = open_log(cfg, start)
    if engine.partitions_nothing(ds_config):
        lighter = "ds_configs/zero2.json" if torch.cuda.is_available() else "ds_configs/zero0_cpu.json"
        dist.print0(f"train: one rank with ZeRO-3 ({cfg.deepspeed}) partitions nothing and only costs time; "
                    f"{lighter} holds the same memory")
    dist.print0(f"train: {'resuming at step ' + str(start) if start else 'starting'}; {len(train_ds)} train / "
                f"{len(eval_ds or [])} eval pairs, global batch {global_size}, {dist.describe()}, "
                f"ZeRO stage {engine.zero_stage(ds_config)}, gradient checkpointing {cfg.gradient_checkpointing}, "
                f"layout: {engine.layout_of(policy)}")
    return Job(cfg=cfg, policy=policy, train_ds=train_ds, train_reference=train_reference, eval_ds=eval_ds,
               eval_reference=eval_reference, pad_id=pad_id, eos_id=eos_id, ckpt_dir=ckpt_dir, start=start,
               log=log, window=window, global_size=global_size, launched=launched,
               num_tokens=counters.get("num_tokens", 0.0),
               bco=RewardMean(counters.get("bco_mean", 0.0), counters.get("bco_count", 0.0)))


def train_loop(job: Job) -> None:
    """Steps `job.start` .. max_steps: train lines every --log_every, evals every --eval_every and at the end,
    checkpoints every --save_every and at the end (after the final eval, so a finished run has nothing left
    to redo but the export)."""
    cfg, policy, window = job.cfg, job.policy, job.window
    lengths = layout_lengths(job.train_ds, engine.layout_of(policy))
    if job.start == 0 and cfg.eval_every:
        job.evaluate(0)  # the SFT model's own point on the eval curves: loss ln 2, rewards 0
    policy.train()
    bar = tqdm(total=cfg.max_steps, initial=job.start, desc="train", unit="step", disable=not dist.is_main(),
               mininterval=2.0)
    for step in range(job.start, cfg.max_steps):
        lr = policy.get_lr()[0]
        rows = global_batch(step, len(job.train_ds), job.global_size, cfg.seed)
        micro_batches = rank_micro_batches(rows, lengths, cfg.micro_batch_size, cfg.grad_accum)
        step_sums = train_step(policy, job.train_ds, job.train_reference, micro_batches, cfg, job.pad_id, step,
                               job.bco.mean)
        window.add(step_sums)
        if "bco_pair" in cfg.loss_type:  # δ for the next step (collective)
            job.bco.update(step_sums.all_reduce())
        done = step + 1
        bar.update(1)
        if step == job.start and job.log:  # start-up cost: verification, loading, engine set-up
            tqdm.write(f"train: first step done {time.time() - job.launched:.1f} s after launch")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            sums, seconds = window.reduce()
            job.num_tokens += sums["tokens"]
            metrics = {**sums.mean(), "num_tokens": job.num_tokens, "lr": lr,
                       "grad_norm": float(policy.get_global_grad_norm() or 0.0),
                       "tokens_per_s": sums["tokens"] / max(seconds, 1e-9)}
            if "bco_pair" in cfg.loss_type:
                metrics["bco/delta"] = job.bco.mean
            if job.log:
                job.log.write(done, "train", metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            job.window = window = Window()
        if done == cfg.max_steps or (cfg.eval_every and done % cfg.eval_every == 0):
            job.evaluate(done)
        if done == cfg.max_steps or (cfg.save_every and done % cfg.save_every == 0):
            save(policy, job.ckpt_dir, done, window,
                 {"num_tokens": job.num_tokens, "bco_mean": job.bco.mean, "bco_count": job.bco.count})
    bar.close()


def finish(job: Job) -> dict:
    """Export the final model (unless a finished run already did) and return the final eval metrics."""
    cfg = job.cfg
    final_dir = os.path.join(cfg.output_dir, "final")
    finished_before = job.start == cfg.max_steps
    exported = dist.on_main(lambda: os.path.isdir(final_dir))  # one answer: export is collective
    if not (finished_before and exported):
        run = read_json(os.path.join(cfg.output_dir, "config.json")) if dist.is_main() else None
        engine.export_hf(job.policy.module.lm, cfg.model, final_dir, card=lambda: model_card.render(cfg, run))
    dist.barrier()  # rank 0's MetricsLog has rewritten metrics.jsonl (a finished run's rerun exports nothing)
    final = dist.on_main(lambda: final_eval(cfg))
    if job.log:
        job.log.close()
        print(f"train: {'already complete' if finished_before else 'done'}. final eval: {format_metrics(final)}\n"
              f"  model -> {final_dir}, curves -> {plot(cfg.output_dir)}, metrics -> {job.log.path}")
    dist.barrier()
    return final


def final_eval(cfg: TrainConfig) -> dict:
    evals = [r for r in read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
             if r["split"] == "eval" and r["step"] == cfg.max_steps]
    return {k: v for k, v in evals[-1].items() if k not in ("step", "split")} if evals else {}


def after_fault(out_dir: str) -> str:
    latest = os.path.join(out_dir, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        return f"the last checkpoint ({tag} in {out_dir}/checkpoints) is intact; rerun the same command to resume it"
    return "no checkpoint was written yet; rerun the same command to start again"


def run(cfg: TrainConfig) -> dict:
    on_fault(lambda: after_fault(cfg.output_dir))
    dist.init(cfg.dist_timeout_minutes, cfg.sequence_parallel_size)
    with owner.owned(cfg.output_dir, "training run", "--output_dir", "train"):
        job = set_up(cfg)
        train_loop(job)
        return finish(job)


def main(argv=None):
    main_guard(lambda: run(parse(TrainConfig, argv, prog="python -m dpo_ds.train", doc=__doc__)))


if __name__ == "__main__":
    main()
