"""Shared fixtures: one tiny model + synthetic data per test session, built locally (no hub)."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from dpo_ds.dist import LAUNCHER_VARIABLES, free_port, run_local_ranks  # noqa: F401  (free_port: for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    in-process suite while developing; CI runs everything), and run them first."""
    starters = {}
    for item in items:
        path = str(item.fspath)
        if path not in starters:
            starters[path] = _process_starters(path) | _process_starters(__file__)
        name = getattr(getattr(item, "function", None), "__name__", "")
        if name in starters[path] or set(getattr(item, "fixturenames", ())) & starters[path]:
            item.add_marker(pytest.mark.integration)
    # the longest first, so that pytest-xdist's workers end on short tests rather than one waiting for another's
    # last long job: the groups (each one worker's, one test after another), then the tests that start processes
    items.sort(key=lambda item: (item.get_closest_marker("xdist_group") is None,
                                 item.get_closest_marker("integration") is None))
    _xdist_groups(config, items)


def _xdist_groups(config, items):
    """pytest-xdist 3.8's --dist loadgroup sends a group's tests to one worker by suffixing their node ids with the
    group's name, through an attribute pytest 9 no longer reads (`_nodeid`; pytest 9.2 keeps `_id`): the groups
    were ignored, and the two SmolLM2 trainings and the Slurm tests ran on two workers at once. The same suffix,
    where pytest 9 reads it (in each worker, as xdist does)."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def once(tmp_path_factory, name: str, make) -> str:
    """The directory `make(path)` fills, made once per test run: with pytest-xdist, by the first worker to ask
    (the others wait for it on a lock and read the same files) in the directory all workers share. For what tests
    only read: the tiny model, its data and cache, reference runs that several tests continue."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "once" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path.parent / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            make(str(path))
            (path.parent / f"{name}.done").touch()
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Qwen3 checkpoint and 240 synthetic preference pairs: (model_dir, prefs.jsonl)."""
    from dpo_ds import tiny as T

    out = once(tmp_path_factory, "tiny", lambda path: T.build(path, num_examples=240, seed=0))
    return os.path.join(out, "model"), os.path.join(out, "prefs.jsonl")


@pytest.fixture(scope="session")
def prepared(tiny, tmp_path_factory):
    """The tiny data prepared with the tiny tokenizer (train 216 / eval 24)."""
    from dpo_ds import config as C
    from dpo_ds import prepare

    model_dir, prefs = tiny
    return once(tmp_path_factory, "prepared", lambda out: prepare.run(
        C.PrepareConfig(dataset=prefs, tokenizer=model_dir, output_dir=out, eval_fraction=0.1)))


def run_module(module, *args, launcher=None, deepspeed=False, check=True, env=None, timeout=600):
    """Run `python -m module args` and return the CompletedProcess. `launcher=N`: on N ranks, each process started
    here and told its rank in its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, as srun, torchrun
    or a hand-started node gives them: README "Several nodes" b); `deepspeed=True`: under `deepspeed --num_gpus N`
    instead (its launcher and launch.py cost each launch ~7 s, so the tests that are about it use it)."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if launcher and deepspeed:
        cmd = ["deepspeed", "--num_gpus", str(launcher), "--master_port", str(free_port()), "--module",
               module, *map(str, args)]
    elif launcher:
        return run_ranks(cmd, launcher, check=check, env=env, timeout=timeout)
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def run_ranks(cmd, n, check=True, env=None, timeout=600, grace=30):
    """`cmd` as ranks 0..n-1 of one job on this host (dpo_ds.dist.run_local_ranks, as `dpo-ds plan` starts its
    probes) -> a CompletedProcess: every rank's output (rank 0's first), and the first non-zero exit status. A rank
    that fails gets the others stopped after `grace` seconds, as the deepspeed launcher stops them."""
    code, texts = run_local_ranks(cmd, n, child_env(env), cwd=ROOT, grace=grace, timeout=timeout)
    p = subprocess.CompletedProcess(cmd, code, "".join(o for o, _ in texts), "".join(e for _, e in texts))
    if check and code != 0:
        raise AssertionError(f"{' '.join(cmd)} on {n} ranks failed ({code}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
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

    return once(tmp_path_factory, "cache", lambda out: precompute.run(
        C.PrecomputeConfig(model=tiny[0], data=prepared, output_dir=out, batch_size=8, shard_size=64)))


@pytest.fixture(scope="session")
def bf16_cache(tiny, prepared, tmp_path_factory):
    """The tiny model's reference cache computed in bf16 (as precompute --dtype auto does on a GPU)."""
    from dpo_ds import config as C
    from dpo_ds import precompute

    return once(tmp_path_factory, "cache_bf16", lambda out: precompute.run(C.PrecomputeConfig(
        model=tiny[0], data=prepared, output_dir=out, batch_size=8, shard_size=64, dtype="bf16")))
