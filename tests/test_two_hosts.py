"""Multi-node for real: two network hosts on this machine (scripts/two_hosts.sh: network namespaces joined by a
veth pair), one rank each, launched the way a cluster user launches them (one launcher per node).
    scripts/test.sh tests/test_two_hosts.py          (needs root and `ip`; skipped without them)
"""
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest
from conftest import ROOT, child_env, free_port, run_module
from test_train import train_args

from dpo_ds import cache as R
from dpo_ds.report.log import read_metrics

HARNESS = os.path.join(ROOT, "scripts", "two_hosts.sh")
pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="two network hosts need root and `ip` (network namespaces)"),
              # one worker, early: they take turns anyway (below), and three workers that reached them last
              # waited on each other's lock at the suite's end (~150 s of a 1,090 s run)
              pytest.mark.xdist_group("two_hosts")]


@pytest.fixture(autouse=True)
def one_harness_at_a_time():
    """scripts/test.sh runs tests in parallel, and assert_clean checks the whole machine: these tests take
    turns, under a lock every pytest process on the machine sees."""
    with open(os.path.join(tempfile.gettempdir(), "dpo_ds-two_hosts.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def deepspeed_node(module, args, port):
    """The command a user types on each node: the deepspeed launcher without ssh, told its node rank."""
    return (f"deepspeed --no_ssh --hostfile $HOSTFILE --node_rank $NODE_RANK --master_addr $MASTER_ADDR "
            f"--master_port {port} --module {module} " + " ".join(map(str, args)))


def torchrun_node(module, args, port):
    return (f"torchrun --nnodes 2 --nproc_per_node 1 --node_rank $NODE_RANK --master_addr $MASTER_ADDR "
            f"--master_port {port} -m {module} " + " ".join(map(str, args)))


def two_hosts(node0, node1=None, env=None, timeout=600):
    """Run the harness; on a timeout it gets SIGTERM first, so its trap removes both hosts before the test fails."""
    t0 = time.time()
    proc = subprocess.Popen(["bash", HARNESS, node0, node1 or node0], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(env))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"two hosts did not finish in {timeout} s:\n{out.decode(errors='replace')[-4000:]}")
    # as bytes: text mode would turn tqdm's \r into line breaks, splitting a line from its [node N] prefix
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"))
    p.seconds = time.time() - t0
    return p


def assert_clean():
    """No namespace, veth or rank of the harness left behind (a rank surviving in a deleted namespace would
    still show up as a process holding the veth's address)."""
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    ranks = subprocess.run(["pgrep", "-f", "MASTER_ADDR=10.231.|--master_addr 10.231.|10.231.[0-9]+.1"],
                           capture_output=True, text=True).stdout
    assert "dpo2h" not in left and "dpo2h" not in links and not ranks.strip(), (left, links, ranks)


def node_lines(p, n):
    return [line for line in p.stdout.split("\n") if line.startswith(f"[node {n}]")]  # split: tqdm's \r stays


def test_precompute_and_evaluate_across_two_hosts_equal_one_host(tiny, prepared, cache, tmp_path):
    """deepspeed launcher per node (precompute) and torchrun per node (evaluate)."""
    out = tmp_path / "cache"
    args = ["--model", tiny[0], "--data", prepared, "--output_dir", out, "--batch_size", 8, "--shard_size", 64]
    p = two_hosts(deepspeed_node("dpo_ds.precompute", args, free_port()))
    assert p.returncode == 0, p.stdout[-4000:]
    assert_clean()
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["stats"]["world_size"] == 2
    assert any(m["file"].startswith("shard-00001-") for m in manifest["splits"]["train"]["shards"]), "node 1 wrote"
    for split in ("train", "eval"):
        ids = R.open_cache(cache, prepared).tables[split].column("example_id").to_numpy()
        one, two = R.open_cache(cache, prepared).values(split, ids), R.open_cache(str(out), prepared).values(split, ids)
        for k in R.REFERENCE_COLUMNS:
            np.testing.assert_allclose(two[k], one[k], rtol=1e-5)
    # node 1 dies mid-run: rerunning the same commands reuses every complete shard and gives the same cache
    dead = tmp_path / "dead"
    slow = ["--model", tiny[0], "--data", prepared, "--output_dir", dead, "--batch_size", 1, "--shard_size", 16]
    cmd = deepspeed_node("dpo_ds.precompute", slow, free_port())
    p = two_hosts(cmd, env={"TWO_HOSTS_KILL_NODE": "1", "TWO_HOSTS_KILL_AFTER": str(dead / "train" / "shard-00001-*.json")})
    assert p.returncode != 0 and not (dead / "manifest.json").exists(), p.stdout[-3000:]
    assert "error: lost contact with another rank" in "\n".join(node_lines(p, 0)), p.stdout[-3000:]
    before = R.complete_shards(str(dead), "train")
    assert before
    p = two_hosts(cmd)
    assert p.returncode == 0 and "resuming" in p.stdout, p.stdout[-3000:]
    for n, meta in before.items():
        assert R.complete_shards(str(dead), "train")[n] == meta, "a complete shard was recomputed"
    ids = R.open_cache(cache, prepared).tables["train"].column("example_id").to_numpy()
    resumed = R.open_cache(str(dead), prepared).values("train", ids)
    for k in R.REFERENCE_COLUMNS:
        np.testing.assert_allclose(resumed[k], R.open_cache(cache, prepared).values("train", ids)[k], rtol=1e-5)
    assert_clean()

    metrics = tmp_path / "eval.json"
    ev = ["--model", tiny[0], "--data", prepared, "--ref_cache", out, "--output", metrics]
    p = two_hosts(torchrun_node("dpo_ds.evaluate", ev, free_port()))
    assert p.returncode == 0, p.stdout[-4000:]
    single = run_module("dpo_ds.evaluate", *ev[:-1], tmp_path / "one.json")
    two, one = json.load(open(metrics)), json.load(open(tmp_path / "one.json"))
    assert single.returncode == 0
    for k in ("loss", "rewards/margins", "logps/chosen", "entropy"):
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    assert_clean()


def test_train_across_two_hosts_equals_one_host_then_survives_a_dead_node(tiny, prepared, cache, tmp_path):
    """ZeRO-3 across two hosts = the same job on one host (2 ranks). Then every process of node 1 is killed
    after the step-2 checkpoint: node 0 stops within seconds with an error naming the lost peer, and the same
    commands rerun resume to the uninterrupted trajectory."""
    one = tmp_path / "one"
    run_module("dpo_ds.train", *train_args(tiny, prepared, cache, one, max_steps=6, save_every=2), launcher=2)
    two = tmp_path / "two"
    cmd = deepspeed_node("dpo_ds.train", train_args(tiny, prepared, cache, two, max_steps=6, save_every=2), free_port())
    p = two_hosts(cmd)
    assert p.returncode == 0, p.stdout[-4000:]
    assert_clean()
    want = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "train"]
    got = [r for r in read_metrics(two / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for a, b in zip(got, want):
        for k in ("loss", "rewards/margins", "grad_norm", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)

    dead = tmp_path / "dead"
    cmd = deepspeed_node("dpo_ds.train", train_args(tiny, prepared, cache, dead, max_steps=6, save_every=2), free_port())
    p = two_hosts(cmd, env={"TWO_HOSTS_KILL_NODE": "1", "TWO_HOSTS_KILL_AFTER": str(dead / "checkpoints" / "latest")})
    assert p.returncode != 0
    assert_clean()
    killed = float(next(line for line in p.stdout.splitlines() if "killed every process of node 1" in line).split()[-1])
    node0_exit = float(next(line for line in p.stdout.splitlines() if "node 0 exited" in line).split()[-1])
    assert node0_exit - killed < 30, f"node 0 took {node0_exit - killed:.1f} s to notice"
    text = "\n".join(node_lines(p, 0))
    assert "error: lost contact with another rank" in text and "rerun the same command" in text, text[-3000:]
    p = two_hosts(cmd)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "resuming at step" in p.stdout
    resumed = [r for r in read_metrics(dead / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
    assert_clean()
    print(f"two hosts: node 0 noticed node 1's death {node0_exit - killed:.2f} s after the kill")


def test_storage_the_nodes_do_not_share_is_refused_on_every_rank(tiny, prepared, cache, tmp_path):
    """Node 1 sees its own empty directory at --output_dir: both ranks stop with one message, no hang, and
    nothing half-written is left where node 0 looks."""
    out = tmp_path / "private"
    cmd = deepspeed_node("dpo_ds.precompute", ["--model", tiny[0], "--data", prepared, "--output_dir", out],
                         free_port())
    p = two_hosts(cmd, env={"TWO_HOSTS_PRIVATE_DIR": str(out)}, timeout=300)
    assert p.returncode != 0 and p.seconds < 120, p.stdout[-3000:]
    for n in (0, 1):  # each rank stops with the message itself
        assert f"error: --output_dir {out} is not on storage every node sees" in "\n".join(node_lines(p, n))
    assert not (out / "plan.json").exists() and not (out / "manifest.json").exists()
    assert_clean()
    data = tmp_path / "data"  # the prepared data on node 0 only: every rank stops, nothing is written
    shutil.copytree(prepared, data)
    out = tmp_path / "shared_out"
    cmd = deepspeed_node("dpo_ds.precompute", ["--model", tiny[0], "--data", data, "--output_dir", out], free_port())
    p = two_hosts(cmd, env={"TWO_HOSTS_PRIVATE_DIR": str(data)}, timeout=300)
    assert p.returncode != 0 and "other rank(s) failed" in "\n".join(node_lines(p, 0)), p.stdout[-3000:]
    assert f"{data}: no prepare_report.json" in "\n".join(node_lines(p, 1)), p.stdout[-3000:]
    assert not (out / "plan.json").exists()
    assert_clean()
    train_out = tmp_path / "train_private"
    cmd = deepspeed_node("dpo_ds.train", train_args(tiny, prepared, cache, train_out), free_port())
    p = two_hosts(cmd, env={"TWO_HOSTS_PRIVATE_DIR": str(train_out)}, timeout=300)
    assert p.returncode != 0, p.stdout[-3000:]
    for n in (0, 1):
        assert f"error: --output_dir {train_out} is not on storage" in "\n".join(node_lines(p, n)), p.stdout[-3000:]
    assert_clean()


def test_a_node_that_never_starts_is_noticed_within_the_timeout(tiny, prepared, cache, tmp_path):
    """Node 1 never launches: node 0 gives up after --dist_timeout_minutes (15 s here) with what to check."""
    cmd = deepspeed_node("dpo_ds.train", train_args(tiny, prepared, cache, tmp_path / "o") +
                         ["--dist_timeout_minutes", "0.25"], free_port())
    p = two_hosts(cmd, "sleep 600", env={"TWO_HOSTS_GRACE": "1"}, timeout=300)
    assert p.returncode != 0 and p.seconds < 60, (p.seconds, p.stdout[-3000:])
    assert "could not form the process group of 2 ranks" in p.stdout and "--dist_timeout_minutes 0.25" in p.stdout
    assert_clean()
