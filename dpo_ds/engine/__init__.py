"""The only importer of deepspeed: what the phases run their models on.

    ds_config     the run's DeepSpeed JSON with the job's batch sizes injected; what it implies
    choice        which configuration a training run uses (--deepspeed auto: the planner's lightest)
    models        HF checkpoints loaded (dtype, attention, zero.Init), dropout and gradient checkpointing
    long_context  Ulysses sequence parallelism and TiledMLP
    build         the training engine (policy, AdamW, lr schedule) and the inference engine
    checkpoint    DeepSpeed checkpoints read back safely
    universal     a checkpoint continued on other ranks or another ZeRO stage (DeepSpeed's universal format)
    export        the policy out as an HF checkpoint, gathered from ZeRO-3 shards
    adapters      LoRA on the policy (PEFT): injected, exported as PEFT's directory, merged, read back
    footprint     each phase's memory per rank, term by term, from the configs alone (dpo_ds.plan)
    calibrate     the CPU's measured terms for dpo_ds.plan: runtime and per-layer excess, from probes
    probe         one probe: two real steps (or forwards) of the engine on the model cut to a few layers
"""
from dpo_ds.engine.adapters import AdapterSpec, trains_everything
from dpo_ds.engine.build import (
                                     ModelSpec,
                                     TrainingSpec,
                                     inference_engine,
                                     lr_lambda,
                                     training_engine,
)
from dpo_ds.engine.checkpoint import load_checkpoint, safe_load
from dpo_ds.engine.choice import AUTO, engine_config, planned_dtype
from dpo_ds.engine.ds_config import (
                                     collective_forwards,
                                     ds_dtype,
                                     inference_ds_config,
                                     offloaded,
                                     partitions_nothing,
                                     read_ds_config,
                                     train_ds_config,
                                     zero_stage,
)
from dpo_ds.engine.export import export, export_hf
from dpo_ds.engine.long_context import (
                                     check_sequence_parallel,
                                     gradient_scale,
                                     register_ulysses,
                                     tile_mlp,
)
from dpo_ds.engine.models import (
                                     attn_implementation,
                                     check_model_dir,
                                     disable_dropout,
                                     dtype_name,
                                     enable_gradient_checkpointing,
                                     load_model,
                                     open_model_dir,
                                     resolve_dtype,
)
from dpo_ds.engine.universal import needs_universal, to_universal

__all__ = ["AUTO", "AdapterSpec", "ModelSpec", "TrainingSpec", "attn_implementation", "check_model_dir",
           "check_sequence_parallel",
           "collective_forwards", "disable_dropout", "ds_dtype", "dtype_name", "enable_gradient_checkpointing",
           "engine_config", "export", "export_hf", "gradient_scale", "inference_ds_config", "inference_engine",
           "load_checkpoint", "load_model", "lr_lambda", "needs_universal", "offloaded", "open_model_dir",
           "partitions_nothing", "planned_dtype", "read_ds_config", "register_ulysses", "resolve_dtype", "safe_load",
           "tile_mlp", "to_universal", "trains_everything", "train_ds_config", "training_engine", "zero_stage"]
