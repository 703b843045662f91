"""The only importer of deepspeed: config injection, model loading (ZeRO-3 aware), Ulysses sequence
parallelism, engines, checkpoints, and the export of a gathered HF checkpoint."""
from __future__ import annotations

import atexit
import copy
import functools
import glob
import importlib.util
import json
import math
import os
import re
import shutil

import torch

from dpo_ds import dist, files
from dpo_ds.data import load_tokenizer
from dpo_ds.errors import ConfigError, UserError
from dpo_ds.layout import FLASH_PACKING_TYPES, Layout
from dpo_ds.layout import resolve as resolve_layout
from dpo_ds.layout import unsupported as unsupported_by
from dpo_ds.logps import SequenceLogps
from dpo_ds.sequence_parallel import Group

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DS_CONFIG = None  # transformers reads ZeRO-3 from a live HfDeepSpeedConfig: keep it referenced
_SHM_CLEANUP_REGISTERED = False


# ---------------------------------------------------------------- configuration

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


def train_ds_config(path: str, micro_batch_size: int, grad_accum: int, max_grad_norm: float) -> dict:
    """The DeepSpeed config with the job's batch sizes injected (the JSON may only say "auto" or agree)."""
    ds = copy.deepcopy(read_ds_config(path))
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


def is_collective(logps_fn) -> bool:
    """Whether this log-prob function (a SequenceLogps, or a DeepSpeed engine wrapping one) must be called in
    lockstep across ranks; see collective_forwards."""
    return getattr(getattr(logps_fn, "module", logps_fn), "collective", False)


def layout_of(logps_fn) -> Layout:
    """The batch layout a SequenceLogps (or an engine wrapping one) takes: build its batches with
    dpo_ds.layout.build(rows, layout_of(logps_fn), pad_id)."""
    return getattr(logps_fn, "module", logps_fn).layout


def _layout(cfg, model) -> Layout:
    return resolve_layout(cfg.share_prompt, cfg.packing, model.config._attn_implementation, unsupported_by(model),
                          model.config.model_type, cfg.sequence_parallel_size)


def partitions_nothing(ds: dict) -> bool:
    """ZeRO-3 on one rank without offload: every shard is the whole model, so it saves no memory over stage 0
    and costs its hooks, gathers and partition copies (1.2-2x the step time on the bench: README)."""
    zero = ds.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_param", "offload_optimizer"))
    return dist.world_size() == 1 and zero_stage(ds) == 3 and not offload


def ds_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


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


# ---------------------------------------------------------------- models and the two engines

def _init_deepspeed() -> None:
    """DeepSpeed's communication layer on top of the process group `dist.init` made (the phases' one entry
    point); run by the engine builders, idempotent."""
    global _SHM_CLEANUP_REGISTERED
    import deepspeed

    dist.init()
    if not torch.cuda.is_available():
        from torch.utils.cpp_extension import _get_build_directory

        if not glob.glob(os.path.join(_get_build_directory("deepspeed_shm_comm", False), "*.so")):
            dist.print0("deepspeed: compiling its CPU communication op, once on this machine (1-2 minutes)")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available() and not _SHM_CLEANUP_REGISTERED:
        atexit.register(_remove_shm_buffer)
        _SHM_CLEANUP_REGISTERED = True


def _remove_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce leaves each rank's shared-memory buffer (69 MB) in /dev/shm at exit, so
    every run on a CPU machine leaks RAM until reboot. At exit every peer has long mapped it: removing the
    name is safe (the mappings live on until each process ends)."""
    name = f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{dist.local_rank()}"
    for path in glob.glob(os.path.join("/dev/shm", name)):
        try:
            os.remove(path)
        except OSError:
            pass


def open_model_dir(cfg):
    """--model checked and its tokenizer loaded on every rank; a rank that cannot (e.g. a node without the
    directory) stops every rank with the reason, instead of leaving them waiting in their next collective."""
    def read():
        check_model_dir(cfg.model)
        return load_tokenizer(cfg.model, cfg.trust_remote_code)

    return dist.on_every_rank(read)


def check_model_dir(path: str) -> None:
    """The start-up check of --model, run once by each phase before anything is loaded."""
    if not os.path.isdir(path):
        raise UserError(f"--model {path}: no such directory (expected an HF checkpoint)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model {path}: no config.json; is it an HF checkpoint (save_pretrained)?")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise UserError(f"--model {path}: no *.safetensors weights (pickle checkpoints are not loaded; "
                        f"convert with save_pretrained(..., safe_serialization=True))")


def load_model(path: str, dtype: torch.dtype, attn: str = "auto", trust_remote_code: bool = False,
               ds_config: dict | None = None):
    """An HF causal LM from safetensors. With a ZeRO-3 `ds_config` it is built under `zero.Init`
    (transformers' HfDeepSpeedConfig route), so no rank ever holds the whole model."""
    global _HF_DS_CONFIG
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if ds_config:
        _init_deepspeed()
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config) if ds_config and zero_stage(ds_config) == 3 else None
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(attn, dtype),
                                                use_safetensors=True, trust_remote_code=trust_remote_code)


def _load(cfg, dtype: torch.dtype, ds_config: dict | None = None):
    return load_model(cfg.model, dtype, cfg.attn_implementation, cfg.trust_remote_code, ds_config)


def training_engine(cfg, ds_config: dict):
    """The policy of a TrainConfig under DeepSpeed (built under zero.Init for ZeRO-3), gradient checkpointing
    as asked, AdamW and the lr schedule: called like SequenceLogps, trained with backward() and step()."""
    torch.manual_seed(cfg.seed)
    scale = gradient_scale(ds_config, cfg.sequence_parallel_size) if cfg.sequence_parallel_size > 1 else 1
    model = _load(cfg, ds_dtype(ds_config), ds_config)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.tiled_mlp:
        tile_mlp(model, collective=collective_forwards(ds_config))
    logps, mpu = _sequence_logps(cfg, model, collective_forwards(ds_config), True, scale)
    return _deepspeed_training(logps, ds_config, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                               cfg.max_steps, cfg.lr_schedule, mpu)


def inference_engine(cfg, stats: bool = False):
    """The frozen model of an InferenceConfig (precompute, evaluate), called like SequenceLogps (with HeadStats
    when `stats`): a ZeRO-3 engine without optimizer when --deepspeed names a config (sharded across ranks),
    else a full copy per rank."""
    import deepspeed

    dtype = resolve_dtype(cfg.dtype)
    if not cfg.deepspeed:
        model = _load(cfg, dtype).to(dist.device()).eval()
        return _sequence_logps(cfg, model, False, stats)[0]
    ds_config = inference_ds_config(cfg.deepspeed, cfg.batch_size, dtype)
    model = _load(cfg, dtype, ds_config)
    logps, mpu = _sequence_logps(cfg, model, collective_forwards(ds_config), stats)
    engine, *_ = deepspeed.initialize(model=logps, config=ds_config, mpu=mpu)
    engine.eval()
    return engine


# ---------------------------------------------------------------- sequence parallelism (Ulysses)

ULYSSES_ATTENTION = ("sdpa", "flash_attention_2")  # attention that needs no 4-D mask to be causal


def check_sequence_parallel(model, size: int) -> None:
    """Refuse, with what to change, a model Ulysses cannot split `size` ways exactly."""
    cfg, attn = model.config.get_text_config(), model.config._attn_implementation
    flag = f"--sequence_parallel_size {size}"
    if attn not in ULYSSES_ATTENTION:
        raise UserError(f"{flag} needs --attn_implementation sdpa or flash_attention_2; {attn!r} builds a "
                        f"[T, T] mask that Ulysses' attention drops")
    if model.config.model_type not in FLASH_PACKING_TYPES or unsupported_by(model):
        why = unsupported_by(model) or "its decoder is not known to pass position_ids to attention"
        raise UserError(f"{flag}: model type {model.config.model_type!r} is not supported ({why}); sequence "
                        f"parallelism runs {', '.join(sorted(FLASH_PACKING_TYPES))} (dpo_ds/layout.py)")
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % size:
        raise UserError(f"{flag}: the model's {heads} attention heads do not divide into {size} groups; choose a "
                        f"K that divides {heads}")
    if kv % size and size % kv:
        raise UserError(f"{flag}: the model's {kv} key/value heads must be a multiple or a divisor of K; "
                        f"choose a K that divides {kv} or that {kv} divides")


def register_ulysses(model, size: int, backward_scale: int):
    """Route the model's attention through DeepSpeed's Ulysses for sequence-parallel groups of `size` ranks
    (dpo_ds.dist's grouping) -> (the rank's sequence_parallel.Group, the `mpu` deepspeed.initialize takes);
    `backward_scale`: gradient_scale's for training, anything without gradients.
    Process-wide: every model using the same attention implementation is affected (a phase loads one)."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    check_sequence_parallel(model, size)
    _init_deepspeed()
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    cfg, attn = model.config.get_text_config(), model.config._attn_implementation

    class RowsPerCall(UlyssesSPAttentionHF):
        """Ulysses with the number of rows taken from each call: a batch's layout decides it (the plain layout
        has 2 per pair, packing fewer), where DeepSpeed's fixes one micro-batch size at registration."""

        def forward(self, module, query, key, value, attention_mask, *args, **kwargs):
            rows = query.shape[0]
            if rows != self.batch_size:  # the sequence dims are updated by forward (seq_length_is_variable)
                self.batch_size = rows
                for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
                    shape = getattr(self, name)
                    setattr(self, name, torch.Size([shape[0], rows, *shape[2:]]))
            return super().forward(module, query, key, value, None, *args, **kwargs)

    uattn = RowsPerCall(ALL_ATTENTION_FUNCTIONS[attn], batch_size=1, attn_head_count=cfg.num_attention_heads,
                        attn_head_size=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                        kv_head_count=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                        num_hidden_layers=cfg.num_hidden_layers, process_group=mpu.get_sequence_parallel_group(),
                        seq_length_is_variable=True)
    uattn.core_attn_implementation = attn

    def ulysses(module, query, key, value, attention_mask, *args, **kwargs):
        return uattn(module, query, key, value, None, *args, **kwargs)  # causal along the whole row

    ALL_ATTENTION_FUNCTIONS[attn] = ulysses
    return Group(mpu.get_sequence_parallel_group(), backward_scale), mpu


def gradient_scale(ds: dict | None, size: int) -> int:
    """The backward scale of the group sum (dpo_ds.sequence_parallel) for how DeepSpeed averages gradients:
    ZeRO-3 reduce-scatters them, pre-dividing by the world size (runtime/comm/coalesced_collectives.py in
    DeepSpeed 0.19.8): K; stages 0-2 divide by world / K (engine.py, stage_1_and_2.py): 1. ZeRO-3 without
    reduce-scatter mixes both per parameter (stage3.py: by bucket size) and quantized gradients take a path of
    their own: refused. tests/test_sequence_parallel.py checks the gradient norm against one rank's."""
    zero = (ds or {}).get("zero_optimization", {})
    if zero_stage(ds or {}) != 3:
        return 1
    if not zero.get("reduce_scatter", True) or zero.get("zero_quantized_gradients", False):
        raise UserError(f"--sequence_parallel_size {size} with ZeRO-3 needs its default gradient reduce-scatter: "
                        f"remove \"reduce_scatter\": false and \"zero_quantized_gradients\" from the DeepSpeed "
                        f"config (their gradient averaging is not the one dpo_ds scales for)")
    return size


def _sequence_logps(cfg, model, collective: bool, stats: bool, backward_scale: int = 1) -> tuple[SequenceLogps, object]:
    """The model as a SequenceLogps in its layout -> (it, the mpu for deepspeed.initialize: None without
    sequence parallelism)."""
    group, mpu = None, None
    if cfg.sequence_parallel_size > 1:
        group, mpu = register_ulysses(model, cfg.sequence_parallel_size, backward_scale)
    return SequenceLogps(model, cfg.logp_chunk_size, collective, _layout(cfg, model), stats, group), mpu


def tile_mlp(model, tile: int | None = None, collective: bool = False) -> None:
    """Run each decoder layer's gated MLP through DeepSpeed's TiledMLP: `tile` tokens at a time (default: the
    hidden size, DeepSpeed's choice), recomputed tile by tile in backward, so a layer never holds its
    [tokens, intermediate] activations for the whole sequence. Under ZeRO-3 (`collective`) the ranks agree on
    the tile count: each tile gathers the MLP's weights."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    if model.config.model_type not in GATED_MLP_TYPES:
        raise UserError(f"--tiled_mlp: model type {model.config.model_type!r} is not one whose MLP dpo_ds tiles "
                        f"({', '.join(sorted(GATED_MLP_TYPES))})")
    for layer in model.get_decoder().layers:
        mlp = layer.mlp
        mlp.forward = functools.partial(_tiled_mlp, TiledMLP, mlp, tile or model.config.get_text_config().hidden_size,
                                        collective)


GATED_MLP_TYPES = frozenset({"llama", "qwen2", "qwen3"})  # mlp = down(act(gate(x)) * up(x)), as _gated_mlp


def _gated_mlp(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # Llama's, Qwen2/3's MLP.forward


def _tiled_mlp(tiled, mlp, tile: int, collective: bool, x):
    tiles = max(1, math.ceil(x.shape[-2] / tile))
    if collective and dist.active():
        tiles = int(dist.all_reduce([tiles], op="max")[0])
    return tiled.apply(_gated_mlp, mlp, x, tiles, [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight])


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _deepspeed_training(model, ds_config: dict, learning_rate: float, weight_decay: float, warmup_steps: int,
                        max_steps: int, schedule: str, mpu=None):
    """ZeRO engine with AdamW (DeepSpeed's own when the config names one, e.g. CPU-Adam for offload)
    and a warm-up-then-decay schedule; both are checkpointed by DeepSpeed."""
    import deepspeed

    optimizer = None
    if "optimizer" in ds_config:
        ds_config["optimizer"].setdefault("params", {}).update(lr=learning_rate, weight_decay=weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters instead of ~6 per tensor (torch's default off CUDA is a loop)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.999),
                                      fused=True)
    schedule_fn = lr_lambda(warmup_steps, max_steps, schedule)
    engine, *_ = deepspeed.initialize(  # the scheduler is stepped by engine.step() and checkpointed with it
        model=model, optimizer=optimizer, config=ds_config, mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn))
    return engine


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


# ---------------------------------------------------------------- checkpoints and export

def save_checkpoint(engine, ckpt_dir: str, tag: str, client_state: dict) -> None:
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)  # writes 'latest' last


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


def export_hf(lm, source_dir: str, out_dir: str, card=None) -> None:
    """Write the HF model `lm` (the policy inside a training engine: `engine.module.lm`) as an HF checkpoint
    (safetensors), tokenizer files copied byte for byte. Collective: under ZeRO-3 its parameters are
    partitioned (a plain save writes empty tensors), so each is gathered in turn and rank 0 keeps a copy;
    peak memory is the full model on rank 0 plus one parameter elsewhere. `card()`: the README.md written
    beside the weights (rank 0)."""
    import deepspeed

    state = {}
    for name, param in lm.named_parameters():  # tied weights appear once; save_pretrained re-ties them
        # a no-op for parameters without ZeRO-3 partitioning (stages 0-2); under stage 3 even the resident
        # small ones are released on exit, so call this at the end of training, not in the middle
        with deepspeed.zero.GatheredParameters([param]):
            if dist.is_main():
                state[name] = param.detach().to("cpu", copy=True)
    dist.on_main(lambda: _save_hf(lm, state, source_dir, out_dir, card))  # its failure stops every rank


def _save_hf(lm, state: dict, source_dir: str, out_dir: str, card=None) -> None:
    persistent = lm.state_dict().keys()
    state.update({name: b.detach().cpu() for name, b in lm.named_buffers() if name in persistent})
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    use_cache, lm.config.use_cache = lm.config.use_cache, True  # off for training; on for whoever generates
    lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    lm.config.use_cache = use_cache
    for name in os.listdir(source_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(os.path.join(source_dir, name), tmp)
    if card is not None:
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card())
    files.make_durable(tmp)
    # a crash leaves out_dir (old or new) or, between the renames, out_dir.old, which the next export removes
    if os.path.isdir(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    files.fsync_dir(os.path.dirname(os.path.abspath(out_dir)))
    shutil.rmtree(old, ignore_errors=True)
