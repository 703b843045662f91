"""Ulysses sequence parallelism (--sequence_parallel_size K): K ranks split every row, and the cache, the
training trajectory and the metrics do not depend on K (to fp32 rounding: rtol 1e-5 on values, 1e-4 on
weights after ten Adam steps).
    scripts/test.sh tests/test_sequence_parallel.py
"""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from conftest import ROOT, child_env, free_port, run_module
from safetensors.torch import load_file
from test_precompute import cached

from dpo_ds import cache as R
from dpo_ds import cli, dist
from dpo_ds import config as C
from dpo_ds.engine import check_sequence_parallel, gradient_scale
from dpo_ds.errors import ConfigError, UserError
from dpo_ds.model.batch import build
from dpo_ds.model.layout import PLAIN, Layout, resolve
from dpo_ds.model.sequence_parallel import Group, local_slice, sum_over_group
from dpo_ds.report.log import read_metrics

ZERO3 = os.path.join(ROOT, "ds_configs", "zero3_cpu.json")
ZERO3_INFERENCE = os.path.join(ROOT, "ds_configs", "zero3_inference.json")


# ---------------------------------------------------------------- in one process

def random_rows(n, seed=0):
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = g.integers(3, 50, g.integers(1, 6)).tolist()
        sides = [g.integers(3, 50, g.integers(1, 9)).tolist() for _ in range(2)]
        rows.append({"example_id": i, **{f"{k}_input_ids": prompt + s for k, s in zip(("chosen", "rejected"), sides)},
                     **{f"{k}_labels": [-100] * len(prompt) + s for k, s in zip(("chosen", "rejected"), sides)}})
    return rows


@pytest.mark.parametrize("layout", [PLAIN, Layout(False, True, one_row=True)], ids=["plain", "flash-packed"])
@pytest.mark.parametrize("K", [2, 3])
def test_slices_score_every_token_once_at_its_own_position(layout, K):
    """Each scored token is predicted in exactly one slice, at the position holding the same token and
    position id as in the whole row (so the shift across a slice boundary is the unsplit one); the padding
    makes the row a multiple of K."""
    batch = build(random_rows(5), layout, pad_id=0)
    ids, pos = batch["input_ids"], batch["position_ids"]
    R_, T = ids.shape
    full_pos = torch.arange(T).expand(R_, T) if pos is None else pos
    seen = torch.zeros(len(batch["positions"]), dtype=torch.long)
    for rank in range(K):
        s = local_slice(ids, pos, batch["positions"], K, rank)
        assert s.input_ids.shape[1] * K >= T and s.input_ids.shape[1] * K < T + K
        assert s.input_ids.is_contiguous() and s.position_ids.is_contiguous()  # NCCL gathers position_ids
        assert torch.equal(s.input_ids.flatten()[s.positions], ids.flatten()[batch["positions"][s.keep]])
        assert torch.equal(s.position_ids.flatten()[s.positions], full_pos.flatten()[batch["positions"][s.keep]])
        seen += s.keep.long()
    assert torch.equal(seen, torch.ones_like(seen))


def test_group_sum_scales_its_gradient():
    dist.init()
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = sum_over_group(x, Group(tdist.group.WORLD, 3.0))
    assert torch.equal(y.detach(), x.detach())  # one rank: the sum is itself
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_gradient_scale_follows_deepspeeds_averaging():
    """ZeRO-3 reduce-scatters (dividing by the world size): K; stages 0-2 divide by world / K: 1 (the training
    test below checks the ZeRO-3 case against one rank's gradient norm)."""
    assert gradient_scale({"zero_optimization": {"stage": 3}}, 2) == 2
    assert gradient_scale({"zero_optimization": {"stage": 2}}, 4) == 1 and gradient_scale({}, 4) == 1
    for other in ({"reduce_scatter": False}, {"zero_quantized_gradients": True}):
        with pytest.raises(UserError, match="needs its default gradient reduce-scatter"):
            gradient_scale({"zero_optimization": {"stage": 3, **other}}, 2)


def test_tiled_mlp_gives_the_untiled_values_and_gradients(tiny):
    """--tiled_mlp: each layer's MLP over 7-token tiles (a tiny model's sequences are shorter than its hidden
    size, the default tile) = the plain MLP, log-probs and every parameter gradient, in float64."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine import tile_mlp
    from dpo_ds.model.logps import SequenceLogps, pair_logps

    batch = build(random_rows(4), PLAIN, pad_id=0)
    grads = []
    for tiled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float64, attn_implementation="sdpa")
        if tiled:
            tile_mlp(model, tile=7)
        p = pair_logps(SequenceLogps(model, chunk_size=5), batch)
        (p.chosen.logps - 0.5 * p.rejected.logps).sum().backward()
        grads.append((torch.cat([p.chosen.logps, p.rejected.logps]).detach(),
                      {n: w.grad for n, w in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-12)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_layouts_under_sequence_parallelism():
    assert resolve(None, None, "sdpa", None, "qwen3", 2) == PLAIN  # the default: what is exact
    with pytest.raises(UserError, match="Ulysses' attention drops.*--no-share_prompt --no-packing"):
        resolve(True, None, "sdpa", None, "qwen3", 2)
    with pytest.raises(UserError, match="Ulysses' attention drops"):
        resolve(None, True, "sdpa", None, "qwen3", 2)
    assert resolve(None, None, "flash_attention_2", None, "qwen3", 2) == Layout(False, True, one_row=True)
    with pytest.raises(UserError, match="--share_prompt needs an attention mask"):
        resolve(True, None, "flash_attention_2", None, "qwen3", 2)


def test_start_up_refusals(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen3Config

    model = AutoModelForCausalLM.from_pretrained(tiny[0], attn_implementation="sdpa")  # 4 heads, 2 KV heads
    check_sequence_parallel(model, 2)
    check_sequence_parallel(model, 4)  # K a multiple of the KV heads: DeepSpeed replicates them
    with pytest.raises(UserError, match="4 attention heads do not divide into 3 groups"):
        check_sequence_parallel(model, 3)
    odd = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=64, hidden_size=48, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=6,
                                                       num_key_value_heads=4, head_dim=8), attn_implementation="sdpa")
    with pytest.raises(UserError, match="4 key/value heads must be a multiple or a divisor of K"):
        check_sequence_parallel(odd, 3)
    eager = AutoModelForCausalLM.from_pretrained(tiny[0], attn_implementation="eager")
    with pytest.raises(UserError, match="needs --attn_implementation sdpa or flash_attention_2; 'eager'"):
        check_sequence_parallel(eager, 2)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64))
    with pytest.raises(UserError, match="model type 'gpt2' is not supported"):
        check_sequence_parallel(gpt2, 2)
    from dpo_ds.engine import tile_mlp
    with pytest.raises(UserError, match="--tiled_mlp: model type 'gpt2' is not one whose MLP dpo_ds tiles"):
        tile_mlp(gpt2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--sequence_parallel_size 3 does not divide the 2 rank"):
        dist.set_sequence_parallel(3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.set_sequence_parallel(1)
    with pytest.raises(ConfigError, match="--sequence_parallel_size must be positive"):
        cli.parse(C.EvalConfig, ["--model", "m", "--data", "d", "--ref_cache", "c", "--sequence_parallel_size", "0"])


# ---------------------------------------------------------------- under the launcher

def test_precompute_and_evaluate_do_not_depend_on_k(tiny, prepared, cache, tmp_path):
    """4 ranks = 2 data-parallel x 2 sequence-parallel (ZeRO-3) write the cache of one process; evaluate with
    K = 2 on 2 ranks reports what one process does in the same (plain) layout, token counts included; sdpa's
    shared and packed layouts are refused under K > 1."""
    out = tmp_path / "k2"
    p = run_module("dpo_ds.precompute", "--model", tiny[0], "--data", prepared, "--output_dir", out, "--batch_size", 8,
                   "--shard_size", 64, "--deepspeed", ZERO3_INFERENCE, "--sequence_parallel_size", 2, launcher=4)
    assert "4 ranks = 2 data-parallel x 2 sequence-parallel" in p.stdout
    assert "layout plain" in p.stdout
    files = {m["file"] for m in json.load(open(out / "manifest.json"))["splits"]["train"]["shards"]}
    assert {f[:11] for f in files} == {"shard-00000", "shard-00002"}, "one writer per data-parallel group"
    for split in ("train", "eval"):
        _, one = cached(cache, prepared, split)
        _, four = cached(str(out), prepared, split)
        np.testing.assert_array_equal(one["chosen_tokens"], four["chosen_tokens"])
        for k in R.REFERENCE_COLUMNS:
            np.testing.assert_allclose(four[k], one[k], rtol=1e-5, err_msg=f"{split} {k}")

    args = ["--model", tiny[0], "--data", prepared, "--ref_cache", cache, "--loss_type", "sigmoid", "sft"]
    one = run_module("dpo_ds.evaluate", *args, "--output", tmp_path / "one.json", "--no-share_prompt", "--no-packing")
    two = run_module("dpo_ds.evaluate", *args, "--output", tmp_path / "two.json", "--sequence_parallel_size", 2,
                     "--deepspeed", ZERO3_INFERENCE, launcher=2)
    a, b = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert a.keys() == b.keys() and "2 ranks" not in one.stdout
    assert b["num_tokens"] == a["num_tokens"] and b["examples"] == a["examples"]
    for k, v in a.items():
        if isinstance(v, float):
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k

    bad = run_module("dpo_ds.precompute", "--model", tiny[0], "--data", prepared, "--output_dir", tmp_path / "bad",
                     "--sequence_parallel_size", 2, "--share_prompt", launcher=2, check=False)
    assert bad.returncode != 0 and "Ulysses' attention drops" in bad.stderr and "Traceback" not in bad.stderr


def train_args(tiny, prepared, cache, out, **kw):
    args = {"deepspeed": ZERO3, "model": tiny[0], "data": prepared, "ref_cache": cache, "output_dir": out,
            "learning_rate": 1e-3, "warmup_steps": 1, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 10,
            "log_every": 1, "eval_every": 5, "save_every": 4, "report_to": "none", **kw}
    return [str(x) for k, v in args.items() for x in (f"--{k}", v)]


def test_training_does_not_depend_on_k_and_resumes(tiny, prepared, cache, tmp_path):
    """Ten ZeRO-3 steps with K = 2 on 2 ranks, and on 4 ranks (2 data-parallel groups), = one rank with K = 1 (as
    stage 0: ZeRO-3 on one rank runs so) on the same global batches in the same (plain) layout: loss, gradient
    norm and metrics of every step, then the exported weights. The 2-rank K = 2 run SIGKILLed once its step-4
    checkpoint is complete and rerun continues the same trajectory."""
    k1 = run_module("dpo_ds.train", *train_args(tiny, prepared, cache, tmp_path / "k1"), "--no-share_prompt",
                    "--no-packing")
    sp = ["--sequence_parallel_size", "2"]
    p = run_module("dpo_ds.train", *train_args(tiny, prepared, cache, tmp_path / "k2"), *sp, launcher=2)
    assert "2 ranks = 1 data-parallel x 2 sequence-parallel" in p.stdout and "global batch 4" in p.stdout

    # 4 ranks = 2 data-parallel x 2 sequence-parallel groups, one micro-batch each: the same global batches
    p = run_module("dpo_ds.train", *train_args(tiny, prepared, cache, tmp_path / "k2d2", grad_accum=1), *sp, launcher=4)
    assert "4 ranks = 2 data-parallel x 2 sequence-parallel" in p.stdout and "global batch 4" in p.stdout

    a = read_metrics(tmp_path / "k1" / "metrics.jsonl")
    assert a[1]["grad_norm"] > 0.1  # step 1: the gradient of the same weights, compared below
    w1 = load_file(str(tmp_path / "k1" / "final" / "model.safetensors"))
    w0 = load_file(os.path.join(tiny[0], "model.safetensors"))
    assert "partitions nothing: running stage 0 instead" in k1.stdout
    for run in ("k2", "k2d2"):
        b = read_metrics(tmp_path / run / "metrics.jsonl")
        assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
        for ra, rb in zip(a, b):
            for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "entropy", "num_tokens"):
                if k in ra:
                    assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (run, ra["step"], ra["split"], k)
        w2 = load_file(str(tmp_path / run / "final" / "model.safetensors"))
        assert w1.keys() == w2.keys()
        # the one-rank run is stage 0 (ZeRO-3 on one rank partitions nothing), the others ZeRO-3: their fp32 sums
        # differ in order, and Adam turns a ~0 gradient's rounding into a +-lr step (a few entries). So the whole
        # difference against the whole update (measured 4.1e-6), and entries out of 1e-4 (measured 3 of 830k)
        diff = torch.cat([(w2[n] - w1[n]).flatten() for n in w1])
        update = torch.cat([(w1[n] - w0[n]).flatten() for n in w1 if n in w0])
        assert float(diff.norm() / update.norm()) < 1e-4, run
        apart = sum(int((~torch.isclose(w2[n], w1[n], rtol=1e-4, atol=1e-6)).sum()) for n in w1)
        assert apart < 1e-4 * len(diff), (run, apart)
    b = read_metrics(tmp_path / "k2" / "metrics.jsonl")
    moved = max(float((w1[n] - w).abs().max()) for n, w in w0.items() if n in w1)
    assert moved > 1e-3, "training moved the weights"

    killed = tmp_path / "killed"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dpo_ds.train",
           *train_args(tiny, prepared, cache, killed), *sp]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        latest, deadline = killed / "checkpoints" / "latest", time.time() + 300
        while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "step-0000004"):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    p = run_module("dpo_ds.train", *train_args(tiny, prepared, cache, killed), *sp, launcher=2)
    assert "resuming at step 4" in p.stdout
    c = read_metrics(killed / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in c] == [(r["step"], r["split"]) for r in b]
    for rb, rc in zip(b, c):
        for k in ("loss", "grad_norm", "rewards/margins"):
            if k in rb:
                assert rc[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-6), (rb["step"], rb["split"], k)
