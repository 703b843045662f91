"""The reference-based preference losses: pure functions of per-sequence log-probs.

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
(policy and reference) by its first min(|y_w|, |y_l|) tokens + α × the rest (`weighted`) before any loss but
sft; WPO (Zhou et al. 2024) multiplies each pair's loss by `wpo_weights`.
Rewards (metrics) are β·ρ per response, on the log-probs the losses see.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo_ds.config import LOSS_TYPES
from dpo_ds.model.pair import Pair


def weighted(policy: Pair, ref: Pair, ld_alpha: float | None = None) -> tuple[torch.Tensor, ...]:
    """(π_w, π_l, ref_w, ref_l) [B] each: the summed log-probs every loss but sft and the rewards read,
    LD-DPO-weighted when `ld_alpha` is set."""
    return policy.chosen.ld(ld_alpha), policy.rejected.ld(ld_alpha), ref.chosen.ld(ld_alpha), ref.rejected.ld(ld_alpha)


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


class _Args:
    """A loss's arguments: the policy's Pair, the four log-probs of `weighted`, and the settings (`eps` label
    smoothing, `tau` discopop's, `delta` bco's)."""

    def __init__(self, policy: Pair, ref: Pair, beta: float, eps: float, f_divergence: str, f_alpha: float | None,
                 tau: float, delta: float, ld_alpha: float | None):
        self.policy, self.pw, self.pl, self.rw, self.rl = policy, *weighted(policy, ref, ld_alpha)
        self.beta, self.eps, self.f_divergence, self.f_alpha, self.tau, self.delta = \
            beta, eps, f_divergence, f_alpha, tau, delta

    def z(self, per_token: bool = False) -> torch.Tensor:
        """β·h: the pairwise log-ratio through the f-divergence (`per_token`: of length-normalised log-probs)."""
        return self.beta * self.h(per_token)

    def h(self, per_token: bool = False) -> torch.Tensor:
        if not per_token:
            return _h(self.pw, self.pl, self.rw, self.rl, self.f_divergence, self.f_alpha)
        nw, nl = self.policy.chosen.tokens.clamp(min=1), self.policy.rejected.tokens.clamp(min=1)
        return _h(self.pw / nw, self.pl / nl, self.rw / nw, self.rl / nl, self.f_divergence, self.f_alpha)

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ρ_w, ρ_l): each response's log-ratio of policy to reference."""
        return self.pw - self.rw, self.pl - self.rl


def _robust(a: _Args) -> torch.Tensor:
    z = a.z()
    return (-F.logsigmoid(z) * (1 - a.eps) + F.logsigmoid(-z) * a.eps) / (1 - 2 * a.eps)


def _exo_pair(a: _Args) -> torch.Tensor:
    z, eps = a.z(), a.eps
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + \
        torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _discopop(a: _Args) -> torch.Tensor:  # m·exp(-z) as exp(-z + log m): finite where exp(-z) alone overflows
    z = a.z()
    m = torch.sigmoid(z / a.tau)
    return (1 - m) * -F.logsigmoid(z) + torch.exp(-z + F.logsigmoid(z / a.tau))


def _nca_pair(a: _Args) -> torch.Tensor:
    (rw, rl), beta = a.ratios(), a.beta
    return -F.logsigmoid(beta * rw) - 0.5 * F.logsigmoid(-beta * rw) - 0.5 * F.logsigmoid(-beta * rl)


def _bco_pair(a: _Args) -> torch.Tensor:
    (rw, rl), beta = a.ratios(), a.beta
    return -F.logsigmoid(beta * rw - a.delta) - F.logsigmoid(-(beta * rl - a.delta))


def _sppo_hard(a: _Args) -> torch.Tensor:
    (rw, rl), beta = a.ratios(), a.beta
    return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2


def _aot(a: _Args) -> torch.Tensor:
    policy, ref = a.pw - a.pl, a.rw - a.rl
    return _smoothed_sigmoid(a.beta * (policy.sort().values - ref.sort().values), a.eps)


def _aot_unpaired(a: _Args) -> torch.Tensor:
    rw, rl = a.ratios()
    return _smoothed_sigmoid(a.beta * (rw.sort().values - rl.sort().values), a.eps)


def _apo_zero(a: _Args) -> torch.Tensor:
    (rw, rl), beta = a.ratios(), a.beta
    return 1 - torch.sigmoid(beta * rw) + torch.sigmoid(beta * rl)


def _apo_down(a: _Args) -> torch.Tensor:
    (rw, rl), beta = a.ratios(), a.beta
    return torch.sigmoid(beta * rw) + 1 - torch.sigmoid(beta * (rw - rl))


# every loss of the module docstring by name, in the order of dpo_ds.config.LOSSES (which says what each reads)
LOSS_FUNCTIONS = {
    "sigmoid": lambda a: _smoothed_sigmoid(a.z(), a.eps),
    "robust": _robust,
    "hinge": lambda a: torch.relu(1 - a.z()),
    "ipo": lambda a: (a.h(per_token=True) - 1 / (2 * a.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": lambda a: _smoothed_sigmoid(a.z(per_token=True), a.eps),
    "sft": lambda a: -a.policy.chosen.logps / a.policy.chosen.tokens.clamp(min=1),
}
assert tuple(LOSS_FUNCTIONS) == LOSS_TYPES, "dpo_ds.config.LOSSES and this module name the same losses, in one order"


def pair_loss(loss_type: str, policy: Pair, ref: Pair, beta: float, label_smoothing: float = 0.0,
              f_divergence: str = "reverse_kl", f_alpha: float | None = None, discopop_tau: float = 0.05,
              bco_delta: float = 0.0, ld_alpha: float | None = None) -> torch.Tensor:
    """One loss of the family (module docstring) of the policy's and the reference's Pairs (on one device; the
    token counts are the policy's) -> per-pair losses [B]."""
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return LOSS_FUNCTIONS[loss_type](_Args(policy, ref, beta, label_smoothing, f_divergence, f_alpha, discopop_tau,
                                           bco_delta, ld_alpha))


def preference_losses(policy: Pair, ref: Pair, cfg, bco_delta: float = 0.0, weights: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Per-pair losses [B] of a LossConfig: Σ_k weight_k · loss_k, times the WPO `weights` when given."""
    total = sum(w * pair_loss(t, policy, ref, cfg.beta, cfg.label_smoothing, cfg.f_divergence, cfg.f_alpha,
                              cfg.discopop_tau, bco_delta, cfg.ld_alpha)
                for t, w in zip(cfg.loss_type, cfg.weights()))
    return total if weights is None else total * weights
