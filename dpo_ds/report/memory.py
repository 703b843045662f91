"""What a phase used: each rank's peak memory, measured, for metrics.jsonl, the phases' summaries and
`dpo-ds plan --check` (which sets them beside the planner's prediction).

    peak_rss_bytes        the process's peak resident set (Linux VmHWM): on the CPU the device is the host, so
                          this is what a memory limit (a cgroup, the OOM killer) sees, runtime included
    peak_allocated_bytes  CUDA only: torch.cuda.max_memory_allocated of the rank's device (live tensors)
    peak_reserved_bytes   CUDA only: torch.cuda.max_memory_reserved (what the caching allocator holds)

`per_rank` gathers them (collective): {name: [rank 0, rank 1, ...]}; `largest` is the busiest rank's, the
figure a budget must cover.
"""
from __future__ import annotations

import resource

import torch

from dpo_ds import dist

NAMES = ("peak_rss_bytes", "peak_allocated_bytes", "peak_reserved_bytes")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def local() -> dict:
    """This rank's peaks so far."""
    peaks = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = dist.device()
        peaks["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peaks["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peaks


def per_rank() -> dict:
    """{name: [each rank's peak]} (collective: every rank calls it; every rank gets the whole table)."""
    mine, n, r = local(), dist.world_size(), dist.rank()
    names = [name for name in NAMES if name in mine]
    slots = torch.zeros(len(names), n, dtype=torch.float64)
    for i, name in enumerate(names):
        slots[i, r] = mine[name]
    table = dist.all_reduce(slots.flatten()).view(len(names), n)
    return {name: [int(v) for v in table[i].tolist()] for i, name in enumerate(names)}


def largest(table: dict) -> dict:
    """The busiest rank's figures as `memory/<name>` metrics (scalars, as trackers take them)."""
    return {f"memory/{name}": max(values) for name, values in table.items()}


def describe(table: dict) -> str:
    """One line for a phase's summary: the peak resident set per rank (and CUDA's allocated), in GiB."""
    gib = lambda values: ", ".join(f"{v / 2**30:.2f}" for v in values)  # noqa: E731
    text = f"peak memory per rank: resident {gib(table['peak_rss_bytes'])} GiB"
    if "peak_allocated_bytes" in table:
        text += f", CUDA allocated {gib(table['peak_allocated_bytes'])} GiB"
    return text
