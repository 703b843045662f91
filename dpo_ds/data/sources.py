"""Load preference data from the named hub datasets or local files and normalise every row to
`{"prompt": [messages], "chosen": str, "rejected": str}`.

A bad row raises `DataError` naming file, row (or line) and field; `normalized_rows` can instead collect it.
Rows are streamed: nothing here holds the whole input.
Hub loading is plain `datasets.load_dataset`; `--data_files` reads local copies in the hub's format.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from dpo_ds.errors import DataError, UserError

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------- field checks

def text_field(row: dict, name: str, where: str, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise DataError(where, name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(where, name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(where, name, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\\ud83d" without its pair decodes to a str no tokenizer takes
        raise DataError(where, name, f"not valid Unicode: a lone surrogate {value[e.start]!r} at character "
                                     f"{e.start}") from None
    return value


def messages_field(value, name: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(where, name, "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(where, f"{name}[{i}]", f"must be a {{role, content}} message, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise DataError(where, f"{name}[{i}].role", f"unknown role {m.get('role')!r} (expected one of {ROLES})")
        out.append({"role": m["role"], "content": text_field(m, "content", f"{where} {name}[{i}]")})
    return out


def response_field(row: dict, name: str, where: str) -> str:
    """A response given as a string, or as a message list ending in the assistant's turn."""
    value = row.get(name)
    if isinstance(value, list):
        messages = messages_field(value, name, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(where, name, "the last message must be the assistant's response")
        return messages[-1]["content"]
    return text_field(row, name, where)


def distinct(prompt: list[dict], chosen: str, rejected: str, where: str) -> dict:
    if chosen.strip() == rejected.strip():
        raise DataError(where, "rejected", "identical to chosen: the pair carries no preference")
    return {"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip()}


# ---------------------------------------------------------------- per-dataset normalisers

def normalize_plain(row: dict, where: str) -> dict:
    """`{"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}`."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = messages_field(prompt, "prompt", where)
    else:
        messages = [{"role": "user", "content": text_field(row, "prompt", where)}]
    return distinct(messages, response_field(row, "chosen", where), response_field(row, "rejected", where), where)


def normalize_ultrafeedback(row: dict, where: str) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized: `chosen`/`rejected` are whole conversations."""
    chosen = messages_field(row.get("chosen"), "chosen", where)
    rejected = messages_field(row.get("rejected"), "rejected", where)
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise DataError(where, name, "the last message must be the assistant's response")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(where, "rejected", "the conversation before the last turn differs from chosen's")
    prompt = chosen[:-1] or [{"role": "user", "content": text_field(row, "prompt", where)}]
    return distinct(prompt, chosen[-1]["content"], rejected[-1]["content"], where)


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def split_hh(transcript: str, name: str, where: str) -> tuple[list[dict], str]:
    """'\\n\\nHuman: q\\n\\nAssistant: a …' -> (messages before the last Assistant turn, last reply)."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        raise DataError(where, name, "no '\\n\\nAssistant:' turn in the transcript")
    head, reply = transcript[:cut], transcript[cut + len("\n\nAssistant:"):]
    parts = HH_TURN.split(head)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(where, name, "the transcript must start with '\\n\\nHuman:'")
    messages = [{"role": HH_ROLE[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    for i, m in enumerate(messages):
        if not m["content"]:
            raise DataError(where, f"{name} turn {i + 1}", "is empty")
    if HH_TURN.search(reply):
        raise DataError(where, name, "the transcript ends with a Human turn after the last Assistant reply: "
                                     "there is no response to prefer")
    if not reply.strip():
        raise DataError(where, name, "the last Assistant reply is empty")
    return messages, reply


def normalize_hh(row: dict, where: str) -> dict:
    """Anthropic/hh-rlhf: `chosen`/`rejected` are whole transcripts sharing all but the last reply."""
    prompt_c, chosen = split_hh(text_field(row, "chosen", where), "chosen", where)
    prompt_r, rejected = split_hh(text_field(row, "rejected", where), "rejected", where)
    if prompt_c != prompt_r:
        raise DataError(where, "rejected", "the conversation before the last Assistant turn differs from chosen's")
    return distinct(prompt_c, chosen, rejected, where)


def normalize_orca(row: dict, where: str) -> dict:
    """Intel/orca_dpo_pairs: `system` (may be empty), `question`, `chosen`, `rejected`."""
    system = text_field(row, "system", where, allow_empty=True) if row.get("system") is not None else ""
    prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": text_field(row, "question", where)}]
    return distinct(prompt, text_field(row, "chosen", where), text_field(row, "rejected", where), where)


@dataclass(frozen=True)
class Source:
    hub_id: str | None
    splits: dict            # hub split name -> "train" | "eval"
    normalize: Callable[[dict, str], dict]


NAMED = {
    "ultrafeedback": Source("HuggingFaceH4/ultrafeedback_binarized",
                            {"train_prefs": "train", "test_prefs": "eval"}, normalize_ultrafeedback),
    "hh_rlhf": Source("Anthropic/hh-rlhf", {"train": "train", "test": "eval"}, normalize_hh),
    "orca_dpo": Source("Intel/orca_dpo_pairs", {"train": "train"}, normalize_orca),
}
LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def resolve_named(dataset: str | None) -> Source | None:
    """The named source `dataset` is: its short name, or its hub id (as TRL's --dataset_name gives it)."""
    by_hub_id = {source.hub_id: source for source in NAMED.values()}
    return NAMED.get(dataset) or by_hub_id.get(dataset)


def resolve_source(dataset: str) -> Source:
    if resolve_named(dataset):
        return resolve_named(dataset)
    if dataset.endswith(LOCAL_EXTENSIONS):
        if not os.path.isfile(dataset):
            raise UserError(f"--dataset {dataset}: no such file")
        return Source(None, {"train": "train"}, normalize_plain)
    raise UserError(f"--dataset {dataset!r}: expected one of {', '.join(NAMED)} (or its hub id) or a local "
                    f"{'/'.join(LOCAL_EXTENSIONS)} file")


# ---------------------------------------------------------------- raw rows

def split_of_file(spec: str, source: Source) -> tuple[str, str]:
    """'SPLIT=PATH' or 'PATH' -> (our split "train"/"eval", path); test* file names go to eval."""
    name, sep, path = spec.partition("=")
    if not sep or os.path.exists(spec):
        name, path = "", spec
    aliases = {**source.splits, "train": "train", "eval": "eval", "test": "eval", "validation": "eval"}
    if name:
        if name not in aliases:
            raise UserError(f"--data_files {spec}: unknown split {name!r} (use one of {', '.join(aliases)})")
        return aliases[name], path
    base = os.path.basename(path).lower()
    return ("eval" if base.startswith(("test", "eval")) else "train"), path


def read_json_lines(path: str) -> Iterator[tuple[str, object]]:
    """(where, row) for a .jsonl or .json file, where = 'file line N'; unparseable lines yield a DataError.
    Line by line (a JSON array is one document: it is read whole)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith((".json", ".json.gz")):
            first = f.read(1)
            while first.isspace():  # the first character that is not white space says array or lines
                first = f.read(1)
            if first == "[":
                f.seek(0)
                text = f.read()
                try:
                    rows = json.loads(text)
                except json.JSONDecodeError as e:
                    yield f"{path} line {e.lineno}", DataError(f"{path} line {e.lineno}", None,
                                                               f"not valid JSON ({e.msg})")
                    return
                for i, row in enumerate(rows):
                    yield f"{path} row {i + 1}", row
                return
            f.seek(0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path} line {n}", DataError(f"{path} line {n}", None, f"not valid JSON ({e.msg})")


def load_file(path: str) -> Iterator[tuple[str, object]]:
    """Rows of one local file, streamed: JSON line by line (each line its own verdict), parquet a row group's
    batch at a time. (Not through `datasets.load_dataset`: it converts the whole file into an Arrow copy in the
    cache directory first, and reading that copy back through a memory map put the whole of it in resident
    memory: 0.17 GB more at 200k pairs than at 2k.)"""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if not path.endswith(".parquet"):
        yield from read_json_lines(path)
        return
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", row
    except (OSError, ValueError) as e:  # (pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError)
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def load_hub(source: Source) -> Iterator[tuple[str, str, object]]:
    import datasets

    for hub_split, split in source.splits.items():
        try:
            ds = datasets.load_dataset(source.hub_id, split=hub_split)
        except Exception as e:  # noqa: BLE001 - offline, unreachable, renamed: many exception types
            raise UserError(f"cannot load {source.hub_id} [{hub_split}] from the hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); without network, download its files "
                            f"and pass them with --data_files") from None
        for i, row in enumerate(ds):
            yield split, f"{source.hub_id}[{hub_split}] row {i + 1}", row


def iter_raw(dataset: str, data_files: list | None) -> Iterator[tuple[str, str, object]]:
    """(split, where, raw row) in a fixed order: the order defines each row's `example_id`."""
    source = resolve_source(dataset)
    if source.hub_id is None:
        if data_files:
            raise UserError("--data_files is for local copies of a named dataset; a local --dataset file "
                            "is read directly")
        for where, row in load_file(dataset):
            yield "train", where, row
        return
    if not data_files:
        yield from load_hub(source)
        return
    files = sorted((split_of_file(spec, source) for spec in data_files), key=lambda sp: sp[0] != "train")
    for split, path in files:
        for where, row in load_file(path):
            yield split, where, row


class BadRows:
    """What to do with a bad row: stop with its error (the default), or skip it, count it and remember why (the
    first KEPT of them: a report of a million bad rows would hold a million entries)."""

    KEPT = 1000

    def __init__(self, skip: bool):
        self.skip, self.skipped, self.count = skip, [], 0

    def handle(self, e: DataError) -> None:
        if not self.skip:
            raise DataError(e.where, e.field, e.reason + " (rerun with --on_bad_row skip to skip such "
                                                         "rows and list them in the report)") from None
        self.count += 1
        if len(self.skipped) < self.KEPT:
            self.skipped.append({"where": e.where, "field": e.field, "reason": e.reason})


def normalized_rows(dataset: str, data_files: list | None, bad: BadRows | None) -> Iterator[tuple[int, str, str, dict]]:
    """(example_id, split, where, normalised row) of each usable row, streamed in input order (the position
    in the input is the example_id); a bad row goes to `bad` (None: passed over, as a second pass does)."""
    normalize = resolve_source(dataset).normalize
    for example_id, (split, where, raw) in enumerate(iter_raw(dataset, data_files)):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(where, None, f"expected a JSON object, got {type(raw).__name__}")
            row = normalize(raw, where)
        except DataError as e:
            if bad is not None:
                bad.handle(e)
            continue
        yield example_id, split, where, row
