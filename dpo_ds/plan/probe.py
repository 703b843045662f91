"""dpo_ds.plan's measurement on the CPU: two training steps of the real engine (the same `training_engine`,
DeepSpeed config, layout and chunked log-probs as train) around the model cut to a few layers, at its real
width and vocabulary, on a batch of the planned size, in a fresh process. From the peaks at one layer and at
three (or all of a model's fewer), the planner takes the runtime (the one-layer peak less what footprint's
arithmetic gives that model: the interpreter, torch's kernels and caches, DeepSpeed's engine and buffers) and what
one more layer really costs on this machine against what the arithmetic says (allocator slack, the optimizer's
temporaries).

    python -m dpo_ds.plan.probe DS_CONFIG_JSON [--mode train|infer] [--model DIR_OR_CONFIG --micro B
        --length T --checkpointing 0|1 --tiled 0|1 --chunk C --layers N --share 0|1|-1 --pack 0|1|-1 --sp K]

prints each rank's peak resident bytes (on several ranks, as dist.run_local_ranks starts them: one line each).
Without a model: a negligible one (hidden 32, one layer) and a 1-token batch. --share and --pack: -1 for the
layout's default (model.layout.resolve). --mode infer runs precompute's engine (DS_CONFIG_JSON the inference
config, or -).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch


def cut_model(model: str | None, layers: int):
    """The model's architecture cut to `layers` (random weights, fp32), or the embedded tiny one, negligible."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.plan.footprint import config_of
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


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m dpo_ds.plan.probe")
    p.add_argument("ds", help="the DeepSpeed config (train), or the inference one (infer; - for a full copy)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; LOCAL_RANK is read")
    p.add_argument("--model", help="a checkpoint directory or its config.json (default: a negligible model)")
    p.add_argument("--dtype", default="fp32", help="infer: precompute's --dtype")
    for name, default in (("micro", 1), ("length", 2), ("checkpointing", 1), ("tiled", 0), ("chunk", 256),
                          ("layers", 1), ("share", -1), ("pack", -1), ("sp", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    from dpo_ds import dist
    from dpo_ds.engine.build import ModelSpec, TrainingSpec, inference_engine, training_engine
    from dpo_ds.engine.ds_config import train_ds_config
    from dpo_ds.model.batch import build
    from dpo_ds.model.logps import layout_of, pair_logps
    from dpo_ds.plan.footprint import text_config
    from dpo_ds.report.memory import peak_rss_bytes

    with tempfile.TemporaryDirectory() as tmp:
        lm = cut_model(a.model, a.layers)
        lm.save_pretrained(tmp, safe_serialization=True)  # every rank its own (transformers: rank 0 only, once
        vocab = text_config(lm.config).vocab_size        # a process group exists)
        del lm
        dist.init(sequence_parallel_size=a.sp)
        layout = {"share_prompt": None if a.share < 0 else bool(a.share),
                  "packing": None if a.pack < 0 else bool(a.pack)}
        spec = ModelSpec(tmp, logp_chunk_size=a.chunk, sequence_parallel_size=a.sp, **layout)
        if a.mode == "infer":  # precompute's and evaluate's engine, forward only
            engine = inference_engine(spec, a.dtype, None if a.ds == "-" else a.ds, a.micro)
            batch = build(batch_rows(a.micro, a.length, vocab), layout_of(engine), 0)
            with torch.no_grad():
                for _ in range(2):
                    pair_logps(engine, batch)
        else:
            training = TrainingSpec(learning_rate=1e-6, max_steps=2, gradient_checkpointing=bool(a.checkpointing),
                                    tiled_mlp=bool(a.tiled))
            engine = training_engine(spec, training, train_ds_config(a.ds, a.micro, 1, 1.0))
            batch = build(batch_rows(a.micro, a.length, vocab), layout_of(engine), 0)
            engine.train()  # as train's loop: HF checkpoints layers only in training mode
            for _ in range(2):  # the optimizer's states appear at the first step; allocator slack by the second
                p = pair_logps(engine, batch)
                engine.backward((p.chosen.logps - p.rejected.logps).sum() * 1e-3)
                engine.step()
    sys.stdout.flush()  # each rank's line in one write (ranks share the pipe); the caller takes the largest
    os.write(sys.stdout.fileno(), f"\nprobe_peak_bytes {peak_rss_bytes()}\n".encode())
    os._exit(0)  # no process-group teardown to wait for


if __name__ == "__main__":
    main()
