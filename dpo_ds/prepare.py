"""Phase 0: load, validate, normalise and tokenize preference data.

    python -m dpo_ds.prepare --dataset ultrafeedback --tokenizer SFT_DIR --output_dir data/dpo_ultrafeedback
    python -m dpo_ds.prepare --dataset hh_rlhf --data_files hh/train.jsonl.gz hh/test.jsonl.gz --tokenizer SFT_DIR --output_dir X
    python -m dpo_ds.prepare --dataset my_prefs.jsonl --tokenizer SFT_DIR --output_dir X --on_bad_row skip

Writes OUTPUT_DIR/train, OUTPUT_DIR/eval (datasets.save_to_disk) and, last, OUTPUT_DIR/prepare_report.json.

Memory does not grow with the data: the input is read twice as a stream (a local file by dpo_ds.data.sources
itself, JSON line by line and parquet a batch at a time; a hub dataset through `datasets`). The first pass validates every row and counts the usable ones (the seeded eval split needs their number);
the second renders, tokenizes and writes BATCH rows at a time (--dataset_num_proc processes encode batches in
turn), each split into its own Arrow stream file, hashed as it is read back and then moved into place as the
split's `save_to_disk` directory (dpo_ds.data.prepared).
"""
from __future__ import annotations

import collections
import multiprocessing
import os
from typing import Iterator

import numpy as np
from tqdm import tqdm

from dpo_ds import cli
from dpo_ds import config as C
from dpo_ds.data.encode import Encoder
from dpo_ds.data.prepared import (
    REPORT,
    SPLITS,
    SplitWriter,
    data_fingerprint,
    load_tokenizer,
    write_prepared,
)
from dpo_ds.data.sources import BadRows, normalized_rows
from dpo_ds.errors import DataError, UserError
from dpo_ds.storage import owner
from dpo_ds.storage.fingerprint import tokenizer_fingerprint

BATCH = 1000  # rows encoded and written at a time


def held_out(n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Which of `n_rows` usable rows (by position) a seeded `fraction` gives to eval (one bool per row)."""
    out = np.zeros(n_rows, dtype=bool)
    if fraction and n_rows:
        out[np.random.default_rng(seed).permutation(n_rows)[:max(1, round(fraction * n_rows))]] = True
    return out


def batches(cfg: C.PrepareConfig, to_eval: np.ndarray | None) -> Iterator[list]:
    """[(example_id, split, where, row)] of BATCH usable rows in input order: the second pass (bad rows were
    handled by the first and are passed over)."""
    batch, i = [], 0
    for eid, split, where, row in normalized_rows(cfg.dataset, cfg.data_files, None):
        if to_eval is not None and to_eval[i]:
            split = "eval"
        i += 1
        batch.append((eid, split, where, row))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


_encoder: Encoder | None = None  # a worker's (forked from prepare's process, which sets it first)


def encode(batch: list) -> tuple[list, dict, list]:
    """One batch -> (its rows' (example_id, split, where), the encoded columns of those the template
    accepted, [DataError] of those it refused)."""
    kept, errors, texts = [], [], {"prompt_text": [], "chosen": [], "rejected": []}
    for eid, split, where, row in batch:
        try:
            texts["prompt_text"].append(_encoder.render(row["prompt"], where))
        except DataError as e:
            errors.append(e)
            continue
        texts["chosen"].append(row["chosen"])
        texts["rejected"].append(row["rejected"])
        kept.append((eid, split, where))
    return kept, _encoder.encode_batch(texts) if kept else {}, errors


def encoded(cfg: C.PrepareConfig, to_eval: np.ndarray | None) -> Iterator[tuple[list, dict, list]]:
    """encode() over every batch, in order: here, or in --dataset_num_proc worker processes with at most two
    batches a worker in flight (the input is never read far ahead of what is written)."""
    if cfg.num_proc == 1:
        yield from map(encode, batches(cfg, to_eval))
        return
    with multiprocessing.get_context("fork").Pool(cfg.num_proc) as pool:
        pending = collections.deque()
        for batch in batches(cfg, to_eval):
            pending.append(pool.apply_async(encode, (batch,)))
            if len(pending) >= 2 * cfg.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def after_fault(out_dir: str) -> str:
    if os.path.isfile(os.path.join(out_dir, REPORT)):
        return f"{out_dir} still holds its earlier prepared data, untouched; rerun the same command"
    return f"{out_dir} holds no usable data until prepare writes {REPORT} last; rerun the same command"


def run(cfg: C.PrepareConfig) -> dict:
    cli.on_fault(lambda: after_fault(cfg.output_dir))
    with owner.owned(cfg.output_dir, "prepared data", "--output_dir", "prepare"):
        return _run(cfg)


def _run(cfg: C.PrepareConfig) -> dict:
    global _encoder
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    tok_fp = tokenizer_fingerprint(tokenizer)
    _encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    bad = BadRows(skip=cfg.on_bad_row == "skip")

    usable, own_eval = 0, False  # the first pass: every row checked, the usable ones counted
    for _, split, _, _ in tqdm(normalized_rows(cfg.dataset, cfg.data_files, bad), desc="prepare: read",
                               unit=" rows", mininterval=2.0):
        usable += 1
        own_eval |= split == "eval"
    if not usable:
        raise UserError(f"{cfg.dataset}: no usable rows ({bad.count} skipped)")
    to_eval = None if own_eval or not cfg.eval_fraction else held_out(usable, cfg.eval_fraction, cfg.seed)

    writers = {split: SplitWriter(cfg.output_dir, split) for split in SPLITS}
    try:
        stats = {split: {"prompt_truncated": 0, "response_truncated": 0} for split in SPLITS}
        bar = tqdm(total=usable, desc="prepare: tokenize", unit=" rows", mininterval=2.0)
        for kept, columns, errors in encoded(cfg, to_eval):
            for e in errors:
                bad.handle(e)
            rows = {split: [] for split in SPLITS}
            for i, (eid, split, where) in enumerate(kept):
                if columns["identical"][i]:  # the sides differ only past --max_length: no preference left
                    bad.handle(DataError(where, "rejected", f"identical to chosen in the first --max_length "
                                                            f"{cfg.max_length} tokens (they differ only after "
                                                            f"the cut): no preference left"))
                    continue
                rows[split].append(i)
                stats[split]["prompt_truncated"] += bool(columns["prompt_truncated"][i])
                stats[split]["response_truncated"] += bool(columns["response_truncated"][i])
            for split, picked in rows.items():
                if picked:
                    writers[split].write([kept[i][0] for i in picked], columns, picked)
            bar.update(len(kept) + len(errors))
        bar.close()
        splits = {split: w for split, w in writers.items() if w.close()}
        if not splits:
            raise UserError(f"{cfg.dataset}: no usable rows ({bad.count} skipped)")
        stats = {split: stats[split] for split in splits}

        settings = {k: getattr(cfg, k) for k in ("max_length", "max_prompt_length", "eval_fraction", "seed")}
        settings["tokenizer"] = tok_fp
        report = write_prepared(cfg.output_dir, splits, {
            "source": cfg.dataset, "data_files": cfg.data_files, "tokenizer": cfg.tokenizer,
            "tokenizer_fingerprint": tok_fp, "chat_template": _encoder.chat,
            "settings": settings, "counts": {s: w.rows for s, w in splits.items()},
            "truncated": stats, "skipped_count": bad.count, "skipped": bad.skipped,
            "fingerprint": data_fingerprint({s: w.batches() for s, w in splits.items()}, settings),
        })
    finally:
        for w in writers.values():
            w.discard()
    print(f"prepared {report['counts']} from {cfg.dataset} -> {cfg.output_dir} "
          f"(skipped {bad.count}, truncated {stats})")
    return report


def main(argv=None):
    cli.main_guard(lambda: run(cli.parse(C.PrepareConfig, argv, prog="python -m dpo_ds.prepare", doc=__doc__)))


if __name__ == "__main__":
    main()
