"""The one loss step of training, evaluation and the bench: a collated batch -> per-pair losses and metric sums.

    policy log-probs (one forward for chosen and rejected) -> reference log-probs (the cache's
    `Reference`, or a live model's in scripts/bench_workers.py) -> LD-DPO weighting -> the configured losses (and WPO
    weights) -> MetricSums

and `split_metrics`, the same step over a whole split (train's periodic evals, dpo_ds.evaluate).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from dpo_ds import dist
from dpo_ds.config import LossConfig
from dpo_ds.model.batch import build, dummy_batch, lengths, take
from dpo_ds.model.logps import is_collective, layout_of, pair_logps
from dpo_ds.objective.loss import preference_losses, wpo_weights
from dpo_ds.objective.metrics import MetricSums, tie_precision


def batch_losses(logps_fn, batch: dict, reference, loss_cfg: LossConfig, bco_delta: float = 0.0):
    """-> (per-pair losses [B], MetricSums of the batch). `logps_fn` is a SequenceLogps (with stats) or a
    DeepSpeed engine wrapping one; `reference(batch)` gives the reference's Pair, e.g. the cache's `Reference`."""
    policy = pair_logps(logps_fn, batch, shared=loss_cfg.length_desensitised)
    ref = reference(batch).to(policy.chosen.logps.device)
    weights = None
    if loss_cfg.use_weighting:
        weights = wpo_weights(policy.chosen.stats.wpo / policy.chosen.tokens.clamp(min=1),
                              policy.rejected.stats.wpo / policy.rejected.tokens.clamp(min=1))
    losses = preference_losses(policy, ref, loss_cfg, bco_delta, weights)
    precision = tie_precision(precision_of(logps_fn), getattr(reference, "precision", "fp32"))
    return losses, MetricSums.of_batch(losses, policy, ref, loss_cfg.beta, loss_cfg.ld_alpha, batch["tokens"],
                                       precision)


def precision_of(logps_fn) -> str:
    """The precision the policy computes in: its floating parameters' dtype (a DeepSpeed engine's module is
    cast to its config's bf16/fp16; a quantized base keeps its integer storage, skipped). fp32 for a callable
    without parameters."""
    params = logps_fn.parameters() if hasattr(logps_fn, "parameters") else ()
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@torch.no_grad()
def split_metrics(logps_fn, ds, reference, loss_cfg: LossConfig, batch_size: int, pad_id: int, eos_id: int,
                  bco_delta: float = 0.0) -> dict:
    """Mean metrics over the whole split `ds` against `reference` (its RefCache.reference), its pairs dealt
    across ranks by length; under ZeRO-3 (is_collective) ranks with fewer batches run dummy ones to stay in
    step (the ranks of a sequence-parallel group share their pairs). Collective."""
    order = np.argsort(-lengths(ds, layout_of(logps_fn)), kind="stable")[dist.dp_rank()::dist.dp_size()]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sums = MetricSums()
    bar = tqdm(total=len(batches), desc="eval (rank 0)", unit="batch", disable=not dist.is_main(), leave=False,
               mininterval=2.0)
    for rows in dist.even(batches, is_collective(logps_fn)):
        if rows is None:
            pair_logps(logps_fn, dummy_batch(pad_id, eos_id), shared=False)
            continue
        batch = build(take(ds, rows), layout_of(logps_fn), pad_id)
        sums = sums + batch_losses(logps_fn, batch, reference, loss_cfg, bco_delta)[1]
        bar.update(1)
    bar.close()
    sums = sums.all_reduce()
    return {**sums.mean(), "num_tokens": sums["tokens"]}
