"""Resume on another cluster (issue 24): a run continues on another number of ranks with its global batch, its
ZeRO-3 shards re-sharded through DeepSpeed's universal checkpoint format, converted once and kept beside the
original.
    scripts/test.sh tests/test_elastic.py
"""
import os
import shutil

import pytest
import torch
from conftest import run_module
from safetensors.torch import load_file
from test_train import train_args

from dpo_ds.report.log import read_metrics


def args(tiny, prepared, cache, out, **kw):
    """test_train's flags for a 12-step run with a checkpoint every 4 steps."""
    return train_args(tiny, prepared, cache, out, **{"grad_accum": 1, "max_steps": 12, "save_every": 4, **kw})


def back_to(src, dst, step: int) -> None:
    """dst = src as it was when its step-`step` checkpoint was the newest (a run killed after it)."""
    shutil.copytree(src, dst)
    ckpt = os.path.join(dst, "checkpoints")
    for name in os.listdir(ckpt):
        if name.startswith("step-") and int(name[5:12]) > step:
            shutil.rmtree(os.path.join(ckpt, name))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write(f"step-{step:07d}")
    for name in ("final", "report.png"):
        path = os.path.join(dst, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)


def same_trajectory(a, b, first: int) -> None:
    ra = {r["step"]: r for r in read_metrics(a / "metrics.jsonl") if r["split"] == "train"}
    rb = {r["step"]: r for r in read_metrics(b / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(ra) == sorted(rb) == list(range(1, 13))
    for step in range(first, 13):
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "lr", "num_tokens"):
            assert rb[step][k] == pytest.approx(ra[step][k], rel=1e-5, abs=1e-7), (step, k)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    diff = torch.cat([(wb[n] - wa[n]).flatten() for n in wa]).norm()
    assert float(diff / torch.cat([wa[n].flatten() for n in wa]).norm()) < 1e-4


def test_a_zero3_run_continues_on_another_number_of_ranks(tiny, prepared, cache, tmp_path):
    """2 ranks, 12 steps, a checkpoint every 4: back at step 8 and continued on 1 rank (accumulation 1 -> 2, the
    same global batch of 4), the steps after it are the uninterrupted run's (1e-5); back at that run's step 10
    and continued on 2 ranks again, too. The conversion is kept beside the checkpoint, and pruned with it."""
    whole = tmp_path / "whole"
    run_module("dpo_ds.train", *args(tiny, prepared, cache, whole), launcher=2)

    one = tmp_path / "one"
    back_to(whole, one, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, one, save_every=2))
    assert "it continues on 1, K = 1: global batch 4 kept as 2 x 2 accumulation x 1 data-parallel rank(s)" in p.stdout
    assert "converted step-0000008_universal" in p.stdout and "resuming at step 8" in p.stdout
    assert "ZeRO stage 3" in p.stdout  # a run that started as ZeRO-3 stays ZeRO-3 on one rank
    same_trajectory(whole, one, 9)
    assert sorted(n for n in os.listdir(one / "checkpoints") if n.startswith("step-")) == \
        ["step-0000010", "step-0000012"]

    two = tmp_path / "two"
    back_to(one, two, 10)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, two, grad_accum=2, save_every=2), launcher=2)
    assert "global batch 4 kept as 2 x 1 accumulation x 2 data-parallel rank(s)" in p.stdout
    assert "converted step-0000010_universal" in p.stdout
    same_trajectory(whole, two, 11)


def test_a_run_continues_with_another_sequence_parallel_size(tiny, prepared, cache, tmp_path):
    """K = 2 on 2 ranks (one data-parallel group, accumulation 2), back at step 8 and continued with K = 1 on the
    same 2 ranks (two data-parallel groups, accumulation 1): the same global batch, the same trajectory."""
    plain = {"share_prompt": False, "packing": False}
    whole = tmp_path / "whole"
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, whole, sequence_parallel_size=2, grad_accum=2),
                   *[f"--no-{k}" for k in plain], launcher=2)
    assert "2 ranks = 1 data-parallel x 2 sequence-parallel" in p.stdout
    one = tmp_path / "k1"
    back_to(whole, one, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, one, grad_accum=2), *[f"--no-{k}" for k in plain],
                   launcher=2)
    assert "K = 2; it continues on 2, K = 1: global batch 4 kept as 2 x 1 accumulation x 2" in p.stdout
    same_trajectory(whole, one, 9)


def test_a_stage_0_run_continues_on_another_number_of_ranks(tiny, prepared, cache, tmp_path):
    """--deepspeed auto (stage 0 on this CPU) on 2 ranks, back at step 8 and continued on 1 rank: a stage-0
    checkpoint holds the whole model and optimizer, so nothing is converted."""
    whole = tmp_path / "whole"
    run_module("dpo_ds.train", *args(tiny, prepared, cache, whole, deepspeed="auto"), launcher=2)
    one = tmp_path / "one"
    back_to(whole, one, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, one, deepspeed="auto"))
    assert "global batch 4 kept as 2 x 2 accumulation" in p.stdout and "converted" not in p.stdout
    assert "ZeRO stage 0" in p.stdout
    same_trajectory(whole, one, 9)


def test_a_global_batch_the_new_ranks_cannot_keep_is_refused_with_sizes_that_work(tiny, prepared, cache, tmp_path):
    whole = tmp_path / "whole"
    run_module("dpo_ds.train", *args(tiny, prepared, cache, whole, max_steps=2, save_every=2, micro_batch_size=3,
                                     grad_accum=1), launcher=2)  # global batch 6
    back_to(whole, tmp_path / "again", 2)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, tmp_path / "again", max_steps=2, save_every=2,
                                         micro_batch_size=4), check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "global batch of 6 pairs cannot be kept on 1 data-parallel rank(s) with --micro_batch_size 4" in err
    assert err.endswith("use --micro_batch_size 1 or 2 or 3 or 6")


def test_a_failed_conversion_leaves_the_checkpoint_as_it_was_and_says_so(tmp_path):
    """The converter fails (here: a checkpoint without ZeRO's optimizer files): one UserError naming the
    checkpoint, nothing half-written beside it, the original untouched, so the next start converts again."""
    from dpo_ds.engine.checkpoint import to_universal
    from dpo_ds.errors import UserError

    step = tmp_path / "step-0000004"
    step.mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("step-0000004")
    before = (step / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes()
    with pytest.raises(UserError, match="converting it for another number of ranks failed .* the checkpoint is "
                                        "intact: resume on the run's own number of ranks"):
        to_universal(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000004"]
    assert (step / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes() == before
