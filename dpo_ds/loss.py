"""The DPO family of losses and their reward metrics: pure functions of per-sequence log-probs.

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    sigmoid (DPO, Rafailov et al. 2023, eq. 7):   -log σ(β·logits)·(1-ε) - log σ(-β·logits)·ε   (ε: label smoothing,
                                                   conservative DPO)
    hinge (SLiC, Zhao et al. 2023):              max(0, 1 - β·logits)
    ipo (Azar et al. 2023, eq. 17):              (logits - 1/(2β))², on length-normalised log-probs
    rewards = β·(policy - ref), per response (summed log-probs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_ds import dist


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """All inputs [B] (summed response log-probs; token counts for ipo) -> per-pair losses [B]."""
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs chosen_tokens and rejected_tokens to length-normalise")
        c, r = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
        logits = (policy_chosen_logps / c - policy_rejected_logps / r) - (ref_chosen_logps / c - ref_rejected_logps / r)
        return (logits - 1 / (2 * beta)) ** 2
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    raise ValueError(f"unknown loss_type {loss_type!r}")


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logps/win_rate")


class MetricSums:
    """Per-pair metrics summed over micro-batches and ranks: `add` a batch, `all_reduce` across ranks, `mean`
    per pair. Names as in TRL (METRICS), plus `pairs` (the count) and `tokens` (a total, not averaged).
    Every rank holds the same names in the same order, so an all-reduce lines them up."""

    NAMES = METRICS + ("pairs", "tokens")

    def __init__(self, values=None):
        self.values = torch.zeros(len(self.NAMES), dtype=torch.float64) if values is None else \
            torch.as_tensor(values, dtype=torch.float64).clone()

    @classmethod
    def of_batch(cls, losses, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 beta: float, tokens: int = 0) -> "MetricSums":
        policy_chosen_logps, policy_rejected_logps = policy_chosen_logps.detach().float(), policy_rejected_logps.detach().float()
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
        named = {
            "loss": losses.detach().float().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen_logps.sum(),
            "logps/rejected": policy_rejected_logps.sum(),
            "logps/win_rate": (policy_chosen_logps > policy_rejected_logps).float().sum(),
            "pairs": losses.numel(),
            "tokens": tokens,
        }
        return cls([float(named[name]) for name in cls.NAMES])

    def __add__(self, other: "MetricSums") -> "MetricSums":
        return MetricSums(self.values + other.values)

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.NAMES.index(name)])

    def all_reduce(self) -> "MetricSums":
        return MetricSums(dist.all_reduce(self.values))

    def mean(self) -> dict:
        """{metric: mean per pair} for every name in METRICS."""
        n = max(self["pairs"], 1.0)
        return {name: self[name] / n for name in METRICS}
