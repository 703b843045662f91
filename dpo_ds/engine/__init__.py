"""DeepSpeed, and only it: the engines the phases run their models on. The only importer of deepspeed.

    comm          DeepSpeed's communication layer on dist's process group (and its CPU ops, built once)
    ds_config     the run's DeepSpeed JSON with the job's batch sizes injected; what it implies
    long_context  Ulysses sequence parallelism and TiledMLP
    build         the training engine (policy, AdamW, lr schedule) and the inference engine
    unpickle      checkpoint files read with weights_only
    checkpoint    DeepSpeed checkpoints loaded back safely
    universal     a checkpoint continued on other ranks or another ZeRO stage (DeepSpeed's universal format)
    export        the trained policy gathered from ZeRO-3's partitions and handed to pretrained.export
"""
from dpo_ds.engine.build import ModelSpec, TrainingSpec, inference_engine, lr_lambda, training_engine
from dpo_ds.engine.checkpoint import load_checkpoint
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
from dpo_ds.engine.export import export
from dpo_ds.engine.long_context import check_sequence_parallel, gradient_scale, register_ulysses, tile_mlp
from dpo_ds.engine.universal import needs_universal, to_universal
from dpo_ds.engine.unpickle import safe_load

__all__ = ["ModelSpec", "TrainingSpec", "check_sequence_parallel", "collective_forwards", "ds_dtype", "export",
           "gradient_scale", "inference_ds_config", "inference_engine", "load_checkpoint", "lr_lambda",
           "needs_universal", "offloaded", "partitions_nothing", "read_ds_config", "register_ulysses", "safe_load",
           "tile_mlp", "to_universal", "train_ds_config", "training_engine", "zero_stage"]
