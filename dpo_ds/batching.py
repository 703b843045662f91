"""Batches of preference pairs: length grouping, row reads, and the plain layout (chosen and rejected rows in one
tensor); dpo_ds.layout builds the others."""
from __future__ import annotations

import numpy as np
import torch

from dpo_ds.encode import IGNORE


def pair_lengths(ds) -> np.ndarray:
    """Padded length of each pair: max(len(chosen), len(rejected))."""
    chosen, rejected = (np.fromiter((len(x) for x in ds[f"{side}_input_ids"]), dtype=np.int64, count=len(ds))
                        for side in ("chosen", "rejected"))
    return np.maximum(chosen, rejected)


def pad_and_eos(tokenizer) -> tuple[int, int]:
    """Padding id (the EOS when the tokenizer has no pad token: padded positions are masked anyway), EOS id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad, tokenizer.eos_token_id


def take(ds, rows) -> list[dict]:
    """Rows of a datasets.Dataset as dicts, read in one Arrow take (not one lookup per row)."""
    cols = ds[[int(i) for i in rows]]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def collate(rows: list[dict], pad_id: int) -> dict:
    """B pairs in the plain layout (dpo_ds.layout): input_ids, attention_mask, labels [2B, T] (rows 0..B-1
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
