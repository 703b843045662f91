"""Prepared data on disk: the layout `dpo_ds.prepare` writes and every later phase reads.

    DATA_DIR/train, DATA_DIR/eval   one datasets.save_to_disk directory per split: example_id,
                                    {chosen,rejected}_{input_ids,labels}, prompt_length (since issue 39)
    DATA_DIR/prepare_report.json    written last: settings, tokenizer fingerprint, a sha256 over every token id
                                    (`fingerprint`, what caches are matched against) and of every split file

A rewrite first removes the report, so a crash between writing the splits and the report leaves no report
(refused), never an old report beside new token ids; `verify_files` checks the files on disk against it.
"""
from __future__ import annotations

import contextlib
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
    """One split's rows streamed, batch by batch, into an Arrow stream file beside the prepared data
    (OUTPUT_DIR/.prepare-SPLIT.arrow), with each pair's prompt length (`prompt_length`, an int32 the length
    functions read instead of the labels); write_prepared moves it into place as the split's data file."""

    def __init__(self, out_dir: str, split: str):
        self.path = os.path.join(out_dir, f".prepare-{split}.arrow")
        self.sink = self.writer = None
        self.rows = 0

    def write(self, example_ids: list, columns: dict, picked: list) -> None:
        """Rows `picked` of the encoded `columns` (lists per column), with their example_ids."""
        import pyarrow as pa

        if self.writer is None:
            self.sink = pa.OSFile(self.path, "wb")
            self.writer = pa.ipc.new_stream(self.sink, split_schema())
        batch = {"example_id": example_ids, **{c: [columns[c][i] for i in picked] for c in ID_COLUMNS[1:]},
                 "prompt_length": [columns["prompt_length"][i] for i in picked]}
        self.writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=split_schema()))
        self.rows += len(example_ids)

    def close(self) -> bool:
        """Finish the file; False when no row was written (no split)."""
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = None
        return self.rows > 0

    def batches(self):
        """The written rows' Arrow record batches, read as they come (not memory-mapped: memory holds one)."""
        import pyarrow as pa

        with pa.OSFile(self.path, "rb") as source:
            yield from pa.ipc.open_stream(source)

    def discard(self) -> None:
        """Remove the file (whatever state a fault left it in: a full disk fails the close too)."""
        with contextlib.suppress(OSError):
            self.close()
        self.writer = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def split_schema():
    import pyarrow as pa

    return pa.schema([("example_id", pa.int64()), *((c, pa.list_(pa.int64())) for c in ID_COLUMNS[1:]),
                      ("prompt_length", pa.int32())])


def install_split(stream_file: str, split_dir: str, fingerprint: str) -> None:
    """Make `stream_file` (an Arrow stream) the one data file of a `datasets.save_to_disk` directory, moved
    rather than copied: save_to_disk would read every row back through a memory map (the whole split resident)
    and write it again. The two JSON files are the ones save_to_disk writes for an unformatted dataset."""
    import dataclasses

    import datasets
    import pyarrow as pa

    os.makedirs(split_dir)
    data_file = "data-00000-of-00001.arrow"
    os.replace(stream_file, os.path.join(split_dir, data_file))
    state = {"_data_files": [{"filename": data_file}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    with open(os.path.join(split_dir, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    info = dataclasses.asdict(datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(
        pa.schema(split_schema()))))
    with open(os.path.join(split_dir, "dataset_info.json"), "w", encoding="utf-8") as f:
        json.dump({k: info[k] for k in sorted(info)}, f, indent=2)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {name!r}: {e}") from None


def data_fingerprint(splits: dict, settings: dict) -> str:
    """sha256 over the settings and every token id of every split, in example_id order, 1,024 rows at a time
    column by column (each value as its length and its ids, int64). `splits`: {name: its Arrow record batches
    in row order}, read as they come."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    one = np.int64(1).tobytes()
    for name in sorted(splits):
        h.update(name.encode())
        for batch in _regrouped(splits[name], 1024):
            for col in ID_COLUMNS:
                column = batch.column(col)
                if col == "example_id":
                    for v in column.to_numpy().astype(np.int64):
                        h.update(one + v.tobytes())
                    continue
                offsets = column.offsets.to_numpy()
                values = column.values.to_numpy().astype(np.int64, copy=False)
                for a, b in zip(offsets[:-1], offsets[1:]):
                    h.update(np.int64(b - a).tobytes() + values[a:b].tobytes())
    return h.hexdigest()


def _regrouped(batches, rows: int):
    """Arrow record batches -> record batches of exactly `rows` rows (the last fewer)."""
    import pyarrow as pa

    pending = None
    for batch in batches:
        pending = pa.Table.from_batches([batch]) if pending is None else pa.concat_tables(
            [pending, pa.Table.from_batches([batch])])
        while pending.num_rows >= rows:
            yield pending.slice(0, rows).combine_chunks().to_batches()[0]
            pending = pending.slice(rows)
    if pending is not None and pending.num_rows:
        yield pending.combine_chunks().to_batches()[0]


def split_files(data_dir: str, split: str) -> dict:
    """{file name: sha256} of every file of one saved split."""
    path = os.path.join(data_dir, split)
    return {name: sha256_file(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def write_prepared(out_dir: str, splits: dict, report: dict) -> dict:
    """Replace every split of `out_dir` with the written ones ({split: SplitWriter}) and write the report (with
    the files' hashes) last."""
    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.join(out_dir, REPORT)
    if os.path.exists(report_path):
        os.remove(report_path)  # from here until the new report is in place the directory is refused
    for split in SPLITS:  # a rerun replaces every split, so no stale split survives
        shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
    for split, writer in splits.items():
        install_split(writer.path, os.path.join(out_dir, split), report["fingerprint"][:16])
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
