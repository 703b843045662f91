"""Who may write an output directory: one job at a time, only into its own kind of output, never a model.

Each phase claims its --output_dir (rank 0, through `dist.on_main`) before it writes anything there:

1. a directory holding an HF model (config.json of a model, weights) is refused: no phase writes into one;
2. an exclusive `flock` on OUT/.dpo_ds.lock is taken and held until the process ends, however it ends (the
   kernel drops it on exit, a crash or SIGKILL), so a second job into the same directory is refused while the
   first one runs; the lock file names its holder (host, pid, phase, start) for that message;
3. every other entry must be this phase's own output (OWN below), so a user's files are never deleted or
   mixed with a run's.

Storage without working locks (some NFS or Lustre mounts answer ENOLCK/EOPNOTSUPP): the phase says so in
one line and runs unlocked; keeping two jobs apart is then the user's (item in the README's trust section).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import socket
import sys
import tempfile
import time

from dpo_ds import dist
from dpo_ds.errors import UserError

LOCK = ".dpo_ds.lock"
PRIVATE = re.compile(r"\.dpo_ds[._].*")  # the lock and the shared-storage probe (dist.check_shared_dir)
TMP = r"(\.tmp\d*)?"  # files.atomic_write's temporary names, left by a crash mid-write

# what each kind of output directory may hold: entry names (regular expressions) of its top level
OWN = {
    "prepared data": (r"train", r"eval", rf"prepare_report\.json{TMP}",
                      r"\.prepare-(train|eval)\.arrow"),  # a split being written (prepare), left by a kill
    "reference cache": (r"train", r"eval", rf"manifest\.json{TMP}", rf"plan\.json{TMP}"),
    "training run": (rf"config\.json{TMP}", rf"metrics\.jsonl{TMP}", r"checkpoints", r"final", r"final\.(tmp|old)",
                     r"tensorboard", r"report\.png", rf"trackers\.json{TMP}", r"wandb", r"mlruns"),
}
# what a prepared split directory holds (datasets.save_to_disk), so `train/` of a user's project is not taken
# for one: prepare replaces these directories
SPLIT_FILES = re.compile(r"(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json)")
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "*.gguf")

_held: dict[str, int] = {}  # real path -> lock descriptor, open while this process owns the directory


def model_files(path: str) -> list[str]:
    """The names that make `path` an HF model directory (weights, or a config.json that is not a run's)."""
    found = sorted({os.path.basename(p) for pattern in WEIGHTS for p in glob.glob(os.path.join(path, pattern))})
    config = os.path.join(path, "config.json")
    if os.path.isfile(config) and not has_keys(config, ("train",)):  # a training run's own config.json has "train"
        found.insert(0, "config.json")
    return found


def has_keys(path: str, keys: tuple[str, ...]) -> bool:
    """`path` is a JSON object with these keys (an output dpo_ds wrote)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and set(keys) <= set(obj)


def refuse_model_dir(path: str, flag: str) -> None:
    found = model_files(path) if os.path.isdir(path) else []
    if found:
        raise UserError(f"{flag} {path} is a model directory (it holds {', '.join(found[:3])}); dpo_ds never writes "
                        f"into one: give a new directory")


def foreign_entries(path: str, kind: str) -> list[str]:
    """Entries of `path` that are not `kind`'s own output."""
    own = [re.compile(p) for p in OWN[kind]]
    bad = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if PRIVATE.fullmatch(name):
            continue
        if not any(p.fullmatch(name) for p in own):
            bad.append(name)
        elif kind == "prepared data" and name in ("train", "eval"):
            if not os.path.isdir(full) or any(not SPLIT_FILES.fullmatch(n) for n in os.listdir(full)):
                bad.append(name)
    return bad


def claim(path: str, kind: str, flag: str, phase: str) -> None:
    """Make `path` this process's output directory of `kind` (see the module docstring); raises UserError."""
    refuse_model_dir(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it or write there ({e.strerror}); nothing was written: "
                        f"give a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise UserError(f"{flag} {path} is in use by another dpo_ds job ({holder}); wait for it to end, or give "
                        f"another {flag}") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        print(f"warning: {path} is on storage without file locks ({e.strerror}): nothing stops a second job "
              f"from writing there while this one runs", file=sys.stderr)
    bad = foreign_entries(path, kind)
    if bad:
        os.close(fd)
        raise UserError(f"{flag} {path} holds {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}, which is not "
                        f"{kind} of dpo_ds; nothing was changed there: give an empty or new directory")
    holder = f"{phase}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    _held[os.path.realpath(path)] = fd


def release(path: str) -> None:
    fd = _held.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)  # closing drops the lock; the file stays (removing it would race with a new holder)


@contextlib.contextmanager
def owned(path: str, kind: str, flag: str, phase: str):
    """Rank 0 owns `path` for the block (a refusal stops every rank); released however the block ends."""
    dist.on_main(lambda: claim(path, kind, flag, phase))
    try:
        yield
    finally:
        if dist.is_main():
            release(path)


def check_output_file(path: str, flag: str, keys: tuple[str, ...]) -> None:
    """Before any work: `path` may be written (its directory is writable) and replaces nothing but an earlier
    output of the same kind (a JSON object with `keys`), so a long computation never ends in a refusal."""
    if os.path.exists(path) and not has_keys(path, keys):
        raise UserError(f"{flag} {path} exists and is not an earlier output of this command; dpo_ds does not "
                        f"overwrite it: give another path")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dpo_ds_probe.", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); nothing was computed: give a "
                        f"writable path") from None
