"""DeepSpeed checkpoints read back safely: every file unpickled with weights_only=True."""
from __future__ import annotations

import os
import re

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
