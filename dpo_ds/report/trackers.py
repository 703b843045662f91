"""Where train's metric rows go besides OUT/metrics.jsonl: `--report_to tensorboard wandb mlflow trackio` (HF
Trainer's and TRL's flag). Every tracker gets every row under the name `split/metric` (`train/loss`,
`eval/rewards/accuracies`) at the row's optimizer step, as metrics.jsonl has it. Only rank 0 logs.

Each tracker's own settings are read as its library documents them (WANDB_PROJECT, WANDB_MODE=offline,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TRACKIO_PROJECT, TRACKIO_DIR ...). Where a tracker would otherwise
write into the working directory it writes under OUT: W&B files in OUT/wandb, MLflow's default store in
OUT/mlruns. A resumed run continues the same W&B and MLflow run (their ids are kept in OUT/trackers.json) and
the same trackio run (by name); TensorBoard drops its points past the checkpoint as metrics.jsonl does, the
others show the replayed steps twice, with the same values (the trajectory is a function of the step).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import secrets

from dpo_ds.errors import ConfigError, UserError
from dpo_ds.storage.files import atomic_json, read_json

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
REPORT_TO = (*PACKAGES, "all", "none")


def chosen(report_to: list[str]) -> list[str]:
    """The trackers `--report_to` names ("all": every installed one; "none": none), checked on every rank
    before anything starts: a missing package is one line, not a failure on rank 0 after the engine is built."""
    unknown = [n for n in report_to if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report_to {' '.join(unknown)}: unknown (known: {', '.join(REPORT_TO)})")
    if "none" in report_to:
        if len(report_to) > 1:
            raise ConfigError("--report_to none means no tracker; give it alone")
        return []
    if "all" in report_to:
        return [n for n, pkg in PACKAGES.items() if importlib.util.find_spec(pkg)]
    for name in report_to:
        if not importlib.util.find_spec(PACKAGES[name]):
            hint = "tensorboard" if name == "tensorboard" else f"'dpo_ds[{name}]'"
            raise ConfigError(f"--report_to {name}: the {PACKAGES[name]} package is not installed "
                              f"(pip install {hint})")
    return list(dict.fromkeys(report_to))


def flat(metrics: dict, split: str) -> dict:
    return {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, out_dir, run_name, config, resume_step, ids):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def log(self, step, split, metrics):
        for k, v in flat(metrics, split).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out_dir, run_name, config, resume_step, ids):
        import wandb

        ids.setdefault("wandb", os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpo_ds"), name=run_name, id=ids["wandb"],
                              resume="allow", dir=out_dir, config=config)
        # the x axis is the optimizer step; W&B's own _step only counts calls (and never goes back on a resume)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step")

    def log(self, step, split, metrics):
        self.run.log({**flat(metrics, split), "train/global_step": step})

    def close(self):
        self.run.finish()


class MLflow:
    def __init__(self, out_dir, run_name, config, resume_step, ids):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's default is a store in the working directory
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(pathlib.Path(out_dir, "mlruns").absolute().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpo_ds"))
        self.mlflow = mlflow
        if "mlflow" in ids:
            mlflow.start_run(run_id=ids["mlflow"])
        else:
            ids["mlflow"] = mlflow.start_run(run_name=run_name).info.run_id
            mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})

    def log(self, step, split, metrics):
        self.mlflow.log_metrics(flat(metrics, split), step=step)

    def close(self):
        self.mlflow.end_run()


class Trackio:
    def __init__(self, out_dir, run_name, config, resume_step, ids):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dpo_ds"), name=run_name, config=config,
                     resume="allow" if resume_step else "never", embed=False)

    def log(self, step, split, metrics):
        self.trackio.log(flat(metrics, split), step=step)

    def close(self):
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def open_all(names: list[str], out_dir: str, run_name: str, config: dict, resume_step: int) -> list:
    """The trackers `names` (from `chosen`), started or continued; OUT/trackers.json keeps the run ids."""
    path = os.path.join(out_dir, "trackers.json")
    ids = read_json(path) if resume_step and os.path.isfile(path) else {}
    opened = []
    for name in names:
        try:
            opened.append(TRACKERS[name](out_dir, run_name, config, resume_step, ids))
        except Exception as e:  # noqa: BLE001 - a login, a server, a store: the tracker's own message
            raise UserError(f"--report_to {name} did not start ({type(e).__name__}: {str(e).strip()[:300]}); "
                            f"nothing was trained: fix it, or leave {name} out of --report_to") from e
    if ids:
        atomic_json(path, ids)
    return opened
