"""DeepSpeed checkpoints read back safely: every file unpickled with weights_only=True (engine.unpickle)."""
from __future__ import annotations

import os

import torch

from dpo_ds.engine.universal import load_into_stage0
from dpo_ds.engine.unpickle import only_weights, safe_load
from dpo_ds.pretrained.adapters import trains_everything


def load_checkpoint(engine, ckpt_dir: str) -> dict | None:
    """Continue from the newest complete checkpoint; None when there is none. Its files are unpickled with
    `weights_only=True` (DeepSpeed's own loader unpickles anything, so whoever could write OUT/checkpoints
    could run code in the resumed job): tensors, containers and the few DeepSpeed types of `checkpoint_types`."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        return None
    if engine.load_universal_checkpoint() and not engine.zero_optimization():
        return load_into_stage0(engine, ckpt_dir)  # DeepSpeed reads universal checkpoints under ZeRO only
    engine.checkpoint_engine.load = safe_load  # the engine reads its own checkpoint files through this
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
