"""What a checkpoint carries besides the engine's own state: the run's step, token count, bco_pair's reward mean
and the train metrics since the last logged line, each continuing exactly on resume."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from dpo_ds import dist
from dpo_ds.objective.metrics import MetricSums


class RewardMean:
    """bco_pair's δ: the mean reward β·ρ over every response of the steps before this one (all ranks), so a
    step's loss does not depend on how its micro-batches are dealt across ranks or accumulation."""

    def __init__(self, mean: float = 0.0, count: float = 0.0):
        self.mean, self.count = mean, count

    def update(self, step_sums: MetricSums) -> None:
        """`step_sums`: one step's metric sums over every rank."""
        n = 2 * step_sums["pairs"]
        total = step_sums["rewards/chosen"] + step_sums["rewards/rejected"]
        self.mean, self.count = (self.mean * self.count + total) / (self.count + n), self.count + n


class Window:
    """The train metrics summed since the last logged line (each rank its own share). Carried across a
    checkpoint, so a run resumed between two log lines logs the same averages as an uninterrupted one."""

    def __init__(self):
        self.sums, self.t0 = MetricSums(), time.time()

    def add(self, sums: MetricSums) -> None:
        self.sums = self.sums + sums

    def reduce(self) -> tuple[MetricSums, float]:
        """(metric sums over every rank, seconds since the window opened): collective."""
        return self.sums.all_reduce(), time.time() - self.t0

    def state(self) -> dict:
        sums, seconds = self.reduce()
        return {"sums": sums.as_dict(), "seconds": seconds}

    def restore(self, state: dict) -> None:
        if dist.is_main():  # the reduced window lives on rank 0 alone, so the next reduce counts it once
            self.sums, self.t0 = MetricSums(state["sums"]), time.time() - state["seconds"]


@dataclass
class RunState:
    """What a checkpoint carries besides the engine's own state; each field continues exactly on resume."""
    step: int = 0                  # optimizer steps done
    num_tokens: float = 0.0        # tokens trained on, logged as num_tokens
    bco: RewardMean = field(default_factory=RewardMean)  # bco_pair's δ
    window: Window = field(default_factory=Window)       # the train metrics since the last logged line

    def new_window(self) -> None:
        """After a logged train line: the next line's metrics start from nothing."""
        self.window = Window()

    def client_state(self) -> dict:
        """As DeepSpeed saves it beside the engine (collective: the window is summed over the ranks)."""
        return {"step": self.step, "window": self.window.state(), "num_tokens": self.num_tokens,
                "bco_mean": self.bco.mean, "bco_count": self.bco.count}

    @classmethod
    def from_client_state(cls, client: dict) -> "RunState":
        state = cls(client.get("step", 0), client.get("num_tokens", 0.0),
                    RewardMean(client.get("bco_mean", 0.0), client.get("bco_count", 0.0)))
        if "window" in client:
            state.window.restore(client["window"])
        return state
