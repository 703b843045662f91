"""The token-efficient layouts (dpo_ds.model.layout) against the plain one: the same per-sequence log-probs, loss
and gradients (fp32: only the order of sums differs), on pairs of varied lengths including a one-token
response, a prompt at --max_prompt_length and a pair at --max_length."""
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import child_env
from independent import dpo_loss
from transformers import AutoModelForCausalLM

from dpo_ds.data.encode import IGNORE
from dpo_ds.errors import UserError
from dpo_ds.model.batch import block_mask, build
from dpo_ds.model.layout import PLAIN, Layout, resolve, unsupported
from dpo_ds.model.logps import SequenceLogps, pair_logps

LAYOUTS = [Layout(True, False), Layout(False, True), Layout(True, True)]
MAX_LENGTH, MAX_PROMPT = 48, 24


def pair(example_id, prompt, chosen, rejected):
    return {"example_id": example_id, "chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected,
            "chosen_labels": [IGNORE] * len(prompt) + chosen, "rejected_labels": [IGNORE] * len(prompt) + rejected}


def edge_pairs(vocab: int) -> list[dict]:
    """Pairs at the limits prepare allows: a one-token response on either side, a prompt of exactly
    MAX_PROMPT tokens, a pair whose longer side is exactly MAX_LENGTH, a one-token prompt."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [pair(1000, ids(7), ids(1), ids(9)),
            pair(1001, ids(MAX_PROMPT), ids(5), ids(1)),
            pair(1002, ids(MAX_PROMPT), ids(MAX_LENGTH - MAX_PROMPT), ids(3)),
            pair(1003, ids(1), ids(4), ids(6))]


@pytest.fixture(scope="module")
def rows(prepared):
    train = datasets.load_from_disk(f"{prepared}/train")
    return [train[i] for i in range(6)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layout_gives_the_plain_logps(tiny, rows, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny[0], attn_implementation=attn).eval()
    batch_rows = rows + edge_pairs(model.config.vocab_size)
    with torch.no_grad():
        want = pair_logps(SequenceLogps(model, chunk_size=7, stats=True), build(batch_rows, PLAIN, 0))
        for layout in LAYOUTS:
            got = pair_logps(SequenceLogps(model, chunk_size=7, layout=layout, stats=True), build(batch_rows, layout, 0))
            for side in ("chosen", "rejected"):
                for name in ("logps", "shared_logps"):
                    torch.testing.assert_close(getattr(getattr(got, side), name), getattr(getattr(want, side), name),
                                               rtol=1e-5, atol=1e-6, msg=lambda m: f"{layout} {side} {name}: {m}")
                # the head statistics, per sequence
                torch.testing.assert_close(torch.stack(getattr(got, side).stats), torch.stack(getattr(want, side).stats),
                                           rtol=1e-5, atol=1e-5, msg=lambda m: f"{layout} {side} stats: {m}")
            assert got.chosen.tokens.tolist() == want.chosen.tokens.tolist()
            assert got.rejected.tokens.tolist() == want.rejected.tokens.tolist()


def test_loss_and_every_gradient_equal_the_plain_layout(tiny, rows):
    batch_rows = rows[:4] + edge_pairs(50)[:2]
    ref = torch.linspace(-60, -20, 2 * len(batch_rows)).view(2, -1)

    def grads(layout):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny[0])
        logps = SequenceLogps(model, chunk_size=5, layout=layout)
        p = pair_logps(logps, build(batch_rows, layout, 0))
        loss = dpo_loss(p.chosen.logps, p.rejected.logps, ref[0], ref[1], 0.1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_loss, want = grads(PLAIN)
    got_loss, got = grads(Layout(True, True))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_shared_segment_mask_positions_and_targets():
    p = pair(7, [11, 12, 13], [21, 22], [31, 32, 33])
    b = build([p], Layout(True, False), pad_id=0)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # rejected continues from the prompt
    m = b["attention_mask"][0, 0]
    assert m[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]                # first chosen token: prompt + itself
    assert m[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]                # first rejected token: never chosen
    assert m[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
    # the last prompt position (2) predicts both first tokens; sequence 0 = chosen, 1 = rejected
    assert list(zip(b["positions"].tolist(), b["targets"].tolist(), b["sequence"].tolist())) == [
        (2, 21, 0), (3, 22, 0), (2, 31, 1), (5, 32, 1), (6, 33, 1)]
    assert b["tokens"] == 8 and b["slots"] == 8


def test_packing_fills_rows_up_to_the_longest_segment_and_padding_sees_only_padding():
    pairs = [pair(0, [1] * 4, [2] * 4, [3] * 4), pair(1, [4] * 2, [5], [6]), pair(2, [7] * 2, [8] * 2, [9])]
    b = build(pairs, Layout(True, True), pad_id=0)
    assert b["input_ids"].shape == (2, 12)                           # [12] and [5 + 4] + 3 padding
    assert b["input_ids"][1].tolist() == [7, 7, 8, 8, 9, 4, 4, 5, 6, 0, 0, 0]
    assert b["tokens"] == 12 + 5 + 4 and b["slots"] == 24
    m = b["attention_mask"][1, 0]
    assert not m[:9, 9:].any() and not m[9:, :9].any()               # segments and padding never meet
    assert not m[:5, 5:9].any() and not m[5:9, :5].any()
    assert all(m[q, q] for q in range(12))                           # no empty softmax row


def test_a_pair_whose_sides_start_differently_is_not_shared():
    p = pair(0, [1, 2], [3], [4])
    p["rejected_input_ids"] = [1, 9, 4]
    b = build([p], Layout(True, False), pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 9, 4]]


def test_flash_packs_one_row_without_a_mask_and_refuses_a_shared_prompt():
    layout = resolve(None, None, "flash_attention_2", model_type="llama")
    assert layout == Layout(False, True, one_row=True)
    assert resolve(None, None, "flash_attention_2", model_type="gpt_bigcode") == PLAIN  # drops position_ids
    with pytest.raises(UserError, match="passes position_ids to attention; model type 'gpt_bigcode'"):
        resolve(None, True, "flash_attention_2", model_type="gpt_bigcode")
    b = build([pair(0, [1, 2], [3], [4, 5]), pair(1, [6], [7, 8], [9])], layout, pad_id=0)
    assert b["attention_mask"] is None and b["input_ids"].shape == (1, 3 + 4 + 3 + 2)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]]
    with pytest.raises(UserError, match="flash_attention_2 does not take"):
        resolve(True, None, "flash_attention_2", model_type="llama")
    assert resolve(None, None, "sdpa") == Layout(True, True)
    assert resolve(False, False, "sdpa") == PLAIN
    with pytest.raises(UserError, match="need sdpa, eager or flash_attention_2"):
        resolve(None, True, "flex_attention")
    assert resolve(None, None, "flex_attention") == PLAIN


def test_a_model_the_layouts_cannot_serve_runs_plain_or_is_refused(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert unsupported(model) is None
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert "not all full attention" in unsupported(model)
    model.config.model_type = "mistral"
    assert "not among those checked exact" in unsupported(model)
    assert resolve(None, None, "sdpa", unsupported(model)) == PLAIN
    with pytest.raises(UserError, match="cannot be computed exactly for this model: model type 'mistral'"):
        resolve(True, None, "sdpa", unsupported(model))


def test_block_mask_is_causal_within_a_branch():
    seg = torch.tensor([[0, 0, 0, -1]])
    branch = torch.tensor([[0, 1, 1, 0]])
    m = block_mask(seg, branch)[0, 0]
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]


LENGTHS_PROBE = """
import json, sys, tracemalloc
import datasets, numpy as np, pyarrow as pa
from dpo_ds.model.batch import lengths, longest_row, pair_lengths
from dpo_ds.model.layout import Layout
ds = datasets.Dataset.from_file(sys.argv[1])
view = ds.select(range(len(ds) - 1, -1, -2))  # a selected view: every other row, last first
tracemalloc.start()
out = {"plain": lengths(ds, Layout()), "shared": lengths(ds, Layout(share_prompt=True)), "longest": longest_row(ds),
       "view": lengths(view, Layout(share_prompt=True, packing=True)), "pair_view": pair_lengths(view)}
python_peak, arrow_peak = tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory()
out = {k: np.asarray(v).tolist() for k, v in out.items()}
out.update(python_peak=python_peak, arrow_peak=arrow_peak)
print(json.dumps(out))
"""


def test_the_length_functions_hold_a_few_numbers_per_pair_at_50k_pairs(tmp_path):
    """Issue 39: every phase groups pairs by length at its start (precompute's shard plan, train's batches,
    evaluate), on every rank. On a 50,000-pair split the functions read Arrow offsets and count prompt labels a
    slice at a time: Python and numpy hold under 100 bytes a pair at their peak (measured: 54, of which the
    results 24), Arrow's pool under 8 MB (0.75 MB); the functions before (the token columns as Python lists,
    combine_chunks over the labels) held 51 MB, 1,030 bytes a pair, and fail here. Exact against the lengths the
    rows were made from, a selected view included, in a fresh process (Arrow's peak is per process)."""
    import pyarrow as pa

    n, rng = 50_000, np.random.default_rng(0)
    prompt, chosen, rejected = (rng.integers(1, 60, n) for _ in range(3))
    path = str(tmp_path / "split.arrow")
    schema = pa.schema([("example_id", pa.int64()), *((c, pa.list_(pa.int64())) for c in (
        "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"))])

    def column(sizes, labels_from=None):
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        values = np.arange(offsets[-1]) % 300 + 3
        if labels_from is not None:  # the first labels_from[i] of row i are the prompt's
            values[np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes) < np.repeat(labels_from, sizes)] = IGNORE
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))

    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for s in range(0, n, 1000):  # record batches of 1,000 rows, as prepare writes them
            rows = slice(s, s + 1000)
            c, r, p = prompt[rows] + chosen[rows], prompt[rows] + rejected[rows], prompt[rows]
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(np.arange(s, s + len(p))), column(c), column(c, p), column(r), column(r, p)], schema=schema))
    out = json.loads(subprocess.run([sys.executable, "-c", LENGTHS_PROBE, path], capture_output=True, text=True,
                                    env=child_env(), check=True).stdout)
    c, r = prompt + chosen, prompt + rejected
    assert out["plain"] == np.maximum(c, r).tolist() and out["longest"] == int(max(c.max(), r.max()))
    shared = c + r - prompt
    assert out["shared"] == shared.tolist()
    assert out["view"] == shared[::-1][::2].tolist() and out["pair_view"] == np.maximum(c, r)[::-1][::2].tolist()
    assert out["python_peak"] < 100 * n, out["python_peak"]
    assert out["arrow_peak"] < 8 * 2 ** 20, out["arrow_peak"]
