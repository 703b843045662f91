"""Errors the user can act on. Phases print them as one `error: ...` line and exit 2, no traceback."""


class UserError(Exception):
    """Something the user must change: a path, a flag, an input row, a stale cache."""


class ConfigError(UserError, ValueError):
    """A setting that is missing, malformed or inconsistent; the message names it."""


class DataError(UserError):
    """A bad input row: the message names the file, the row (or line) and the field."""

    def __init__(self, where: str, field: str | None, reason: str):
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: {'field ' + repr(field) + ': ' if field else ''}{reason}")


class CacheError(UserError):
    """A reference cache that is incomplete, tampered with, or computed from something else."""
