"""The loss settings (train and evaluate) and the loss-name table."""
from __future__ import annotations

from dataclasses import dataclass

from dpo_ds.config.fields import opt, positive
from dpo_ds.errors import ConfigError

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
        positive(self, "beta", "discopop_tau")
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
