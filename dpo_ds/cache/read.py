"""Reading the cache (train, evaluate): verified before use, then looked up by example_id.

`open_verified` is what train and evaluate call: rank 0 checks everything (`open_cache(..., verify=True)`
hashes every file: one reader), the other ranks then read what it verified. The cache owns the names of its
reference columns: a phase gets them as `cache.reference(split)`, a function from a batch's example_ids to
the reference's dpo_ds.model.pair.Pair.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import torch

from dpo_ds import dist
from dpo_ds.cache.format import (
    FORMAT_VERSION,
    MANIFEST,
    PLAN,
    READABLE_VERSIONS,
    REFERENCE_COLUMNS,
    REPAIR,
    SCHEMA,
    SHARED_COLUMNS,
    read_shard,
)
from dpo_ds.data.prepared import load_split, load_tokenizer, read_report, verify_files
from dpo_ds.errors import CacheError, UserError
from dpo_ds.model.batch import in_view
from dpo_ds.model.pair import Logps, Pair
from dpo_ds.objective.metrics import TIE_RELATIVE, tie_precision
from dpo_ds.storage.files import read_json
from dpo_ds.storage.fingerprint import model_fingerprint, sha256_file, tokenizer_fingerprint


class Reference:
    """One split's cached reference log-probs, looked up by example_id: `reference(batch)` -> a Pair of the
    reference's Logps (no token counts, no head statistics), each [B] fp32, in the batch's order. `precision`: the
    dtype they were computed in (fp32, bf16, fp16)."""

    def __init__(self, table: pa.Table, precision: str = "fp32"):
        self.precision = precision
        ids = table.column("example_id").to_numpy()
        order = np.argsort(ids)
        self.ids = torch.from_numpy(ids[order])
        self.columns = [n for n in REFERENCE_COLUMNS if n in table.column_names]
        self.logps = torch.from_numpy(np.stack([table.column(n).to_numpy() for n in self.columns], 1)[order])

    def __call__(self, batch: dict) -> Pair:
        ids = batch["example_id"]
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self.ids) - 1)
        if not torch.equal(self.ids[pos], ids):  # open_cache proved coverage; this guards the caller's split
            raise CacheError(f"example_ids {ids[self.ids[pos] != ids][:5].tolist()} are not in this split's cache")
        logps = self.logps[pos]
        rw, rl, rw_shared, rl_shared = (logps[:, self.columns.index(n)] if n in self.columns else None
                                        for n in REFERENCE_COLUMNS)
        return Pair(Logps(rw, shared_logps=rw_shared), Logps(rl, shared_logps=rl_shared))


class RefCache:
    """A verified cache: `reference(split)` for the loss, `values(split, example_ids)` for every column."""

    def __init__(self, cache_dir: str, manifest: dict, tables: dict, data: dict, report: dict):
        self.cache_dir, self.manifest, self.tables = cache_dir, manifest, tables
        self.data = data  # {split: the prepared split the cache was checked against}: the phases train on it
        self.report = report  # the prepared data's report, read once

    def reference(self, split: str, shared: bool = False) -> Reference:
        """The split's values for the loss; `shared` (LD-DPO) refuses a cache without the shared-length ones."""
        version = self.manifest["fingerprint"]["format_version"]
        if shared and not set(SHARED_COLUMNS) <= set(self.tables[split].column_names):
            raise CacheError(f"{self.cache_dir} is a format-{version} cache, without the shared-length reference "
                             f"log-probs LD-DPO (--ld_alpha) needs: rerun dpo_ds.precompute into a new --output_dir "
                             f"(format {FORMAT_VERSION}), or train without --ld_alpha")
        return Reference(self.tables[split], self.manifest["fingerprint"]["dtype"])

    def values(self, split: str, example_ids) -> dict:
        """Every column of `split` for `example_ids`, in that order (tests and inspection; the loss reads
        `reference`)."""
        table = self.tables[split]
        ids = table.column("example_id").to_numpy()
        order = np.argsort(ids)
        pos = order[np.searchsorted(ids, np.asarray(example_ids), sorter=order)]
        return {name: table.column(name).to_numpy()[pos] for name in SCHEMA.names if name in table.column_names}


def open_verified(cache_dir: str, data_dir: str, model_dir: str | None, splits, trust_remote_code: bool = False,
                  optional=()) -> RefCache:
    """`open_cache` with every check on rank 0 alone (one reader hashes the shards, data and weights; its
    verdict reaches every rank), then a plain read on the other ranks; rank 0 keeps what it verified."""
    verified, error = [], None
    dist.on_main(lambda: verified.append(open_cache(cache_dir, data_dir, model_dir, splits, trust_remote_code,
                                                    optional=optional)))
    if not verified:  # what rank 0 verified may still be unreadable here (e.g. a node without the shared files)
        try:
            verified.append(open_cache(cache_dir, data_dir, splits=splits, verify=False, optional=optional))
        except UserError as e:
            error = e
    if dist.all_reduce([1.0 if error else 0.0])[0] > 0:  # every rank stops, none waits for the others
        raise error or CacheError(f"{cache_dir}: another rank could not read the cache (its message says why)")
    return verified[0]


def open_cache(cache_dir: str, data_dir: str, model_dir: str | None = None, splits=None,
               trust_remote_code: bool = False, verify: bool = True, optional=()) -> RefCache:
    """Open a cache: manifest, format, fingerprint against the prepared data's report, shard row counts, every
    example exactly once. With `verify` also what needs hashing: the prepared files against their report,
    the tokenizer and weights of `model_dir` when given, every shard's sha256, no extra shard files.
    `splits` (default: the cached ones) that are `optional` are left out where the data has none."""
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
    splits = [s for s in splits or manifest["splits"] if s in report["counts"] or s not in optional]
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
    tables, data = {}, {}
    for split in splits:
        if split not in manifest["splits"]:
            raise CacheError(f"{cache_dir}: no split {split!r} (cached: {', '.join(manifest['splits'])}); rerun "
                             f"dpo_ds.precompute with --splits {' '.join(sorted(set(manifest['splits']) | {split}))} "
                             f"to add it")
        data[split] = load_split(data_dir, split)
        tables[split] = read_split(cache_dir, split, manifest["splits"][split], data[split], verify)
    return RefCache(cache_dir, manifest, tables, data, report)


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
    want = in_view(prepared, prepared.data.column("example_id").to_numpy())  # (without a Python int per pair)
    uniq, counts = np.unique(cached, return_counts=True)
    if (counts > 1).any():
        raise CacheError(f"{cache_dir}/{split}: example_ids cached more than once: {uniq[counts > 1][:10].tolist()}")
    missing, unknown = np.setdiff1d(want, uniq), np.setdiff1d(uniq, want)
    if missing.size or unknown.size:
        raise CacheError(f"{cache_dir}/{split}: {missing.size} prepared examples missing from the cache "
                         f"{missing[:5].tolist()}, {unknown.size} cached examples not in the prepared data "
                         f"{unknown[:5].tolist()}")
    return table


def precision_warning(cache: RefCache, split: str, dtype: str, beta: float) -> str | None:
    """One line when the model is scored in another precision than the cache was computed in: the margins
    then carry that precision's rounding, up to about the tie bound (objective.metrics.TIE_RELATIVE) of their
    size, which is not preference."""
    cached = cache.manifest["fingerprint"]["dtype"]
    if cached == dtype:
        return None
    table = cache.tables[split]
    size = 2 * float(np.mean(np.abs(table.column("ref_chosen_logps").to_numpy()) +
                             np.abs(table.column("ref_rejected_logps").to_numpy())))  # the policy's ~ the reference's
    floor = TIE_RELATIVE[tie_precision(dtype, cached)] * beta * size
    return (f"warning: the cache holds {cached} log-probs and the model runs in {dtype}: reward margins within "
            f"about ±{floor:.2g} are rounding of the precisions, not preference (rewards/accuracies counts them as "
            f"ties); use --dtype {cached} to compare exactly")


def summary(cache: RefCache) -> str:
    fp = cache.manifest["fingerprint"]
    lines = [f"reference cache {cache.cache_dir}: OK (format {fp['format_version']}, dtype {fp['dtype']})"]
    for split, table in cache.tables.items():
        columns = [(name, table.column(name).to_numpy()) for name in REFERENCE_COLUMNS[:2]]
        lines.append(f"  {split}: {table.num_rows} examples in {len(cache.manifest['splits'][split]['shards'])} shards; "
                     + ", ".join(f"{name} mean {v.mean():.3f} [min {v.min():.3f}, max {v.max():.3f}]"
                                 for name, v in columns))
    if cache.manifest.get("reused"):
        from dpo_ds.cache.reuse import describe

        lines.append(f"  values: {describe(cache.manifest)}")
    s = cache.manifest.get("stats", {})
    if s:
        lines.append(f"  run: {s.get('world_size')} rank(s), {s.get('tokens_per_s', 0):.0f} tokens/s, "
                     f"{s.get('examples_per_s', 0):.1f} examples/s, padding {100 * s.get('padding_fraction', 0):.1f}%")
    return "\n".join(lines)
