"""dpo_ds.plan's measurement on the CPU: two training steps of the real engine (the same `training_engine`,
DeepSpeed config, layout and chunked log-probs as train) around the model cut to a few layers, at its real
width and vocabulary, on a batch of the planned size, in a fresh process. From the peaks at one layer and at
three, the planner takes the runtime (the one-layer peak less what footprint's arithmetic gives that model:
the interpreter, torch's kernels and caches, DeepSpeed's engine and buffers) and what one more layer really
costs on this machine against what the arithmetic says (allocator slack, the optimizer's temporaries).

    python -m dpo_ds.engine.probe DS_CONFIG_JSON \
        [MODEL_DIR_OR_CONFIG MICRO_BATCH MAX_LENGTH CHECKPOINTING TILED CHUNK LAYERS SHARE_PROMPT PACKING]

prints the peak resident bytes. Without a model: a negligible one (hidden 32, one layer) and a 1-token batch.
SHARE_PROMPT and PACKING: 1, 0, or -1 for the layout's default (model.layout.resolve).
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch


def cut_model(model: str | None, layers: int):
    """The model's architecture cut to `layers` (random weights, fp32), or the embedded tiny one, negligible."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine.footprint import config_of
    from dpo_ds.tiny import build_model

    if model is None:
        return build_model(vocab_size=64, hidden_size=32, layers=1)
    return AutoModelForCausalLM.from_config(config_of(model, layers=layers), dtype=torch.float32)


def batch_rows(micro: int, length: int, vocab: int) -> list:
    """`micro` pairs of `length` tokens each side: the first half prompt, the rest response."""
    g = torch.Generator().manual_seed(0)
    ids = lambda: torch.randint(3, vocab, (length,), generator=g).tolist()  # noqa: E731
    half = length // 2
    rows = []
    for i in range(micro):
        chosen, rejected = ids(), ids()
        rejected[:half] = chosen[:half]  # one prompt
        rows.append({"example_id": i, "chosen_input_ids": chosen, "chosen_labels": [-100] * half + chosen[half:],
                     "rejected_input_ids": rejected, "rejected_labels": [-100] * half + rejected[half:]})
    return rows


def main(argv=None) -> None:
    args = list(argv or sys.argv[1:])
    ds_path, model = args[0], (args[1] if len(args) > 1 else None)
    micro, length, checkpointing, tiled, chunk, layers, share, pack = (int(a) for a in args[2:10]) if model else \
        (1, 2, 1, 0, 256, 1, -1, -1)
    from dpo_ds import dist
    from dpo_ds.engine.build import ModelSpec, TrainingSpec, training_engine
    from dpo_ds.engine.ds_config import train_ds_config
    from dpo_ds.engine.footprint import text_config
    from dpo_ds.model.batch import build
    from dpo_ds.model.logps import layout_of, pair_logps
    from dpo_ds.report.memory import peak_rss_bytes

    dist.init()
    with tempfile.TemporaryDirectory() as tmp:
        lm = cut_model(model, layers)
        lm.save_pretrained(tmp, safe_serialization=True)
        vocab = text_config(lm.config).vocab_size
        del lm
        training = TrainingSpec(learning_rate=1e-6, max_steps=2, gradient_checkpointing=bool(checkpointing),
                                tiled_mlp=bool(tiled))
        ds = train_ds_config(ds_path, micro, 1, 1.0)
        layout = {"share_prompt": None if share < 0 else bool(share), "packing": None if pack < 0 else bool(pack)}
        engine = training_engine(ModelSpec(tmp, logp_chunk_size=chunk, **layout), training, ds)
        batch = build(batch_rows(micro, length, vocab), layout_of(engine), 0)
        engine.train()  # as train's loop: HF checkpoints layers only in training mode
        for _ in range(2):  # the optimizer's states appear at the first step; allocator slack by the second
            p = pair_logps(engine, batch)
            engine.backward((p.chosen.logps - p.rejected.logps).sum() * 1e-3)
            engine.step()
    print(peak_rss_bytes())
    os._exit(0)  # no process-group teardown to wait for


if __name__ == "__main__":
    main()
