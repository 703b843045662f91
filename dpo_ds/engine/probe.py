"""The runtime term of dpo_ds.plan on the CPU, measured: one training step of the real engine (the same
`training_engine`, DeepSpeed config and chunked log-probs as train) around a model too small to matter, in a
fresh process; its peak resident set is what a rank holds besides the model's own terms (the interpreter,
torch, transformers, DeepSpeed's engine, buffers and threads, gloo).

    python -m dpo_ds.engine.probe DS_CONFIG_JSON      # prints the peak resident bytes
"""
from __future__ import annotations

import os
import sys
import tempfile


def main(argv=None) -> None:
    ds_path = (argv or sys.argv[1:])[0]
    from dpo_ds import dist
    from dpo_ds.engine.build import ModelSpec, TrainingSpec, training_engine
    from dpo_ds.engine.ds_config import train_ds_config
    from dpo_ds.model.batch import dummy_batch
    from dpo_ds.model.logps import pair_logps
    from dpo_ds.report.memory import peak_rss_bytes
    from dpo_ds.tiny import build_model

    dist.init()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(vocab_size=64, hidden_size=32, layers=1)
        model.save_pretrained(tmp, safe_serialization=True)
        engine = training_engine(ModelSpec(tmp), TrainingSpec(learning_rate=1e-6, max_steps=1),
                                 train_ds_config(ds_path, 1, 1, 1.0))
        p = pair_logps(engine, dummy_batch(0, 2))
        engine.backward((p.chosen.logps - p.rejected.logps).sum())
        engine.step()
    print(peak_rss_bytes())
    os._exit(0)  # no process-group teardown to wait for


if __name__ == "__main__":
    main()
