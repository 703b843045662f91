"""Per-sequence response log-probs without a `[batch, seq, vocab]` fp32 tensor.

The backbone gives hidden states; only positions that predict a response token go through `lm_head`, in
chunks of `chunk_size` tokens, each chunk as `logit[target] - logsumexp(logits)` in fp32 and, when
gradients are on, under its own activation checkpoint, so backward keeps `[chunk, vocab]` at a time, never
`[B, T, V]`.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from dpo_ds import dist
from dpo_ds.config import LOGP_CHUNK_SIZE
from dpo_ds.data.encode import IGNORE
from dpo_ds.model.head import output_head
from dpo_ds.model.layout import PLAIN, Layout
from dpo_ds.model.pair import HeadStats, Logps, Pair
from dpo_ds.model.sequence_parallel import local_slice, sum_over_group


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, stats_out: list | None = None) -> torch.Tensor:
    """hidden [N, H], targets [N] -> log p(target) [N] fp32. With `stats_out` (an empty list), also appends
    the HeadStats columns [N, 4], once: backward's recomputation of this chunk finds the list filled and skips
    them (they need no gradient)."""
    logits = head(hidden)
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if stats_out is not None and not stats_out:
        with torch.no_grad():  # one [N, V] softmax, freed with the chunk
            p = logits.softmax(-1)
            entropy = lse - (p * logits).nansum(-1)            # -Σ p log p; nansum: p = 0 where a logit is -inf
            wpo = logp - (p * p).sum(-1).log()                 # log p(target) - log Σ_v p(v)²
            top1 = (logits.argmax(-1) == targets).to(logp.dtype)
            stats_out.append(torch.stack([entropy, top1, logits.mean(-1), wpo], -1))
    return logp


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T] (one padded row per sequence, position t predicting
    labels[t + 1]) -> (summed response log-probs [B] fp32, response tokens [B]). See `scored_logps`."""
    targets = labels[:, 1:]
    where = (targets != IGNORE).nonzero()
    scored = scored_logps(model, input_ids, attention_mask, None, where[:, 0] * input_ids.shape[1] + where[:, 1],
                          targets[targets != IGNORE], where[:, 0], input_ids.shape[0], chunk_size, collective, head)
    return scored.logps, scored.tokens


def _attention_mask(model, mask):
    """A batch's mask as the model's attention takes it: None without padding (attention's causal fast path),
    an additive float mask for eager attention (it adds the mask to its scores), else as built."""
    if mask is not None and mask.dim() == 2 and bool(mask.all()):
        return None
    if mask is not None and mask.dim() == 4 and model.config._attn_implementation == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def scored_logps(model, input_ids, attention_mask, position_ids, positions, targets, sequence, num_sequences: int,
                 chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, head=None, shared=None,
                 stats: bool = False, sp_group=None) -> Logps:
    """Rows in any `dpo_ds.model.layout` -> Logps per sequence: the token `targets[n]` is scored at flat row
    position `positions[n]` and summed into `sequence[n]`; `shared[n]` (bool, optional) marks the tokens
    summed into `shared_logps` too; `stats` adds HeadStats.

    `model` is an HF causal LM: the backbone and `lm_head` are called as modules, so ZeRO-3 gathers their
    parameters. Under DeepSpeed, call this through an engine wrapping `SequenceLogps`, never on `engine.module`
    directly (see SequenceLogps). Under ZeRO-3 every rank must call `lm_head` equally often:
    with `collective` (engine.collective_forwards) the chunk count is agreed across ranks (ranks with fewer
    tokens run empty chunks).
    `head` is the model's `head.output_head` (built here when not given). No KV cache is built.
    With `sp_group` (a sequence_parallel.Group: the model's attention is Ulysses', dpo_ds.engine) this rank computes
    its slice of the rows (dpo_ds.model.sequence_parallel) and the sums are over the group; every rank of the group
    must call this with the same batch.
    """
    head = head or output_head(model)
    # scored tokens per sequence; index_add_, not bincount, whose output size waits for the device's max value
    tokens = torch.zeros(num_sequences, dtype=torch.long, device=sequence.device).index_add_(
        0, sequence, torch.ones_like(sequence, dtype=torch.long))
    if sp_group is not None:  # Ulysses drops attention masks: the layouts it is given are causal along the row
        part = local_slice(input_ids, position_ids, positions, dist.sp_size(), dist.sp_rank())
        input_ids, position_ids, positions, attention_mask = part.input_ids, part.position_ids, part.positions, None
        targets, sequence = targets[part.keep], sequence[part.keep]
        shared = None if shared is None else shared[part.keep]
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=_attention_mask(model, attention_mask),
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1])[positions]          # [N, H]: the positions that predict a target
    n_chunks = math.ceil(h.shape[0] / chunk_size)
    if collective and dist.active():
        n_chunks = int(dist.all_reduce([n_chunks], op="max")[0])
    pieces, stat_pieces = [], []
    for i in range(max(n_chunks, 1)):
        hc, tc = h[i * chunk_size:(i + 1) * chunk_size], targets[i * chunk_size:(i + 1) * chunk_size]
        out = [] if stats else None
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, head, hc, tc, out, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, hc, tc, out))
        stat_pieces += out or []
    token_logps = torch.cat(pieces)

    def per_sequence(values):
        return torch.zeros((num_sequences, *values.shape[1:]), dtype=values.dtype,
                           device=values.device).index_add(0, sequence, values)

    sums = [per_sequence(token_logps)[:, None]]
    if shared is not None:
        sums.append(per_sequence(token_logps * shared)[:, None])
    if stats:
        sums.append(per_sequence(torch.cat(stat_pieces)).to(token_logps.dtype))
    sums = torch.cat(sums, 1)                                # [S, 1 (+ 1) (+ 4)]: one reduction for all of them
    if sp_group is not None:
        sums = sum_over_group(sums, sp_group)
    n = 1 + (shared is not None)
    return Logps(sums[:, 0], tokens, sums[:, 1] if shared is not None else None,
                 HeadStats(*sums[:, n:].unbind(-1)) if stats else None)


class SequenceLogps(torch.nn.Module):
    """A causal LM whose forward returns `scored_logps` of a batch built in `layout` (dpo_ds.model.layout), with
    HeadStats when `stats` (the policy's metrics; a reference needs none). This is the module handed to
    DeepSpeed, so every call goes through the engine's forward: ZeRO-3 needs that bookkeeping for gradient
    accumulation to accumulate (calling submodules of `engine.module` directly silently keeps only the last
    micro-batch)."""

    def __init__(self, lm, chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, layout: Layout = PLAIN,
                 stats: bool = False, sp_group=None):
        super().__init__()
        self.lm, self.chunk_size, self.collective, self.layout, self.stats = lm, chunk_size, collective, layout, stats
        self.sp_group = sp_group  # a sequence_parallel.Group when the model's attention is Ulysses
        self.head = output_head(lm)  # refuses a model whose logits it cannot reproduce exactly

    def forward(self, input_ids, attention_mask, position_ids, positions, targets, sequence, num_sequences: int,
                shared=None):
        return scored_logps(self.lm, input_ids, attention_mask, position_ids, positions, targets, sequence,
                            num_sequences, self.chunk_size, self.collective, self.head, shared, self.stats,
                            self.sp_group)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "positions", "targets", "sequence")


def shared_tokens(positions: torch.Tensor, sequence: torch.Tensor, B: int) -> torch.Tensor:
    """[N] bool: the scored token is among the first min(|y_w|, |y_l|) tokens of its response. A response's
    tokens are ordered by their row position in every layout."""
    counts = torch.bincount(sequence, minlength=2 * B)
    shared_len = torch.minimum(counts[:B], counts[B:]).repeat(2)
    span = int(positions.max()) + 1 if positions.numel() else 1
    order = torch.argsort(sequence * span + positions)  # by sequence, then row position
    first = torch.cumsum(counts, 0) - counts
    ordinal = torch.empty_like(sequence)
    ordinal[order] = torch.arange(len(order), device=sequence.device) - first[sequence[order]]
    return ordinal < shared_len[sequence]


def pair_logps(logps_fn, batch: dict, shared: bool = True) -> Pair:
    """A batch of `dpo_ds.model.batch.build` -> its Pair (dpo_ds.model.pair): chosen and rejected go through one
    forward. `logps_fn` is a SequenceLogps or a DeepSpeed engine wrapping one. `shared`: also the sums over
    LD-DPO's shared length (the cache stores them; a loss needs them only with --ld_alpha)."""
    B = batch["example_id"].numel()
    device = dist.device()
    inputs = {k: None if batch.get(k) is None else batch[k].to(device) for k in MODEL_INPUTS}
    mask = shared_tokens(batch["positions"], batch["sequence"], B).to(device) if shared else None
    return Pair.split(logps_fn(**inputs, num_sequences=2 * B, shared=mask), B)


def is_collective(logps_fn) -> bool:
    """Whether this log-prob function (a SequenceLogps, or an engine wrapping one as `.module`) must be called in
    lockstep across ranks; see collective_forwards."""
    return getattr(getattr(logps_fn, "module", logps_fn), "collective", False)


def layout_of(logps_fn) -> Layout:
    """The batch layout a SequenceLogps (or an engine wrapping one) takes: build its batches with
    dpo_ds.model.batch.build(rows, layout_of(logps_fn), pad_id)."""
    return getattr(logps_fn, "module", logps_fn).layout
