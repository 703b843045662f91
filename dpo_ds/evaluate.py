"""DPO metrics of any saved model on a prepared split, against the cached reference.

    python -m dpo_ds.evaluate --model MODEL_DIR --data PREPARED_DIR --ref_cache CACHE_DIR [--split eval] [--output FILE.json] \
        [--loss_type sigmoid ...] [--beta 0.1] ...     # the loss settings of dpo_ds.train: reports that loss

`logps/win_rate` (the model's own log-prob prefers chosen) needs no reference, so it is meaningful for the
SFT model too, whose implicit rewards against itself are zero by definition.
"""
from __future__ import annotations

from dpo_ds import dist, engine
from dpo_ds.cache.read import open_verified, precision_warning
from dpo_ds.cli import main_guard, on_fault, parse
from dpo_ds.config import EvalConfig
from dpo_ds.errors import UserError
from dpo_ds.model.batch import pad_and_eos
from dpo_ds.objective.metrics import tie_rule
from dpo_ds.objective.step import split_metrics
from dpo_ds.pretrained import dtype_name, open_model_dir, resolve_dtype
from dpo_ds.report import memory
from dpo_ds.report.log import format_metrics
from dpo_ds.storage import owner
from dpo_ds.storage.files import atomic_json
from dpo_ds.storage.fingerprint import tokenizer_fingerprint

OUTPUT_KEYS = ("split", "model", "examples")  # what makes a JSON file an earlier --output of evaluate


def run(cfg: EvalConfig) -> dict:
    on_fault(lambda: f"nothing was written{' to ' + cfg.output if cfg.output else ''}; rerun the same command")
    dist.init(cfg.dist_timeout_minutes, cfg.sequence_parallel_size)
    if cfg.output:
        dist.on_main(lambda: owner.check_output_file(cfg.output, "--output", OUTPUT_KEYS))
    tokenizer = open_model_dir(cfg.model, cfg.trust_remote_code, adapter=True)  # base + LoRA: merged
    # the evaluated model need not be the reference (a trained policy is not): no model check here
    cache = open_verified(cfg.ref_cache, cfg.data, None, [cfg.split])
    if tokenizer_fingerprint(tokenizer) != cache.report["tokenizer_fingerprint"]:
        raise UserError(f"--model {cfg.model} has another tokenizer than --data {cfg.data} was prepared with")
    reference = cache.reference(cfg.split, cfg.length_desensitised)
    dtype = dtype_name(resolve_dtype(cfg.dtype))
    cached = cache.manifest["fingerprint"]["dtype"]
    for line in (precision_warning(cache, cfg.split, dtype, cfg.beta), tie_rule(dtype, cached)):
        if line:
            dist.print0(line)
    ds = cache.data[cfg.split]
    model = engine.inference_engine(engine.ModelSpec.of(cfg), cfg.dtype, cfg.deepspeed, cfg.batch_size, stats=True)
    metrics = {"split": cfg.split, "model": cfg.model, "examples": len(ds),
               **split_metrics(model, ds, reference, cfg, cfg.batch_size, *pad_and_eos(tokenizer), cfg.bco_delta)}
    peaks = memory.per_rank()
    metrics.update(memory.largest(peaks), memory=peaks)
    if dist.is_main():
        print(f"evaluate {cfg.model} on {cfg.split} ({len(ds)} pairs): {format_metrics(metrics)}\n"
              f"  {memory.describe(peaks)}")
        if cfg.output:
            atomic_json(cfg.output, metrics)
    dist.barrier()
    return metrics


def main(argv=None):
    main_guard(lambda: run(parse(EvalConfig, argv, prog="python -m dpo_ds.evaluate", doc=__doc__)))


if __name__ == "__main__":
    main()
