"""Metrics out: OUT/metrics.jsonl (one JSON object per line), mirrored to the --report_to trackers."""
from __future__ import annotations

import json
import math
import os
import sys

from dpo_ds.errors import UserError
from dpo_ds.storage.files import atomic_write


def format_metrics(metrics: dict) -> str:
    """One console line: `name value` for every finite float."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))


class MetricsLog:
    """Rank 0's writer: OUT/metrics.jsonl and the --report_to trackers (dpo_ds/report/trackers.py). On resume from
    step S, lines past S (written after that checkpoint by the run that died) are dropped, so the file reads as
    one uninterrupted run."""

    def __init__(self, out_dir: str, resume_step: int = 0, trackers: tuple = ()):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # a crash leaves the old file
        self.trackers = trackers

    def write(self, step: int, split: str, metrics: dict) -> None:
        row = {"step": step, "split": split, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.trackers = [t for t in self.trackers if self._ok(t, "log", lambda: t.log(step, split, metrics))]

    def close(self) -> None:
        for tracker in self.trackers:
            self._ok(tracker, "close", tracker.close)

    @staticmethod
    def _ok(tracker, what: str, call) -> bool:
        """A tracker that fails mid-run (a server gone) is dropped with one warning: training and
        metrics.jsonl go on."""
        try:
            call()
            return True
        except Exception as e:  # noqa: BLE001 - the tracker's own error, whatever it is
            print(f"warning: --report_to {type(tracker).__name__.lower()} failed to {what} ({type(e).__name__}: "
                  f"{str(e).strip()[:200]}); it gets no more rows, metrics.jsonl has them all", file=sys.stderr)
            return False


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A last line without its newline is an append cut short (a kill or a full
    disk mid-write): it is dropped, and the next MetricsLog rewrites the file without it. A broken line
    anywhere else is refused with its number."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # after the last newline
                break
            raise UserError(f"{path} line {n}: not a JSON metrics row (edited by hand?); remove that line") from None
    return rows


def eval_at(path: str, step: int) -> dict:
    """The metrics of the eval line logged at `step` in the metrics.jsonl at `path` (the last one), {} if none."""
    evals = [r for r in read_metrics(path) if r["split"] == "eval" and r["step"] == step]
    return {k: v for k, v in evals[-1].items() if k not in ("step", "split")} if evals else {}


def open_log(cfg, start: int) -> MetricsLog | None:
    """A training run's metrics.jsonl and --report_to trackers (`cfg`: its TrainConfig), on rank 0 (None elsewhere);
    a tracker that fails to start stops every rank."""
    from dpo_ds import dist  # here, not above: `dpo-ds report` reads metrics without torch
    from dpo_ds.config import to_dict
    from dpo_ds.report import trackers

    opened = []
    dist.on_main(lambda: opened.append(MetricsLog(cfg.output_dir, start, trackers.open_all(
        trackers.chosen(cfg.report_to), cfg.output_dir, cfg.run_name, to_dict(cfg), start))))
    return opened[0] if opened else None
