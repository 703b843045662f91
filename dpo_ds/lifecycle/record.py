"""What a run's output directory holds about it: OUT/config.json (the settings, DeepSpeed config, ranks and
the reference cache's fingerprint of the run), and the copy inside each checkpoint (run.json) of the settings it
was saved with, which a resume reads first.
"""
from __future__ import annotations

import os
import shutil

from dpo_ds import dist
from dpo_ds.config import TrainConfig, to_dict
from dpo_ds.storage.files import atomic_json, read_json

RECORD = "run.json"  # OUT/config.json as it was when a checkpoint was saved, inside it


def saved_run(cfg: TrainConfig, ds_config: dict, reference: dict) -> dict:
    """What OUT/config.json records: the settings, the DeepSpeed config, the ranks, the cache's fingerprint."""
    return {"train": to_dict(cfg), "deepspeed": ds_config, "world_size": dist.world_size(), "reference": reference}


def record_path(output_dir: str) -> str:
    """Where the settings the newest checkpoint was saved with are: the copy of OUT/config.json inside it (save),
    or, for a checkpoint older than such copies, OUT/config.json itself. Not OUT/config.json first: a resume under
    other ranks or another ZeRO stage rewrites it before its own first checkpoint exists."""
    folder = newest(output_dir)
    inside = os.path.join(folder, RECORD) if folder else ""
    return inside if os.path.isfile(inside) else os.path.join(output_dir, "config.json")


def newest(output_dir: str) -> str:
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
    path, folder = record_path(output_dir), newest(output_dir)
    if resuming and os.path.basename(path) == "config.json" and os.path.isfile(path) and os.path.isdir(folder):
        shutil.copyfile(path, os.path.join(folder, RECORD))
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
