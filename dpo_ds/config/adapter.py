"""The adapter settings of train: LoRA (PEFT) on the frozen SFT weights, with TRL's and PEFT's flag names."""
from __future__ import annotations

from dataclasses import dataclass

from dpo_ds.config.fields import opt
from dpo_ds.errors import ConfigError


@dataclass
class AdapterConfig:
    use_peft: bool = opt(False, "train LoRA adapters on the frozen SFT weights instead of every weight (PEFT); "
                                "the reference stays the SFT model the cache was computed from", resume=True)
    lora_r: int = opt(16, "LoRA rank", resume=True)
    lora_alpha: int = opt(32, "LoRA α: the adapter's update is scaled by α / r", resume=True)
    lora_dropout: float = opt(0.05, "dropout on the adapters' input (0 with --disable_dropout, as TRL)", resume=True)
    lora_target_modules: list = opt(None, "module names that get adapters, or all-linear (default: the attention "
                                          "and MLP projections the architecture has)", resume=True)
    lora_modules_to_save: list = opt(None, "modules trained in full beside the adapters (e.g. lm_head)",
                                     resume=True)
    load_in_4bit: bool = opt(False, "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes on CUDA)", resume=True)
    load_in_8bit: bool = opt(False, "the frozen base in 8-bit (bitsandbytes on CUDA)", resume=True)
    merge_adapter: bool = opt(False, "with --use_peft: also write final/merged, the adapter merged into a full "
                                     "checkpoint that plain transformers loads")

    def check_adapter(self):
        if isinstance(self.lora_target_modules, str):  # a job file may give all-linear as a string
            self.lora_target_modules = [self.lora_target_modules]
        peft_only = [n for n in ("load_in_4bit", "load_in_8bit", "merge_adapter") if getattr(self, n)]
        if peft_only and not self.use_peft:
            raise ConfigError(f"--{peft_only[0]} applies to adapters: add --use_peft")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load_in_4bit and --load_in_8bit: give one")
        if self.use_peft and (self.lora_r <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ConfigError(f"--lora_r {self.lora_r} and --lora_alpha {self.lora_alpha} must be positive, "
                              f"--lora_dropout {self.lora_dropout} in [0, 1)")
