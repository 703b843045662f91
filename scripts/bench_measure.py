"""What the bench's workers measure, the same way for dpo_ds's (bench_workers.py) and TRL's (bench_trl.py)."""
from __future__ import annotations


def peak_cuda_mb() -> float | None:
    """torch.cuda.max_memory_allocated in MB (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    from dpo_ds.report.memory import peak_rss_bytes  # the phases' own measure (VmHWM), for the same figure

    return peak_rss_bytes() / 2 ** 20


def print_profile(profiler, steps: int, seconds: float) -> None:
    """Where a step's time goes: dpo_ds's labelled parts (train.train_step) and the operators by self time."""
    events = profiler.key_averages()
    print(f"[profile] {steps} steps, {seconds / steps:.3f} s/step (wall, profiler on)")
    for e in sorted((e for e in events if e.key.startswith("dpo_ds.")), key=lambda e: -e.cpu_time_total):
        print(f"[profile] {e.key:<28} {e.cpu_time_total / 1e6 / steps:8.3f} s/step  ({e.count // steps} calls/step)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
