"""Phase 1: run the frozen SFT (reference) model once over every prepared split and cache its log-probs.

    deepspeed --num_gpus N --module dpo_ds.precompute --model SFT_DIR --data PREPARED_DIR --output_dir CACHE_DIR \
        [--batch_size 8] [--dtype bf16] [--deepspeed ds_configs/zero3_inference.json]
    python -m dpo_ds.precompute ...            # one plain process (also works under torchrun)

Examples are sorted by length and cut into shards of --shard_size; shard n belongs to data-parallel rank
n % (world_size / K) (K = --sequence_parallel_size: the K ranks of a group compute its shards together, the
first writes them), so the plan (and every value) does not depend on the number of ranks or on K. Rerunning
the same command after a crash reuses complete shards and computes the rest.
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
import psutil
import torch
from tqdm import tqdm

from dpo_ds import cache, dist, engine, slurm
from dpo_ds.cache import reuse
from dpo_ds.cli import main_guard, on_fault, parse
from dpo_ds.config import PrecomputeConfig
from dpo_ds.data.prepared import load_split, read_report, verify_files
from dpo_ds.errors import Preempted, UserError
from dpo_ds.lifecycle.signals import StopSignals
from dpo_ds.model.batch import build, dummy_batch, lengths, pad_and_eos, pair_lengths, take
from dpo_ds.model.logps import is_collective, layout_of, pair_logps
from dpo_ds.pretrained import dtype_name, open_model_dir, resolve_dtype
from dpo_ds.report import memory
from dpo_ds.storage import owner
from dpo_ds.storage.files import read_json
from dpo_ds.storage.fingerprint import tokenizer_fingerprint


def shard_plan(ds, shard_size: int) -> list[np.ndarray]:
    """Row indices of each shard: longest pairs first (an out-of-memory shows up at once), ties by position."""
    lengths = pair_lengths(ds)
    order = np.lexsort((np.arange(len(ds)), -lengths))
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def batches_of(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def compute_batch(logps_fn, batch: dict, rows: list | None = None) -> dict:
    """One collated batch of prepared `rows` -> its shard columns (cache.SCHEMA): chosen and rejected in one
    forward, each row keyed by its tokens (none for the dummy batch, whose values are not kept)."""
    p = pair_logps(logps_fn, batch)
    values = {"example_id": batch["example_id"]}
    for side, logps in zip(("chosen", "rejected"), p):
        values.update({f"ref_{side}_logps": logps.logps, f"ref_{side}_shared_logps": logps.shared_logps,
                       f"{side}_tokens": logps.tokens})
    out = {name: values[name].cpu().numpy() for name in cache.SCHEMA.names if name in values}
    if rows is not None:
        out["pair_key"] = np.asarray([reuse.pair_key(r) for r in rows], dtype=object)
        out["source"] = np.zeros(len(rows), dtype=np.int8)  # computed here
    return out


class Progress:
    """What this rank computed: token, padded-slot and example counts, and example_ids whose values were
    not finite (their shards are not written)."""

    def __init__(self):
        self.tokens = self.slots = self.examples = self.reused = 0
        self.non_finite: list[int] = []
        self.start = time.time()
        self.launched = psutil.Process().create_time()  # for the start-up line after the first batch

    def add(self, batch: dict) -> None:
        self.tokens += batch["tokens"]
        self.slots += batch["slots"]
        self.examples += len(batch["example_id"])


def run_split(logps_fn, cfg: PrecomputeConfig, split: str, ds, pad_id: int, eos_id: int, progress: Progress,
              stop: StopSignals, held: reuse.Reuse | None = None) -> int:
    """Compute and write this rank's missing shards of one split; returns the split's shard count. Pairs that
    `held` (--reuse) holds are copied, not computed. Every rank goes through as many batches (dist.even: under
    ZeRO-3 each forward is collective; otherwise a rank out of work waits) and agrees on `stop` before each: a stop
    signal ends the split there, every rank at the same batch, the shard in flight discarded."""
    cache_dir = cfg.output_dir
    shards = shard_plan(ds, cfg.shard_size)
    done = dist.on_main(lambda: cache.complete_shards(cache_dir, split))  # one rank hashes what is on disk
    mine = [n for n in range(len(shards)) if n % dist.dp_size() == dist.dp_rank() and n not in done]
    todo, found = {n: shards[n] for n in mine}, {}
    for n in mine if held is not None else ():
        keys, ids = reuse.pair_keys(ds, shards[n])
        hit, columns = held.find(keys)
        if hit.any():
            found[n] = {"example_id": ids[hit], **columns,
                        "pair_key": np.asarray([k.tobytes() for k in keys[hit]], dtype=object)}
            todo[n] = shards[n][~hit]
            progress.reused += int(hit.sum())
    size = lengths(ds, layout_of(logps_fn))  # within a shard, batches group pairs of similar row length
    work = [(n, rows) for n in mine
            for rows in batches_of(todo[n][np.argsort(-size[todo[n]], kind="stable")], cfg.batch_size)]
    bar = tqdm(total=sum(len(todo[n]) for n in mine), desc=f"precompute {split} (rank 0)", unit="ex",
               disable=not dist.is_main(), mininterval=2.0)
    parts, collective = {}, is_collective(logps_fn)

    def open_shard(n: int) -> None:
        if dist.sp_rank() == 0:  # e.g. renamed but unrecorded when the last run died
            cache.remove_partial_shard(cache_dir, split, n)
        parts[n] = [found.pop(n)] if n in found else []

    def save_when_complete(n: int) -> None:
        if sum(len(p["example_id"]) for p in parts[n]) == len(shards[n]):
            progress.non_finite += save_shard(cache_dir, split, n, parts.pop(n))

    for n in [n for n in mine if not len(todo[n])]:  # every pair reused: written at once
        open_shard(n)
        save_when_complete(n)
    for item in dist.even(work, True):
        if stop.check():
            break
        if item is None:
            if collective:
                compute_batch(logps_fn, dummy_batch(pad_id, eos_id))
            continue
        n, rows = item
        if n not in parts:
            open_shard(n)
        pairs = take(ds, rows)
        batch = build(pairs, layout_of(logps_fn), pad_id)
        parts[n].append(compute_batch(logps_fn, batch, pairs))
        progress.add(batch)
        if progress.examples == len(rows) and dist.is_main():  # start-up cost: verification, plan, loading
            tqdm.write(f"precompute: first batch done {time.time() - progress.launched:.1f} s after launch")
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{progress.tokens / max(1e-9, time.time() - progress.start):.0f}")
        save_when_complete(n)
    bar.close()
    return len(shards)


def save_shard(cache_dir: str, split: str, n: int, parts: list) -> list[int]:
    """One shard's batches as one Arrow shard when every value is finite (written by the first rank of the
    sequence-parallel group; the others hold the same values); else nothing is written and the example_ids
    at fault are returned (every rank learns of them after its last forward: raising here, on one rank, would
    leave the others waiting in a collective)."""
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    bad = np.zeros(len(columns["example_id"]), dtype=bool)
    for name in cache.REFERENCE_COLUMNS:
        bad |= ~np.isfinite(columns[name])
    if bad.any():
        return columns["example_id"][bad].tolist()
    if dist.sp_rank() == 0:
        cache.write_shard(cache_dir, split, dist.rank(), n, columns)
    return []


def check_finite(progress: Progress) -> None:
    """Collective: every rank raises when any rank met non-finite reference values."""
    total = int(dist.all_reduce_data([len(progress.non_finite)])[0])
    if total:
        mine = f" (this rank: example_ids {progress.non_finite[:5]})" if progress.non_finite else ""
        raise UserError(f"the reference model gave non-finite log-probs for {total} example(s){mine}; their "
                        f"shards were not written. Check the model's weights, or use --dtype fp32/bf16 (fp16 "
                        f"overflows) with a new --output_dir: a cache is tied to its dtype and model")


def check_inputs(cfg: PrecomputeConfig, tokenizer, dtype_name: str) -> tuple[dict, list]:
    """(The fingerprint of this computation, the splits to compute: --splits, or every prepared one), after
    checking the data on disk is what its report says and was tokenized by the model's tokenizer. Hashes every
    weight file and prepared split: run on one rank."""
    report = read_report(cfg.data)
    splits = cfg.splits or list(report["counts"])
    tok_fp = tokenizer_fingerprint(tokenizer)
    if tok_fp != report["tokenizer_fingerprint"]:
        raise UserError(f"--data {cfg.data} was prepared with a different tokenizer ({report['tokenizer']}) than "
                        f"--model {cfg.model}'s; prepare it again with --tokenizer {cfg.model}")
    unknown = sorted(set(splits) - set(report["counts"]))
    if unknown:
        raise UserError(f"--splits {' '.join(unknown)}: not in --data {cfg.data} (prepared splits: "
                        f"{', '.join(report['counts'])})")
    verify_files(cfg.data, report, splits)
    return cache.fingerprint(cfg.model, tok_fp, report, dtype_name), splits


def check_plan(cfg: PrecomputeConfig, sources: list[dict]) -> None:
    """A started cache continues only with the --shard_size and --reuse caches it was started with (its complete
    shards hold those examples; each row names its source by its place in that list)."""
    path = os.path.join(cfg.output_dir, cache.PLAN)
    if not os.path.isfile(path):  # a new cache, or a complete one written before plans
        return
    plan = read_json(path)
    if plan["shard_size"] != cfg.shard_size:
        raise UserError(f"{cfg.output_dir} was started with --shard_size {plan['shard_size']}; resume it with "
                        f"the same value (its complete shards hold those examples)")
    if plan.get("reuse", []) != [e["cache"] for e in sources]:
        raise UserError(f"{cfg.output_dir} was started with --reuse {' '.join(plan.get('reuse', [])) or '(none)'}"
                        f"; resume it with the same caches, in that order")


def kept(cache_dir: str) -> str:
    return f"the {len(glob.glob(os.path.join(cache_dir, '*', 'shard-*.json')))} complete shard(s) in {cache_dir} are kept"


def after_fault(cache_dir: str) -> str:
    return f"{kept(cache_dir)}; rerun the same command to compute the rest"


def run(cfg: PrecomputeConfig) -> dict | None:
    on_fault(lambda: after_fault(cfg.output_dir))
    stop = StopSignals(cfg.stop_signals)
    dist.init(cfg.dist_timeout_minutes, cfg.sequence_parallel_size)
    with owner.owned(cfg.output_dir, "reference cache", "--output_dir", "precompute"):
        return _run(cfg, stop)


def _run(cfg: PrecomputeConfig, stop: StopSignals) -> dict | None:
    tokenizer = open_model_dir(cfg.model, cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype)
    fp, requested = dist.on_main(lambda: check_inputs(cfg, tokenizer, dtype_name(dtype)))
    state, splits = dist.on_every_rank(lambda: cache.start(cfg.output_dir, fp, requested))
    dist.barrier()  # every rank has read the directory before rank 0 writes into it
    dist.check_shared_dir(cfg.output_dir, "--output_dir")  # every node must see the shards of the others
    sources = dist.on_main(lambda: [reuse.check_source(d, fp) for d in cfg.reuse or ()])  # hashes their shards
    bad = None
    if state == "complete":
        bad = dist.on_main(lambda: cache.damaged(cfg.output_dir))  # one rank hashes every shard
        if not bad:
            dist.print0(f"{cfg.output_dir}: already complete for this model and data; verify with "
                        f"`dpo-ds verify {cfg.output_dir} --data {cfg.data}`")
            return None
    check_plan(cfg, sources)  # before a damaged cache is reopened: a refusal changes nothing
    if bad:
        names = [f"{split}/{name}" for split, files in bad.items() for name in files]
        dist.print0(f"precompute: {len(names)} shard(s) of {cfg.output_dir} do not match its manifest (changed, "
                    f"missing or unlisted: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}); "
                    f"recomputing exactly those")
        dist.on_main(lambda: cache.reopen(cfg.output_dir, bad))
        state = "resume"
    datasets_ = dist.on_every_rank(lambda: {s: load_split(cfg.data, s) for s in splits})  # before any write
    if dist.is_main():
        cache.write_plan(cfg.output_dir, fp, {"shard_size": cfg.shard_size, "batch_size": cfg.batch_size,
                                                  "split_names": splits, "reuse": [e["cache"] for e in sources]})
    dist.barrier()
    held = reuse.load(sources)
    dist.print0(f"precompute: {'resuming' if state == 'resume' else 'starting'} {cfg.output_dir} "
                f"({', '.join(splits)}; {dist.describe()}, {dtype}, "
                f"{'ZeRO-3 ' + cfg.deepspeed if cfg.deepspeed else 'full copy per rank'})")

    logps_fn = engine.inference_engine(engine.ModelSpec.of(cfg), cfg.dtype, cfg.deepspeed, cfg.batch_size)
    dist.print0(f"precompute: layout {layout_of(logps_fn)}")
    progress, n_shards = Progress(), {}
    with stop.deferred():
        for s in splits:
            n_shards[s] = run_split(logps_fn, cfg, s, datasets_[s], *pad_and_eos(tokenizer), progress, stop, held)
            if stop.agreed:
                stop.ignore()
                check_finite(progress)  # (collective: what the stopped run wrote is finite, as always)
                raise Preempted(f"stopped by {stop.name} (the shard in flight discarded): {kept(cfg.output_dir)}; "
                                f"{dist.on_main(slurm.requeue)}")
    check_finite(progress)
    run_stats = summarise(progress, state == "resume")  # collective; every shard is in place after it
    manifest = dist.on_main(lambda: cache.write_manifest(cfg.output_dir, fp, n_shards, run_stats,
                                                         reuse.counted(cfg.output_dir, n_shards, sources)))
    if sources:
        dist.print0(f"precompute: {reuse.describe(manifest)}")
    dist.print0(f"precompute: wrote {cfg.output_dir}/manifest.json: "
                f"{ {s: e['rows'] for s, e in manifest['splits'].items()} } examples, "
                f"{run_stats['tokens_per_s']:.0f} tokens/s, padding {100 * run_stats['padding_fraction']:.1f}%; "
                f"{memory.describe(run_stats['memory'])}")
    return manifest


def summarise(progress: Progress, resumed: bool) -> dict:
    """The run's throughput over every rank (collective), for the manifest."""
    tokens, slots, examples, reused = dist.all_reduce_data([progress.tokens, progress.slots, progress.examples,
                                                            progress.reused]).tolist()
    elapsed = float(dist.all_reduce([time.time() - progress.start], op="max")[0])
    return {"world_size": dist.world_size(), "sequence_parallel_size": dist.sp_size(), "seconds": elapsed,
            "examples": int(examples), "reused": int(reused), "tokens": int(tokens), "slots": int(slots),
            "tokens_per_s": tokens / max(elapsed, 1e-9), "examples_per_s": examples / max(elapsed, 1e-9),
            "padding_fraction": 1 - tokens / slots if slots else 0.0, "resumed": resumed, "memory": memory.per_rank()}


def main(argv=None):
    main_guard(lambda: run(parse(PrecomputeConfig, argv, prog="python -m dpo_ds.precompute", doc=__doc__)))


if __name__ == "__main__":
    main()
