"""scripts/bench.py's TRL worker: TRL's DPOTrainer on the model, pairs and batch dpo_ds's train worker runs."""
from __future__ import annotations

import json
import os
import statistics
import time

from bench_measure import peak_cuda_mb, peak_rss_mb, print_profile


def trl_rows(model_dir: str, data_dir: str) -> list[dict]:
    """The prepared train split as TRL reads it: {prompt, chosen, response} text decoded from dpo_ds's token
    ids (prompt = the tokens before the first label), so both trainers see the same sequences."""
    from transformers import AutoTokenizer

    from dpo_ds.data.encode import IGNORE
    from dpo_ds.data.prepared import load_split

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for r in load_split(data_dir, "train"):
        n = next(i for i, label in enumerate(r["chosen_labels"]) if label != IGNORE)
        rows.append({"prompt": tok.decode(r["chosen_input_ids"][:n]), "chosen": tok.decode(r["chosen_input_ids"][n:]),
                     "rejected": tok.decode(r["rejected_input_ids"][n:])})
    return rows


def trl_set_up(a) -> dict:
    """The process state TRL's DeepSpeed path needs here, and the pairs as a file every rank reads ->
    the DPOConfig arguments that use that state."""
    import torch

    configured = {}
    if a.ds and not torch.cuda.is_available():
        # Off CUDA, accelerate finds no backend for its DeepSpeed path and counts one process whatever the world
        # size (HF then fills train_batch_size for 1 rank and DeepSpeed refuses it). Set up the state the GPU path
        # would have - DeepSpeed's process group over gloo, all ranks counted - and let the Trainer use it.
        from accelerate import PartialState
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        configured = {"accelerator_config": {"use_configured_state": True}}
    # From a file, with one datasets cache all ranks see: TRL's precompute mode maps on rank 0 and the other ranks
    # open rank 0's cache file (an in-memory dataset would keep it in rank 0's private temporary directory).
    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(a.out, exist_ok=True)
        with open(f"{a.out}/pairs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in trl_rows(a.model, a.data))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return configured


def trl_peft(a, model) -> dict:
    """DPOTrainer's peft_config for --lora_r: dpo_ds's adapters (the same layers, rank, α, and dropout off as
    dpo_ds's --disable_dropout has it); {} for a full fine-tune."""
    if not a.lora_r:
        return {}
    from peft import LoraConfig

    from dpo_ds.pretrained.adapters import default_targets

    return {"peft_config": LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                                      target_modules=default_targets(model), task_type="CAUSAL_LM")}


def worker_trl(a) -> None:
    """TRL's DPOTrainer on the same model, pairs, micro-batch, accumulation and steps; --mode trl_online (a live
    reference model) or trl_precompute (precompute_ref_log_probs). Under the deepspeed launcher with a ZeRO
    config (--ds) it runs through HF Trainer's DeepSpeed integration, as TRL users do. Step time = the interval
    between optimizer steps (data loading included, as in dpo_ds's figure), median after 3 warm-up steps."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    world = int(os.environ.get("WORLD_SIZE", 1))
    if not torch.cuda.is_available():  # the same share of the cores per rank as dpo_ds's dist.init gives
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    times, marks = [], []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.time())
            times.append(marks[-1] - marks[-2])
            if a.profile and state.global_step == a.steps - a.profile:  # profile the last --profile steps
                profiler.__enter__()

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if a.profile else None

    t_start = time.time()
    configured, rank = trl_set_up(a), int(os.environ.get("RANK", 0))
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = datasets.load_dataset("json", data_files=f"{a.out}/pairs.jsonl", split="train", cache_dir=f"{a.out}/hf-cache")
    args = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.accum,
                     learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_steps=a.steps, beta=a.beta,
                     max_grad_norm=1.0, gradient_checkpointing=bool(a.gradient_checkpointing),
                     bf16=a.trl_bf16, fp16=False,  # TRL defaults to bf16; dpo_ds's bench configs run fp32
                     gradient_checkpointing_kwargs={"use_reentrant": False},
                     precompute_ref_log_probs=a.mode == "trl_precompute", max_length=None, report_to="none",
                     save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, seed=42, dataloader_num_workers=0,
                     use_cpu=not torch.cuda.is_available() and not a.ds, deepspeed=json.load(open(a.ds)) if a.ds else None, **configured)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()],
                         **trl_peft(a, model))
    trainer.train()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        if rank == 0:
            print_profile(profiler, a.profile, sum(times[-a.profile:]))
    if rank == 0:
        with open(a.result, "a") as f:
            f.write(json.dumps({"mode": a.mode, "beta": a.beta, "ranks": world, "median_step_s":
                                statistics.median(times[min(3, len(times) - 1):]), "peak_rss_mb_per_rank": peak_rss_mb(),
                                "wall_s": time.time() - t_start, "trl": __import__("trl").__version__,
                                "peak_cuda_mb": peak_cuda_mb(),
                                "lora_r": a.lora_r}) + "\n")
