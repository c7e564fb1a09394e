"""Evaluation of the current adapter on held-out data.

Inputs: the model, held-out examples (real answers), and the *anchor pairs*: held-out prompts with answers sampled
from the SFT model and the SFT model's log-probs of both answers, made once after SFT.
Outputs: a flat dict of metrics:
- `heldout_nll`: token-averaged NLL of the real held-out answers (lower is better);
- `spin_loss`, `reward_margin`, `reward_accuracy`: the SPIN objective on the anchor pairs with the SFT model as
  the opponent. After SFT these are log 2, 0 and 0 by construction; after SPIN iteration t they show how far the
  player has moved towards the real answers and away from SFT-style answers, on prompts it never trained on.
  A fixed opponent makes the numbers comparable across iterations (and with a continued-SFT baseline). The loss
  is always the paper's sigmoid member, whatever `spin.loss` trained with, so every loss is measured alike;
- `anchor_real_logp_change`, `anchor_generated_logp_change`: the mean change, in nats per answer, of the model's
  log-prob of the real and of the SFT-sampled answers on the anchor pairs against the SFT model: whether a margin
  comes from raising real answers or from pushing sampled ones down (both 0 after SFT);
- `exact_match`: greedy answers equal to the real ones, only for tasks whose answers can be checked exactly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from frugal_spin.data import Encoded
from frugal_spin.generate import generate_answers
from frugal_spin.losses import spin_loss
from frugal_spin.scoring import score_pairs, score_responses


def heldout_nll(model, examples: Sequence[Encoded], *, pad_id: int, batch_size: int, chunk_size: int,
                autocast=None) -> float:
    logps = score_responses(model, [(e.prompt_ids, e.answer_ids) for e in examples], pad_id=pad_id,
                            batch_size=batch_size, chunk_size=chunk_size, autocast=autocast)
    return -logps.sum().item() / sum(len(e.answer_ids) for e in examples)


def anchor_spin_metrics(model, prompts, real, generated, opponent_real: torch.Tensor,
                        opponent_generated: torch.Tensor, *, beta: float, pad_id: int, batch_size: int,
                        chunk_size: int, autocast=None) -> dict[str, float]:
    """Scored with the same batching and precision (`autocast`) as the cache, so the SFT model reproduces its own
    numbers bit for bit."""
    player_real, player_generated = score_pairs(model, list(zip(prompts, real, generated)), pad_id=pad_id,
                                                batch_size=batch_size, chunk_size=chunk_size, autocast=autocast)
    out = spin_loss(player_real, player_generated, opponent_real, opponent_generated, beta)  # always sigmoid
    return {"spin_loss": out.loss.item(), "reward_margin": out.margins.mean().item(),
            "reward_accuracy": out.accuracy.item(),
            "anchor_real_logp_change": (player_real - opponent_real).mean().item(),
            "anchor_generated_logp_change": (player_generated - opponent_generated).mean().item()}


def exact_match(model, tokenizer, examples: Sequence[Encoded], answers: Sequence[str],
                is_correct: Callable[[str, str], bool], *, max_new_tokens: int, batch_size: int
                ) -> tuple[float, list[str], int]:
    """Greedy answers to the held-out prompts, decoded without special tokens and checked against the real ones.
    Returns (accuracy, the answers, how many tokens were generated)."""
    generated = generate_answers(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, temperature=0.0)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    correct = sum(is_correct(text, answer) for text, answer in zip(texts, answers))
    return correct / max(1, len(examples)), texts, sum(len(ids) for ids in generated)
