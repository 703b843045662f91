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
from conftest import ROOT, child_env, run_module

from dpo_ds import config as C
from dpo_ds import evaluate
from dpo_ds.cache.read import open_cache
from dpo_ds.report.log import read_metrics

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
    """The run ended in `error: …` (at the start of a line as a terminal shows it), at most 3 lines from there,
    no traceback."""
    assert rc not in (0, None), out[-2000:]
    assert "Traceback" not in out and "[rank0]" not in out, out[-4000:]
    # what a terminal shows of each line: the text after its last carriage return (a progress bar that erased
    # itself, as transient bars do, leaves "\r   \r" before the next text)
    lines = [line.split("\r")[-1] for line in out.rstrip().split("\n")]
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


def interrupted_then_full(module, args, marker, disk_dir, leave_bytes, *expected, term=143):
    """On one output directory of a tmpfs: SIGINT, then SIGTERM (each at `marker`), then a run on a disk full
    but `leave_bytes`: each ends in one line with `expected` in it. -> a function that makes room again. `term`:
    the exit status of SIGTERM there (75 where the phase saves what it did and stops: train's loop, precompute's)."""
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, term)):
        rc, text, sent = launch(module, *args, signal_at=marker, sig=sig)
        if sent:  # (a machine fast enough to finish first has nothing to interrupt)
            assert rc == code
            assert_one_line(rc, text, *expected)
    make_room = fill(disk_dir, leave_bytes)
    rc, text, _ = launch(module, *args)
    assert rc == 4
    assert_one_line(rc, text, "error: ", "no space left" if "write failed" not in text else "disk is probably full",
                    *expected)
    return make_room


def read_only(disk_dir, module, args, *expected):
    remount(disk_dir, "ro")
    rc, text, _ = launch(module, *args)
    assert rc == 2
    assert_one_line(rc, text, *expected)


# ---------------------------------------------------------------- prepare

def prepare_args(tiny, out):
    return ["--dataset", tiny[1], "--tokenizer", tiny[0], "--output_dir", out, "--eval_fraction", "0.1"]


def same_prepared(out, prepared):
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    return report["fingerprint"] == json.load(open(os.path.join(prepared, "prepare_report.json")))["fingerprint"]


def test_prepare_faults(tiny, prepared, disk):
    d = disk("d")
    make_room = interrupted_then_full("dpo_ds.prepare", prepare_args(tiny, d / "data"), "prepare: tokenize", d,
                                      8 * 1024,
                                      "holds no usable data until prepare writes prepare_report.json last; rerun")
    make_room()
    run_module("dpo_ds.prepare", *prepare_args(tiny, d / "data"))
    assert same_prepared(d / "data", prepared)
    read_only(d, "dpo_ds.prepare", prepare_args(tiny, d / "again"), f"error: --output_dir {d / 'again'}: cannot "
              f"create it or write there (Read-only file system); nothing was written")


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


def test_precompute_faults(tiny, prepared, cache, disk):
    d = disk("d")
    args = precompute_args(tiny, prepared, d / "cache")
    make_room = interrupted_then_full("dpo_ds.precompute", args, "precompute train (rank 0)", d, 20 * 1024,
                                      "complete shard(s) in", "are kept; rerun the same command", term=75)
    make_room()
    run_module("dpo_ds.precompute", *args)
    assert same_cache(d / "cache", prepared, cache)
    read_only(d, "dpo_ds.precompute", precompute_args(tiny, prepared, d / "again"),
              "cannot create it or write there (Read-only file system); nothing was written")


# ---------------------------------------------------------------- train

def train_args(tiny, prepared, cache, out):
    return ["--deepspeed", ZERO0, "--model", tiny[0], "--data", prepared, "--ref_cache", cache, "--output_dir", out,
            "--learning_rate", 2e-3, "--warmup_steps", 1, "--micro_batch_size", 2, "--grad_accum", 2,
            "--max_steps", 6, "--log_every", 1, "--eval_every", 3, "--save_every", 2]


def metrics_but_timing(out):
    """The rows without what is measured rather than computed: throughput and peak memory."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s" and not k.startswith("memory/")}
            for r in read_metrics(os.path.join(out, "metrics.jsonl"))]


def test_train_faults(tiny, prepared, cache, tmp_path, disk):
    run_module("dpo_ds.train", *train_args(tiny, prepared, cache, tmp_path / "base"))
    want = metrics_but_timing(tmp_path / "base")
    d = disk("d", size=64 * MiB)
    args = train_args(tiny, prepared, cache, d / "run")
    # the full disk fails while a checkpoint is written (~10 MB each; one more fits in 14 MB)
    make_room = interrupted_then_full("dpo_ds.train", args, "train: first step done", d, 14 * MiB,
                                      "rerun the same command to ", term=75)
    make_room()
    run_module("dpo_ds.train", *args)
    got = metrics_but_timing(d / "run")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for a, b in zip(got, want):  # every step and eval of the uninterrupted run
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    read_only(d, "dpo_ds.train", train_args(tiny, prepared, cache, d / "again"),
              "cannot create it or write there (Read-only file system); nothing was written")


# ---------------------------------------------------------------- evaluate

def test_evaluate_faults(tiny, prepared, cache, disk):
    args = ["--model", tiny[0], "--data", prepared, "--ref_cache", cache, "--split", "train", "--batch_size", 2]
    want = evaluate.run(C.EvalConfig(model=tiny[0], data=prepared, ref_cache=cache, split="train", batch_size=2))
    d = disk("d")
    out = d / "eval.json"
    make_room = interrupted_then_full("dpo_ds.evaluate", args + ["--output", out], "eval (rank 0)", d, 0,
                                      f"nothing was written to {out}; rerun the same command")
    assert not out.exists() and os.listdir(d) == ["filler"], "not even a temporary file"
    make_room()
    run_module("dpo_ds.evaluate", *args, "--output", out)
    computed = lambda m: {k: v for k, v in m.items() if k != "memory" and not k.startswith("memory/")}  # noqa: E731
    assert computed(json.load(open(out))) == pytest.approx(computed(want))  # measured peaks differ run to run
    read_only(d, "dpo_ds.evaluate", args + ["--output", d / "again.json"],
              f"error: --output {d / 'again.json'}: cannot write in {d} (Read-only file system); nothing was computed")


def test_evaluate_never_overwrites_a_file_it_did_not_write(tmp_path):
    from dpo_ds.errors import UserError
    from dpo_ds.storage import owner

    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(UserError, match="exists and is not an earlier output of this command"):
        owner.check_output_file(str(mine), "--output", evaluate.OUTPUT_KEYS)
    assert mine.read_text() == '{"mine": 1}'
    mine.write_text(json.dumps({"split": "eval", "model": "m", "examples": 3}))
    owner.check_output_file(str(mine), "--output", evaluate.OUTPUT_KEYS)  # an earlier output: replaced
