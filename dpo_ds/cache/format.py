"""The reference log-prob cache's format: what is on disk, and the fingerprint that says what it was computed from.

Layout: CACHE_DIR/plan.json (the fingerprint, written first), CACHE_DIR/<split>/shard-<rank>-<n>.arrow
(+ .json sidecar with rows and sha256, written after the shard is renamed into place), and
CACHE_DIR/manifest.json, written last and atomically by rank 0. Without a manifest there is no cache.
The fingerprint says what the values were computed from (model, tokenizer, data, dtype); which splits a
cache holds is not part of it: rerunning precompute with more --splits extends a cache.

Format 2 adds each response's log-prob over the pair's shared length (its first min(|y_w|, |y_l|) tokens),
which LD-DPO needs for any α chosen at training time; a format-1 cache still serves every other loss.
Format 3 keys each row by the pair's exact tokens (`pair_key`) and says where its values came from (`source`:
0 computed by the run that wrote the cache, i the i-th of the manifest's `reused` caches): what lets a later
precompute over other prepared data reuse them (dpo_ds.cache.reuse); formats 1 and 2 serve as before.
"""
from __future__ import annotations

import os
import re

import pyarrow as pa

from dpo_ds.storage.fingerprint import model_fingerprint

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # format 1: no shared-length columns; 1 and 2: no pair_key, no source
MANIFEST, PLAN = "manifest.json", "plan.json"
SHARED_COLUMNS = ("ref_chosen_shared_logps", "ref_rejected_shared_logps")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps") + SHARED_COLUMNS  # what the loss reads
SCHEMA = pa.schema([("example_id", pa.int64()), *((name, pa.float32()) for name in REFERENCE_COLUMNS),
                    ("chosen_tokens", pa.int32()), ("rejected_tokens", pa.int32()),
                    ("pair_key", pa.binary(16)), ("source", pa.int8())])


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


def shard_path(cache_dir: str, split: str, rank: int, n: int) -> str:
    return os.path.join(cache_dir, split, f"shard-{rank:05d}-{n:05d}.arrow")


def read_shard(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()
