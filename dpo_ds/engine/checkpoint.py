"""DeepSpeed checkpoints read back safely: every file unpickled with weights_only=True."""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil

import torch

from dpo_ds.errors import UserError


def load_checkpoint(engine, ckpt_dir: str) -> dict | None:
    """Continue from the newest complete checkpoint; None when there is none. Its files are unpickled with
    `weights_only=True` (DeepSpeed's own loader unpickles anything, so whoever could write OUT/checkpoints
    could run code in the resumed job): tensors, containers and the few DeepSpeed types of `checkpoint_types`."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        return None
    engine.checkpoint_engine.load = safe_load  # the engine reads every checkpoint file through this
    _, client_state = engine.load_checkpoint(ckpt_dir, load_lr_scheduler_states=True)
    return client_state


def checkpoint_types() -> list:
    """The non-tensor types DeepSpeed pickles into a checkpoint (ZeRO's optimizer states carry its stage
    enum and loss scaler), allowed in `safe_load`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_load(path: str, map_location=None):
    import pickle

    with torch.serialization.safe_globals(checkpoint_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            found = found.group(1) if found else str(e).splitlines()[0][:80]
            raise UserError(f"{path}: refused to load: it holds {found!r}, which no dpo_ds checkpoint holds (it was "
                            f"changed by someone or something else): nothing was loaded. Restore the checkpoint "
                            f"from a trusted copy, or start over in a new --output_dir") from None


def to_universal(ckpt_dir: str) -> str:
    """The newest checkpoint in DeepSpeed's universal format (fp32 weights and optimizer moments per parameter,
    loadable by another number of ranks or another ZeRO partitioning): converted once (rank 0 alone) into
    TAG_universal beside it, atomically (a crash leaves the original usable and the next start converts again),
    then named by `latest_universal`, which DeepSpeed reads with "load_universal". -> the universal tag. Every
    file is first unpickled with weights_only=True (DeepSpeed's converter unpickles anything)."""
    with open(os.path.join(ckpt_dir, "latest")) as f:
        tag = f.read().strip()
    out = os.path.join(ckpt_dir, f"{tag}_universal")
    if not os.path.isdir(out):
        from deepspeed.checkpoint.ds_to_universal import main as convert

        for path in sorted(glob.glob(os.path.join(ckpt_dir, tag, "*.pt"))):
            safe_load(path, map_location="cpu")
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert(argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp,
                                       num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                       strict=True, inject_missing_state=False))
        except Exception as e:  # noqa: BLE001 - DeepSpeed's converter raises what it likes
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{os.path.join(ckpt_dir, tag)}: converting it for another number of ranks failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the checkpoint is "
                            f"intact: resume on the run's own number of ranks") from None
        os.replace(tmp, out)
    latest = os.path.join(ckpt_dir, "latest_universal")
    with open(latest + ".tmp", "w") as f:
        f.write(f"{tag}_universal")
    os.replace(latest + ".tmp", latest)
    return f"{tag}_universal"
