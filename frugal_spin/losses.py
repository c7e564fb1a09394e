"""Loss functions: pure tensor maths, no model, no I/O.

Inputs are summed sequence log-probs (fp32, one value per sequence) as produced by `frugal_spin.logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sft_loss(sum_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Token-averaged negative log-likelihood of the real answers.

        L_SFT(θ) = − Σ_i log p_θ(y_i | x_i) / Σ_i |y_i|

    Averaging over tokens (not sequences) matches the usual causal-LM loss, so learning rates carry over from
    other tools. `sum_logps[i]` is Σ_t log p_θ(y_i,t | x_i, y_i,<t); `n_tokens[i]` is |y_i|.
    """
    return -sum_logps.sum() / n_tokens.sum().clamp(min=1)


@dataclass
class SpinLossOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    real_rewards: torch.Tensor  # [B] λ·(log p_θ(y|x) − log p_θt(y|x)), detached
    generated_rewards: torch.Tensor  # [B] λ·(log p_θ(y'|x) − log p_θt(y'|x)), detached

    @property
    def margins(self) -> torch.Tensor:
        return self.real_rewards - self.generated_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Fraction of pairs whose real answer gained more (relative to the opponent) than the generated one."""
        return (self.margins > 0).float().mean()


def spin_loss(
    player_real: torch.Tensor,
    player_generated: torch.Tensor,
    opponent_real: torch.Tensor,
    opponent_generated: torch.Tensor,
    beta: float,
) -> SpinLossOutput:
    """The SPIN loss (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language
    Models", https://arxiv.org/abs/2401.01335, eq. 4.7) with the logistic loss ℓ(t) = log(1 + e^(−t)):

        L_SPIN = mean_i ℓ( λ·[log p_θ(y_i|x_i) − log p_θt(y_i|x_i)] − λ·[log p_θ(y'_i|x_i) − log p_θt(y'_i|x_i)] )

    y is the real answer, y' the opponent's generated one, θ the player, θt the opponent, λ = `beta`.
    When the player equals the opponent the argument is 0 and the loss is log 2.
    ℓ(t) = softplus(−t), which is the numerically stable form for large |t|.
    """
    real_rewards = beta * (player_real - opponent_real)
    generated_rewards = beta * (player_generated - opponent_generated)
    loss = F.softplus(-(real_rewards - generated_rewards)).mean()
    return SpinLossOutput(loss, real_rewards.detach(), generated_rewards.detach())
