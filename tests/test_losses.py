import math

import pytest
import torch

from frugal_spin.losses import SPIN_LOSSES, sft_loss, space_per_pair, spin_loss


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


# ------------------------------------------------------------------ the loss family (spin.loss)

def test_hinge_loss_hand_worked():
    # the same pair as above: margin 0.4 -> max(0, 1 - 0.4) = 0.6
    out = spin_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-18.0]),
                    beta=0.1, loss="hinge")
    assert math.isclose(out.loss.item(), 0.6, rel_tol=1e-6)
    assert math.isclose(out.margins.item(), 0.4, rel_tol=1e-6)  # rewards are the same whatever the loss


def test_hinge_loss_is_one_at_equality_and_flat_past_the_margin():
    player_real = torch.tensor([-10.0, -5.0], requires_grad=True)
    player_generated = torch.tensor([-10.0, -9.0], requires_grad=True)
    # pair 0: margin 0 -> 1; pair 1: margin (1) - (-1) = 2 -> max(0, -1) = 0; mean 0.5
    out = spin_loss(player_real, player_generated, torch.tensor([-10.0, -6.0]), torch.tensor([-10.0, -8.0]),
                    beta=1.0, loss="hinge")
    assert math.isclose(out.loss.item(), 0.5, rel_tol=1e-7)
    out.loss.backward()
    # d/dr of mean(1 - (r - r')) over 2 pairs = -1/2 for pair 0; pair 1 is past the margin: no gradient
    assert player_real.grad.tolist() == [-0.5, 0.0] and player_generated.grad.tolist() == [0.5, 0.0]


def test_space_loss_hand_worked():
    # rewards 0.2 and -0.2 (the pair above). mu = 1: softplus(-0.2) + softplus(-0.2) = 2 * 0.5981389 = 1.1962778
    args = (torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-18.0]))
    out = spin_loss(*args, beta=0.1, loss="space")
    assert math.isclose(out.loss.item(), 1.1962778, rel_tol=1e-6)
    # mu = 2: softplus(-(0.2 - ln 2)) + 2 * softplus(-0.2 - ln 2) = 0.9698190 + 2 * 0.3431388 = 1.6560966
    r, g = torch.tensor([0.2]), torch.tensor([-0.2])
    assert math.isclose(space_per_pair(r, g, mu=2.0).item(), 1.6560966, rel_tol=1e-6)


def test_space_loss_at_equal_player_and_opponent_is_two_log_two():
    real, generated = torch.tensor([-3.0, -50.0]), torch.tensor([-4.0, -1.0])
    out = spin_loss(real, generated, real.clone(), generated.clone(), beta=0.1, loss="space")
    assert math.isclose(out.loss.item(), 2 * math.log(2), rel_tol=1e-7)


def test_gap_losses_degenerate_when_the_generated_answer_is_the_real_one_and_space_does_not():
    """SPACE's argument: with y' = y the margin is 0 for every player, so the gap losses (sigmoid, hinge) are constant
    and give no gradient; the NCE loss still has a unique minimum, at the opponent's log-prob."""
    opponent = torch.tensor([-7.0])
    for player_value in (-9.0, -7.0, -5.0):
        for loss in ("sigmoid", "hinge"):
            player = torch.tensor([player_value], requires_grad=True)
            out = spin_loss(player, player, opponent, opponent, beta=0.5, loss=loss)
            out.loss.backward()
            assert math.isclose(out.loss.item(), math.log(2) if loss == "sigmoid" else 1.0, rel_tol=1e-7)
            assert player.grad.item() == 0.0
    values = {}
    for player_value in (-9.0, -7.0, -5.0):
        player = torch.tensor([player_value], requires_grad=True)
        out = spin_loss(player, player, opponent, opponent, beta=0.5, loss="space")
        out.loss.backward()
        values[player_value] = (out.loss.item(), player.grad.item())
    # r = 0.5 * (p - (-7)) = -1, 0, 1: softplus(1) + softplus(-1) = 1.6265233 on both sides, 2 log 2 at r = 0
    assert math.isclose(values[-9.0][0], 1.6265233, rel_tol=1e-6) and math.isclose(values[-5.0][0], 1.6265233,
                                                                                    rel_tol=1e-6)
    assert math.isclose(values[-7.0][0], 2 * math.log(2), rel_tol=1e-7) and values[-7.0][1] == 0.0
    assert values[-9.0][1] < 0 < values[-5.0][1]  # pulled back to the opponent's value from both sides


def test_every_loss_raises_real_and_lowers_generated():
    for loss in SPIN_LOSSES:
        player_real = torch.tensor([-10.0], requires_grad=True)
        player_generated = torch.tensor([-10.0], requires_grad=True)
        out = spin_loss(player_real, player_generated, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1,
                        loss=loss)
        out.loss.backward()
        assert player_real.grad.item() < 0 < player_generated.grad.item(), loss


def test_space_loss_is_stable_for_large_rewards():
    out = spin_loss(torch.tensor([0.0]), torch.tensor([-1e4]), torch.tensor([-1e4]), torch.tensor([0.0]), beta=1.0,
                    loss="space")
    assert out.loss.item() == 0.0
    out = spin_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-1e4]), beta=1.0,
                    loss="space")
    assert math.isclose(out.loss.item(), 2e4, rel_tol=1e-6)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown SPIN loss 'ipo'"):
        spin_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1, loss="ipo")


def test_at_zero_rewards_sigmoid_and_space_have_the_same_gradient_and_hinge_twice_it():
    """Why the three losses train alike while the rewards stay small (|β·Δlog p| << 1, as in the CPU runs):
    d/dr(y), d/dr(y') are (-1/2, +1/2) for sigmoid and space and (-1, +1) for hinge at r = 0, and Adam's updates do
    not depend on a constant gradient scale. They part only once the rewards reach order 1."""
    grads = {}
    for loss in SPIN_LOSSES:
        player_real = torch.tensor([-10.0], requires_grad=True)
        player_generated = torch.tensor([-20.0], requires_grad=True)
        spin_loss(player_real, player_generated, torch.tensor([-10.0]), torch.tensor([-20.0]), beta=1.0,
                  loss=loss).loss.backward()
        grads[loss] = (player_real.grad.item(), player_generated.grad.item())
    assert grads == {"sigmoid": (-0.5, 0.5), "space": (-0.5, 0.5), "hinge": (-1.0, 1.0)}


def test_the_recipe_accepts_exactly_the_losses_there_are():
    """One tuple of names (config.SPIN_LOSS_NAMES): spin.loss and compare.spin_losses accept exactly it, and
    losses.py has one per-pair function for each of its names."""
    import typing

    from frugal_spin import losses
    from frugal_spin.config import SPIN_LOSS_NAMES, CompareConfig, SpinConfig

    assert typing.get_args(typing.get_type_hints(SpinConfig)["loss"]) == SPIN_LOSS_NAMES
    (member,) = typing.get_args(typing.get_type_hints(CompareConfig)["spin_losses"])
    assert typing.get_args(member) == SPIN_LOSS_NAMES
    assert losses.SPIN_LOSSES == SPIN_LOSS_NAMES and tuple(losses._PER_PAIR) == SPIN_LOSS_NAMES
