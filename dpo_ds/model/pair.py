"""The one type for a batch's log-probs, policy or reference alike, from the head to the loss:

    Logps    per sequence: summed response log-probs, token counts, the sums over LD-DPO's shared length,
             and the head's statistics (the last three None where a source has none)
    Pair     Logps of the chosen and of the rejected responses, [B] each

The policy's forward scores the 2B sequences of a batch at once (one Logps) and `Pair.split` cuts it; the cache
gives the reference's as a Pair directly. The losses read two Pairs (dpo_ds.objective.loss).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class HeadStats(NamedTuple):
    """Per-sequence sums over its response tokens of what the head sees besides log p(target), without
    gradient: entropy of the next-token distribution, top-1 == target, the mean logit (over the vocabulary),
    and WPO's log p(target) - log Σ_v p(v)²."""
    entropy: torch.Tensor
    top1: torch.Tensor
    mean_logit: torch.Tensor
    wpo: torch.Tensor


def _map(fn, value):
    """`fn` on a tensor, on each tensor of a HeadStats; None stays None."""
    if value is None:
        return None
    return HeadStats(*map(fn, value)) if isinstance(value, HeadStats) else fn(value)


class Logps(NamedTuple):
    """Per sequence [S]: summed response log-probs, scored tokens (None where unknown, as in the cache's
    reference), the log-probs summed over the tokens marked `shared` (LD-DPO's min(|y_w|, |y_l|); None unless
    computed), and HeadStats (None unless asked for)."""
    logps: torch.Tensor
    tokens: torch.Tensor | None = None
    shared_logps: torch.Tensor | None = None
    stats: HeadStats | None = None

    def ld(self, alpha: float | None) -> torch.Tensor:
        """LD-DPO (Liu et al. 2024): the log-prob of the shared length plus α times the rest; α None = plain."""
        return self.logps if alpha is None else self.shared_logps + alpha * (self.logps - self.shared_logps)

    def map(self, fn) -> "Logps":
        """`fn` applied to every tensor (a slice, a device move)."""
        return Logps(*(_map(fn, v) for v in self))


class Pair(NamedTuple):
    """A batch's pairs: the chosen and the rejected responses' Logps, [B] each."""
    chosen: Logps
    rejected: Logps

    @classmethod
    def split(cls, scored: Logps, B: int) -> "Pair":
        """The 2B sequences of one forward (chosen first) -> a Pair."""
        return cls(scored.map(lambda t: t[:B]), scored.map(lambda t: t[B:]))

    @classmethod
    def of(cls, chosen_logps, rejected_logps, chosen_tokens=None, rejected_tokens=None) -> "Pair":
        """Summed log-probs (and token counts) only."""
        return cls(Logps(chosen_logps, chosen_tokens), Logps(rejected_logps, rejected_tokens))

    def to(self, device) -> "Pair":
        return Pair(*(side.map(lambda t: t.to(device)) for side in self))
