"""Hand-worked values for the loss functions."""

import math

import pytest
import torch

from diffalign.losses import diffusion_dpo, per_sample_mse


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
