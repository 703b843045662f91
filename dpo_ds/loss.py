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


def metric_sums(losses, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta: float) -> torch.Tensor:
    """Per-batch sums of every metric in METRICS, then the pair count: add these up over micro-batches
    and ranks, divide by the count (`finalize`). Names as in TRL."""
    pc, pr = policy_chosen_logps.detach().float(), policy_rejected_logps.detach().float()
    chosen_rewards = beta * (pc - ref_chosen_logps)
    rejected_rewards = beta * (pr - ref_rejected_logps)
    return torch.stack([
        losses.detach().float().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
        (chosen_rewards > rejected_rewards).float().sum(), (chosen_rewards - rejected_rewards).sum(),
        pc.sum(), pr.sum(), (pc > pr).float().sum(), torch.tensor(float(losses.numel()))]).double().cpu()


def finalize(sums) -> dict:
    sums = torch.as_tensor(sums, dtype=torch.float64)
    n = max(float(sums[-1]), 1.0)
    return {name: float(sums[i]) / n for i, name in enumerate(METRICS)}
