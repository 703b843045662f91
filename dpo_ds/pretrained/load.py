"""HF causal LMs as the phases load them: --model checked, dtype and attention chosen, built under ZeRO-3's
zero.Init when the engine shards it (transformers' HfDeepSpeedConfig route), an adapter directory read as its base
with the adapter merged, dropout off and gradient checkpointing on for training."""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os

import torch

from dpo_ds import dist
from dpo_ds.data.prepared import load_tokenizer
from dpo_ds.errors import ConfigError, UserError

_HF_DS_CONFIG = None  # transformers reads ZeRO-3 from a live HfDeepSpeedConfig: keep it referenced
ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory PEFT's adapter
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def attn_implementation(requested: str, dtype: torch.dtype) -> str:
    """auto: flash_attention_2 where it can run (CUDA, flash-attn installed, a 16-bit dtype: it rejects fp32),
    sdpa otherwise."""
    if requested == "flash_attention_2":
        missing = [why for why, bad in (("the flash-attn package is not installed (pip install flash-attn)",
                                         importlib.util.find_spec("flash_attn") is None),
                                        ("it runs on CUDA GPUs only", not torch.cuda.is_available()),
                                        ("it takes bf16/fp16 only", dtype not in (torch.bfloat16, torch.float16)))
                   if bad]
        if missing:
            raise ConfigError(f"--attn_implementation flash_attention_2 cannot run here: {'; '.join(missing)}. "
                              f"Use --attn_implementation auto (sdpa where flash-attn cannot run)")
    if requested != "auto":
        return requested
    if (torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
            and dtype in (torch.bfloat16, torch.float16)):
        return "flash_attention_2"
    return "sdpa"


def open_model_dir(path: str, trust_remote_code: bool = False, adapter: bool = False):
    """--model checked and its tokenizer loaded on every rank; a rank that cannot (e.g. a node without the
    directory) stops every rank with the reason, instead of leaving them waiting in their next collective.
    `adapter`: a LoRA adapter directory is accepted (evaluate)."""
    def read():
        check_model_dir(path, adapter)
        return load_tokenizer(path, trust_remote_code)

    return dist.on_every_rank(read)


def check_model_dir(path: str, adapter: bool = False) -> None:
    """The start-up check of --model, run once by each phase before anything is loaded."""
    if not os.path.isdir(path):
        raise UserError(f"--model {path}: no such directory (expected an HF checkpoint)")
    if is_adapter_dir(path) and not adapter:
        raise UserError(f"--model {path} is a LoRA adapter (PEFT's format), not a whole model: give the SFT model "
                        f"here, or the adapter merged into it (train --merge_adapter writes final/merged)")
    if not os.path.isfile(os.path.join(path, "config.json")) and not adapter:
        raise UserError(f"--model {path}: no config.json; is it an HF checkpoint (save_pretrained)?")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise UserError(f"--model {path}: no *.safetensors weights (pickle checkpoints are not loaded; "
                        f"convert with save_pretrained(..., safe_serialization=True))")


def load_model(path: str, dtype: torch.dtype, attn: str = "auto", trust_remote_code: bool = False,
               zero3_config: dict | None = None, quantization_config=None):
    """An HF causal LM from safetensors. Given the engine's ZeRO-3 DeepSpeed config (`zero3_config`, on a process
    group DeepSpeed already runs on) it is built under `zero.Init`, so no rank ever holds the whole model. An
    adapter directory (PEFT's format) is its base model with the adapter merged (not under ZeRO-3: merge it at
    export, --merge_adapter)."""
    global _HF_DS_CONFIG
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    _HF_DS_CONFIG = HfDeepSpeedConfig(zero3_config) if zero3_config else None
    if is_adapter_dir(path):
        if _HF_DS_CONFIG is not None:
            raise UserError(f"--model {path} is an adapter: its merge needs whole weights, which ZeRO-3 shards; "
                            f"score it without --deepspeed, or its merged checkpoint (train --merge_adapter)")
        return load_merged(path, lambda base: load_model(base, dtype, attn, trust_remote_code))
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(attn, dtype),
                                                use_safetensors=True, trust_remote_code=trust_remote_code, **extra)


@contextlib.contextmanager
def whole_loads():
    """Within: transformers loads whole models even after a ZeRO-3 engine was built in this process (rank 0's
    merge at export: zero.Init there would wait for collectives no other rank makes)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if _HF_DS_CONFIG is not None:
            set_hf_deepspeed_config(_HF_DS_CONFIG)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_merged(path: str, load_base):
    """An adapter directory (PEFT's format) as one HF model: its base (`load_base(base_path)`) with the adapter
    merged in."""
    from peft import PeftModel

    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise UserError(f"--model {path}: an adapter whose base model {base!r} ({ADAPTER_CONFIG}: "
                        f"base_model_name_or_path) is not a directory here; give its path there")
    return PeftModel.from_pretrained(load_base(base), path).merge_and_unload()


def disable_dropout(model) -> None:
    """Every dropout of `model` off: its nn.Dropout layers, and the probabilities HF modules keep as floats and
    apply only in training mode (`attention_dropout`, `hidden_dropout`, ...). The model's config is untouched,
    so the exported checkpoint keeps the values it came with."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing: works under ZeRO-3 with the installed versions (tests/test_train.py)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
