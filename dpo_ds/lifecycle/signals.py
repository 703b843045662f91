"""Stop signals honoured where they cost nothing. A scheduler stops a job with SIGTERM (preemption, scancel,
`scontrol requeue`, the end of a time limit, followed by SIGKILL after its KillWait) and can warn ahead of a time
limit with another signal (Slurm's --signal=USR1@T). A signal is noted, and every rank learns of it at the next
agreement — the step's own reduction (train: with the finiteness check, no extra collective) or `check` (before
the first step, after an eval or a save; per batch in precompute) — so a signal that reached some ranks stops every
rank at the same point. Only SIGTERM outside a phase's work loop (`deferred`) raises Stopped at once: there is
nothing to save yet, and what sends it (scancel, a preemption, a requeue) ends or requeues the job itself; a
warning (SIGUSR1/2) that comes during the start-up is honoured at the loop's first agreement, where the job is
requeued as at any other stop (under `dpo-ds`, also one that comes while the phase still imports its libraries).
"""
from __future__ import annotations

import contextlib
import signal

from dpo_ds import dist
from dpo_ds.errors import ConfigError, Stopped

DEFAULT = ("SIGTERM", "SIGUSR1", "SIGUSR2")
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)  # a scheduler's warning, with time left: never acted on mid-start-up
ALLOWED = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGQUIT")


def parse(names: list | None) -> list[signal.Signals]:
    """--stop_signals: names with or without SIG ('USR1'), 'none' for none; default SIGTERM SIGUSR1 SIGUSR2."""
    if names is None:
        names = list(DEFAULT)
    if [n.lower() for n in names] == ["none"]:
        return []
    full = [n.upper() if n.upper().startswith("SIG") else "SIG" + n.upper() for n in names]
    bad = [n for n in full if n not in ALLOWED]
    if bad:
        raise ConfigError(f"--stop_signals {' '.join(names)}: {', '.join(bad)} cannot stop a run (use some of "
                          f"{', '.join(ALLOWED)}, or none)")
    return [signal.Signals[n] for n in full]


class StopSignals:
    """The stop signals of one phase's process (--stop_signals), handled from construction on."""

    def __init__(self, names: list | None = None):
        self.signals = parse(names)
        self.received = 0  # this rank's first stop signal (its number), 0 for none
        self.agreed = 0    # at the last agreement: the signal every rank stops for (the largest noted), 0 for none
        self._deferring = False
        for s in self.signals:
            signal.signal(s, self._noted)
        self._take_early_warnings()

    def _take_early_warnings(self) -> None:
        """A warning `dpo-ds` noted while the phase started (cli.EARLY_WARNINGS) is this rank's signal; one it is
        not told to stop for gets its default action now, as it would have then."""
        from dpo_ds import cli

        early, cli.EARLY_WARNINGS[:] = list(cli.EARLY_WARNINGS), []
        for s in WARNINGS:
            if s not in self.signals and signal.getsignal(s) == cli.note_warning:
                signal.signal(s, signal.SIG_DFL)
        for s in early:
            if s in self.signals:
                self.received = self.received or s
            else:
                signal.raise_signal(s)

    def _noted(self, signum, frame) -> None:
        self.received = self.received or signum
        if not self._deferring and signum not in WARNINGS:
            raise Stopped(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self):
        """Within: SIGTERM too is noted for the next agreement instead of raising."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def pending(self) -> float:
        """This rank's contribution to an agreement (reduced with max by every rank)."""
        return float(self.received)

    def agree(self, reduced: float) -> int:
        """The reduction's result over every rank -> the signal to stop for (0: go on)."""
        self.agreed = int(reduced)
        return self.agreed

    def check(self) -> int:
        """Collective: agree now."""
        return self.agree(dist.all_reduce([self.pending()], op="max")[0])

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name if self.agreed else ""

    def ignore(self) -> None:
        """The stop is under way: what follows (a requeue's own SIGTERM, the batch script's forwarded one) is
        ignored until the process ends."""
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)
