"""Every setting of every phase, defined once as a dataclass field (default + help).

The command line and the JSON job file (`--config job.json`), parsed by dpo_ds.cli, and the saved
`OUT/config.json` are all derived from these fields: defaults < job file < flags. No torch import here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from dpo_ds.config.adapter import AdapterConfig
from dpo_ds.config.fields import opt, positive
from dpo_ds.config.loss import (  # noqa: F401  (the loss-name table, re-exported)
                                EXO_EPSILON,
                                F_DIVERGED,
                                LOSS_ALIASES,
                                LOSS_TYPES,
                                LOSSES,
                                SMOOTHED,
                                LossConfig,
)
from dpo_ds.errors import ConfigError


@dataclass
class PrepareConfig:
    dataset: str = opt(None, "ultrafeedback | hh_rlhf | orca_dpo | a local .jsonl/.json/.parquet file "
                             "of {prompt, chosen, rejected}", required=True)
    output_dir: str = opt(None, "where train/, eval/ and prepare_report.json go", required=True)
    tokenizer: str = opt(None, "tokenizer path or name (normally the SFT model directory)", required=True)
    data_files: list = opt(None, "local copies of a named dataset in its hub format; SPLIT=PATH names the "
                                 "split, otherwise it is read from the file name (test* -> test split)")
    max_length: int = opt(1024, "prompt + response tokens, at most")
    max_prompt_length: int = opt(None, "prompt tokens at most; longer prompts keep their end "
                                       "(default: half of --max_length)")
    eval_fraction: float = opt(0.05, "held-out fraction when the dataset has no test split of its own")
    seed: int = opt(42, "seed of the train/eval split")
    num_proc: int = opt(1, "tokenizer processes")
    on_bad_row: str = opt("error", "stop at the first bad row, or skip and list it in the report",
                          choices=["error", "skip"])
    trust_remote_code: bool = opt(False, "allow code shipped with the tokenizer to run")

    def __post_init__(self):
        if self.max_prompt_length is None and isinstance(self.max_length, int):
            self.max_prompt_length = self.max_length // 2

    def check(self):
        positive(self, "max_length", "max_prompt_length", "num_proc")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max_prompt_length {self.max_prompt_length} must be below --max_length "
                              f"{self.max_length}, or no response token fits")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction {self.eval_fraction} must be in [0, 1)")


LOGP_CHUNK_SIZE = 256  # response tokens per lm_head chunk, the default of every phase and of dpo_ds.model.logps


@dataclass
class ModelConfig:
    model: str = opt(None, "SFT checkpoint directory (HF format, safetensors)", required=True, resume=True)
    data: str = opt(None, "prepared data directory (output of dpo_ds.prepare)", required=True, resume=True)
    attn_implementation: str = opt("auto", "auto picks flash_attention_2 when flash-attn and CUDA are "
                                           "present, sdpa otherwise", choices=["auto", "flash_attention_2",
                                                                               "sdpa", "eager"])
    logp_chunk_size: int = opt(LOGP_CHUNK_SIZE, "response tokens per lm_head chunk in the log-prob computation: peak "
                                    "memory is a few [chunk, vocab] fp32 tensors (256 x 151,936 x 4 B = 156 MB)")
    share_prompt: bool = opt(None, "score chosen and rejected in one segment [prompt | chosen | rejected], so the "
                                   "prompt is computed once per pair (default: on where it is exact: sdpa or "
                                   "eager attention and a model type listed in dpo_ds/model/layout.py)")
    packing: bool = opt(None, "several pairs per row with no padding between them (default: on where it is "
                              "exact: as --share_prompt, and flash-attn on Llama/Qwen through position_ids)")
    sequence_parallel_size: int = opt(1, "K: split every row across K ranks (DeepSpeed Ulysses) for sequences one "
                                         "device cannot hold; K divides the ranks, which form world / K "
                                         "data-parallel groups (README: long context)", resume=True)
    trust_remote_code: bool = opt(False, "allow code shipped with the model to run")
    dist_timeout_minutes: float = opt(60.0, "how long a rank waits for the others to join, and in any "
                                            "collective, before it stops with an error (a node whose processes "
                                            "die is noticed within seconds; a hung or never-started one after "
                                            "this). Raise it when ranks may work apart longer")
    stop_signals: list = opt(None, "signals that stop the phase where it costs nothing, exit 75, the same command "
                                   "(or Slurm's requeue) resuming it: train saves a checkpoint at the next step "
                                   "boundary, precompute keeps its complete shards (default: SIGTERM SIGUSR1 SIGUSR2:"
                                   " a preemption, scancel or requeue, and Slurm's --signal warning before a time "
                                   "limit; none for none)")
    local_rank: int = opt(-1, "set by the deepspeed launcher; ignored (LOCAL_RANK is read instead)")


@dataclass
class InferenceConfig(ModelConfig):
    """A frozen model run forward only (precompute, evaluate)."""
    batch_size: int = opt(8, "preference pairs per forward (chosen and rejected go together)")
    dtype: str = opt("auto", "model dtype; auto = bf16 on CUDA, fp32 on CPU. Log-probs are accumulated in fp32",
                     choices=["auto", "bf16", "fp16", "fp32"])
    deepspeed: str = opt(None, "ZeRO-3 inference config (ds_configs/zero3_inference.json) to shard a model "
                               "too large for one device across ranks; without it every rank holds a full copy")


@dataclass
class PrecomputeConfig(InferenceConfig):
    output_dir: str = opt(None, "cache directory (manifest.json + <split>/shard-*.arrow)", required=True)
    shard_size: int = opt(1024, "examples per Arrow shard: the unit of resume")
    splits: list = opt(None, "splits to compute (default: every split of --data)")
    reuse: list = opt(None, "earlier caches of this --model and --dtype: the pairs they hold (the same tokens, "
                            "whatever the data around them) are copied from them, not computed")

    def check(self):
        positive(self, "batch_size", "shard_size", "logp_chunk_size", "sequence_parallel_size")
        if self.reuse and len(self.reuse) > 100:  # (each row names its source in one byte)
            raise ConfigError(f"--reuse: {len(self.reuse)} caches, at most 100")


@dataclass
class TrainConfig(AdapterConfig, LossConfig, ModelConfig):
    ref_cache: str = opt(None, "reference cache directory (output of dpo_ds.precompute)", required=True, resume=True)
    output_dir: str = opt(None, "run directory: metrics, checkpoints/, final/", required=True)
    deepspeed: str = opt("auto", "DeepSpeed JSON config (ds_configs/), or auto: the lightest that fits these ranks "
                                 "and devices, by the memory planner (README: Will it fit?)")
    config: str = opt(None, "JSON job file; flags override its values")
    learning_rate: float = opt(5e-7, "peak learning rate", resume=True)
    lr_schedule: str = opt("linear", "decay after warm-up", choices=["linear", "cosine", "constant"], resume=True)
    max_steps: int = opt(None, "optimizer steps (default: 1000, unless --num_train_epochs gives them)", resume=True)
    num_train_epochs: float = opt(None, "passes over the train split instead of --max_steps: max_steps = "
                                        "ceil(epochs x pairs // global batch), known once the data is loaded")
    warmup_steps: int = opt(None, "linear warm-up steps (default: 50, or max_steps / 20 when that is fewer)",
                            resume=True)
    warmup_ratio: float = opt(None, "warm-up as a fraction of --max_steps, rounded up (TRL's way to give it; "
                                    "instead of --warmup_steps)")
    micro_batch_size: int = opt(2, "preference pairs per device per forward", resume=True)
    grad_accum: int = opt(8, "micro-batches per optimizer step", resume=True)
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (ZeRO-3 safe variant)")
    disable_dropout: bool = opt(True, "no dropout in the policy while it trains (TRL's default): the cached "
                                      "reference log-probs have none, so the first step is ln 2", resume=True)
    tiled_mlp: bool = opt(False, "run each layer's MLP over hidden-size tiles of tokens (DeepSpeed's TiledMLP): "
                                 "less activation memory for long sequences, more time (README: long context)")
    log_every: int = opt(10, "steps between train metric lines")
    eval_every: int = opt(100, "steps between evaluations (and one at the end); 0 = only at the end")
    save_every: int = opt(100, "steps between DeepSpeed checkpoints; 0 = only at the end; -1 = none (benchmarks: "
                               "a run that stops cannot resume)")
    save_total_limit: int = opt(2, "checkpoints kept, the newest (as the HF Trainer's flag); 0 keeps every one")
    resume: str = opt("auto", "auto: continue from the latest complete checkpoint in OUT/checkpoints; "
                              "never: refuse to start over an existing run", choices=["auto", "never"])
    seed: int = opt(42, "data order and initialisation of everything random", resume=True)
    report_to: list = opt(None, "where metric rows go besides OUT/metrics.jsonl: tensorboard, wandb, mlflow, "
                                "trackio, all (the installed ones) or none (default: tensorboard; README: tracking)")
    run_name: str = opt(None, "the run's name in the trackers and report.png (default: --output_dir's last part)")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.report_to, str):  # a job file may name one tracker as a string, as TRL's may
            self.report_to = [self.report_to]
        self.report_to = list(self.report_to or ["tensorboard"])
        if self.max_steps == -1:  # TRL's and the HF Trainer's "not given: use the epochs"
            self.max_steps = None
        if self.max_steps is None and self.num_train_epochs is None:
            self.max_steps = 1000
        self.run_name = self.run_name or os.path.basename(os.path.normpath(self.output_dir or "run"))
        self.set_warmup()

    def set_warmup(self):
        if self.warmup_steps is None and isinstance(self.max_steps, int):
            ratio = self.warmup_ratio
            self.warmup_steps = min(50, self.max_steps // 20) if ratio is None else math.ceil(ratio * self.max_steps)

    def set_epochs(self, steps_per_epoch: int) -> None:
        """--num_train_epochs as steps, once the train split's size (in global batches) is known."""
        if self.num_train_epochs is not None:
            self.max_steps = max(1, math.ceil(self.num_train_epochs * steps_per_epoch))
            self.set_warmup()
            self.check()

    def check(self):
        from dpo_ds.report.trackers import chosen

        positive(self, "learning_rate", "micro_batch_size", "grad_accum", "log_every", "logp_chunk_size",
                  "sequence_parallel_size", *(("num_train_epochs",) if self.num_train_epochs is not None else ()))
        chosen(self.report_to)
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"--warmup_ratio {self.warmup_ratio} must be in [0, 1]")
        self.check_loss()
        self.check_adapter()
        if self.save_total_limit < 0:
            raise ConfigError(f"--save_total_limit {self.save_total_limit}: checkpoints kept, 0 for all")
        if self.max_steps is None:  # from --num_train_epochs: checked again by set_epochs
            return
        positive(self, "max_steps")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"--warmup_steps {self.warmup_steps} must be between 0 and --max_steps "
                              f"{self.max_steps}")


@dataclass
class EvalConfig(LossConfig, InferenceConfig):
    ref_cache: str = opt(None, "reference cache directory (output of dpo_ds.precompute)", required=True)
    split: str = opt("eval", "which prepared split to score")
    output: str = opt(None, "write the metrics to this JSON file too")
    bco_delta: float = opt(0.0, "bco_pair's reward shift δ (train logs its running mean as bco/delta)")

    def check(self):
        positive(self, "batch_size", "logp_chunk_size", "sequence_parallel_size")
        self.check_loss()


def resume_keys(cls) -> list[str]:
    """The settings a resumed run must share with the run it continues (marked `resume=True`)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata["resume"]]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
