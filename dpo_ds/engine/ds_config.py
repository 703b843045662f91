"""The DeepSpeed JSON config of a run: the job's batch sizes injected (the file may say "auto" or agree),
and what the phases read from it (ZeRO stage, precision, whether forwards are collective)."""
from __future__ import annotations

import copy
import json
import os

import torch

from dpo_ds import dist
from dpo_ds.errors import ConfigError


def read_ds_config(path: str) -> dict:
    if not path or not os.path.isfile(path):
        raise ConfigError(f"--deepspeed {path}: no such DeepSpeed config file (see ds_configs/)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({e})") from None


def inject(ds: dict, path: str, key: str, value):
    """Set `key` unless the file pins a different number; 'auto' or absent means: take the job's."""
    given = ds.get(key, "auto")
    if given != "auto" and given != value:
        raise ConfigError(f"--deepspeed {path}: {key} is {given}, but the job implies {value}; set it to "
                          f"\"auto\" (the job's flags define batch sizes, once)")
    ds[key] = value


def train_ds_config(source: str | dict, micro_batch_size: int, grad_accum: int, max_grad_norm: float) -> dict:
    """The DeepSpeed config (a file's path, or the config plan.choice chose) with the job's batch sizes
    injected (the JSON may only say "auto" or agree)."""
    ds = copy.deepcopy(source if isinstance(source, dict) else read_ds_config(source))
    path = "auto" if isinstance(source, dict) else source
    inject(ds, path, "train_micro_batch_size_per_gpu", micro_batch_size)
    inject(ds, path, "gradient_accumulation_steps", grad_accum)
    inject(ds, path, "train_batch_size", micro_batch_size * grad_accum * dist.dp_size())
    _sequence_parallel(ds)
    inject(ds, path, "gradient_clipping", max_grad_norm)
    ds.setdefault("steps_per_print", 10 ** 9)  # our own logger reports; keep DeepSpeed's quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def inference_ds_config(path: str, batch_size: int, dtype: torch.dtype) -> dict:
    """A ZeRO-3 config for a model that only runs forward; its precision is --dtype's."""
    ds = copy.deepcopy(read_ds_config(path))
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds["fp16"] = {"enabled": dtype == torch.float16}
    ds["train_micro_batch_size_per_gpu"] = batch_size  # required by DeepSpeed even without training
    ds["train_batch_size"] = batch_size * dist.dp_size()
    _sequence_parallel(ds)
    ds.pop("gradient_accumulation_steps", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def _sequence_parallel(ds: dict) -> None:
    """K in the config too: zero.Init reads the data-parallel size (batch sizes' world) from it before the
    engine is given the mpu."""
    if dist.sp_size() > 1:
        ds["sequence_parallel_size"] = dist.sp_size()


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def collective_forwards(ds: dict | None) -> bool:
    """The ZeRO-3 lockstep rule, decided here only: under stage 3 every forward (and every lm_head chunk)
    gathers parameters from all ranks, so every rank must make the same number of them."""
    return bool(ds) and zero_stage(ds) == 3


def partitions_nothing(ds: dict, world: int | None = None) -> bool:
    """ZeRO-3 on one rank (of `world`, default this job's) without offload: every shard is the whole model, so it
    saves no memory over stage 0 (fp32; stage 2 under bf16/fp16) and costs its hooks, gathers and partition
    copies (1.2-2x the step time on the bench: README)."""
    return (dist.world_size() if world is None else world) == 1 and zero_stage(ds) == 3 and not offloaded(ds)


def offloaded(ds: dict) -> list[str]:
    """What a DeepSpeed config offloads to the host: "optimizer", "param", both or neither."""
    zero = ds.get("zero_optimization", {})
    return [k for k in ("optimizer", "param") if (zero.get(f"offload_{k}") or {}).get("device", "none")
            not in ("none", None)]


def ds_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
