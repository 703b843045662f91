"""A training run's life in its output directory, behind one interface that train.py asks (`Run`): the output
claimed, what a saved run holds read once, how this start continues it (or why it cannot), its checkpoints saved and
restored with the state they carry.

    record       OUT/config.json, and the copy of it inside each checkpoint
    policy       whether and how a saved run continues with the settings given now
    state        what a checkpoint carries besides the engine (RunState)
    checkpoints  a checkpoint saved, the newest restored
    signals      stop signals noted and agreed by every rank at a step boundary (StopSignals)
"""
from __future__ import annotations

import contextlib
import os

from dpo_ds import dist, slurm
from dpo_ds.config import TrainConfig
from dpo_ds.errors import Preempted
from dpo_ds.lifecycle.checkpoints import restore, save
from dpo_ds.lifecycle.policy import check_resumable, continue_as_started, keep_global_batch, universal_config
from dpo_ds.lifecycle.record import newest, saved_config, saved_record, saved_run, write_record
from dpo_ds.lifecycle.signals import StopSignals
from dpo_ds.lifecycle.state import RunState
from dpo_ds.storage import owner

__all__ = ["Run", "RunState", "StopSignals", "intact"]


class Run:
    """One start of a training run in cfg.output_dir: `Run.claimed(cfg, stop)`, then `settle` once the DeepSpeed
    configuration is known, `restore` once the engine is built, `save` when `save_due`, and `stopped` when the
    ranks agreed to stop at a signal (`stop`: the process's StopSignals)."""

    def __init__(self, cfg: TrainConfig, record: dict | None, moved: str | None, stop: StopSignals):
        self.cfg, self.record, self.moved, self.stop = cfg, record, moved, stop
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
        self.resuming = False

    @classmethod
    @contextlib.contextmanager
    def claimed(cls, cfg: TrainConfig, stop: StopSignals):
        """OUT held by this run alone while it lasts (storage.owner), and the Run that continues what it holds."""
        with owner.owned(cfg.output_dir, "training run", "--output_dir", "train"):
            yield cls.open(cfg, stop)

    @classmethod
    def open(cls, cfg: TrainConfig, stop: StopSignals) -> "Run":
        """What OUT holds, read once by every rank (OUT must be storage they all see: checked), and what it changes
        in `cfg` before anything is built: the global batch kept on other ranks or K (--grad_accum derived again,
        said in `moved`), the dropout of a run saved before --disable_dropout."""
        dist.check_shared_dir(cfg.output_dir, "--output_dir")  # checkpoints are written by every rank, read by all
        record = saved_record(cfg)
        moved = keep_global_batch(cfg, record)
        continue_as_started(cfg, record)
        return cls(cfg, record, moved, stop)

    @property
    def saved_config(self) -> dict | None:
        """The DeepSpeed configuration of the run this start continues (None for a new run)."""
        return saved_config(self.record)

    def settle(self, ds_config: dict, reference: dict) -> dict:
        """Whether the saved run continues with these settings (rank 0 decides, before anything is rewritten; a
        run that cannot is refused in one line naming each difference), OUT/config.json written for this start,
        and the DeepSpeed config to build the engine with: the saved checkpoint converted to the universal format
        where the ranks, K, the ZeRO stage or offload changed. `reference`: the cache's fingerprint."""
        run = saved_run(self.cfg, ds_config, reference)
        self.resuming = dist.on_main(lambda: check_resumable(self.cfg, self.ckpt_dir, run))
        if dist.is_main():
            write_record(self.cfg.output_dir, run, self.resuming)
        if self.resuming:
            ds_config = universal_config(self.ckpt_dir, self.record, ds_config, bool(self.moved))
        return ds_config

    def restore(self, policy) -> RunState:
        """The state to start from: the newest checkpoint loaded into `policy`, or a new run's."""
        return restore(policy, self.ckpt_dir) if self.resuming else RunState()

    def save_due(self, step: int) -> bool:
        """A checkpoint after `step` (steps done): every --save_every and at the end; never with -1."""
        cfg = self.cfg
        return cfg.save_every >= 0 and (step == cfg.max_steps or bool(cfg.save_every and step % cfg.save_every == 0))

    def save(self, policy, state: RunState) -> None:
        """A checkpoint of `policy` with `state` (collective); the newest --save_total_limit kept."""
        save(policy, self.ckpt_dir, state, self.cfg.save_total_limit)

    def stopped(self, policy, state: RunState, saved: bool, first: bool = False) -> Preempted:
        """Every rank agreed to stop at a signal: this step's checkpoint (unless `saved` already, or, `first`, no
        step of this start was taken), later signals ignored, a Slurm job submitted with --requeue requeued (rank 0)
        -> the Preempted to raise: which signal, which step was saved, what resumes it."""
        if not (saved or first):
            self.save(policy, state)
        self.stop.ignore()
        then = dist.on_main(slurm.requeue)
        if first:
            return Preempted(f"stopped by {self.stop.name} before its first step ({intact(self.cfg.output_dir)}); "
                             f"{then}")
        return Preempted(f"stopped by {self.stop.name} after step {state.step}: checkpoint step-{state.step:07d} "
                         f"saved in {self.ckpt_dir}; {then}")


def intact(out_dir: str) -> str:
    """What a fault leaves of the run in `out_dir`, and what to run next."""
    tag = os.path.basename(newest(out_dir))
    if tag:
        return f"the last checkpoint ({tag} in {out_dir}/checkpoints) is intact; rerun the same command to resume it"
    return "no checkpoint was written yet; rerun the same command to start again"
