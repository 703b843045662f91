"""The one loss step of training, evaluation and the bench: a collated batch -> per-pair losses and metric sums.

    policy log-probs (one forward for chosen and rejected) -> reference log-probs (the cache's
    `Reference`, or a live model's in scripts/bench.py) -> dpo_loss -> MetricSums

and `split_metrics`, the same step over a whole split (train's periodic evals, dpo_ds.evaluate).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from dpo_ds import dist
from dpo_ds.batching import dummy_batch, take
from dpo_ds.config import LossConfig
from dpo_ds.engine import is_collective, layout_of
from dpo_ds.layout import build, lengths
from dpo_ds.logps import pair_logps
from dpo_ds.loss import MetricSums, dpo_loss


def batch_losses(logps_fn, batch: dict, reference, loss_cfg: LossConfig):
    """-> (per-pair losses [B], MetricSums of the batch). `logps_fn` is a SequenceLogps or a DeepSpeed engine
    wrapping one; `reference(batch)` gives (ref_chosen_logps, ref_rejected_logps), e.g. RefCache.reference."""
    policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens = pair_logps(logps_fn, batch)
    device = policy_chosen_logps.device
    ref_chosen_logps, ref_rejected_logps = (t.to(device) for t in reference(batch))
    losses = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      loss_cfg.beta, loss_cfg.loss_type, loss_cfg.label_smoothing, chosen_tokens, rejected_tokens)
    sums = MetricSums.of_batch(losses, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                               ref_rejected_logps, loss_cfg.beta, tokens=batch["tokens"])
    return losses, sums


@torch.no_grad()
def split_metrics(logps_fn, ds, reference, loss_cfg: LossConfig, batch_size: int, pad_id: int, eos_id: int) -> dict:
    """Mean metrics over the whole split `ds` against `reference` (its RefCache.reference), its pairs dealt
    across ranks by length; under ZeRO-3 (is_collective) ranks with fewer batches run dummy ones to stay in
    step. Collective."""
    order = np.argsort(-lengths(ds, layout_of(logps_fn)), kind="stable")[dist.rank()::dist.world_size()]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sums = MetricSums()
    bar = tqdm(total=len(batches), desc="eval (rank 0)", unit="batch", disable=not dist.is_main(), leave=False,
               mininterval=2.0)
    for rows in dist.even(batches, is_collective(logps_fn)):
        if rows is None:
            pair_logps(logps_fn, dummy_batch(pad_id, eos_id))
            continue
        sums = sums + batch_losses(logps_fn, build(take(ds, rows), layout_of(logps_fn), pad_id), reference, loss_cfg)[1]
        bar.update(1)
    bar.close()
    return sums.all_reduce().mean()
