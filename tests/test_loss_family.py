"""Every loss of the family against its paper's equation, written out here independently in float64; LD-DPO,
WPO and the head metrics against a naive full-softmax computation on a tiny model; `dpo_ds.evaluate` for
every loss type; format-1 caches.
    scripts/test.sh tests/test_loss_family.py
"""
import json
import math
import os
import shutil

import datasets
import pytest
import torch
from conftest import run_module
from transformers import AutoModelForCausalLM

from dpo_ds import cache as R
from dpo_ds import cli, evaluate
from dpo_ds import config as C
from dpo_ds.config import LOSS_TYPES
from dpo_ds.errors import CacheError, ConfigError
from dpo_ds.model.batch import collate
from dpo_ds.model.logps import SequenceLogps, pair_logps
from dpo_ds.model.pair import Pair
from dpo_ds.objective.loss import f_difference, pair_loss, preference_losses
from dpo_ds.objective.step import batch_losses
from dpo_ds.storage.files import atomic_json, read_json
from dpo_ds.storage.fingerprint import sha256_file

B = 48


def logsig(z):
    """log σ(z) = -log(1 + e^-z), as logaddexp: finite for any z (independent of F.logsigmoid)."""
    return -torch.logaddexp(torch.zeros_like(z), -z)


def sig(z):
    return torch.exp(logsig(z))


def paper(loss_type, pw, pl, rw, rl, nw, nl, beta, eps, delta=0.0, tau=0.05):
    """Each loss as its paper writes it, from policy (pw, pl) and reference (rw, rl) summed log-probs."""
    uw, ul = pw - rw, pl - rl                      # log π/π_ref per response
    h = uw - ul
    if loss_type == "sigmoid":                     # Rafailov et al. 2023 eq. 7; cDPO with ε
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if loss_type == "robust":                      # Chowdhury et al. 2024 eq. 9: ((1-ε)L(y_w≻y_l) - εL(y_l≻y_w))/(1-2ε)
        return ((1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":                       # Zhao et al. 2023 (SLiC-HF), δ = 1
        return torch.clamp(1 - beta * h, min=0)
    if loss_type == "ipo":                         # Azar et al. 2023 eq. 17 on per-token log-probs
        hn = (pw / nw - rw / nw) - (pl / nl - rl / nl)
        return (hn - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":                    # Ji et al. 2024: Σ_i p_θ(i) log(p_θ(i) / p_ε(i)), K = 2
        p = torch.stack([sig(beta * h), sig(-beta * h)])
        logp = torch.stack([logsig(beta * h), logsig(-beta * h)])
        target = torch.tensor([1 - eps, eps], dtype=h.dtype).unsqueeze(-1)
        return (p * (logp - torch.log(target))).sum(0)
    if loss_type == "nca_pair":                    # Chen et al. 2024, NCA with K = 2
        return -logsig(beta * uw) - 0.5 * logsig(-beta * uw) - 0.5 * logsig(-beta * ul)
    if loss_type == "bco_pair":                    # Jung et al. 2024: -log σ(r_w - δ) - log σ(-(r_l - δ))
        return -logsig(beta * uw - delta) - logsig(-(beta * ul - delta))
    if loss_type == "sppo_hard":                   # Wu et al. 2024 with P̂ = 1 for y_w, 0 for y_l
        return (uw - 0.5 / beta) ** 2 + (ul + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):       # Melnyk et al. 2024: sort, then the smoothed logistic loss
        d = (torch.sort(pw - pl).values - torch.sort(rw - rl).values) if loss_type == "aot" else \
            (torch.sort(uw).values - torch.sort(ul).values)
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if loss_type == "apo_zero":                    # D'Oosterlinck et al. 2024
        return (1 - sig(beta * uw)) + sig(beta * ul)
    if loss_type == "apo_down":
        return sig(beta * uw) + (1 - sig(beta * (uw - ul)))
    if loss_type == "discopop":                    # Lu et al. 2024 (LRML): ρ = βh, f = (1-σ(ρ/τ))·logistic + σ(ρ/τ)·exp
        rho = beta * h
        mod = sig(rho / tau)
        return (1 - mod) * -logsig(rho) + mod * torch.exp(-rho)
    if loss_type == "sigmoid_norm":                # open-instruct dpo_norm: DPO on per-token log-probs
        hn = (pw / nw - rw / nw) - (pl / nl - rl / nl)
        return -(1 - eps) * logsig(beta * hn) - eps * logsig(-beta * hn)
    if loss_type == "sft":
        return -pw / nw
    raise AssertionError(loss_type)


def random_pairs(seed, scale=1.0):
    """Summed log-probs [B] float64 with margins up to ±`scale`·300 (large: log σ must not overflow)."""
    g = torch.Generator().manual_seed(seed)
    rw, rl = -torch.rand(B, generator=g, dtype=torch.float64) * 400, -torch.rand(B, generator=g, dtype=torch.float64) * 400
    pw = rw + (torch.rand(B, generator=g, dtype=torch.float64) - 0.5) * 600 * scale
    pl = rl + (torch.rand(B, generator=g, dtype=torch.float64) - 0.5) * 600 * scale
    pw[:4], pl[:4] = rw[:4], rl[:4]                # policy = reference: h = 0
    nw = torch.randint(1, 300, (B,), generator=g).double()
    nl = torch.randint(1, 300, (B,), generator=g).double()
    return pw, pl, rw, rl, nw, nl


def inputs(pw, pl, rw, rl, nw, nl):
    """(policy, reference) Pairs."""
    return Pair.of(pw, pl, nw, nl), Pair.of(rw, rl)


EPSILONS = {t: ((0.0, 0.1, 0.3) if t in C.SMOOTHED else (0.0,)) for t in LOSS_TYPES}
EPSILONS["exo_pair"] = (1e-3, 0.1, 0.3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_is_its_papers_equation_with_gradients(loss_type):
    """Values to float64 rounding, at several β and ε, margins large enough that a naive log(sigmoid) overflows
    (the largest β·h is ~300 in float64 (discopop's exp(-βh) itself stays finite)); gradients with respect
    to the policy log-probs against autograd of the equation above."""
    margins = 0.5 if loss_type in ("sppo_hard", "discopop") else 1.0
    for seed, beta in ((0, 0.05), (1, 0.1), (2, 1.0)):
        for eps in EPSILONS[loss_type]:
            pw, pl, rw, rl, nw, nl = random_pairs(seed, margins)
            got_w, got_l = pw.clone().requires_grad_(), pl.clone().requires_grad_()
            want_w, want_l = pw.clone().requires_grad_(), pl.clone().requires_grad_()
            got = pair_loss(loss_type, *inputs(got_w, got_l, rw, rl, nw, nl), beta, eps, bco_delta=0.3)
            want = paper(loss_type, want_w, want_l, rw, rl, nw, nl, beta, eps, delta=0.3)
            assert torch.isfinite(want).all()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{beta} {eps}: {m}")
            got.sum().backward()
            want.sum().backward()
            gw, gl = got_w.grad, (got_l.grad if got_l.grad is not None else torch.zeros_like(pl))
            ww, wl = want_w.grad, (want_l.grad if want_l.grad is not None else torch.zeros_like(pl))
            torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-12, msg=lambda m: f"d/dπ_w {beta} {eps}: {m}")
            torch.testing.assert_close(gl, wl, rtol=1e-10, atol=1e-12, msg=lambda m: f"d/dπ_l {beta} {eps}: {m}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_no_overflow_at_extreme_margins_in_fp32(loss_type, f_divergence):
    """Margins of ±10^4 nats in float32, on either response: every loss and gradient finite (log-sigmoid
    forms, exponents capped below float32's overflow)."""
    if f_divergence != "reverse_kl" and loss_type not in C.F_DIVERGED:
        pytest.skip("the divergence does not apply")
    big = torch.tensor([1e4, -1e4, 0.0, 50.0, -1e4, -100.0], dtype=torch.float32)
    pw, pl = big.clone().requires_grad_(), big.flip(0).clone().requires_grad_()
    zeros = torch.zeros(6)
    eps = 0.1 if loss_type in C.SMOOTHED else 0.0
    loss = pair_loss(loss_type, Pair.of(pw, pl, zeros + 3, zeros + 3), Pair.of(zeros, zeros), 0.1, eps,
                     f_divergence, 0.5 if f_divergence == "alpha_divergence" else None)
    loss.sum().backward()
    grads = [g for g in (pw.grad, pl.grad) if g is not None]
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads), (loss, grads)


@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_follow_beyond_reverse_kl(f_divergence):
    """Wang et al. 2023, eq. 11: -log σ(β f'(π(y_w)/π_ref(y_w)) - β f'(π(y_l)/π_ref(y_l))), with f' of Table 1
    written on the ratio u itself (constants included: they cancel)."""
    alpha = 0.3
    fprime = {"reverse_kl": lambda u: torch.log(u) + 1, "forward_kl": lambda u: -1 / u,
              "js_divergence": lambda u: torch.log(2 * u / (1 + u)),
              "alpha_divergence": lambda u: (1 - u ** -alpha) / alpha}[f_divergence]
    g = torch.Generator().manual_seed(3)
    rw, rl = -torch.rand(B, generator=g, dtype=torch.float64) * 100, -torch.rand(B, generator=g, dtype=torch.float64) * 100
    pw, pl = rw + torch.randn(B, generator=g, dtype=torch.float64) * 8, rl + torch.randn(B, generator=g, dtype=torch.float64) * 8
    uw, ul = torch.exp(pw - rw), torch.exp(pl - rl)
    for beta in (0.1, 0.5):
        want = -logsig(beta * (fprime(uw) - fprime(ul)))
        got = pair_loss("sigmoid", *inputs(pw, pl, rw, rl, pw * 0 + 1, pl * 0 + 1), beta,
                        f_divergence=f_divergence, f_alpha=alpha if f_divergence == "alpha_divergence" else None)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # forward KL is the α-divergence at α = 1
    torch.testing.assert_close(f_difference(pw - rw, pl - rl, "forward_kl"),
                               f_difference(pw - rw, pl - rl, "alpha_divergence", 1.0))


def test_mixture_sums_weighted_losses_and_wpo_multiplies():
    pw, pl, rw, rl, nw, nl = random_pairs(4, 0.1)
    x = inputs(pw, pl, rw, rl, nw, nl)
    cfg = C.LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    want = paper("sigmoid", pw, pl, rw, rl, nw, nl, 0.1, 0.0) + 0.2 * paper("sft", pw, pl, rw, rl, nw, nl, 0.1, 0.0)
    torch.testing.assert_close(preference_losses(*x, cfg), want, rtol=1e-12, atol=1e-12)
    w = torch.rand(B, dtype=torch.float64)
    torch.testing.assert_close(preference_losses(*x, cfg, weights=w), want * w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("settings, message", [
    ({"loss_type": ["robust"], "label_smoothing": 0.5}, "must be in \\[0, 0.5\\)"),
    ({"loss_type": ["exo_pair"], "label_smoothing": 0.0}, "exo_pair needs --label_smoothing > 0"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 value\\(s\\) for 2"),
    ({"loss_type": ["sigmoid", "dpo"]}, "unknown"),
    ({"loss_type": ["sft"]}, "not preference optimisation"),
    ({"loss_type": ["hinge"], "label_smoothing": 0.1}, "--label_smoothing applies to"),
    ({"loss_type": ["apo_zero"], "f_divergence": "js_divergence"}, "none of --loss_type apo_zero uses it"),
    ({"f_divergence": "alpha_divergence", "f_alpha": 1.0}, "must be in \\(0, 1\\)"),
    ({"f_alpha": 0.5}, "alpha_divergence only"),
    ({"ld_alpha": 1.5}, "must be in \\[0, 1\\]"),
    ({"loss_type": ["aot"], "use_weighting": True}, "sorted log-ratios"),
])
def test_invalid_combinations_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        C.LossConfig(**settings).check_loss()


def test_defaults_derived_from_the_loss():
    """One flag alone never produces a refusal: exo_pair gets EXO's ε, alpha_divergence its α."""
    assert C.LossConfig(loss_type=["exo_pair"]).label_smoothing == 1e-3
    assert C.LossConfig(loss_type=["exo_pair", "sft"]).label_smoothing == 1e-3
    with pytest.raises(ConfigError, match="give it explicitly"):  # EXO's ε would smooth sigmoid too
        C.LossConfig(loss_type=["sigmoid", "exo_pair"]).check_loss()
    assert C.LossConfig(f_divergence="alpha_divergence").f_alpha == 0.5
    for t in LOSS_TYPES[:-1]:
        C.LossConfig(loss_type=[t]).check_loss()


# ---------------------------------------------------------------- on a model: LD-DPO, WPO, the head metrics

@pytest.fixture(scope="module")
def models(tiny):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float64)
    with torch.no_grad():  # away from the reference, so log-ratios (and gradients) are not trivial
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float64).eval()


def per_token(model, batch):
    """[2B] lists of per-token (log p(target), full log-softmax row) for each sequence, in float64."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for i in range(batch["input_ids"].shape[0]):
        where = (batch["labels"][i, 1:] != -100).nonzero().squeeze(-1)
        rows = logits[i, where].log_softmax(-1)
        out.append((rows.gather(-1, batch["labels"][i, where + 1].unsqueeze(-1)).squeeze(-1), rows, logits[i, where]))
    return out


@pytest.fixture(scope="module")
def batch(prepared):
    ds = datasets.load_from_disk(f"{prepared}/train")
    return collate([ds[i] for i in range(6)], pad_id=0)


def test_ld_dpo_equals_a_per_token_computation_with_a_live_reference(models, batch, prepared, cache):
    """LD-DPO: per-token log-probs of policy and live reference, the first min(|y_w|, |y_l|) tokens + α × the
    rest, DPO on those. The training path (chunked policy, shared-length values from the cache) equals it in
    loss and gradients; α = 1 is plain DPO."""
    policy, reference = models
    cached = R.open_cache(cache, prepared).reference("train", shared=True)
    Bn = batch["example_id"].numel()
    for alpha in (0.0, 0.5, 1.0):
        policy.zero_grad()
        cfg = C.LossConfig(ld_alpha=alpha)
        losses, _ = batch_losses(SequenceLogps(policy, chunk_size=7, stats=True), batch, cached, cfg)
        losses.mean().backward()
        got = {n: p.grad.clone() for n, p in policy.named_parameters()}
        policy.zero_grad()
        pol = per_token(policy, batch)
        with torch.no_grad():
            ref = per_token(reference, batch)

        def ld(tokens, i):
            shared = min(len(tokens[i][0]), len(tokens[(i + Bn) % (2 * Bn)][0]))
            return tokens[i][0][:shared].sum() + alpha * tokens[i][0][shared:].sum()

        pw, pl = (torch.stack([ld(pol, i + o) for i in range(Bn)]) for o in (0, Bn))
        rw, rl = (torch.stack([ld(ref, i + o) for i in range(Bn)]) for o in (0, Bn))
        want = -logsig(0.1 * ((pw - pl) - (rw - rl)))
        want.mean().backward()
        # the cache holds fp32 values of the reference: the documented cache tolerance
        torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-5, atol=1e-6)
        for n, p in policy.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"α {alpha} {n}: {m}")
        if alpha == 1.0:
            plain, _ = batch_losses(SequenceLogps(policy, chunk_size=7, stats=True), batch, cached, C.LossConfig())
            torch.testing.assert_close(losses, plain, rtol=0, atol=1e-5)  # fp32 cache: shared + (sum - shared)


def test_wpo_weights_and_head_metrics_equal_a_full_softmax(models, batch):
    """The statistics computed inside the chunked head (no [B, T, V] tensor kept) against the full softmax."""
    policy, _ = models
    with torch.no_grad():
        p = pair_logps(SequenceLogps(policy, chunk_size=5, stats=True), batch)
        full = per_token(policy, batch)
    Bn = batch["example_id"].numel()
    stats = {k: torch.cat([getattr(p.chosen.stats, k), getattr(p.rejected.stats, k)]) for k in p.chosen.stats._fields}
    with torch.no_grad():  # without LD-DPO's sums (a loss without --ld_alpha): the same values, none of those
        q = pair_logps(SequenceLogps(policy, chunk_size=5, stats=True), batch, shared=False)
    assert q.chosen.shared_logps is None and q.rejected.shared_logps is None
    assert torch.equal(q.chosen.logps, p.chosen.logps) and torch.equal(q.rejected.stats.wpo, p.rejected.stats.wpo)
    for i, (logp, logsm, logits) in enumerate(full):
        probs = logsm.exp()
        target = batch["labels"][i, 1:][batch["labels"][i, 1:] != -100]
        want = {"entropy": -(probs * logsm).sum(-1).sum(), "top1": (logits.argmax(-1) == target).double().sum(),
                "mean_logit": logits.mean(-1).sum(), "wpo": (logp - torch.log((probs ** 2).sum(-1))).sum()}
        for k, v in want.items():
            assert stats[k][i].item() == pytest.approx(v.item(), rel=1e-9, abs=1e-9), (k, i)
    # WPO's pair weight: exp of the two responses' per-token means (Zhou et al. 2024, eq. 6)
    n = torch.tensor([len(f[0]) for f in full], dtype=torch.float64)
    w = torch.exp(stats["wpo"][:Bn] / n[:Bn] + stats["wpo"][Bn:] / n[Bn:])
    ref = torch.zeros(Bn, dtype=torch.float64)
    x_cfg = C.LossConfig(use_weighting=True)
    weighted, _ = batch_losses(SequenceLogps(policy, chunk_size=5, stats=True), batch,
                               lambda b: Pair.of(ref - 50, ref - 50), x_cfg)
    plain, _ = batch_losses(SequenceLogps(policy, chunk_size=5, stats=True), batch,
                            lambda b: Pair.of(ref - 50, ref - 50), C.LossConfig())
    torch.testing.assert_close(weighted.detach(), plain.detach() * w, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- evaluate, caches

@pytest.mark.parametrize("loss_type", LOSS_TYPES[:-1] + ("sigmoid sft",))
def test_evaluate_reports_every_loss(tiny, prepared, cache, loss_type, tmp_path):
    """`python -m dpo_ds.evaluate --loss_type X`: the SFT model against its own cache gives each loss at zero
    log-ratios, where the equation is known in closed form."""
    types = loss_type.split()
    out = tmp_path / "m.json"
    argv = ["--model", tiny[0], "--data", prepared, "--ref_cache", cache, "--split", "eval", "--output", str(out),
            "--loss_type", *types]
    if types == ["sigmoid", "sft"]:
        argv += ["--loss_weights", "1", "0.5"]
    m = evaluate.run(cli.parse(C.EvalConfig, argv))
    assert json.load(open(out))["loss"] == m["loss"]
    zero = torch.zeros(1, dtype=torch.float64)
    eps = 1e-3 if types == ["exo_pair"] else 0.0
    want = paper(types[0], zero, zero, zero, zero, zero + 1, zero + 1, 0.1, eps).item()
    if types == ["sigmoid", "sft"]:  # ln 2 + half the chosen responses' per-token NLL
        assert m["loss"] > want + 0.5, m
    else:  # zero log-ratios up to the cache's fp32 rounding (another batching recomputes the policy side)
        assert m["loss"] == pytest.approx(want, abs=2e-4), (loss_type, m)
    assert m["entropy"] > 0 and 0 <= m["mean_token_accuracy"] <= 1 and m["num_tokens"] > 0, m
    assert math.isfinite(m["logits/chosen"]) and math.isfinite(m["logits/rejected"]), m


def test_format_1_cache_serves_every_loss_but_ld_dpo(tiny, prepared, cache, tmp_path):
    """A cache written before the shared-length columns: read for the losses that need only the sums, refused
    with what to do for LD-DPO."""
    import pyarrow as pa

    old = str(tmp_path / "v1")
    shutil.copytree(cache, old)
    manifest = read_json(os.path.join(old, R.MANIFEST))
    manifest["fingerprint"]["format_version"] = 1
    for split, entry in manifest["splits"].items():
        for meta in entry["shards"]:
            path = os.path.join(old, split, meta["file"])
            with open(path, "rb") as f:  # into memory: the file is rewritten below
                table = pa.ipc.open_file(pa.BufferReader(f.read())).read_all().drop_columns(list(R.SHARED_COLUMNS))
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            meta["sha256"] = sha256_file(path)
    atomic_json(os.path.join(old, R.MANIFEST), manifest)
    opened = R.open_cache(old, prepared, tiny[0])
    ref = opened.reference("eval")
    ds = datasets.load_from_disk(f"{prepared}/eval")
    values = ref(collate([ds[0], ds[1]], 0))
    assert values.chosen.shared_logps is None and values.chosen.logps.shape == (2,)
    with pytest.raises(CacheError, match="format-1 cache.*LD-DPO.*rerun dpo_ds.precompute"):
        opened.reference("eval", shared=True)
    with pytest.raises(CacheError, match="format-1 cache"):
        evaluate.run(cli.parse(C.EvalConfig, ["--model", tiny[0], "--data", prepared, "--ref_cache", old,
                                            "--ld_alpha", "0.5"]))


# ---------------------------------------------------------------- 2 ranks, ZeRO-3: each family trains

FAMILY_RUNS = {
    **{t: {"loss_type": [t]} for t in LOSS_TYPES if t != "sft"},
    "rpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2]},
    "js_divergence": {"f_divergence": "js_divergence"},
    "alpha_divergence": {"f_divergence": "alpha_divergence", "f_alpha": 0.5},
    "forward_kl": {"f_divergence": "forward_kl"},
    "ld_dpo": {"ld_alpha": 0.5},
    "wpo": {"use_weighting": True},
}


def test_two_rank_zero3_runs_lower_each_loss(tiny, prepared, cache, tmp_path):
    """3 steps of each loss family on 2 ranks (ZeRO-3) lower that same loss on the train split (evaluated by
    dpo_ds.evaluate with the run's settings, before and after; measured: by 0.6 % (sigmoid_norm) to 7.5 %)."""
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(FAMILY_RUNS))
    run_module("tests.loss_family_runs", "--model", tiny[0], "--data", prepared, "--ref_cache", cache,
               "--out", tmp_path, "--runs", runs, launcher=2, timeout=1500)
    results = json.load(open(tmp_path / "results.json"))
    assert set(results) == set(FAMILY_RUNS)
    worse = {name: r for name, r in results.items() if not r["after"] < r["before"]}
    assert not worse, worse


def test_job_file_names_losses_as_a_list_or_one_string(tmp_path):
    base = {"model": "m", "data": "d", "ref_cache": "r", "output_dir": "o", "deepspeed": "z.json"}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({**base, "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.2], "ld_alpha": 0.5}))
    cfg = cli.parse(C.TrainConfig, ["--config", str(job)])
    assert (cfg.loss_type, cfg.weights(), cfg.ld_alpha) == (["sigmoid", "sft"], [1.0, 0.2], 0.5)
    job.write_text(json.dumps({**base, "loss_type": "ipo"}))
    assert cli.parse(C.TrainConfig, ["--config", str(job), "--beta", "0.3"]).loss_type == ["ipo"]
    cfg = cli.parse(C.TrainConfig, ["--config", str(job), "--loss_type", "robust", "--label_smoothing", "0.2"])
    assert (cfg.loss_type, cfg.label_smoothing) == (["robust"], 0.2)
    job.write_text(json.dumps({**base, "loss_type": ["exo_pair"], "label_smoothing": 0}))
    with pytest.raises(ConfigError, match="exo_pair needs"):
        cli.parse(C.TrainConfig, ["--config", str(job)])
