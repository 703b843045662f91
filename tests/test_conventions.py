"""The conventions users bring from TRL and the HF Trainer: their flag names (the dpo_ds names stay aliases),
RPO's rpo_alpha, warmup_ratio, num_train_epochs, TRL's loss names, --report_to, one `dpo-ds` command.
    scripts/test.sh tests/test_conventions.py
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, child_env, run_module
from test_train import train_args

from dpo_ds import cli
from dpo_ds import config as C
from dpo_ds.errors import ConfigError
from dpo_ds.report.log import MetricsLog, read_metrics

# scripts/_venv.sh installs MLflow beside the venv: DeepSpeed imports it at every start when it can
MLFLOW_BESIDE = os.path.join(sys.prefix, "extras", "mlflow")
REQUIRED = ["--model", "m", "--data", "d", "--ref_cache", "r", "--output_dir", "o", "--deepspeed", "z.json"]


def test_trl_flag_names_on_the_command_line():
    cfg = cli.parse(C.TrainConfig, REQUIRED + [
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3", "--lr_scheduler_type", "cosine",
        "--logging_steps", "5", "--eval_steps", "20", "--save_steps", "40", "--max_steps", "100",
        "--warmup_ratio", "0.1", "--rpo_alpha", "0.5", "--learning_rate", "1e-6", "--beta", "0.2"])
    assert (cfg.micro_batch_size, cfg.grad_accum, cfg.lr_schedule) == (4, 3, "cosine")
    assert (cfg.log_every, cfg.eval_every, cfg.save_every, cfg.warmup_steps) == (5, 20, 40, 10)
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.weights() == [1.0, 0.5], "RPO = DPO + α · NLL"
    old = cli.parse(C.TrainConfig, REQUIRED + ["--micro_batch_size", "4", "--grad_accum", "3", "--log_every", "5"])
    assert (old.micro_batch_size, old.grad_accum, old.log_every) == (4, 3, 5), "the dpo_ds names still work"
    # a saved run (OUT/config.json) read back is the same run: sft is not appended twice
    again = C.TrainConfig(**C.to_dict(cfg))
    assert again.loss_type == cfg.loss_type and again.weights() == cfg.weights()
    help_text = cli.build_parser(C.TrainConfig).format_help()
    assert "--per_device_train_batch_size MICRO_BATCH_SIZE, --micro_batch_size" in help_text


def test_trl_style_job_file(tmp_path):
    job = tmp_path / "job.json"
    json.dump({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "warmup_ratio": 0.05,
               "max_steps": 200, "lr_scheduler_type": "constant", "beta": 0.05}, open(job, "w"))
    cfg = cli.parse(C.TrainConfig, REQUIRED + ["--config", str(job), "--gradient_accumulation_steps", "4"])
    assert (cfg.micro_batch_size, cfg.grad_accum, cfg.warmup_steps, cfg.lr_schedule) == (8, 4, 10, "constant")
    json.dump({"per_device_train_batch_size": 8, "micro_batch_size": 4}, open(job, "w"))
    with pytest.raises(ConfigError, match="per_device_train_batch_size and micro_batch_size name one setting"):
        cli.parse(C.TrainConfig, REQUIRED + ["--config", str(job)])
    with pytest.raises(ConfigError, match="--warmup_ratio 2.0 must be in"):
        cli.parse(C.TrainConfig, REQUIRED + ["--warmup_ratio", "2"])


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
    # the verifier's first documented name keeps working, and says the new one
    p = subprocess.run([sys.executable, "-m", "dpo_ds.ref_cache", "verify", cache, "--data", prepared],
                       capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0 and ": OK" in p.stdout and "is now `dpo-ds verify`" in p.stderr, p.stderr


def read_wandb(run_dir) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf records; W&B's own
    reader lives in its Go core)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data, pos, block, records, part = open(path, "rb").read(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_report_to_every_tracker_offline(tiny, prepared, cache, tmp_path):
    """One run logs to TensorBoard, W&B (offline), MLflow (its file store under OUT) and trackio (a local
    store): each holds every metrics.jsonl row as split/name at its step, with the same value. The run's length
    comes from --num_train_epochs (216 pairs / global batch 4 = 54 steps per epoch)."""
    if os.path.isdir(MLFLOW_BESIDE) and MLFLOW_BESIDE not in sys.path:
        sys.path.append(MLFLOW_BESIDE)
    for name in ("wandb", "mlflow", "trackio"):
        pytest.importorskip(name)
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "TRACKIO_PROJECT": "p", "MLFLOW_TRACKING_URI": "", "PYTHONPATH": os.pathsep.join([ROOT, MLFLOW_BESIDE])}
    run_module("dpo_ds.train", *train_args(tiny, prepared, cache, out, max_steps=None, num_train_epochs=0.1,
                                           eval_every=3, report_to=["tensorboard", "wandb", "mlflow", "trackio"],
                                           run_name="tracked"), env=env)
    rows = read_metrics(out / "metrics.jsonl")
    expected = {(r["step"], f"{r['split']}/{k}"): v for r in rows for k, v in r.items()
                if k not in ("step", "split") and isinstance(v, (int, float))}
    assert max(r["step"] for r in rows) == 6 and ("eval/loss" in {k for _, k in expected})

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(out / "tensorboard")).Reload()
    got = {(e.step, tag): e.value for tag in tb.Tags()["scalars"] for e in tb.Scalars(tag)}
    assert got.keys() == expected.keys() and all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())

    got = {(r["train/global_step"], k): v for r in read_wandb(out) for k, v in r.items()
           if not k.startswith("_") and k != "train/global_step"}
    assert got == expected

    from mlflow.tracking import MlflowClient
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient((out / "mlruns").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "tracked" and run.data.params["beta"] == "0.1"
    got = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    assert got == expected

    import sqlite3
    db = sqlite3.connect(tmp_path / "trackio" / "p.db")
    got = {(step, k): v for step, raw in db.execute("select step, metrics from metrics where run_name = 'tracked'")
           for k, v in json.loads(raw).items() if not k.startswith("_")}
    assert got == expected
    assert json.load(open(out / "trackers.json")).keys() == {"wandb", "mlflow"}, "kept for a resume"


def test_report_to_choices(monkeypatch):
    from dpo_ds.report import trackers

    assert cli.parse(C.TrainConfig, REQUIRED).report_to == ["tensorboard"], "dpo_ds's default, as before"
    assert trackers.chosen(["none"]) == []
    installed = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: name == "tensorboard" and installed(name))
    with pytest.raises(ConfigError, match=r"--report_to wandb: the wandb package is not installed "
                                          r"\(pip install 'dpo_ds\[wandb\]'\)"):
        cli.parse(C.TrainConfig, REQUIRED + ["--report_to", "tensorboard", "wandb"])
    with pytest.raises(ConfigError, match="--report_to comet: unknown"):
        trackers.chosen(["comet"])
    assert trackers.chosen(["all"]) == ["tensorboard"]


def test_epochs_and_loss_names_as_trl_gives_them():
    cfg = cli.parse(C.TrainConfig, REQUIRED + ["--num_train_epochs", "2.5", "--warmup_ratio", "0.1"])
    assert cfg.max_steps is None
    cfg.set_epochs(54)
    assert (cfg.max_steps, cfg.warmup_steps) == (135, 14)
    assert cli.parse(C.TrainConfig, REQUIRED).max_steps == 1000
    with pytest.raises(ConfigError, match="--max_steps and --num_train_epochs give the same setting two ways"):
        cli.parse(C.TrainConfig, REQUIRED + ["--num_train_epochs", "1", "--max_steps", "10"])
    with pytest.raises(ConfigError, match="--warmup_steps and --warmup_ratio"):
        cli.parse(C.TrainConfig, REQUIRED + ["--warmup_ratio", "0.1", "--warmup_steps", "10"])
    assert cli.parse(C.TrainConfig, REQUIRED + ["--loss_type", "aot_pair"]).loss_type == ["aot_unpaired"]


def test_trl_names_for_every_shared_concept():
    from dpo_ds.data.sources import NAMED, resolve_source

    cfg = cli.parse(C.TrainConfig, ["--model_name_or_path", "m", "--data", "d", "--ref_cache", "r", "--output_dir", "o",
                                  "--deepspeed", "z.json", "--f_divergence_type", "alpha_divergence",
                                  "--f_alpha_divergence_coef", "0.3", "--no-padding_free", "--no-disable_dropout"])
    assert (cfg.model, cfg.f_divergence, cfg.f_alpha, cfg.packing, cfg.disable_dropout) == \
        ("m", "alpha_divergence", 0.3, False, False)
    prep = cli.parse(C.PrepareConfig, ["--dataset_name", "HuggingFaceH4/ultrafeedback_binarized", "--tokenizer", "t",
                                     "--output_dir", "o", "--dataset_num_proc", "2"])
    assert (prep.dataset, prep.num_proc) == ("HuggingFaceH4/ultrafeedback_binarized", 2)
    assert resolve_source(prep.dataset) is NAMED["ultrafeedback"], "the hub id names the same source"
    assert resolve_source("Anthropic/hh-rlhf") is NAMED["hh_rlhf"]
    assert cli.parse(C.TrainConfig, REQUIRED).disable_dropout is True, "TRL's default"


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_disable_dropout_makes_training_forward_the_cached_one(kind):
    """With dropout in the checkpoint (attention probabilities as a float, nn.Dropout layers), the policy's
    training-mode forward equals its eval-mode one (the mode the cache was computed in) once it is disabled;
    the config, and so the exported checkpoint, keeps its values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_ds.pretrained import disable_dropout

    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if kind == "qwen3":
        config = AutoConfig.for_model("qwen3", intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                      attention_dropout=0.3, **small)
    else:
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, resid_pdrop=0.3,
                                      embd_pdrop=0.3, attn_pdrop=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ids = torch.randint(0, 64, (2, 12))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        model.train()
        assert not torch.equal(model(ids).logits, want), "the checkpoint has dropout"
        disable_dropout(model)
        assert torch.equal(model(ids).logits, want)
    assert (model.config.attention_dropout if kind == "qwen3" else model.config.attn_pdrop) == 0.3


def test_flags_replace_the_job_files_other_way_and_trl_shapes(tmp_path):
    job = tmp_path / "job.json"
    json.dump({"num_train_epochs": 2, "warmup_steps": 5, "report_to": "none", "max_steps": -1}, open(job, "w"))
    cfg = cli.parse(C.TrainConfig, REQUIRED + ["--config", str(job)])
    assert (cfg.max_steps, cfg.num_train_epochs, cfg.report_to) == (None, 2.0, ["none"]), "TRL's -1: not given"
    cfg = cli.parse(C.TrainConfig, REQUIRED + ["--config", str(job), "--max_steps", "7", "--warmup_ratio", "0.5"])
    assert (cfg.max_steps, cfg.num_train_epochs, cfg.warmup_steps) == (7, None, 4), "the flag's way wins"


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, capsys):
    class Broken:
        def log(self, *a):
            raise ConnectionError("server gone")

        def close(self):
            pass

    log = MetricsLog(str(tmp_path), trackers=[Broken()])
    log.write(1, "train", {"loss": 0.5})
    log.write(2, "train", {"loss": 0.4})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert capsys.readouterr().err.count("warning: --report_to broken failed to log (ConnectionError") == 1


def test_a_run_saved_before_disable_dropout_resumes_with_its_dropout(tmp_path):
    from dpo_ds.lifecycle.policy import continue_as_started
    from dpo_ds.lifecycle.record import saved_record

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-2")
    (tmp_path / "config.json").write_text(json.dumps({"train": {"beta": 0.1}}))
    cfg = cli.parse(C.TrainConfig, REQUIRED[:6] + ["--output_dir", str(tmp_path), "--deepspeed", "z.json"])
    continue_as_started(cfg, saved_record(cfg))
    assert cfg.disable_dropout is False
    (tmp_path / "config.json").write_text(json.dumps({"train": {"disable_dropout": True}}))
    cfg = cli.parse(C.TrainConfig, REQUIRED[:6] + ["--output_dir", str(tmp_path), "--deepspeed", "z.json"])
    continue_as_started(cfg, saved_record(cfg))
    assert cfg.disable_dropout is True


def test_the_model_cards_command_is_one_a_person_can_run_again():
    """dpo_ds.cli leaves the subcommand among sys.argv's arguments and the launcher adds --local_rank: the card
    shows neither twice nor the launcher's flag, and puts the launcher back where there were several ranks."""
    from dpo_ds.report.card import command

    argv = ["dpo-ds train", "--local_rank=0", "train", "--deepspeed", "x.json", "--beta", "0.2"]
    assert command(argv, 2, 2) == "deepspeed --num_gpus 2 --no_python dpo-ds train --deepspeed x.json --beta 0.2"
    assert command(["dpo-ds train", "train", "--model", "a b"], 1, 1) == "dpo-ds train --model 'a b'"
    argv = [os.path.join("x", "dpo_ds", "train.py"), "--local_rank", "1", "--max_steps", "5"]
    assert command(argv, 4, 2) == "deepspeed --num_gpus 2 --num_nodes 2 --module dpo_ds.train --max_steps 5"
    assert command(argv, 1, 1) == "python -m dpo_ds.train --max_steps 5"
