#!/usr/bin/env python
"""python scripts/demo_summary.py RUN_DIR: the before/after table of the demo (RUN_DIR/eval_before.json,
RUN_DIR/eval_after.json) printed and written to RUN_DIR/summary.json."""
import json
import os
import sys

KEYS = ("rewards/accuracies", "rewards/margins", "logps/win_rate", "loss")


def main(run_dir):
    sides = {}
    for side in ("before", "after"):
        with open(os.path.join(run_dir, f"eval_{side}.json")) as f:
            sides[side] = {k: v for k, v in json.load(f).items() if k in KEYS or k in ("examples", "model")}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(sides, f, indent=2)
    print(f"\nheld-out split ({sides['after']['examples']} pairs never trained on)")
    print(f"{'metric':<22}{'SFT (before)':>14}{'DPO (after)':>14}")
    for k in KEYS:
        print(f"{k:<22}{sides['before'][k]:>14.3f}{sides['after'][k]:>14.3f}")
    print(f"-> {os.path.join(run_dir, 'summary.json')}")


if __name__ == "__main__":
    main(sys.argv[1])
