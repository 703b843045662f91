"""Prepared data on disk: the layout `dpo_ds.prepare` writes and every later phase reads.

    DATA_DIR/train, DATA_DIR/eval   one datasets.save_to_disk per split: example_id, {chosen,rejected}_{input_ids,labels}
    DATA_DIR/prepare_report.json    written last: settings, tokenizer fingerprint, a sha256 over every token id
                                    (`fingerprint`, what caches are matched against) and of every split file

A rewrite first removes the report, so a crash between writing the splits and the report leaves no report
(refused), never an old report beside new token ids; `verify_files` checks the files on disk against it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from dpo_ds.errors import UserError
from dpo_ds.storage.files import atomic_json, read_json
from dpo_ds.storage.fingerprint import sha256_file

SPLITS = ("train", "eval")
ID_COLUMNS = ("example_id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REPORT = "prepare_report.json"


class SplitWriter:
    """One split's rows streamed, batch by batch, into an Arrow file beside the prepared data
    (OUTPUT_DIR/.prepare-SPLIT.arrow, the same columns and types `save_to_disk` writes), opened memory-mapped as a
    datasets.Dataset once complete: write_prepared copies it into place; `discard` removes it."""

    def __init__(self, out_dir: str, split: str):
        self.path = os.path.join(out_dir, f".prepare-{split}.arrow")
        self.sink = self.writer = None

    def write(self, example_ids: list, columns: dict, picked: list) -> None:
        """Rows `picked` of the encoded `columns` (lists per column), with their example_ids."""
        import pyarrow as pa

        if self.writer is None:
            self.sink = pa.OSFile(self.path, "wb")
            self.writer = pa.ipc.new_stream(self.sink, split_schema())
        batch = {"example_id": example_ids, **{c: [columns[c][i] for i in picked] for c in ID_COLUMNS[1:]}}
        self.writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=split_schema()))

    def close(self):
        """The split as a datasets.Dataset (memory-mapped), or None when no row was written."""
        import datasets

        if self.writer is None:
            return None
        self.writer.close()
        self.sink.close()
        self.writer = None
        return datasets.Dataset.from_file(self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = None
        if os.path.exists(self.path):
            os.remove(self.path)


def split_schema():
    import pyarrow as pa

    return pa.schema([("example_id", pa.int64()), *((c, pa.list_(pa.int64())) for c in ID_COLUMNS[1:])])


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {name!r}: {e}") from None


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


def split_files(data_dir: str, split: str) -> dict:
    """{file name: sha256} of every file of one saved split."""
    path = os.path.join(data_dir, split)
    return {name: sha256_file(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def write_prepared(out_dir: str, splits: dict, report: dict) -> dict:
    """Replace every split of `out_dir` and write the report (with the files' hashes) last."""
    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.join(out_dir, REPORT)
    if os.path.exists(report_path):
        os.remove(report_path)  # from here until the new report is in place the directory is refused
    for split in SPLITS:  # a rerun replaces every split, so no stale split survives
        shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
    for split, ds in splits.items():
        ds.save_to_disk(os.path.join(out_dir, split))
    report = {**report, "files": {split: split_files(out_dir, split) for split in splits}}
    atomic_json(report_path, report)
    return report


def read_report(data_dir: str) -> dict:
    path = os.path.join(data_dir, REPORT)
    if not os.path.isfile(path):
        raise UserError(f"{data_dir}: no {REPORT}; is it the (complete) output of `python -m dpo_ds.prepare`? "
                        f"A prepare run that stopped early leaves none: rerun it")
    return read_json(path)


def verify_files(data_dir: str, report: dict, splits) -> None:
    """The split files on disk are the ones the report describes (so its fingerprint speaks for them)."""
    files = report.get("files")
    if files is None:
        raise UserError(f"{data_dir}/{REPORT} does not list its split files (written by an older dpo_ds): "
                        f"rerun dpo_ds.prepare")
    for split in splits:
        if split not in files:
            raise UserError(f"{data_dir}: no split {split!r} (prepared splits: {', '.join(files)})")
        if not os.path.isdir(os.path.join(data_dir, split)) or split_files(data_dir, split) != files[split]:
            raise UserError(f"{data_dir}/{split} differs from what {REPORT} describes (rewritten, modified, or "
                            f"a prepare run that did not finish): rerun dpo_ds.prepare")


def load_split(data_dir: str, split: str):
    import datasets

    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise UserError(f"{data_dir}: no split {split!r} (prepared splits: "
                        f"{', '.join(read_report(data_dir)['counts'])})")
    return datasets.load_from_disk(path)
