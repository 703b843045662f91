"""Will it fit? Each phase's memory per rank, term by term, before launch, from the model's config alone (no
weights are loaded), beside the same job in a two-model trainer:

    python -m dpo_ds.plan --model SFT_DIR_OR_CONFIG_JSON --deepspeed ds_configs/zero3.json \\
        --micro_batch_size 2 --max_length 2048 --gpus 8 --gpu_memory 80 [--search] [--json]
    python -m dpo_ds.plan --check RUN_DIR      # a finished train run: predicted against measured

--search adds the lightest DeepSpeed configuration that fits --gpu_memory (stage 0, 2, 3, 3 + optimizer
offload, 3 + parameter offload, in that order) and the largest --micro_batch_size and --max_length that fit
with it, as the command line to run. The terms are dpo_ds/plan/footprint.py's (its docstring says what each
counts); the README's "Will it fit?" says which were checked against measured peaks and how closely.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from dpo_ds.cli import main_guard, parse
from dpo_ds.config import LOGP_CHUNK_SIZE, opt
from dpo_ds.errors import UserError
from dpo_ds.plan import choice
from dpo_ds.plan import footprint as F
from dpo_ds.plan.calibrate import (
    Measured,
    inference_config,
    job_of,
    measured_terms,
    threshold,
)

PHASES = ("precompute", "train", "evaluate")


@dataclass
class PlanConfig:
    model: str = opt(None, "SFT checkpoint directory, or just its config.json (no weights are read)")
    deepspeed: str = opt("auto", "the training DeepSpeed config, or auto: the one train --deepspeed auto would "
                                 "choose for --gpu_memory (default: this machine's device)")
    inference_deepspeed: str = opt(None, "precompute's and evaluate's (ds_configs/zero3_inference.json to shard "
                                         "them; default: a full copy per rank)")
    dtype: str = opt("auto", "precompute's and evaluate's --dtype: auto = bf16 on CUDA, fp32 on the CPU (training's "
                             "is the DeepSpeed config's)", choices=["auto", "bf16", "fp16", "fp32"])
    micro_batch_size: int = opt(2, "training pairs per device per forward")
    batch_size: int = opt(8, "precompute's and evaluate's pairs per forward")
    max_length: int = opt(1024, "tokens per sequence, prompt + response (prepare's --max_length)")
    sequence_parallel_size: int = opt(1, "K: each row split across K ranks (Ulysses)")
    tiled_mlp: bool = opt(False, "DeepSpeed's TiledMLP in training")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward")
    logp_chunk_size: int = opt(LOGP_CHUNK_SIZE, "response tokens per lm_head chunk")
    share_prompt: bool = opt(None, "train's layout (default: as train resolves it); the CPU's probe runs it")
    packing: bool = opt(None, "train's layout (default: as train resolves it); the CPU's probe runs it")
    use_peft: bool = opt(False, "train LoRA adapters (train's --use_peft): gradients and optimizer state for "
                                "theirs alone")
    lora_r: int = opt(16, "LoRA rank (train's --lora_r)")
    lora_target_modules: list = opt(None, "train's --lora_target_modules (default: the decoder layers' projections)")
    lora_modules_to_save: list = opt(None, "train's --lora_modules_to_save")
    gpus: int = opt(1, "GPUs (ranks) per node")
    nodes: int = opt(1, "nodes")
    gpu_memory: float = opt(None, "GiB per device: the budget the verdict and --search use")
    device: str = opt("cuda", "cuda: device memory (as max_memory_allocated counts it); cpu: the process's "
                              "resident memory, runtime included (what a memory limit sees)", choices=["cuda", "cpu"])
    search: bool = opt(False, "the lightest configuration and the largest batch and length that fit")
    json: bool = opt(False, "print one JSON object (predicted_peak_bytes per phase) instead of tables")
    check_run: str = opt(None, "a train run directory (--check RUN_DIR): its measured peak beside the prediction "
                               "for its own settings, read from RUN_DIR/config.json")

    def check(self):
        if not (self.model or self.check_run):
            raise UserError("give --model (a checkpoint directory or its config.json), or --check RUN_DIR")
        for name in ("micro_batch_size", "batch_size", "max_length", "sequence_parallel_size", "gpus", "nodes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if (self.gpus * self.nodes) % self.sequence_parallel_size:
            raise UserError(f"--sequence_parallel_size {self.sequence_parallel_size} must divide the "
                            f"{self.gpus * self.nodes} ranks")


def predict(cfg: PlanConfig, shape: F.Shape, m: Measured, train_ds: dict | None = None) -> dict:
    train_ds = F.read_ds(cfg.deepspeed) if train_ds is None else train_ds
    infer_ds = inference_config(cfg)
    phases = {name: F.phase(shape, job_of(cfg, train_ds if name == "train" else infer_ds, name == "train",
                                          *((m.runtime, m.factor - 1) if name == "train" else
                                            (m.infer_runtime, m.infer_factor - 1))), name)
              for name in PHASES}
    two = F.two_model(shape, job_of(cfg, train_ds, True, m.runtime, m.factor - 1))
    out = {"model": cfg.model, "parameters": shape.params, "ranks": cfg.gpus * cfg.nodes,
           "phases": {n: {"terms": t, "predicted_peak_bytes": t["total"]} for n, t in phases.items()},
           "two_model_train": {"terms": two, "predicted_peak_bytes": two["total"]},
           "saving_bytes": two["total"] - phases["train"]["total"],
           "checkpoint": F.checkpoint(shape, job_of(cfg, train_ds, True, 0))}
    if cfg.gpu_memory:
        budget = cfg.gpu_memory * F.GiB
        out["budget_bytes"] = int(budget)
        out["fits"] = {n: p["predicted_peak_bytes"] <= budget for n, p in out["phases"].items()}
    return out


def budget_of(cfg: PlanConfig, auto: bool = False) -> int:
    """--gpu_memory (for the auto choice, the share of it train plans with), or this machine's device as train's
    --deepspeed auto sees it (plan.choice)."""
    if cfg.gpu_memory:
        return int(cfg.gpu_memory * F.GiB * (choice.BUDGET_FRACTION if auto else 1.0))
    device, budget = choice.device_budget(per_host=cfg.gpus)
    if device != cfg.device:
        raise UserError(f"--gpu_memory: give the GiB per device of the planned --device {cfg.device} (this machine "
                        f"has none to read it from); --deepspeed auto and --search choose by it")
    return budget


def lightest(cfg: PlanConfig, shape_of, m: Measured, budget: int) -> tuple[str, dict] | None:
    """(name, DeepSpeed config) of the first of plan.choice.candidates whose training fits `budget`, chosen as
    train --deepspeed auto chooses (the precision of --deepspeed's file when one is named)."""
    auto = cfg.deepspeed == choice.AUTO
    base = choice.base_config(torch.bfloat16 if cfg.device == "cuda" else torch.float32) if auto else \
        F.read_ds(cfg.deepspeed)
    job = lambda ds: job_of(cfg, ds, True, m.runtime, m.factor - 1)  # noqa: E731
    name, ds, _ = choice.first_fit(shape_of, job, budget, base, cfg.device, cfg.sequence_parallel_size)
    return (name, ds) if name else None


def search(cfg: PlanConfig, shape: F.Shape, m: Measured) -> dict:
    """The lightest configuration whose training fits, then the largest micro-batch and length with it."""
    budget = budget_of(cfg)
    found = lightest(cfg, lambda _: shape, m, budget)
    if not found:
        return {"fits": False}
    name, ds = found
    largest = {}
    for flag, start in (("micro_batch_size", cfg.micro_batch_size), ("max_length", cfg.max_length)):
        value = start
        while value < 2 ** 20 and F.phase(shape, job_of(dataclasses.replace(cfg, **{flag: value * 2}), ds, True,
                                                        m.runtime, m.factor - 1), "train")["total"] <= budget:
            value *= 2
        largest[flag] = value
    command = (f"deepspeed --num_gpus {cfg.gpus} --num_nodes {cfg.nodes} --no_python dpo-ds train --model "
               f"{cfg.model} --deepspeed <{name}: write the JSON below> --micro_batch_size {cfg.micro_batch_size}")
    return {"fits": True, "configuration": name, "deepspeed": ds, "largest": largest, "command": command}


def measured_run(asked: PlanConfig, run_dir: str) -> tuple[PlanConfig, dict, dict]:
    """`asked` with a train run's own settings, its DeepSpeed config, and what it measured: the busiest
    rank's peak over the run (metrics.jsonl's train lines)."""
    from dpo_ds.data.prepared import load_split
    from dpo_ds.model.batch import longest_row
    from dpo_ds.report.log import read_metrics

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--check {run_dir}: no config.json, so not a dpo_ds train run directory")
    with open(path) as f:
        run = json.load(f)
    t = run["train"]
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "memory/peak_rss_bytes" in r]
    if not rows:
        raise UserError(f"--check {run_dir}: its metrics.jsonl has no measured memory (a run of an older dpo_ds, "
                        f"or one that logged no train line yet)")
    cuda = "memory/peak_allocated_bytes" in rows[-1]
    name = "memory/peak_allocated_bytes" if cuda else "memory/peak_rss_bytes"
    longest = longest_row(load_split(t["data"], "train"))
    cfg = dataclasses.replace(asked, model=t["model"], micro_batch_size=t["micro_batch_size"], max_length=longest,
                     sequence_parallel_size=t["sequence_parallel_size"], tiled_mlp=t.get("tiled_mlp", False),
                     gradient_checkpointing=t["gradient_checkpointing"], logp_chunk_size=t["logp_chunk_size"],
                     share_prompt=t.get("share_prompt"), packing=t.get("packing"),
                     gpus=run["world_size"], device="cuda" if cuda else "cpu",
                     **{k: t[k] for k in ("use_peft", "lora_r", "lora_target_modules", "lora_modules_to_save")
                        if k in t})
    return cfg, run["deepspeed"], {"train": max(r[name] for r in rows), "figure": name}


def gib(n: float) -> str:
    return f"{n / F.GiB:8.2f}"


def show(plan: dict) -> str:
    lines = [f"{plan['model']}: {plan['parameters'] / 1e9:.3f} B parameters, {plan['ranks']} rank(s); GiB per rank"]
    if "deepspeed" in plan:
        lines.append(f"  {plan['deepspeed']['choice']}")
    for name, p in [*plan["phases"].items(), ("train, two-model trainer", plan["two_model_train"])]:
        lines.append(f"  {name}")
        lines += [f"    {term:<36}{gib(v)}" for term, v in p["terms"].items() if term != "total" and v]
        verdict = ""
        if "budget_bytes" in plan:
            verdict = "  fits" if p["predicted_peak_bytes"] <= plan["budget_bytes"] else "  DOES NOT FIT"
            verdict += f" in {plan['budget_bytes'] / F.GiB:.1f} GiB"
        lines.append(f"    {'predicted peak':<36}{gib(p['predicted_peak_bytes'])}{verdict}")
    lines.append(f"  the cache saves {plan['saving_bytes'] / F.GiB:.2f} GiB per rank in training")
    ckpt = plan["checkpoint"]
    size = lambda n: f"{n / F.GiB:.2f} GiB" if n >= F.GiB else f"{n / 2 ** 20:.1f} MiB"  # noqa: E731
    lines.append(f"  a checkpoint writes {size(ckpt['bytes'])}, {size(ckpt['busiest_rank_bytes'])} from the busiest "
                 f"rank ({ckpt['busiest_rank_bytes'] / 1e9:.1f} s at 1 GB/s): a stop signal's lead time (Slurm's "
                 f"--signal=...@T) needs a step and this save")
    if "measured" in plan:
        m = plan["measured"]
        lines.append(f"  measured train peak ({m['figure']}, busiest rank) {gib(m['train'])}; predicted "
                     f"{gib(plan['phases']['train']['predicted_peak_bytes'])}; error {100 * m['error']:+.1f}%")
    if "search" in plan:
        s = plan["search"]
        lines.append("  search: nothing fits" if not s["fits"] else
                     f"  search: lightest that fits: {s['configuration']}; largest --micro_batch_size "
                     f"{s['largest']['micro_batch_size']}, --max_length {s['largest']['max_length']}\n    "
                     f"{s['command']}\n    {json.dumps(s['deepspeed'])}")
    return "\n".join(lines)


def run(cfg: PlanConfig) -> dict:
    train_ds, measured = None, None
    if cfg.check_run:
        cfg, train_ds, measured = measured_run(cfg, cfg.check_run)
    chosen = None
    if train_ds is None and cfg.deepspeed == choice.AUTO:  # as train chooses: the model's terms, no runtime
        found = lightest(cfg, lambda limit: F.Shape.of(cfg.model, limit), Measured(), budget_of(cfg, auto=True))
        if not found:
            raise UserError(f"--deepspeed auto: no configuration fits {budget_of(cfg, auto=True) / F.GiB:.1f} GiB "
                            f"per device (--search says what would)")
        chosen, train_ds = f"--deepspeed auto: {found[0]}", found[1]
    elif train_ds is None:
        asked = F.read_ds(cfg.deepspeed)
        train_ds = choice.runs_as(asked, cfg.gpus * cfg.nodes)
        if train_ds is not asked:
            chosen = f"--deepspeed {cfg.deepspeed}: runs as stage 0 (ZeRO-3 partitions nothing on one rank)"
    ds = train_ds
    shape = F.Shape.of(cfg.model, threshold(ds))
    m = measured_terms(cfg, ds, inference=not measured)  # --check compares training only
    plan = predict(cfg, shape, m, ds)
    if chosen:
        plan["deepspeed"] = {"choice": chosen, "config": ds}
    if measured:
        predicted = plan["phases"]["train"]["predicted_peak_bytes"]
        plan["measured"] = {**measured, "error": predicted / measured["train"] - 1}
    if cfg.search:
        plan["search"] = search(cfg, shape, m)
    print(json.dumps(plan) if cfg.json else show(plan))  # --json: one line, the last
    return plan


def main(argv=None):
    main_guard(lambda: run(parse(PlanConfig, argv, prog="python -m dpo_ds.plan", doc=__doc__)))


if __name__ == "__main__":
    main()
