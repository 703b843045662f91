"""The loss family written out by hand, and the cached-reference vs two-model equivalence.
    scripts/test.sh tests/test_loss.py
"""
import math

import datasets
import pytest
import torch
from independent import dpo_loss, naive_sequence_logps
from transformers import AutoModelForCausalLM

from dpo_ds import config as C
from dpo_ds.cache.read import open_cache
from dpo_ds.model.batch import collate
from dpo_ds.model.logps import SequenceLogps, sequence_logps
from dpo_ds.model.pair import HeadStats, Logps, Pair
from dpo_ds.objective.metrics import MetricSums
from dpo_ds.objective.step import batch_losses

PC, PR, RC, RR = (torch.tensor(v) for v in ([-10.0, -20.0], [-12.0, -18.0], [-11.0, -19.0], [-11.5, -19.5]))


def test_sigmoid_is_the_dpo_equation():
    beta = 0.1
    want = [-math.log(1 / (1 + math.exp(-beta * ((pc - pr) - (rc - rr)))))
            for pc, pr, rc, rr in zip(*(t.tolist() for t in (PC, PR, RC, RR)))]
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta), torch.tensor(want))


def test_label_smoothing_hinge_ipo():
    beta, eps = 0.5, 0.2
    z = beta * ((PC - PR) - (RC - RR))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "sigmoid", eps),
                               -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z)))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "hinge"), torch.clamp(1 - z, min=0))
    nc, nr = torch.tensor([4, 5]), torch.tensor([2, 10])
    h = (PC / nc - PR / nr) - (RC / nc - RR / nr)
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "ipo", 0, nc, nr), (h - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta, "ipo")


def test_metrics_match_definitions():
    beta = 0.1
    nc, nr = torch.tensor([4, 5]), torch.tensor([2, 10])
    stats = [HeadStats(*torch.rand(4, 2).unbind()) for _ in range(2)]
    policy = Pair(Logps(PC, nc, PC / 2, stats[0]), Logps(PR, nr, PR / 2, stats[1]))
    m = MetricSums.of_batch(dpo_loss(PC, PR, RC, RR, beta), policy, Pair.of(RC, RR), beta, tokens=40).mean()
    rc, rr = beta * (PC - RC), beta * (PR - RR)
    assert m["rewards/chosen"] == pytest.approx(rc.mean().item())
    assert m["rewards/rejected"] == pytest.approx(rr.mean().item())
    assert m["rewards/accuracies"] == pytest.approx((rc > rr).float().mean().item())
    assert m["rewards/margins"] == pytest.approx((rc - rr).mean().item())
    assert m["logps/win_rate"] == pytest.approx((PC > PR).float().mean().item())
    assert m["loss"] == pytest.approx(dpo_loss(PC, PR, RC, RR, beta).mean().item())
    # per token: the head's sums over every chosen (and rejected) token, divided by their counts
    assert m["entropy"] == pytest.approx((stats[0].entropy.sum() + stats[1].entropy.sum()).item() / 21)
    assert m["mean_token_accuracy"] == pytest.approx(stats[0].top1.sum().item() / 9)
    assert m["logits/chosen"] == pytest.approx(stats[0].mean_logit.sum().item() / 9)
    assert m["logits/rejected"] == pytest.approx(stats[1].mean_logit.sum().item() / 12)


def test_chunked_logps_equal_naive_with_padding_and_any_chunk(tiny, prepared):
    model = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    rows = [datasets.load_from_disk(f"{prepared}/train")[i] for i in range(5)]
    batch = collate(rows, pad_id=0)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        want = naive_sequence_logps(model, *args)
        for chunk in (1, 5, 64, 4096):
            got, n = sequence_logps(model, *args, chunk_size=chunk)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert n.tolist() == [int((l[1:] != -100).sum()) for l in batch["labels"]]


def test_cached_reference_equals_two_model_loss_and_gradients(tiny, prepared, cache):
    """The training path (chunked policy log-probs + cached reference) against the design document's
    two-model computation (full log_softmax policy + a live frozen reference model)."""
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny[0])
    with torch.no_grad():  # move the policy away from the reference so the gradients are not trivial
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    ds = datasets.load_from_disk(f"{prepared}/train")
    batch = collate([ds[i] for i in range(6)], pad_id=0)
    B, beta = 6, 0.1

    cached = open_cache(cache, prepared).reference("train")
    losses, _ = batch_losses(SequenceLogps(policy, chunk_size=16, stats=True), batch, cached,
                             C.LossConfig(beta=beta))  # train's step
    cached_loss = losses.mean()
    cached_loss.backward()
    cached_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy_logps = naive_sequence_logps(policy, *args)
    with torch.no_grad():
        ref_logps = naive_sequence_logps(reference, *args)
    two_model_loss = dpo_loss(policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:], beta).mean()
    two_model_loss.backward()

    assert abs(cached_loss.item() - two_model_loss.item()) < 1e-5
    assert cached_loss.item() != pytest.approx(math.log(2), abs=1e-3), "policy must differ from reference"
    for n, p in policy.named_parameters():
        torch.testing.assert_close(cached_grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_pure_modules_stay_light():
    """House rule: config imports no torch; config, loss, sources, encode import no deepspeed."""
    import subprocess
    import sys

    code = ("import sys, dpo_ds.config; assert 'torch' not in sys.modules; "
            "import dpo_ds.objective.loss, dpo_ds.data.sources, dpo_ds.data.encode; assert 'deepspeed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    # the objective and the batch builder: neither deepspeed nor the engine that wraps the model
    code = ("import sys, dpo_ds.objective.step, dpo_ds.objective.metrics, dpo_ds.model.batch, dpo_ds.model.logps; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m.startswith('dpo_ds.engine')]")
    subprocess.run([sys.executable, "-c", code], check=True)
