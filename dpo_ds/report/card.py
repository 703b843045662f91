"""OUT/final/README.md: a model card in the Hub's format, written with the export (rank 0).

YAML front matter (base model, library, tags, datasets when the data came from a named hub dataset), then what
was trained, on what, with which settings, the held-out metrics before (step 0) and after, the reference
cache's fingerprint, and the command that produced it.
"""
from __future__ import annotations

import json
import os
import shlex
import sys

from dpo_ds import dist
from dpo_ds.data.prepared import read_report
from dpo_ds.data.sources import resolve_named
from dpo_ds.report.log import read_metrics

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "logps/win_rate", "logps/chosen", "logps/rejected")


def base_model(model_dir: str) -> str:
    """The hub id the SFT checkpoint was saved from when its config names one, else the directory's name."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            name = json.load(f).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    return name if name.count("/") == 1 and not os.path.isabs(name) else os.path.basename(os.path.abspath(model_dir))


def render(cfg, run: dict) -> str:
    """`cfg` a TrainConfig, `run` what OUT/config.json records (resume.saved_run)."""
    report = read_report(cfg.data)
    source = resolve_named(report.get("source"))
    evals = [r for r in read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl")) if r["split"] == "eval"]
    before = next((r for r in evals if r["step"] == 0), None)
    after = next((r for r in reversed(evals) if r["step"] == cfg.max_steps), None)
    losses = " + ".join(f"{w:g}·{t}" for t, w in zip(cfg.loss_type, cfg.weights()))
    datasets = ["datasets:", f"  - {source.hub_id}"] if source else []
    library, adapter = ("peft", [f"| adapter | LoRA r {cfg.lora_r}, α {cfg.lora_alpha}, dropout {cfg.lora_dropout} on "
                                 f"{' '.join(cfg.lora_target_modules or ['the decoder layers’ projections'])}; "
                                 f"load with `PeftModel.from_pretrained`"
                                 f"{', merged model in merged/' if cfg.merge_adapter else ''} |"]) \
        if cfg.use_peft else ("transformers", [])
    front = ["---", f"base_model: {base_model(cfg.model)}", f"library_name: {library}",
             f"tags: [dpo, dpo_ds, deepspeed{', lora' if cfg.use_peft else ''}]", *datasets, "---"]
    lines = front + [
        "", f"# {os.path.basename(os.path.abspath(cfg.output_dir))}", "",
        f"`{base_model(cfg.model)}` trained with Direct Preference Optimization by dpo_ds, against a "
        f"precomputed reference cache (one model in memory).", "",
        "## Training", "",
        "| setting | value |", "|---|---|",
        f"| loss | {losses} (β {cfg.beta}) |",
        f"| steps | {cfg.max_steps}, warm-up {cfg.warmup_steps}, {cfg.lr_schedule} decay, "
        f"peak lr {cfg.learning_rate:g} |",
        f"| global batch | {cfg.micro_batch_size} per device × {cfg.grad_accum} accumulation × "
        f"{run['world_size'] // cfg.sequence_parallel_size} data-parallel ranks |",
        f"| DeepSpeed | ZeRO stage {run['deepspeed'].get('zero_optimization', {}).get('stage', 0)}, "
        f"{run['world_size']} rank(s), sequence parallel {cfg.sequence_parallel_size} |",
        f"| data | {report.get('source')}: {report['counts'].get('train', 0)} train / "
        f"{report['counts'].get('eval', 0)} held-out pairs, max length {report['settings']['max_length']} |",
        f"| reference cache | sha256 of the SFT weights {run['reference']['model']['weights'][:16]}…, of the "
        f"prepared data {run['reference']['data'][:16]}…; {run['reference']['dtype']} log-probs |", *adapter, "",
    ]
    if after:  # the SFT model's column when step 0 was evaluated (--eval_every > 0)
        cols = [("before (SFT)", before)] * bool(before) + [(f"after {cfg.max_steps} steps", after)]
        lines += ["## Held-out metrics", "", "| metric | " + " | ".join(c for c, _ in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{r[k]:.4f}" for _, r in cols) + " |" for k in SHOWN if k in after]
        lines += [""]
    lines += ["## Reproduce", "", "The command (rank 0's) that trained it:", "", "```", command(), "```", ""]
    return "\n".join(lines)


def command(argv: list | None = None, world: int | None = None, per_host: int | None = None) -> str:
    """The command line that ran this process, as a person would type it again: the dpo-ds form (dpo_ds.cli sets
    sys.argv[0] to `dpo-ds SUB` and leaves SUB among the arguments) or `python -m dpo_ds.train`, without the
    launcher's --local_rank, under `deepspeed` with the same ranks when there were several."""
    argv = list(sys.argv if argv is None else argv)
    world = dist.world_size() if world is None else world
    per_host = dist.local_world_size() if per_host is None else per_host
    head, rest = argv[0].split(), argv[1:]
    if head[0] == "dpo-ds" and len(head) == 2:
        if head[1] in rest:
            rest.remove(head[1])
        head = ["dpo-ds", head[1]]
    elif argv[0].endswith(os.path.join("dpo_ds", "train.py")):  # python -m dpo_ds.train / deepspeed --module
        head = ["python", "-m", "dpo_ds.train"]
    args = [a for i, a in enumerate(rest)
            if not (a.startswith("--local_rank") or (i and rest[i - 1] == "--local_rank"))]
    if world > 1:
        nodes = max(1, world // per_host)
        launcher = ["deepspeed", "--num_gpus", str(per_host), *(["--num_nodes", str(nodes)] if nodes > 1 else [])]
        if head[0] == "dpo-ds":
            head = [*launcher, "--no_python", *head]
        else:
            head = [*launcher, "--module", *head[2:]] if head[:2] == ["python", "-m"] else [*launcher, *head]
    return shlex.join([*head, *args])
