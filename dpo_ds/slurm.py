"""What Slurm tells a process, read here only: a task `srun` started takes its rank, the world and the rendezvous
from the step's SLURM_* variables (dist asks `task_environment` before it reads RANK), and a job submitted with
--requeue is put back in the queue by `requeue` after a stop at a signal.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess


def hostnames(nodelist: str) -> list[str]:
    """A Slurm host list expanded as `scontrol show hostnames` does: 'gpu[01-03,7],login' -> gpu01 gpu02 gpu03
    gpu7 login; several bracket groups in one name multiply ('r[1-2]-n[1-2]': r1-n1 r1-n2 r2-n1 r2-n2)."""
    names = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [text]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    choices += [text + str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1)]
            expanded = [e + c for e in expanded for c in choices]
        names += [e for e in expanded if e]
    return names


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_STEP_TASKS_PER_NODE, '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(n)] * int(times or 1)
    return counts


def task_environment(env) -> str | None:
    """A task srun started (SLURM_STEP_ID and SLURM_PROCID set) with no RANK of its own: RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE from the step's task variables, MASTER_ADDR the step's first host (its address
    from `scontrol show node` when its name does not resolve), MASTER_PORT derived from the job id, the step and
    the job's restart count, so that every task of the step finds the same one and a requeued job, or the next step
    of the script, a fresh one (its predecessor's may still be held); MASTER_ADDR/MASTER_PORT given in the
    environment win. Sets them in `env` -> the line that says so; None outside srun. The batch script itself (no
    step) is not a task: a plain `python -m dpo_ds.train` there runs as one process."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or "RANK" in env:
        return None
    node = int(env.get("SLURM_NODEID", 0))
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", world))
    hosts = hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname())
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=world, LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               LOCAL_WORLD_SIZE=str(per_node[node] if node < len(per_node) else per_node[-1]))
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _address(hosts[0])
    port_from = "given"
    if "MASTER_PORT" not in env:
        job, step, restart = (int(re.sub(r"\D", "", env.get(k, "")) or 0) for k in
                              ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
        env["MASTER_PORT"] = str(20000 + (job + 211 * step + 1009 * restart) % 20000)
        port_from = f"from job {job}, step {step}, start {restart}"
    return (f"dist: srun task {env['RANK']} of {world} (node {node}, local rank {env['LOCAL_RANK']} of "
            f"{env['LOCAL_WORLD_SIZE']}): rendezvous at {env['MASTER_ADDR']}:{env['MASTER_PORT']} (the step's first "
            f"host {hosts[0]}; port {port_from})")


def _address(host: str) -> str:
    """`host` if it resolves here, else its NodeAddr as Slurm knows it."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=30)
        found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        return found.group(1) if found else host
    except (OSError, subprocess.SubprocessError):
        return host


def requeue(env=os.environ) -> str:
    """After a stop at a signal (rank 0, once everything is saved): a Slurm job submitted with --requeue is put back
    in the queue, where it runs its script again and the same command resumes. -> what happens next, in words."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "rerun the same command to resume"
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
        if "Requeue=1" not in shown.stdout.split():
            return f"Slurm job {job} was submitted without --requeue: resubmit it (or rerun the same command) to resume"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"Slurm job {job} could not be requeued ({type(e).__name__}: {e}): resubmit it to resume"
    if done.returncode == 0:
        return f"Slurm job {job} requeued: it resumes there when it runs again"
    if "pending execution" in done.stderr:  # requeued already (scontrol requeue, a preemption): it is ending
        return f"Slurm job {job} is being requeued: it resumes there when it runs again"
    return f"Slurm job {job} could not be requeued ({done.stderr.strip()[:200]}): resubmit it to resume"
