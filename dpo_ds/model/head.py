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
    """tanh soft-capping with the forwards' own operations in their order: / cap, tanh, * cap."""
    return lambda logits: torch.tanh(logits / cap) * cap


def _fp32(fn=None):
    """The logits upcast to fp32 as the forward does (`.float()`), then `fn`."""
    return (lambda logits: logits.float()) if fn is None else (lambda logits: fn(logits.float()))


def _to_head_dtype(model):
    """Hidden states cast to the dtype of lm_head's weight (`hidden_states.to(self.lm_head.weight.dtype)`)."""
    return lambda hidden: hidden.to(model.lm_head.weight.dtype)


def _cap_if(cap, fn=lambda f: f):
    """`fn(_softcap(cap))` when the forward's `if ... final_logit_softcapping is not None` holds, else None."""
    return None if cap is None else fn(_softcap(cap))


def _vocab_prefix(n):
    """`logits[..., :n]` when n is set and smaller than the vocabulary (a padded lm_head)."""
    if n is None:
        return None
    return lambda logits: logits[..., :n] if n < logits.shape[-1] else logits


# model_type -> (model, config) -> (function of the hidden states before lm_head or None,
#                                    function of the logits after it or None).
# An entry is the whole of what the causal LM's forward does after its decoder (the generic soft-capping of
# PLAIN types is not added); each names the line of transformers 5.24 it reproduces.
TRANSFORMS = {
    # modeling_beam.py:637-641  if final_logit_softcapping is not None: logits.float() / cap, tanh, * cap
    "beam": lambda m, c: (None, _cap_if(c.final_logit_softcapping, _fp32)),
    # modeling_blt.py:1420  logits = self.lm_head(hidden_states).float()
    "blt": lambda m, c: (None, _fp32()),
    # modeling_cohere.py:498, modeling_cohere2.py:476, modeling_cohere2_moe.py:626,
    # modeling_cohere_compass.py:592  logits = logits * self.logit_scale  (set from config.logit_scale in
    # __init__; cohere_compass uses 1.0 when it is None)
    "cohere": lambda m, c: (None, _mul(m.logit_scale)),
    "cohere2": lambda m, c: (None, _mul(m.logit_scale)),
    "cohere2_moe": lambda m, c: (None, _mul(m.logit_scale)),
    "cohere_compass_text": lambda m, c: (None, _mul(m.logit_scale)),
    # modeling_falcon_h1.py:1173  logits = self.lm_head(hidden_states) * self.model.lm_head_multiplier
    "falcon_h1": lambda m, c: (None, _mul(m.model.lm_head_multiplier)),
    # modeling_falcon_mamba.py:828, modeling_mamba.py:794, modeling_mamba2.py:924
    #   logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
    "falcon_mamba": lambda m, c: (_to_head_dtype(m), _fp32()),
    "mamba": lambda m, c: (_to_head_dtype(m), _fp32()),
    "mamba2": lambda m, c: (_to_head_dtype(m), _fp32()),
    # modeling_gemma4.py:2687, modeling_gemma4_unified.py:1431 (the multimodal wrappers run on text alone)
    #   if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None: ...
    "gemma4": lambda m, c: (None, _cap_if(c.get_text_config().final_logit_softcapping)),
    "gemma4_unified": lambda m, c: (None, _cap_if(c.get_text_config().final_logit_softcapping)),
    # modeling_granite.py:489, modeling_granite_swa.py:537, modeling_granitemoe.py:614,
    # modeling_granitemoe_swa.py:724, modeling_granitemoehybrid.py:1273, modeling_granitemoeshared.py:680
    #   logits = logits / self.config.logits_scaling
    "granite": lambda m, c: (None, _div(c.logits_scaling)),
    "granite_swa": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoe": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoe_swa": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoehybrid": lambda m, c: (None, _div(c.logits_scaling)),
    "granitemoeshared": lambda m, c: (None, _div(c.logits_scaling)),
    # modeling_hy_v4.py:930  logits = self.lm_head(hidden_states.to(dtype=self.lm_head.weight.dtype))
    #   (lm_head is kept in fp32 whatever the model's dtype)
    "hy_v4": lambda m, c: (_to_head_dtype(m), None),
    # modeling_hyperclovax.py:496  logits = self.lm_head(hidden_states) * self.config.logits_scaling
    "hyperclovax": lambda m, c: (None, _mul(c.logits_scaling)),
    # modeling_inkling2.py:1515-1516, modeling_inkling2_loop.py:1534-1535
    #   logits = self.lm_head(hidden_states).float(); logits = self.logit_softcap(logits)
    "inkling2_text": lambda m, c: (None, _fp32(m.logit_softcap)),
    "inkling2_loop_text": lambda m, c: (None, _fp32(m.logit_softcap)),
    # modeling_inkling.py:797-802  hidden_states = last_hidden_state / self.config.logits_mup_width_multiplier;
    #   logits = logits[..., :unpadded_vocab_size] if unpadded_vocab_size < vocabulary
    "inkling_text": lambda m, c: (_div(c.logits_mup_width_multiplier), _vocab_prefix(c.unpadded_vocab_size)),
    # modeling_minicpm3.py:571  hidden_states = hidden_states / self.config.logits_scaling
    "minicpm3": lambda m, c: (_div(c.logits_scaling), None),
    # modeling_nemotron_h.py:1214  logits = self.lm_head(hidden_states).float()
    "nemotron_h": lambda m, c: (None, _fp32()),
    # modeling_recurrent_gemma.py:745-746  cap = self.config.logits_soft_cap; tanh(logits / cap) * cap
    "recurrent_gemma": lambda m, c: (None, _softcap(c.logits_soft_cap)),
    # modeling_xlstm.py:1563-1575  self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float(), then
    #   soft_cap(logits, output_logit_soft_cap) = cap * tanh(logits / cap), elementwise (the eval-mode loop over
    #   max_inference_chunksize slices computes the same values)
    "xlstm": lambda m, c: (_to_head_dtype(m), _fp32(_cap_if(c.output_logit_soft_cap))),
}

# model types whose causal-LM forward is `lm_head(last_hidden_state)` plus at most soft-capping by
# `config.final_logit_softcapping`, checked in float64 by tests/test_architectures.py
PLAIN: frozenset[str] = frozenset({
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bailing_hybrid", "bamba",
    "bert-generation", "biogpt", "bitnet", "bloom", "codegen", "cpmant", "ctrl", "cwm", "dbrx", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "deepseek_v4", "diffllama", "doge", "dory", "dots1", "dots3_note_text",
    "emu3_text_model", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "falcon", "flex_olmo",
    "flint", "fuyu", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n_text", "gemma4_text",
    "gemma4_unified_text", "git", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "got_ocr2", "gpt2",
    "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "gptj", "helium", "hrm_text",
    "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "internlm3", "iquestcoder", "jais2", "jamba", "jetmoe",
    "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2", "lfm2_moe", "lfm3", "llama", "longcat_flash",
    "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral",
    "mixtral", "moshi", "moss_transcribe_diarize", "mpt", "nanochat", "nemotron", "olmo", "olmo2", "olmo3",
    "olmo_hybrid", "olmoe", "openai-gpt", "opt", "persimmon", "phi", "phi3", "phi4_multimodal", "phimoe", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "qwen4_exp_text", "rwkv",
    "sarvam_mla", "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "vaultgemma", "xglm",
    "xlm", "youtu", "zamba", "zamba2", "zaya",
})

# Refused on purpose (tests/test_architectures.py builds them and sees the refusal):
# - MLM-style prediction heads (dense + activation + norm before the vocabulary projection, which is all that
#   get_output_embeddings() returns): bert, big_bird, camembert, data2vec-text, electra, ernie, megatron-bert,
#   rembert, roberta, roberta-prelayernorm, roc_bert, roformer, xlm-roberta, xlm-roberta-xl, xmod;
#   modernbert-decoder (also: its get_decoder() is that output Linear).
# - llama4, llama4_text, mllama: get_decoder() returns the causal LM itself, so sequence_logps cannot reach
#   the backbone's last_hidden_state.
# - reformer, xlnet: not causal decoders in the usual sense (LSH/axial positions; permutation LM with
#   hard-coded fp32 positions that cannot run in float64).
# - gemma4_unified_assistant, gemma4_assistant: speculative-decoding drafters, whose forward needs the target
#   model's shared KV states.
# - gemma3n: its composite forward soft-caps by get_text_config().final_logit_softcapping like gemma4, but
#   its vision tower needs timm, so the test cannot build it here: unchecked, hence refused.
# - encoder-decoder halves and audio decoders (bart, whisper, musicgen, ...): out of scope.


class OutputHead:
    """hidden [N, H] -> logits [N, V] in fp32, exactly as the model's forward computes them. A plain callable,
    not a Module: `lm_head` stays registered once, under the model (ZeRO-3 gathers it there)."""

    def __init__(self, lm_head, hidden_fn=None, logits_fn=None, softcap=None):
        self.lm_head, self.hidden_fn, self.logits_fn, self.softcap = lm_head, hidden_fn, logits_fn, softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits in the dtype the model's forward returns them."""
        if self.hidden_fn is not None:
            hidden = self.hidden_fn(hidden)
        logits = self.lm_head(hidden)
        if self.logits_fn is not None:
            logits = self.logits_fn(logits)
        if self.softcap is not None:
            logits = _softcap(self.softcap)(logits)
        return logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in at least fp32 (a float64 model, as in the exactness tests, keeps float64)."""
        logits = self.logits(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def output_head(model) -> OutputHead:
    """The head of an HF causal LM, or a clear refusal for a model type whose head is not known to be exact."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    softcap = None
    if model_type in TRANSFORMS:
        hidden_fn, logits_fn = TRANSFORMS[model_type](model, config)
    elif model_type in PLAIN:
        hidden_fn, logits_fn = None, None
        softcap = getattr(config, "final_logit_softcapping", None)
    else:
        raise UserError(f"model type {model_type!r} ({type(model).__name__}) has not been checked by dpo_ds: its "
                        f"forward may transform the logits after lm_head, which the chunked log-probs would miss. "
                        f"Add it to dpo_ds/model/head.py once tests/test_architectures.py shows it exact")
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise UserError(f"model type {model_type!r} ({type(model).__name__}) has no output embeddings (lm_head)")
    return OutputHead(lm_head, hidden_fn, logits_fn, softcap)
