"""The memory planner (dpo_ds.plan, dpo_ds/engine/footprint.py): its terms are the arithmetic its docstring
states, exactly, on a model built from a config alone; every phase logs what it measured; --check sets the two
side by side. How close prediction and measurement come on real jobs is a benchmark's question (README: Will it
fit?), not a test's: here the tolerance only catches a planner that has lost a term."""
import json

import pytest
from conftest import run_module
from transformers import AutoModelForCausalLM

from dpo_ds.engine import footprint as F
from dpo_ds.plan import PlanConfig, candidates, predict, search

FP32_STAGE0 = {"zero_optimization": {"stage": 0}}


def test_shape_counts_the_checkpoints_parameters_without_loading_them(tiny):
    shape = F.Shape.of(tiny[0])
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert shape.layers == model.config.num_hidden_layers and shape.vocab == model.config.vocab_size
    assert shape.largest_layer == max(model.get_input_embeddings().weight.numel(),
                                      sum(p.numel() for p in model.model.layers[0].parameters()))
    assert F.Shape.of(f"{tiny[0]}/config.json") == shape  # the config file alone is enough


SHAPE = F.Shape(params=7_000_000_000, largest_layer=250_000_000, small=500_000, layers=32, hidden=4096,
                intermediate=11008, vocab=32000)


def job(**kw):
    return F.Job(**{"ds": FP32_STAGE0, "world": 1, "micro_batch": 2, "max_length": 1024, **kw})


def test_model_state_terms_follow_zero_stages():
    n = SHAPE.params
    zero0 = F.phase(SHAPE, job(), "train")
    assert (zero0["parameters"], zero0["gradients"], zero0["optimizer states"]) == (4 * n, 4 * n, 8 * n)
    bf16 = {"bf16": {"enabled": True}}
    zero3 = {**bf16, "zero_optimization": {"stage": 3, "reduce_bucket_size": 1e6, "stage3_prefetch_bucket_size": 1e6}}
    s3 = F.phase(SHAPE, job(ds=zero3, world=8), "train")
    assert s3["optimizer states"] == 12 * n // 8  # m, v and the fp32 master copy, one eighth each
    assert s3["gradients"] == 2 * n // 8 + 2 * 1_000_000
    assert s3["parameters"] == 2 * n // 8 + 2 * SHAPE.small + 2 * (2 * SHAPE.largest_layer + 1_000_000)
    offload = {**bf16, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    on_gpu = F.phase(SHAPE, job(ds=offload, world=8), "train")
    assert on_gpu["optimizer states"] == 0 and on_gpu["optimizer states (host, offloaded)"] > 12 * n // 8
    on_cpu = F.phase(SHAPE, job(ds=offload, world=8, device="cpu"), "train")  # the host is the device
    assert on_cpu["total"] - on_gpu["total"] == on_gpu["optimizer states (host, offloaded)"]


def test_activation_terms_shrink_as_the_long_context_settings_promise():
    base = F.activations(SHAPE, job(max_length=8192), training=True)["activations"]
    assert F.activations(SHAPE, job(max_length=8192, sp=2), training=True)["activations"] == pytest.approx(base / 2,
                                                                                                          rel=1e-6)
    tiled = F.activations(SHAPE, job(max_length=8192, tiled_mlp=True), training=True)["activations"]
    tokens = 2 * 2 * 8192
    mlp = tokens * SHAPE.intermediate * 4 * 3  # gate, up and act of the recomputed layer, fp32
    assert base - tiled == 2 * (mlp - mlp // (tokens // SHAPE.hidden))  # one tile of tokens/H at a time
    assert F.activations(SHAPE, job(max_length=8192, checkpointing=False), training=True)["activations"] > 5 * base
    head = F.activations(SHAPE, job(chunk=256), training=True)["output head"]
    # never a [B, T, V] fp32 tensor: a few [chunk, V] ones and the hidden states that feed them
    assert head == 256 * SHAPE.vocab * 4 * F.HEAD_CHUNK_COPIES + 2 * 2 * 1024 * SHAPE.hidden * 4


def test_the_two_model_trainer_adds_the_reference_and_search_finds_the_lightest_that_fits(tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    cfg = PlanConfig(model="m", deepspeed=str(ds), gpus=8, max_length=2048, gpu_memory=80)
    plan = predict(cfg, SHAPE, runtime=0)
    assert plan["saving_bytes"] >= 2 * SHAPE.params // 8  # the bf16 reference's shard, at least
    assert set(plan["phases"]) == {"precompute", "train", "evaluate"} and all(plan["fits"].values())
    found = search(cfg, SHAPE, runtime=0)
    names = [name for name, _ in candidates({})]
    lighter = names[:names.index(found["configuration"])]
    for name in lighter:  # every lighter configuration was too large
        ds_ = dict(candidates({"bf16": {"enabled": True}}))[name]
        assert F.phase(SHAPE, F.Job(ds=ds_, world=8, micro_batch=2, max_length=2048), "train")["total"] > 80 * F.GiB
    assert found["fits"] and found["largest"]["max_length"] >= 2048


def test_plan_command_prints_json_and_one_line_errors(tiny):
    p = run_module("dpo_ds.plan", "--model", tiny[0], "--deepspeed", "ds_configs/zero3_cpu.json", "--json",
                   "--gpu_memory", 4)
    plan = json.loads(p.stdout.strip().splitlines()[-1])
    assert {n: p_["predicted_peak_bytes"] > 0 for n, p_ in plan["phases"].items()} == \
        {"precompute": True, "train": True, "evaluate": True}
    bad = run_module("dpo_ds.plan", "--deepspeed", "ds_configs/zero3.json", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: give --model")
