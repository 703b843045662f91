"""Phase 0: load, validate, normalise and tokenize preference data.

    python -m dpo_ds.prepare --dataset ultrafeedback --tokenizer SFT_DIR --output_dir data/dpo_ultrafeedback
    python -m dpo_ds.prepare --dataset hh_rlhf --data_files hh/train.jsonl.gz hh/test.jsonl.gz --tokenizer SFT_DIR --output_dir X
    python -m dpo_ds.prepare --dataset my_prefs.jsonl --tokenizer SFT_DIR --output_dir X --on_bad_row skip

Writes OUTPUT_DIR/train, OUTPUT_DIR/eval (datasets.save_to_disk) and, last, OUTPUT_DIR/prepare_report.json.
"""
from __future__ import annotations

import os

import numpy as np

from dpo_ds import cli
from dpo_ds import config as C
from dpo_ds.data.encode import Encoder
from dpo_ds.data.prepared import REPORT, SPLITS, data_fingerprint, load_tokenizer, write_prepared
from dpo_ds.data.sources import BadRows, read_rows
from dpo_ds.errors import DataError, UserError
from dpo_ds.storage import owner
from dpo_ds.storage.fingerprint import tokenizer_fingerprint


def assign_eval(rows: list, fraction: float, seed: int) -> list:
    """Rows without a split of their own ("train") give a seeded `fraction` of themselves to eval."""
    if any(split == "eval" for _, split, _, _ in rows) or fraction == 0:
        return rows
    n_eval = max(1, round(fraction * len(rows)))
    held_out = set(np.random.default_rng(seed).permutation(len(rows))[:n_eval].tolist())
    return [(eid, "eval" if i in held_out else split, where, row) for i, (eid, split, where, row) in enumerate(rows)]


def render_prompts(encoder: Encoder, rows: list, bad: BadRows) -> list:
    """(example_id, split, row with `prompt_text`) for the rows whose prompt the chat template accepts."""
    out = []
    for eid, split, where, row in rows:
        try:
            out.append((eid, split, {**row, "prompt_text": encoder.render(row["prompt"], where)}))
        except DataError as e:
            bad.handle(e)
    return out


def tokenize(encoder: Encoder, rows: list, split: str, num_proc: int):
    import datasets

    ds = datasets.Dataset.from_dict({"example_id": [eid for eid, _, _ in rows],
                                     **{k: [row[k] for _, _, row in rows] for k in ("prompt_text", "chosen", "rejected")}})
    ds = ds.map(encoder.encode_batch, batched=True, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=["prompt_text", "chosen", "rejected"], desc=f"tokenize {split}")
    return ds.cast_column("example_id", datasets.Value("int64"))


def drop_identical(ds, where: dict, max_length: int, bad: BadRows):
    """Pairs whose sides are the same tokens once truncated (they differ only past --max_length) carry no
    preference and would train with zero gradient: bad rows, like pairs identical as text."""
    same = [eid for eid, flag in zip(ds["example_id"], ds["identical"]) if flag]
    for eid in same:
        bad.handle(DataError(where[eid], "rejected", f"identical to chosen in the first --max_length {max_length} "
                                                     f"tokens (they differ only after the cut): no preference left"))
    if same:
        ds = ds.filter(lambda flags: [not f for f in flags], input_columns="identical", batched=True)
    return ds.remove_columns("identical")


def after_fault(out_dir: str) -> str:
    if os.path.isfile(os.path.join(out_dir, REPORT)):
        return f"{out_dir} still holds its earlier prepared data, untouched; rerun the same command"
    return f"{out_dir} holds no usable data until prepare writes {REPORT} last; rerun the same command"


def run(cfg: C.PrepareConfig) -> dict:
    cli.on_fault(lambda: after_fault(cfg.output_dir))
    with owner.owned(cfg.output_dir, "prepared data", "--output_dir", "prepare"):
        return _run(cfg)


def _run(cfg: C.PrepareConfig) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    tok_fp = tokenizer_fingerprint(tokenizer)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    bad = BadRows(skip=cfg.on_bad_row == "skip")
    rows = assign_eval(read_rows(cfg.dataset, cfg.data_files, bad), cfg.eval_fraction, cfg.seed)
    where = {eid: w for eid, _, w, _ in rows}
    rows = render_prompts(encoder, rows, bad)
    if not rows:
        raise UserError(f"{cfg.dataset}: no usable rows ({len(bad.skipped)} skipped)")
    splits, stats = {}, {}
    for split in SPLITS:
        part = [r for r in rows if r[1] == split]
        if not part:
            continue
        ds = drop_identical(tokenize(encoder, part, split, cfg.num_proc), where, cfg.max_length, bad)
        if not len(ds):
            continue
        stats[split] = {"prompt_truncated": int(sum(ds["prompt_truncated"])),
                        "response_truncated": int(sum(ds["response_truncated"]))}
        splits[split] = ds.remove_columns(["prompt_truncated", "response_truncated"])
    if not splits:
        raise UserError(f"{cfg.dataset}: no usable rows ({len(bad.skipped)} skipped)")

    settings = {k: getattr(cfg, k) for k in ("max_length", "max_prompt_length", "eval_fraction", "seed")}
    settings["tokenizer"] = tok_fp
    report = write_prepared(cfg.output_dir, splits, {
        "source": cfg.dataset, "data_files": cfg.data_files, "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": tok_fp, "chat_template": encoder.chat,
        "settings": settings, "counts": {s: len(d) for s, d in splits.items()},
        "truncated": stats, "skipped_count": len(bad.skipped), "skipped": bad.skipped[:1000],
        "fingerprint": data_fingerprint(splits, settings),
    })
    print(f"prepared {report['counts']} from {cfg.dataset} -> {cfg.output_dir} "
          f"(skipped {len(bad.skipped)}, truncated {stats})")
    return report


def main(argv=None):
    cli.main_guard(lambda: run(cli.parse(C.PrepareConfig, argv, prog="python -m dpo_ds.prepare", doc=__doc__)))


if __name__ == "__main__":
    main()
