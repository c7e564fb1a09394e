"""Live curves while a run trains: TensorBoard event files under `<output_dir>/tb/` and/or Weights & Biases.

What is logged (both sinks get the same scalars, at the same step):
- after every optimizer step of a training stage: `<kind>/loss`, `<kind>/lr`, `<kind>/tokens_per_s` and, for
  SPIN, `spin/reward_margin`, `spin/reward_accuracy`, `spin/real_reward`, `spin/generated_reward`, where `<kind>` is
  `sft` or `spin` (the continued-SFT arms of `compare` log as `sft`);
- after every evaluation: `eval/<metric>` (held-out NLL, SPIN loss, reward margin/accuracy, exact match).
Step: the run's cumulative optimizer step (SFT's steps, then each SPIN iteration's), so the iterations form one
curve and each evaluation sits at the step it evaluated, as in metrics.png. A resumed run continues at the same
steps (the offset comes from the finished stages' markers, not from this process's memory).

Off by default (`log.tensorboard`, `log.wandb`). TensorBoard goes through torch's own `SummaryWriter`, which needs
the `tensorboard` package; wandb is imported only when asked for. A missing package is one `error:` line at
start-up, before the run directory is touched (`check_log_backends`).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from frugal_spin.errors import UserError

EVAL_SCALARS = ("heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match")


def check_log_backends(cfg) -> None:
    """Fail fast, with the install line, when a sink is switched on but its package is missing."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError('log.tensorboard is true but the tensorboard package is not installed '
                        '(pip install "frugal_spin[tensorboard]", or set log.tensorboard=false)')
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError('log.wandb is true but wandb is not installed (pip install "frugal_spin[wandb]", or set '
                        'log.wandb=false)')


class LiveLog:
    """The sinks a recipe asked for; every method is a no-op when none is on."""

    def __init__(self, cfg, run_dir: Path, config: dict[str, Any] | None = None):
        check_log_backends(cfg)
        self.writer = None
        self.wandb_run = None
        from frugal_spin.distributed import current as current_world

        if not current_world().writes_here:  # several ranks log the same numbers: rank 0 writes them
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), flush_secs=10)
        if cfg.wandb:
            wandb = importlib.import_module("wandb")
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=Path(run_dir).name, dir=str(run_dir),
                                        config=config or {})

    @property
    def enabled(self) -> bool:
        return self.writer is not None or self.wandb_run is not None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=step)

    def train_step(self, kind: str, step: int, values: dict[str, float]) -> None:
        """One optimizer step's values (`loss`, `lr`, `tokens_per_s`, step metrics) as `<kind>/<name>`."""
        self.scalars({f"{kind}/{name}": float(v) for name, v in values.items()}, step)

    def evaluation(self, metrics: dict[str, Any], step: int) -> None:
        self.scalars({f"eval/{k}": float(metrics[k]) for k in EVAL_SCALARS if isinstance(metrics.get(k), (int, float))},
                     step)
        if self.writer is not None:
            self.writer.flush()  # an evaluation is worth seeing at once

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
