"""Every setting of every phase, defined once as a dataclass field (default + help).

The command line and the JSON job file (`--config job.json`), parsed by dpo_ds.cli, and the saved
`OUT/config.json` are all derived from these fields: defaults < job file < flags. No torch import here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from dpo_ds.errors import ConfigError


def opt(default, help, choices=None, required=False, resume=False):
    """A setting: its default, its help, and whether a resumed run must keep it (`resume`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "required": required, "resume": resume})


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
        _positive(self, "max_length", "max_prompt_length", "num_proc")
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

    def check(self):
        _positive(self, "batch_size", "shard_size", "logp_chunk_size", "sequence_parallel_size")


# The loss-name table: every loss type (dpo_ds/objective/loss.py computes each) and what it reads besides β:
# h, the pairwise log-ratio mapped through --f_divergence; ε, --label_smoothing.
LOSSES = {"sigmoid": "h ε", "robust": "h ε", "hinge": "h", "ipo": "h", "exo_pair": "h ε", "nca_pair": "",
          "bco_pair": "", "sppo_hard": "", "aot": "ε", "aot_unpaired": "ε", "apo_zero": "", "apo_down": "",
          "discopop": "h", "sigmoid_norm": "h ε", "sft": ""}
LOSS_TYPES = tuple(LOSSES)
# spellings of the same loss in other TRL versions: TRL before 0.20 called the unpaired AOT variant "aot_pair"
LOSS_ALIASES = {"aot_pair": "aot_unpaired"}
SMOOTHED = tuple(t for t, reads in LOSSES.items() if "ε" in reads)  # read --label_smoothing
F_DIVERGED = tuple(t for t, reads in LOSSES.items() if "h" in reads)  # read --f_divergence

EXO_EPSILON = 1e-3  # exo_pair's label smoothing when none is given (EXO's own default)


@dataclass
class LossConfig:
    beta: float = opt(0.1, "KL strength: higher keeps the policy closer to the reference", resume=True)
    loss_type: list = opt(None, f"one or more of {', '.join(LOSS_TYPES)}; several are summed with "
                                f"--loss_weights (README: the loss table) (default: sigmoid)", resume=True)
    loss_weights: list = opt(None, "one weight per --loss_type (default: 1 each)", resume=True)
    label_smoothing: float = opt(None, f"assumed label noise ε in [0, 0.5) for {', '.join(SMOOTHED)} "
                                       f"(default: {EXO_EPSILON} with exo_pair, else 0)", resume=True)
    discopop_tau: float = opt(0.05, "discopop's temperature of the log-ratio modulation", resume=True)
    f_divergence: str = opt("reverse_kl", "the divergence whose f' maps the log-ratios before the pairwise loss "
                                          "(Wang et al. 2023); reverse_kl is DPO's", resume=True,
                            choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
    f_alpha: float = opt(None, "α of alpha_divergence, in (0, 1) (default: 0.5)", resume=True)
    ld_alpha: float = opt(None, "LD-DPO: weight in [0, 1] of the tokens past the shorter response's length, "
                                "for policy and reference alike (default: off, i.e. 1)", resume=True)
    use_weighting: bool = opt(False, "WPO: weight each pair by its responses' length-normalised, "
                                     "distribution-aligned policy probabilities", resume=True)
    rpo_alpha: float = opt(None, "RPO as TRL names it: adds sft (the chosen responses' NLL per token) to the "
                                 "loss with this weight, i.e. --loss_type ... sft --loss_weights ... α")

    def __post_init__(self):
        if isinstance(self.loss_type, str):  # a job file may name one loss as a string
            self.loss_type = [self.loss_type]
        self.loss_type = [LOSS_ALIASES.get(t, t) for t in self.loss_type or ["sigmoid"]]
        if self.rpo_alpha is not None and "sft" not in self.loss_type:  # (a saved run already lists sft)
            self.loss_weights = list(self.loss_weights or [1.0] * len(self.loss_type)) + [self.rpo_alpha]
            self.loss_type.append("sft")
        if self.loss_weights is not None:
            try:
                self.loss_weights = [float(w) for w in self.loss_weights]
            except (TypeError, ValueError):
                raise ConfigError(f"--loss_weights {self.loss_weights}: not numbers") from None
        if self.label_smoothing is None:  # EXO's ε only when no other loss would read it too
            smoothed = [t for t in self.loss_type if t in SMOOTHED]
            self.label_smoothing = EXO_EPSILON if smoothed == ["exo_pair"] else 0.0
        if self.f_alpha is None and self.f_divergence == "alpha_divergence":
            self.f_alpha = 0.5

    @property
    def length_desensitised(self) -> bool:
        """LD-DPO is on: the losses read each response's log-prob over the pair's shared length too."""
        return self.ld_alpha is not None

    def weights(self) -> list[float]:
        return self.loss_weights or [1.0] * len(self.loss_type)

    def check_loss(self):
        """Refuse the combinations no loss defines, with what to change."""
        _positive(self, "beta", "discopop_tau")
        types, eps = self.loss_type, self.label_smoothing
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            raise ConfigError(f"--loss_type {' '.join(unknown)}: unknown (known: {', '.join(LOSS_TYPES)})")
        if len(set(types)) != len(types):
            raise ConfigError(f"--loss_type {' '.join(types)} names a loss twice; give it one weight instead")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ConfigError(f"--loss_weights has {len(self.loss_weights)} value(s) for {len(types)} --loss_type(s) "
                              f"({' '.join(types)}): give one weight per loss")
        if types == ["sft"]:
            raise ConfigError("--loss_type sft alone is supervised fine-tuning, not preference optimisation: "
                              "combine it with a preference loss (e.g. --loss_type sigmoid sft = RPO)")
        if not 0.0 <= eps < 0.5:
            raise ConfigError(f"--label_smoothing {eps} must be in [0, 0.5) (at 0.5 the labels carry no "
                              f"preference{'; robust divides by 1 - 2ε' if 'robust' in types else ''})")
        if eps and not set(types) & set(SMOOTHED):
            raise ConfigError(f"--label_smoothing applies to {', '.join(SMOOTHED)}, not to {' '.join(types)}")
        if "exo_pair" in types and eps == 0:
            raise ConfigError(f"exo_pair needs --label_smoothing > 0 (its target distribution takes log ε); "
                              f"EXO uses {EXO_EPSILON}. With another loss that reads ε it applies to both: give "
                              f"it explicitly")
        if self.f_divergence != "reverse_kl" and not set(types) & set(F_DIVERGED):
            raise ConfigError(f"--f_divergence {self.f_divergence} maps the pairwise log-ratio of "
                              f"{', '.join(F_DIVERGED)}; none of --loss_type {' '.join(types)} uses it")
        if self.f_alpha is not None and self.f_divergence != "alpha_divergence":
            raise ConfigError("--f_alpha applies to --f_divergence alpha_divergence only")
        if self.f_alpha is not None and not 0.0 < self.f_alpha < 1.0:
            raise ConfigError(f"--f_alpha {self.f_alpha} must be in (0, 1); its limits are --f_divergence "
                              f"reverse_kl (α -> 0) and forward_kl (α = 1)")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"--ld_alpha {self.ld_alpha} must be in [0, 1] (1 = plain sums)")
        if self.use_weighting and set(types) & {"aot", "aot_unpaired"}:
            raise ConfigError("--use_weighting weights each pair, but aot and aot_unpaired pair sorted log-ratios "
                              "of different examples: use another loss type with it")


@dataclass
class TrainConfig(LossConfig, ModelConfig):
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
    save_every: int = opt(100, "steps between DeepSpeed checkpoints; 0 = only at the end")
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

        _positive(self, "learning_rate", "micro_batch_size", "grad_accum", "log_every", "logp_chunk_size",
                  "sequence_parallel_size", *(("num_train_epochs",) if self.num_train_epochs is not None else ()))
        chosen(self.report_to)
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"--warmup_ratio {self.warmup_ratio} must be in [0, 1]")
        self.check_loss()
        if self.max_steps is None:  # from --num_train_epochs: checked again by set_epochs
            return
        _positive(self, "max_steps")
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
        _positive(self, "batch_size", "logp_chunk_size", "sequence_parallel_size")
        self.check_loss()


def _positive(cfg, *names):
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(cfg, name)}")


def resume_keys(cls) -> list[str]:
    """The settings a resumed run must share with the run it continues (marked `resume=True`)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata["resume"]]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
