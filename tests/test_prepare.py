"""Data preparation: hub formats from local copies, exact prompt/response boundaries, bad rows.
    scripts/test.sh tests/test_prepare.py
"""
import gzip
import json
import os

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds import config as C, prepare
from dpo_ds.encode import IGNORE
from dpo_ds.errors import DataError, UserError
from conftest import ROOT, run_module

HH = [("What is 2+2?", "It is 4.", "No idea."),
      ("Name a colour.", "Blue is a colour.", "Dog."),
      ("Say hi.", "Hi there!", "Go away.")]


def hh_row(q, a, b, history=True):
    head = "\n\nHuman: Hello\n\nAssistant: Hi, how can I help?" if history else ""
    return {"chosen": f"{head}\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"{head}\n\nHuman: {q}\n\nAssistant: {b}"}


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def prep(tmp_path, tokenizer, dataset, data_files=None, **kw):
    out = str(tmp_path / "out")
    cfg = C.PrepareConfig(dataset=dataset, data_files=data_files, tokenizer=tokenizer, output_dir=out, **kw)
    return prepare.run(cfg), out


def decoded_pairs(tok, split_dir):
    """(prompt text, chosen response text, rejected response text) decoded from the token ids."""
    for row in datasets.load_from_disk(split_dir):
        out = []
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            n_prompt = sum(1 for x in labels if x == IGNORE)
            assert labels[n_prompt:] == ids[n_prompt:] and all(x != IGNORE for x in labels[n_prompt:])
            out.append((tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])))
        assert out[0][0] == out[1][0], "chosen and rejected must share the prompt tokens"
        yield out[0][0], out[0][1], out[1][1]


def test_hh_rlhf_script_layout_and_boundaries(tiny, tmp_path):
    model_dir, _ = tiny
    train = write_jsonl(tmp_path / "train.jsonl.gz", [hh_row(*r) for r in HH], gz=True)
    test = write_jsonl(tmp_path / "test.jsonl.gz", [hh_row(*HH[0], history=False)], gz=True)
    out = tmp_path / "X"
    p = run_module("scripts.prepare_dpo", "--dataset", "hh_rlhf", "--data_files", train, test,
                   "--tokenizer", model_dir, "--output_dir", out)
    assert "prepared" in p.stdout
    report = json.load(open(out / "prepare_report.json"))
    assert report["counts"] == {"train": 3, "eval": 1} and report["fingerprint"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.load_from_disk(str(out / "train"))
    assert {"example_id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} <= set(ds.column_names)
    assert ds.features["example_id"].dtype == "int64"
    for (prompt, chosen, rejected), (q, a, b) in zip(decoded_pairs(tok, str(out / "train")), HH):
        assert chosen == a + tok.eos_token and rejected == b + tok.eos_token
        want = tok.apply_chat_template([{"role": "user", "content": "Hello"},
                                        {"role": "assistant", "content": "Hi, how can I help?"},
                                        {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        assert prompt == want


def test_ultrafeedback_parquet_splits(tiny, tmp_path):
    model_dir, _ = tiny
    def row(i):
        p = f"question {i}?"
        return {"prompt": p, "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 3.0,
                "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": f"good answer {i}"}],
                "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": f"bad {i}"}],
                "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"good answer {i}"}]}
    d = tmp_path / "data"; d.mkdir()
    datasets.Dataset.from_list([row(i) for i in range(5)]).to_parquet(str(d / "train_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list([row(i) for i in range(5, 7)]).to_parquet(str(d / "test_prefs-00000-of-00001.parquet"))
    report, out = prep(tmp_path, model_dir, "ultrafeedback",
                       [str(d / "train_prefs-00000-of-00001.parquet"), str(d / "test_prefs-00000-of-00001.parquet")])
    assert report["counts"] == {"train": 5, "eval": 2}
    tok = AutoTokenizer.from_pretrained(model_dir)
    got = [c for _, c, _ in decoded_pairs(tok, os.path.join(out, "eval"))]
    assert got == ["good answer 5" + tok.eos_token, "good answer 6" + tok.eos_token]


def test_orca_system_prompt_and_eval_fraction(tiny, tmp_path):
    model_dir, _ = tiny
    rows = [{"system": "Be brief." if i % 2 else "", "question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(20)]
    f = write_jsonl(tmp_path / "orca_rlhf.jsonl", rows)
    report, out = prep(tmp_path, model_dir, "orca_dpo", [f], eval_fraction=0.25)
    assert report["counts"] == {"train": 15, "eval": 5}
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [p for split in ("train", "eval") for p, _, _ in decoded_pairs(tok, os.path.join(out, split))]
    assert sum("<|im_start|>system\nBe brief." in p for p in prompts) == 10


def test_plain_messages_and_plain_concatenation(tiny, tmp_path):
    model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    plain_dir = tmp_path / "plain_tok"
    tok.save_pretrained(plain_dir)
    (plain_dir / "chat_template.jinja").unlink(missing_ok=True)
    rows = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "sort ascending: 3 1"}],
             "chosen": [{"role": "assistant", "content": "1 3"}], "rejected": "3 1"}] * 4
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    report, out = prep(tmp_path, str(plain_dir), f, eval_fraction=0.0)
    assert report["chat_template"] is False and report["counts"] == {"train": 4}
    tok = AutoTokenizer.from_pretrained(str(plain_dir))
    assert not tok.chat_template
    prompt, chosen, rejected = next(decoded_pairs(tok, os.path.join(out, "train")))
    assert prompt == "\n\nSystem: S\n\nHuman: sort ascending: 3 1\n\nAssistant:"
    assert chosen == " 1 3" + tok.eos_token and rejected == " 3 1" + tok.eos_token


def test_truncation_keeps_prompt_end_and_is_counted(tiny, tmp_path):
    model_dir, _ = tiny
    long_q = "sort ascending: " + " ".join(str(i % 40) for i in range(300)) + " END"
    rows = [{"prompt": long_q, "chosen": "1 2 3 " * 40, "rejected": "3 2 1"}, {"prompt": "hi", "chosen": "a", "rejected": "b"}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    report, out = prep(tmp_path, model_dir, f, eval_fraction=0.0, max_length=96, max_prompt_length=64)
    assert report["truncated"]["train"] == {"prompt_truncated": 1, "response_truncated": 1}
    ds = datasets.load_from_disk(os.path.join(out, "train"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    row = ds[0]
    assert len(row["chosen_input_ids"]) == 96 and sum(x == IGNORE for x in row["chosen_labels"]) == 64
    assert "END" in tok.decode(row["chosen_input_ids"][:64])  # the end of the prompt survives
    assert row["rejected_input_ids"][-1] == tok.eos_token_id  # the short response keeps its EOS


def test_example_ids_unique_and_stable(tiny, tmp_path):
    model_dir, prefs = tiny
    r1, out1 = prep(tmp_path / "a", model_dir, prefs)
    r2, out2 = prep(tmp_path / "b", model_dir, prefs)
    ids = lambda out: [i for s in ("train", "eval") for i in datasets.load_from_disk(os.path.join(out, s))["example_id"]]  # noqa: E731
    assert ids(out1) == ids(out2) and len(set(ids(out1))) == len(ids(out1)) == 240
    assert r1["fingerprint"] == r2["fingerprint"]
    r3, _ = prep(tmp_path / "c", model_dir, prefs, max_length=512)
    assert r3["fingerprint"] != r1["fingerprint"], "settings are part of the fingerprint"


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_ROWS = [
    ("missing field", {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ("non-string", {"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen", "must be a string"),
    ("empty prompt", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "is empty"),
    ("empty response", {"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "is empty"),
    ("identical", {"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ("unparseable", '{"prompt": "p", "chosen": ', None, "not valid JSON"),
    ("unknown role", {"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role", "unknown role"),
]


@pytest.mark.parametrize("name,bad,field,reason", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_is_named(tiny, tmp_path, name, bad, field, reason):
    model_dir, _ = tiny
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        prep(tmp_path, model_dir, f)
    msg = str(e.value)
    assert f"{f} line 3" in msg and reason in msg and "--on_bad_row skip" in msg
    if field:
        assert repr(field) in msg
    report, _ = prep(tmp_path, model_dir, f, on_bad_row="skip", eval_fraction=0.0)
    assert report["skipped_count"] == 1 and report["counts"] == {"train": 3}
    assert report["skipped"][0]["where"] == f"{f} line 3" and reason in report["skipped"][0]["reason"]


def test_cli_errors_are_one_line(tiny, tmp_path):
    model_dir, _ = tiny
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "p", "chosen": "a"}])
    p = run_module("dpo_ds.prepare", "--dataset", f, "--tokenizer", model_dir, "--output_dir", tmp_path / "o", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {f} line 2: field 'rejected': missing")
    p = run_module("dpo_ds.prepare", "--dataset", "nope", "--tokenizer", model_dir, "--output_dir", tmp_path / "o", check=False)
    assert p.returncode == 2 and "expected one of ultrafeedback" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(UserError, match="hh_hub.*unknown split"):
        prep(tmp_path, model_dir, "hh_rlhf", ["bogus=hh_hub.jsonl"])


def test_tiny_model_loads(tiny):
    model_dir, prefs = tiny
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
    from dpo_ds.tiny import is_correct
    rows = [json.loads(line) for line in open(prefs)]
    assert all(is_correct(r["prompt"], r["chosen"]) and not is_correct(r["prompt"], r["rejected"]) for r in rows)
