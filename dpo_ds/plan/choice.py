"""Which DeepSpeed configuration a training run uses: a resumed run's own; with `--deepspeed auto` (the default)
the lightest the memory planner (plan/footprint.py) finds for the ranks and device at hand; else the file
asked for, with stage 0 in place of a ZeRO-3 that partitions nothing (one rank, no offload)."""
from __future__ import annotations

import copy

import torch

from dpo_ds import dist
from dpo_ds.engine.ds_config import ds_dtype, partitions_nothing, read_ds_config, train_ds_config, zero_stage
from dpo_ds.errors import UserError
from dpo_ds.plan import footprint as F
from dpo_ds.pretrained.load import dtype_name

AUTO = "auto"
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
BUDGET_FRACTION = 0.9  # of the device: its context, the allocator's fragmentation and the planner's error
BF16_FIRST = "stage 1 + fp32 gradient accumulation"  # bf16's lightest (candidates)


def candidates(base: dict, device: str, sp: int = 1) -> list[tuple[str, dict]]:
    """(name, DeepSpeed config) from lightest to heaviest in time: stage 0, 2, 3, 3 + optimizer offload, 3 +
    parameter offload (on CUDA only: on the CPU the host is the device, so offloading frees nothing); the
    precision and batch keys of `base`, ZeRO settings as the shipped ds_configs/ for that device. Under bf16 the
    first is stage 1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) instead of stage 0, whose bf16
    optimizer (DeepSpeed's unfused one) sums the micro-batches' gradients in bf16: its trajectory strays from
    ZeRO-2/3's in bf16 more than theirs from fp32 (README "bf16"); not with sequence parallelism (`sp` > 1), where
    DeepSpeed 0.19.8's BF16_Optimizer fails at its first step (a rank with no gradient to take the norm of)."""
    keep = {k: v for k, v in base.items() if k not in ("zero_optimization", "optimizer", "data_types")}
    cuda = device == "cuda"
    stage3 = {"stage": 3, "overlap_comm": cuda, "contiguous_gradients": True,
              "stage3_param_persistence_threshold": 1e6 if cuda else 1e5,
              "stage3_gather_16bit_weights_on_model_save": True,
              **({"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8} if cuda else
                 {"memory_efficient_linear": False})}
    zeros = [("stage 0", {"stage": 0}, None),
             ("stage 2", {"stage": 2, "overlap_comm": cuda, "contiguous_gradients": True,
                          "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}, None),
             ("stage 3", stage3, None)]
    if cuda:  # offloaded moments need DeepSpeed's CPU-Adam (as ds_configs/zero3_offload.json)
        offload, adam = {"device": "cpu", "pin_memory": True}, {"type": "AdamW", "params": {"betas": [0.9, 0.999],
                                                                                             "eps": 1e-8}}
        zeros += [("stage 3 + optimizer offload", {**stage3, "offload_optimizer": offload}, adam),
                  ("stage 3 + parameter offload", {**stage3, "offload_optimizer": offload, "offload_param": offload},
                   adam)]
    if ds_dtype(base) == torch.bfloat16 and sp == 1:
        zeros[0] = (BF16_FIRST, {"stage": 1}, None)
    return [(name, {**copy.deepcopy(keep), "zero_optimization": z, **({"optimizer": o} if o else {}),
                    **({"data_types": {"grad_accum_dtype": "fp32"}} if name == BF16_FIRST else {})})
            for name, z, o in zeros]


def auto_dtype() -> torch.dtype:
    """bf16 where the GPU has it, else fp32 (the CPU's kernels are fp32's)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def base_config(dtype: torch.dtype) -> dict:
    return {**{k: "auto" for k in BATCH_KEYS}, "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": False}}


def device_budget(per_host: int | None = None) -> tuple[str, int]:
    """(device, bytes one rank may plan for): BUDGET_FRACTION of the GPU's memory, or on the CPU of the host's
    memory shared by `per_host` ranks (default: this host's)."""
    if torch.cuda.is_available():
        return "cuda", int(BUDGET_FRACTION * torch.cuda.get_device_properties(dist.device()).total_memory)
    import psutil

    return "cpu", int(BUDGET_FRACTION * psutil.virtual_memory().total / (per_host or dist.local_world_size()))


def first_fit(shape_of, job, budget: int, base: dict, device: str, sp: int = 1):
    """(name, DeepSpeed config, planned bytes) of the first candidate whose training step fits `budget`, else
    (None, None, [(name, bytes) tried]); `shape_of(threshold)` is the model's footprint.Shape for a ZeRO-3
    persistence threshold, `job(ds)` a candidate's footprint.Job. Train's auto and dpo-ds plan choose here."""
    tried, shapes = [], {}
    for name, ds in candidates(base, device, sp):
        limit = float(ds["zero_optimization"].get("stage3_param_persistence_threshold", 1e5))
        if limit not in shapes:
            shapes[limit] = shape_of(limit)
        need = F.phase(shapes[limit], job(ds), "train")["total"]
        if need <= budget:
            return name, ds, need
        tried.append((name, need))
    return None, None, tried


def lightest(cfg, longest: int) -> tuple[str, dict, str]:
    """(name, DeepSpeed config, the line saying why) of the first candidate whose training step fits this
    device; `cfg` a TrainConfig, `longest` its longest row in tokens. Rank 0 chooses for every rank (hosts
    may differ)."""
    def choose():
        device, budget, adapter = *device_budget(), F.adapter_of(cfg)
        job = lambda ds: F.Job(ds=ds, world=dist.world_size(), micro_batch=cfg.micro_batch_size,  # noqa: E731
                               max_length=longest, sp=cfg.sequence_parallel_size, tiled_mlp=cfg.tiled_mlp,
                               checkpointing=cfg.gradient_checkpointing, chunk=cfg.logp_chunk_size, device=device,
                               adapter=adapter)
        shape_of = lambda limit: F.Shape.of(cfg.model, limit, trust_remote_code=cfg.trust_remote_code)  # noqa: E731
        dtype = auto_dtype()
        sp = cfg.sequence_parallel_size
        name, ds, need = first_fit(shape_of, job, budget, base_config(dtype), device, sp)
        if name is None:
            raise UserError(f"--deepspeed auto: no configuration fits {budget / F.GiB:.1f} GiB per rank ("
                            f"{', '.join(f'{n} {b / F.GiB:.1f}' for n, b in need)} GiB planned, rows up to "
                            f"{longest} tokens): lower --micro_batch_size, use --sequence_parallel_size or "
                            f"--tiled_mlp, or more ranks (dpo-ds plan --search)")
        line = (f"train: --deepspeed auto: {name} ({dist.world_size()} rank(s), {dtype_word(ds)}; planned "
                f"{need / F.GiB:.2f} of {budget / F.GiB:.1f} GiB per rank, the model's terms)")
        if dtype != torch.float32:
            line += unlike_fp32(name, first_fit(shape_of, job, budget, base_config(torch.float32), device, sp)[0])
        return name, ds, line
    return dist.on_main(choose)


def unlike_fp32(name: str, fp32_name: str | None) -> str:
    """Where the same job in fp32 would run another configuration, why, in a few words (else "")."""
    if fp32_name == name or (name, fp32_name) == (BF16_FIRST, "stage 0"):  # each precision's lightest
        return ""
    order = [n for n, _ in candidates({}, "cuda")]
    rank = lambda n: order.index("stage 0" if n == BF16_FIRST else n)  # noqa: E731
    if fp32_name is not None and rank(fp32_name) < rank(name):
        why = ("bf16's stage 1 holds 8 + 12 / ranks bytes per parameter (bf16 weights and gradients and their fp32 "
               "sum on every rank, fp32 masters and Adam's moments partitioned), fp32's stage 0 16")
    else:
        why = "bf16 halves the weights, gradients and activations each rank holds"
    return f"; in fp32 it would be {fp32_name or 'none that fits'}: {why}"


def dtype_word(ds: dict) -> str:
    return dtype_name(ds_dtype(ds))


def planned_dtype(path: str, saved: dict | None) -> torch.dtype:
    """The training precision before the configuration is chosen (the data check compares the cache's)."""
    if saved is not None:
        return ds_dtype(saved)
    return auto_dtype() if path == AUTO else ds_dtype(read_ds_config(path))


def engine_config(cfg, saved: dict | None, longest) -> tuple[dict, str | None]:
    """(the DeepSpeed config the run uses with the job's batch sizes injected, a line to print or None).
    `saved`: the configuration of the run this one resumes (OUT/config.json), None for a new run; `longest()`:
    the longest row in tokens (asked only when auto chooses afresh)."""
    def injected(ds: dict) -> dict:
        return train_ds_config({**ds, **{k: "auto" for k in BATCH_KEYS}}, cfg.micro_batch_size, cfg.grad_accum,
                               cfg.max_grad_norm)

    if cfg.deepspeed == AUTO:
        if saved is not None:
            return injected(saved), f"train: --deepspeed auto: the run's own configuration (ZeRO stage " \
                                    f"{zero_stage(saved)}, {dtype_word(saved)})"
        name, ds, line = lightest(cfg, longest())
        return injected(ds), line
    ds = train_ds_config(cfg.deepspeed, cfg.micro_batch_size, cfg.grad_accum, cfg.max_grad_norm)
    if not partitions_nothing(ds):
        return ds, None
    if ds_dtype(ds) != torch.float32:  # stage 0 would add bf16/fp16 gradients' fp32 accumulation: more memory
        return ds, (f"train: one rank with ZeRO-3 ({cfg.deepspeed}) partitions nothing and only costs time; "
                    f"ds_configs/zero2.json holds about the same memory")
    if saved is not None and zero_stage(saved) == 3:
        return ds, (f"train: one rank with ZeRO-3 ({cfg.deepspeed}) partitions nothing; this run started so and "
                    f"continues so (a new run gets stage 0)")
    return runs_as(ds, 1), (f"train: one rank with ZeRO-3 ({cfg.deepspeed}) partitions nothing: running stage 0 "
                            f"instead (fp32: the same memory, without ZeRO-3's gathers and partition copies)")


def runs_as(ds: dict, world: int) -> dict:
    """The configuration a new run of `ds` on `world` ranks runs: stage 0 in place of an fp32 ZeRO-3 that
    partitions nothing (one rank, no offload), else `ds`."""
    if partitions_nothing(ds, world) and ds_dtype(ds) == torch.float32:
        return {**copy.deepcopy(ds), "zero_optimization": {"stage": 0}}
    return ds
