"""The layouts a batch of preference pairs can take, and which one a model runs (its attention and type decide);
dpo_ds.model.batch builds them.

    plain          one row per sequence (prompt + chosen, prompt + rejected), padded to the longest
    share_prompt   one segment per pair, [prompt | chosen | rejected]: each response attends to the prompt and
                   to itself, never to the other response; the rejected position_ids continue from the end
                   of the prompt, as if it stood alone; the last prompt position predicts both first tokens
    packing        several segments per row, no padding between them: block-diagonal attention, per-segment
                   position_ids

Every layout gives the same per-sequence log-probs as `plain` (to fp32 rounding: only the order of sums
differs), so a cache written with one layout serves a run with any other.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        return f"model type {model_type!r} is not among those checked exact in these layouts (dpo_ds/model/layout.py)"
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
                                f"attention; model type {model_type!r} is not known to (dpo_ds/model/layout.py "
                                f"FLASH_PACKING_TYPES): use --attn_implementation sdpa, or --no-packing")
            return PLAIN
        pack = packing is not False
        return Layout(False, pack, one_row=pack)
    if share_prompt or packing:
        raise UserError(f"--share_prompt and --packing need sdpa, eager or flash_attention_2 attention; the model "
                        f"uses {attn!r}: pass --no-share_prompt --no-packing")
    return PLAIN
