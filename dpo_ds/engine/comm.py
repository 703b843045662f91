"""DeepSpeed's communication layer on the process group dpo_ds.dist made: started once per process by whatever
builds an engine (or registers Ulysses), without DeepSpeed's shared-memory CPU all-reduce, which dpo_ds has no use
for, and with DeepSpeed's CPU ops built once per environment."""
from __future__ import annotations

import os
import sys

import torch

from dpo_ds import dist


def init() -> None:
    """DeepSpeed's communication layer on top of the process group `dist.init` made (the phases' one entry
    point); run by the engine builders, idempotent."""
    import deepspeed

    dist.init()
    if not torch.cuda.is_available():
        _cpu_ops()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _cpu_ops() -> None:
    """On the CPU, DeepSpeed's communication layer would build (on first use), map and wait for its shared-memory
    all-reduce between a host's ranks at start-up: a 69 MB buffer per rank in /dev/shm that it never removes, each
    rank spinning until every other rank of the host has made its own. Only its inference all-reduce (AutoTP's
    tensor-parallel layers) uses it; ZeRO's collectives and Ulysses' all-to-all are the process group's (gloo), so
    it stays off. The op that is built (CPU-Adam, for an offloaded optimizer, on first use) goes into the venv's
    own directory (torch's default is one per user, which every venv rebuilds for its own paths) with the ninja
    installed beside this interpreter (a DeepSpeed dependency) rather than a system one, whose log hashes
    commands another way (ninja 1.11 vs 1.13): a run started with the venv on PATH and one without rebuilt it
    (35-80 s) at every switch."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    here = os.path.dirname(sys.executable)
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if os.path.isfile(os.path.join(here, "ninja")) and not os.environ.get("PATH", "").startswith(here + os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
