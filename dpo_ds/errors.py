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

    def __reduce__(self):  # from a worker process (prepare --dataset_num_proc): its three arguments, not the message
        return type(self), (self.where, self.field, self.reason)


class CacheError(UserError):
    """A reference cache that is incomplete, tampered with, or computed from something else."""


class Stopped(BaseException):
    """A stop signal (SIGTERM: a scheduler's preemption, `kill`; SIGUSR1/2: a time limit's warning) that arrived
    where there is nothing to save, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signal_name: str = "SIGTERM"):
        super().__init__(signal_name)
        self.signal_name = signal_name


class Preempted(Exception):
    """A run stopped at a signal after saving what it had done: the message says which signal, what was saved and
    how it resumes (exit status 75, the same command continues it)."""
