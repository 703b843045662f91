"""dpo_ds.plan's measurements on the CPU, where the device is the host: each phase's runtime and what a layer
really costs beyond footprint's terms, from the real engines on the model cut to one and three layers
(dpo_ds/plan/probe.py, fresh processes, on two ranks where the job's ranks talk). Also the footprint.Job of
a plan's settings (`cfg`: a dpo_ds.plan.PlanConfig)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass

from dpo_ds.errors import UserError
from dpo_ds.plan import footprint as F
from dpo_ds.plan.choice import BATCH_KEYS

PROBE_LAYERS = (1, 3)
PROBE_RANKS = 2  # what ranks that talk cost each (gloo, DeepSpeed's shared-memory all-reduce) shows at two


@dataclass
class Measured:
    """What the CPU's probes measured (dpo_ds/plan/probe.py): zeros on CUDA, where nothing is measured."""
    runtime: int = 0          # training: the one-layer job's peak less its terms
    factor: float = 1.0       # what a further layer costs against its terms
    infer_runtime: int = 0    # precompute's and evaluate's engine, as runtime and factor
    infer_factor: float = 1.0


def probe_world(cfg, collective: bool) -> tuple[int, int]:
    """(ranks, K) a probe runs with: one process, or for a job whose ranks talk, PROBE_RANKS (K when larger)."""
    if cfg.gpus * cfg.nodes == 1 or not collective:
        return 1, 1
    return max(min(cfg.gpus * cfg.nodes, PROBE_RANKS), cfg.sequence_parallel_size), cfg.sequence_parallel_size


def probe_peak(cfg, ds: dict | None, layers: int, mode: str = "train") -> int:
    """The busiest rank's peak resident bytes in dpo_ds/plan/probe.py: two real training steps (or precompute's
    two forwards: mode infer, `ds` its inference config or None) on the model cut to `layers`, with this
    config, batch and layout, on probe_world's ranks."""
    from dpo_ds.dist import LAUNCHER_VARIABLES, run_local_ranks

    ranks, k = probe_world(cfg, mode == "train" or bool(ds) or cfg.sequence_parallel_size > 1)
    tri = lambda v: -1 if v is None else int(v)  # noqa: E731
    micro = cfg.micro_batch_size if mode == "train" else cfg.batch_size
    flags = dict(mode=mode, model=cfg.model, micro=micro, length=cfg.max_length,
                 checkpointing=int(cfg.gradient_checkpointing), tiled=int(cfg.tiled_mlp and mode == "train"),
                 chunk=cfg.logp_chunk_size, layers=layers, share=tri(cfg.share_prompt), pack=tri(cfg.packing), sp=k,
                 dtype=inference_dtype(cfg))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # the probe injects its own batch and clipping
        json.dump({**{k_: v for k_, v in (ds or {}).items() if k_ != "sequence_parallel_size"},
                   **{k_: "auto" for k_ in BATCH_KEYS}}, f)
        f.flush()
        args = [f.name if ds else "-", *(str(x) for name, v in flags.items() for x in (f"--{name}", v))]
        env = {k_: v for k_, v in os.environ.items() if k_ not in LAUNCHER_VARIABLES}  # whatever launched this
        code, texts = run_local_ranks([sys.executable, "-m", "dpo_ds.plan.probe", *args], ranks,
                                      {**env, "PYTHONWARNINGS": "ignore"})
    out, err = "".join(o for o, _ in texts), "".join(e for _, e in texts)
    peaks = [int(n) for n in re.findall(r"^probe_peak_bytes (\d+)$", out, re.M)]
    if code or not peaks:
        raise UserError(f"measuring the runtime on this machine failed: {(err or out).strip()[-300:]}")
    return max(peaks)


def measured_terms(cfg, ds: dict, inference: bool = True) -> Measured:
    """On the CUDA device nothing is measured: the runtime is outside max_memory_allocated. On the CPU, now, on
    this machine, for training and (with `inference`) for precompute's and evaluate's engine: calibrate."""
    if cfg.device != "cpu":
        return Measured()
    runtime, factor = calibrate(cfg, ds, "train")
    if not inference:
        return Measured(runtime, factor, runtime, factor)
    return Measured(runtime, factor, *calibrate(cfg, inference_config(cfg), "infer"))


def calibrate(cfg, ds: dict, mode: str) -> tuple[int, float]:
    """(runtime bytes, per-layer factor) from probe_peak at 1 and 3 layers (a model of fewer: at 1 and all of them,
    never built larger than it is) on probe_world's ranks: the runtime is the one-layer peak less the arithmetic
    for that same job, the factor what the further layers cost against what the arithmetic says they cost (1 for
    a one-layer model)."""
    training = mode == "train"
    ranks, k = probe_world(cfg, training or bool(cfg.inference_deepspeed) or cfg.sequence_parallel_size > 1)
    probe_cfg = dataclasses.replace(cfg, gpus=ranks, nodes=1, sequence_parallel_size=k)
    whole = F.Shape.of(cfg.model, threshold(ds)).layers
    arith, peak = [], []
    for layers in sorted({min(n, whole) for n in PROBE_LAYERS}):
        cut = F.Shape.of(cfg.model, threshold(ds), layers=layers)
        arith.append(F.phase(cut, job_of(probe_cfg, ds, training, 0), "train" if training else "precompute")["total"])
        peak.append(probe_peak(cfg, ds if training or cfg.inference_deepspeed else None, layers, mode))
    if len(peak) == 1:
        return max(0, peak[0] - arith[0]), 1.0
    return max(0, peak[0] - arith[0]), max(1.0, (peak[1] - peak[0]) / max(arith[1] - arith[0], 1))


def inference_dtype(cfg) -> str:
    return cfg.dtype if cfg.dtype != "auto" else ("fp32" if cfg.device == "cpu" else "bf16")


def inference_config(cfg) -> dict:
    """Precompute's DeepSpeed config ({} for a full copy per rank) in its --dtype, as engine.inference_ds_config
    sets it."""
    dtype = inference_dtype(cfg)
    return {**F.read_ds(cfg.inference_deepspeed), "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16"}}


def threshold(ds: dict) -> float:
    return float(ds.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 1e5))


def job_of(cfg, ds: dict, training: bool, runtime: int, excess: float = 0.0) -> F.Job:
    return F.Job(ds=ds, world=cfg.gpus * cfg.nodes, micro_batch=cfg.micro_batch_size if training else cfg.batch_size,
                 max_length=cfg.max_length, sp=cfg.sequence_parallel_size, tiled_mlp=cfg.tiled_mlp and training,
                 checkpointing=cfg.gradient_checkpointing, chunk=cfg.logp_chunk_size, device=cfg.device,
                 runtime=runtime, excess=excess, adapter=F.adapter_of(cfg) if training else 0)
