"""Will it fit? The memory planner, one room that train's --deepspeed auto and `dpo-ds plan` both ask:

    footprint   each phase's memory per rank, term by term, from the model's config alone (arithmetic)
    calibrate   what the arithmetic cannot know on the CPU (runtime, a layer's real cost), from probes
    probe       one probe: two real steps (or forwards) of the engine on the model cut to a few layers
    choice      which DeepSpeed configuration a run uses (--deepspeed auto: the lightest that fits)
    cli         `dpo-ds plan` / `python -m dpo_ds.plan`: predictions, --search, --check RUN_DIR
"""
from dpo_ds.plan.calibrate import Measured, inference_config, job_of, measured_terms, threshold
from dpo_ds.plan.cli import PlanConfig, main, measured_run, predict, run, search, show

__all__ = ["Measured", "PlanConfig", "inference_config", "job_of", "main", "measured_run", "measured_terms",
           "predict", "run", "search", "show", "threshold"]
