"""The model on disk: HF checkpoints and PEFT adapters in and out, one direction between them (export reads
load's helpers; adapters stands alone).

    load      --model checked, dtype and attention chosen, the model built (sharded under ZeRO-3), an adapter
              directory read merged; dropout off and gradient checkpointing on for training
    adapters  LoRA on the policy (PEFT): injected, seeded, which parameters train
    export    the trained policy written: an HF checkpoint or PEFT's adapter directory, published atomically
"""
from dpo_ds.pretrained.adapters import AdapterSpec, default_targets, trains_everything
from dpo_ds.pretrained.load import (
                                    DTYPES,
                                    attn_implementation,
                                    check_model_dir,
                                    disable_dropout,
                                    dtype_name,
                                    enable_gradient_checkpointing,
                                    is_adapter_dir,
                                    load_model,
                                    open_model_dir,
                                    resolve_dtype,
)

__all__ = ["DTYPES", "AdapterSpec", "attn_implementation", "check_model_dir", "default_targets", "disable_dropout",
           "dtype_name", "enable_gradient_checkpointing", "is_adapter_dir", "load_model", "open_model_dir",
           "resolve_dtype", "trains_everything"]
