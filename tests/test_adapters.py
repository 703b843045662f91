"""LoRA on the cache (issue 25): a step equals the two-model computation with adapters disabled (TRL's
reference), 2 ranks ZeRO-3 = 1 rank, kill + resume continues, the exported adapter and the merged model are the
trained policy, checkpoints hold only what trains.
    scripts/test.sh tests/test_adapters.py
"""
import copy
import json
import math
import os

import datasets
import pytest
import torch
from conftest import ROOT, run_module
from independent import dpo_loss, naive_sequence_logps
from test_elastic import back_to
from test_train import ZERO0, train_args
from transformers import AutoModelForCausalLM

from dpo_ds import config as C
from dpo_ds.cache.read import open_cache
from dpo_ds.model.batch import collate
from dpo_ds.model.logps import SequenceLogps
from dpo_ds.objective.step import batch_losses
from dpo_ds.pretrained.adapters import AdapterSpec, default_targets, wrap
from dpo_ds.report.log import read_metrics


def test_a_lora_step_equals_the_two_model_computation_with_adapters_disabled(tiny, prepared, cache):
    """The training path (chunked log-probs of the LoRA policy in fp32, the cached reference) against the
    same PEFT model in float64 whose reference is a live forward with its adapters disabled (TRL's way): the
    loss to 1e-6, each adapter gradient to 1e-5 of its norm; the SFT weights get none."""
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert default_targets(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_model = wrap(model, AdapterSpec(r=4, alpha=8, dropout=0.0), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 would make the policy the reference: move it away
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    independent = copy.deepcopy(peft_model).double()
    ds = datasets.load_from_disk(f"{prepared}/train")
    batch, B, beta = collate([ds[i] for i in range(6)], pad_id=0), 6, 0.1

    cached = open_cache(cache, prepared).reference("train")
    losses, _ = batch_losses(SequenceLogps(model, chunk_size=16, stats=True), batch, cached, C.LossConfig(beta=beta))
    losses.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 7 * 4 and all(".lora_" in n for n in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy = naive_sequence_logps(independent, *args)
    with independent.disable_adapter(), torch.no_grad():
        reference = naive_sequence_logps(independent, *args)
    two_model = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], beta).mean()
    two_model.backward()
    assert abs(losses.mean().item() - two_model.item()) < 1e-6
    assert abs(two_model.item() - math.log(2)) > 1e-3, "the adapters must move the policy"
    for name, p in independent.base_model.model.named_parameters():
        if p.requires_grad:
            assert float((grads[name].double() - p.grad).norm() / p.grad.norm()) < 1e-5, name


def lora_args(tiny, prepared, cache, out, **kw):
    return train_args(tiny, prepared, cache, out, **{"use_peft": "", "lora_r": 8, "learning_rate": 5e-3,
                                                     "grad_accum": 1, "max_steps": 6, "save_every": 3, **kw})


def flags(args):
    return [a for a in args if a != ""]  # --use_peft and --merge_adapter take no value


def test_lora_zero3_on_two_ranks_equals_one_rank_resumes_and_exports(tiny, prepared, cache, tmp_path):
    """2 ranks ZeRO-3 with LoRA: step 1 at ln 2 (B = 0); equal to 1 rank at stage 0 (1e-5; the stages' own
    fp32 orders); killed after step 3 and resumed, on 2 ranks and on 1: steps 4-6 again (1e-5); checkpoints
    hold the adapter and its Adam moments only; final/ loads with peft, final/merged with plain transformers,
    and both score the held-out split as the engine did (1e-5)."""
    whole = tmp_path / "whole"
    run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, cache, whole, merge_adapter="",
                                                save_total_limit=0)), launcher=2)
    rows = {r["step"]: r for r in read_metrics(whole / "metrics.jsonl") if r["split"] == "train"}
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[6]["loss"] < rows[1]["loss"]

    from safetensors.torch import load_file
    trainable = sum(t.numel() for t in load_file(whole / "final" / "adapter_model.safetensors").values())
    step = whole / "checkpoints" / "step-0000003"
    size = sum(os.path.getsize(step / f) for f in os.listdir(step))
    model_size = os.path.getsize(os.path.join(tiny[0], "model.safetensors"))
    assert 12 * trainable < size < 12 * trainable + 200_000 < model_size, (size, trainable, model_size)

    one = tmp_path / "one"
    run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, cache, one, deepspeed=ZERO0, grad_accum=2)))
    assert not (one / "final" / "merged").exists()  # asked for once the run is done: made from its checkpoint
    p = run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, cache, one, deepspeed=ZERO0, grad_accum=2,
                                                    merge_adapter="")))
    assert "already complete" in p.stdout and (one / "final" / "merged" / "model.safetensors").is_file()
    again = tmp_path / "again"
    back_to(whole, again, 3)
    p = run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, cache, again, merge_adapter="")), launcher=2)
    assert "resuming at step 3" in p.stdout
    elastic = tmp_path / "elastic"  # the same on 1 rank: the adapter's ZeRO-3 shards converted (universal)
    back_to(whole, elastic, 3)
    p = run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, cache, elastic, grad_accum=2)))
    assert "converted step-0000003_universal" in p.stdout
    for other, first in ((one, 1), (again, 4), (elastic, 4)):
        got = {r["step"]: r for r in read_metrics(other / "metrics.jsonl") if r["split"] == "train"}
        for s in range(first, 7):
            for k in ("loss", "grad_norm", "rewards/chosen", "lr"):
                near = 1e-5 * 0.1 * abs(rows[s]["logps/chosen"]) if k.startswith("rewards/") else 1e-7
                assert got[s][k] == pytest.approx(rows[s][k], rel=1e-4 if k == "grad_norm" else 1e-5, abs=near), \
                    (other.name, s, k)

    final = [r for r in read_metrics(whole / "metrics.jsonl") if r["split"] == "eval"][-1]
    for model_dir in (whole / "final", whole / "final" / "merged"):
        out = tmp_path / f"{model_dir.name}.json"
        run_module("dpo_ds.evaluate", "--model", model_dir, "--data", prepared, "--ref_cache", cache, "--output", out)
        scored = json.load(open(out))
        for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert scored[k] == pytest.approx(final[k], rel=1e-5, abs=1e-6), (model_dir.name, k)
    assert "library_name: peft" in (whole / "final" / "README.md").read_text()

    from peft import PeftModel  # the adapter as peft loads it, unmerged, is the merged model
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), whole / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(whole / "final" / "merged").eval()
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_in_bf16_trains_and_exports(tiny, prepared, bf16_cache, tmp_path):
    """LoRA under the shipped zero3.json as it ships (bf16) on 2 ranks against the bf16 cache: step 1 at ln 2
    within bf16's rounding of other batchings (B = 0), the loss falls, the adapter is saved in fp32 (as PEFT keeps
    adapters beside a bf16 base) and the merged model in bf16, and both score the held-out split as the engine did
    (evaluate --dtype bf16; 2e-4)."""
    out = tmp_path / "run"
    run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, bf16_cache, out, merge_adapter="", save_every=0,
                                                deepspeed=os.path.join(ROOT, "ds_configs", "zero3.json"))),
               launcher=2)
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"}
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-4) and rows[6]["loss"] < rows[1]["loss"] - 1e-3

    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(out / "final" / "adapter_model.safetensors").values()} == {torch.float32}
    assert {t.dtype for t in load_file(out / "final" / "merged" / "model.safetensors").values()} == {torch.bfloat16}
    final = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"][-1]
    for model_dir in (out / "final", out / "final" / "merged"):
        scored = tmp_path / f"{model_dir.name}.json"
        run_module("dpo_ds.evaluate", "--model", model_dir, "--data", prepared, "--ref_cache", bf16_cache,
                   "--dtype", "bf16", "--output", scored)
        assert json.load(open(scored))["loss"] == pytest.approx(final["loss"], abs=2e-4), model_dir.name


def test_quantized_bases_are_refused_where_bitsandbytes_cannot_run(tiny, prepared, cache, tmp_path):
    p = run_module("dpo_ds.train", *flags(lora_args(tiny, prepared, cache, tmp_path / "q", load_in_4bit="")),
                   check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert err.startswith("error: --load_in_4bit: bitsandbytes' quantized layers need a CUDA GPU"), err
    p = run_module("dpo_ds.train", *train_args(tiny, prepared, cache, tmp_path / "m"), "--merge_adapter", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].endswith("applies to adapters: add --use_peft")


def test_the_planner_counts_the_adapters_parameters(tiny):
    """dpo_ds.plan and --deepspeed auto: LoRA's parameters counted from the meta-device model are PEFT's
    trainable ones; only they get gradients and AdamW's state; the weights grow by them."""
    import dataclasses

    from dpo_ds.plan import footprint as F

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    wrap(model, AdapterSpec(r=8), seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert F.adapter_params(tiny[0], 8) == F.adapter_params(tiny[0], 8, ["all-linear"]) == trainable
    shape = F.Shape.of(tiny[0])
    job = F.Job(ds={"zero_optimization": {"stage": 0}}, world=1, micro_batch=2, max_length=64)
    full, lora = F.phase(shape, job, "train"), F.phase(shape, dataclasses.replace(job, adapter=trainable), "train")
    assert lora["gradients"] == 4 * trainable and lora["optimizer states"] == 8 * trainable
    assert lora["parameters"] == full["parameters"] + 4 * trainable and full["gradients"] == 4 * shape.params


def test_adapter_directories_and_unknown_targets_are_refused_in_one_line(tiny, tmp_path):
    """An adapter directory is a model for evaluate (merged on load) only: precompute and train need the whole
    model the cache fingerprints. A --lora_target_modules name the model lacks is named, with those it has."""
    from dpo_ds.errors import UserError
    from dpo_ds.plan.footprint import adapter_params
    from dpo_ds.pretrained.load import check_model_dir

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is a LoRA adapter .*train --merge_adapter writes final/merged"):
        check_model_dir(str(tmp_path))
    check_model_dir(str(tmp_path), adapter=True)
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    with pytest.raises(UserError, match="--lora_target_modules qproj: .*the model's decoder layers have down_proj"):
        wrap(model, AdapterSpec(r=4, target_modules=("qproj",)), seed=0)
    with pytest.raises(UserError, match="no linear layer of .* has that name"):
        adapter_params(tiny[0], 4, ["qproj"])
    assert adapter_params(tiny[0], 4, ["lm_head"]) == 4 * (128 + 330)  # outside the layers, when named
