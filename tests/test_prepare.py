"""Data preparation: hub formats from local copies, exact prompt/response boundaries, bad rows.
    scripts/test.sh tests/test_prepare.py
"""
import gzip
import json
import os

import datasets
import pytest
from conftest import ROOT, run_module
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds import cli, prepare
from dpo_ds import config as C
from dpo_ds.data.encode import IGNORE
from dpo_ds.errors import DataError, UserError

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
    for side in ("chosen", "rejected"):  # the length functions' column: each side's -100 labels
        assert ds["prompt_length"] == [sum(x == IGNORE for x in labels) for labels in ds[f"{side}_labels"]]
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


# ---------------------------------------------------------------- regressions (issue 8)

def test_tokenizer_fingerprint_ignores_call_state_and_num_proc(tiny, tmp_path):
    """A tokenizer.json saved with truncation/padding set (common after SFT) and the state the first call
    leaves behind do not change the fingerprint; neither does --num_proc."""
    from dpo_ds.storage.fingerprint import tokenizer_fingerprint

    model_dir, prefs = tiny
    fresh = AutoTokenizer.from_pretrained(model_dir)
    want = tokenizer_fingerprint(fresh)
    fresh(["a b c"], truncation=True, max_length=2)
    assert tokenizer_fingerprint(fresh) == want
    saved = tmp_path / "tok_with_state"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.enable_truncation(max_length=64)
    tok.backend_tokenizer.enable_padding(length=64)
    tok.save_pretrained(saved)
    assert json.load(open(saved / "tokenizer.json"))["truncation"] is not None
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(saved)) == want
    one, _ = prep(tmp_path / "one", model_dir, prefs)
    two, _ = prep(tmp_path / "two", model_dir, prefs, num_proc=2)
    assert one["fingerprint"] == two["fingerprint"] and one["tokenizer_fingerprint"] == two["tokenizer_fingerprint"]


def test_chat_template_errors_are_bad_rows(tiny, tmp_path):
    """A template that raises (here: for a system turn) names the row; in skip mode the row is reported."""
    model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok_dir = tmp_path / "strict_tok"
    tok.save_pretrained(tok_dir)
    system = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
              "chosen": "a", "rejected": "b"}
    f = write_jsonl(tmp_path / "sys.jsonl", [GOOD, GOOD, system, GOOD])
    with pytest.raises(DataError, match=rf"{f} line 3: field 'prompt': the tokenizer's chat template refused it "
                                        r"\(TemplateError: System role not supported\)"):
        prep(tmp_path, str(tok_dir), f)
    report, _ = prep(tmp_path, str(tok_dir), f, on_bad_row="skip", eval_fraction=0.0)
    assert report["counts"] == {"train": 3} and report["skipped"][0]["where"] == f"{f} line 3"
    # from --dataset_num_proc workers too (the error crosses a process boundary: it once hung the pool)
    with pytest.raises(DataError, match=rf"{f} line 3: field 'prompt': the tokenizer's chat template refused it"):
        prep(tmp_path, str(tok_dir), f, num_proc=2)
    again, _ = prep(tmp_path, str(tok_dir), f, on_bad_row="skip", eval_fraction=0.0, num_proc=2)
    assert again["fingerprint"] == report["fingerprint"] and again["skipped"] == report["skipped"]
    p = run_module("dpo_ds.prepare", "--dataset", f, "--tokenizer", tok_dir, "--output_dir", tmp_path / "cli", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "line 3: field 'prompt'" in p.stderr


def test_plain_prompt_keeps_bos_but_not_a_post_processor_eos(tiny, tmp_path):
    """Without a chat template, a tokenizer whose post-processor wraps a text in BOS ... EOS gives the prompt
    its BOS only: the one EOS of a row ends the response."""
    from tokenizers import processors

    model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    bos, eos = "<|endoftext|>", tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.convert_tokens_to_ids(bos)), (eos, tok.eos_token_id)])
    plain_dir = tmp_path / "bos_eos_tok"
    tok.save_pretrained(plain_dir)
    (plain_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(plain_dir)
    assert tok("x")["input_ids"][-1] == tok.eos_token_id, "the post-processor appends EOS"
    f = write_jsonl(tmp_path / "p.jsonl", [GOOD] * 3)
    _, out = prep(tmp_path, str(plain_dir), f, eval_fraction=0.0)
    for row in datasets.load_from_disk(os.path.join(out, "train")):
        ids = row["chosen_input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids(bos)
        assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id


def test_hh_transcript_ending_with_a_human_turn_is_a_bad_row(tiny, tmp_path):
    model_dir, _ = tiny
    row = hh_row(*HH[0])
    row["chosen"] += "\n\nHuman: thanks"
    f = write_jsonl(tmp_path / "train.jsonl", [hh_row(*HH[1]), row])
    with pytest.raises(DataError, match=r"line 2: field 'chosen': the transcript ends with a Human turn"):
        prep(tmp_path, model_dir, "hh_rlhf", [f])


def test_unreachable_hub_dataset_is_one_line(tiny, tmp_path):
    p = run_module("dpo_ds.prepare", "--dataset", "orca_dpo", "--tokenizer", tiny[0], "--output_dir", tmp_path / "o",
                   check=False, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "cannot load Intel/orca_dpo_pairs [train] from the hub" in p.stderr and "--data_files" in p.stderr


def test_stale_report_is_never_read_with_new_splits(tiny, tmp_path, monkeypatch):
    """A prepare run that dies after rewriting the splits but before its report leaves no report behind, and
    split files that differ from their report are refused."""
    from dpo_ds.data import prepared as data

    model_dir, prefs = tiny
    _, out = prep(tmp_path, model_dir, prefs)
    data.verify_files(out, data.read_report(out), ["train", "eval"])

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the report")
    monkeypatch.setattr(data, "atomic_json", crash)
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path, model_dir, prefs, max_length=48)
    monkeypatch.undo()
    with pytest.raises(UserError, match="no prepare_report.json"):
        data.read_report(out)
    _, out = prep(tmp_path, model_dir, prefs)
    report = data.read_report(out)
    arrow = [n for n in os.listdir(os.path.join(out, "train")) if n.endswith(".arrow")][0]
    with open(os.path.join(out, "train", arrow), "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="train differs from what prepare_report.json describes"):
        data.verify_files(out, report, ["train"])


def test_one_flag_alone_never_refuses_a_default():
    """--max_length alone derives --max_prompt_length; --max_steps alone derives --warmup_steps."""
    cfg = cli.parse(C.PrepareConfig, ["--dataset", "d.jsonl", "--tokenizer", "t", "--output_dir", "o", "--max_length", "256"])
    assert cfg.max_prompt_length == 128
    assert C.PrepareConfig(dataset="d", tokenizer="t", output_dir="o").max_prompt_length == 512
    train = ["--model", "m", "--data", "d", "--ref_cache", "r", "--output_dir", "o", "--deepspeed", "z.json"]
    assert cli.parse(C.TrainConfig, train + ["--max_steps", "5"]).warmup_steps == 0
    assert cli.parse(C.TrainConfig, train).warmup_steps == 50
    assert cli.parse(C.TrainConfig, train + ["--max_steps", "5", "--warmup_steps", "2"]).warmup_steps == 2


@pytest.mark.parametrize("module", ["prepare", "precompute", "train", "evaluate"])
def test_help_reads_like_a_tool(module):
    p = run_module(f"dpo_ds.{module}", "--help")
    doc = __import__(f"dpo_ds.{module}", fromlist=["_"]).__doc__.strip().splitlines()[0]
    assert doc in p.stdout and "Config(" not in p.stdout
    assert "required:" in p.stdout and "(required)" in p.stdout
    if module == "train":
        assert "--model MODEL" in p.stdout and "(default: 5e-07)" in p.stdout and "(default: sigmoid)" in p.stdout
        assert p.stdout.index("--model") < p.stdout.index("--learning_rate"), "required flags come first"


def test_scripts_run_from_a_checkout_without_the_package(tmp_path):
    """scripts/*.py put the checkout on sys.path themselves (here: run with dpo_ds made unimportable from
    site-packages by a shadowing empty module on PYTHONPATH, which the script's own path entry precedes)."""
    import subprocess
    import sys

    (tmp_path / "dpo_ds").mkdir()
    (tmp_path / "dpo_ds" / "__init__.py").write_text("raise ImportError('not the checkout')\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_dpo.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0 and "prepare" in p.stdout, p.stderr[-2000:]
