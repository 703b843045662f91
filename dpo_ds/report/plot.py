"""OUT/report.png: the run's metrics drawn from OUT/metrics.jsonl.

    dpo-ds report OUT               # (re)draw OUT/report.png
    python -m dpo_ds.report OUT
"""
from __future__ import annotations

import json
import os
import sys

from dpo_ds.report.log import read_metrics

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
        raise SystemExit("usage: dpo-ds report RUN_DIR   (a directory with metrics.jsonl)")
    print(plot(argv[0]))
