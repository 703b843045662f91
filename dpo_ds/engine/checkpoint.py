"""DeepSpeed checkpoints read back safely: every file unpickled with weights_only=True."""
from __future__ import annotations

import contextlib
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
    if engine.load_universal_checkpoint() and not engine.zero_optimization():
        from dpo_ds.engine.universal import load_into_stage0

        return load_into_stage0(engine, ckpt_dir)  # DeepSpeed reads universal checkpoints under ZeRO only
    engine.checkpoint_engine.load = safe_load  # the engine reads its own checkpoint files through this
    from dpo_ds.engine.adapters import trains_everything

    with only_weights():  # ... and universal ones with torch.load itself
        _, client_state = engine.load_checkpoint(ckpt_dir, load_lr_scheduler_states=True,
                                                 load_module_strict=trains_everything(engine.module))
    if engine.load_universal_checkpoint():
        _steps_beside_their_parameters(engine.optimizer)
    return client_state


def _steps_beside_their_parameters(optimizer) -> None:
    """DeepSpeed's universal readers set AdamW's `step` as read (a CPU tensor); torch's fused AdamW wants it a
    float32 tensor on its parameter's device (CUDA on a GPU)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not type(inner).__module__.startswith("torch.optim"):
        return  # DeepSpeed's CPU-Adam keeps its own step
    for param, state in inner.state.items():
        if "step" in state:
            state["step"] = torch.as_tensor(float(state["step"]), dtype=torch.float32, device=param.device)


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
    enum and loss scaler), allowed in `safe_load`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


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
