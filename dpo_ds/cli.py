"""The command line of every phase: flags and job files parsed into a phase's settings (dpo_ds.config), a
phase's main run so that every fault ends in one `error:` line with an exit code, and `dpo-ds`, one command
for every phase (each is also `python -m dpo_ds.<module>`):

    dpo-ds prepare    --dataset ultrafeedback --tokenizer SFT_DIR --output_dir DATA
    dpo-ds precompute --model SFT_DIR --data DATA --output_dir CACHE
    dpo-ds verify     CACHE --data DATA [--model SFT_DIR]
    dpo-ds train      --deepspeed ds_configs/zero3.json --model SFT_DIR --data DATA --ref_cache CACHE --output_dir OUT
    dpo-ds evaluate   --model OUT/final --data DATA --ref_cache CACHE
    dpo-ds report     OUT                                   # redraw OUT/report.png
    dpo-ds plan       --model SFT_DIR --gpus 8 --gpu_memory 80  # will it fit? (or --check OUT)
    dpo-ds tiny       --output_dir DIR                      # the embedded tiny model and data
    dpo-ds --version

On several ranks the launcher runs the same command on each:
    deepspeed --num_gpus 8 --no_python dpo-ds train ...     (or: deepspeed --module dpo_ds.train ...)
`dpo-ds COMMAND --help` lists a command's flags.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import importlib
import json
import os
import signal
import sys
import typing

from dpo_ds.errors import ConfigError, Preempted, Stopped, UserError

# the names TRL and the HF Trainer give the same settings: the flag shown first in --help and accepted in job
# files; the dpo_ds name stays an alias (existing job files, and the config.json of saved runs, use it)
TRL_NAMES = {"micro_batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
             "lr_schedule": "lr_scheduler_type", "log_every": "logging_steps", "eval_every": "eval_steps",
             "save_every": "save_steps", "f_divergence": "f_divergence_type", "f_alpha": "f_alpha_divergence_coef",
             "model": "model_name_or_path", "dataset": "dataset_name", "num_proc": "dataset_num_proc",
             "packing": "padding_free"}
FROM_TRL = {trl: name for name, trl in TRL_NAMES.items()}
EXCLUSIVE = (("max_steps", "num_train_epochs"), ("warmup_steps", "warmup_ratio"))  # two ways to give one setting


def _kind(tp):
    """The plain type a field's annotation stands for: int, float, str, bool or list."""
    tp = typing.get_origin(tp) or tp
    return {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(
        tp if isinstance(tp, str) else tp.__name__, str)


def _help(f) -> str:
    meta = f.metadata
    if meta["required"]:
        return f"{meta['help']} (required)"
    if f.default is None or "default:" in meta["help"] or f.name == "local_rank":
        return meta["help"]
    shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
    return f"{meta['help']} (default: {shown})"


def build_parser(cls, prog=None, doc=None) -> argparse.ArgumentParser:
    """Flags from the dataclass: `doc` (the phase module's docstring: what it does, the command) as the
    description, required flags listed first and marked, every default shown."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("required")
    optional = parser.add_argument_group("options")
    for f in dataclasses.fields(cls):
        kind, meta = _kind(f.type), f.metadata
        kw = dict(dest=f.name, help=_help(f), default=argparse.SUPPRESS)
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kw["nargs"] = "+"
            kw["metavar"] = f.name.upper()
        else:
            kw["type"] = kind
            kw["choices"] = meta["choices"]
            kw["metavar"] = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else f.name.upper()
        if f.name == "local_rank":
            kw["help"] = argparse.SUPPRESS
        names = ([f"--{TRL_NAMES[f.name]}"] if f.name in TRL_NAMES else []) + [f"--{f.name}"] + \
            ([f"--{f.name.replace('_', '-')}"] if f.name == "local_rank" else [])
        (required if meta["required"] else optional).add_argument(*names, **kw)
    return parser


def parse(cls, argv=None, prog=None, doc=None):
    """Defaults, then the `--config` JSON job file (if the class has one), then flags; then `check()`."""
    args = vars(build_parser(cls, prog, doc).parse_args(argv))
    job = load_job_file(cls, args["config"]) if args.get("config") else {}
    gives = lambda src, key: src.get(key) not in (None, -1)  # noqa: E731 - TRL's max_steps -1: not given
    for a, b in EXCLUSIVE:  # one source may not give both; a flag's way replaces the job file's other way
        for src in (job, args):
            if gives(src, a) and gives(src, b):
                raise ConfigError(f"--{a} and --{b} give the same setting two ways; give one")
        for one, other in ((a, b), (b, a)):
            if gives(args, one):
                job.pop(other, None)
    cfg = cls(**{**job, **args})
    missing = [f"--{f.name}" for f in dataclasses.fields(cls)
               if f.metadata["required"] and getattr(cfg, f.name) in (None, "")]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def load_job_file(cls, path):
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
    known = {f.name: _kind(f.type) for f in dataclasses.fields(cls)}
    both = [k for k in values if k in FROM_TRL and FROM_TRL[k] in values]
    if both:
        raise ConfigError(f"--config {path}: {both[0]} and {FROM_TRL[both[0]]} name one setting; give one")
    values = {FROM_TRL.get(k, k) if FROM_TRL.get(k) in known else k: v for k, v in values.items()}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        kind = known[key]
        ok = value is None or isinstance(value, kind) or (kind is float and isinstance(value, int)) or \
            (key in ("loss_type", "report_to") and isinstance(value, str))
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
    values.pop("config", None)
    return values


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


# what a phase leaves intact after a fault, and what to run next: set by the phase once it knows its output
_after_fault = [lambda: "rerun the same command"]


def on_fault(describe) -> None:
    """`describe()` -> what is intact and what to run next, for the `error:` line of an interrupted phase."""
    _after_fault[0] = describe


def _after() -> str:
    try:
        return _after_fault[0]()
    except Exception:  # noqa: BLE001 - the message of a fault must not fail in turn
        return "rerun the same command"


# errno values of storage faults: told in one line (what failed, where), never as a traceback
STORAGE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def storage_fault(e: BaseException) -> str | None:
    """The one-line description of a storage fault, or None. torch.save reports a full disk as a
    RuntimeError of its stream writer ("unexpected pos ...", "file write failed"): errno is then unknown."""
    if isinstance(e, OSError) and e.errno in STORAGE:
        where = f" ({e.filename})" if e.filename else ""
        return f"{STORAGE[e.errno]}{where}"
    if isinstance(e, RuntimeError) and any(m in str(e) for m in ("unexpected pos", "file write failed",
                                                                  "PytorchStreamWriter failed")):
        return f"a write failed ({str(e).splitlines()[0][:120]}): the disk is probably full"
    return None


def _close_progress_bars() -> None:
    """An interrupted loop leaves its tqdm bar mid-line: closed, it ends its line showing where it stopped, so
    the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.leave = True  # a transient bar (leave=False) would be erased without ending its line
        bar.close()


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped at a signal with everything done so far kept; the same command resumes


def main_guard(fn):
    """Run a phase's main so that it ends in one `error:` line, never a traceback, for what the user can act on:
    a setting or input (exit 2), a lost peer rank (3), a storage fault (4), a stop at a signal after saving (75),
    Ctrl-C (130) or a stop signal with nothing to save (128 + the signal: SIGTERM 143)."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        fn()
    except UserError as e:
        _fail(str(e), 2)
    except Preempted as e:
        _fail(str(e), EXIT_STOPPED)
    except (KeyboardInterrupt, Stopped) as e:
        ctrl_c = isinstance(e, KeyboardInterrupt)
        print(flush=True)  # a signal lands anywhere, also between a print's text and its newline
        name = "SIGINT" if ctrl_c else e.signal_name
        _fail(f"{'interrupted (Ctrl-C)' if ctrl_c else 'stopped by ' + name}; {_after()}",
              130 if ctrl_c else 128 + signal.Signals[name].value)
    except (OSError, RuntimeError) as e:  # (no torch import here: torch.distributed's errors are RuntimeErrors)
        fault = storage_fault(e)
        if fault:
            _fail(f"{fault}; {_after()}", 4)
        if not any(m in str(e) for m in LOST_PEER):
            raise
        _fail(f"lost contact with another rank ({str(e).splitlines()[0]}). Its node died or was stopped; rerun the "
              f"same command on every node: train resumes from its last checkpoint, precompute reuses the "
              f"complete shards", 3)
    _exit(0)


def _fail(message: str, code: int) -> None:
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    _exit(code)


def _exit(code: int) -> None:
    """End a phase's process: exit handlers run (the libraries' own), output is flushed,
    then the process ends without interpreter finalization. Left to finalization, a finished rank was seen to
    abort in the process group's C++ teardown ("terminate called without an active exception", exit -6; 2 of
    4 full test runs on 2026-11-25, each time after the rank's work was written)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# what gloo says when a peer's connection closes or a collective times out (NCCL's watchdog aborts the
# process itself)
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "gloo/transport")
# a scheduler's warning (SIGUSR1/2, time left) that comes while train or precompute still imports its libraries
# (seconds, longer on a busy node): noted here for the phase's stop signals (lifecycle/signals.py) to take over, not
# left to the default action, which would end the process before it could save anything
EARLY_WARNINGS: list[int] = []
STOPPABLE = ("train", "precompute")


def note_warning(signum, frame) -> None:
    EARLY_WARNINGS.append(signum)


COMMANDS = {"prepare": "dpo_ds.prepare", "precompute": "dpo_ds.precompute", "verify": "dpo_ds.verify",
            "train": "dpo_ds.train", "evaluate": "dpo_ds.evaluate", "report": "dpo_ds.report.plot", "tiny": "dpo_ds.tiny",
            "plan": "dpo_ds.plan"}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dpo_ds")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N before the script's own arguments: the phases take it anywhere
    command = next((a for a in argv if not a.startswith("-")), None)
    if "--version" in argv and command is None:
        print(f"dpo-ds {version()}")
        return
    if command not in COMMANDS:
        print(__doc__, file=sys.stderr if command else sys.stdout)
        if command:
            print(f"error: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2 if command else 0)
    at = argv.index(command)
    rest = argv[:at] + argv[at + 1:]
    sys.argv[0] = f"dpo-ds {command}"
    if command in STOPPABLE:
        for s in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, note_warning)
    module = importlib.import_module(COMMANDS[command])
    module.main(rest)


if __name__ == "__main__":  # python -m dpo_ds.cli: the module the phases import (its EARLY_WARNINGS), not a copy
    from dpo_ds.cli import main as dpo_ds_main

    dpo_ds_main()
