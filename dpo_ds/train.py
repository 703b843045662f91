"""Phase 2: DPO-train the single policy under DeepSpeed against the cached reference log-probs.

    deepspeed --num_gpus N --module dpo_ds.train --deepspeed ds_configs/zero3.json --model SFT_DIR \
        --data PREPARED_DIR --ref_cache CACHE_DIR --output_dir OUT [--config job.json] [--beta 0.1] ...
    deepspeed --hostfile hosts --module dpo_ds.train ...      # multi-node: the launcher's own hostfile
    python -m dpo_ds.train ...                                 # one plain process

A step's pairs are a function of the step (data.order); what OUT holds, how a start continues it and its
checkpoints are the run's lifecycle (dpo_ds.lifecycle): a resumed run continues the same trajectory.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import torch
from torch.profiler import record_function
from tqdm import tqdm

from dpo_ds import dist, engine
from dpo_ds.cache import Reference, open_verified, precision_warning
from dpo_ds.cli import main_guard, on_fault, parse
from dpo_ds.config import TrainConfig
from dpo_ds.data.order import global_batch, rank_micro_batches
from dpo_ds.errors import UserError
from dpo_ds.lifecycle import Run, RunState, StopSignals, intact
from dpo_ds.model.batch import build, longest_row, pad_and_eos, take
from dpo_ds.model.batch import lengths as layout_lengths
from dpo_ds.model.logps import layout_of
from dpo_ds.objective.metrics import MetricSums, tie_rule
from dpo_ds.objective.step import batch_losses, split_metrics
from dpo_ds.plan.choice import engine_config, planned_dtype
from dpo_ds.pretrained import AdapterSpec, dtype_name, open_model_dir
from dpo_ds.report import card as model_card
from dpo_ds.report import memory
from dpo_ds.report.log import MetricsLog, eval_at, format_metrics, open_log
from dpo_ds.report.plot import plot
from dpo_ds.storage.files import read_json

if TYPE_CHECKING:
    from datasets import Dataset


def train_step(policy, ds, reference, micro_batches, cfg: TrainConfig, pad_id: int, step: int,
               bco_delta: float = 0.0, stop: StopSignals | None = None) -> MetricSums:
    """One optimizer step of the training engine `policy` over this rank's micro-batches -> their metric
    sums. `reference(batch)` gives the reference's Pair: the cache's, or a live reference model
    (scripts/bench_workers.py). `stop`: the ranks agree on a stop signal in the step's one reduction."""
    sums, nonfinite = MetricSums(), torch.zeros((), dtype=torch.bool)
    for i, rows in enumerate(micro_batches):  # labelled ranges name the parts of a step in a profile (bench)
        with record_function("dpo_ds.data"):
            batch = build(take(ds, rows), layout_of(policy), pad_id)
        with record_function("dpo_ds.forward_and_loss"):
            losses, batch_sums = batch_losses(policy, batch, reference, cfg, bco_delta)
            loss = losses.mean()
            nonfinite = nonfinite.to(loss.device) | ~torch.isfinite(loss.detach())  # on the device: no wait
        if i == len(micro_batches) - 1:  # once per step, before the update is applied (every rank: collective)
            with record_function("dpo_ds.finite_check"):
                flags = dist.all_reduce([float(nonfinite), stop.pending() if stop else 0.0], op="max")
                if stop:
                    stop.agree(flags[1])
                if flags[0] > 0:
                    raise UserError(f"non-finite loss at step {step + 1}; stopped before applying it. The last "
                                    f"checkpoint in {cfg.output_dir}/checkpoints is intact: lower "
                                    f"--learning_rate, check the data, or use fp32/bf16 rather than fp16")
        with record_function("dpo_ds.backward"):
            policy.backward(loss)
        with record_function("dpo_ds.engine_step"):
            policy.step()  # DeepSpeed applies the update (and the lr schedule) at the accumulation boundary
        sums = sums + batch_sums
    return sums


def load_data(cfg: TrainConfig, dtype):
    """(train split, its Reference, eval split or None, its Reference or None, the cache's fingerprint). Rank 0
    alone hashes the data, the cache and the model's weights; the other ranks read what it verified. Warns when
    the training `dtype` is not the cache's, and says what counts as a tie where either is not fp32."""
    cache = open_verified(cfg.ref_cache, cfg.data, cfg.model, ("train", "eval"), cfg.trust_remote_code,
                          optional=("eval",))
    shared = cfg.length_desensitised
    data = cache.data
    fp = cache.manifest["fingerprint"]
    for line in (precision_warning(cache, "train", name := dtype_name(dtype), cfg.beta), tie_rule(name, fp["dtype"])):
        if line:
            dist.print0(line)
    if "eval" not in data:
        dist.print0(f"train: {cfg.data} has no eval split (prepared with --eval_fraction 0): no evaluation")
        return data["train"], cache.reference("train", shared), None, None, fp
    return data["train"], cache.reference("train", shared), data["eval"], cache.reference("eval", shared), fp


@dataclass
class Job:
    """What the loop needs, built by `set_up`; `state` is what a checkpoint carries."""
    cfg: TrainConfig
    run: Run          # the run's life in OUT: checkpoints saved and restored
    policy: object    # the training engine (engine.training_engine)
    train_ds: Dataset
    train_reference: Reference
    eval_ds: Dataset | None
    eval_reference: Reference | None
    pad_id: int
    eos_id: int
    global_size: int  # pairs per optimizer step, over every data-parallel rank
    launched: float   # the process's start time, for the start-up cost
    log: MetricsLog | None  # rank 0's
    start: int        # the step the run starts or resumes at
    state: RunState

    def evaluate(self, step: int) -> dict:
        if self.eval_ds is None:
            return {}
        self.policy.eval()
        metrics = split_metrics(self.policy, self.eval_ds, self.eval_reference, self.cfg, self.cfg.micro_batch_size,
                                self.pad_id, self.eos_id, self.state.bco.mean)
        self.policy.train()
        if self.log:
            self.log.write(step, "eval", metrics)
            tqdm.write(f"eval @ {step}: {format_metrics(metrics)}")
        return metrics


def set_up(cfg: TrainConfig, run: Run) -> Job:
    """Data and cache (verified once), the DeepSpeed configuration, the engine, and the state to continue from."""
    launched = psutil.Process().create_time()
    tokenizer = open_model_dir(cfg.model, cfg.trust_remote_code)
    train_ds, train_reference, eval_ds, eval_reference, reference = load_data(
        cfg, planned_dtype(cfg.deepspeed, run.saved_config))
    ds_config, said = engine_config(cfg, run.saved_config, lambda: longest_row(train_ds))
    for line in (said, run.moved):
        if line:
            dist.print0(line)
    global_size = cfg.micro_batch_size * cfg.grad_accum * dist.dp_size()
    if len(train_ds) < global_size:
        raise UserError(f"the train split has {len(train_ds)} pairs, fewer than one global batch "
                        f"({cfg.micro_batch_size} micro x {cfg.grad_accum} accumulation x {dist.dp_size()} "
                        f"data-parallel ranks)")
    cfg.set_epochs(len(train_ds) // global_size)
    pad_id, eos_id = pad_and_eos(tokenizer)
    ds_config = run.settle(ds_config, reference)
    policy = engine.training_engine(engine.ModelSpec.of(cfg), engine.TrainingSpec.of(cfg), ds_config,
                                    AdapterSpec.of(cfg))
    state = run.restore(policy)
    start = state.step
    log = open_log(cfg, start)
    dist.print0(f"train: {'resuming at step ' + str(start) if start else 'starting'}; {len(train_ds)} train / "
                f"{len(eval_ds or [])} eval pairs, global batch {global_size}, {dist.describe()}, "
                f"ZeRO stage {engine.zero_stage(ds_config)}, gradient checkpointing {cfg.gradient_checkpointing}, "
                f"layout: {layout_of(policy)}")
    return Job(cfg, run, policy, train_ds, train_reference, eval_ds, eval_reference, pad_id, eos_id, global_size,
               launched, log, start, state)


def train_loop(job: Job) -> None:
    """Steps `job.start` .. max_steps: a train line every --log_every, evals every --eval_every, checkpoints every
    --save_every, both at the end too (the checkpoint after the eval); an agreed stop signal ends it (lifecycle)."""
    cfg, policy, state = job.cfg, job.policy, job.state
    lengths = layout_lengths(job.train_ds, layout_of(policy))
    if job.start == 0 and cfg.eval_every:
        job.evaluate(0)  # the SFT model's own point on the eval curves: loss ln 2, rewards 0
    policy.train()
    if job.run.stop.check():  # a warning that came during the start-up
        raise job.run.stopped(policy, state, False, first=True)
    bar = tqdm(total=cfg.max_steps, initial=job.start, desc="train", unit="step", disable=not dist.is_main(),
               mininterval=2.0)
    for step in range(job.start, cfg.max_steps):
        lr = policy.get_lr()[0]
        rows = global_batch(step, len(job.train_ds), job.global_size, cfg.seed)
        micro_batches = rank_micro_batches(rows, lengths, cfg.micro_batch_size, cfg.grad_accum)
        step_sums = train_step(policy, job.train_ds, job.train_reference, micro_batches, cfg, job.pad_id, step,
                               state.bco.mean, job.run.stop)
        state.window.add(step_sums)
        if "bco_pair" in cfg.loss_type:  # δ for the next step (collective)
            state.bco.update(step_sums.all_reduce())
        state.step = done = step + 1
        bar.update(1)
        if step == job.start and job.log:  # start-up cost: verification, loading, engine set-up
            tqdm.write(f"train: first step done {time.time() - job.launched:.1f} s after launch")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            log_train(job, lr, bar)
        evaluates, saves = done == cfg.max_steps or bool(cfg.eval_every and done % cfg.eval_every == 0), \
            job.run.save_due(done)
        if evaluates:
            job.evaluate(done)
        if saves:
            job.run.save(policy, state)
        if job.run.stop.agreed or ((evaluates or saves) and job.run.stop.check()):  # (a signal during either)
            bar.close()
            raise job.run.stopped(policy, state, saves)
    bar.close()


def log_train(job: Job, lr: float, bar) -> None:
    """A train line of the window's means (collective), then a new window."""
    state = job.state
    sums, seconds = state.window.reduce()
    state.num_tokens += sums["tokens"]
    metrics = {**sums.mean(), "num_tokens": state.num_tokens, "lr": lr,
               "grad_norm": float(job.policy.get_global_grad_norm() or 0.0),
               "tokens_per_s": sums["tokens"] / max(seconds, 1e-9), **memory.largest(memory.per_rank())}
    if "bco_pair" in job.cfg.loss_type:
        metrics["bco/delta"] = state.bco.mean
    if job.log:
        job.log.write(state.step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
    state.new_window()


def finish(job: Job) -> dict:
    """Export the final model (unless a finished run already did) and return the final eval metrics."""
    cfg = job.cfg
    final_dir = os.path.join(cfg.output_dir, "final")
    finished_before = job.start == cfg.max_steps
    exported = dist.on_main(lambda: os.path.isdir(final_dir) and (  # one answer: export is collective
        not cfg.merge_adapter or os.path.isdir(os.path.join(final_dir, "merged"))))  # (asked for since: made now)
    if not (finished_before and exported):
        saved = read_json(os.path.join(cfg.output_dir, "config.json")) if dist.is_main() else None
        engine.export(job.policy.module, cfg.model, final_dir, lambda: model_card.render(cfg, saved), cfg.merge_adapter)
    dist.barrier()  # rank 0's MetricsLog has rewritten metrics.jsonl (a finished run's rerun exports nothing)
    final = dist.on_main(lambda: eval_at(os.path.join(cfg.output_dir, "metrics.jsonl"), cfg.max_steps))
    peaks = memory.per_rank()  # (collective)
    if job.log:
        job.log.close()
        print(f"train: {'already complete' if finished_before else 'done'}. final eval: {format_metrics(final)}\n"
              f"  {memory.describe(peaks)}\n"
              f"  model -> {final_dir}, curves -> {plot(cfg.output_dir)}, metrics -> {job.log.path}")
    dist.barrier()
    return final


def run(cfg: TrainConfig) -> dict:
    on_fault(lambda: intact(cfg.output_dir))
    stop = StopSignals(cfg.stop_signals)  # until the loop, a stop signal stops at once: nothing to save yet
    dist.init(cfg.dist_timeout_minutes, cfg.sequence_parallel_size)
    with Run.claimed(cfg, stop) as claimed:
        job = set_up(cfg, claimed)
        with stop.deferred():
            train_loop(job)
        return finish(job)


def main(argv=None):
    main_guard(lambda: run(parse(TrainConfig, argv, prog="python -m dpo_ds.train", doc=__doc__)))


if __name__ == "__main__":
    main()
