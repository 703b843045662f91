"""The reference-based preference losses and their metrics: pure functions of per-sequence log-probs.

With ρ_w = log π(y_w) - log π_ref(y_w), ρ_l likewise, and h = f'-difference of (ρ_w, ρ_l) (`f_difference`;
ρ_w - ρ_l for DPO's reverse KL), each loss per pair (ε: --label_smoothing, σ: sigmoid):

    sigmoid       DPO (Rafailov et al. 2023, eq. 7); ε > 0 = conservative DPO:
                  -(1-ε) log σ(βh) - ε log σ(-βh)
    robust        rDPO (Chowdhury et al. 2024, eq. 9): [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)
    hinge         SLiC (Zhao et al. 2023): max(0, 1 - βh)
    ipo           IPO (Azar et al. 2023, eq. 17): (h̄ - 1/(2β))², h̄ from per-token (length-normalised) log-probs
    exo_pair      EXO (Ji et al. 2024), K = 2: KL(softmax(βρ) || (1-ε, ε)) =
                  σ(βh)(log σ(βh) - log(1-ε)) + σ(-βh)(log σ(-βh) - log ε)
    nca_pair      NCA (Chen et al. 2024): -log σ(βρ_w) - ½ log σ(-βρ_w) - ½ log σ(-βρ_l)
    bco_pair      BCO (Jung et al. 2024): -log σ(βρ_w - δ) - log σ(-(βρ_l - δ)), δ the running mean reward
    sppo_hard     SPPO (Wu et al. 2024), hard labels: (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²
    aot           AOT (Melnyk et al. 2024), paired: Δ = sort(log π(y_w) - log π(y_l)) - sort(ref likewise);
                  DPO's smoothed sigmoid loss of βΔ. Sorted within the micro-batch.
    aot_unpaired  AOT, unpaired: Δ = sort(ρ_w) - sort(ρ_l), same loss. Sorted within the micro-batch.
    apo_zero      APO (D'Oosterlinck et al. 2024): 1 - σ(βρ_w) + σ(βρ_l)
    apo_down      APO: σ(βρ_w) + 1 - σ(β(ρ_w - ρ_l))
    discopop      DiscoPOP / LRML (Lu et al. 2024): with x = βh, m = σ(x/τ):
                  (1-m)·(-log σ(x)) + m·exp(-x)
    sigmoid_norm  DPO on length-normalised log-probs (open-instruct's dpo_norm): sigmoid with h̄
    sft           NLL of the chosen response per token: -log π(y_w) / |y_w| (with sigmoid: RPO,
                  Pang et al. 2024)

Several losses are summed per pair with their weights. LD-DPO (Liu et al. 2024) replaces every log-prob
(policy and reference) by its first min(|y_w|, |y_l|) tokens + α × the rest (`ld_logps`) before any loss but
sft; WPO (Zhou et al. 2024) multiplies each pair's loss by `wpo_weights`.
Rewards (metrics) are β·ρ per response, on the log-probs the losses see.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_ds import dist

PAIRED = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm")  # functions of h


class LossInputs(NamedTuple):
    """Per pair [B]: summed response log-probs of policy and reference (LD-weighted when LD-DPO is on), the
    response token counts, and the chosen response's raw summed log-prob (for sft)."""
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    policy_chosen_raw_logps: torch.Tensor


def ld_logps(logps: torch.Tensor, shared_logps: torch.Tensor | None, alpha: float | None) -> torch.Tensor:
    """LD-DPO: the log-prob of the first min(|y_w|, |y_l|) tokens plus α times the rest; α None = plain."""
    return logps if alpha is None else shared_logps + alpha * (logps - shared_logps)


def wpo_weights(chosen_wpo: torch.Tensor, rejected_wpo: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 6): w(y) = exp(mean over y's tokens of log p(y_t) - log Σ_v p(v)²); a pair's
    weight is w(y_w)·w(y_l). Inputs are those per-response means [B], from the policy without gradient."""
    return torch.exp(chosen_wpo + rejected_wpo).detach()


def _capped_exp(x: torch.Tensor) -> torch.Tensor:
    """exp without overflow to inf: the exponent is capped one below log(max) of its dtype (log(max) itself
    rounds up in float32, and its exp is inf)."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max) - 1))


def f_difference(chosen_logratios, rejected_logratios, f_divergence: str = "reverse_kl",
                 f_alpha: float | None = None) -> torch.Tensor:
    """f'(u_w) - f'(u_l) with u = π/π_ref = exp(ρ) (Wang et al. 2023, "Beyond Reverse KL", Table 1), constants
    dropped: reverse KL f'(u) = log u + 1; forward KL f'(u) = -1/u; JS f'(u) = log(2u / (1 + u));
    α-divergence f'(u) = (1 - u^-α)/α."""
    rw, rl = chosen_logratios, rejected_logratios
    if f_divergence == "reverse_kl":
        return rw - rl
    if f_divergence == "forward_kl":
        return _capped_exp(-rl) - _capped_exp(-rw)
    if f_divergence == "js_divergence":
        return (rw - rl) - (F.softplus(rw) - F.softplus(rl))
    if f_divergence == "alpha_divergence":
        return (_capped_exp(-f_alpha * rl) - _capped_exp(-f_alpha * rw)) / f_alpha
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def _h(pw, pl, rw, rl, f_divergence: str, f_alpha: float | None) -> torch.Tensor:
    """The pairwise log-ratio. DPO's is summed as (π_w - π_l) - (ref_w - ref_l), as the DPO code and TRL sum it
    (and as dpo_ds did before the other divergences): another association changes the last bit, which a
    training run amplifies."""
    if f_divergence == "reverse_kl":
        return (pw - pl) - (rw - rl)
    return f_difference(pw - rw, pl - rl, f_divergence, f_alpha)


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def pair_loss(loss_type: str, x: LossInputs, beta: float, label_smoothing: float = 0.0,
              f_divergence: str = "reverse_kl", f_alpha: float | None = None, discopop_tau: float = 0.05,
              bco_delta: float = 0.0) -> torch.Tensor:
    """One loss of the family (module docstring) -> per-pair losses [B]."""
    eps = label_smoothing
    rw, rl = x.policy_chosen_logps - x.ref_chosen_logps, x.policy_rejected_logps - x.ref_rejected_logps
    if loss_type in ("ipo", "sigmoid_norm"):  # the log-ratios per token
        nw, nl = x.chosen_tokens.clamp(min=1), x.rejected_tokens.clamp(min=1)
        h = _h(x.policy_chosen_logps / nw, x.policy_rejected_logps / nl, x.ref_chosen_logps / nw,
               x.ref_rejected_logps / nl, f_divergence, f_alpha)
        return (h - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else _smoothed_sigmoid(beta * h, eps)
    if loss_type in PAIRED:
        z = beta * _h(x.policy_chosen_logps, x.policy_rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps,
                      f_divergence, f_alpha)
        if loss_type == "sigmoid":
            return _smoothed_sigmoid(z, eps)
        if loss_type == "robust":
            return (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)
        if loss_type == "hinge":
            return torch.relu(1 - z)
        if loss_type == "exo_pair":
            return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + \
                torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
        if loss_type == "discopop":  # m·exp(-z) as exp(-z + log m): finite where exp(-z) alone overflows
            m = torch.sigmoid(z / discopop_tau)
            return (1 - m) * -F.logsigmoid(z) + torch.exp(-z + F.logsigmoid(z / discopop_tau))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * rw) - 0.5 * F.logsigmoid(-beta * rw) - 0.5 * F.logsigmoid(-beta * rl)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * rw - bco_delta) - F.logsigmoid(-(beta * rl - bco_delta))
    if loss_type == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if loss_type == "aot":
        policy, ref = x.policy_chosen_logps - x.policy_rejected_logps, x.ref_chosen_logps - x.ref_rejected_logps
        return _smoothed_sigmoid(beta * (policy.sort().values - ref.sort().values), eps)
    if loss_type == "aot_unpaired":
        return _smoothed_sigmoid(beta * (rw.sort().values - rl.sort().values), eps)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * rw) + torch.sigmoid(beta * rl)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rw) + 1 - torch.sigmoid(beta * (rw - rl))
    if loss_type == "sft":
        return -x.policy_chosen_raw_logps / x.chosen_tokens.clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def preference_losses(x: LossInputs, cfg, bco_delta: float = 0.0, weights: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Per-pair losses [B] of a LossConfig: Σ_k weight_k · loss_k, times the WPO `weights` when given."""
    total = sum(w * pair_loss(t, x, cfg.beta, cfg.label_smoothing, cfg.f_divergence, cfg.f_alpha,
                              cfg.discopop_tau, bco_delta)
                for t, w in zip(cfg.loss_type, cfg.weights()))
    return total if weights is None else total * weights


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None
             ) -> torch.Tensor:
    """One loss from its four [B] log-probs (token counts for the normalised ones) -> per-pair losses [B]."""
    if chosen_tokens is None:
        if loss_type in ("ipo", "sigmoid_norm", "sft"):
            raise ValueError(f"{loss_type} needs chosen_tokens and rejected_tokens to length-normalise")
        chosen_tokens = rejected_tokens = torch.ones_like(policy_chosen_logps)
    x = LossInputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_tokens, rejected_tokens, policy_chosen_logps)
    return pair_loss(loss_type, x, beta, label_smoothing)


# A reward margin within this fraction of β·(|π_w| + |π_l| + |ref_w| + |ref_l|) is a tie, not a win: fp32 sums of
# log-probs carry rounding of a few 2^-24 of their size, and layouts and batchings round differently (the SFT
# model against its own cache has margins of ±1e-7 that would otherwise count as wins half the time).
TIE_RELATIVE = 2.0 ** -20


def wins(x: LossInputs, beta: float) -> torch.Tensor:
    """[B] bool: the pair's reward margin exceeds its rounding noise (TIE_RELATIVE)."""
    chosen, rejected = x.policy_chosen_logps.detach(), x.policy_rejected_logps.detach()
    margin = beta * ((chosen - x.ref_chosen_logps) - (rejected - x.ref_rejected_logps)).double()
    size = (chosen.abs() + rejected.abs() + x.ref_chosen_logps.abs() + x.ref_rejected_logps.abs()).double()
    return margin > TIE_RELATIVE * beta * size


PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logps/win_rate")
# metric -> the token count it is averaged over (dpo_ds.logps computes the sums inside the chunked head)
TOKEN_METRICS = {"entropy": "response_tokens", "mean_token_accuracy": "chosen_tokens",
                 "logits/chosen": "chosen_tokens", "logits/rejected": "rejected_tokens"}
METRICS = PAIR_METRICS + tuple(TOKEN_METRICS)


class MetricSums:
    """Metrics summed over micro-batches and ranks: `add` a batch, `all_reduce` across ranks, `mean` per pair
    (PAIR_METRICS) or per token (TOKEN_METRICS). Names as in TRL, plus the counts `pairs`, `tokens` (computed
    positions, the throughput figure) and the response token counts. Every rank holds the same names in the
    same order, so an all-reduce lines them up."""

    NAMES = METRICS + ("pairs", "tokens", "chosen_tokens", "rejected_tokens", "response_tokens")

    def __init__(self, values=None):
        if isinstance(values, list) and len(values) == len(PAIR_METRICS) + 2:  # saved before the token metrics
            values = dict(zip(PAIR_METRICS + ("pairs", "tokens"), values))
        if isinstance(values, dict):  # a saved window: names missing from it (an older version) count 0
            values = [values.get(name, 0.0) for name in self.NAMES]
        self.values = torch.zeros(len(self.NAMES), dtype=torch.float64) if values is None else \
            torch.as_tensor(values, dtype=torch.float64).clone()

    @classmethod
    def of_batch(cls, losses, x: LossInputs, policy, beta: float, tokens: int = 0) -> "MetricSums":
        """`x` the loss inputs, `policy` the batch's dpo_ds.logps.PairLogps (raw sums and head statistics)."""
        chosen_rewards = beta * (x.policy_chosen_logps.detach() - x.ref_chosen_logps).double()
        rejected_rewards = beta * (x.policy_rejected_logps.detach() - x.ref_rejected_logps).double()
        chosen, rejected = policy.chosen_logps.detach(), policy.rejected_logps.detach()
        cs, rs = policy.chosen_stats, policy.rejected_stats
        named = {
            "loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": wins(x, beta).sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(),
            "logps/win_rate": (chosen > rejected).sum(),
            "entropy": cs.entropy.sum() + rs.entropy.sum(),
            "mean_token_accuracy": cs.top1.sum(),
            "logits/chosen": cs.mean_logit.sum(),
            "logits/rejected": rs.mean_logit.sum(),
            "pairs": losses.numel(),
            "tokens": tokens,
            "chosen_tokens": policy.chosen_tokens.sum(),
            "rejected_tokens": policy.rejected_tokens.sum(),
            "response_tokens": policy.chosen_tokens.sum() + policy.rejected_tokens.sum(),
        }
        # the head's statistics arrive attached to the graph (computed in the chunk's forward): detached here
        return cls([float(v.detach()) if torch.is_tensor(v) else float(v) for v in map(named.get, cls.NAMES)])

    def __add__(self, other: "MetricSums") -> "MetricSums":
        return MetricSums(self.values + other.values)

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.NAMES.index(name)])

    def as_dict(self) -> dict:
        return {name: float(v) for name, v in zip(self.NAMES, self.values)}

    def all_reduce(self) -> "MetricSums":
        """Summed over the data-parallel ranks (a sequence-parallel group's pairs counted once)."""
        return MetricSums(dist.all_reduce_data(self.values))

    def mean(self) -> dict:
        """{metric: mean} for every name in METRICS: per pair, or per token of its count."""
        n = max(self["pairs"], 1.0)
        means = {name: self[name] / n for name in PAIR_METRICS}
        means.update({name: self[name] / max(self[count], 1.0) for name, count in TOKEN_METRICS.items()})
        return means
