"""Losses and sequence log-probs against the formulas of fspo-method.md §2, computed by hand."""

import math

import pytest
import torch

from fspo_ray.losses import preference_loss, sequence_logps, sft_loss

IGNORE = -100


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sequence_logps_sums_completion_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, 6], [IGNORE, 2, 2, IGNORE, IGNORE]])
    logp = torch.log_softmax(logits, -1)
    # the logits at t predict the token at t+1
    expected = [logp[0, 1, 3] + logp[0, 2, 1] + logp[0, 3, 6], logp[1, 0, 2] + logp[1, 1, 2]]
    assert torch.allclose(sequence_logps(logits, labels), torch.stack(expected))


def test_sequence_logps_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="do not align"):
        sequence_logps(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))


def test_sft_loss_is_mean_negative_sequence_logprob():
    assert sft_loss(torch.tensor([-3.0, -5.0])).item() == pytest.approx(4.0)


POLICY_W, POLICY_L, REF_W, REF_L = -10.0, -14.0, -11.0, -12.0  # h = (-10+14) - (-11+12) = 3


def losses(**kwargs):
    t = lambda x: torch.tensor([x])  # noqa: E731
    out = preference_loss(t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L), **kwargs)
    return [o.item() for o in out]


def test_dpo():
    loss, r_w, r_l = losses(beta=0.1, kind="dpo")
    assert loss == pytest.approx(-log_sigmoid(0.3))
    assert r_w == pytest.approx(0.1 * (-10 + 11)) and r_l == pytest.approx(0.1 * (-14 + 12))


def test_conservative_dpo_label_smoothing():
    loss, _, _ = losses(beta=0.1, kind="dpo", label_smoothing=0.2)
    assert loss == pytest.approx(-0.8 * log_sigmoid(0.3) - 0.2 * log_sigmoid(-0.3))


def test_reference_free_dpo_drops_the_reference_margin():
    loss, _, _ = losses(beta=0.1, kind="dpo", reference_free=True)
    assert loss == pytest.approx(-log_sigmoid(0.1 * 4))


def test_ipo():
    loss, r_w, r_l = losses(beta=0.05, kind="ipo")
    assert loss == pytest.approx((3 - 1 / (2 * 0.05)) ** 2)  # (3 - 10)^2 = 49
    assert r_w == pytest.approx(0.05) and r_l == pytest.approx(-0.1)


def test_ipo_with_the_preferred_answers_nll():
    loss, r_w, r_l = losses(beta=0.05, kind="ipo", sft_weight=0.5)
    assert loss == pytest.approx(49 + 0.5 * 10)  # + 0.5 · (−lpθ(yw)), lpθ(yw) = −10
    assert r_w == pytest.approx(0.05) and r_l == pytest.approx(-0.1)  # the rewards do not see it


def test_rewards_are_detached_and_loss_has_gradient():
    w = torch.tensor([POLICY_W], requires_grad=True)
    loss, r_w, _ = preference_loss(w, torch.tensor([POLICY_L]), torch.tensor([REF_W]), torch.tensor([REF_L]), 0.1)
    assert not r_w.requires_grad
    loss.sum().backward()
    # d/dw of -log σ(β h) = -β (1 - σ(β h))
    assert w.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.3))))


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta"), ({"beta": 0.1, "kind": "kto"}, "kind"),
    ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
    ({"beta": 0.1, "kind": "ipo", "label_smoothing": 0.1}, "dpo only"),
])  # fmt: skip
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses(**kwargs)
