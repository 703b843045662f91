"""The two engines of the phases: the policy under DeepSpeed with AdamW and the lr schedule (train), and a
frozen model run forward only (precompute, evaluate), both called like model.logps.SequenceLogps."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpo_ds import dist
from dpo_ds.config import LOGP_CHUNK_SIZE
from dpo_ds.engine import comm
from dpo_ds.engine.ds_config import collective_forwards, ds_dtype, inference_ds_config, zero_stage
from dpo_ds.engine.long_context import gradient_scale, register_ulysses, tile_mlp
from dpo_ds.model.layout import Layout
from dpo_ds.model.layout import resolve as resolve_layout
from dpo_ds.model.layout import unsupported as unsupported_by
from dpo_ds.model.logps import SequenceLogps
from dpo_ds.pretrained.adapters import AdapterSpec, quantization_config, wrap
from dpo_ds.pretrained.load import disable_dropout, enable_gradient_checkpointing, load_model, resolve_dtype


@dataclass(frozen=True)
class ModelSpec:
    """A model as the engines load and score it."""
    path: str                                # an HF checkpoint directory (safetensors)
    attn_implementation: str = "auto"        # pretrained.load.attn_implementation's choices
    trust_remote_code: bool = False
    logp_chunk_size: int = LOGP_CHUNK_SIZE   # response tokens per lm_head chunk
    share_prompt: bool | None = None         # the layout asked for (None: where exact; model.layout.resolve)
    packing: bool | None = None
    sequence_parallel_size: int = 1          # K > 1: Ulysses across K ranks

    @classmethod
    def of(cls, cfg) -> "ModelSpec":
        """From a phase's settings (a dpo_ds.config.ModelConfig)."""
        return cls(cfg.model, cfg.attn_implementation, cfg.trust_remote_code, cfg.logp_chunk_size, cfg.share_prompt,
                   cfg.packing, cfg.sequence_parallel_size)


@dataclass(frozen=True)
class TrainingSpec:
    """How the policy is trained: the optimizer and schedule, and what changes the model for training."""
    learning_rate: float
    max_steps: int
    warmup_steps: int = 0
    lr_schedule: str = "linear"              # linear, cosine or constant after the warm-up (lr_lambda)
    weight_decay: float = 0.0
    seed: int = 42                           # the initialisation of anything random
    disable_dropout: bool = True
    gradient_checkpointing: bool = True
    tiled_mlp: bool = False

    @classmethod
    def of(cls, cfg) -> "TrainingSpec":
        """From a dpo_ds.config.TrainConfig."""
        return cls(cfg.learning_rate, cfg.max_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.weight_decay, cfg.seed,
                   cfg.disable_dropout, cfg.gradient_checkpointing, cfg.tiled_mlp)


def _layout(spec: ModelSpec, model) -> Layout:
    return resolve_layout(spec.share_prompt, spec.packing, model.config._attn_implementation, unsupported_by(model),
                          model.config.model_type, spec.sequence_parallel_size)


def _load(spec: ModelSpec, dtype: torch.dtype, ds_config: dict | None = None, quantization=None):
    """The model for an engine of `ds_config` (None: a plain copy): DeepSpeed's communication started first, and
    under ZeRO-3 built already partitioned."""
    if ds_config:
        comm.init()
    zero3 = ds_config if ds_config and zero_stage(ds_config) == 3 else None
    return load_model(spec.path, dtype, spec.attn_implementation, spec.trust_remote_code, zero3, quantization)


def training_engine(spec: ModelSpec, training: TrainingSpec, ds_config: dict, adapter: AdapterSpec | None = None):
    """The policy under DeepSpeed (built under zero.Init for ZeRO-3), gradient checkpointing as asked, AdamW
    and the lr schedule: called like SequenceLogps, trained with backward() and step(). With `adapter`: LoRA
    on the frozen model, the PeftModel kept as `engine.module.peft_model` (not a submodule) for the export."""
    torch.manual_seed(training.seed)
    k = spec.sequence_parallel_size
    scale = gradient_scale(ds_config, k) if k > 1 else 1  # refuses a config it cannot scale, before the load
    model = _load(spec, ds_dtype(ds_config), ds_config, quantization_config(adapter))
    peft_model = wrap(model, adapter, training.seed) if adapter else None
    if training.disable_dropout:  # (the adapters' dropout too, as TRL)
        disable_dropout(model)
    if training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if training.tiled_mlp:
        tile_mlp(model, collective=collective_forwards(ds_config))
    logps, mpu = _sequence_logps(spec, model, collective_forwards(ds_config), True, scale)
    object.__setattr__(logps, "peft_model", peft_model)  # outside the module tree: ZeRO-3 hooks each module once
    return _deepspeed_training(logps, ds_config, training, mpu)


def inference_engine(spec: ModelSpec, dtype: str, deepspeed_config: str | None, batch_size: int, stats: bool = False):
    """A frozen model (precompute, evaluate) in `dtype` (auto, bf16, fp16, fp32), called like SequenceLogps
    (with HeadStats when `stats`): a ZeRO-3 engine without optimizer when `deepspeed_config` names one (sharded
    across ranks, `batch_size` pairs per forward), else a full copy per rank."""
    import deepspeed

    torch_dtype = resolve_dtype(dtype)
    if not deepspeed_config:
        model = _load(spec, torch_dtype).to(dist.device()).eval()
        return _sequence_logps(spec, model, False, stats)[0]
    ds_config = inference_ds_config(deepspeed_config, batch_size, torch_dtype)
    model = _load(spec, torch_dtype, ds_config)
    logps, mpu = _sequence_logps(spec, model, collective_forwards(ds_config), stats)
    engine, *_ = deepspeed.initialize(model=logps, config=ds_config, mpu=mpu)
    engine.eval()
    return engine


def _sequence_logps(spec: ModelSpec, model, collective: bool, stats: bool, backward_scale: int = 1
                    ) -> tuple[SequenceLogps, object]:
    """The model as a SequenceLogps in its layout -> (it, the mpu for deepspeed.initialize: None without
    sequence parallelism)."""
    group, mpu = None, None
    if spec.sequence_parallel_size > 1:
        group, mpu = register_ulysses(model, spec.sequence_parallel_size, backward_scale)
    return SequenceLogps(model, spec.logp_chunk_size, collective, _layout(spec, model), stats, group), mpu


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _deepspeed_training(model, ds_config: dict, training: TrainingSpec, mpu=None):
    """ZeRO engine with AdamW (DeepSpeed's own when the config names one, e.g. CPU-Adam for offload)
    and a warm-up-then-decay schedule; both are checkpointed by DeepSpeed."""
    import deepspeed

    optimizer, learning_rate, weight_decay = None, training.learning_rate, training.weight_decay
    if "optimizer" in ds_config:
        ds_config["optimizer"].setdefault("params", {}).update(lr=learning_rate, weight_decay=weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters instead of ~6 per tensor (torch's default off CUDA is a loop)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.999),
                                      fused=True)
    schedule_fn = lr_lambda(training.warmup_steps, training.max_steps, training.lr_schedule)
    engine, *_ = deepspeed.initialize(  # the scheduler is stepped by engine.step() and checkpointed with it
        model=model, optimizer=optimizer, config=ds_config, mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn))
    _keep_fp32_grad_norm(engine)
    return engine


def _keep_fp32_grad_norm(engine) -> None:
    """Without ZeRO or a bf16/fp16 optimizer DeepSpeed clips fp32 gradients itself but drops the norm it
    computed, so get_global_grad_norm() answers None: keep it, as the ZeRO optimizers do (before clipping)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep():
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))
    engine.clip_fp32_gradients = clip_and_keep
