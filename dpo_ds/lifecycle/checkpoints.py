"""A run's checkpoints: OUT/checkpoints/step-NNNNNNN, DeepSpeed's files (weights, optimizer, lr schedule) with the
RunState as their client state, each rank's RNG state and the run's settings (run.json) beside them; DeepSpeed
writes `latest` last, which marks it complete. The data order needs no state: it is a function of (seed, step).
"""
from __future__ import annotations

import os
import re
import shutil

import torch

from dpo_ds import dist
from dpo_ds.engine.checkpoint import load_checkpoint
from dpo_ds.lifecycle.record import RECORD
from dpo_ds.lifecycle.state import RunState
from dpo_ds.pretrained.adapters import trains_everything


def rng_path(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{dist.rank():05d}.pt")


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
                           exclude_frozen_parameters=not trains_everything(policy.module))
    if dist.is_main():
        tags = sorted(t for t in os.listdir(ckpt_dir) if re.fullmatch(r"step-\d{7}", t))
        for old in tags[:-keep] if keep else []:  # with its universal conversion, if a resume on other ranks made one
            for name in (old, f"{old}_universal"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    dist.barrier()


def restore(policy, ckpt_dir: str) -> RunState:
    """Load the newest complete checkpoint into `policy` and this rank's RNG state -> the run's state there."""
    state = RunState.from_client_state(load_checkpoint(policy, ckpt_dir) or {})
    path = rng_path(ckpt_dir, f"step-{state.step:07d}")
    if state.step and os.path.isfile(path):
        rng = torch.load(path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
