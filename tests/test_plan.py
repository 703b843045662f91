"""The memory planner (dpo_ds.plan, dpo_ds/engine/footprint.py): its terms are the arithmetic its docstring
states, exactly, on a model built from a config alone; every phase logs what it measured; --check sets the two
side by side. How close prediction and measurement come on real jobs is a benchmark's question (README: Will it
fit?), not a test's: here the tolerance only catches a planner that has lost a term."""
import json

import pytest
from conftest import run_module
from transformers import AutoModelForCausalLM

from dpo_ds import dist
from dpo_ds.engine import choice
from dpo_ds.engine import footprint as F
from dpo_ds.errors import UserError
from dpo_ds.plan import PlanConfig, predict, search

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
    names = [name for name, _ in choice.candidates({}, "cuda")]
    lighter = names[:names.index(found["configuration"])]
    for name in lighter:  # every lighter configuration was too large
        ds_ = dict(choice.candidates({"bf16": {"enabled": True}}, "cuda"))[name]
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


class Job:  # what engine.choice reads of a TrainConfig
    model, micro_batch_size, grad_accum, max_grad_norm = None, 2, 4, 1.0
    sequence_parallel_size, tiled_mlp, gradient_checkpointing, logp_chunk_size = 1, False, True, 256

    def __init__(self, model, deepspeed="auto"):
        self.model, self.deepspeed = model, deepspeed


def test_deepspeed_auto_takes_the_lightest_that_fits_and_a_resumed_run_keeps_its_own(tiny, monkeypatch):
    """--deepspeed auto (train's default): stage 0 while a whole copy fits each rank, then 2, 3 (and the offloads
    on CUDA); a run it resumes keeps the configuration it started with; ZeRO-3 asked for on one rank runs as
    stage 0, unless the run it resumes started as ZeRO-3."""
    cfg = Job(tiny[0])
    monkeypatch.setattr(F.Shape, "of", lambda *a, **k: SHAPE)  # a 7B model's shape, its config not needed
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    need = {name: F.phase(SHAPE, F.Job(ds=ds, world=4, micro_batch=2, max_length=300, device="cpu"), "train")["total"]
            for name, ds in choice.candidates(choice.base_config(choice.auto_dtype()), "cpu")}
    assert list(need) == ["stage 0", "stage 2", "stage 3"] and need["stage 0"] > need["stage 2"] > need["stage 3"]
    for budget, expected in ((10 * need["stage 0"], "stage 0"), (need["stage 0"] - 1, "stage 2"),
                             (need["stage 2"] - 1, "stage 3")):
        monkeypatch.setattr(choice, "device_budget", lambda b=budget: ("cpu", b))
        name, ds, line = choice.lightest(cfg, 300)
        assert name == expected and line.startswith(f"train: --deepspeed auto: {expected} (4 rank(s), fp32")
    monkeypatch.setattr(choice, "device_budget", lambda: ("cpu", need["stage 3"] - 1))
    with pytest.raises(UserError, match=r"no configuration fits .* rows up to 300 tokens\): lower --micro_batch"):
        choice.lightest(cfg, 300)
    monkeypatch.undo()

    saved = {"train_batch_size": 32, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    ds, line = choice.engine_config(cfg, saved, 300)  # the same batch sizes, injected again for these ranks
    assert ds["zero_optimization"] == {"stage": 2} and ds["train_batch_size"] == 2 * 4 * 4 and "run's own" in line

    monkeypatch.setattr(dist, "world_size", lambda: 1)
    zero3 = Job(tiny[0], "ds_configs/zero3_cpu.json")
    ds, line = choice.engine_config(zero3, None, 300)
    assert ds["zero_optimization"] == {"stage": 0} and "running stage 0 instead" in line
    ds, line = choice.engine_config(zero3, {"zero_optimization": {"stage": 3}}, 300)
    assert ds["zero_optimization"]["stage"] == 3 and "continues so" in line
    ds, line = choice.engine_config(Job(tiny[0], "ds_configs/zero2.json"), None, 300)
    assert ds["zero_optimization"]["stage"] == 2 and line is None


def test_plan_deepspeed_auto_names_what_train_would_choose(tiny):
    p = run_module("dpo_ds.plan", "--model", tiny[0], "--device", "cpu", "--gpus", 2, "--gpu_memory", 8, "--json")
    plan = json.loads(p.stdout.strip().splitlines()[-1])
    assert plan["deepspeed"]["auto"] == "stage 0" and plan["deepspeed"]["config"]["zero_optimization"] == {"stage": 0}
