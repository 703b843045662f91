"""LoRA adapters on the policy (PEFT): injected before DeepSpeed so that only their parameters get gradients and
optimizer state (written out by pretrained.export, read back merged by pretrained.load).

The reference needs no adapter-disabled forward (TRL's way): it is the cache, computed from the SFT model the
adapters sit on, and an adapter initialised as PEFT does (B = 0) starts at that model exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from dpo_ds.errors import ConfigError, UserError


@dataclass(frozen=True)
class AdapterSpec:
    """LoRA as train's flags give it (TRL's and PEFT's names)."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple | None = None       # None: the decoder layers' linear projections
    modules_to_save: tuple | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False

    @classmethod
    def of(cls, cfg) -> "AdapterSpec | None":
        """From a dpo_ds.config.TrainConfig; None without --use_peft."""
        if not cfg.use_peft:
            return None
        return cls(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_target_modules or ()) or None,
                   tuple(cfg.lora_modules_to_save or ()) or None, cfg.load_in_4bit, cfg.load_in_8bit)


def default_targets(model) -> list[str]:
    """The attention and MLP projections the architecture has: the names of the linear layers inside its
    decoder layers (the embeddings and lm_head stay as they are unless asked for)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and ".layers." in name}
    if not names:
        raise UserError(f"{type(model).__name__}: no linear layers inside .layers.: name them with "
                        f"--lora_target_modules")
    return sorted(names)


def quantization_config(spec: AdapterSpec | None):
    """transformers' BitsAndBytesConfig for QLoRA's frozen base (None without --load_in_4bit/8bit), or one line
    saying why it cannot run here."""
    if spec is None or not (spec.load_in_4bit or spec.load_in_8bit):
        return None
    import importlib.util

    flag = "--load_in_4bit" if spec.load_in_4bit else "--load_in_8bit"
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag}: bitsandbytes' quantized layers need a CUDA GPU and the bitsandbytes package "
                          f"(this machine lacks {'a CUDA GPU' if not torch.cuda.is_available() else 'bitsandbytes'});"
                          f" train LoRA on the unquantized base instead (drop {flag})")
    from transformers import BitsAndBytesConfig

    if spec.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def wrap(model, spec: AdapterSpec, seed: int):
    """Inject LoRA into `model` in place (PEFT) -> the PeftModel around it. Every base weight is frozen; each
    lora_A is drawn as PEFT draws it (Kaiming-uniform, a = √5) from its own generator seeded by `seed` and its
    name, so the start does not depend on the ranks, the ZeRO stage or what consumed random numbers before;
    each lora_B is 0, so the policy starts as the SFT model."""
    from peft import LoraConfig, get_peft_model

    targets = list(spec.target_modules or default_targets(model))
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else targets,
                        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
                        task_type="CAUSAL_LM")
    config.base_model_name_or_path = os.path.abspath(model.config._name_or_path)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model..."
        raise UserError(f"--lora_target_modules {' '.join(targets)}: {str(e).splitlines()[0]} (the model's decoder "
                        f"layers have {' '.join(default_targets(model))})") from None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
                bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix
                param.copy_(torch.rand(param.shape, generator=generator, dtype=torch.float64)
                            .mul_(2 * bound).sub_(bound).to(param.dtype))
    return peft_model


def _stable_hash(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def trains_everything(module) -> bool:
    """False when some parameters are frozen (adapters): checkpoints then hold the trainable ones only."""
    return all(p.requires_grad for p in module.parameters())
