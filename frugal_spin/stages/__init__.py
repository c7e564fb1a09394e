"""The work of every stage, one module per family, in the order a run meets them (plan.py lists the stages):

    sft.py         SFT on the real answers, and compare's continued-SFT blocks  -> sft/adapter, block_<t>/adapter
    opponent.py    the opponent's answers and log-probs: the anchor pairs of     -> eval/anchor_*,
                   every evaluation, then per iteration generate and score          iter_<t>/pairs.jsonl, *_logps
    spin.py        SPIN training, the player starting from the opponent          -> iter_<t>/adapter
    evaluation.py  held-out NLL, SPIN metrics on the anchor pairs, exact match; lm-evaluation-harness

(Setup, which loads what the others share, is context.py.) `WORK` maps a `StageSpec.work` name to its `Work`: a
fingerprint function and a work function, both given a runner.Job. Adding a stage: its entry in plan.py and its
`Work` here.
"""

from __future__ import annotations

from frugal_spin.runner import Work
from frugal_spin.stages import evaluation, opponent, sft, spin

WORK: dict[str, Work] = {
    "sft": sft.SFT,
    "continued_sft": sft.CONTINUED_SFT,
    "anchor": opponent.ANCHOR,
    "generate": opponent.GENERATE,
    "score": opponent.SCORE,
    "score_previous": opponent.SCORE_PREVIOUS,
    "spin": spin.SPIN,
    "eval": evaluation.EVAL,
    "lm_eval": evaluation.LM_EVAL,
}
