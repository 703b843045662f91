"""The only reader of RANK / WORLD_SIZE / LOCAL_RANK: process-group set-up and small collectives.

Launched by `deepspeed`, `torchrun`, Slurm's `srun` (one task per rank: the ranks and the rendezvous are read
from the step's SLURM_* variables, see `slurm_task`) or as one plain process (then a one-rank group on a free
local port, so the same DeepSpeed code path runs everywhere). Rank-0 side effects are explicit at call sites:
`if dist.is_main(): write(...)` followed by `dist.barrier()` on every rank.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as tdist

from dpo_ds import slurm
from dpo_ds.errors import UserError


def _launched() -> None:
    """Before anything reads the ranks: a task that srun started, and that no launcher told its rank, takes
    Slurm's (once)."""
    if "RANK" not in os.environ and _SLURM_LINE[0] is None:
        _SLURM_LINE[0] = slurm.task_environment(os.environ) or ""


def rank() -> int:
    _launched()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    _launched()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    _launched()
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Ranks on this host: torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size()))))


_SLURM_LINE: list[str | None] = [None]  # what slurm.task_environment derived, said once by rank 0 (init)


def is_main() -> bool:
    return rank() == 0


# Sequence parallelism (--sequence_parallel_size K): ranks k*K .. k*K + K-1 form sequence-parallel group k (the
# groups DeepSpeed's Ulysses builds), which splits every row of one stream of batches K ways. Work is dealt to
# data-parallel ranks, one per group: every rank of a group sees the same pairs.
_SP_SIZE = 1


def set_sequence_parallel(size: int) -> None:
    """Declare K (before any work is dealt); K must divide the number of ranks."""
    global _SP_SIZE
    if world_size() % size:
        raise UserError(f"--sequence_parallel_size {size} does not divide the {world_size()} rank(s): every "
                        f"sequence-parallel group needs {size} ranks (launch a multiple of {size}, e.g. "
                        f"--num_gpus {size * max(1, world_size() // size)})")
    _SP_SIZE = size


def sp_size() -> int:
    return _SP_SIZE


def sp_rank() -> int:
    """This rank's slice of each row: 0 .. K-1."""
    return rank() % _SP_SIZE


def dp_size() -> int:
    """Data-parallel ranks: world / K."""
    return world_size() // _SP_SIZE


def dp_rank() -> int:
    return rank() // _SP_SIZE


def describe() -> str:
    """'2 rank(s)', or with sequence parallelism '4 ranks = 2 data-parallel x 2 sequence-parallel'."""
    if _SP_SIZE == 1:
        return f"{world_size()} rank(s)"
    return f"{world_size()} ranks = {dp_size()} data-parallel x {_SP_SIZE} sequence-parallel"


def device() -> torch.device:
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port nothing listens on now (for a one-process group, the tests and scripts/demo.sh)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(cmd: list, n: int, env: dict, cwd: str | None = None, grace: float = 10.0,
                    timeout: float | None = None) -> tuple[int, list[tuple[str, str]]]:
    """`cmd` as ranks 0..n-1 of one job on this host, each told its rank as a launcher tells it (the
    LAUNCHER_VARIABLES), started here without one: the deepspeed launcher and its launch.py import DeepSpeed
    each (~7 s of CPU). A rank that fails gets the others stopped after `grace` seconds (gloo would keep them
    waiting for it), as does the end of `timeout` (then subprocess.TimeoutExpired), this process's own end or
    Ctrl-C. -> (the first non-zero exit status or 0, each rank's (stdout, stderr))."""
    import signal
    import subprocess
    import tempfile
    import time

    port, procs, logs = free_port(), [], []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for rank in range(n):
            told = {"RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(n),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            procs.append(subprocess.Popen(cmd, stdout=logs[-1][0], stderr=logs[-1][1], text=True, cwd=cwd,
                                          start_new_session=True, env={**env, **told}))
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            if failed_at is not None and time.monotonic() > failed_at + grace:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = []
    for out, err in logs:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    return next((p.returncode for p in procs if p.returncode), 0), texts


def init(timeout_minutes: float = 60.0, sequence_parallel_size: int | None = None) -> None:
    """Join (or, for one plain process, create) the process group: nccl on CUDA, gloo on the CPU. A rank waits
    `timeout_minutes` for the others to join, and as long in any collective, then stops with an error (a peer
    whose processes die is noticed sooner: its connections close). `sequence_parallel_size`: see
    set_sequence_parallel (a phase gives it; None keeps what was set, 1 when nothing was)."""
    if tdist.is_available() and tdist.is_initialized():
        if sequence_parallel_size is not None:
            set_sequence_parallel(sequence_parallel_size)
        return
    _launched()
    if _SLURM_LINE[0] and rank() == 0:
        print(_SLURM_LINE[0], flush=True)
    if "RANK" not in os.environ:  # one plain process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks on one host share its cores; oversubscription halves speed
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    try:
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                 timeout=timedelta(minutes=timeout_minutes))
    except (RuntimeError, TimeoutError) as e:  # DistStoreError / DistNetworkError: the ranks never all met
        raise UserError(f"rank {rank()} could not form the process group of {world_size()} ranks at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                        f"--dist_timeout_minutes {timeout_minutes:g} ({str(e).splitlines()[0]}). Launch every node "
                        f"with the same --master_addr and --master_port, and let GLOO_SOCKET_IFNAME (CPU) or "
                        f"NCCL_SOCKET_IFNAME name an interface the other nodes reach") from None
    set_sequence_parallel(sequence_parallel_size or 1)


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    if active():
        tdist.barrier()


def all_reduce(values, op: str = "sum") -> torch.Tensor:
    """Reduce a small float64 vector across ranks (sum or max); identity on one rank."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if active():
        backend_device = device() if tdist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(backend_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t.cpu()


def all_reduce_data(values) -> torch.Tensor:
    """Sum a small float64 vector of per-batch figures over the data-parallel ranks: the ranks of a
    sequence-parallel group hold the same pairs' figures, so each group's are counted once."""
    t = torch.as_tensor(values, dtype=torch.float64)
    return all_reduce(t if sp_rank() == 0 else torch.zeros_like(t))


def even(items: list, collective: bool):
    """This rank's items, then None until it has yielded as many as the busiest rank (DistributedSampler's
    even batches). Under ZeRO-3 every forward is collective (each layer's parameters are gathered from all
    ranks), so a rank with less work must still run as many forwards: it runs a dummy batch for each None.
    The count is agreed before the first item (agreeing later would wait inside another rank's forward).
    With `collective` False (full model copies) the items alone."""
    total = int(all_reduce([len(items)], op="max")[0]) if collective and active() else len(items)
    return list(items) + [None] * (total - len(items))


def on_main(fn):
    """Run `fn` on rank 0 alone (one reader of shared storage: hashing weights and shards once, not once per
    rank) and hand its result to every rank. An error there stops every rank: a UserError with its message
    on each, anything else re-raised on rank 0 and reported as a UserError on the others."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except UserError as e:
            error = (type(e), str(e))
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait forever on a crashed rank 0
            if not active():
                raise
            error = (UserError, f"rank 0 failed: {type(e).__name__}: {e}")
            _broadcast([None, error])
            raise
    if active():
        result, error = _broadcast([result, error])
    if error:
        cls, message = error
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        raise err
    return result


def check_shared_dir(path: str, flag: str) -> None:
    """Collective: stop every rank with one message unless `path` is one directory every rank sees (storage
    shared by all nodes, as the phases assume): rank 0 writes a token file there, every rank reads it back."""
    if not active():
        return
    def write_token() -> str:
        """A new file of a random name, created exclusively (never through a link someone left there)."""
        os.makedirs(path, exist_ok=True)
        token = os.urandom(8).hex()
        fd = os.open(os.path.join(path, f".dpo_ds_shared_{token}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    token = on_main(write_token)
    name = os.path.join(path, f".dpo_ds_shared_{token}")
    try:
        with open(name) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    blind = int(all_reduce([0.0 if seen else 1.0])[0])  # every rank has read before rank 0 removes the file
    if is_main():
        os.remove(name)
    if blind:
        raise UserError(f"{flag} {path} is not on storage every node sees: {blind} of {world_size()} rank(s) cannot "
                        f"read a file rank 0 wrote there (another host has its own directory at that path, or "
                        f"none). Put it on a filesystem shared by every node (NFS, Lustre, ...), mounted at the "
                        f"same path")


def on_every_rank(fn):
    """Run `fn` on every rank (e.g. reading files every rank must see). A UserError on any rank stops every
    rank: the failing ones with their own message, the others pointing to it, none left waiting for them."""
    try:
        result, error = fn(), None
    except UserError as e:
        result, error = None, e
    failed = int(all_reduce([1.0 if error else 0.0])[0])
    if failed:
        raise error or UserError(f"{failed} other rank(s) failed (their message says why, e.g. a node that does "
                                 f"not see the same files)")
    return result


def _broadcast(objects: list) -> list:
    tdist.broadcast_object_list(objects, src=0)
    return objects


def print0(*args, **kw) -> None:
    if is_main():
        print(*args, **kw, flush=True)
