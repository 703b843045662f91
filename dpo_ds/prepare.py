"""Phase 0: load, validate, normalise and tokenize preference data.

    python -m dpo_ds.prepare --dataset ultrafeedback --tokenizer SFT_DIR --output_dir data/dpo_ultrafeedback
    python -m dpo_ds.prepare --dataset hh_rlhf --data_files hh/train.jsonl.gz hh/test.jsonl.gz --tokenizer SFT_DIR --output_dir X
    python -m dpo_ds.prepare --dataset my_prefs.jsonl --tokenizer SFT_DIR --output_dir X --on_bad_row skip

Writes OUTPUT_DIR/train, OUTPUT_DIR/eval (datasets.save_to_disk) and OUTPUT_DIR/prepare_report.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from dpo_ds import config as C
from dpo_ds.encode import Encoder
from dpo_ds.fingerprint import tokenizer_fingerprint
from dpo_ds.sources import read_rows

SPLITS = ("train", "eval")
ID_COLUMNS = ("example_id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REPORT = "prepare_report.json"


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise C.UserError(f"cannot load tokenizer {name!r}: {e}") from None


def assign_eval(rows: list, fraction: float, seed: int) -> list:
    """Rows without a split of their own ("train") give a seeded `fraction` of themselves to eval."""
    if any(split == "eval" for _, split, _ in rows) or fraction == 0:
        return rows
    n_eval = max(1, round(fraction * len(rows)))
    held_out = set(np.random.default_rng(seed).permutation(len(rows))[:n_eval].tolist())
    return [(eid, "eval" if i in held_out else split, row) for i, (eid, split, row) in enumerate(rows)]


def data_fingerprint(splits: dict, settings: dict) -> str:
    """sha256 over the settings and every token id of every split, in example_id order."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(splits):
        h.update(name.encode())
        for batch in splits[name].select_columns(list(ID_COLUMNS)).iter(batch_size=1024):
            for col in ID_COLUMNS:
                for value in batch[col]:
                    arr = np.asarray(value, dtype=np.int64)
                    h.update(np.int64(arr.size).tobytes() + arr.tobytes())
    return h.hexdigest()


def read_report(data_dir: str) -> dict:
    path = os.path.join(data_dir, REPORT)
    if not os.path.isfile(path):
        raise C.UserError(f"{data_dir}: no {REPORT}; is it the output of `python -m dpo_ds.prepare`?")
    with open(path) as f:
        return json.load(f)


def load_split(data_dir: str, split: str):
    import datasets

    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise C.UserError(f"{data_dir}: no split {split!r} (prepared splits: "
                          f"{', '.join(read_report(data_dir)['counts'])})")
    return datasets.load_from_disk(path)


def run(cfg: C.PrepareConfig) -> dict:
    import datasets

    tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    rows, skipped = read_rows(cfg.dataset, cfg.data_files, skip_bad=cfg.on_bad_row == "skip")
    if not rows:
        raise C.UserError(f"{cfg.dataset}: no usable rows ({len(skipped)} skipped)")
    rows = assign_eval(rows, cfg.eval_fraction, cfg.seed)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    splits, stats = {}, {}
    for split in SPLITS:
        part = [(eid, row) for eid, s, row in rows if s == split]
        if not part:
            continue
        ds = datasets.Dataset.from_dict({"example_id": [eid for eid, _ in part],
                                         **{k: [row[k] for _, row in part] for k in ("prompt", "chosen", "rejected")}})
        ds = ds.map(encoder.encode_batch, batched=True, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                    remove_columns=["prompt", "chosen", "rejected"], desc=f"tokenize {split}")
        ds = ds.cast_column("example_id", datasets.Value("int64"))
        stats[split] = {"prompt_truncated": int(sum(ds["prompt_truncated"])),
                        "response_truncated": int(sum(ds["response_truncated"]))}
        splits[split] = ds.remove_columns(["prompt_truncated", "response_truncated"])

    settings = {k: getattr(cfg, k) for k in ("max_length", "max_prompt_length", "eval_fraction", "seed")}
    settings["tokenizer"] = tokenizer_fingerprint(tokenizer)
    report = {
        "source": cfg.dataset, "data_files": cfg.data_files, "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": settings["tokenizer"], "chat_template": bool(tokenizer.chat_template),
        "settings": settings, "counts": {s: len(d) for s, d in splits.items()},
        "truncated": stats, "skipped_count": len(skipped), "skipped": skipped[:1000],
        "fingerprint": data_fingerprint(splits, settings),
    }
    os.makedirs(cfg.output_dir, exist_ok=True)
    for split in SPLITS:  # a rerun replaces every split, so no stale split survives
        shutil.rmtree(os.path.join(cfg.output_dir, split), ignore_errors=True)
    for split, ds in splits.items():
        ds.save_to_disk(os.path.join(cfg.output_dir, split))
    with open(os.path.join(cfg.output_dir, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    print(f"prepared {report['counts']} from {cfg.dataset} -> {cfg.output_dir} "
          f"(skipped {len(skipped)}, truncated {stats})")
    return report


def main(argv=None):
    C.main_guard(lambda: run(C.parse(C.PrepareConfig, argv, prog="python -m dpo_ds.prepare")))


if __name__ == "__main__":
    main()
