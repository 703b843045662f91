"""Trust: a user's files are never destroyed or mixed with another run's, a resume is refused (in one line, with
old and new values) before anything is rewritten, bad rows are named, a damaged cache is repaired, and a
checkpoint cannot run code. The fault matrix (Ctrl-C, SIGTERM, a full disk, read-only storage) is in
tests/test_faults.py.
    scripts/test.sh tests/test_trust.py
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, child_env, run_module

from dpo_ds import cli, precompute, prepare, train
from dpo_ds import config as C
from dpo_ds.cache.read import open_cache
from dpo_ds.errors import DataError, UserError
from dpo_ds.report.log import MetricsLog, read_metrics
from dpo_ds.storage import owner

ZERO0 = os.path.join(ROOT, "ds_configs", "zero0_cpu.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "zero3_cpu.json")


def tree(path) -> dict:
    """{relative path: sha256} of every file below `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------- whose directory is it

def test_prepare_never_deletes_what_it_did_not_write(tiny, tmp_path):
    out = tmp_path / "X"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "run_eval.py").write_text("keep")
    with pytest.raises(UserError, match=r"holds eval, which is not prepared data"):
        prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=tiny[0], output_dir=str(out)))
    assert (out / "eval" / "run_eval.py").read_text() == "keep"
    (tmp_path / "Y").mkdir()
    (tmp_path / "Y" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt"):
        prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=tiny[0], output_dir=str(tmp_path / "Y")))
    # its own output is replaced, as before
    prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=tiny[0], output_dir=str(tmp_path / "Z")))
    prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=tiny[0], output_dir=str(tmp_path / "Z")))


def test_no_phase_writes_into_a_model_directory(tiny, prepared, cache, tmp_path):
    model = tmp_path / "sft"
    shutil.copytree(tiny[0], model)
    before = tree(model)
    with pytest.raises(UserError, match="is a model directory .*config.json, model.safetensors"):
        train.run(C.TrainConfig(deepspeed=ZERO0, model=str(model), data=prepared, ref_cache=cache,
                                output_dir=str(model)))
    with pytest.raises(UserError, match="is a model directory"):
        precompute.run(C.PrecomputeConfig(model=str(model), data=prepared, output_dir=str(model)))
    with pytest.raises(UserError, match="is a model directory"):
        prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=str(model), output_dir=str(model)))
    assert tree(model) == before, "not a byte of the model directory changed"


HOLD = """
import sys, time
from dpo_ds.storage import owner
owner.claim(sys.argv[1], "prepared data", "--output_dir", "a test's holder")
print("held", flush=True)
time.sleep(120)
"""


def test_an_output_directory_has_one_owner_until_it_dies(tiny, prepared, cache, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = r"is in use by another dpo_ds job \(a test's holder, pid \d+ on .*\); wait for it to end"
        with pytest.raises(UserError, match=busy):
            prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=tiny[0], output_dir=str(out)))
        with pytest.raises(UserError, match=busy):
            precompute.run(C.PrecomputeConfig(model=tiny[0], data=prepared, output_dir=str(out)))
        with pytest.raises(UserError, match=busy):
            train.run(C.TrainConfig(deepspeed=ZERO0, model=tiny[0], data=prepared, ref_cache=cache,
                                    output_dir=str(out)))
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    prepare.run(C.PrepareConfig(dataset=tiny[1], tokenizer=tiny[0], output_dir=str(out)))
    # a directory of another kind is never mixed into
    with pytest.raises(UserError, match="holds eval, prepare_report.json, train, which is not training run"):
        train.run(C.TrainConfig(deepspeed=ZERO0, model=tiny[0], data=prepared, ref_cache=cache,
                                output_dir=str(out)))


def test_partial_last_metrics_line_is_dropped_and_a_broken_one_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 0.69}\n{"step": 2, "split": "train", "loss": 0.6}\n'
                    '{"step": 3, "spl')  # a kill or a full disk mid-append
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    log = MetricsLog(str(tmp_path), resume_step=2)
    log.write(3, "train", {"loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2: not a JSON metrics row"):
        read_metrics(str(path))


# ---------------------------------------------------------------- resume: refused before anything is rewritten

def train_cmd(tiny, prepared, cache, out, **kw):
    args = {"deepspeed": ZERO0, "model": tiny[0], "data": prepared, "ref_cache": cache, "output_dir": out,
            "learning_rate": 2e-3, "warmup_steps": 1, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 2,
            "log_every": 1, "eval_every": 0, "save_every": 2, "report_to": "none", **kw}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_resume_compares_content_not_paths_and_refuses_in_one_line(tiny, prepared, cache, tmp_path):
    out = tmp_path / "run"
    run_module("dpo_ds.train", *train_cmd(tiny, prepared, cache, out))
    saved = (out / "config.json").read_bytes()
    # the same model by another path (relative, or a copy of the same weights) continues the run
    moved = tmp_path / "moved_model"
    shutil.copytree(tiny[0], moved)
    rows = read_metrics(out / "metrics.jsonl")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')  # and a cut line from a killed append does not stop it
    p = run_module("dpo_ds.train", *train_cmd(tiny, prepared, cache, out, model=os.path.relpath(moved, ROOT)))
    assert "train: already complete" in p.stdout
    assert read_metrics(out / "metrics.jsonl") == rows
    saved = (out / "config.json").read_bytes()
    # another ZeRO stage, β and model: refused before config.json is rewritten, naming old and new values
    other = tmp_path / "other_model"
    shutil.copytree(tiny[0], other)
    from safetensors.torch import load_file, save_file
    w = load_file(other / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in w.items()}, other / "model.safetensors", metadata={"format": "pt"})
    zero2 = os.path.join(ROOT, "ds_configs", "zero2.json")  # bf16: another precision (another stage may change)
    p = run_module("dpo_ds.train", *train_cmd(tiny, prepared, cache, out, deepspeed=zero2, beta=0.2), check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert err[-1].startswith("error: ") and "--beta 0.1 -> 0.2" in err[-1], err[-1]
    assert "precision torch.float32 -> torch.bfloat16" in err[-1] and "ZeRO stage" not in err[-1], err[-1]
    assert (out / "config.json").read_bytes() == saved
    with pytest.raises(UserError, match="another reference model"):  # the cache itself refuses other weights
        train.run(C.TrainConfig(deepspeed=ZERO0, model=str(other), data=prepared, ref_cache=cache, output_dir=str(out),
                                micro_batch_size=2, grad_accum=2, max_steps=2, save_every=2))
    assert (out / "config.json").read_bytes() == saved


def test_planted_pickle_in_a_checkpoint_is_refused(tiny, prepared, cache, tmp_path):
    """DeepSpeed unpickles its checkpoints with weights_only=False; dpo_ds loads them with weights_only=True."""
    out = tmp_path / "run"
    p = run_module("dpo_ds.train", *train_cmd(tiny, prepared, cache, out, deepspeed=ZERO3))
    check_export(out, p)  # ZeRO-3 on one rank runs as stage 0: its checkpoint holds the model and the optimizer
    assert "partitions nothing: running stage 0 instead" in p.stdout
    states = out / "checkpoints" / "step-0000002" / "mp_rank_00_model_states.pt"
    clean = states.read_bytes()
    marker = tmp_path / "pwned"
    planted = torch.load(states, weights_only=False)
    planted["extra"] = Payload(str(marker))
    torch.save(planted, states)
    p = run_module("dpo_ds.train", *train_cmd(tiny, prepared, cache, out, deepspeed=ZERO3), check=False)
    assert p.returncode == 2 and not marker.exists(), "the payload did not run"
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {states}: refused to load: it holds 'posix.system'")
    assert "Traceback" not in p.stderr
    states.write_bytes(clean)  # the genuine checkpoint loads (ZeRO-3's own types: the 2-rank resumes in test_train)
    p = run_module("dpo_ds.train", *train_cmd(tiny, prepared, cache, out, deepspeed=ZERO3))
    assert "train: already complete" in p.stdout


def test_universal_checkpoint_files_are_read_with_weights_only(tmp_path):
    """DeepSpeed's universal-checkpoint readers (a resume on other ranks or another ZeRO stage) call
    torch.load(..., weights_only=False) themselves: while dpo_ds loads a checkpoint, torch.load refuses a payload."""
    from dpo_ds.engine.unpickle import only_weights

    marker, path = tmp_path / "pwned", tmp_path / "fp32.pt"
    torch.save({"param": torch.ones(2), "extra": Payload(str(marker))}, path)
    with only_weights(), pytest.raises(UserError, match="refused to load: it holds 'posix.system'"):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    torch.save({"param": torch.ones(2), "cat_dim": 0}, path)
    with only_weights():
        assert torch.load(path, weights_only=False)["cat_dim"] == 0
    from deepspeed.utils.tensor_fragment import fragment_address  # what DeepSpeed's bf16 optimizer saves

    torch.save({"param_slice_mappings": [{"w": fragment_address(numel=3, start=0)}]}, path)
    with only_weights():
        assert torch.load(path, weights_only=False)["param_slice_mappings"][0]["w"].numel == 3
    assert torch.load is not None and "only_weights" not in repr(torch.load)


def check_export(out, p):
    """The export's files are readable by the team (safetensors writes 0600: the umask decides), it comes with
    a model card in the Hub's format (issue 27), and train printed no UserWarning."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(out / "final"):
        assert os.stat(out / "final" / name).st_mode & 0o777 == 0o666 & ~mask, name
    assert "UserWarning" not in p.stderr, p.stderr[-2000:]
    assert not (out / "final.tmp").exists() and not (out / "final.old").exists()
    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\nbase_model: model\nlibrary_name: transformers\n")
    assert "| loss | 1·sigmoid (β 0.1) |" in card and "| rewards/accuracies |" in card
    assert "python -m dpo_ds.train --deepspeed" in card


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


# ---------------------------------------------------------------- bad rows, named

def test_pairs_identical_after_truncation_are_bad_rows(tiny, tmp_path):
    same = "one two three four five six seven eight nine ten " * 4
    rows = [{"prompt": "p", "chosen": same + "eleven", "rejected": same + "twelve"},
            {"prompt": "q", "chosen": "good answer", "rejected": "bad answer"},
            {"prompt": "r", "chosen": "fine", "rejected": "poor"}]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = dict(dataset=data, tokenizer=tiny[0], max_length=24, max_prompt_length=8, eval_fraction=0.0)
    with pytest.raises(DataError, match=r"prefs.jsonl line 1: field 'rejected': identical to chosen in the first "
                                        r"--max_length 24 tokens"):
        prepare.run(C.PrepareConfig(output_dir=str(tmp_path / "a"), **cfg))
    report = prepare.run(C.PrepareConfig(output_dir=str(tmp_path / "b"), on_bad_row="skip", **cfg))
    assert report["counts"] == {"train": 2} and report["skipped_count"] == 1
    assert report["skipped"][0]["where"].endswith("prefs.jsonl line 1")
    assert prepare.run(C.PrepareConfig(output_dir=str(tmp_path / "c"), **{**cfg, "max_length": 512,
                                                                          "max_prompt_length": 8}))["counts"] == {
        "train": 3}, "long enough to differ: kept"


def test_lone_surrogate_is_a_named_bad_row(tiny, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", ['{"prompt": "hi", "chosen": "ok \\ud83d", "rejected": "no"}',
                                                  {"prompt": "a", "chosen": "b", "rejected": "c"},
                                                  {"prompt": "d", "chosen": "e", "rejected": "f"}])
    p = run_module("dpo_ds.prepare", "--dataset", data, "--tokenizer", tiny[0], "--output_dir", tmp_path / "a",
                   check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(
        "error: " + data + " line 1: field 'chosen': not valid Unicode: a lone surrogate '\\ud83d' at character 3")
    report = prepare.run(C.PrepareConfig(dataset=data, tokenizer=tiny[0], output_dir=str(tmp_path / "b"),
                                         on_bad_row="skip", eval_fraction=0.0))
    assert report["counts"] == {"train": 2} and report["skipped"][0]["field"] == "chosen"


# ---------------------------------------------------------------- a damaged cache is repaired by a rerun

def test_rerun_recomputes_exactly_the_damaged_shards(tiny, prepared, cache, tmp_path, capsys):
    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    shards = sorted((damaged / "train").glob("shard-*.arrow"))
    changed, missing, kept = shards[0], shards[1], shards[2]
    raw = bytearray(changed.read_bytes())
    raw[-200] ^= 0xFF  # a flipped byte in a value
    changed.write_bytes(bytes(raw))
    missing.unlink()
    shutil.copy(kept, damaged / "train" / "shard-00009-00099.arrow")  # a stray file the manifest does not list
    kept_mtime = os.stat(kept).st_mtime_ns
    with pytest.raises(UserError, match="rerun the precompute command that wrote the cache"):
        open_cache(str(damaged), prepared)
    cfg = C.PrecomputeConfig(model=tiny[0], data=prepared, output_dir=str(damaged), batch_size=8, shard_size=64)
    precompute.run(cfg)
    said = capsys.readouterr().out
    assert "3 shard(s) of" in said and "recomputing exactly those" in said, said
    assert os.stat(kept).st_mtime_ns == kept_mtime, "an intact shard is not rewritten"
    assert tree(damaged / "train") == tree(os.path.join(cache, "train")), "the same values, byte for byte"
    open_cache(str(damaged), prepared)  # verifies every hash
    precompute.run(cfg)
    assert "already complete" in capsys.readouterr().out


def test_owner_private_names_are_its_own():
    assert owner.PRIVATE.fullmatch(".dpo_ds.lock") and owner.PRIVATE.fullmatch(".dpo_ds_shared_0123abcd")
    assert not owner.PRIVATE.fullmatch(".dpo_dsx") and not owner.PRIVATE.fullmatch("dpo_ds.lock")


# ---------------------------------------------------------------- noise is not preference

def test_margins_within_rounding_noise_are_ties():
    from dpo_ds.model.pair import Pair
    from dpo_ds.objective.metrics import TIE_RELATIVE, tie_precision, wins

    ref = torch.tensor([-30.0, -30.0, -30.0, -30.0])
    policy_chosen = ref + torch.tensor([1.5e-7, -1.5e-7, 1e-3, 0.0])  # rounding, rounding, a preference, exact
    assert wins(Pair.of(policy_chosen, ref), Pair.of(ref, ref), beta=0.1).tolist() == [False, False, True, False]
    # 2^-11 of the four sums (120 here) is within bf16's bound (2^-9), above fp16's (2^-12); 2^-19 above fp32's
    policy_chosen = ref + torch.tensor([120 * 2.0 ** -11, 0.5, 120 * 2.0 ** -19, 0.0])
    pair, base = Pair.of(policy_chosen, ref), Pair.of(ref, ref)
    assert wins(pair, base, beta=0.1, precision="bf16").tolist() == [False, True, False, False]
    assert wins(pair, base, beta=0.1, precision="fp16").tolist() == [True, True, False, False]
    assert wins(pair, base, beta=0.1).tolist() == [True, True, True, False]
    assert tie_precision("fp32", "bf16") == tie_precision("bf16", "fp16") == "bf16"
    assert TIE_RELATIVE["fp32"] < TIE_RELATIVE["fp16"] < TIE_RELATIVE["bf16"]


def test_sft_model_against_its_own_cache_ties_in_every_precision_and_layout(tiny, prepared, cache, bf16_cache,
                                                                            capsys, tmp_path):
    """The cache was written in the shared-prompt + packed layout, 8 pairs a batch; the plain layout and other
    batch sizes round otherwise (margins of ~1e-7 in fp32, ~1e-4 of the sums in bf16), which counted as wins for
    about half the pairs before ties were counted as ties at the precision's own noise. fp32 and bf16 models
    against fp32 and bf16 caches, fp16 against fp16, either layout, batches of 3, and bf16 on 2 ranks: accuracy 0,
    and the rule is said where not fp32."""
    from dpo_ds import evaluate

    from dpo_ds import precompute

    fp16_cache = str(tmp_path / "fp16_cache")
    precompute.run(C.PrecomputeConfig(model=tiny[0], data=prepared, output_dir=fp16_cache, batch_size=8,
                                      shard_size=64, dtype="fp16"))
    plain = {"share_prompt": False, "packing": False}
    for ref, dtype, layout in [(ref, dtype, layout) for ref in (cache, bf16_cache) for dtype in ("fp32", "bf16")
                               for layout in ({}, plain)] + [(fp16_cache, "fp16", layout) for layout in ({}, plain)]:
        m = evaluate.run(C.EvalConfig(model=tiny[0], data=prepared, ref_cache=ref, split="train", dtype=dtype,
                                      batch_size=3, **layout))
        said = capsys.readouterr().out
        assert m["rewards/accuracies"] == 0.0 and abs(m["rewards/margins"]) < 1e-3, (ref, dtype, layout)
        cached = {bf16_cache: "bf16", fp16_cache: "fp16"}.get(ref, "fp32")
        assert ("warning: the cache holds fp32 log-probs and the model runs in bf16: reward margins within about ±"
                in said) == ((cached, dtype) == ("fp32", "bf16"))
        bound = {"bf16": "2^-9 of", "fp16": "2^-12 of"}.get(cached if cached != "fp32" else dtype)
        assert (f"rewards/accuracies: a margin within {bound} beta*(|log pi_w| + |log pi_l| + |ref_w| + |ref_l|) is "
                f"a tie" in said) == (bound is not None), (ref, dtype, said)
    out = tmp_path / "sft_bf16_two_ranks.json"  # and on 2 ranks, under ZeRO-3 inference
    run_module("dpo_ds.evaluate", "--model", tiny[0], "--data", prepared, "--ref_cache", bf16_cache, "--dtype", "bf16",
               "--deepspeed", os.path.join(ROOT, "ds_configs", "zero3_inference.json"), "--split", "train",
               "--output", out, launcher=2)
    assert json.load(open(out))["rewards/accuracies"] == 0.0


def test_storage_without_locks_warns_and_storage_faults_are_named(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    owner.claim(str(tmp_path / "nfs"), "training run", "--output_dir", "train")
    owner.release(str(tmp_path / "nfs"))
    assert "warning: " + str(tmp_path / "nfs") + " is on storage without file locks" in capsys.readouterr().err
    assert cli.storage_fault(PermissionError(errno.EACCES, "Permission denied", "/shared/run/metrics.jsonl")) == \
        "permission denied (/shared/run/metrics.jsonl)"
    assert cli.storage_fault(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2360832 vs 23"))
    assert cli.storage_fault(RuntimeError("Connection closed by peer")) is None


def test_flash_attention_without_flash_attn_is_refused_in_one_line():
    from dpo_ds import pretrained
    from dpo_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="flash_attention_2 cannot run here: .*CUDA GPUs only"):
        pretrained.attn_implementation("flash_attention_2", torch.float32)
