"""The reference log-prob cache: Arrow shards, their manifest, and the verified reader.

    python -m dpo_ds.ref_cache verify CACHE_DIR --data PREPARED_DIR [--model SFT_DIR] [--trust_remote_code]

Layout: CACHE_DIR/plan.json (the fingerprint, written first), CACHE_DIR/<split>/shard-<rank>-<n>.arrow
(+ .json sidecar with rows and sha256, written after the shard is renamed into place), and
CACHE_DIR/manifest.json, written last and atomically by rank 0. Without a manifest there is no cache.
The fingerprint says what the values were computed from (model, tokenizer, data, dtype); which splits a
cache holds is not part of it: rerunning precompute with more --splits extends a cache.

`open_verified` is what train and evaluate call: rank 0 checks everything (`open_cache(..., verify=True)`
hashes every file: one reader), the other ranks then read what it verified. The cache owns the names of its
reference columns: a phase gets them as `cache.reference(split)`, a function from a batch's example_ids to
RefLogps tensors.

Format 2 adds each response's log-prob over the pair's shared length (its first min(|y_w|, |y_l|) tokens),
which LD-DPO needs for any α chosen at training time; a format-1 cache still serves every other loss.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from dpo_ds import dist, owner
from dpo_ds.data import load_split, load_tokenizer, read_report, verify_files
from dpo_ds.errors import CacheError, UserError
from dpo_ds.files import atomic_json, read_json
from dpo_ds.fingerprint import model_fingerprint, sha256_file, tokenizer_fingerprint

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: no shared-length columns
MANIFEST, PLAN = "manifest.json", "plan.json"
SHARED_COLUMNS = ("ref_chosen_shared_logps", "ref_rejected_shared_logps")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps") + SHARED_COLUMNS  # what the loss reads
SCHEMA = pa.schema([("example_id", pa.int64()), *((name, pa.float32()) for name in REFERENCE_COLUMNS),
                    ("chosen_tokens", pa.int32()), ("rejected_tokens", pa.int32())])


class RefLogps(NamedTuple):
    """A batch's cached reference values [B] each; the shared-length ones are None from a format-1 cache."""
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_shared_logps: torch.Tensor | None
    rejected_shared_logps: torch.Tensor | None
REPAIR = "; rerun the precompute command that wrote the cache: it recomputes exactly the damaged shards"
SHARD_RE = re.compile(r"shard-(\d+)-(\d+)\.arrow$")


def fingerprint(model_dir: str, tokenizer_fp: str, data_report: dict, dtype: str) -> dict:
    """Everything the cached values depend on."""
    return {"format_version": FORMAT_VERSION, "model": model_fingerprint(model_dir), "tokenizer": tokenizer_fp,
            "data": data_report["fingerprint"], "dtype": dtype}


def same_computation(want: dict, have: dict) -> bool:
    """Fingerprints written before splits left the fingerprint carry a `splits` key: it does not count."""
    return {k: v for k, v in have.items() if k != "splits"} == want


def describe_difference(want: dict, have: dict) -> str:
    names = {"model": "reference model (config or weights)", "tokenizer": "tokenizer", "data": "prepared data",
             "dtype": "dtype", "format_version": "cache format version"}
    return ", ".join(names[k] for k in names if want.get(k) != have.get(k)) or "nothing"


# ---------------------------------------------------------------- writing (precompute)

def shard_path(cache_dir: str, split: str, rank: int, n: int) -> str:
    return os.path.join(cache_dir, split, f"shard-{rank:05d}-{n:05d}.arrow")


def write_shard(cache_dir: str, split: str, rank: int, n: int, columns: dict) -> dict:
    """Write one shard under a temporary name, rename it into place, then record rows and sha256."""
    path = shard_path(cache_dir, split, rank, n)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in SCHEMA}, schema=SCHEMA)
    tmp = path + ".tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = {"file": os.path.basename(path), "shard": n, "rows": table.num_rows, "sha256": sha256_file(path)}
    atomic_json(path[:-len(".arrow")] + ".json", meta)
    return meta


def complete_shards(cache_dir: str, split: str) -> dict:
    """{shard index: sidecar} for shards whose file is in place and hashes as recorded."""
    done = {}
    for side in glob.glob(os.path.join(cache_dir, split, "shard-*.json")):
        meta = read_json(side)
        path = os.path.join(cache_dir, split, meta["file"])
        if os.path.isfile(path) and sha256_file(path) == meta["sha256"]:
            done[meta["shard"]] = meta
    return done


def remove_partial_shard(cache_dir: str, split: str, n: int) -> None:
    """Delete what an interrupted run left of shard n (any rank's name), so no stray file survives."""
    for path in glob.glob(os.path.join(cache_dir, split, f"shard-*-{n:05d}.*")):
        os.remove(path)


def start(cache_dir: str, fp: dict, splits) -> tuple[str, list]:
    """Check CACHE_DIR can hold this computation -> (state, splits to compute). state is 'new', 'resume'
    or 'complete'; a complete cache asked for splits it lacks is resumed with the union of both. Refuses a
    directory that was started (or finished) from a different model, tokenizer, data or dtype."""
    for name in (MANIFEST, PLAN):
        path = os.path.join(cache_dir, name)
        if os.path.isfile(path):
            entry = read_json(path)
            if not same_computation(fp, entry["fingerprint"]):
                raise CacheError(f"{cache_dir} holds a cache of a different computation "
                                 f"({describe_difference(fp, entry['fingerprint'])} differ); use a new --output_dir, "
                                 f"or delete it to recompute")
            have = list(entry["splits"]) if name == MANIFEST else entry.get("split_names", [])
            union = sorted(set(have) | set(splits))
            if name == MANIFEST and set(splits) <= set(have):
                return "complete", union
            return "resume", union
    if os.path.isdir(cache_dir) and [n for n in os.listdir(cache_dir) if not owner.PRIVATE.fullmatch(n)]:
        raise CacheError(f"--output_dir {cache_dir} exists, is not empty and is not a reference cache")
    return "new", sorted(set(splits))


def damaged(cache_dir: str) -> dict[str, list[str]]:
    """{split: file names} of a complete cache's shards that are missing, hash otherwise than the manifest
    records, or lie beside them unlisted: what a rerun of precompute recomputes."""
    manifest = read_json(os.path.join(cache_dir, MANIFEST))
    bad = {}
    for split, entry in manifest["splits"].items():
        listed = {m["file"]: m for m in entry["shards"]}
        for name, meta in listed.items():
            path = os.path.join(cache_dir, split, name)
            if not os.path.isfile(path) or sha256_file(path) != meta["sha256"]:
                bad.setdefault(split, []).append(name)
        for path in sorted(glob.glob(os.path.join(cache_dir, split, "shard-*.arrow"))):
            if os.path.basename(path) not in listed:
                bad.setdefault(split, []).append(os.path.basename(path))
    return bad


def reopen(cache_dir: str, bad: dict[str, list[str]]) -> None:
    """Make a complete cache with `damaged` shards an unfinished one that lacks exactly those: the manifest goes
    first (from then on the cache is refused until a run completes it), then each shard's files."""
    if not os.path.isfile(os.path.join(cache_dir, PLAN)):
        raise CacheError(f"{cache_dir}: damaged shards ({', '.join(sum(bad.values(), [])[:5])}) but no {PLAN} "
                         f"to recompute them from (written by an older dpo_ds): delete the directory and recompute")
    os.remove(os.path.join(cache_dir, MANIFEST))
    for split, names in bad.items():
        for name in names:
            n = int(SHARD_RE.search(name).group(2))
            remove_partial_shard(cache_dir, split, n)


def write_plan(cache_dir: str, fp: dict, plan: dict) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    atomic_json(os.path.join(cache_dir, PLAN), {"fingerprint": fp, **plan})


def write_manifest(cache_dir: str, fp: dict, splits: dict, stats: dict) -> dict:
    manifest = {"fingerprint": fp, "splits": {}, "stats": stats}
    for split, n_shards in splits.items():
        shards = complete_shards(cache_dir, split)
        missing = sorted(set(range(n_shards)) - set(shards))
        if missing:
            raise CacheError(f"{cache_dir}/{split}: shards {missing[:10]} are not complete; rerun to finish them")
        metas = [shards[n] for n in range(n_shards)]
        manifest["splits"][split] = {"rows": sum(m["rows"] for m in metas), "shards": metas}
    atomic_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest


# ---------------------------------------------------------------- reading (train, evaluate)

def read_shard(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


class Reference:
    """One split's cached reference log-probs, looked up by example_id: `reference(batch)` -> RefLogps, each
    [B] fp32, in the batch's order."""

    def __init__(self, table: pa.Table):
        ids = table.column("example_id").to_numpy()
        order = np.argsort(ids)
        self.ids = torch.from_numpy(ids[order])
        self.columns = [n for n in REFERENCE_COLUMNS if n in table.column_names]
        self.logps = torch.from_numpy(np.stack([table.column(n).to_numpy() for n in self.columns], 1)[order])

    def __call__(self, batch: dict) -> RefLogps:
        ids = batch["example_id"]
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self.ids) - 1)
        if not torch.equal(self.ids[pos], ids):  # open_cache proved coverage; this guards the caller's split
            raise CacheError(f"example_ids {ids[self.ids[pos] != ids][:5].tolist()} are not in this split's cache")
        logps = self.logps[pos]
        return RefLogps(*(logps[:, self.columns.index(n)] if n in self.columns else None for n in REFERENCE_COLUMNS))


class RefCache:
    """A verified cache: `reference(split)` for the loss, `values(split, example_ids)` for every column."""

    def __init__(self, cache_dir: str, manifest: dict, tables: dict):
        self.cache_dir, self.manifest, self.tables = cache_dir, manifest, tables

    def reference(self, split: str, shared: bool = False) -> Reference:
        """The split's values for the loss; `shared` (LD-DPO) refuses a cache without the shared-length ones."""
        version = self.manifest["fingerprint"]["format_version"]
        if shared and not set(SHARED_COLUMNS) <= set(self.tables[split].column_names):
            raise CacheError(f"{self.cache_dir} is a format-{version} cache, without the shared-length reference "
                             f"log-probs LD-DPO (--ld_alpha) needs: rerun dpo_ds.precompute into a new --output_dir "
                             f"(format {FORMAT_VERSION}), or train without --ld_alpha")
        return Reference(self.tables[split])

    def values(self, split: str, example_ids) -> dict:
        """Every column of `split` for `example_ids`, in that order (tests and inspection; the loss reads
        `reference`)."""
        table = self.tables[split]
        ids = table.column("example_id").to_numpy()
        order = np.argsort(ids)
        pos = order[np.searchsorted(ids, np.asarray(example_ids), sorter=order)]
        return {name: table.column(name).to_numpy()[pos] for name in SCHEMA.names if name in table.column_names}


def open_verified(cache_dir: str, data_dir: str, model_dir: str | None, splits, trust_remote_code: bool = False
                  ) -> RefCache:
    """`open_cache` with every check on rank 0 alone (one reader hashes the shards, data and weights; its
    verdict reaches every rank), then a plain read on the other ranks; rank 0 keeps what it verified."""
    verified, error = [], None
    dist.on_main(lambda: verified.append(open_cache(cache_dir, data_dir, model_dir, splits, trust_remote_code)))
    if not verified:  # what rank 0 verified may still be unreadable here (e.g. a node without the shared files)
        try:
            verified.append(open_cache(cache_dir, data_dir, splits=splits, verify=False))
        except UserError as e:
            error = e
    if dist.all_reduce([1.0 if error else 0.0])[0] > 0:  # every rank stops, none waits for the others
        raise error or CacheError(f"{cache_dir}: another rank could not read the cache (its message says why)")
    return verified[0]


def open_cache(cache_dir: str, data_dir: str, model_dir: str | None = None, splits=None,
               trust_remote_code: bool = False, verify: bool = True) -> RefCache:
    """Open a cache: manifest, format, fingerprint against the prepared data's report, shard row counts, every
    example exactly once. With `verify` also what needs hashing: the prepared files against their report,
    the tokenizer and weights of `model_dir` when given, every shard's sha256, no extra shard files."""
    if not os.path.isdir(cache_dir):
        raise CacheError(f"--ref_cache {cache_dir}: no such directory; run dpo_ds.precompute first")
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        hint = " (an unfinished run: rerun the same precompute command to complete it)" \
            if os.path.isfile(os.path.join(cache_dir, PLAN)) else ""
        raise CacheError(f"{cache_dir}: no {MANIFEST}, so not a complete reference cache{hint}")
    manifest = read_json(path)
    fp = manifest["fingerprint"]
    if fp.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(f"{cache_dir}: cache format {fp.get('format_version')}, this code reads formats "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; recompute it")
    report = read_report(data_dir)
    splits = list(splits or manifest["splits"])
    if verify:
        verify_files(data_dir, report, splits)
    if fp["data"] != report["fingerprint"]:
        raise CacheError(f"{cache_dir} was computed from other prepared data than {data_dir} (data fingerprint "
                         f"{fp['data'][:12]} != {report['fingerprint'][:12]}); rerun dpo_ds.precompute on it")
    if fp["tokenizer"] != report["tokenizer_fingerprint"]:
        raise CacheError(f"{cache_dir} was computed with another tokenizer than {data_dir} was prepared with")
    if verify and model_dir is not None:
        if tokenizer_fingerprint(load_tokenizer(model_dir, trust_remote_code)) != fp["tokenizer"]:
            raise CacheError(f"the tokenizer of --model {model_dir} differs from the one the cache and data used")
        if model_fingerprint(model_dir) != fp["model"]:
            raise CacheError(f"{cache_dir} holds the log-probs of another reference model than --model "
                             f"{model_dir} (config or weights differ); precompute with this model")
    tables = {}
    for split in splits:
        if split not in manifest["splits"]:
            raise CacheError(f"{cache_dir}: no split {split!r} (cached: {', '.join(manifest['splits'])}); rerun "
                             f"dpo_ds.precompute with --splits {' '.join(sorted(set(manifest['splits']) | {split}))} "
                             f"to add it")
        tables[split] = read_split(cache_dir, split, manifest["splits"][split], load_split(data_dir, split), verify)
    return RefCache(cache_dir, manifest, tables)


def read_split(cache_dir: str, split: str, entry: dict, prepared, verify: bool) -> pa.Table:
    listed = {m["file"] for m in entry["shards"]}
    extra = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cache_dir, split, "shard-*.arrow"))
                   if os.path.basename(p) not in listed)
    if extra and verify:
        raise CacheError(f"{cache_dir}/{split}: shard files not in the manifest: {', '.join(extra[:5])}{REPAIR}")
    parts = []
    for meta in entry["shards"]:
        path = os.path.join(cache_dir, split, meta["file"])
        if not os.path.isfile(path):
            raise CacheError(f"{cache_dir}/{split}: shard {meta['file']} is missing{REPAIR}")
        if verify and sha256_file(path) != meta["sha256"]:
            raise CacheError(f"{cache_dir}/{split}: shard {meta['file']} does not match its sha256 "
                             f"(modified or corrupt){REPAIR}")
        table = read_shard(path)
        if table.num_rows != meta["rows"]:
            raise CacheError(f"{cache_dir}/{split}: shard {meta['file']} has {table.num_rows} rows, manifest says "
                             f"{meta['rows']}")
        parts.append(table)
    table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()  # (a format-1 split is never empty)
    cached = table.column("example_id").to_numpy()
    want = np.asarray(prepared["example_id"], dtype=np.int64)
    uniq, counts = np.unique(cached, return_counts=True)
    if (counts > 1).any():
        raise CacheError(f"{cache_dir}/{split}: example_ids cached more than once: {uniq[counts > 1][:10].tolist()}")
    missing, unknown = np.setdiff1d(want, uniq), np.setdiff1d(uniq, want)
    if missing.size or unknown.size:
        raise CacheError(f"{cache_dir}/{split}: {missing.size} prepared examples missing from the cache "
                         f"{missing[:5].tolist()}, {unknown.size} cached examples not in the prepared data "
                         f"{unknown[:5].tolist()}")
    return table


ROUNDING = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}  # unit roundoff of each dtype


def precision_warning(cache: RefCache, split: str, dtype: str, beta: float) -> str | None:
    """One line when the model is scored in another precision than the cache was computed in: the margins
    then carry that precision's rounding (an estimate of their size is given), which is not preference."""
    cached = cache.manifest["fingerprint"]["dtype"]
    if cached == dtype:
        return None
    table = cache.tables[split]
    size = float(np.mean(np.abs(table.column("ref_chosen_logps").to_numpy()) +
                         np.abs(table.column("ref_rejected_logps").to_numpy())))
    floor = 2 * beta * max(ROUNDING[dtype], ROUNDING[cached]) * size
    return (f"warning: the cache holds {cached} log-probs and the model runs in {dtype}: reward margins within "
            f"about ±{floor:.2g} are rounding of the precisions, not preference (the SFT model against its own "
            f"cache scores near 0.5 reward accuracy so); use --dtype {cached} to compare exactly")


def summary(cache: RefCache) -> str:
    fp = cache.manifest["fingerprint"]
    lines = [f"reference cache {cache.cache_dir}: OK (format {fp['format_version']}, dtype {fp['dtype']})"]
    for split, table in cache.tables.items():
        columns = [(name, table.column(name).to_numpy()) for name in REFERENCE_COLUMNS[:2]]
        lines.append(f"  {split}: {table.num_rows} examples in {len(cache.manifest['splits'][split]['shards'])} shards; "
                     + ", ".join(f"{name} mean {v.mean():.3f} [min {v.min():.3f}, max {v.max():.3f}]"
                                 for name, v in columns))
    s = cache.manifest.get("stats", {})
    if s:
        lines.append(f"  run: {s.get('world_size')} rank(s), {s.get('tokens_per_s', 0):.0f} tokens/s, "
                     f"{s.get('examples_per_s', 0):.1f} examples/s, padding {100 * s.get('padding_fraction', 0):.1f}%")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dpo_ds.ref_cache", description="Verify a reference cache.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check manifest, hashes, coverage and fingerprint; print a summary")
    v.add_argument("cache_dir")
    v.add_argument("--data", required=True, help="the prepared data directory the cache must match")
    v.add_argument("--model", help="also check the cache was computed from this model")
    v.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with the tokenizer to run")
    a = p.parse_args(argv)
    try:
        print(summary(open_cache(a.cache_dir, a.data, a.model, trust_remote_code=a.trust_remote_code)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
