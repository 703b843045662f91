"""Small files written so that a crash leaves the old file or the new one, never half of either."""
from __future__ import annotations

import json
import os


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
