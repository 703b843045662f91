"""A checkpoint continued on another cluster: DeepSpeed's universal format, one folder per parameter with its
fp32 weights and Adam moments, which any number of ranks and any ZeRO stage can read.

    to_universal     the newest checkpoint converted once, atomically, into TAG_universal beside it
    needs_universal  whether a resume with this configuration must go through it
    load_into_stage0 a universal checkpoint into a stage-0 engine, fp32 or bf16 (DeepSpeed reads it under ZeRO only)

DeepSpeed's converter reads ZeRO checkpoints only and writes what its own readers need per stage (ZeRO-3: bare
tensors and the step in zero/optimizer_state.pt; ZeRO-1/2: {"param": ...} files and step.pt); a stage-0
checkpoint (one file: module and torch's AdamW state) is converted here, and every result is completed so that
each stage reads it.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil

import torch

from dpo_ds.engine.ds_config import offloaded, zero_stage
from dpo_ds.engine.unpickle import safe_load
from dpo_ds.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # stage 0-2 / 3 names


def needs_universal(saved: dict | None, now: dict, moved: bool) -> bool:
    """A resume from a run saved with DeepSpeed config `saved` under `now` reads a universal checkpoint: another
    ZeRO stage or offload, or (`moved`) other ranks or K with ZeRO shards to re-cut. Stage 0 to stage 0 holds
    the whole model and optimizer on every rank: nothing to convert."""
    if saved is None:
        return False
    stages = zero_stage(saved), zero_stage(now)
    return stages != (0, 0) and (stages[0] != stages[1] or offloaded(saved) != offloaded(now) or moved)


def to_universal(ckpt_dir: str, stage: int) -> str:
    """The newest checkpoint (saved under ZeRO `stage`) in the universal format: converted once (rank 0 alone)
    into TAG_universal beside it, atomically (a crash leaves the original usable and the next start converts
    again), then named by `latest_universal`, which DeepSpeed reads with "load_universal". -> the universal tag.
    Every source file is unpickled with weights_only=True first (DeepSpeed's converter unpickles anything)."""
    with open(os.path.join(ckpt_dir, "latest")) as f:
        tag = f.read().strip()
    src, out = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, f"{tag}_universal")
    if not os.path.isdir(out):
        for path in sorted(glob.glob(os.path.join(src, "*.pt"))):
            safe_load(path, map_location="cpu")
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if stage == 0:
                _from_stage0(src, tmp)
            else:
                from deepspeed.checkpoint.ds_to_universal import main as convert

                convert(argparse.Namespace(input_folder=src, output_folder=tmp, num_extract_workers=1,
                                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                                           inject_missing_state=True))  # ZeRO-1/2 checkpoints lack the info
            _readable_by_every_stage(tmp)
        except Exception as e:  # noqa: BLE001 - DeepSpeed's converter raises what it likes
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, UserError):
                raise
            raise UserError(f"{src}: converting it for another cluster or ZeRO stage failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is intact: resume with "
                            f"the run's own ranks and --deepspeed configuration") from None
        os.replace(tmp, out)
    latest = os.path.join(ckpt_dir, "latest_universal")
    with open(latest + ".tmp", "w") as f:
        f.write(f"{tag}_universal")
    os.replace(latest + ".tmp", latest)
    return f"{tag}_universal"


def _parameter_names(module: dict, buffers: list) -> list[str]:
    """The trained parameters of a saved module state dict, in the optimizer's order: state dict order
    (module registration, as named_parameters) without buffers and without a tied weight's second name (torch.save
    keeps the two names on one storage)."""
    names, seen = [], set()
    for name, tensor in module.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if name in buffers or key in seen:
            continue
        seen.add(key)
        names.append(name)
    return names


def _stage0_optimizer(saved: dict, src: str) -> tuple[dict, list | None]:
    """(torch's AdamW state, the fp32 master weights in its order or None) of a stage-0 checkpoint: fp32 runs
    torch's AdamW on the module's own weights; bf16 runs DeepSpeed's unfused bf16 optimizer, AdamW over per-
    parameter fp32 masters (`fp32_groups`) whose bf16 copies the module holds, gradients in bf16, no loss scale."""
    optimizer = saved.get("optimizer") or {}
    if set(optimizer) == {"state", "param_groups"}:
        return optimizer, None
    if set(optimizer) >= {"fp32_groups", "optimizer_state_dict"} and not optimizer.get("dynamic_loss_scale") \
            and optimizer.get("cur_scale", 1.0) == 1.0:
        return optimizer["optimizer_state_dict"], [w for group in optimizer["fp32_groups"] for w in group]
    raise UserError(f"{src}: a stage-0 checkpoint holding DeepSpeed's fp16 optimizer (a loss scale), which dpo_ds "
                    f"cannot convert: resume it with the run's own --deepspeed configuration")


def _from_stage0(src: str, out: str) -> None:
    """A stage-0 checkpoint (one file: the module, and torch's AdamW state by index, over the module's weights in
    fp32 or over fp32 masters under bf16) as per-parameter folders."""
    saved = safe_load(os.path.join(src, MODEL_STATES[0]), map_location="cpu")
    optimizer, masters = _stage0_optimizer(saved, src)
    names = _parameter_names(saved["module"], saved.get("buffer_names") or [])
    order = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(names) != len(order) or (masters is not None and len(masters) != len(order)):
        raise UserError(f"{src}: {len(names)} parameters in the module but {len(order)} in the optimizer: the "
                        f"checkpoint is not one dpo_ds wrote; resume with the run's own --deepspeed configuration")
    step = torch.tensor(0.0)
    for position, (name, index) in enumerate(zip(names, order)):
        weight = (saved["module"][name] if masters is None else masters[position]).float()
        state = optimizer["state"].get(index, {})
        step = state.get("step", step)
        os.makedirs(os.path.join(out, "zero", name))
        for key, value in (("fp32", weight), *((m, state.get(m, torch.zeros_like(weight))) for m in MOMENTS)):
            torch.save({"param": value.view_as(weight).clone(), "cat_dim": 0}, os.path.join(out, "zero", name,
                                                                                           f"{key}.pt"))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [0]} for g in optimizer["param_groups"]]
    torch.save({"ds_version": saved.get("ds_version"), "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               os.path.join(out, "zero", "optimizer_state.pt"))
    torch.save({**saved, "module": {}, "optimizer": None}, os.path.join(out, MODEL_STATES[0]))


def _readable_by_every_stage(out: str) -> None:
    """Complete a universal checkpoint so that stage 1/2 and stage 3 both read it: each state a {"param": ...}
    file and the step in both places; the model states (scheduler, steps, client state) under both names."""
    zero = os.path.join(out, "zero")
    optim = safe_load(os.path.join(zero, "optimizer_state.pt"), map_location="cpu")
    inner = optim.get("optimizer_state_dict") or {}
    groups = optim.get("param_groups") or inner["param_groups"]
    step = (inner.get("state") or {}).get(0, {}).get("step")
    for name in sorted(os.listdir(zero)):
        folder = os.path.join(zero, name)
        if not os.path.isdir(folder):
            continue
        # ZeRO-1/2: DeepSpeed's converter writes fp32.pt alone for a module state name no optimizer fragment has (a
        # tied weight's second name, lm_head.weight beside model.embed_tokens.weight): no moments to complete there
        for key in ("fp32", *(MOMENTS if os.path.isfile(os.path.join(folder, "exp_avg.pt")) else ())):
            value = safe_load(os.path.join(folder, f"{key}.pt"), map_location="cpu")
            if torch.is_tensor(value):
                torch.save({"param": value, "cat_dim": 0}, os.path.join(folder, f"{key}.pt"))
        if os.path.isfile(os.path.join(folder, "step.pt")):
            step = safe_load(os.path.join(folder, "step.pt"))
    if step is None:
        raise ValueError("the checkpoint records no optimizer step")
    step = torch.tensor(float(step), dtype=torch.float32)  # CPU-Adam keeps an int, torch's fused AdamW a tensor
    for name in sorted(os.listdir(zero)):
        if os.path.isdir(os.path.join(zero, name)):
            torch.save(step, os.path.join(zero, name, "step.pt"))
    scaling = {k: optim[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad") if k in optim}
    torch.save({**scaling, "ds_version": optim.get("ds_version") or _version(), "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               os.path.join(zero, "optimizer_state.pt"))  # the step alone: not a rank's flat moments
    states = sorted(glob.glob(os.path.join(out, "*model_states.pt")))
    common = {**safe_load(states[0], map_location="cpu"), "module": {}}
    for name in MODEL_STATES:
        torch.save(common, os.path.join(out, name))


def _version() -> str:
    import deepspeed

    return deepspeed.__version__


def load_into_stage0(engine, ckpt_dir: str) -> dict:
    """The universal checkpoint `latest_universal` names into a stage-0 `engine`: weights, AdamW's moments and
    step, its hyper-parameters, the lr schedule and DeepSpeed's counters. Under bf16 the fp32 values go to the
    optimizer's fp32 masters and the module gets their bf16 copies. -> the client state."""
    with open(os.path.join(ckpt_dir, "latest_universal")) as f:
        folder = os.path.join(ckpt_dir, f.read().strip())
    optimizer, pairs = _stage0_parameters(engine, folder)
    common = safe_load(os.path.join(folder, MODEL_STATES[0]), map_location="cpu")
    saved = safe_load(os.path.join(folder, "zero", "optimizer_state.pt"), map_location="cpu")
    names = {p: n for n, p in engine.module.named_parameters()}

    def read(name, key, like):
        return safe_load(os.path.join(folder, "zero", name, f"{key}.pt"), map_location="cpu")["param"] \
            .view_as(like).to(like.device, torch.float32).clone()

    for group, was, params in zip(optimizer.param_groups, saved["param_groups"], pairs):
        group.update({k: v for k, v in was.items() if k != "params"})
        for module_param, p in params:
            if not module_param.requires_grad:  # adapters under a config's own optimizer: the SFT weights unsaved
                continue
            name = names[module_param]
            with torch.no_grad():
                p.copy_(read(name, "fp32", p))
                module_param.copy_(p)  # the bf16 copy (the same tensor in fp32)
            step = safe_load(os.path.join(folder, "zero", name, "step.pt"))
            optimizer.state[p] = {"step": torch.as_tensor(step, dtype=torch.float32, device=p.device),
                                  **{m: read(name, m, p) for m in MOMENTS}}
    engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    engine.global_steps, engine.global_samples = common["global_steps"], common["global_samples"]
    engine.skipped_steps = common.get("skipped_steps", 0)
    return common


def _stage0_parameters(engine, folder: str) -> tuple[torch.optim.Optimizer, list]:
    """(torch's AdamW the stage-0 `engine` steps, per param group [(the module's parameter, the tensor AdamW
    updates)]): the same tensor in fp32; under bf16 DeepSpeed's unfused optimizer pairs each bf16 parameter with
    its fp32 master. fp16 (a loss scale) is refused."""
    optimizer = engine.optimizer
    if isinstance(optimizer, torch.optim.Optimizer) and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return optimizer, [[(p, p) for p in group["params"]] for group in optimizer.param_groups]
    if engine.bfloat16_enabled() and hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        return optimizer.optimizer, [list(zip(low, high)) for low, high in zip(optimizer.fp16_groups,
                                                                               optimizer.fp32_groups)]
    raise UserError(f"{folder}: continuing a ZeRO run as stage 0 needs fp32 or bf16 (DeepSpeed's fp16 optimizer "
                    f"keeps a loss scale): resume with a ZeRO --deepspeed configuration")
