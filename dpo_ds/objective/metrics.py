"""The metrics of a loss step, named as TRL names them, summed on the device over micro-batches and ranks:
one tensor per batch, crossing to the host only when a line is logged."""
from __future__ import annotations

import math

import torch

from dpo_ds import dist
from dpo_ds.model.pair import Pair
from dpo_ds.objective.loss import weighted

# A reward margin within TIE_RELATIVE[precision] of β·(|π_w| + |π_l| + |ref_w| + |ref_l|) is a tie, not a win: the
# four sums carry their precision's rounding, and layouts and batchings round differently, so the SFT model
# against its own cache has margins of that size that would otherwise count as wins about half the time. Measured
# (tiny model, |margin| / the sum, over both layouts, batch sizes 1-16 and both splits): fp32 2^-23.9 at most,
# fp16 2^-16.5, bf16 2^-13.2 (bf16 against an fp32 cache; 2^-13.9 against its own): each bound is 2^4 = 16 times
# that, or more (tests/test_trust.py: the SFT model scores 0 in each). The coarser precision of the policy's and
# the cache's decides.
TIE_RELATIVE = {"fp32": 2.0 ** -20, "fp16": 2.0 ** -12, "bf16": 2.0 ** -9}


def tie_precision(*precisions: str) -> str:
    """The coarsest of the precisions ("fp32", "fp16", "bf16") a margin was computed in: its noise decides."""
    return max(precisions, key=TIE_RELATIVE.__getitem__)


def tie_rule(policy: str, cache: str) -> str | None:
    """One line: what counts as a tie for a policy computed in `policy` against a cache computed in `cache`;
    None where both are fp32 (the default, said in the README)."""
    which = tie_precision(policy, cache)
    if which == "fp32":
        return None
    return (f"rewards/accuracies: a margin within 2^{round(math.log2(TIE_RELATIVE[which]))} of "
            f"beta*(|log pi_w| + |log pi_l| + |ref_w| + |ref_l|) is a tie, {which}'s rounding (the policy runs in "
            f"{policy}, the cache holds {cache})")


def wins(policy: Pair, ref: Pair, beta: float, ld_alpha: float | None = None, precision: str = "fp32"
         ) -> torch.Tensor:
    """[B] bool: the pair's reward margin exceeds the rounding noise of `precision` (TIE_RELATIVE), the coarsest
    the margin's terms were computed in (tie_precision)."""
    chosen, rejected, ref_chosen, ref_rejected = weighted(policy, ref, ld_alpha)
    chosen, rejected = chosen.detach(), rejected.detach()
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected)).double()
    size = (chosen.abs() + rejected.abs() + ref_chosen.abs() + ref_rejected.abs()).double()
    return margin > TIE_RELATIVE[precision] * beta * size


PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logps/win_rate")
# metric -> the token count it is averaged over (dpo_ds.model.logps computes the sums inside the chunked head)
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
    def of_batch(cls, losses, policy: Pair, ref: Pair, beta: float, ld_alpha: float | None = None, tokens: int = 0,
                 precision: str = "fp32") -> "MetricSums":
        """`policy` (with head statistics) and `ref` the Pairs the losses read, on one device; rewards on the
        log-probs the losses see (`weighted`), logps/ on the raw sums; ties at `precision`'s noise (`wins`)."""
        pw, pl, rw, rl = weighted(policy, ref, ld_alpha)
        chosen_rewards = beta * (pw.detach() - rw).double()
        rejected_rewards = beta * (pl.detach() - rl).double()
        chosen, rejected = policy.chosen.logps.detach(), policy.rejected.logps.detach()
        cs, rs = policy.chosen.stats, policy.rejected.stats
        named = {
            "loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": wins(policy, ref, beta, ld_alpha, precision).sum(),
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
            "chosen_tokens": policy.chosen.tokens.sum(),
            "rejected_tokens": policy.rejected.tokens.sum(),
            "response_tokens": policy.chosen.tokens.sum() + policy.rejected.tokens.sum(),
        }
        # one float64 vector on the batch's device: no value crosses to the host here (a GPU would wait for each);
        # the head's statistics arrive attached to the graph (computed in the chunk's forward): detached here
        device = losses.device
        return cls(torch.stack([v.detach().to(device, torch.float64) if torch.is_tensor(v) else
                                torch.full((), float(v), dtype=torch.float64, device=device)
                                for v in map(named.get, cls.NAMES)]))

    def __add__(self, other: "MetricSums") -> "MetricSums":
        """On `other`'s device (a fresh MetricSums() is on the CPU, a batch's on the model's device)."""
        return MetricSums(self.values.to(other.values.device) + other.values)

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.NAMES.index(name)])

    def as_dict(self) -> dict:
        return dict(zip(self.NAMES, self.values.tolist()))

    def all_reduce(self) -> "MetricSums":
        """Summed over the data-parallel ranks (a sequence-parallel group's pairs counted once)."""
        return MetricSums(dist.all_reduce_data(self.values))

    def mean(self) -> dict:
        """{metric: mean} for every name in METRICS: per pair, or per token of its count."""
        sums = self.as_dict()  # one transfer to the host
        n = max(sums["pairs"], 1.0)
        means = {name: sums[name] / n for name in PAIR_METRICS}
        means.update({name: sums[name] / max(sums[count], 1.0) for name, count in TOKEN_METRICS.items()})
        return means
