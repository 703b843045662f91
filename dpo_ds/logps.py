"""Per-sequence response log-probs without a `[batch, seq, vocab]` fp32 tensor.

The backbone gives hidden states; only positions whose next token is a response token (label != -100)
go through `lm_head`, in chunks of `chunk_size` tokens, each chunk as `logit[target] - logsumexp(logits)`
in fp32 and, when gradients are on, under its own activation checkpoint, so backward keeps
`[chunk, vocab]` at a time, never `[B, T, V]`.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from dpo_ds import dist
from dpo_ds.config import LOGP_CHUNK_SIZE
from dpo_ds.encode import IGNORE
from dpo_ds.head import output_head


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden [N, H], targets [N] -> log p(target) [N], fp32."""
    logits = head(hidden)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T] -> (summed response log-probs [B] fp32, response tokens [B]).

    `model` is an HF causal LM: the backbone and `lm_head` are called as modules, so ZeRO-3 gathers their
    parameters. Under DeepSpeed, call this through an engine wrapping `SequenceLogps`, never on `engine.module`
    directly (see SequenceLogps). Under ZeRO-3 every rank must call `lm_head` equally often:
    with `collective` (engine.collective_forwards) the chunk count is agreed across ranks (ranks with fewer
    tokens run empty chunks).
    `head` is the model's `head.output_head` (built here when not given). No KV cache is built.
    """
    head = head or output_head(model)
    B, T = input_ids.shape
    if bool(attention_mask.all()):  # no padding: let attention take its causal fast path
        attention_mask = None
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != IGNORE                                   # [B, T-1]: position t predicts token t+1
    rows = mask.nonzero()[:, 0]                                # sequence of each response token
    h, tgt = hidden[:, :-1][mask], targets[mask]               # [N, H], [N]
    n_chunks = math.ceil(h.shape[0] / chunk_size)
    if collective and dist.active():
        n_chunks = int(dist.all_reduce([n_chunks], op="max")[0])
    pieces = []
    for i in range(max(n_chunks, 1)):
        hc, tc = h[i * chunk_size:(i + 1) * chunk_size], tgt[i * chunk_size:(i + 1) * chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, head, hc, tc, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, hc, tc))
    token_logps = torch.cat(pieces)
    logps = torch.zeros(B, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return logps, mask.sum(1)


def naive_sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Reference implementation for tests and benchmarks: full log_softmax over [B, T, V] in float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


class SequenceLogps(torch.nn.Module):
    """A causal LM whose forward returns `sequence_logps`. This is the module handed to DeepSpeed, so every
    call goes through the engine's forward: ZeRO-3 needs that bookkeeping for gradient accumulation to
    accumulate (calling submodules of `engine.module` directly silently keeps only the last micro-batch)."""

    def __init__(self, lm, chunk_size: int = LOGP_CHUNK_SIZE, collective: bool = False):
        super().__init__()
        self.lm, self.chunk_size, self.collective = lm, chunk_size, collective
        self.head = output_head(lm)  # refuses a model whose logits it cannot reproduce exactly

    def forward(self, input_ids, attention_mask, labels):
        return sequence_logps(self.lm, input_ids, attention_mask, labels, self.chunk_size, self.collective, self.head)


def pair_logps(logps_fn, batch: dict):
    """A collated batch (chosen rows, then rejected rows) -> chosen_logps, rejected_logps, chosen_tokens,
    rejected_tokens, each [B]: chosen and rejected go through one forward. `logps_fn` is a SequenceLogps
    or a DeepSpeed engine wrapping one."""
    B = batch["example_id"].numel()
    device = dist.device()
    logps, n_tokens = logps_fn(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                               labels=batch["labels"].to(device))
    return logps[:B], logps[B:], n_tokens[:B], n_tokens[B:]
