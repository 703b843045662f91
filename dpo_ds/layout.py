"""How a batch of preference pairs becomes model rows: the one batch builder of every phase.

    plain          one row per sequence (prompt + chosen, prompt + rejected), padded to the longest
    share_prompt   one segment per pair, [prompt | chosen | rejected]: each response attends to the prompt and
                   to itself, never to the other response; the rejected position_ids continue from the end
                   of the prompt, as if it stood alone; the last prompt position predicts both first tokens
    packing        several segments per row, no padding between them: block-diagonal attention, per-segment
                   position_ids

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

from dataclasses import dataclass

import numpy as np
import torch

from dpo_ds.encode import IGNORE
from dpo_ds.errors import UserError

MASKED = ("sdpa", "eager")  # attention implementations that take a 4-D mask


@dataclass(frozen=True)
class Layout:
    share_prompt: bool = False
    packing: bool = False
    one_row: bool = False  # flash_attention_2: every segment in one row, segments told apart by position_ids

    @property
    def plain(self) -> bool:
        return not (self.share_prompt or self.packing)

    def __str__(self) -> str:
        parts = [p for p, on in (("shared prompt", self.share_prompt), ("packed", self.packing)) if on]
        return " + ".join(parts) or "plain (one padded row per sequence)"


PLAIN = Layout()


# model types whose decoder computes the shared and packed layouts exactly (custom 4-D masks and per-segment
# position_ids honoured, no recurrent state or position bias crossing segments), checked in float64 against
# each sequence alone by tests/test_architectures.py; every other type runs the plain layout
EXACT_TYPES: frozenset[str] = frozenset({
    "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "biogpt", "bitnet", "codegen", "cohere",
    "cohere_compass_text", "ctrl", "dbrx", "deepseek_v2", "deepseek_v3", "diffllama", "doge", "dots1",
    "emu3_text_model", "ernie4_5", "ernie4_5_moe", "exaone", "falcon", "flex_olmo", "fuyu", "gemma", "git", "glm",
    "glm4", "glm4_moe", "glm4_moe_lite", "got_ocr2", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_neox_japanese", "gptj",
    "granite", "granitemoe", "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "jetmoe", "laguna", "lfm2", "llama",
    "longcat_flash", "mellum", "minicpm3", "minimax_m2", "minimax_m3_vl_text", "ministral3", "mixtral", "moshi",
    "moss_transcribe_diarize", "nanochat", "nemotron", "olmo", "olmo2", "olmoe", "opt", "persimmon", "phi", "phi3",
    "phi4_multimodal", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "sarvam_mla", "sarvam_moe", "seed_oss",
    "smollm3", "solar_open", "stablelm", "starcoder2", "xglm", "youtu",
})


# model types whose decoder hands position_ids on to the attention function, which flash_attention_2 needs to
# tell packed segments apart (read in transformers 5.24's modeling code; unrun here: no GPU). Others (e.g.
# gpt_bigcode, ctrl, persimmon drop them) would attend across segments, so flash-attn does not pack them.
FLASH_PACKING_TYPES: frozenset[str] = frozenset({"llama", "qwen2", "qwen3"})


def unsupported(model) -> str | None:
    """Why `model` cannot run the shared/packed layouts exactly, or None."""
    model_type = model.config.model_type
    if model_type not in EXACT_TYPES:
        return f"model type {model_type!r} is not among those checked exact in these layouts (dpo_ds/layout.py)"
    cfg = model.config.get_text_config()
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"its layers are not all full attention ({', '.join(sorted(set(layer_types)))})"
    if layer_types is None and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "it uses sliding-window attention, which a 4-D mask would lose"
    if getattr(cfg, "alibi", False):
        return "its ALiBi position bias follows the row, not position_ids"
    return None


def resolve(share_prompt: bool | None, packing: bool | None, attn: str, reason: str | None = None,
            model_type: str | None = None, sequence_parallel: int = 1) -> Layout:
    """The layout for an attention implementation and a model (`reason`: why the model cannot run the
    token-efficient layouts, see `unsupported`) with rows split `sequence_parallel` ways: None = the fastest
    exact one, an explicit True that cannot be computed exactly is refused.

    Split rows (K > 1) go through Ulysses' attention, which drops 4-D masks: sdpa is then causal along the whole
    row (the plain layout alone is exact), flash_attention_2 still follows position_ids (packing in one row)."""
    if sequence_parallel > 1 and attn in MASKED:
        if share_prompt or packing:
            raise UserError(f"--share_prompt/--packing need a 4-D attention mask, which Ulysses' attention drops "
                            f"under --sequence_parallel_size {sequence_parallel}: pass --no-share_prompt "
                            f"--no-packing with {attn} (flash_attention_2 packs through position_ids)")
        return PLAIN
    if reason is not None:
        if share_prompt or packing:
            raise UserError(f"--share_prompt/--packing cannot be computed exactly for this model: {reason}; pass "
                            f"--no-share_prompt --no-packing")
        return PLAIN
    if attn in MASKED:
        return Layout(share_prompt is not False, packing is not False)
    if attn == "flash_attention_2":
        if share_prompt:
            raise UserError("--share_prompt needs an attention mask, which flash_attention_2 does not take; use "
                            "--attn_implementation sdpa, or --no-share_prompt (flash-attn packs through "
                            "position_ids)")
        if model_type not in FLASH_PACKING_TYPES:
            if packing:
                raise UserError(f"--packing with flash_attention_2 needs a decoder that passes position_ids to "
                                f"attention; model type {model_type!r} is not known to (dpo_ds/layout.py "
                                f"FLASH_PACKING_TYPES): use --attn_implementation sdpa, or --no-packing")
            return PLAIN
        pack = packing is not False
        return Layout(False, pack, one_row=pack)
    if share_prompt or packing:
        raise UserError(f"--share_prompt and --packing need sdpa, eager or flash_attention_2 attention; the model "
                        f"uses {attn!r}: pass --no-share_prompt --no-packing")
    return PLAIN


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
    the longer side in the plain layout, prompt + both responses when the prompt is shared (the prompt is
    the leading -100 labels; read from Arrow, not row by row)."""
    from dpo_ds.batching import pair_lengths

    if not layout.share_prompt:
        return pair_lengths(ds)
    if ds._indices is not None:  # a selected/shuffled view: its table is not in row order (in memory: never
        ds = ds.flatten_indices(keep_in_memory=True)  # a cache file inside a prepared split)
    labels = ds.data.column("chosen_labels").combine_chunks()
    offsets = labels.offsets.to_numpy()  # into labels.values
    ignored = np.concatenate([[0], np.cumsum(labels.values.to_numpy() == IGNORE)])
    prompt = ignored[offsets[1:]] - ignored[offsets[:-1]]
    sides = [np.diff(ds.data.column(f"{side}_input_ids").combine_chunks().offsets.to_numpy())
             for side in ("chosen", "rejected")]
    return sides[0] + sides[1] - prompt


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
    from dpo_ds.batching import collate

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
