"""Small files written so that a crash leaves the old file or the new one, never half of either."""
from __future__ import annotations

import json
import os


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary is left beside the file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(directory: str) -> None:
    """Every file of `directory` on disk (fsync) and readable as the umask allows: some writers (safetensors)
    create theirs 0600, which a team sharing the run's storage could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def atomic_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
