"""The conventions users bring from TRL and the HF Trainer: their flag names (the dpo_ds names stay aliases),
RPO's rpo_alpha, warmup_ratio, one `dpo-ds` command.
    scripts/test.sh tests/test_conventions.py
"""
import json
import shutil
import subprocess
import sys

import pytest

from dpo_ds import config as C
from dpo_ds.errors import ConfigError
from conftest import ROOT, child_env

REQUIRED = ["--model", "m", "--data", "d", "--ref_cache", "r", "--output_dir", "o", "--deepspeed", "z.json"]


def test_trl_flag_names_on_the_command_line():
    cfg = C.parse(C.TrainConfig, REQUIRED + [
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3", "--lr_scheduler_type", "cosine",
        "--logging_steps", "5", "--eval_steps", "20", "--save_steps", "40", "--max_steps", "100",
        "--warmup_ratio", "0.1", "--rpo_alpha", "0.5", "--learning_rate", "1e-6", "--beta", "0.2"])
    assert (cfg.micro_batch_size, cfg.grad_accum, cfg.lr_schedule) == (4, 3, "cosine")
    assert (cfg.log_every, cfg.eval_every, cfg.save_every, cfg.warmup_steps) == (5, 20, 40, 10)
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.weights() == [1.0, 0.5], "RPO = DPO + α · NLL"
    old = C.parse(C.TrainConfig, REQUIRED + ["--micro_batch_size", "4", "--grad_accum", "3", "--log_every", "5"])
    assert (old.micro_batch_size, old.grad_accum, old.log_every) == (4, 3, 5), "the dpo_ds names still work"
    # a saved run (OUT/config.json) read back is the same run: sft is not appended twice
    again = C.TrainConfig(**C.to_dict(cfg))
    assert again.loss_type == cfg.loss_type and again.weights() == cfg.weights()
    help_text = C.build_parser(C.TrainConfig).format_help()
    assert "--per_device_train_batch_size MICRO_BATCH_SIZE, --micro_batch_size" in help_text


def test_trl_style_job_file(tmp_path):
    job = tmp_path / "job.json"
    json.dump({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "warmup_ratio": 0.05,
               "max_steps": 200, "lr_scheduler_type": "constant", "beta": 0.05}, open(job, "w"))
    cfg = C.parse(C.TrainConfig, REQUIRED + ["--config", str(job), "--gradient_accumulation_steps", "4"])
    assert (cfg.micro_batch_size, cfg.grad_accum, cfg.warmup_steps, cfg.lr_schedule) == (8, 4, 10, "constant")
    json.dump({"per_device_train_batch_size": 8, "micro_batch_size": 4}, open(job, "w"))
    with pytest.raises(ConfigError, match="per_device_train_batch_size and micro_batch_size name one setting"):
        C.parse(C.TrainConfig, REQUIRED + ["--config", str(job)])
    with pytest.raises(ConfigError, match="--warmup_ratio 2.0 must be in"):
        C.parse(C.TrainConfig, REQUIRED + ["--warmup_ratio", "2"])


def dpo_ds_command():
    """The installed console script, or (a checkout not installed) the same entry point through python."""
    script = shutil.which("dpo-ds", path=child_env()["PATH"])
    return [script] if script else [sys.executable, "-m", "dpo_ds.cli"]


def test_one_command_for_every_phase(prepared, cache):
    run = lambda *a: subprocess.run(dpo_ds_command() + list(a), capture_output=True, text=True,  # noqa: E731
                                    env=child_env(), cwd=ROOT, timeout=300)
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("dpo-ds ")
    p = run("verify", cache, "--data", prepared)
    assert p.returncode == 0 and "reference cache" in p.stdout and ": OK" in p.stdout, p.stderr
    p = run("train", "--help")
    assert p.returncode == 0 and "--per_device_train_batch_size" in p.stdout
    p = run("--local_rank=0", "evaluate", "--help")  # as the deepspeed launcher calls a script
    assert p.returncode == 0 and "--ref_cache" in p.stdout
    p = run("trian")
    assert p.returncode == 2 and "error: unknown command 'trian' (commands: prepare, precompute" in p.stderr
