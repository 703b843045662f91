"""The one batch builder of every phase: preference pairs -> model rows in a layout (dpo_ds.model.layout),
plus length grouping and row reads.

Every layout gives the same per-sequence log-probs as `plain` (to fp32 rounding: only the order of sums
differs), so a cache written with one layout serves a run with any other. A batch holds the rows
(`input_ids`, `attention_mask`, `position_ids`) and, for each response token, where it is predicted:
`positions` (flat index into the rows), `targets` (the token) and `sequence` (0..B-1 chosen, B..2B-1
rejected), so one forward scores both sides of every pair.

Masks: sdpa and eager take a 4-D mask `[rows, 1, T, T]` (True = may attend; SequenceLogps turns it into an
additive float mask for eager), which expresses both layouts; padding positions attend only to padding, so
no softmax row is empty. flash_attention_2 takes no mask: it packs through `position_ids` alone, in one row
(transformers' variable-length path), and cannot express a shared prompt.
A row is at most as long as the batch's longest segment (prompt + chosen + rejected when shared), so its
mask costs at most that length squared in bytes and packing never makes a row longer than the longest
sequence it holds.
"""
from __future__ import annotations

import numpy as np
import torch

from dpo_ds.data.encode import IGNORE
from dpo_ds.model.layout import Layout


def in_view(ds, per_row: np.ndarray) -> np.ndarray:
    """Values for each row of `ds`'s table -> for each row of `ds` (a selected view picks its rows)."""
    return per_row if ds._indices is None else per_row[ds._indices.column(0).to_numpy()]


def side_lengths(ds) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each pair's chosen and of its rejected sequence, from Arrow's list offsets: no token is read."""
    import pyarrow.compute as pc

    return tuple(in_view(ds, pc.list_value_length(ds.data.column(f"{side}_input_ids")).to_numpy().astype(np.int64))
                 for side in ("chosen", "rejected"))


def prompt_lengths(ds, side: str = "chosen", rows_at_once: int = 4096) -> np.ndarray:
    """Prompt tokens of each pair: the `prompt_length` column prepare writes (both sides share the prompt), or
    for data prepared before it, the -100 labels of `side` counted `rows_at_once` rows at a time (the labels
    are read, never held for the whole split)."""
    import pyarrow.compute as pc

    if "prompt_length" in ds.data.column_names:
        return in_view(ds, ds.data.column("prompt_length").to_numpy().astype(np.int64))
    counts = []
    for chunk in ds.data.column(f"{side}_labels").chunks:
        for start in range(0, len(chunk), rows_at_once):
            part = chunk.slice(start, rows_at_once)
            ignored = pc.list_parent_indices(part).to_numpy()[pc.list_flatten(part).to_numpy() == IGNORE]
            counts.append(np.bincount(ignored, minlength=len(part)))
    return in_view(ds, np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64))


def pair_lengths(ds) -> np.ndarray:
    """Padded length of each pair: max(len(chosen), len(rejected))."""
    return np.maximum(*side_lengths(ds))


def longest_row(ds) -> int:
    """The longest chosen or rejected sequence of `ds` in tokens."""
    return int(max(side.max(initial=0) for side in side_lengths(ds)))


def pad_and_eos(tokenizer) -> tuple[int, int]:
    """Padding id (the EOS when the tokenizer has no pad token: padded positions are masked anyway), EOS id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad, tokenizer.eos_token_id


def take(ds, rows) -> list[dict]:
    """Rows of a datasets.Dataset as dicts, read in one Arrow take (not one lookup per row)."""
    cols = ds[[int(i) for i in rows]]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def collate(rows: list[dict], pad_id: int) -> dict:
    """B pairs in the plain layout (dpo_ds.model.layout): input_ids, attention_mask, labels [2B, T] (rows 0..B-1
    chosen, B..2B-1 rejected), the scored positions (position t predicts labels[t + 1]) and example_id [B]
    (the key of the pair's cached reference values)."""
    seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    label_t = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        input_ids[i, :len(s)] = torch.as_tensor(s)
        label_t[i, :len(l)] = torch.as_tensor(l)
        mask[i, :len(s)] = 1
    targets = label_t[:, 1:]
    where = (targets != IGNORE).nonzero()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "position_ids": None,
            "positions": where[:, 0] * T + where[:, 1], "targets": targets[targets != IGNORE], "sequence": where[:, 0],
            "example_id": torch.tensor([r["example_id"] for r in rows], dtype=torch.long),
            "tokens": int(mask.sum()), "slots": mask.numel()}


def dummy_batch(pad_id: int, eos_id: int) -> dict:
    """A one-token batch for ranks with no work left, so collective forwards stay in step under ZeRO-3."""
    return collate([{"example_id": -1, "chosen_input_ids": [pad_id, eos_id], "chosen_labels": [IGNORE, eos_id],
                     "rejected_input_ids": [pad_id, eos_id], "rejected_labels": [IGNORE, eos_id]}], pad_id)


def first_label(labels: list) -> int:
    """Index of the first response token (the prompt's length); len(labels) when there is none."""
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))


class _Segment:
    """Tokens that share one block of the attention mask: their ids, position_ids, branch (0 = seen by
    every later token of the segment, 1 = chosen, 2 = rejected: a branch sees 0 and itself) and targets
    (position in the segment, target token, sequence index)."""

    def __init__(self):
        self.ids, self.pos, self.branch, self.targets = [], [], [], []

    def add(self, ids: list, pos: list, branch: int) -> int:
        start = len(self.ids)
        self.ids += ids
        self.pos += pos
        self.branch += [branch] * len(ids)
        return start

    def __len__(self) -> int:
        return len(self.ids)


def _targets(labels: list, at) -> list:
    """(position predicting token t, token) for each response token t >= 1; at(t - 1) places position t - 1."""
    return [(at(t - 1), label) for t, label in enumerate(labels) if t >= 1 and label != IGNORE]


def segments(row: dict, i: int, B: int, share_prompt: bool) -> list[_Segment]:
    """Pair i of B as one shared segment, or (no shared prompt, or the two sides do not start with the same
    prompt) one segment per side."""
    ci, cl, ri, rl = row["chosen_input_ids"], row["chosen_labels"], row["rejected_input_ids"], row["rejected_labels"]
    P = first_label(cl)
    if share_prompt and 1 <= P == first_label(rl) and ci[:P] == ri[:P]:
        seg = _Segment()
        seg.add(ci[:P], list(range(P)), 0)
        seg.add(ci[P:], list(range(P, len(ci))), 1)
        r0 = seg.add(ri[P:], list(range(P, len(ri))), 2)
        seg.targets = [(p, tok, i) for p, tok in _targets(cl, lambda q: q)]
        seg.targets += [(p, tok, B + i) for p, tok in _targets(rl, lambda q: q if q < P else r0 + q - P)]
        return [seg]
    out = []
    for ids, labels, s in ((ci, cl, i), (ri, rl, B + i)):
        seg = _Segment()
        seg.add(ids, list(range(len(ids))), 0)
        seg.targets = [(p, tok, s) for p, tok in _targets(labels, lambda q: q)]
        out.append(seg)
    return out


def lengths(ds, layout: Layout) -> np.ndarray:
    """Tokens each pair of `ds` puts in a row in `layout`, the key that groups similar pairs into a batch:
    the longer side in the plain layout, prompt + both responses when the prompt is shared (a few numbers per
    pair: see side_lengths and prompt_lengths)."""
    if not layout.share_prompt:
        return pair_lengths(ds)
    chosen, rejected = side_lengths(ds)
    return chosen + rejected - prompt_lengths(ds)


def _rows(segs: list[_Segment], layout: Layout) -> list[list[_Segment]]:
    """Segments -> rows: one each, all in one (flash), or first-fit by decreasing length into rows as long
    as the longest segment."""
    if not layout.packing:
        return [[s] for s in segs]
    if layout.one_row:
        return [segs]
    budget = max(len(s) for s in segs)
    rows, fill = [], []
    for s in sorted(segs, key=len, reverse=True):
        j = next((j for j, f in enumerate(fill) if f + len(s) <= budget), None)
        if j is None:
            rows.append([s])
            fill.append(len(s))
        else:
            rows[j].append(s)
            fill[j] += len(s)
    return rows


def build(rows: list[dict], layout: Layout, pad_id: int) -> dict:
    """B prepared pairs -> one batch in `layout` (see the module docstring). `tokens` counts the positions
    the model computes, `slots` those plus padding."""

    if layout.plain:
        return collate(rows, pad_id)
    B = len(rows)
    packed = _rows([s for i, r in enumerate(rows) for s in segments(r, i, B, layout.share_prompt)], layout)
    T = max(sum(len(s) for s in row) for row in packed)
    R = len(packed)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    position_ids = np.zeros((R, T), dtype=np.int64)
    seg_id = np.full((R, T), -1, dtype=np.int64)
    branch = np.zeros((R, T), dtype=np.int64)
    positions, targets, sequence = [], [], []
    for r, row in enumerate(packed):
        start = 0
        for k, s in enumerate(row):
            end = start + len(s)
            input_ids[r, start:end], position_ids[r, start:end] = s.ids, s.pos
            seg_id[r, start:end], branch[r, start:end] = k, s.branch
            for p, tok, seq in s.targets:
                positions.append(r * T + start + p)
                targets.append(tok)
                sequence.append(seq)
            start = end
        position_ids[r, start:] = np.arange(T - start)  # padding: a segment of its own
    tokens = int((seg_id >= 0).sum())
    batch = {"input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(position_ids),
             "attention_mask": None if layout.one_row else block_mask(torch.from_numpy(seg_id), torch.from_numpy(branch)),
             "positions": torch.tensor(positions, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
             "sequence": torch.tensor(sequence, dtype=torch.long),
             "example_id": torch.tensor([r["example_id"] for r in rows], dtype=torch.long),
             "tokens": tokens, "slots": R * T}
    return batch


def block_mask(seg_id: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """seg_id, branch [R, T] -> bool [R, 1, T, T]: query q may attend to key k <= q of its own segment on
    branch 0 or its own branch (padding, seg_id -1, forms one causal segment of its own)."""
    T = seg_id.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = seg_id[:, :, None] == seg_id[:, None, :]
    seen = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (same & seen & causal)[:, None]
