import math

import torch

from frugal_spin.losses import sft_loss, spin_loss


def test_spin_loss_hand_worked():
    # real reward 0.1*(-10 - -12) = 0.2; generated reward 0.1*(-20 - -18) = -0.2; margin 0.4
    out = spin_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-18.0]),
                    beta=0.1)
    assert math.isclose(out.loss.item(), math.log(1 + math.exp(-0.4)), rel_tol=1e-6)  # 0.5130153
    assert math.isclose(out.margins.item(), 0.4, rel_tol=1e-6)
    assert out.accuracy.item() == 1.0


def test_spin_loss_is_log2_when_player_equals_opponent():
    real, generated = torch.tensor([-3.0, -50.0, -7.5]), torch.tensor([-4.0, -1.0, -80.0])
    out = spin_loss(real, generated, real.clone(), generated.clone(), beta=0.1)
    assert math.isclose(out.loss.item(), math.log(2), rel_tol=1e-7)
    assert out.accuracy.item() == 0.0


def test_spin_loss_mean_over_pairs_and_gradient_direction():
    player_real = torch.tensor([-10.0, -5.0], requires_grad=True)
    player_generated = torch.tensor([-10.0, -9.0], requires_grad=True)
    out = spin_loss(player_real, player_generated, torch.tensor([-10.0, -6.0]), torch.tensor([-10.0, -8.0]), beta=1.0)
    # pair 0: margin 0 -> log 2; pair 1: margin (1) - (-1) = 2 -> log(1 + e^-2)
    assert math.isclose(out.loss.item(), (math.log(2) + math.log(1 + math.exp(-2))) / 2, rel_tol=1e-6)
    out.loss.backward()
    assert (player_real.grad < 0).all() and (player_generated.grad > 0).all()  # raise real, lower generated


def test_spin_loss_is_stable_for_large_margins():
    out = spin_loss(torch.tensor([0.0]), torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert out.loss.item() == 0.0
    out = spin_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert math.isclose(out.loss.item(), 1e4, rel_tol=1e-6)


def test_sft_loss_is_token_average():
    assert math.isclose(sft_loss(torch.tensor([-3.0, -5.0]), torch.tensor([2, 3])).item(), 8 / 5, rel_tol=1e-6)
