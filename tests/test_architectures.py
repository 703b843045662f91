"""Every decoder-only text causal LM type in transformers: dpo_ds's chunked log-probs either refuse it or
reproduce the model's own forward.
    scripts/test.sh tests/test_architectures.py

For each model type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES a tiny random model is built in float64 (its
output transforms set to values that show, its parameters moved off their identity init) and a right-padded
batch is scored twice: `sequence_logps` (the decoder, then `head.output_head` on response positions only,
chunk_size=5) and the model's own forward (`naive_sequence_logps`, full log_softmax). `output_head` must either
refuse the type (UserError) or match: the head's logits (recorded in the dtype the forward returns, before
any cast in OutputHead.__call__) have the forward's dtype and shape and give its log-softmax and summed
log-probs to 1e-9, and the result of sequence_logps itself matches (to 1e-9 when it is float64, to fp32
precision when it is fp32). Encoder-decoder halves and audio decoders are out of scope; both must stay refused.

The survey's verdict depends on dpo_ds alone, not on what transformers added since the lock
(scripts/requirements.lock; tests/causal_lm_types.txt lists the locked release's types): a type dpo_ds refuses
whose config or model cannot be built here (its validator refuses every tiny shape tried, a dependency is
missing) is skipped with transformers' own message, and a type newer than the lock (scripts/test.sh --latest) is
reported as a skip saying what it is. A type dpo_ds accepts is held to every check, whatever happens.
"""
import copy
import os
import warnings

import pytest
import torch
import transformers
from independent import naive_sequence_logps
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from dpo_ds.errors import UserError
from dpo_ds.model.batch import build as build_layout
from dpo_ds.model.head import PLAIN, TRANSFORMS, output_head
from dpo_ds.model.layout import EXACT_TYPES, Layout
from dpo_ds.model.logps import SequenceLogps, pair_logps, sequence_logps

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
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM, "v_head_dim": HEAD_DIM, "rotary_dim": 4,
    # factorised / per-layer embeddings
    "input_embedding_size": HIDDEN, "output_embedding_size": HIDDEN, "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8, "laurel_rank": 4,
    # sparse indexers
    "index_topk": 4, "index_head_dim": HEAD_DIM, "index_n_heads": 2, "index_num_heads": 2,
    # linear attention / state space
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 4, "mamba_d_ssm": 64,
    "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "state_size": 8, "time_step_rank": 4,
    "mamba_dt_rank": 4, "chunk_size": 4, "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1,
    "embedding_dim": HIDDEN, "num_blocks": 2, "n_shared_experts": 1, "moe_num_shared_experts": 1,
    # windows: small enough to matter in a 12-token batch
    "sliding_window": 5, "sliding_window_size": 5, "attention_window_size": 5, "window_size": 5,
    "attention_chunk_size": 5, "local_attention": 6,
    # vision towers (built with the model, never run)
    "hidden_size_global": HIDDEN,
    "image_size": 32, "patch_size": 8, "vision_output_dim": HIDDEN, "projector_input_dim": HIDDEN,
    "projector_output_dim": HIDDEN, "out_hidden_size": HIDDEN, "depth": 1,
    # token ids inside the tiny vocabulary
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
# None switches these features off: keep them off
OFF_WHEN_NONE = {"q_lora_rank", "o_lora_rank", "kv_lora_rank", "sliding_window", "sliding_window_size",
                 "attention_chunk_size", "window_size", "local_attention", "pad_token_id", "bos_token_id",
                 "eos_token_id", "rotary_dim"}
LAYER_COUNT = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "encoder_layers")
# output transforms made visible: a missing one must show in float64
VISIBLE = {
    "final_logit_softcapping": 2.0, "logits_soft_cap": 2.0, "output_logit_soft_cap": 2.0, "logit_scale": 0.5,
    "logits_scaling": 4.0, "lm_head_multiplier": 0.5, "logits_mup_width_multiplier": 3.0,
    "unpadded_vocab_size": 120,
}
# per model type: fields set after the generic shrinking (applied to the text config of composite models;
# "_top" to the config itself)
OVERRIDES = {
    "bamba": {"num_hidden_layers": 2, "attn_layer_indices": [1]},
    "jamba": {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 0},
    "recurrent_gemma": {"num_hidden_layers": 2, "block_types": ["recurrent", "attention"]},
    "granitemoehybrid": {"num_hidden_layers": 2, "layer_types": ["mamba", "attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "dbrx": {"attn_config": {"kv_n_heads": 1, "rope_theta": 1e4, "clip_qkv": 8.0}},  # attention reads rope_theta
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2, "intermediate_size": [64] * 4,
                     "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]},
    "lfm2_moe": {"num_hidden_layers": 3, "num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 8,
                       "indexer_compress_ratio": 2, "hc_lowrank": 8, "ple_embed_dim": HIDDEN},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["hybrid", "mamba", "hybrid"]},
    "zamba2": {"num_hidden_layers": 3, "layers_block_type": ["hybrid", "mamba", "hybrid"]},
    "mamba2": {"head_dim": 16},
    "xlstm": {"hidden_size": 64, "embedding_dim": 64},  # q/k/v widths are rounded up to multiples of 64
    "blt": {"encoder_hash_byte_group_vocab": 64, "local_attention_window_len": 5},
    "dots3_note": {"_top": {"vision_config": {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN},
                            "audio_config": {"adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN}}},
    # NVFP4-rounded keys and values need head_dim % 16 == 0; one sliding and one indexed layer, each its own K/V
    "kolibri1_1": {"num_hidden_layers": 2, "head_dim": 16, "layer_types": ["sliding_attention", "indexed_attention"],
                   "index_layers": [1], "kv_source_layers": [0, 1], "mlp_only_layers": [0], "index_pool_size": 16,
                   "index_compression": 2, "index_num_local_tokens": 2, "index_num_sink_tokens": 1},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [16, 16], "axial_pos_shape": [4, 4],
                 "attn_layers": ["local", "lsh"], "attention_head_size": HEAD_DIM},
}
OVERRIDES["qwen4_exp"] = OVERRIDES["qwen4_exp_text"]

# the model_type a built causal LM reports (what dpo_ds.model.head looks up) where it differs from the mapping's key:
# a composite config's causal LM keeps only the text config
RUNTIME_TYPE = {"dots3_note": "dots3_note_text", "emu3": "emu3_text_model", "gpt-sw3": "gpt2",
                "llama4": "llama4_text", "mllama": "mllama_text_model", "qwen3_5": "qwen3_5_text",
                "qwen3_5_moe": "qwen3_5_moe_text", "qwen4_exp": "qwen4_exp_text"}
# per model type: called on the built model
PREPARE = {"xmod": lambda m: m.set_default_language("en_XX")}

# not a decoder-only text LM: never checked, so they must stay refused
_ENC_DEC = "the decoder half of an encoder-decoder model"
OUT_OF_SCOPE = {
    **{t: _ENC_DEC for t in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
                              "pegasus", "plbart", "prophetnet")},
    "whisper": "the text decoder of a speech encoder-decoder",
    "trocr": "the text decoder of a vision encoder-decoder",
    "musicgen": "an audio-codebook decoder (one lm_head per codebook)",
    "musicgen_melody": "an audio-codebook decoder (one lm_head per codebook)",
}
# decoder-only text LMs that cannot be built or run here for reasons unrelated to dpo_ds: also kept refused
SKIP = {
    "gemma3n": "its vision tower (TimmWrapperModel) needs timm, which is not installed here",
    "gemma4_assistant": "a speculative-decoding drafter: its default config does not validate and its forward "
                        "needs the target model's shared KV states",
}


def _shrink(d: dict, cfg) -> dict:
    """A tiny copy of the dict of config `cfg` (sub-configs shrunk recursively). Fields stored under another
    name (the class's attribute_map, e.g. num_experts_per_token for num_experts_per_tok) count as that name."""
    d = copy.deepcopy(d)
    aliases = {v: k for k, v in (getattr(cfg, "attribute_map", {}) or {}).items()}
    sub_names = tuple(getattr(cfg, "sub_configs", {}) or {})
    n_old = next((d[k] for k in LAYER_COUNT if isinstance(d.get(k), int)), None)
    for field, v in list(d.items()):
        k = aliases.get(field, field) if aliases.get(field) != "head_dim" else field
        if isinstance(v, dict) and (k in sub_names or "model_type" in v):
            d[field] = _shrink(v, getattr(cfg, field, None))
        elif k in SMALL and isinstance(v, int) and not isinstance(v, bool):
            d[field] = min(v, SMALL[k]) if k not in ("pad_token_id", "bos_token_id", "eos_token_id") else SMALL[k]
        elif k in SMALL and v is None and k not in OFF_WHEN_NONE:
            d[field] = SMALL[k]
        elif k in ("pad_token_id", "bos_token_id", "eos_token_id") and isinstance(v, list):
            d[field] = SMALL[k]
        elif k in VISIBLE and (v is None or isinstance(v, (int, float))):
            d[field] = VISIBLE[k]
    if d.get("kv_lora_rank") and "num_key_value_heads" in d:  # latent attention: as many kv heads as heads
        d["num_key_value_heads"] = d.get("num_attention_heads")
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
    old = base.to_dict()
    kwargs = _changed(_shrink(old, base), old)
    over = OVERRIDES.get(model_type, {})
    if "text_config" in old and isinstance(old["text_config"], dict):
        kwargs.setdefault("text_config", {"model_type": old["text_config"]["model_type"]})
        kwargs["text_config"].update({k: v for k, v in over.items() if k != "_top"})
    else:
        kwargs.update({k: v for k, v in over.items() if k != "_top"})
    for k, v in over.get("_top", {}).items():
        kwargs[k] = {**kwargs.get(k, {}), **v} if isinstance(v, dict) else v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type, **kwargs)


class CannotBuild(Exception):
    """The type's config or model cannot be made here (transformers' message): nothing about dpo_ds."""


def build(model_type: str, seed: int = 0):
    """The tiny model in float64, eval mode, every parameter moved off its init (norm weights off 1, biases
    and zero-initialised scales off 0) so that no transform can hide behind an identity. CannotBuild when
    transformers refuses to make it."""
    try:
        cfg = tiny_config(model_type)
        for c in (cfg, cfg.get_text_config()):
            if hasattr(c, "use_cache"):
                c.use_cache = False  # scoring never needs a KV cache (and some models fail to build one)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, experts_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 - a validator, a missing package, an unsupported default: its own words
        raise CannotBuild(f"{type(e).__name__}: {str(e).strip().splitlines()[-1].strip()[:300] if str(e).strip() else ''}") \
            from e
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    if model_type in PREPARE:
        PREPARE[model_type](model)
    return model


def make_batch(vocab: int, seed: int = 0):
    """3 rows of 12 tokens, the second right-padded by 4; labels -100 on the 4 prompt tokens and the padding."""
    g = torch.Generator().manual_seed(seed)
    B, T, prompt, pad = 3, 12, 4, 4
    ids = torch.randint(3, min(vocab, 100), (B, T), generator=g)  # below any unpadded_vocab_size
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - pad:] = 0
    ids[1, T - pad:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def record_logits(head) -> list:
    """Make `head` (an OutputHead) also append the logits of every chunk, in the dtype the forward returns
    them, to the list returned; what sequence_logps gets from the head is unchanged."""
    chunks, inner = [], head.logits

    def logits(hidden):
        out = inner(hidden)
        chunks.append(out)
        return out

    head.logits = logits
    return chunks


def check(model_type: str):
    """'refused', 'plain' or 'transform'; raises AssertionError on a mismatch. Runs with float64 as torch's
    default dtype too, so that tensors a model creates without a dtype are float64 like its weights."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _check(model_type)
    finally:
        torch.set_default_dtype(default)


def _check(model_type: str):
    model = build(model_type)
    seen = model.config.model_type
    assert seen == RUNTIME_TYPE.get(model_type, model_type) or (seen not in PLAIN and seen not in TRANSFORMS), \
        f"{model_type} builds a {seen!r} model: see RUNTIME_TYPE"
    ids, mask, labels = make_batch(model.config.get_text_config().vocab_size)
    try:
        head = output_head(model)
    except UserError:
        assert seen not in PLAIN and seen not in TRANSFORMS
        return "refused"
    chunks = record_logits(head)
    with torch.no_grad():
        want = naive_sequence_logps(model, ids, mask, labels)
        own = model(input_ids=ids, attention_mask=mask).logits  # the model's own logits, [B, T, V]
        got, n = sequence_logps(model, ids, mask, labels, chunk_size=5, head=head)
    targets = labels[:, 1:]
    sel = targets != -100  # position t predicts token t+1
    assert n.tolist() == sel.sum(1).tolist()
    assert [c.shape[0] for c in chunks] == [min(5, int(sel.sum()) - i) for i in range(0, int(sel.sum()), 5)]
    logits, own = torch.cat(chunks), own[:, :-1][sel]
    # what the head returns for the response positions is what the forward returns there: same dtype (a
    # forward may upcast to fp32), same vocabulary (it may drop padding columns), same log-softmax
    assert (logits.dtype, logits.shape) == (own.dtype, own.shape), \
        f"head gives {logits.dtype} {tuple(logits.shape)}, the forward {own.dtype} {tuple(own.shape)}"
    # float64 matmuls agree to ~1e-15 whatever the shapes; a model that keeps lm_head in fp32 (hy_v4) rounds
    # differently for [N, H] rows than for the forward's [B, T, H], so it is held to fp32 precision
    tol = 1e-9 if head.lm_head.weight.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logits.double().log_softmax(-1), own.double().log_softmax(-1), rtol=tol, atol=tol)
    # and the summed response log-probs equal the float64 reference: exactly from the head's logits ...
    token = logits.double().log_softmax(-1).gather(-1, targets[sel].unsqueeze(-1)).squeeze(-1)
    got64 = torch.zeros(ids.shape[0], dtype=torch.float64).index_add(0, sel.nonzero()[:, 0], token)
    torch.testing.assert_close(got64, want, rtol=tol, atol=tol)
    # ... and as sequence_logps returns them: to the same tolerance when it keeps float64, else to fp32 precision
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    exact = layout_is_exact(model)
    assert exact == (seen in EXACT_TYPES), (f"{seen}: the shared-prompt + packed layout is "
                                           f"{'exact: add it to' if exact else 'not exact: remove it from'} "
                                           f"layout.EXACT_TYPES")
    return "transform" if seen in TRANSFORMS else "plain"


# float64 rounding is ~1e-16 relative; a position bias, recurrent state or window crossing segments moves a
# log-prob by >= 1e-4 (falcon_h1's 1.5e-4 the least seen, transformers 5.24). Between the two: look at it.
EXACT_BELOW, INEXACT_ABOVE = 1e-12, 1e-6


class Float64Everywhere(TorchFunctionMode):
    """Inside, a float64 model's float32 islands (routers, norms, softmaxes cast up to fp32 by design: axk1,
    hy_v3, minimax_m3_vl) stay float64. Their fp32 rounding depends on the matmul's shape, so packed and
    alone differed by 0 on one CPU and 1.5e-8 on another: noise of the island, not of the layout."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return func(*(torch.float64 if a is torch.float32 else a for a in args), **kwargs)


def layout_is_exact(model) -> bool:
    """Two pairs (segments of 18 and 10 tokens: longer than the test windows) in one packed row with shared
    prompts give each sequence's own log-probs, scored alone without padding, in float64 throughout (the
    model's fp32 parameters, buffers and casts too): the largest relative difference decides, with a wide
    margin either side (EXACT_BELOW, INEXACT_ABOVE); one in between fails the test with its number."""
    model.double()  # fp32 buffers (rotary inv_freq, router biases) too; this is the model's last use
    g = torch.Generator().manual_seed(1)
    vocab = model.config.get_text_config().vocab_size
    ids = lambda n: torch.randint(3, min(vocab, 100), (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for i, (p, c, r) in enumerate(((4, 8, 6), (3, 2, 5))):
        prompt, chosen, rejected = ids(p), ids(c), ids(r)
        pairs.append({"example_id": i, "chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected,
                      "chosen_labels": [-100] * p + chosen, "rejected_labels": [-100] * p + rejected})
    layout = Layout(share_prompt=True, packing=True)
    with torch.no_grad(), Float64Everywhere():
        want = []
        for side in ("chosen", "rejected"):
            for row in pairs:
                x, y = torch.tensor([row[f"{side}_input_ids"]]), torch.tensor([row[f"{side}_labels"]])
                want.append(sequence_logps(model, x, torch.ones_like(x), y, chunk_size=5)[0])
        try:
            p = pair_logps(SequenceLogps(model, chunk_size=5, layout=layout), build_layout(pairs, layout, 0))
            c, r = p.chosen.logps, p.rejected.logps
        except Exception:  # noqa: BLE001 - a decoder that rejects position_ids or a 4-D mask is not exact
            return False
    got, want = torch.cat([c, r]).double(), torch.cat(want).double()
    difference = float(((got - want).abs() / (1 + want.abs())).max())
    assert not EXACT_BELOW <= difference <= INEXACT_ABOVE, (
        f"{model.config.model_type}: packed vs alone differ by {difference:.2g} in float64, between noise "
        f"({EXACT_BELOW:g}) and a leak ({INEXACT_ABOVE:g}): find the cause before listing it either way")
    return difference < EXACT_BELOW


MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
HERE = os.path.dirname(os.path.abspath(__file__))


def locked_types() -> tuple[str, list[str]]:
    """(the locked transformers version, its causal LM types): tests/causal_lm_types.txt, which scripts/lock.sh
    writes with scripts/requirements.lock."""
    with open(os.path.join(HERE, "causal_lm_types.txt")) as f:
        header, *types = f.read().split("\n")
    return header.split()[2].rstrip(":"), [t for t in types if t]


LOCKED_VERSION, LOCKED_TYPES = locked_types()


def accepted(model_type: str) -> bool:
    return RUNTIME_TYPE.get(model_type, model_type) in PLAIN or RUNTIME_TYPE.get(model_type, model_type) in TRANSFORMS


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_architecture_is_exact_or_refused(model_type):
    if model_type in OUT_OF_SCOPE:
        assert not accepted(model_type), "never checked: must stay refused"
        pytest.skip(f"out of scope: {OUT_OF_SCOPE[model_type]}")
    if model_type in SKIP:
        assert not accepted(model_type), "never checked: must stay refused"
        pytest.skip(SKIP[model_type])
    new = "" if model_type in LOCKED_TYPES else f"new since the lock (transformers {LOCKED_VERSION}): "
    try:
        outcome = check(model_type)
    except CannotBuild as e:
        if accepted(model_type):  # dpo_ds accepts it, so the survey must be able to check it
            raise AssertionError(f"{model_type} is accepted by dpo_ds.model.head but cannot be built: {e}") from e
        pytest.skip(f"{new}{model_type} cannot be built here, stays refused: {e}")
    if new:
        pytest.skip(f"{new}{model_type} {'refused' if outcome == 'refused' else 'checked: ' + outcome}")


def test_the_survey_lists_the_locked_transformers():
    """tests/causal_lm_types.txt is the locked transformers' list (scripts/lock.sh writes both): on that release
    the survey checks exactly the types it names."""
    with open(os.path.join(HERE, os.pardir, "scripts", "requirements.lock")) as f:
        assert f"transformers=={LOCKED_VERSION}\n" in f.read(), "run scripts/lock.sh: the two files disagree"
    if transformers.__version__ != LOCKED_VERSION:
        pytest.skip(f"transformers {transformers.__version__} is not the locked {LOCKED_VERSION}: types new since "
                    f"the lock are reported one by one")
    assert MODEL_TYPES == LOCKED_TYPES


def test_every_listed_type_is_checked():
    """Every model type head.py accepts is one the parametrized test builds and compares (no stale entries)."""
    checked = {RUNTIME_TYPE.get(t, t) for t in MODEL_TYPES if t not in OUT_OF_SCOPE and t not in SKIP}
    assert sorted((set(PLAIN) | set(TRANSFORMS)) - checked) == []
    assert set(PLAIN).isdisjoint(TRANSFORMS)
    assert sorted(EXACT_TYPES - set(PLAIN) - set(TRANSFORMS)) == [], "layout-exact types are head-checked types"
