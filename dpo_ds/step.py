"""The one loss step of training, evaluation and the bench: a collated batch -> per-pair losses and metric sums.

    policy log-probs (one forward for chosen and rejected) -> reference log-probs (the cache's, or a live
    model's in scripts/bench.py) -> dpo_loss -> MetricSums
"""
from __future__ import annotations

from dpo_ds.config import LossConfig
from dpo_ds.logps import pair_logps
from dpo_ds.loss import MetricSums, dpo_loss


def cached_reference(batch: dict):
    """The reference side of the loss as phase 1 cached it (columns joined by example_id)."""
    return batch["ref_chosen_logps"], batch["ref_rejected_logps"]


def batch_losses(logps_fn, batch: dict, loss_cfg: LossConfig, reference=cached_reference):
    """-> (per-pair losses [B], MetricSums of the batch). `logps_fn` is a SequenceLogps or a DeepSpeed engine
    wrapping one; `reference(batch)` gives (ref_chosen_logps, ref_rejected_logps)."""
    policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens = pair_logps(logps_fn, batch)
    device = policy_chosen_logps.device
    ref_chosen_logps, ref_rejected_logps = (t.to(device) for t in reference(batch))
    losses = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      loss_cfg.beta, loss_cfg.loss_type, loss_cfg.label_smoothing, chosen_tokens, rejected_tokens)
    sums = MetricSums.of_batch(losses, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                               ref_rejected_logps, loss_cfg.beta, tokens=int(batch["attention_mask"].sum()))
    return losses, sums
