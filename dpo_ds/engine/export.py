"""The trained policy out as an HF checkpoint: gathered from ZeRO-3 shards, written atomically."""
from __future__ import annotations

import os
import shutil

from dpo_ds import dist
from dpo_ds.storage import files


def export(policy, source_dir: str, out_dir: str, card=None, merge: bool = False) -> None:
    """The trained policy (`engine.module` of a training engine) out: the whole model as an HF checkpoint, or,
    trained with adapters, PEFT's adapter directory (and the merged model with `merge`). Collective."""
    if policy.peft_model is not None:
        from dpo_ds.engine.adapters import export_adapter

        export_adapter(policy.peft_model, source_dir, out_dir, card, merge)
    else:
        export_hf(policy.lm, source_dir, out_dir, card)


def export_hf(lm, source_dir: str, out_dir: str, card=None) -> None:
    """Write the HF model `lm` (the policy inside a training engine: `engine.module.lm`) as an HF checkpoint
    (safetensors), tokenizer files copied byte for byte. Collective: under ZeRO-3 its parameters are
    partitioned (a plain save writes empty tensors), so each is gathered in turn and rank 0 keeps a copy;
    peak memory is the full model on rank 0 plus one parameter elsewhere. `card()`: the README.md written
    beside the weights (rank 0)."""
    state = gathered(lm.named_parameters())  # tied weights appear once; save_pretrained re-ties them
    dist.on_main(lambda: _save_hf(lm, state, source_dir, out_dir, card))  # its failure stops every rank


def gathered(named) -> dict:
    """{name: a CPU copy} of the (name, parameter) pairs `named` on rank 0 ({} elsewhere). Collective: each is
    gathered in turn, a no-op without ZeRO-3 partitioning (stages 0-2); under stage 3 even the resident small
    ones are released on exit, so call this at the end of training, not in the middle."""
    import deepspeed

    state = {}
    for name, param in named:
        with deepspeed.zero.GatheredParameters([param]):
            if dist.is_main():
                state[name] = param.detach().to("cpu", copy=True)
    return state


def _save_hf(lm, state: dict, source_dir: str, out_dir: str, card=None) -> None:
    persistent = lm.state_dict().keys()
    state.update({name: b.detach().cpu() for name, b in lm.named_buffers() if name in persistent})

    def write(tmp: str) -> None:
        use_cache, lm.config.use_cache = lm.config.use_cache, True  # off for training; on for whoever generates
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        lm.config.use_cache = use_cache
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card())

    publish(out_dir, write, source_dir)


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
