"""Scale benchmark (issue 39): what each phase costs as the number of pairs grows, before the first step.

    python scripts/bench_scale.py [--pairs 2000 20000 200000] [--num_proc 1] [--work DIR] [--out runs/bench_scale]

For each size: generated pairs (the embedded tiny model's sorting task with long lists: about 280 tokens a
sequence, no download), then, each phase as a user runs it (`python -m ...`, a fresh process):
  prepare       the whole phase: wall time, pairs/s, peak resident memory (the process and its workers);
  precompute    start-up: launch to the first batch done (the line precompute prints), peak memory until then;
  train         start-up: launch to the first optimizer step done (train's line), peak memory until then.
train reads a cache with placeholder values written here through dpo_ds.cache for the whole split (computing a
200k-pair reference takes hours on this CPU; the start-up reads the cache's manifest, shards and example_ids,
never its values). Peak memory is sampled every 50 ms over the process tree: resident set size (psutil) and, in
brackets, its anonymous part (/proc: RssAnon), which leaves out the pages of files read through a memory map.
Prints a Markdown table, writes OUT/bench_scale.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# precompute's start-up line; before it existed, its progress bar's first update (a later point: the bar
# updates at most every 2 s)
FIRST_BATCH = r"first batch done|precompute \w+ \(rank 0\): +\d+%\|[^|]*\| *[1-9]"


def generate(path: str, n: int, seed: int = 0) -> None:
    """n pairs: sort 3-150 numbers below 300 (about 300 tokens a sequence on average)."""
    from dpo_ds.tiny import make_pair

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(make_pair(rng, max_items=150, max_value=300)) + "\n")


class Watch:
    """A command's wall time and the peak resident memory of its process tree; stops it at a line matching
    `until` (on stdout or stderr) when given."""

    def __init__(self, cmd: list, until: str | None = None, timeout: float = 3600):
        env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        t0, peak, lines, self.matched = time.time(), 0, [], None
        p = subprocess.Popen([sys.executable, *map(str, cmd)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env, cwd=ROOT)

        def read():  # progress bars end their updates with \r: split on both
            buf = b""
            for block in iter(lambda: p.stdout.read1(65536), b""):
                *done, buf = re.split(rb"[\r\n]", buf + block)
                lines.extend(x.decode(errors="replace") for x in done)
            lines.append(buf.decode(errors="replace"))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        proc, seen, anon = psutil.Process(p.pid), 0, 0
        while p.poll() is None and time.time() - t0 < timeout:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(q.memory_info().rss for q in tree))
                anon = max(anon, sum(rss_anon(q.pid) for q in tree))
            except psutil.Error:
                pass
            if until:
                self.matched = next((x for x in lines[seen:] if re.search(until, x)), None)
                seen = len(lines)
                if self.matched:
                    break
            time.sleep(0.05)
        self.seconds = time.time() - t0
        if p.poll() is None:
            for q in [*proc.children(recursive=True), proc]:
                with contextlib.suppress(psutil.Error):
                    q.kill()
        p.wait()
        reader.join(5)
        self.rc, self.peak, self.anon, self.lines = p.returncode, peak, anon, lines
        if until and not self.matched:
            self.matched = next((x for x in lines if re.search(until, x)), None)
        if (until and not self.matched) or (not until and self.rc):
            raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ended ({self.rc}) without "
                               f"{until or 'success'}: {' | '.join(lines[-8:])}")


def rss_anon(pid: int) -> int:
    """Resident anonymous memory (the heap: what a memory limit takes first), without the resident pages of
    memory-mapped files (page cache the kernel reclaims: Arrow files read through a map count in RSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def placeholder_cache(model: str, data: str, out: str) -> None:
    """A complete cache of `data` for `model` in fp32 with zero values (and each row's example_id for its key),
    through dpo_ds.cache's own writer."""
    import numpy as np

    from dpo_ds import cache
    from dpo_ds.data.prepared import load_split, load_tokenizer, read_report
    from dpo_ds.model.batch import prompt_lengths, side_lengths
    from dpo_ds.storage.fingerprint import tokenizer_fingerprint

    report = read_report(data)
    fp = cache.fingerprint(model, tokenizer_fingerprint(load_tokenizer(model)), report, "fp32")
    shard_size, splits = 4096, list(report["counts"])
    cache.write_plan(out, fp, {"shard_size": shard_size, "batch_size": 8, "split_names": splits})
    n_shards = {}
    for split in splits:
        ds = load_split(data, split)
        ids = ds.data.column("example_id").to_numpy()
        tokens = [length - prompt_lengths(ds, side) for side, length in zip(("chosen", "rejected"),
                                                                             side_lengths(ds))]
        n_shards[split] = 0
        for n, start in enumerate(range(0, len(ids), shard_size)):
            rows = slice(start, start + shard_size)
            zeros = np.zeros(len(ids[rows]), dtype=np.float32)
            cache.write_shard(out, split, 0, n, {"example_id": ids[rows], **{c: zeros for c in cache.REFERENCE_COLUMNS},
                                                 "chosen_tokens": tokens[0][rows].astype(np.int32),
                                                 "rejected_tokens": tokens[1][rows].astype(np.int32),
                                                 "pair_key": [int(i).to_bytes(16, "little") for i in ids[rows]],
                                                 "source": np.zeros(len(zeros), dtype=np.int8)})
            n_shards[split] = n + 1
    cache.write_manifest(out, fp, n_shards, {"placeholder": True})


def gib(b: int) -> float:
    return b / 2 ** 30


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--pairs", type=int, nargs="+", default=[2000, 20000, 200000])
    a.add_argument("--num_proc", type=int, default=1, help="prepare's --dataset_num_proc")
    a.add_argument("--work", default="/tmp/dpo_ds_bench_scale")
    a.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_scale"))
    args = a.parse_args()
    from dpo_ds.tiny import build

    os.makedirs(args.work, exist_ok=True)
    model = os.path.join(args.work, "tiny", "model")
    if not os.path.isdir(model):
        model = build(os.path.join(args.work, "tiny"), num_examples=8)
    results = []
    for n in args.pairs:
        w = os.path.join(args.work, str(n))
        subprocess.run(["rm", "-rf", w], check=True)
        os.makedirs(w)
        src, data, cache_dir = (os.path.join(w, x) for x in ("prefs.jsonl", "data", "cache"))
        generate(src, n)
        prep = Watch(["-m", "dpo_ds.prepare", "--dataset", src, "--tokenizer", model, "--output_dir", data,
                      "--max_length", 1024, "--dataset_num_proc", args.num_proc])
        tokens = sum(os.path.getsize(os.path.join(data, s, f)) for s in ("train", "eval")
                     for f in os.listdir(os.path.join(data, s)) if f.endswith(".arrow"))
        pre = Watch(["-m", "dpo_ds.precompute", "--model", model, "--data", data, "--output_dir",
                     os.path.join(w, "cache_real")], until=FIRST_BATCH)
        placeholder_cache(model, data, cache_dir)
        train = Watch(["-m", "dpo_ds.train", "--deepspeed", os.path.join(ROOT, "ds_configs", "zero0_cpu.json"),
                       "--model", model, "--data", data, "--ref_cache", cache_dir, "--output_dir",
                       os.path.join(w, "train"), "--max_steps", 1, "--micro_batch_size", 2, "--grad_accum", 1,
                       "--eval_every", 0, "--save_every", 0, "--report_to", "none"], until=r"first step done")
        row = {"pairs": n, "prepared_bytes": tokens,
               "prepare": {"seconds": prep.seconds, "pairs_per_s": n / prep.seconds, "peak_rss_bytes": prep.peak,
                           "peak_anon_bytes": prep.anon},
               "precompute_startup": {"seconds": pre.seconds, "peak_rss_bytes": pre.peak, "peak_anon_bytes": pre.anon,
                                      "line": pre.matched},
               "train_startup": {"seconds": train.seconds, "peak_rss_bytes": train.peak,
                                 "peak_anon_bytes": train.anon, "line": train.matched}}
        results.append(row)
        print(json.dumps(row), flush=True)
    head = ("| pairs | prepared | prepare wall | pairs/s | prepare peak RSS (anon) | precompute start-up | its peak "
            "| train start-up | its peak |\n|---|---|---|---|---|---|---|---|---|")

    def mem(r: dict) -> str:
        return f"{gib(r['peak_rss_bytes']):.2f} GiB ({gib(r['peak_anon_bytes']):.2f})"
    body = [f"| {r['pairs']:,} | {r['prepared_bytes'] / 2 ** 20:.0f} MB | {r['prepare']['seconds']:.1f} s | "
            f"{r['prepare']['pairs_per_s']:.0f} | {mem(r['prepare'])} | {r['precompute_startup']['seconds']:.1f} s | "
            f"{mem(r['precompute_startup'])} | {r['train_startup']['seconds']:.1f} s | {mem(r['train_startup'])} |"
            for r in results]
    table = "\n".join([head, *body])
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_scale.json"), "w") as f:
        json.dump({"num_proc": args.num_proc, "cpus": os.cpu_count(), "results": results}, f, indent=1)
    with open(os.path.join(args.out, "bench_scale.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
