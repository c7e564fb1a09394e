"""Loss functions: pure tensor maths, no model, no I/O.

Inputs are summed sequence log-probs (fp32, one value per sequence) as produced by `frugal_spin.logprobs`.

The SPIN loss family (`spin.loss`): every member scores the same two rewards of a pair,

    r(y)  = λ·[log p_θ(y|x)  − log p_θt(y|x)]      (the real answer y)
    r(y') = λ·[log p_θ(y'|x) − log p_θt(y'|x)]     (the opponent's generated answer y')

with θ the player, θt the opponent and λ = `spin.beta`; they differ in how the rewards become a loss:

- `sigmoid`: ℓ(r(y) − r(y')), ℓ(t) = log(1 + e^(−t)) (the SPIN paper's logistic loss; the default);
- `hinge`:   max(0, 1 − (r(y) − r(y'))) (the official SPIN code's `loss_type="hinge"`);
- `space`:   −log σ(r(y)) − log(1 − σ(r(y'))) (noise-contrastive estimation on the two absolute rewards, after
  SPACE, arXiv 2512.07175; see `space_per_pair` for exactly what is taken from the paper and what is not).

The first two depend on the margin r(y) − r(y') only, so they go flat when the generated answers become as likely
as the real ones (any θ that keeps the margin is optimal); the third keeps pushing the real answer's reward up
and the generated answer's down separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frugal_spin.config import SPIN_LOSS_NAMES

SPIN_LOSSES = SPIN_LOSS_NAMES  # the recipe's names (config.py); _PER_PAIR below has one function per name


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


def sigmoid_per_pair(real_rewards: torch.Tensor, generated_rewards: torch.Tensor) -> torch.Tensor:
    """The SPIN paper's loss (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong
    Language Models", https://arxiv.org/abs/2401.01335, eq. 4.7, with the logistic ℓ of its section 4):

        ℓ(r(y) − r(y')),   ℓ(t) = log(1 + e^(−t)) = softplus(−t)

    softplus is the numerically stable form for large |t|. Equal rewards give log 2."""
    return F.softplus(-(real_rewards - generated_rewards))


def hinge_per_pair(real_rewards: torch.Tensor, generated_rewards: torch.Tensor) -> torch.Tensor:
    """The hinge alternative of the official SPIN code (github.com/uclaml/SPIN, `spin/alignment/trainer.py`,
    `loss_type == "hinge"`: `torch.relu(1 - self.beta * logits)` with logits = (player real − player generated)
    − (opponent real − opponent generated)):

        max(0, 1 − (r(y) − r(y')))

    Equal rewards give 1; pairs whose margin already exceeds 1 contribute neither loss nor gradient."""
    return torch.relu(1.0 - (real_rewards - generated_rewards))


def space_per_pair(real_rewards: torch.Tensor, generated_rewards: torch.Tensor, mu: float = 1.0) -> torch.Tensor:
    """Noise-contrastive estimation on absolute rewards, after SPACE (Wang et al., "SPACE: Noise Contrastive
    Estimation Stabilizes Self-Play Fine-Tuning for Large Language Models", NeurIPS 2025, arXiv 2512.07175):

        − log σ_μ(r(y)) − μ · log(1 − σ_μ(r(y'))),   σ_μ(u) = 1 / (1 + μ·e^(−u)) = σ(u − log μ)
        = softplus(−(r(y) − log μ)) + μ · softplus(r(y') − log μ)

    What is taken from SPACE (read in public summaries of the paper; its full text was not available here): the
    reward is the log-ratio of player to opponent, real answers are told from generated ones as a binary
    classification (NCE) with the σ_μ above, and the two rewards are optimised *independently*, not through their
    gap. What is filled in, and may depart from the paper: the way the two terms combine is the standard binary NCE
    objective of Gutmann & Hyvärinen (2010, "Noise-contrastive estimation: a new estimation principle for
    unnormalized statistical models", AISTATS), ν = μ noise samples per data sample, weighting the noise term by μ;
    the rewards carry SPIN's λ (= `spin.beta`; λ = 1 gives the plain log-ratio); and μ = 1 in training, because
    every pair holds one real and one generated answer (a noise-to-data ratio of 1).

    Equal rewards r give log(1 + μ) + μ·log(1 + 1/μ): 2·log 2 for μ = 1. Where the gap losses are constant in θ
    once y' = y (the margin is 0 whatever θ is: SPACE's "degenerated objective"), this one becomes
    softplus(−r) + softplus(r) with r = r(y) = r(y'), which has a unique minimum at r = 0: keep the opponent's
    probability of an answer it already gets right."""
    log_mu = math.log(mu)
    return F.softplus(-(real_rewards - log_mu)) + mu * F.softplus(generated_rewards - log_mu)


_PER_PAIR = {"sigmoid": sigmoid_per_pair, "hinge": hinge_per_pair, "space": space_per_pair}


def spin_loss(
    player_real: torch.Tensor,
    player_generated: torch.Tensor,
    opponent_real: torch.Tensor,
    opponent_generated: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
) -> SpinLossOutput:
    """A member of the SPIN loss family (module docstring), mean over pairs:

        L = mean_i f( λ·[log p_θ(y_i|x_i) − log p_θt(y_i|x_i)],  λ·[log p_θ(y'_i|x_i) − log p_θt(y'_i|x_i)] )

    y is the real answer, y' the opponent's generated one, θ the player, θt the opponent, λ = `beta`, and f the
    per-pair loss named by `loss` (`SPIN_LOSSES`). With the default `sigmoid` this is the SPIN paper's eq. 4.7;
    when the player equals the opponent it is log 2."""
    if loss not in _PER_PAIR:
        raise ValueError(f"unknown SPIN loss {loss!r} (known: {', '.join(SPIN_LOSSES)})")
    real_rewards = beta * (player_real - opponent_real)
    generated_rewards = beta * (player_generated - opponent_generated)
    value = _PER_PAIR[loss](real_rewards, generated_rewards).mean()
    return SpinLossOutput(value, real_rewards.detach(), generated_rewards.detach())
