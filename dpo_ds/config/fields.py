"""How a setting is declared (a dataclass field with its default and help) and checked."""
from __future__ import annotations

from dataclasses import field

from dpo_ds.errors import ConfigError


def opt(default, help, choices=None, required=False, resume=False):
    """A setting: its default, its help, and whether a resumed run must keep it (`resume`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "required": required, "resume": resume})


def positive(cfg, *names):
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(cfg, name)}")
