"""The fault matrix: Ctrl-C, SIGTERM, a full disk (a small tmpfs) and read-only storage (a read-only tmpfs), for
prepare, precompute, train and evaluate. Each ends in at most 3 lines of output from `error:` on (which
starts a line), no traceback, a non-zero exit; and a rerun afterwards gives the uninterrupted result.
Mounting needs root (as CI runs); elsewhere the storage faults are skipped.
    scripts/test.sh tests/test_faults.py
"""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from dpo_ds import config as C, evaluate
from dpo_ds.ref_cache import open_cache
from dpo_ds.report import read_metrics
from conftest import ROOT, child_env, run_module

ZERO0 = os.path.join(ROOT, "ds_configs", "zero0_cpu.json")
MiB = 1 << 20


def launch(module, *args, signal_at=None, sig=signal.SIGINT, timeout=300):
    """Run `python -m module args`; with `signal_at`, send `sig` as soon as that text appears in its output
    (progress bars included). -> (exit status, everything it printed, whether the signal was sent)."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    out, sent, deadline = b"", False, time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 1.0)
        chunk = os.read(p.stdout.fileno(), 65536) if ready else b""
        if ready and not chunk:
            break
        out += chunk
        if signal_at and not sent and signal_at.encode() in out:
            p.send_signal(sig)
            sent = True
    else:
        p.kill()
    p.wait()
    return p.returncode, out.decode(errors="replace"), sent


def assert_one_line(rc, out, *expected):
    """The run ended in `error: …` (at the start of a line), at most 3 lines from there, no traceback."""
    assert rc not in (0, None), out[-2000:]
    assert "Traceback" not in out and "[rank0]" not in out, out[-4000:]
    lines = out.rstrip().split("\n")
    first = max(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert len(lines) - first <= 3, lines[first:]
    for text in expected:
        assert text in lines[first], lines[first]
    return lines[first]


@pytest.fixture
def disk(tmp_path):
    """mount(name, size, read_only) -> a fresh tmpfs; all are unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name, size=MiB, read_only=False):
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


def fill(path, leave_bytes):
    """Fill the tmpfs at `path` but `leave_bytes`: -> a function that makes room again."""
    st = os.statvfs(path)
    filler = os.path.join(path, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
    return lambda: os.remove(filler)


def remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


# ---------------------------------------------------------------- prepare

def prepare_args(tiny, out):
    return ["--dataset", tiny[1], "--tokenizer", tiny[0], "--output_dir", out, "--eval_fraction", "0.1"]


def same_prepared(out, prepared):
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    return report["fingerprint"] == json.load(open(os.path.join(prepared, "prepare_report.json")))["fingerprint"]


def test_prepare_faults(tiny, prepared, tmp_path, disk):
    out = tmp_path / "data"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        rc, text, sent = launch("dpo_ds.prepare", *prepare_args(tiny, out), signal_at="tokenize train", sig=sig)
        if sent:  # (a machine fast enough to finish first has nothing to interrupt)
            assert rc == code
            assert_one_line(rc, text, "error: ", "rerun the same command")
    run_module("dpo_ds.prepare", *prepare_args(tiny, out))
    assert same_prepared(out, prepared)
    full = disk("full")
    make_room = fill(full, 8 * 1024)
    rc, text, _ = launch("dpo_ds.prepare", *prepare_args(tiny, full / "data"))
    assert rc == 4
    assert_one_line(rc, text, "error: no space left on the device", "holds no usable data until prepare writes")
    make_room()
    run_module("dpo_ds.prepare", *prepare_args(tiny, full / "data"))
    assert same_prepared(full / "data", prepared)
    ro = disk("ro", read_only=True)
    rc, text, _ = launch("dpo_ds.prepare", *prepare_args(tiny, ro / "data"))
    assert rc == 2
    assert_one_line(rc, text, f"error: --output_dir {ro / 'data'}: cannot create it or write there (Read-only file "
                              f"system); nothing was written")
    remount(ro, "rw")
    run_module("dpo_ds.prepare", *prepare_args(tiny, ro / "data"))
    assert same_prepared(ro / "data", prepared)


# ---------------------------------------------------------------- precompute

def precompute_args(tiny, prepared, out):  # the settings of conftest's `cache`, so the values compare exactly
    return ["--model", tiny[0], "--data", prepared, "--output_dir", out, "--batch_size", 8, "--shard_size", 64]


def same_cache(out, prepared, cache):
    mine, want = open_cache(str(out), prepared), open_cache(cache, prepared)
    for split in want.tables:
        ids = want.tables[split].column("example_id").to_pylist()
        a, b = mine.values(split, ids), want.values(split, ids)
        assert all((a[k] == b[k]).all() for k in b), split
    return True


def test_precompute_faults(tiny, prepared, cache, tmp_path, disk):
    out = tmp_path / "cache"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        rc, text, sent = launch("dpo_ds.precompute", *precompute_args(tiny, prepared, out),
                                signal_at="precompute: layout", sig=sig)
        if sent:
            assert rc == code
            assert_one_line(rc, text, "complete shard(s) in", "are kept; rerun the same command")
    run_module("dpo_ds.precompute", *precompute_args(tiny, prepared, out))
    assert same_cache(out, prepared, cache)
    full = disk("full")
    make_room = fill(full, 20 * 1024)
    rc, text, _ = launch("dpo_ds.precompute", *precompute_args(tiny, prepared, full / "cache"))
    assert rc == 4
    assert_one_line(rc, text, "error: no space left on the device", "are kept; rerun the same command")
    make_room()
    run_module("dpo_ds.precompute", *precompute_args(tiny, prepared, full / "cache"))
    assert same_cache(full / "cache", prepared, cache)
    ro = disk("ro", read_only=True)
    rc, text, _ = launch("dpo_ds.precompute", *precompute_args(tiny, prepared, ro / "cache"))
    assert rc == 2
    assert_one_line(rc, text, "cannot create it or write there (Read-only file system); nothing was written")


# ---------------------------------------------------------------- train

def train_args(tiny, prepared, cache, out):
    return ["--deepspeed", ZERO0, "--model", tiny[0], "--data", prepared, "--ref_cache", cache, "--output_dir", out,
            "--learning_rate", 2e-3, "--warmup_steps", 1, "--micro_batch_size", 2, "--grad_accum", 2,
            "--max_steps", 6, "--log_every", 1, "--eval_every", 3, "--save_every", 2]


def same_run(out, want):
    """The metrics of every step and eval (but the timing) are the uninterrupted run's."""
    got = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(os.path.join(out, "metrics.jsonl"))]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and a["step"] == b["step"] and a["split"] == b["split"]
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    return True


def test_train_faults(tiny, prepared, cache, tmp_path, disk):
    base = tmp_path / "base"
    run_module("dpo_ds.train", *train_args(tiny, prepared, cache, base))
    want = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(base / "metrics.jsonl")]
    out = tmp_path / "run"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        rc, text, sent = launch("dpo_ds.train", *train_args(tiny, prepared, cache, out),
                                signal_at="train: first step done", sig=sig)
        if sent:
            assert rc == code
            assert_one_line(rc, text, "rerun the same command to ")
    run_module("dpo_ds.train", *train_args(tiny, prepared, cache, out))
    assert same_run(out, want)
    # a full disk while the second checkpoint is written (the first fits: ~10 MB each)
    full = disk("full", size=64 * MiB)
    make_room = fill(full, 14 * MiB)
    rc, text, _ = launch("dpo_ds.train", *train_args(tiny, prepared, cache, full / "run"))
    assert rc == 4
    assert_one_line(rc, text, "error: ", "the disk is probably full" if "write failed" in text else "no space left",
                    "the last checkpoint (step-0000002 in", "is intact; rerun the same command to resume it")
    make_room()
    run_module("dpo_ds.train", *train_args(tiny, prepared, cache, full / "run"))
    assert same_run(full / "run", want)
    ro = disk("ro", read_only=True)
    rc, text, _ = launch("dpo_ds.train", *train_args(tiny, prepared, cache, ro / "run"))
    assert rc == 2
    assert_one_line(rc, text, "cannot create it or write there (Read-only file system); nothing was written")


# ---------------------------------------------------------------- evaluate

def test_evaluate_faults(tiny, prepared, cache, tmp_path, disk):
    args = ["--model", tiny[0], "--data", prepared, "--ref_cache", cache, "--split", "train", "--batch_size", 2]
    want = evaluate.run(C.EvalConfig(model=tiny[0], data=prepared, ref_cache=cache, split="train", batch_size=2))
    out = tmp_path / "eval.json"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        rc, text, sent = launch("dpo_ds.evaluate", *args, "--output", out, signal_at="eval (rank 0)", sig=sig)
        if sent:
            assert rc == code
            assert_one_line(rc, text, f"nothing was written to {out}; rerun the same command")
            assert not out.exists()
    run_module("dpo_ds.evaluate", *args, "--output", out)
    assert json.load(open(out)) == pytest.approx(want)
    full = disk("full")
    make_room = fill(full, 0)
    rc, text, _ = launch("dpo_ds.evaluate", *args, "--output", full / "eval.json")
    assert rc == 4
    assert_one_line(rc, text, "error: no space left on the device", "nothing was written")
    make_room()
    run_module("dpo_ds.evaluate", *args, "--output", full / "eval.json")
    assert json.load(open(full / "eval.json")) == pytest.approx(want)
    ro = disk("ro", read_only=True)
    rc, text, _ = launch("dpo_ds.evaluate", *args, "--output", ro / "eval.json")
    assert rc == 2
    assert_one_line(rc, text, f"error: --output {ro / 'eval.json'}: cannot write in {ro} (Read-only file system); "
                              f"nothing was computed")
    # a file that is not an earlier output of evaluate is never overwritten
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    rc, text, _ = launch("dpo_ds.evaluate", *args, "--output", mine)
    assert_one_line(rc, text, "exists and is not an earlier output of this command")
    assert mine.read_text() == '{"mine": 1}'
