"""The model's own output head, applied to a chunk of hidden states: `lm_head` plus whatever the causal LM's
forward does around it (logit scales, soft-capping, hidden-state scaling).

The chunked log-probs call the decoder and then the head on response positions only, so they skip the
model's `forward` after the decoder. Any model type whose forward transforms the logits must be listed here,
or it would get wrong log-probs silently. Every model type is checked against the model's own forward in
float64 (tests/test_architectures.py); a type that is neither checked plain nor listed is refused.
"""
from __future__ import annotations

import torch

from dpo_ds.errors import UserError


def _mul(value):
    return lambda logits: logits * value


def _div(value):
    return lambda logits: logits / value


def _softcap(cap):
    return lambda logits: torch.tanh(logits / cap) * cap


# model_type -> (model, config) -> (scale applied to hidden states before lm_head or None,
#                                    function applied to the logits after it or None)
TRANSFORMS = {
    "cohere": lambda m, c: (None, _mul(c.logit_scale)),
    "cohere2": lambda m, c: (None, _mul(c.logit_scale)),
    "granite": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoe": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoeshared": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoehybrid": lambda m, c: (None, _div(c.logits_scaling)),
    "falcon_h1": lambda m, c: (None, _mul(m.model.lm_head_multiplier)),
    "minicpm3": lambda m, c: (1.0 / c.logits_scaling, None),
}

# model types whose causal-LM forward is `lm_head(last_hidden_state)` plus at most soft-capping by
# `config.final_logit_softcapping` (checked in float64 by tests/test_architectures.py)
PLAIN: frozenset[str] = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma2"})


class OutputHead:
    """hidden [N, H] -> logits [N, V] in fp32, exactly as the model's forward computes them. A plain callable,
    not a Module: `lm_head` stays registered once, under the model (ZeRO-3 gathers it there)."""

    def __init__(self, lm_head, hidden_scale=None, transform=None, softcap=None):
        self.lm_head, self.hidden_scale, self.transform, self.softcap = lm_head, hidden_scale, transform, softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits in the dtype the model's forward returns them."""
        if self.hidden_scale is not None:
            hidden = hidden * self.hidden_scale
        logits = self.lm_head(hidden)
        if self.transform is not None:
            logits = self.transform(logits)
        if self.softcap:
            logits = _softcap(self.softcap)(logits)
        return logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden).float()


def output_head(model) -> OutputHead:
    """The head of an HF causal LM, or a clear refusal for a model type whose head is not known to be exact."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if model_type in TRANSFORMS:
        hidden_scale, transform = TRANSFORMS[model_type](model, config)
    elif model_type in PLAIN:
        hidden_scale, transform = None, None
    else:
        raise UserError(f"model type {model_type!r} ({type(model).__name__}) has not been checked by dpo_ds: its "
                        f"forward may transform the logits after lm_head, which the chunked log-probs would miss. "
                        f"Add it to dpo_ds/head.py once tests/test_architectures.py shows it exact")
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise UserError(f"model type {model_type!r} ({type(model).__name__}) has no output embeddings (lm_head)")
    return OutputHead(lm_head, hidden_scale, transform, softcap)
