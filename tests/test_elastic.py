"""Resume on another cluster (issue 24): a run continues on another number of ranks with its global batch, its
ZeRO-3 shards re-sharded through DeepSpeed's universal checkpoint format, converted once and kept beside the
original.
    scripts/test.sh tests/test_elastic.py
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import test_train
import torch
from conftest import once, run_module
from safetensors.torch import load_file
from test_train import train_args

from dpo_ds.plan import choice
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


def same_trajectory(a, b, first: int, stages: bool = False) -> None:
    """Run b's train steps from `first` on are run a's (1e-5), and its exported weights too (1e-4). The two sum
    gradients in other fp32 orders (other ranks, K, or ZeRO stage), so rewards, differences of log-probs (β·Δlog π,
    |log π| ~ 40 here) whose mean may be near 0, carry the rounding of the β·log π they come from: they are bounded
    by 1e-5 of it, as DPO's loss sees them (measured: up to 4e-7 absolute, 1e-5 relative to a reward of 0.004 after
    a 2 -> 1 rank resume; 1e-7 absolute held on one CPU and not on another). `stages`: one of the two ran as stage
    0, the other under ZeRO: uninterrupted runs of each differ (measured, this tiny model) by up to 1.2e-5 in
    grad_norm, so its bound is 1e-4 there."""
    ra = {r["step"]: r for r in read_metrics(a / "metrics.jsonl") if r["split"] == "train"}
    rb = {r["step"]: r for r in read_metrics(b / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(ra) == sorted(rb) == list(range(1, 13))
    for step in range(first, 13):
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "lr", "num_tokens"):
            rel, near = 1e-5, 1e-7
            if stages and k == "grad_norm":
                rel = 1e-4
            elif k.startswith("rewards/"):
                near = 1e-5 * 0.1 * abs(ra[step]["logps/chosen"])  # β = 0.1, the default
            assert rb[step][k] == pytest.approx(ra[step][k], rel=rel, abs=near), (step, k)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    diff = torch.cat([(wb[n].float() - wa[n].float()).flatten() for n in wa]).norm()
    assert float(diff / torch.cat([wa[n].float().flatten() for n in wa]).norm()) < 1e-4


@pytest.fixture(scope="session")
def zero3_whole(tiny, prepared, cache, tmp_path_factory) -> Path:
    """The uninterrupted run the ZeRO-3 resumes below (and the Slurm jobs of tests/test_slurm.py) continue or
    equal: 2 ranks under the deepspeed launcher, 12 steps, a checkpoint every 2, all kept (--save_total_limit 0),
    so that each test can go back to the step it needs. Made once per test run."""
    return Path(once(tmp_path_factory, "elastic_zero3", lambda out: run_module(
        "dpo_ds.train", *args(tiny, prepared, cache, out, save_every=2, save_total_limit=0), launcher=2,
        deepspeed=True)))


@pytest.fixture(scope="session")
def stage0_whole(tiny, prepared, cache, tmp_path_factory) -> Path:
    """The same run under --deepspeed auto, which is stage 0 (fp32) on this CPU: what the stage-0 resumes
    continue."""
    return Path(once(tmp_path_factory, "elastic_stage0", lambda out: run_module(
        "dpo_ds.train", *args(tiny, prepared, cache, out, deepspeed="auto"), launcher=2)))


def test_a_zero3_run_continues_on_another_number_of_ranks(tiny, prepared, cache, zero3_whole, tmp_path):
    """2 ranks, 12 steps: back at step 6 and continued on 1 rank (accumulation 1 -> 2, the same global batch of
    4), the steps after it are the uninterrupted run's (1e-5); back at that run's step 9 and continued on 2 ranks
    again, too. The conversion is kept beside the checkpoint, and pruned with it."""
    whole = zero3_whole
    assert sorted(n for n in os.listdir(whole / "checkpoints") if n.startswith("step-")) == \
        [f"step-{s:07d}" for s in range(2, 13, 2)]  # --save_total_limit 0 keeps them all: one to be killed after

    one = tmp_path / "one"
    back_to(whole, one, 6)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, one, save_every=3))
    assert "it continues on 1, K = 1: global batch 4 kept as 2 x 2 accumulation x 1 data-parallel rank(s)" in p.stdout
    assert "converted step-0000006_universal" in p.stdout and "resuming at step 6" in p.stdout
    assert "ZeRO stage 3" in p.stdout  # a run that started as ZeRO-3 stays ZeRO-3 on one rank
    same_trajectory(whole, one, 7)
    assert sorted(n for n in os.listdir(one / "checkpoints") if n.startswith("step-")) == \
        ["step-0000009", "step-0000012"]

    two = tmp_path / "two"
    back_to(one, two, 9)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, two, grad_accum=2, save_every=3), launcher=2)
    assert "global batch 4 kept as 2 x 1 accumulation x 2 data-parallel rank(s)" in p.stdout
    assert "converted step-0000009_universal" in p.stdout
    same_trajectory(whole, two, 10)


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


def test_a_stage_0_run_continues_on_another_number_of_ranks(tiny, prepared, cache, stage0_whole, tmp_path):
    """--deepspeed auto (stage 0 on this CPU) on 2 ranks, back at step 8 and continued on 1 rank: a stage-0
    checkpoint holds the whole model and optimizer, so nothing is converted."""
    whole = stage0_whole
    assert json.load(open(whole / "config.json"))["deepspeed"]["zero_optimization"] == {"stage": 0}
    one = tmp_path / "one"
    back_to(whole, one, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, one, deepspeed="auto"))
    assert "global batch 4 kept as 2 x 2 accumulation" in p.stdout and "converted" not in p.stdout
    assert "ZeRO stage 0" in p.stdout
    same_trajectory(whole, one, 9)


def fp32_config(tmp_path, stage: int, **zero) -> str:
    """A shipped CPU config at another ZeRO stage."""
    with open(test_train.ZERO3) as f:
        ds = json.load(f)
    ds["zero_optimization"] = {"stage": stage, **zero} if stage != 3 else {**ds["zero_optimization"], **zero}
    if zero:  # an offloaded optimizer is DeepSpeed's CPU-Adam, named in the config as zero3_offload.json does
        ds["optimizer"] = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8}}
    path = tmp_path / f"zero{stage}{'_offload' if zero else ''}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def test_a_zero3_run_continues_as_stage_2_as_stage_0_and_offloaded(tiny, prepared, cache, zero3_whole, tmp_path):
    """ZeRO-3 on 2 ranks, back at step 8: continued as ZeRO-2 on 2 ranks (DeepSpeed's universal loader, after the
    conversion completed the ZeRO-3 layout for it), as stage 0 on 1 rank (dpo_ds's loader: DeepSpeed reads
    universal checkpoints under ZeRO only), and as ZeRO-3 with the optimizer offloaded (CPU-Adam) on 1 rank, and
    that one back without offload on 2 ranks: each the uninterrupted run's steps. One conversion serves the first
    three."""
    whole = zero3_whole
    two = tmp_path / "stage2"
    back_to(whole, two, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, two, deepspeed=fp32_config(tmp_path, 2)), launcher=2)
    assert "converted step-0000008_universal to continue ZeRO stage 3 (offload: none) on 2 rank(s) as stage 2 " \
        "(offload: none) on 2" in p.stdout and "ZeRO stage 2" in p.stdout
    same_trajectory(whole, two, 9)
    for name, ds, said in (("stage0", test_train.ZERO0, "as stage 0 (offload: none) on 1"),
                           ("offload", fp32_config(tmp_path, 3, offload_optimizer={"device": "cpu"}),
                            "as stage 3 (offload: optimizer) on 1")):
        # the stage-2 run's directory at step 8: its config.json says stage 2, but the step-8 checkpoint was saved
        # under ZeRO-3 on 2 ranks, as the settings saved inside it say; the stage-2 resume's conversion is reused
        back_to(two, tmp_path / name, 8)
        p = run_module("dpo_ds.train", *args(tiny, prepared, cache, tmp_path / name, deepspeed=ds, grad_accum=2,
                                             save_every=2))
        assert f"converted step-0000008_universal to continue ZeRO stage 3 (offload: none) on 2 rank(s) {said}" \
            in p.stdout and "resuming at step 8" in p.stdout
        same_trajectory(whole, tmp_path / name, 9, stages=True)  # (CPU-Adam's own arithmetic too)
    back_to(tmp_path / "offload", tmp_path / "back", 10)  # and back: CPU-Adam's step (an int) into torch's AdamW
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, tmp_path / "back"), launcher=2)
    assert "to continue ZeRO stage 3 (offload: optimizer) on 1 rank(s) as stage 3 (offload: none) on 2" in p.stdout
    same_trajectory(whole, tmp_path / "back", 11, stages=True)


def test_a_stage_0_run_continues_as_zero3(tiny, prepared, cache, stage0_whole, tmp_path):
    """Stage 0 on 2 ranks (one file: module and AdamW state), back at step 8 and continued as ZeRO-3 on 2 ranks:
    converted here (DeepSpeed's converter reads ZeRO checkpoints only), the same trajectory (1e-5)."""
    whole = stage0_whole
    three = tmp_path / "stage3"
    back_to(whole, three, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, cache, three), launcher=2)
    assert "to continue ZeRO stage 0 (offload: none) on 2 rank(s) as stage 3" in p.stdout
    same_trajectory(whole, three, 9, stages=True)


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
    from dpo_ds.engine.universal import to_universal
    from dpo_ds.errors import UserError

    step = tmp_path / "step-0000004"
    step.mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("step-0000004")
    before = (step / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes()
    with pytest.raises(UserError, match="converting it for another cluster or ZeRO stage failed .* the checkpoint "
                                        "is intact: resume with the run's own ranks and --deepspeed configuration"):
        to_universal(str(tmp_path), 3)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000004"]
    assert (step / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes() == before


def test_a_conversion_killed_half_way_is_done_again_and_a_stage_0_checkpoint_converts_exactly(tmp_path):
    """A start killed while converting leaves TAG_universal.tmp (never TAG_universal): the next start removes it
    and converts again. A stage-0 checkpoint (module + torch's AdamW state by index) becomes one folder per
    parameter, the tied weight's second name dropped, every value the checkpoint's, readable by ZeRO-1/2 and 3."""
    from dpo_ds.engine.universal import to_universal
    from dpo_ds.engine.unpickle import safe_load

    tag = tmp_path / "step-0000004"
    tag.mkdir()
    emb, norm = torch.randn(6, 4), torch.randn(4)
    state = {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(6, 4), "exp_avg_sq": torch.rand(6, 4)},
             1: {"step": torch.tensor(4.0), "exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4)}}
    torch.save({"module": {"embed.weight": emb, "norm.weight": norm, "head.weight": emb}, "buffer_names": [],
                "optimizer": {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]},
                "lr_scheduler": {"last_epoch": 4}, "global_steps": 4, "global_samples": 16, "ds_version": "0.19.8",
                "step": 4}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("step-0000004")
    stale = tmp_path / "step-0000004_universal.tmp"
    (stale / "zero" / "half").mkdir(parents=True)  # what a kill in the middle leaves
    assert to_universal(str(tmp_path), 0) == "step-0000004_universal"
    out = tmp_path / "step-0000004_universal"
    assert not stale.exists() and (tmp_path / "latest_universal").read_text() == "step-0000004_universal"
    assert sorted(os.listdir(out / "zero")) == ["embed.weight", "norm.weight", "optimizer_state.pt"]
    for name, weight, index in (("embed.weight", emb, 0), ("norm.weight", norm, 1)):
        got = {k: safe_load(out / "zero" / name / f"{k}.pt") for k in ("fp32", "exp_avg", "exp_avg_sq", "step")}
        assert torch.equal(got["fp32"]["param"], weight) and float(got["step"]) == 4.0
        assert all(torch.equal(got[k]["param"], state[index][k]) for k in ("exp_avg", "exp_avg_sq"))
    optim = safe_load(out / "zero" / "optimizer_state.pt")
    assert float(optim["optimizer_state_dict"]["state"][0]["step"]) == 4.0 and optim["ds_version"] == "0.19.8"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        common = safe_load(out / name)
        assert common["global_steps"] == 4 and common["step"] == 4 and common["module"] == {}


# ---------------------------------------------------------------- bf16 (issue 38)

def shipped(name: str) -> str:
    return os.path.join(test_train.ROOT, "ds_configs", name)


def bf16_stage0(tmp_path) -> str:
    """Stage 0 in bf16, as a config asks for it (DeepSpeed's unfused bf16 optimizer: AdamW over fp32 masters of the
    bf16 weights, gradients summed in bf16; --deepspeed auto takes stage 1 with fp32 accumulation instead)."""
    path = tmp_path / "bf16_stage0.json"
    path.write_text(json.dumps({**json.load(open(test_train.ZERO0)), "bf16": {"enabled": True}}))
    return str(path)


@pytest.fixture(scope="session")
def bf16_zero3_whole(tiny, prepared, bf16_cache, tmp_path_factory) -> Path:
    """ds_configs/zero3.json as it ships (bf16) on 2 ranks against the bf16 cache, 12 steps, a checkpoint every 4,
    all kept: the GPU job on this CPU."""
    return Path(once(tmp_path_factory, "elastic_bf16_zero3", lambda out: run_module(
        "dpo_ds.train", *args(tiny, prepared, bf16_cache, out, deepspeed=shipped("zero3.json"), save_total_limit=0),
        launcher=2)))


def test_a_bf16_run_tracks_the_fp32_run(bf16_zero3_whole, zero3_whole):
    """The same job in bf16 (shipped zero3.json, bf16 cache) and in fp32 (zero3_cpu.json, fp32 cache), 12 steps
    on 2 ranks: bf16's trajectory within its documented tolerance of fp32's (README "bf16": measured here loss
    1.8e-3, grad_norm 4.9e-3, logps 4.6e-4 relative, rewards 2.7e-3 absolute; bounds about 10x that), and not
    equal to it (bf16 ran). The export is bf16, as the config trains."""
    b = {r["step"]: r for r in read_metrics(bf16_zero3_whole / "metrics.jsonl") if r["split"] == "train"}
    f = {r["step"]: r for r in read_metrics(zero3_whole / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(b) == sorted(f) == list(range(1, 13))
    worst = {}
    for step in range(1, 13):
        for k, rel, near in (("loss", 2e-2, 0), ("grad_norm", 5e-2, 0), ("logps/chosen", 5e-3, 0),
                             ("rewards/chosen", 0, 3e-2), ("rewards/margins", 0, 3e-2)):
            assert b[step][k] == pytest.approx(f[step][k], rel=rel, abs=near), (step, k)
            worst[k] = max(worst.get(k, 0.0), abs(b[step][k] - f[step][k]))
    assert worst["loss"] > 1e-6 and worst["logps/chosen"] > 1e-5, worst  # bf16 is not fp32
    config = json.load(open(bf16_zero3_whole / "final" / "config.json"))
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert {w.dtype for w in load_file(str(bf16_zero3_whole / "final" / "model.safetensors")).values()} == \
        {torch.bfloat16}


def test_bf16_runs_move_between_one_and_two_ranks_and_stages(tiny, prepared, bf16_cache, bf16_zero3_whole,
                                                             tmp_path):
    """The moves a GPU user makes, in bf16: a run killed and rerun as it was; one GPU's stage 0 (a bf16 config of
    stage 0) on to ZeRO-3 on a node, and the node's ZeRO-3 back to one GPU's stage 0 or to ZeRO-2 (shipped
    zero2.json): back at step 8 (the rerun: 4), each continues the uninterrupted run's steps (1e-5; grad_norm
    1e-4 where stage 0 meets ZeRO). DeepSpeed's bf16 stage-0 optimizer keeps fp32 masters beside the bf16
    weights: converted both ways by dpo_ds."""
    one = tmp_path / "stage0_one"
    run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, one, deepspeed=bf16_stage0(tmp_path), grad_accum=2))
    node = tmp_path / "on_to_zero3"
    back_to(one, node, 8)
    p = run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, node, deepspeed=shipped("zero3.json")),
                   launcher=2)
    assert "converted step-0000008_universal to continue ZeRO stage 0 (offload: none) on 1 rank(s) as stage 3 " \
        "(offload: none) on 2" in p.stdout
    same_trajectory(one, node, 9, stages=True)

    whole = bf16_zero3_whole
    again = tmp_path / "killed"  # killed after its step-4 checkpoint and rerun as it was: no conversion
    back_to(whole, again, 4)
    p = run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, again, deepspeed=shipped("zero3.json")),
                   launcher=2)
    assert "resuming at step 4" in p.stdout and "converted" not in p.stdout
    same_trajectory(whole, again, 5)
    for name, ds, said in (("back_to_stage0", bf16_stage0(tmp_path), "stage 0 (offload: none) on 1"),
                           ("as_zero2", shipped("zero2.json"), "stage 2 (offload: none) on 1")):
        back_to(whole, tmp_path / name, 8)
        p = run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, tmp_path / name, deepspeed=ds,
                                             grad_accum=2))
        assert f"converted step-0000008_universal to continue ZeRO stage 3 (offload: none) on 2 rank(s) as {said}" \
            in p.stdout and "resuming at step 8" in p.stdout
        same_trajectory(whole, tmp_path / name, 9, stages=True)


def bf16_one_gpu(tmp_path) -> str:
    """--deepspeed auto's choice on one GPU: stage 1 with fp32 gradient accumulation in bf16 (DeepSpeed's
    BF16_Optimizer: fp32 masters and moments, the micro-batches' gradients summed in fp32)."""
    path = tmp_path / "bf16_one_gpu.json"
    path.write_text(json.dumps(dict(choice.candidates(choice.base_config(torch.bfloat16), "cuda"))[choice.BF16_FIRST]))
    return str(path)


def test_bf16_moves_through_zero2_and_one_gpus_auto(tiny, prepared, bf16_cache, tmp_path):
    """One GPU's run as --deepspeed auto makes it in bf16 (stage 1, fp32 gradient accumulation) on to a node's
    ZeRO-3 (zero3.json) and ZeRO-2 (zero2.json), and a node's ZeRO-2 run back to one GPU's auto and on to ZeRO-3:
    back at step 8, each continues the uninterrupted run's steps (1e-5; grad_norm 1e-4 across stages, whose fp32
    sums run in other orders). ZeRO-1/2 checkpoints of a tied model (DeepSpeed's BF16_Optimizer and its ZeRO-1/2
    optimizer) converted."""
    one = tmp_path / "one_gpu"  # 1 rank, accumulation 2: the global batch of the 2-rank runs
    run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, one, deepspeed=bf16_one_gpu(tmp_path), grad_accum=2))
    for name, ds in (("one_to_zero3", "zero3.json"), ("one_to_zero2", "zero2.json")):
        back_to(one, tmp_path / name, 8)
        p = run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, tmp_path / name, deepspeed=shipped(ds),
                                             save_every=2), launcher=2)
        assert f"to continue ZeRO stage 1 (offload: none) on 1 rank(s) as stage {ds[4]} (offload: none) on 2" \
            in p.stdout and "resuming at step 8" in p.stdout, p.stdout[-3000:]
        same_trajectory(one, tmp_path / name, 9, stages=True)
    whole = tmp_path / "one_to_zero2"  # a node's ZeRO-2 run from step 8 on: back there at its step 10
    for name, ds, ranks in (("zero2_to_one", bf16_one_gpu(tmp_path), 1), ("zero2_to_zero3", shipped("zero3.json"), 2)):
        back_to(whole, tmp_path / name, 10)
        p = run_module("dpo_ds.train", *args(tiny, prepared, bf16_cache, tmp_path / name, deepspeed=ds,
                                             grad_accum=2 // ranks), launcher=ranks if ranks > 1 else None)
        assert f"to continue ZeRO stage 2 (offload: none) on 2 rank(s) as stage {3 if ranks == 2 else 1} (offload: " \
            f"none) on {ranks}" in p.stdout and "resuming at step 10" in p.stdout, p.stdout[-3000:]
        same_trajectory(whole, tmp_path / name, 11, stages=True)
