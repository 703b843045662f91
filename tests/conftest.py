"""Shared fixtures: one tiny model + synthetic data per test session, built locally (no hub)."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from dpo_ds.dist import LAUNCHER_VARIABLES, free_port  # noqa: F401  (free_port: for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_*"


# what makes a test an integration test: it starts processes (a launcher, the demo, two hosts, a subprocess)
STARTS_PROCESSES = re.compile(r"\b(run_module|subprocess|Popen|two_hosts|launcher|demo\.sh)\b")


def _process_starters(path: str) -> set[str]:
    """The module's functions (tests, helpers, fixtures) that start processes, directly or through another."""
    tree = ast.parse(open(path).read())
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    starters = {name for name, f in funcs.items() if STARTS_PROCESSES.search(ast.unparse(f))}
    while True:
        more = {name for name, f in funcs.items() if name not in starters and any(
            isinstance(n, ast.Name) and n.id in starters for n in ast.walk(f))}
        more |= {name for name, f in funcs.items() if name not in starters and  # fixtures it takes
                 {a.arg for a in f.args.args} & starters}
        if not more:
            return starters
        starters |= more


def pytest_collection_modifyitems(config, items):
    """Mark the tests that start processes `integration` (scripts/test.sh -m "not integration": the quick
    in-process suite while developing; CI runs everything)."""
    starters = {}
    for item in items:
        path = str(item.fspath)
        if path not in starters:
            starters[path] = _process_starters(path) | _process_starters(__file__)
        name = getattr(getattr(item, "function", None), "__name__", "")
        if name in starters[path] or set(getattr(item, "fixturenames", ())) & starters[path]:
            item.add_marker(pytest.mark.integration)


def pytest_sessionstart(session):
    session.shm_before = set(glob.glob(SHM_BUFFERS))


def pytest_sessionfinish(session):
    """Ranks killed on purpose (the SIGKILL tests) cannot remove their DeepSpeed all-reduce buffer at exit
    (engine.models.remove_shm_buffer): remove every buffer this session created, 69 MB of RAM each. Only in the
    process that ends last (pytest-xdist's controller, or pytest itself without it): a worker that finished
    early would remove the buffer of a job another worker is still running."""
    if hasattr(session.config, "workerinput"):
        return
    for path in set(glob.glob(SHM_BUFFERS)) - session.shm_before:
        try:
            os.remove(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Qwen3 checkpoint and 240 synthetic preference pairs: (model_dir, prefs.jsonl)."""
    from dpo_ds import tiny as T

    out = tmp_path_factory.mktemp("tiny")
    model_dir = T.build(str(out), num_examples=240, seed=0)
    return model_dir, str(out / "prefs.jsonl")


@pytest.fixture(scope="session")
def prepared(tiny, tmp_path_factory):
    """The tiny data prepared with the tiny tokenizer (train 216 / eval 24)."""
    from dpo_ds import config as C
    from dpo_ds import prepare

    out = str(tmp_path_factory.mktemp("prepared"))
    model_dir, prefs = tiny
    prepare.run(C.PrepareConfig(dataset=prefs, tokenizer=model_dir, output_dir=out, eval_fraction=0.1))
    return out


def run_module(module, *args, launcher=None, check=True, env=None, timeout=600):
    """Run `python -m module args` (or under `deepspeed --num_gpus N`) and return the CompletedProcess."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if launcher:
        cmd = ["deepspeed", "--num_gpus", str(launcher), "--master_port", str(free_port()), "--module",
               module, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def child_env(extra=None) -> dict:
    """The environment for a child process: this checkout importable, the venv's launchers on PATH, and none
    of the launcher's variables (an in-process phase may have set up a one-rank group a child must not join)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update({"PYTHONPATH": ROOT, **(extra or {})})
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


@pytest.fixture(scope="session")
def cache(tiny, prepared, tmp_path_factory):
    """The reference cache of the tiny model over the prepared tiny data (one process)."""
    from dpo_ds import config as C
    from dpo_ds import precompute

    out = str(tmp_path_factory.mktemp("cache") / "c")
    precompute.run(C.PrecomputeConfig(model=tiny[0], data=prepared, output_dir=out, batch_size=8, shard_size=64))
    return out
