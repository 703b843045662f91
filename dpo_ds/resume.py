"""A training run across restarts: what a checkpoint carries besides the engine's own state (RunState), its
save and restore, and whether a saved run may continue with the settings given now.

A checkpoint is OUT/checkpoints/step-NNNNNNN: DeepSpeed's files (weights, optimizer, lr schedule) with the
RunState as their client state, each rank's RNG state and the run's settings (run.json) beside them; DeepSpeed
writes `latest` last, which marks it complete. The data order needs no state: it is a function of (seed, step).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field

import torch

from dpo_ds import dist, engine
from dpo_ds.cache import describe_difference
from dpo_ds.config import TrainConfig, resume_keys, to_dict
from dpo_ds.errors import UserError
from dpo_ds.objective.metrics import MetricSums
from dpo_ds.storage.files import atomic_json, read_json

# inputs named by path: a resumed run compares what they hold (the reference cache's fingerprint covers the
# model's weights, the tokenizer, the prepared data and the dtype), not how they are spelt
BY_CONTENT = ("model", "data", "ref_cache")
RECORD = "run.json"  # OUT/config.json as it was when a checkpoint was saved, inside it


def saved_run(cfg: TrainConfig, ds_config: dict, reference: dict) -> dict:
    """What OUT/config.json records: the settings, the DeepSpeed config, the ranks, the cache's fingerprint."""
    return {"train": to_dict(cfg), "deepspeed": ds_config, "world_size": dist.world_size(), "reference": reference}


def record_path(output_dir: str) -> str:
    """Where the settings the newest checkpoint was saved with are: the copy of OUT/config.json inside it (save),
    or, for a checkpoint older than such copies, OUT/config.json itself. Not OUT/config.json first: a resume under
    other ranks or another ZeRO stage rewrites it before its own first checkpoint exists."""
    newest = _newest(output_dir)
    inside = os.path.join(newest, RECORD) if newest else ""
    return inside if os.path.isfile(inside) else os.path.join(output_dir, "config.json")


def _newest(output_dir: str) -> str:
    """The folder of the checkpoint OUT/checkpoints/latest names ("" when there is none)."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return os.path.join(ckpt_dir, f.read().strip())
    except OSError:
        return ""


def write_record(output_dir: str, run: dict, resuming: bool) -> None:
    """OUT/config.json := `run` (a saved_run), rank 0. A checkpoint to resume that is older than the settings
    copies inside checkpoints first gets the copy of OUT/config.json it was saved with."""
    path, newest = record_path(output_dir), _newest(output_dir)
    if resuming and os.path.basename(path) == "config.json" and os.path.isfile(path) and os.path.isdir(newest):
        shutil.copyfile(path, os.path.join(newest, RECORD))
    atomic_json(os.path.join(output_dir, "config.json"), run)


def saved_record(cfg: TrainConfig) -> dict | None:
    """The record (OUT/config.json as saved with it) of the run OUT holds when it has a checkpoint to continue
    (None otherwise, or when it cannot be read: check_resumable then says what is wrong with it)."""
    path = record_path(cfg.output_dir)
    if cfg.resume == "never" or not (os.path.isfile(os.path.join(cfg.output_dir, "checkpoints", "latest")) and
                                     os.path.isfile(path)):
        return None  # (--resume never: check_resumable refuses the run)
    try:
        saved = read_json(path)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("train"), dict) else None


def saved_config(record: dict | None) -> dict | None:
    """The DeepSpeed configuration in a saved_record (None for none)."""
    saved = (record or {}).get("deepspeed")
    return saved if isinstance(saved, dict) else None


def global_batch(train: dict, world: int) -> int:
    """Pairs per optimizer step of a run's settings on `world` ranks."""
    return train["micro_batch_size"] * train["grad_accum"] * (world // train.get("sequence_parallel_size", 1))


def keep_global_batch(cfg: TrainConfig, saved: dict | None) -> str | None:
    """A run resumed on another number of ranks keeps the global batch it started with: --grad_accum is derived
    again (global = micro x accumulation x ranks / K; --micro_batch_size may change too) -> the line that says
    so, None when nothing changed; refused, naming the micro-batch sizes that work, when impossible. K may
    change too. `saved`: the saved_record of the run OUT holds."""
    if saved is None:
        return None
    train, world = saved["train"], saved.get("world_size", dist.world_size())
    if world == dist.world_size() and train.get("sequence_parallel_size", 1) == cfg.sequence_parallel_size:
        return None
    total, dp = global_batch(train, world), dist.dp_size()
    if total % (cfg.micro_batch_size * dp):
        works = [m for m in range(1, total // dp + 1) if total % (m * dp) == 0]
        raise UserError(f"{cfg.output_dir}: the run's global batch of {total} pairs cannot be kept on {dp} "
                        f"data-parallel rank(s) with --micro_batch_size {cfg.micro_batch_size}: "
                        + (f"use --micro_batch_size {' or '.join(map(str, works))}" if works else
                           f"{dp} does not divide {total}; use ranks that do"))
    cfg.grad_accum = total // (cfg.micro_batch_size * dp)
    return (f"train: the run started on {world} rank(s), K = {train.get('sequence_parallel_size', 1)}; it continues "
            f"on {dist.world_size()}, K = {cfg.sequence_parallel_size}: global batch {total} kept as "
            f"{cfg.micro_batch_size} x {cfg.grad_accum} accumulation x {dp} data-parallel rank(s)")


def continue_as_started(cfg: TrainConfig) -> None:
    """A run saved before --disable_dropout existed trained with the model's dropout: resumed, it keeps it
    (on every rank: each reads the shared OUT/config.json)."""
    path = record_path(cfg.output_dir)
    if os.path.isfile(os.path.join(cfg.output_dir, "checkpoints", "latest")) and os.path.isfile(path):
        try:
            saved = read_json(path).get("train", {})
        except (OSError, ValueError, AttributeError):
            return  # check_resumable names what is wrong with it
        if "disable_dropout" not in saved:
            cfg.disable_dropout = False


def check_resumable(cfg: TrainConfig, ckpt_dir: str, now: dict) -> bool:
    """True when a checkpoint exists and may be continued with `now` (a `saved_run`); refuses, naming each old
    and new value, a run that cannot: other settings, inputs, precision, or a global batch another number of
    ranks or K cannot keep (keep_global_batch). Another ZeRO stage or offload continues through the universal
    format (engine.universal), from or to stage 0 in fp32 only."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        return False
    if cfg.resume == "never":
        raise UserError(f"{cfg.output_dir} already holds a run with checkpoints (--resume never); "
                        f"use a new --output_dir or --resume auto")
    saved_path = record_path(cfg.output_dir)
    if not os.path.isfile(saved_path):
        return True
    try:
        saved = read_json(saved_path)
        old = saved["train"]  # as a config again: settings added since then take their defaults
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{saved_path}: not a readable record of the run ({type(e).__name__}: {e}), so its "
                        f"checkpoints cannot be checked against these settings; use a new --output_dir") from None
    old = to_dict(TrainConfig(**{k: v for k, v in old.items() if k in to_dict(cfg)}))
    changed = []
    moved = saved.get("world_size", now["world_size"]) != now["world_size"] or \
        old.get("sequence_parallel_size", 1) != cfg.sequence_parallel_size  # keep_global_batch derived accumulation
    for key in resume_keys(TrainConfig):
        if moved and key in ("micro_batch_size", "grad_accum", "sequence_parallel_size"):
            continue
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
    was, new = engine.ds_dtype(saved["deepspeed"]), engine.ds_dtype(now["deepspeed"])
    if was != new:  # the moments and master weights are kept, not re-derived from another precision
        changed.append(f"precision {was} -> {new} (--deepspeed)")
    stages = engine.zero_stage(saved["deepspeed"]), engine.zero_stage(now["deepspeed"])
    if stages[0] != stages[1] and 0 in stages and was == new != torch.float32:
        changed.append(f"ZeRO stage {stages[0]} -> {stages[1]} under {new} (stage 0 converts in fp32 only)")
    was = global_batch(old, saved.get("world_size", now["world_size"]))
    new = global_batch(to_dict(cfg), now["world_size"])
    if moved and was != new:
        changed.append(f"global batch {was} -> {new}")
    if changed:
        raise UserError(f"{cfg.output_dir} holds a run that cannot continue with these settings: "
                        f"{'; '.join(changed)}. Rerun with the run's own settings (--deepspeed auto, the default, "
                        f"takes the run's own configuration), or use a new --output_dir")
    return True


def offloads(ds: dict) -> str:
    """What a DeepSpeed config offloads to the host (an offloaded optimizer is DeepSpeed's CPU-Adam, whose states
    torch's AdamW does not read)."""
    return ", ".join(engine.offloaded(ds)) or "none"


def universal_config(ckpt_dir: str, record: dict | None, ds_config: dict, moved: bool) -> dict:
    """The DeepSpeed config that continues the run `record` describes: when its ZeRO shards must be cut for
    other ranks or K (`moved`), or its stage or offload changed, the newest checkpoint is converted to the
    universal format (once, rank 0) and the config reads it; said in one line."""
    saved = saved_config(record)
    if not engine.needs_universal(saved, ds_config, moved):
        return ds_config
    tag = dist.on_main(lambda: engine.to_universal(ckpt_dir, engine.zero_stage(saved)))
    dist.print0(f"train: converted {tag} to continue ZeRO stage {engine.zero_stage(saved)} (offload: "
                f"{offloads(saved)}) on {record.get('world_size', '?')} rank(s) as stage {engine.zero_stage(ds_config)}"
                f" (offload: {offloads(ds_config)}) on {dist.world_size()}")
    return {**ds_config, "checkpoint": {"load_universal": True}}


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


@dataclass
class RunState:
    """What a checkpoint carries besides the engine's own state; each field continues exactly on resume."""
    step: int = 0                  # optimizer steps done
    num_tokens: float = 0.0        # tokens trained on, logged as num_tokens
    bco: RewardMean = field(default_factory=RewardMean)  # bco_pair's δ
    window: Window = field(default_factory=Window)       # the train metrics since the last logged line

    def client_state(self) -> dict:
        """As DeepSpeed saves it beside the engine (collective: the window is summed over the ranks)."""
        return {"step": self.step, "window": self.window.state(), "num_tokens": self.num_tokens,
                "bco_mean": self.bco.mean, "bco_count": self.bco.count}

    @classmethod
    def from_client_state(cls, client: dict) -> "RunState":
        state = cls(client.get("step", 0), client.get("num_tokens", 0.0),
                    RewardMean(client.get("bco_mean", 0.0), client.get("bco_count", 0.0)))
        if "window" in client:
            state.window.restore(client["window"])
        return state


def save(policy, ckpt_dir: str, state: RunState, keep: int = 2) -> None:
    """A DeepSpeed checkpoint of the engine `policy` with `state`, plus each rank's RNG state (dropout, if the
    model has any, continues exactly); the newest `keep` are kept (0: all)."""
    tag = f"step-{state.step:07d}"
    os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, rng_path(ckpt_dir, tag))  # before DeepSpeed writes `latest`, which marks it complete
    if dist.is_main():  # the settings it is saved with: a resume reads them (record_path)
        shutil.copyfile(os.path.join(os.path.dirname(ckpt_dir), "config.json"), os.path.join(ckpt_dir, tag, RECORD))
    policy.save_checkpoint(ckpt_dir, tag=tag, client_state=state.client_state(),  # adapters: not the SFT weights
                           exclude_frozen_parameters=not engine.trains_everything(policy.module))
    if dist.is_main():
        tags = sorted(t for t in os.listdir(ckpt_dir) if re.fullmatch(r"step-\d{7}", t))
        for old in tags[:-keep] if keep else []:  # with its universal conversion, if a resume on other ranks made one
            for name in (old, f"{old}_universal"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    dist.barrier()


def restore(policy, ckpt_dir: str) -> RunState:
    """Load the newest complete checkpoint into `policy` and this rank's RNG state -> the run's state there."""
    state = RunState.from_client_state(engine.load_checkpoint(policy, ckpt_dir) or {})
    path = rng_path(ckpt_dir, f"step-{state.step:07d}")
    if state.step and os.path.isfile(path):
        rng = torch.load(path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
