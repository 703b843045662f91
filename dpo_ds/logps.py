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
from dpo_ds.encode import IGNORE
from dpo_ds.head import output_head
from dpo_ds.layout import PLAIN, Layout


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden [N, H], targets [N] -> log p(target) [N], fp32."""
    logits = head(hidden)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T] (one padded row per sequence, position t predicting
    labels[t + 1]) -> (summed response log-probs [B] fp32, response tokens [B]). See `scored_logps`."""
    targets = labels[:, 1:]
    where = (targets != IGNORE).nonzero()
    return scored_logps(model, input_ids, attention_mask, None, where[:, 0] * input_ids.shape[1] + where[:, 1],
                        targets[targets != IGNORE], where[:, 0], input_ids.shape[0], chunk_size, collective, head)


def scored_logps(model, input_ids, attention_mask, position_ids, positions, targets, sequence, num_sequences: int,
                 chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in any `dpo_ds.layout` -> (summed log-probs [num_sequences] fp32, scored tokens [num_sequences]):
    the token `targets[n]` is scored at flat row position `positions[n]` and summed into `sequence[n]`.

    `model` is an HF causal LM: the backbone and `lm_head` are called as modules, so ZeRO-3 gathers their
    parameters. Under DeepSpeed, call this through an engine wrapping `SequenceLogps`, never on `engine.module`
    directly (see SequenceLogps). Under ZeRO-3 every rank must call `lm_head` equally often:
    with `collective` (engine.collective_forwards) the chunk count is agreed across ranks (ranks with fewer
    tokens run empty chunks).
    `head` is the model's `head.output_head` (built here when not given). No KV cache is built.
    """
    head = head or output_head(model)
    if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
        attention_mask = None  # no padding: let attention take its causal fast path
    elif attention_mask is not None and attention_mask.dim() == 4 and model.config._attn_implementation == "eager":
        dtype = model.get_input_embeddings().weight.dtype  # eager adds the mask to its scores
        attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
            ~attention_mask, torch.finfo(dtype).min)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1])[positions]          # [N, H]: the positions that predict a target
    n_chunks = math.ceil(h.shape[0] / chunk_size)
    if collective and dist.active():
        n_chunks = int(dist.all_reduce([n_chunks], op="max")[0])
    pieces = []
    for i in range(max(n_chunks, 1)):
        hc, tc = h[i * chunk_size:(i + 1) * chunk_size], targets[i * chunk_size:(i + 1) * chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, head, hc, tc, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, hc, tc))
    token_logps = torch.cat(pieces)
    logps = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, sequence, token_logps)
    return logps, torch.bincount(sequence, minlength=num_sequences)


def naive_sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Reference implementation for tests and benchmarks: full log_softmax over [B, T, V] in float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


class SequenceLogps(torch.nn.Module):
    """A causal LM whose forward returns `scored_logps` of a batch built in `layout` (dpo_ds.layout). This is
    the module handed to DeepSpeed, so every call goes through the engine's forward: ZeRO-3 needs that
    bookkeeping for gradient accumulation to accumulate (calling submodules of `engine.module` directly
    silently keeps only the last micro-batch)."""

    def __init__(self, lm, chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, layout: Layout = PLAIN):
        super().__init__()
        self.lm, self.chunk_size, self.collective, self.layout = lm, chunk_size, collective, layout
        self.head = output_head(lm)  # refuses a model whose logits it cannot reproduce exactly

    def forward(self, input_ids, attention_mask, position_ids, positions, targets, sequence, num_sequences: int):
        return scored_logps(self.lm, input_ids, attention_mask, position_ids, positions, targets, sequence,
                            num_sequences, self.chunk_size, self.collective, self.head)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "positions", "targets", "sequence")


def pair_logps(logps_fn, batch: dict):
    """A batch of `dpo_ds.layout.build` -> chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, each
    [B]: chosen and rejected go through one forward. `logps_fn` is a SequenceLogps or a DeepSpeed engine
    wrapping one."""
    B = batch["example_id"].numel()
    device = dist.device()
    inputs = {k: None if batch.get(k) is None else batch[k].to(device) for k in MODEL_INPUTS}
    logps, n_tokens = logps_fn(**inputs, num_sequences=2 * B)
    return logps[:B], logps[B:], n_tokens[:B], n_tokens[B:]
