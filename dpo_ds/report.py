"""Metrics out: OUT/metrics.jsonl (one JSON object per line), the --report_to trackers, and OUT/report.png.

    python -m dpo_ds.report OUT          # (re)draw OUT/report.png from OUT/metrics.jsonl
"""
from __future__ import annotations

import json
import math
import os
import sys

from dpo_ds.errors import UserError
from dpo_ds.files import atomic_write


def format_metrics(metrics: dict) -> str:
    """One console line: `name value` for every finite float."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))


class MetricsLog:
    """Rank 0's writer: OUT/metrics.jsonl and the --report_to trackers (dpo_ds/trackers.py). On resume from
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


# (metrics drawn together, title): train and eval on the same axes
PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy (ties count 0)"),
          ("rewards/margins", "reward margin"),
          (("rewards/chosen", "rewards/rejected"), "rewards β·log π/π_ref"),
          (("logps/chosen", "logps/rejected"), "log-probs (chosen falling while margins grow: reward hacking)"),
          ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("entropy", "next-token entropy"),
          ("mean_token_accuracy", "token accuracy (chosen)"))


def run_title(out_dir: str) -> str:
    """The run's name, its model and loss, from OUT/config.json when there is one."""
    name = os.path.basename(os.path.abspath(out_dir))
    try:
        train = json.load(open(os.path.join(out_dir, "config.json")))["train"]
    except (OSError, ValueError, KeyError):
        return f"DPO run {name}"
    model = os.path.basename(os.path.normpath(train["model"]))
    losses = "+".join(train.get("loss_type") or ["sigmoid"])
    return f"DPO run {train.get('run_name') or name}: {model}, loss {losses}, β {train.get('beta')}"


def plot(out_dir: str) -> str:
    """OUT/report.png from OUT/metrics.jsonl: every panel of PANELS, train as lines and eval as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    fig, axes = plt.subplots(3, 3, figsize=(15, 10.5))
    for ax, (keys, title) in zip(axes.flat, PANELS):
        for color, key in enumerate(keys if isinstance(keys, tuple) else (keys,)):  # a colour per metric
            for split, style, size in (("train", ".-", 3), ("eval", "o--", 5)):
                pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{color}", alpha=1.0 if split == "eval" else 0.8,
                            label=f"{split} {key.split('/')[-1]}", markersize=size)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{run_title(out_dir)}   (train: lines, eval: dots)")
    # fixed margins: tight_layout would draw the figure twice (1.2 s of the 1.8 s a report costs here)
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.05, top=0.93, wspace=0.22, hspace=0.32)
    path = os.path.join(out_dir, "report.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "metrics.jsonl")):
        raise SystemExit("usage: python -m dpo_ds.report RUN_DIR   (a directory with metrics.jsonl)")
    print(plot(argv[0]))


if __name__ == "__main__":
    main()
