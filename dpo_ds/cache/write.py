"""Writing the cache (precompute): shards written atomically and recorded with their sha256, the plan first, the
manifest last; a cache that was started is resumed, a damaged one reopened for exactly its damaged shards."""
from __future__ import annotations

import glob
import os

import pyarrow as pa

from dpo_ds.cache.format import MANIFEST, PLAN, SCHEMA, SHARD_RE, describe_difference, same_computation, shard_path
from dpo_ds.errors import CacheError
from dpo_ds.storage import owner
from dpo_ds.storage.files import atomic_json, read_json
from dpo_ds.storage.fingerprint import sha256_file


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


def write_manifest(cache_dir: str, fp: dict, splits: dict, stats: dict, reused: list | None = None) -> dict:
    """The manifest, last: every split's shards (all complete), the run's stats, and with --reuse the caches
    whose values it copied (dpo_ds.cache.reuse.counted)."""
    manifest = {"fingerprint": fp, "splits": {}, "stats": stats, **({"reused": reused} if reused else {})}
    for split, n_shards in splits.items():
        shards = complete_shards(cache_dir, split)
        missing = sorted(set(range(n_shards)) - set(shards))
        if missing:
            raise CacheError(f"{cache_dir}/{split}: shards {missing[:10]} are not complete; rerun to finish them")
        metas = [shards[n] for n in range(n_shards)]
        manifest["splits"][split] = {"rows": sum(m["rows"] for m in metas), "shards": metas}
    atomic_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest
