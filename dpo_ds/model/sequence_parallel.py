"""Sequence parallelism, the log-probs' side: each of the K ranks of a sequence-parallel group runs the
decoder on one contiguous slice of every row and scores the response tokens predicted inside its slice; the
per-sequence partial sums are then added up over the group.

Attention still sees whole rows: DeepSpeed's Ulysses attention (registered by dpo_ds.engine) swaps the
sequence split for a head split around the core attention (all-to-all), so rank i holds slice i of the hidden
states everywhere else. Rows are padded at the end to a multiple of K (padding is never scored and, attention
being causal, never seen by a scored position).

The label shift across slice boundaries needs no exchange: a token is scored at the flat row position that
predicts it (dpo_ds.model.layout's `positions`), so the last position of slice i scores the first token of slice
i + 1, which `targets` holds already.

Gradient: every rank of a group computes the same loss from the summed log-probs, and the sum over the group
is an all-reduce whose backward hands each slice's partial sum the loss's gradient times `backward_scale`
(the attention all-to-all carries it on to the other slices' activations). DeepSpeed then averages the
ranks' gradients, dividing by world size on ZeRO-3's reduce-scatter path (its default) but by world / K in
stages 0-2 (DeepSpeed 0.19.8); the engine picks the scale (K or 1) that makes the result the gradient of the
mean loss over the data-parallel groups either way (dpo_ds.engine.gradient_scale).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as tdist


class Slice(NamedTuple):
    """This rank's share of a batch: rows [R, T'/K] and, for the scored tokens it predicts (`keep` of all of
    them), their flat positions within the slice."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor


def local_slice(input_ids: torch.Tensor, position_ids: torch.Tensor | None, positions: torch.Tensor, size: int,
                rank: int) -> Slice:
    """Rows [R, T] (position_ids None: 0..T-1 in each row, the plain layout) -> slice `rank` of `size` after
    padding T to a multiple of `size`; `positions` index the rows flat (r * T + t)."""
    R, T = input_ids.shape
    L = -(-T // size)  # slice length
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device).expand(R, T)
    pad = L * size - T
    if pad:  # a segment of its own at the end of each row
        input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=0)
        position_ids = torch.cat([position_ids, torch.arange(pad, device=input_ids.device).expand(R, pad)], 1)
    start = rank * L
    r, t = positions // T, positions % T
    keep = (t >= start) & (t < start + L)
    # contiguous: NCCL's all-gather (Ulysses gathers position_ids in every layer) refuses strided tensors
    return Slice(input_ids[:, start:start + L].contiguous(), position_ids[:, start:start + L].contiguous(),
                 r[keep] * L + t[keep] - start, keep)


class Group(NamedTuple):
    """A rank's sequence-parallel group: its process group and the gradient scale of `sum_over_group`."""
    process_group: object
    backward_scale: float


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: Group):
        ctx.scale = group.backward_scale
        y = x.clone()
        tdist.all_reduce(y, group=group.process_group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale if ctx.scale != 1 else grad, None


def sum_over_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of `x` over the sequence-parallel `group`, on every rank of it; backward: the incoming gradient
    times the group's backward_scale (see the module docstring)."""
    return _SumOverGroup.apply(x, group)
