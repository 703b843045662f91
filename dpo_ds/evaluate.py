"""DPO metrics of any saved model on a prepared split, against the cached reference.

    python -m dpo_ds.evaluate --model MODEL_DIR --data PREPARED_DIR --ref_cache CACHE_DIR [--split eval] [--output FILE.json]

`logps/win_rate` (the model's own log-prob prefers chosen) needs no reference, so it is meaningful for the
SFT model too, whose implicit rewards against itself are zero by definition.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from dpo_ds import config as C, dist, engine as E
from dpo_ds.batching import collate, dummy_batch, pad_and_eos, pair_lengths, take
from dpo_ds.data import load_split, load_tokenizer, read_report
from dpo_ds.errors import UserError
from dpo_ds.fingerprint import tokenizer_fingerprint
from dpo_ds.logps import pair_logps
from dpo_ds.loss import MetricSums
from dpo_ds.ref_cache import open_cache
from dpo_ds.step import batch_losses


@torch.no_grad()
def evaluate(logps_fn, ds, loss_cfg: C.LossConfig, batch_size: int, pad_id: int, eos_id: int) -> dict:
    """Metrics over the whole split `ds` (with ref columns), its pairs dealt across ranks by length; under
    ZeRO-3 (E.is_collective) ranks with fewer batches run dummy ones to stay in step."""
    order = np.argsort(-pair_lengths(ds), kind="stable")[dist.rank()::dist.world_size()]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sums = MetricSums()
    bar = tqdm(total=len(batches), desc="eval (rank 0)", unit="batch", disable=not dist.is_main(), leave=False,
               mininterval=2.0)
    for rows in dist.even(batches, E.is_collective(logps_fn)):
        if rows is None:
            pair_logps(logps_fn, dummy_batch(pad_id, eos_id))
            continue
        sums = sums + batch_losses(logps_fn, collate(take(ds, rows), pad_id), loss_cfg)[1]
        bar.update(1)
    bar.close()
    return sums.all_reduce().mean()


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))


def run(cfg: C.EvalConfig) -> dict:
    dist.init()
    E.check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != read_report(cfg.data)["tokenizer_fingerprint"]:
        raise UserError(f"--model {cfg.model} has another tokenizer than --data {cfg.data} was prepared with")
    # the evaluated model need not be the reference (a trained policy is not): no model check here
    dist.on_main(lambda: open_cache(cfg.ref_cache, cfg.data, splits=[cfg.split]) and None)
    cache = open_cache(cfg.ref_cache, cfg.data, splits=[cfg.split], verify=False)
    ds = cache.attach(load_split(cfg.data, cfg.split), cfg.split)
    logps_fn = E.inference_logps(cfg, E.resolve_dtype(cfg.dtype))
    metrics = {"split": cfg.split, "model": cfg.model, "examples": len(ds),
               **evaluate(logps_fn, ds, cfg, cfg.batch_size, *pad_and_eos(tokenizer))}
    if dist.is_main():
        print(f"evaluate {cfg.model} on {cfg.split} ({len(ds)} pairs): {format_metrics(metrics)}")
        if cfg.output:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
            with open(cfg.output, "w") as f:
                json.dump(metrics, f, indent=2)
    dist.barrier()
    return metrics


def main(argv=None):
    C.main_guard(lambda: run(C.parse(C.EvalConfig, argv, prog="python -m dpo_ds.evaluate", doc=__doc__)))


if __name__ == "__main__":
    main()
