"""Every decoder-only text causal LM type in transformers: dpo_ds's chunked log-probs either refuse it or
reproduce the model's own forward.
    scripts/test.sh tests/test_architectures.py

For each model type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES a tiny random model is built in float64, its
parameters moved away from their identity init, and a padded batch is scored twice: `sequence_logps`
(decoder + `head.output_head` on response positions, chunk_size=5) and `naive_sequence_logps` (the model's
own forward, full log_softmax in float64). `output_head` must either refuse the type (UserError) or match.
"""
import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from dpo_ds.errors import UserError
from dpo_ds.head import PLAIN, TRANSFORMS, output_head
from dpo_ds.logps import naive_sequence_logps, sequence_logps

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 128, 32, 4, 2, 8

# field -> tiny value, set on the config and every sub-config that has the field
SMALL = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "max_position_embeddings": 64,
    # other spellings of the same sizes
    "n_embd": HIDDEN, "d_model": HIDDEN, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "n_positions": 64, "n_ctx": 64, "max_seq_len": 64, "ffn_dim": 64, "ffn_hidden_size": 64, "dff": 64,
    "d_inner": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "num_kv_heads": KV_HEADS, "embedding_size": HIDDEN,
    # mixture of experts
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32, "dense_intermediate_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "n_group": 1, "topk_group": 1, "zero_expert_num": 2,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
    "v_head_dim": HEAD_DIM,
    # sparse indexers
    "index_topk": 4, "index_head_dim": HEAD_DIM, "index_n_heads": 2,
    # linear attention / state space
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 4, "mamba_d_ssm": 64,
    "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "state_size": 8, "time_step_rank": 4,
    "mamba_dt_rank": 4, "mamba_headdim": 16, "chunk_size": 4,
    # windows: small enough to matter in a 12-token batch
    "sliding_window": 5, "sliding_window_size": 5, "attention_window_size": 5, "window_size": 5,
    "attention_chunk_size": 5, "local_attention": 6,
    # vision towers (built with the model, never run)
    "image_size": 32, "patch_size": 8, "vision_output_dim": HIDDEN, "projector_input_dim": HIDDEN,
    "projector_output_dim": HIDDEN, "out_hidden_size": HIDDEN, "depth": 1,
    # token ids inside the tiny vocabulary
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
LAYER_COUNT = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "encoder_layers")
# output transforms made visible: a missing one must show in float64
VISIBLE = {
    "final_logit_softcapping": 2.0, "logits_soft_cap": 2.0, "output_logit_soft_cap": 2.0, "logit_scale": 0.5,
    "logits_scaling": 4.0, "lm_head_multiplier": 0.5, "logits_mup_width_multiplier": 3.0,
}
# per model type: fields set after the generic shrinking (applied to the text config of composite models)
OVERRIDES = {}

# not a decoder-only text LM: the causal-LM half of an encoder-decoder, or a model that needs audio/pixel input
OUT_OF_SCOPE = {}
# decoder-only text LMs that cannot run here for reasons unrelated to dpo_ds
SKIP = {}


def _shrink(d: dict, sub_names) -> dict:
    """A tiny copy of one config's dict (sub-configs shrunk recursively)."""
    d = copy.deepcopy(d)
    n_old = next((d[k] for k in LAYER_COUNT if isinstance(d.get(k), int)), None)
    for k, v in list(d.items()):
        if isinstance(v, dict) and (k in sub_names or "model_type" in v):
            d[k] = _shrink(v, ())
        elif k in SMALL and isinstance(v, int) and not isinstance(v, bool):
            d[k] = min(v, SMALL[k]) if k not in ("pad_token_id", "bos_token_id", "eos_token_id") else SMALL[k]
        elif k in ("pad_token_id", "bos_token_id", "eos_token_id") and isinstance(v, list):
            d[k] = SMALL[k]
        elif k in VISIBLE and (v is None or isinstance(v, (int, float))):
            d[k] = VISIBLE[k]
    # per-layer lists: keep one layer of each distinct kind (at least 2, at most 4 layers)
    if n_old:
        per_layer = [k for k, v in d.items() if isinstance(v, list) and len(v) == n_old and n_old > 2]
        seen, keep = set(), []
        for i in range(n_old):
            sig = tuple(repr(d[k][i]) for k in per_layer)
            if sig not in seen:
                seen.add(sig)
                keep.append(i)
        keep = keep[:4]
        for i in range(n_old):
            if len(keep) >= 2:
                break
            if i not in keep:
                keep.append(i)
        keep.sort()
        for k in per_layer:
            d[k] = [d[k][i] for i in keep]
        for k in LAYER_COUNT:
            if isinstance(d.get(k), int) and d[k] == n_old:
                d[k] = len(keep)
    return d


def _changed(new: dict, old: dict) -> dict:
    """The entries of `new` that differ from `old` (sub-config dicts keep their model_type), so that every
    field derived from the sizes is derived again by the config class."""
    out = {}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict) and "model_type" in v:
            sub = _changed(v, old[k])
            if sub:
                out[k] = {"model_type": v["model_type"], **sub}
        elif v != old.get(k):
            out[k] = v
    return out


def tiny_config(model_type: str):
    """A tiny config for `model_type`: the defaults with the sizes shrunk, the output transforms visible."""
    base = AutoConfig.for_model(model_type)
    sub_names = tuple(getattr(base, "sub_configs", {}) or {})
    old = base.to_dict()
    kwargs = _changed(_shrink(old, sub_names), old)
    over = OVERRIDES.get(model_type, {})
    if "text_config" in old and isinstance(old["text_config"], dict):
        kwargs.setdefault("text_config", {"model_type": old["text_config"]["model_type"]})
        kwargs["text_config"].update({k: v for k, v in over.items() if k != "_top"})
    else:
        kwargs.update({k: v for k, v in over.items() if k != "_top"})
    kwargs.update(over.get("_top", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type, **kwargs)


def build(model_type: str, seed: int = 0):
    """The tiny model in float64, eval mode, every parameter moved off its init (norm weights off 1, biases
    and zero-initialised scales off 0) so that no transform can hide behind an identity."""
    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, experts_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_batch(vocab: int, seed: int = 0):
    """3 rows of 12 tokens, the second right-padded by 4; labels -100 on the 4 prompt tokens and the padding."""
    g = torch.Generator().manual_seed(seed)
    B, T, prompt, pad = 3, 12, 4, 4
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - pad:] = 0
    ids[1, T - pad:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


class Spy:
    """The model's OutputHead, recording the logits of every chunk in the model's dtype (sequence_logps
    itself accumulates in fp32)."""

    def __init__(self, head):
        self.head, self.chunks = head, []

    def __call__(self, hidden):
        logits = self.head.logits(hidden)
        self.chunks.append(logits)
        return logits.float()


def check(model_type: str):
    """'refused', 'plain' or 'transform'; raises AssertionError on a mismatch."""
    model = build(model_type)
    ids, mask, labels = make_batch(model.config.get_text_config().vocab_size)
    try:
        head = output_head(model)
    except UserError:
        assert model_type not in PLAIN and model_type not in TRANSFORMS
        return "refused"
    spy = Spy(head)
    with torch.no_grad():
        want = naive_sequence_logps(model, ids, mask, labels)
        got, n = sequence_logps(model, ids, mask, labels, chunk_size=5, head=spy)
    targets = labels[:, 1:]
    sel = targets != -100
    assert n.tolist() == sel.sum(1).tolist()
    assert all(c.shape[0] <= 5 for c in spy.chunks)
    logits = torch.cat(spy.chunks).double()
    token = logits.log_softmax(-1).gather(-1, targets[sel].unsqueeze(-1)).squeeze(-1)
    got64 = torch.zeros(ids.shape[0], dtype=torch.float64).index_add(0, sel.nonzero()[:, 0], token)
    torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)  # the fp32 result itself
    return "transform" if model_type in TRANSFORMS else "plain"


MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_architecture_is_exact_or_refused(model_type):
    if model_type in OUT_OF_SCOPE:
        assert model_type not in PLAIN and model_type not in TRANSFORMS, "never checked: must stay refused"
        pytest.skip(f"out of scope: {OUT_OF_SCOPE[model_type]}")
    if model_type in SKIP:
        pytest.skip(SKIP[model_type])
    check(model_type)
