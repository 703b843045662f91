"""Phase 1: run the frozen SFT (reference) model once over every prepared split and cache its log-probs.

    deepspeed --num_gpus N --module dpo_ds.precompute --model SFT_DIR --data PREPARED_DIR --output_dir CACHE_DIR \
        [--batch_size 8] [--dtype bf16] [--deepspeed ds_configs/zero3_inference.json]
    python -m dpo_ds.precompute ...            # one plain process (also works under torchrun)

Examples are sorted by length and cut into shards of --shard_size; shard n belongs to rank n % world_size,
so the plan (and every value) does not depend on the number of ranks. Rerunning the same command after a
crash reuses complete shards and computes the rest.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from tqdm import tqdm

from dpo_ds import config as C, dist, engine as E, ref_cache as R
from dpo_ds.batching import collate, dummy_batch, pad_and_eos, pair_lengths, take
from dpo_ds.data import load_split, load_tokenizer, read_report, verify_files
from dpo_ds.errors import UserError
from dpo_ds.fingerprint import tokenizer_fingerprint
from dpo_ds.logps import pair_logps


def shard_plan(ds, shard_size: int) -> list[np.ndarray]:
    """Row indices of each shard: longest pairs first (an out-of-memory shows up at once), ties by position."""
    lengths = pair_lengths(ds)
    order = np.lexsort((np.arange(len(ds)), -lengths))
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def batches_of(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def compute_batch(logps_fn, batch: dict) -> dict:
    """Reference values of one collated batch: chosen and rejected in one forward."""
    values = pair_logps(logps_fn, batch)
    names = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")
    return {"example_id": batch["example_id"].numpy(), **{k: v.cpu().numpy() for k, v in zip(names, values)}}


def run_split(logps_fn, cfg, cache_dir: str, split: str, ds, pad_id: int, eos_id: int, stats: dict) -> int:
    """Compute this rank's missing shards of one split; returns the split's shard count."""
    shards = shard_plan(ds, cfg.shard_size)
    done = dist.on_main(lambda: R.complete_shards(cache_dir, split))  # one rank hashes what is on disk
    mine = [n for n in range(len(shards)) if n % dist.world_size() == dist.rank() and n not in done]
    work = [(n, rows) for n in mine for rows in batches_of(shards[n], cfg.batch_size)]
    bar = tqdm(total=sum(len(shards[n]) for n in mine), desc=f"precompute {split} (rank 0)", unit="ex",
               disable=not dist.is_main(), mininterval=2.0)
    parts = {}
    for item in dist.even(work, E.is_collective(logps_fn)):
        if item is None:
            compute_batch(logps_fn, dummy_batch(pad_id, eos_id))
            continue
        n, rows = item
        if n not in parts:
            R.remove_partial_shard(cache_dir, split, n)  # e.g. renamed but unrecorded when the last run died
            parts[n] = []
        batch = collate(take(ds, rows), pad_id)
        parts[n].append(compute_batch(logps_fn, batch))
        stats["tokens"] += int(batch["attention_mask"].sum())
        stats["slots"] += batch["attention_mask"].numel()
        stats["examples"] += len(rows)
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{stats['tokens'] / max(1e-9, time.time() - stats['start']):.0f}")
        if sum(len(p["example_id"]) for p in parts[n]) == len(shards[n]):
            save_shard(cache_dir, split, n, parts.pop(n))
    bar.close()
    return len(shards)


def save_shard(cache_dir: str, split: str, n: int, parts: list) -> None:
    """One shard's batches as one Arrow shard, after checking every value is finite."""
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    bad = ~np.isfinite(columns["ref_chosen_logps"]) | ~np.isfinite(columns["ref_rejected_logps"])
    if bad.any():
        raise UserError(f"the reference model gave non-finite log-probs for example_ids "
                        f"{columns['example_id'][bad][:5].tolist()} ({split}); try --dtype fp32/bf16 "
                        f"(fp16 overflows) or check the model's weights")
    R.write_shard(cache_dir, split, dist.rank(), n, columns)


def check_inputs(cfg: C.PrecomputeConfig, tokenizer, splits: list, dtype_name: str) -> dict:
    """The fingerprint of this computation, after checking the data on disk is what its report says and was
    tokenized by the model's tokenizer. Hashes every weight file and prepared split: run on one rank."""
    report = read_report(cfg.data)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if tok_fp != report["tokenizer_fingerprint"]:
        raise UserError(f"--data {cfg.data} was prepared with a different tokenizer ({report['tokenizer']}) than "
                        f"--model {cfg.model}'s; prepare it again with --tokenizer {cfg.model}")
    unknown = sorted(set(splits) - set(report["counts"]))
    if unknown:
        raise UserError(f"--splits {' '.join(unknown)}: not in --data {cfg.data} (prepared splits: "
                        f"{', '.join(report['counts'])})")
    verify_files(cfg.data, report, splits)
    return R.fingerprint(cfg.model, tok_fp, report, dtype_name)


def run(cfg: C.PrecomputeConfig) -> dict | None:
    dist.init()
    E.check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    dtype = E.resolve_dtype(cfg.dtype)
    requested = cfg.splits or list(read_report(cfg.data)["counts"])
    fp = dist.on_main(lambda: check_inputs(cfg, tokenizer, requested, E.dtype_name(dtype)))
    state, splits = R.start(cfg.output_dir, fp, requested)
    dist.barrier()  # every rank has read the directory before rank 0 writes into it
    if state == "complete":
        dist.print0(f"{cfg.output_dir}: already complete for this model and data; verify with "
                    f"`python -m dpo_ds.ref_cache verify {cfg.output_dir} --data {cfg.data}`")
        return None
    if state == "resume":
        planned = R.read_json(os.path.join(cfg.output_dir, R.PLAN))["shard_size"]
        if planned != cfg.shard_size:
            raise UserError(f"{cfg.output_dir} was started with --shard_size {planned}; resume it with the same "
                            f"value (its complete shards hold those examples)")
    if dist.is_main():
        R.write_plan(cfg.output_dir, fp, {"shard_size": cfg.shard_size, "batch_size": cfg.batch_size,
                                          "split_names": splits})
    dist.barrier()
    datasets_ = {s: load_split(cfg.data, s) for s in splits}
    dist.print0(f"precompute: {'resuming' if state == 'resume' else 'starting'} {cfg.output_dir} "
                f"({', '.join(splits)}; {dist.world_size()} rank(s), {dtype}, "
                f"{'ZeRO-3 ' + cfg.deepspeed if cfg.deepspeed else 'full copy per rank'})")

    logps_fn = E.inference_logps(cfg, dtype)
    stats = {"tokens": 0, "slots": 0, "examples": 0, "start": time.time()}
    n_shards = {s: run_split(logps_fn, cfg, cfg.output_dir, s, datasets_[s], *pad_and_eos(tokenizer), stats)
                for s in splits}
    elapsed = time.time() - stats["start"]
    tokens, slots, examples = dist.all_reduce([stats["tokens"], stats["slots"], stats["examples"]]).tolist()
    elapsed = float(dist.all_reduce([elapsed], op="max")[0])
    dist.barrier()  # every shard is in place before the manifest lists them
    manifest = None
    if dist.is_main():
        run_stats = {"world_size": dist.world_size(), "seconds": elapsed, "examples": int(examples),
                     "tokens": int(tokens), "tokens_per_s": tokens / max(elapsed, 1e-9),
                     "examples_per_s": examples / max(elapsed, 1e-9),
                     "padding_fraction": 1 - tokens / slots if slots else 0.0,
                     "resumed": state == "resume"}
        manifest = R.write_manifest(cfg.output_dir, fp, n_shards, run_stats)
        print(f"precompute: wrote {cfg.output_dir}/manifest.json: "
              f"{ {s: e['rows'] for s, e in manifest['splits'].items()} } examples, "
              f"{run_stats['tokens_per_s']:.0f} tokens/s, padding {100 * run_stats['padding_fraction']:.1f}%")
    dist.barrier()
    return manifest


def main(argv=None):
    C.main_guard(lambda: run(C.parse(C.PrecomputeConfig, argv, prog="python -m dpo_ds.precompute", doc=__doc__)))


if __name__ == "__main__":
    main()
