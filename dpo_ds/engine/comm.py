"""DeepSpeed's communication layer on the process group dpo_ds.dist made: started once per process by whatever
builds an engine (or registers Ulysses), with DeepSpeed's CPU ops built once per environment, and the CPU
all-reduce's shared-memory buffer removed at exit."""
from __future__ import annotations

import atexit
import glob
import os
import sys

import torch

from dpo_ds import dist

_SHM_CLEANUP_REGISTERED = False


def init() -> None:
    """DeepSpeed's communication layer on top of the process group `dist.init` made (the phases' one entry
    point); run by the engine builders, idempotent."""
    global _SHM_CLEANUP_REGISTERED
    import deepspeed

    dist.init()
    if not torch.cuda.is_available():
        _cpu_ops()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available() and not _SHM_CLEANUP_REGISTERED:
        atexit.register(remove_shm_buffer)
        _SHM_CLEANUP_REGISTERED = True


def _cpu_ops() -> None:
    """DeepSpeed's CPU ops (compiled on first use: the all-reduce between a host's ranks, CPU-Adam) are built once
    per environment: in the venv's own directory (torch's default is one per user, which every venv rebuilds for
    its own paths) with the ninja installed beside this interpreter (a DeepSpeed dependency) rather than a system
    one, whose log hashes commands another way (ninja 1.11 vs 1.13): a run started with the venv on PATH and one
    without rebuilt them (35-80 s) at every switch. One rank has nothing to all-reduce with anybody: it goes
    without (no compile, no 69 MB buffer)."""
    import deepspeed

    here = os.path.dirname(sys.executable)
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if os.path.isfile(os.path.join(here, "ninja")) and not os.environ.get("PATH", "").startswith(here + os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    if dist.world_size() == 1:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        return
    from torch.utils.cpp_extension import _get_build_directory

    if not glob.glob(os.path.join(_get_build_directory("deepspeed_shm_comm", False), "*.so")):
        dist.print0("deepspeed: compiling its CPU communication op, once in this environment (1-2 minutes)")


def remove_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce leaves each rank's shared-memory buffer (69 MB) in /dev/shm at exit, so
    every run on a CPU machine leaks RAM until reboot. At exit every peer has long mapped it: removing the
    name is safe (the mappings live on until each process ends)."""
    name = f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{dist.local_rank()}"
    for path in glob.glob(os.path.join("/dev/shm", name)):
        try:
            os.remove(path)
        except OSError:
            pass
