"""Reference values an earlier cache already holds (`precompute --reuse CACHE_DIR ...`).

A pair's cached reference log-probs depend on the reference model (its weights and config), the dtype they were
computed in, and the pair's exact tokens (prompt, both responses, the labels' boundary): on nothing else but
rounding (the batch, its padding and layout change the order of sums; the cache's tolerance against float64
bounds that). Format-3 caches key each row by its tokens (`pair_key`, 16 bytes of BLAKE2b over the pair's four
token lists), so the pairs of new prepared data — re-mixed, filtered, another eval fraction — are found in any
earlier cache of the same model, tokenizer and dtype, whatever their example_ids there. Each row of a cache
says where its values came from (`source`: 0 computed by this run, i for the i-th cache of the manifest's
`reused` list); `dpo-ds verify --data` recomputes every row's key from the prepared tokens.
"""
from __future__ import annotations

import glob
import hashlib
import os

import numpy as np

from dpo_ds.cache.format import MANIFEST, REFERENCE_COLUMNS, describe_difference, read_shard
from dpo_ds.cache.write import damaged
from dpo_ds.errors import CacheError
from dpo_ds.storage.files import read_json
from dpo_ds.storage.fingerprint import sha256_file

TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
KEYED_SINCE = 3  # the first format whose rows carry pair_key


def pair_key(row: dict) -> bytes:
    """16 bytes that name a pair's exact tokens: its four token lists, each with its length."""
    h = hashlib.blake2b(digest_size=16)
    for name in TOKEN_COLUMNS:
        arr = np.asarray(row[name], dtype=np.int64)
        h.update(np.int64(arr.size).tobytes() + arr.tobytes())
    return h.digest()


def pair_keys(ds, rows, at_once: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """([N, 16] uint8 pair keys, [N] example_ids) of rows `rows` of a prepared split, read `at_once` at a time."""
    from dpo_ds.model.batch import take

    keys, ids = [], []
    for i in range(0, len(rows), at_once):
        pairs = take(ds, rows[i:i + at_once])
        keys.append(np.frombuffer(b"".join(pair_key(r) for r in pairs), dtype=np.uint8).reshape(-1, 16))
        ids.append(np.asarray([r["example_id"] for r in pairs], dtype=np.int64))
    return (np.concatenate(keys) if keys else np.zeros((0, 16), np.uint8),
            np.concatenate(ids) if ids else np.zeros(0, np.int64))


def key_column(table) -> np.ndarray:
    """A cache table's pair_key column as [N, 16] uint8 (its Arrow buffer: no Python object per key)."""
    column = table.column("pair_key").combine_chunks()
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    return data[column.offset * 16:(column.offset + len(column)) * 16].reshape(-1, 16)


def _prefix(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[:, :8]).view(">u8").ravel()


class Reuse:
    """The values of earlier caches by pair_key: `find(keys)` -> (which keys are held, their columns). The keys
    are a sorted array, searched (a few numbers per cached pair, no Python object each)."""

    def __init__(self, sources: list[dict], keys: np.ndarray, columns: dict):
        self.sources = sources   # the manifest's `reused` entries, in --reuse order
        self.keys = keys         # [N, 16] in --reuse order
        self.columns = columns   # REFERENCE_COLUMNS + tokens + source (1-based: the source's place + 1)
        prefix = _prefix(keys)
        self.order = np.argsort(prefix, kind="stable")  # (stable: of equal keys, the first cache's first)
        self.sorted = prefix[self.order]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, dict]:
        """keys [M, 16] -> (held [M] bool, the held ones' columns in their order)."""
        want = _prefix(keys)
        pos = np.searchsorted(self.sorted, want)
        rows = np.full(len(keys), -1, dtype=np.int64)
        while True:  # the first entry of equal first 8 bytes whose 16 are equal too (another: the next one)
            live = (rows < 0) & (pos < len(self.sorted))
            live[live] = self.sorted[pos[live]] == want[live]
            if not live.any():
                break
            idx = np.flatnonzero(live)
            candidate = self.order[pos[idx]]
            same = (self.keys[candidate] == keys[idx]).all(1)
            rows[idx[same]] = candidate[same]
            pos[idx[~same]] += 1
        held = rows >= 0
        return held, {name: values[rows[held]] for name, values in self.columns.items()}


def check_source(cache_dir: str, fp: dict) -> dict:
    """One --reuse cache: complete, every shard as its manifest records, of this computation's model,
    tokenizer and dtype, keyed by tokens. Returns its manifest entry for ours."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"--reuse {cache_dir}: no {MANIFEST}, so not a complete reference cache")
    manifest = read_json(path)
    have = manifest["fingerprint"]
    if have.get("format_version", 1) < KEYED_SINCE:
        raise CacheError(f"--reuse {cache_dir}: a format-{have.get('format_version', 1)} cache, whose rows are not "
                         f"keyed by their tokens (format {KEYED_SINCE} and later are): it cannot be reused")
    differ = [k for k in ("model", "tokenizer", "dtype") if have.get(k) != fp[k]]
    if differ:
        raise CacheError(f"--reuse {cache_dir}: computed with another "
                         f"{describe_difference({k: fp[k] for k in differ}, {k: have.get(k) for k in differ})}: "
                         f"its values are not this model's in this dtype")
    bad = [f"{split}/{name}" for split, names in damaged(cache_dir).items() for name in names]
    if bad:
        raise CacheError(f"--reuse {cache_dir}: shard {bad[0]} is missing, does not match its manifest or is not in "
                         f"it{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")
    return {"cache": os.path.abspath(cache_dir), "data": have["data"],
            "manifest_sha256": sha256_file(path), "rows": 0}


def load(sources: list[dict]) -> Reuse | None:
    """The values of the caches check_source accepted (its entries, on one rank), keyed; the first cache that
    holds a key gives its values."""
    if not sources:
        return None
    parts = []
    for i, d in enumerate(entry["cache"] for entry in sources):
        manifest = read_json(os.path.join(d, MANIFEST))
        for split, entry in manifest["splits"].items():
            for meta in entry["shards"]:
                table = read_shard(os.path.join(d, split, meta["file"]))
                part = {name: table.column(name).to_numpy() for name in REFERENCE_COLUMNS + ("chosen_tokens",
                                                                                             "rejected_tokens")}
                part["source"] = np.full(table.num_rows, i + 1, dtype=np.int8)
                part["pair_key"] = key_column(table)
                parts.append(part)
    if not parts:
        return None
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return Reuse(sources, columns.pop("pair_key"), columns)


def counted(cache_dir: str, n_shards: dict, sources: list[dict]) -> list[dict] | None:
    """`sources` with the rows each gave this cache (its shards' `source` column), for the manifest; None
    without --reuse. Every shard is in place and recorded (write_manifest checks) when this runs."""
    if not sources:
        return None
    counts = np.zeros(len(sources) + 1, dtype=np.int64)
    for split in n_shards:  # each shard by its sidecar (written once it is in place; write_manifest hashes them)
        for side in glob.glob(os.path.join(cache_dir, split, "shard-*.json")):
            shard = os.path.join(cache_dir, split, read_json(side)["file"])
            counts += np.bincount(read_shard(shard).column("source").to_numpy(), minlength=len(counts))
    return [{**entry, "rows": int(counts[i + 1])} for i, entry in enumerate(sources)]


def describe(manifest: dict) -> str:
    """How many of a cache's values each source gave: one line."""
    total = sum(entry["rows"] for entry in manifest["splits"].values())
    reused = manifest.get("reused") or []
    taken = sum(e["rows"] for e in reused)
    return (f"{taken} of {total} pairs' values reused ("
            + ", ".join(f"{e['rows']} from {e['cache']}" for e in reused)
            + f"), {total - taken} computed")


def check_keys(cache) -> str:
    """Every row's pair_key against the key of the prepared pair of its example_id (a verified RefCache: the same
    example_ids): the values of each row, wherever they came from, are those of these exact tokens. One line, or a
    CacheError."""
    checked = 0
    for split, table in cache.tables.items():
        if "pair_key" not in table.column_names:
            return f"pair keys: none (a format-{cache.manifest['fingerprint']['format_version']} cache)"
        ds = cache.data[split]
        keys, ids = pair_keys(ds, np.arange(len(ds)))
        have_ids = table.column("example_id").to_numpy()
        mine, theirs = np.argsort(ids), np.argsort(have_ids)
        wrong = ids[mine][~(keys[mine] == key_column(table)[theirs]).all(1)]
        if wrong.size:
            raise CacheError(f"{cache.cache_dir}/{split}: {wrong.size} row(s) whose values were computed for other "
                             f"tokens than the prepared pair of their example_id (e.g. {wrong[:5].tolist()})"
                             f"{REPAIR_KEYS}")
        checked += len(ids)
    return f"pair keys: each of the {checked} rows' values belong to the exact tokens of its prepared pair"


REPAIR_KEYS = "; recompute the cache (without --reuse of the cache these rows came from)"
