"""The trained policy out of its engine: its parameters gathered from ZeRO-3's partitions, then written by rank 0
(pretrained.export)."""
from __future__ import annotations

from dpo_ds import dist
from dpo_ds.pretrained.export import save_adapter, save_model


def export(policy, source_dir: str, out_dir: str, card=None, merge: bool = False) -> None:
    """The trained policy (`engine.module` of a training engine) out: the whole model as an HF checkpoint, or,
    trained with adapters, PEFT's adapter directory (and the merged model with `merge`): under ZeRO-3 only the
    adapter's parameters are gathered (the base is the SFT model on disk). Collective: peak memory is the
    gathered parameters on rank 0 plus one parameter elsewhere; a failure on rank 0 stops every rank."""
    if policy.peft_model is not None:
        model = policy.peft_model.base_model.model
        state = gathered((n, p) for n, p in model.named_parameters() if p.requires_grad)
        dist.on_main(lambda: save_adapter(policy.peft_model, state, source_dir, out_dir, card, merge))
    else:
        state = gathered(policy.lm.named_parameters())  # tied weights appear once; save_pretrained re-ties them
        dist.on_main(lambda: save_model(policy.lm, state, source_dir, out_dir, card))


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
