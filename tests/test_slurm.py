"""Clusters as they are run, for real: a Slurm cluster on loopback (tests/slurm_cluster.py starts slurmctld,
slurmd and munged here and stops them by PID), the shipped job scripts (scripts/slurm/) submitted as a user submits
them with the CPU settings swapped in (no GPUs, 2 tasks, gloo, zero3_cpu.json), preemption, requeue, time limits.
    scripts/test.sh tests/test_slurm.py          (needs root; Slurm is installed with apt-get when missing)
"""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, child_env, run_module
from slurm_cluster import slurm_or_skip
from test_elastic import args, same_trajectory, zero3_whole  # noqa: F401  (zero3_whole: a fixture)

from dpo_ds import cache as R
from dpo_ds.report.log import read_metrics

SBATCH = os.path.join(ROOT, "scripts", "slurm", "dpo.sbatch")
SUBMIT = os.path.join(ROOT, "scripts", "slurm", "submit.sh")
CPU = ["--gpus-per-node=0", "--ntasks-per-node=2"]  # what a GPU node's sbatch options become here
pytestmark = pytest.mark.xdist_group("slurm")  # one cluster, its jobs one after another on one worker


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster: one node of 2 CPUs; 30 s from a job's SIGTERM to its SIGKILL (Slurm's default KillWait)."""
    cluster = slurm_or_skip(tmp_path_factory, kill_wait=30)
    yield cluster
    cluster.stop()


def env_of(slurm) -> dict:
    """What a job's processes inherit from sbatch: this checkout and its venv, the cluster's SLURM_CONF."""
    return slurm.environ(child_env())


def without(flags: list, *names: str) -> list:
    """`flags` (as test_train.train_args makes them) less the named ones and their values."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f.lstrip("-") in names:
            skip = True
        else:
            out.append(f)
    return out


def submit(slurm, cwd, *sbatch_args, phase_args) -> str:
    """scripts/slurm/dpo.sbatch submitted from `cwd` (its log: cwd/%x-%j.out) -> the job id."""
    return slurm.sbatch(*CPU, *sbatch_args, SBATCH, *map(str, phase_args), env=env_of(slurm), cwd=cwd)


def job_ids(printed: str) -> tuple[str, str]:
    """The precompute and train job ids scripts/slurm/submit.sh printed."""
    return re.search(r"precompute: job (\d+)", printed).group(1), re.search(r"train: job (\d+)", printed).group(1)


def log_of(cwd, name: str, job: str) -> str:
    with open(os.path.join(cwd, f"{name}-{job}.out")) as f:
        return f.read()


def wait_for(ready, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def requeue_and_wait(slurm, job: str):
    """scontrol requeue, then let the requeued job start at once (Slurm holds it cred_expire seconds) and finish."""
    slurm.run(["scontrol", "requeue", job])
    slurm.wait_job(job, "PENDING", timeout=120)
    slurm.start_now(job)
    return slurm.wait_job(job, timeout=600)


def same_values(a: str, b: str, prepared: str) -> None:
    """Two caches of the same computation: every value bitwise equal."""
    mine, want = R.open_cache(a, prepared), R.open_cache(b, prepared)
    for split in want.tables:
        ids = want.tables[split].column("example_id").to_numpy()
        x, y = mine.values(split, ids), want.values(split, ids)
        for k in R.REFERENCE_COLUMNS:
            assert np.array_equal(x[k], y[k]), (split, k)


def test_the_two_phase_job_equals_the_same_job_under_the_deepspeed_launcher(slurm, tiny, prepared, cache, zero3_whole,
                                                                               tmp_path):
    """scripts/slurm/submit.sh: precompute (2 tasks), then train after it (--dependency=afterok): the cache equals the
    same precompute under the deepspeed launcher value for value, the training its 12 steps to 1e-5."""
    flags = ["--batch_size", 8, "--shard_size", 64]
    run_module("dpo_ds.precompute", "--model", tiny[0], "--data", prepared, "--output_dir", tmp_path / "launcher",
               *flags, launcher=2, deepspeed=True)
    train = without(args(tiny, prepared, cache, "x", save_every=4), "model", "data", "ref_cache", "output_dir")
    p = slurm.run(["bash", SUBMIT, "--gpus-per-node", "0", "--tasks-per-node", "2", "--model", tiny[0], "--data",
                   prepared, "--ref_cache", tmp_path / "cache", "--output_dir", tmp_path / "run",
                   *[x for f in flags for x in ("--precompute", str(f))], "--", *train],
                  env=env_of(slurm), cwd=tmp_path)
    first, second = job_ids(p.stdout)
    assert f"starts when job {first} has succeeded, cancelled if it fails" in p.stdout, p.stdout
    for job, name in ((first, "dpo-precompute"), (second, "dpo-train")):
        info = slurm.wait_job(job, timeout=600)
        assert info["JobState"] == "COMPLETED", (info, log_of(tmp_path, name, job)[-3000:])
    log = log_of(tmp_path, "dpo-precompute", first)
    assert "dist: srun task 0 of 2 (node 0, local rank 0 of 2): rendezvous at" in log, log[-2000:]
    same_values(str(tmp_path / "cache"), str(tmp_path / "launcher"), prepared)
    same_trajectory(zero3_whole, tmp_path / "run", 1)


def test_a_requeued_training_job_saves_at_the_signal_and_ends_as_the_uninterrupted_run(
        slurm, tiny, prepared, cache, zero3_whole, tmp_path):
    """`scontrol requeue` mid-run: Slurm's SIGTERM reaches every rank, which save at the next step boundary (exit
    75); the requeued job resumes there and ends with the uninterrupted run's metrics and weights. No step is
    computed twice: the run resumes at the step it saved at the signal."""
    out = tmp_path / "run"
    job = submit(slurm, tmp_path, "-J", "dpo-train", phase_args=["train", *args(tiny, prepared, cache, out, save_every=0)])
    wait_for(lambda: any(r["split"] == "train" and r["step"] >= 2 for r in read_metrics(out / "metrics.jsonl")),
             "second step")
    info = requeue_and_wait(slurm, job)
    log = log_of(tmp_path, "dpo-train", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    saved = re.search(r"error: stopped by SIGTERM after step (\d+): checkpoint step-(\d+) saved in \S+; Slurm job "
                      rf"{job} is being requeued: it resumes there when it runs again", log)
    assert saved and saved.group(1) == str(int(saved.group(2))), log[-3000:]
    step = int(saved.group(1))
    assert 2 <= step < 12 and f"train: resuming at step {step};" in log, log[-3000:]
    assert "dpo-ds train exited 75" in log and "start 1:" in log
    same_trajectory(zero3_whole, out, 1)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"] == list(range(1, 13))


def test_a_requeued_precompute_job_keeps_its_shards_and_ends_with_the_same_cache(slurm, tiny, prepared, tmp_path):
    """`scontrol requeue` while precompute writes its shards: it stops at the next batch, keeps every complete shard,
    and the requeued job computes the rest: the cache equals an uninterrupted one value for value."""
    flags = ["--model", tiny[0], "--data", prepared, "--batch_size", 1, "--shard_size", 8]
    run_module("dpo_ds.precompute", *flags, "--output_dir", tmp_path / "whole", launcher=2)
    out = tmp_path / "cache"
    job = submit(slurm, tmp_path, "-J", "dpo-precompute", phase_args=["precompute", *flags, "--output_dir", out])
    wait_for(lambda: len(list((out / "train").glob("shard-*.json"))) >= 2 if (out / "train").is_dir() else False,
             "two complete shards")
    info = requeue_and_wait(slurm, job)
    log = log_of(tmp_path, "dpo-precompute", job)
    assert info["JobState"] == "COMPLETED", (info, log[-3000:])
    stopped = re.search(r"error: stopped by SIGTERM \(the shard in flight discarded\): the (\d+) complete shard\(s\) "
                        rf"in \S+ are kept; Slurm job {job} is being requeued", log)
    assert stopped and int(stopped.group(1)) >= 2, log[-3000:]
    assert f"precompute: resuming {out}" in log, log[-3000:]
    same_values(str(out), str(tmp_path / "whole"), prepared)


def test_a_time_limit_ends_a_run_with_a_checkpoint_and_a_resubmission_continues_it(slurm, tiny, prepared, cache,
                                                                                  tmp_path):
    """--time=2 with --signal=B:USR1@45 (the template's signal, nearer): Slurm checks limits every 30 s, so the
    warning comes 45-75 s before the limit, 45-75 s after the start, after the start-up; the batch script passes
    SIGUSR1 on, the ranks save at the next step boundary and stop (exit 75; submitted with --no-requeue, they say to
    resubmit); the same submission resumes from that checkpoint, and scancel's SIGTERM stops that one with a
    checkpoint too. One task (it trains until the warning, 45-75 s: CPU the suite does not have twice); the ranks'
    agreement on a signal is the requeue tests'."""
    out = tmp_path / "run"
    train = ["train", *args(tiny, prepared, cache, out, max_steps=100000, save_every=0, log_every=50)]
    one = "--ntasks-per-node=1"
    job = submit(slurm, tmp_path, "-J", "dpo-train", one, "--time=2", "--signal=B:USR1@45", "--no-requeue",
                 phase_args=train)
    info = slurm.wait_job(job, timeout=200)
    log = log_of(tmp_path, "dpo-train", job)
    saved = re.search(r"error: stopped by SIGUSR1 after step (\d+): checkpoint step-\d+ saved in \S+; Slurm job "
                      rf"{job} was submitted without --requeue: resubmit it \(or rerun the same command\) to resume", log)
    assert saved and info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log[-3000:])
    step = int(saved.group(1))
    again = submit(slurm, tmp_path, "-J", "dpo-train", one, "--no-requeue", phase_args=train)
    wait_for(lambda: os.path.isfile(tmp_path / f"dpo-train-{again}.out") and
             f"resuming at step {step};" in log_of(tmp_path, "dpo-train", again), "the resumed start", timeout=200)
    slurm.run(["scancel", again])  # scancel's SIGTERM is a stop too: it saves again
    slurm.wait_job(again, timeout=120)
    assert re.search(r"error: stopped by SIGTERM after step \d+: checkpoint", log_of(tmp_path, "dpo-train", again))


def test_a_failing_precompute_leaves_the_train_job_unrun_and_says_why(slurm, tiny, tmp_path):
    p = slurm.run(["bash", SUBMIT, "--gpus-per-node", "0", "--tasks-per-node", "2", "--model", tiny[0], "--data",
                   tmp_path / "missing", "--ref_cache", tmp_path / "cache", "--output_dir", tmp_path / "run"],
                  env=env_of(slurm), cwd=tmp_path)
    first, second = job_ids(p.stdout)
    info = slurm.wait_job(first, timeout=300)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    train = slurm.wait_job(second, timeout=60)
    assert train["JobState"] == "CANCELLED" and train["Reason"] == "DependencyNeverSatisfied", train
    assert not os.path.exists(tmp_path / f"dpo-train-{second}.out") and not (tmp_path / "run").exists()
    assert f"error: {tmp_path / 'missing'}: no prepare_report.json" in log_of(tmp_path, "dpo-precompute", first)


def test_two_nodes_in_two_network_namespaces_equal_one_node(tiny, prepared, cache, zero3_whole, tmp_path_factory,
                                                            tmp_path):
    """Two slurmd, each in a network namespace of its own (two hosts, as scripts/two_hosts.sh builds them), one
    cluster: a 2-node job, one task per node, meets at the first node's NodeAddr (its name resolves nowhere: dpo_ds
    asks `scontrol show node`) and trains the 12 steps of the one-node run (1e-5)."""
    cluster = slurm_or_skip(tmp_path_factory, nodes=2, cpus=1, netns=True, kill_wait=30)
    try:
        out = tmp_path / "run"
        env = {**env_of(cluster), "GLOO_SOCKET_IFNAME": cluster.ifname}  # gloo: the interface the nodes share
        job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "-J", "dpo-train", SBATCH,
                             "train", *map(str, args(tiny, prepared, cache, out)), env=env, cwd=tmp_path)
        info = cluster.wait_job(job, timeout=600)
        log = log_of(tmp_path, "dpo-train", job)
        assert info["JobState"] == "COMPLETED", (info, log[-3000:])
        assert (f"dist: srun task 0 of 2 (node 0, local rank 0 of 1): rendezvous at {cluster.node_addrs[0]}:"
                f"{20000 + int(job) % 20000} (the step's first host {cluster.nodes[0]}; port from job {job}, step 0, "
                f"start 0)") in log
        same_trajectory(zero3_whole, out, 1)
    finally:
        cluster.stop()


# ---------------------------------------------------------------- without a cluster

def test_a_task_takes_its_rank_and_rendezvous_from_the_step():
    from dpo_ds.slurm import hostnames, task_environment, tasks_per_node

    assert hostnames("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert hostnames("r[1-2]-n[08-09]") == ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]
    assert hostnames("c[9-11]") == ["c9", "c10", "c11"] and hostnames("localhost") == ["localhost"]
    assert tasks_per_node("8(x3),4") == [8, 8, 8, 4] and tasks_per_node("2") == [2]
    step = {"SLURM_JOB_ID": "4812", "SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "localhost,gpu02"}
    env = dict(step)
    line = task_environment(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} \
        == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "localhost",
            "MASTER_PORT": "24812"}
    assert line == ("dist: srun task 9 of 16 (node 1, local rank 1 of 8): rendezvous at localhost:24812 (the step's "
                    "first host localhost; port from job 4812, step 0, start 0)")
    requeued = {**step, "SLURM_STEP_ID": "1", "SLURM_RESTART_COUNT": "2"}  # a fresh port: the last may be held
    task_environment(requeued)
    assert requeued["MASTER_PORT"] == str(20000 + (4812 + 211 + 2 * 1009) % 20000)
    given = {**step, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29500"}  # what the environment says wins
    assert "rendezvous at 10.0.0.9:29500" in task_environment(given) and "port given" in task_environment(
        {**step, "MASTER_PORT": "29500"})
    assert task_environment({**step, "RANK": "3"}) is None  # a launcher's (torchrun, deepspeed) ranks win
    assert task_environment({k: v for k, v in step.items() if k != "SLURM_STEP_ID"}) is None  # the batch script


def test_stop_signals_stop_at_once_outside_the_loop_and_are_agreed_inside(monkeypatch):
    from dpo_ds.errors import ConfigError, Stopped
    from dpo_ds.lifecycle.signals import StopSignals, parse

    assert parse(None) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2] and parse(["none"]) == []
    assert parse(["usr1", "SIGHUP"]) == [signal.SIGUSR1, signal.SIGHUP]
    with pytest.raises(ConfigError, match="SIGKILL cannot stop a run"):
        parse(["KILL"])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop = StopSignals(["TERM", "USR1", "USR2"])
        with pytest.raises(Stopped) as stopped:  # SIGTERM in the start-up: at once, nothing to save yet
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.signal_name == "SIGTERM"
        stop.received = 0
        signal.raise_signal(signal.SIGUSR2)  # a warning in the start-up: honoured at the loop's first agreement
        assert stop.pending() == signal.SIGUSR2 and stop.check() == signal.SIGUSR2
        stop.received = stop.agreed = 0
        with stop.deferred():
            signal.raise_signal(signal.SIGUSR1)  # noted, not raised
            assert stop.pending() == signal.SIGUSR1 and stop.agreed == 0
            assert stop.check() == signal.SIGUSR1 and stop.name == "SIGUSR1"  # one rank: its own
        stop.ignore()
        signal.raise_signal(signal.SIGUSR1)  # the stop is under way: ignored
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_warning_while_dpo_ds_imports_is_the_phases_stop(tiny, prepared, cache, tmp_path):
    """`dpo-ds train` notes SIGUSR1/2 from its first line (its imports take seconds, longer on a busy node; the
    default action would end the process): the phase's stop signals take the warning over and honour it at the
    loop's first agreement; one it is told not to stop for (--stop_signals) gets its default action then."""
    def warned(out, *flags):
        p = subprocess.Popen([sys.executable, "-m", "dpo_ds.cli", "train", *map(str, args(tiny, prepared, cache, out)),
                              *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env=child_env())
        caught = lambda: int(re.search(r"SigCgt:\s*(\w+)", open(f"/proc/{p.pid}/status").read()).group(1), 16)  # noqa
        wait_for(lambda: caught() & (1 << (signal.SIGUSR1 - 1)), "dpo-ds's handler", timeout=30)
        os.kill(p.pid, signal.SIGUSR1)  # dpo_ds.train and its libraries are still being imported
        out, _ = p.communicate(timeout=300)
        return p.returncode, out

    code, out = warned(tmp_path / "warned")
    assert code == 75 and "error: stopped by SIGUSR1 before its first step" in out, (code, out[-3000:])
    code, out = warned(tmp_path / "not_a_stop", "--stop_signals", "TERM")
    assert code == -signal.SIGUSR1 and "train: starting" not in out, (code, out[-3000:])


def test_plan_says_what_a_checkpoint_writes(tiny, zero3_whole):
    """The planner's checkpoint size (what a stop signal's lead time must cover) against one the run wrote."""
    from dpo_ds import plan
    from dpo_ds.plan import footprint as F

    cfg = plan.PlanConfig(model=tiny[0], deepspeed=os.path.join(ROOT, "ds_configs", "zero3_cpu.json"), gpus=2)
    ds = F.read_ds(cfg.deepspeed)
    got = F.checkpoint(F.Shape.of(tiny[0], plan.threshold(ds)), plan.job_of(cfg, ds, True, 0))
    folder = zero3_whole / "checkpoints" / "step-0000012"
    written = sum(f.stat().st_size for f in folder.glob("*optim_states.pt"))  # the weights and moments
    busiest = max(f.stat().st_size for f in folder.glob("*optim_states.pt"))
    assert 0.9 < got["bytes"] / written < 1.1 and 0.9 < got["busiest_rank_bytes"] / busiest < 1.1, (got, written)
