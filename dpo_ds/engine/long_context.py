"""Long sequences: DeepSpeed Ulysses sequence parallelism (each row split across K ranks, attention
all-to-all over heads) and TiledMLP (each layer's MLP over token tiles)."""
from __future__ import annotations

import functools
import math

import torch

from dpo_ds import dist
from dpo_ds.engine import comm
from dpo_ds.engine.ds_config import zero_stage
from dpo_ds.errors import UserError
from dpo_ds.model.layout import FLASH_PACKING_TYPES
from dpo_ds.model.layout import unsupported as unsupported_by
from dpo_ds.model.sequence_parallel import Group

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
                        f"parallelism runs {', '.join(sorted(FLASH_PACKING_TYPES))} (dpo_ds/model/layout.py)")
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
    comm.init()
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
    """The backward scale of the group sum (dpo_ds.model.sequence_parallel) for how DeepSpeed averages gradients:
    ZeRO-3 reduce-scatters them, pre-dividing by the world size (runtime/comm/coalesced_collectives.py in
    DeepSpeed 0.19.8): K; stages 0-2 divide by world / K (engine.py, stage_1_and_2.py): 1. ZeRO-3 without
    reduce-scatter mixes both per parameter (stage3.py: by bucket size) and quantized gradients take a path of
    their own: refused. tests/test_sequence_parallel.py checks the gradient norm against one rank's."""
    ds = ds or {}
    zero = ds.get("zero_optimization", {})
    if zero_stage(ds) == 1 and ds.get("bf16", {}).get("enabled") and \
            str((ds.get("data_types") or {}).get("grad_accum_dtype")) in ("fp32", "float32"):
        raise UserError(f"--sequence_parallel_size {size} with ZeRO stage 1 and fp32 gradient accumulation under "
                        f"bf16 (DeepSpeed's BF16_Optimizer) fails at its first step in DeepSpeed 0.19.8: use "
                        f"ds_configs/zero2.json or zero3.json")
    if zero_stage(ds) != 3:
        return 1
    if not zero.get("reduce_scatter", True) or zero.get("zero_quantized_gradients", False):
        raise UserError(f"--sequence_parallel_size {size} with ZeRO-3 needs its default gradient reduce-scatter: "
                        f"remove \"reduce_scatter\": false and \"zero_quantized_gradients\" from the DeepSpeed "
                        f"config (their gradient averaging is not the one dpo_ds scales for)")
    return size


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
