"""The trained policy written out, rank 0, from its parameters as gathered (engine.export): an HF checkpoint, or
PEFT's adapter directory (and the merged model), each published atomically with the tokenizer's files."""
from __future__ import annotations

import os
import shutil

from dpo_ds.pretrained.load import load_merged, whole_loads
from dpo_ds.storage import files


def save_model(lm, state: dict, source_dir: str, out_dir: str, card=None) -> None:
    """The HF model `lm` with the parameters `state` (a CPU copy of each; tied weights once, save_pretrained
    re-ties them) and its persistent buffers as an HF checkpoint (safetensors) in out_dir; `card()`: the README.md
    written beside the weights."""
    persistent = lm.state_dict().keys()
    state = {**state, **{name: b.detach().cpu() for name, b in lm.named_buffers() if name in persistent}}

    def write(tmp: str) -> None:
        use_cache, lm.config.use_cache = lm.config.use_cache, True  # off for training; on for whoever generates
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        lm.config.use_cache = use_cache
        _card(tmp, card)

    publish(out_dir, write, source_dir)


def save_adapter(peft_model, state: dict, source_dir: str, out_dir: str, card=None, merge: bool = False) -> None:
    """The trained adapter (`state`: the trainable parameters by their names in the base model) as PEFT's directory
    (adapter_config.json + adapter_model.safetensors, which `PeftModel.from_pretrained(base, out_dir)` loads) with
    the tokenizer and model card, and with `merge` the base + adapter merged into out_dir/merged (a plain HF
    checkpoint)."""
    from peft.utils import get_peft_model_state_dict

    model = peft_model.base_model.model
    state = {f"base_model.model.{name}": t for name, t in state.items()}  # the names PEFT's functions expect

    def write(tmp: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(tmp)
        adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model, state_dict=state).items()}
        save_file(adapter, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_model.peft_config["default"].save_pretrained(tmp)
        if merge:
            from transformers import AutoModelForCausalLM

            def base(path):
                return AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype, use_safetensors=True)

            with whole_loads():
                merged = load_merged(tmp, base)
            merged.config.use_cache = True
            merged.save_pretrained(os.path.join(tmp, "merged"), safe_serialization=True)
        _card(tmp, card)

    publish(out_dir, write, source_dir, also=("merged",) if merge else ())


def _card(folder: str, card) -> None:
    if card is not None:
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(card())


def publish(out_dir: str, write, source_dir: str, also: tuple = ()) -> None:
    """out_dir as `write(tmp)` makes it, with the tokenizer files of `source_dir` copied byte for byte (into
    the subfolders `also` too), made durable and renamed into place: a crash leaves out_dir (old or new) or,
    between the renames, out_dir.old, which the next export removes."""
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for folder in (tmp, *(os.path.join(tmp, sub) for sub in also)):
        for name in os.listdir(source_dir):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy2(os.path.join(source_dir, name), folder)
    for sub in also:
        files.make_durable(os.path.join(tmp, sub))
    files.make_durable(tmp)
    if os.path.isdir(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    files.fsync_dir(os.path.dirname(os.path.abspath(out_dir)))
    shutil.rmtree(old, ignore_errors=True)
