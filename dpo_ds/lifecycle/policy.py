"""Whether and how a saved run continues with the settings given now: the same settings and inputs, the global
batch kept on another number of ranks or K (--grad_accum derived again), another ZeRO stage or offload through
DeepSpeed's universal format; refused in one line naming what differs otherwise.
"""
from __future__ import annotations

import os

import torch

from dpo_ds import dist
from dpo_ds.cache import describe_difference
from dpo_ds.config import TrainConfig, resume_keys, to_dict
from dpo_ds.engine.ds_config import ds_dtype, offloaded, zero_stage
from dpo_ds.engine.universal import needs_universal, to_universal
from dpo_ds.errors import UserError
from dpo_ds.lifecycle.record import record_path, saved_config
from dpo_ds.storage.files import read_json

# inputs named by path: a resumed run compares what they hold (the reference cache's fingerprint covers the
# model's weights, the tokenizer, the prepared data and the dtype), not how they are spelt
BY_CONTENT = ("model", "data", "ref_cache")


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


def continue_as_started(cfg: TrainConfig, record: dict | None) -> None:
    """A run saved before --disable_dropout existed trained with the model's dropout: resumed, it keeps it (on every
    rank: each reads the shared record). `record`: the saved_record of the run OUT holds."""
    if record is not None and "disable_dropout" not in record["train"]:
        cfg.disable_dropout = False


def check_resumable(cfg: TrainConfig, ckpt_dir: str, now: dict) -> bool:
    """True when a checkpoint exists and may be continued with `now` (a `saved_run`); refuses, naming each old
    and new value, a run that cannot: other settings, inputs, precision, or a global batch another number of
    ranks or K cannot keep (keep_global_batch). Another ZeRO stage or offload continues through the universal
    format (engine.universal), from or to stage 0 in fp32 and bf16."""
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
    was, new = ds_dtype(saved["deepspeed"]), ds_dtype(now["deepspeed"])
    if was != new:  # the moments and master weights are kept, not re-derived from another precision
        changed.append(f"precision {was} -> {new} (--deepspeed)")
    stages = zero_stage(saved["deepspeed"]), zero_stage(now["deepspeed"])
    if stages[0] != stages[1] and 0 in stages and was == new == torch.float16:
        changed.append(f"ZeRO stage {stages[0]} -> {stages[1]} under {new} (stage 0 converts in fp32 and bf16)")
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
    return ", ".join(offloaded(ds)) or "none"


def universal_config(ckpt_dir: str, record: dict | None, ds_config: dict, moved: bool) -> dict:
    """The DeepSpeed config that continues the run `record` describes: when its ZeRO shards must be cut for
    other ranks or K (`moved`), or its stage or offload changed, the newest checkpoint is converted to the
    universal format (once, rank 0) and the config reads it; said in one line."""
    saved = saved_config(record)
    if not needs_universal(saved, ds_config, moved):
        return ds_config
    tag = dist.on_main(lambda: to_universal(ckpt_dir, zero_stage(saved)))
    dist.print0(f"train: converted {tag} to continue ZeRO stage {zero_stage(saved)} (offload: "
                f"{offloads(saved)}) on {record.get('world_size', '?')} rank(s) as stage {zero_stage(ds_config)}"
                f" (offload: {offloads(ds_config)}) on {dist.world_size()}")
    return {**ds_config, "checkpoint": {"load_universal": True}}
