"""Hand-worked values for the loss functions."""

import math

import pytest
import torch

from diffalign.losses import diffusion_dpo, mapo, mapo_link, per_sample_mse


def test_equal_errors_give_log2():
    e = torch.tensor([0.3, 0.7])
    loss, m = diffusion_dpo(e, e, e, e, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["implicit_accuracy"].item() == 0.0          # inside == 0 is not > 0
    assert m["inside"].item() == 0.0


def test_hand_worked_value():
    # inside = -0.5 * 10 * ((0.1 - 0.2) - (0.15 - 0.15)) = 0.5 ; loss = log(1 + exp(-0.5))
    loss, m = diffusion_dpo(torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.15]), torch.tensor([0.15]), 10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert m["implicit_accuracy"].item() == 1.0
    assert m["inside"].item() == pytest.approx(0.5)


def test_mean_over_pairs_and_sign():
    # pair 1: inside = +1 (policy prefers winner more than the reference); pair 2: inside = -1
    err_w = torch.tensor([0.0, 0.2])
    err_l = torch.tensor([0.2, 0.0])
    ref = torch.tensor([0.0, 0.0])
    loss, m = diffusion_dpo(err_w, err_l, ref, ref, beta=10.0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["implicit_accuracy"].item() == 0.5


def test_gradient_direction():
    err_w = torch.tensor([0.5], requires_grad=True)
    err_l = torch.tensor([0.5], requires_grad=True)
    loss, _ = diffusion_dpo(err_w, err_l, torch.tensor([0.5]), torch.tensor([0.5]), beta=2.0)
    loss.backward()
    # at inside = 0: dloss/dinside = -sigmoid(0) = -0.5 ; dinside/derr_w = -0.5*beta = -1
    assert err_w.grad.item() == pytest.approx(0.5)      # lowering the winner's error lowers the loss
    assert err_l.grad.item() == pytest.approx(-0.5)     # raising the loser's error lowers the loss


def test_reference_errors_carry_no_gradient_into_the_policy_term():
    ref_w = torch.tensor([0.1], requires_grad=True)
    loss, _ = diffusion_dpo(torch.tensor([0.1]), torch.tensor([0.1]), ref_w, torch.tensor([0.1]), beta=2.0)
    loss.backward()
    assert ref_w.grad.item() == pytest.approx(-0.5)     # opposite sign to the policy's winner error


def test_per_sample_mse_is_a_mean_not_a_sum():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    target[1] *= 2
    assert per_sample_mse(pred, target).tolist() == [1.0, 4.0]


def test_fp16_inputs_are_computed_in_fp32():
    e = torch.tensor([0.1], dtype=torch.float16)
    loss, _ = diffusion_dpo(e, e * 2, e, e, beta=5000.0)
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- MaPO
def _g(err, s=0.5):
    x = s * err
    return x / math.expm1(x)


def test_mapo_link_hand_values_and_limits():
    assert mapo_link(torch.tensor([0.1])).item() == pytest.approx(0.05 / math.expm1(0.05), rel=1e-6)
    assert mapo_link(torch.tensor([2.0])).item() == pytest.approx(1 / math.expm1(1.0), rel=1e-6)   # 0.581977
    err = torch.tensor([0.0, 1e-9, 1e-5, 1e3, 1e6], requires_grad=True)
    g = mapo_link(err)
    assert g[0].item() == 1.0 and g[1].item() == pytest.approx(1.0) and g[2].item() == pytest.approx(1 - 2.5e-6)
    assert g[3].item() == pytest.approx(500 * math.exp(-500), abs=1e-30) and g[4].item() == 0.0
    g.sum().backward()
    assert torch.isfinite(err.grad).all()
    assert err.grad[0].item() == pytest.approx(-0.25)     # g'(0) = -s/2


def test_mapo_hand_worked_value():
    # T = 10 keeps the sigmoid off saturation: margin = g(0.1) - g(0.2) = 0.975208 - 0.950833 = 0.024375
    loss, m = mapo(torch.tensor([0.1]), torch.tensor([0.2]), beta=0.1, num_timesteps=10)
    margin = _g(0.1) - _g(0.2)
    assert margin == pytest.approx(0.024375, abs=1e-6)
    expected = 0.1 + 0.1 * math.log1p(math.exp(-10 * margin))       # mean(err_w) - beta * logsigmoid(T*margin)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.1578680, abs=1e-6)
    assert m["implicit_accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(margin, rel=1e-5)


def test_mapo_equal_errors_and_gradient_direction():
    e = torch.tensor([0.3, 0.3], requires_grad=True)
    loss, m = mapo(e[:1], e[1:], beta=0.1)
    assert loss.item() == pytest.approx(0.3 + 0.1 * math.log(2), rel=1e-6)
    assert m["implicit_accuracy"].item() == 0.0
    loss.backward()
    # d/de_w = 1 (SFT) + beta*T*sigmoid(-0)*(-g'(e_w)) ... g' < 0, so the margin term also pushes e_w down
    assert e.grad[0].item() > 1.0
    assert e.grad[1].item() < 0.0                        # raising the loser's error lowers the loss


def test_mapo_has_no_nan_or_overflow_at_extremes():
    for err_w, err_l in [(0.0, 0.0), (1e-12, 1e-6), (1e4, 1e5), (0.0, 1e6), (1e6, 0.0)]:
        w = torch.tensor([err_w], requires_grad=True)
        l_ = torch.tensor([err_l], requires_grad=True)
        loss, _ = mapo(w, l_, beta=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and torch.isfinite(l_.grad).all(), (err_w, err_l)


def test_mapo_fp16_inputs_are_computed_in_fp32():
    e = torch.tensor([0.1], dtype=torch.float16)
    loss, _ = mapo(e, e * 2, beta=0.1)
    assert loss.dtype == torch.float32
