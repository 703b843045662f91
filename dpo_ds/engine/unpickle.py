"""Checkpoint files unpickled safely: tensors, containers and the few DeepSpeed types a dpo_ds checkpoint holds
(torch.load with weights_only=True), never arbitrary objects, whoever wrote the file."""
from __future__ import annotations

import contextlib
import re

import torch

from dpo_ds.errors import UserError


@contextlib.contextmanager
def only_weights():
    """Within: torch.load is safe_load, whatever its caller asks for (DeepSpeed's universal-checkpoint readers
    call torch.load(..., weights_only=False) themselves)."""
    real = torch.load
    torch.load = lambda f, map_location=None, **_: safe_load(f, map_location, loader=real)
    try:
        yield
    finally:
        torch.load = real


def checkpoint_types() -> list:
    """The non-tensor types DeepSpeed pickles into a checkpoint (ZeRO's optimizer states carry its stage
    enum and loss scaler; its bf16 optimizer, ZeRO-1 with fp32 gradient accumulation, the address of each
    parameter's fragment: two ints), allowed in `safe_load`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str, map_location=None, loader=None):
    import pickle

    with torch.serialization.safe_globals(checkpoint_types()):
        try:
            return (loader or torch.load)(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            found = found.group(1) if found else str(e).splitlines()[0][:80]
            raise UserError(f"{path}: refused to load: it holds {found!r}, which no dpo_ds checkpoint holds (it was "
                            f"changed by someone or something else): nothing was loaded. Restore the checkpoint "
                            f"from a trusted copy, or start over in a new --output_dir") from None
