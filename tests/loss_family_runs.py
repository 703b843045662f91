"""Short ZeRO-3 trainings of one loss configuration after another in one launch (tests/test_loss_family.py):
for each, the train split's loss of that configuration before and after 3 steps. Rank 0 writes the results.
    deepspeed --num_gpus 2 --module tests.loss_family_runs --model M --data D --ref_cache C --out DIR --runs RUNS.json
"""
import argparse
import json
import os

from dpo_ds import config as C
from dpo_ds import dist, evaluate, train
from dpo_ds.report.log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    for name in ("--model", "--data", "--ref_cache", "--out", "--runs"):
        p.add_argument(name, required=True)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    runs = json.load(open(a.runs))
    results = {}
    for name, loss in runs.items():
        out = os.path.join(a.out, name.replace(" ", "_"))
        cfg = C.TrainConfig(model=a.model, data=a.data, ref_cache=a.ref_cache, output_dir=out,
                            deepspeed=os.path.join(ROOT, "ds_configs", "zero3_cpu.json"), learning_rate=a.learning_rate,
                            lr_schedule="constant", warmup_steps=0, max_steps=3, micro_batch_size=2, grad_accum=2,
                            log_every=5, eval_every=0, save_every=0, report_to=["none"], **loss)
        cfg.check()
        train.run(cfg)
        last = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"][-1]
        delta = last.get("bco/delta", 0.0)  # bco_pair: both sides scored at the trained run's δ
        scores = {}
        # WPO's weights come from the policy itself and grow as it grows surer: the loss it descends is the
        # weighted one at each step's weights, so compare the loss it weights
        scored = {**loss, "use_weighting": False}
        for when, model in (("before", a.model), ("after", os.path.join(out, "final"))):
            ecfg = C.EvalConfig(model=model, data=a.data, ref_cache=a.ref_cache, split="train", batch_size=8,
                                bco_delta=delta, **scored)
            ecfg.check()
            scores[when] = evaluate.run(ecfg)["loss"]
        results[name] = {**scores, "train_loss": last["loss"], "bco_delta": delta}
    if dist.is_main():
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
