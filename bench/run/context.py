"""What the stages of ``bench run`` share: the :class:`RunContext` one run passes from stage
to stage, and the :class:`Stage` record the runner's list is made of.

A stage is ``Stage(name, run, enabled)``: ``enabled(ctx)`` says whether this run has it
(most read one setting of ``ctx.cfg``), ``run(ctx)`` does its work and leaves what later
stages need on ``ctx`` (the leaderboard ``board``, the out-of-fold probabilities
``stored``, ...). A protocol module of :mod:`bench.protocols` (``labs``, ``patients``,
``external``, ``leakage``, ``stress``, ``distill``) defines its stage beside its work; the runner lists them in order (:data:`bench.run.runner.STAGES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from bench.config import Config
from bench.data.datasets import Dataset
from bench.run.leaderboard import to_markdown
from bench.run.rundir import RunDir
from core.metrics import base_metric


@dataclass
class RunContext:
    """One run on its way through the stages."""

    cfg: Config
    run: RunDir
    ds: Dataset
    fp: dict  # the run's fingerprint (bench.run.prepare.fingerprint)
    # bench.run.runner.run_benchmark: the protocols that run the benchmark again on a derived
    # config (leave-one-lab-out, the leakage audit) call it without importing the runner
    rerun: Callable[..., pd.DataFrame]
    workers: int | None = None
    scheduler: Any = None
    show_progress: bool = True
    predictor: bool = True  # save a predictor (False: a protocol's own sub-run)
    times: dict = field(default_factory=dict)  # stage name -> seconds (the manifest's)
    board: pd.DataFrame | None = None  # the leaderboard, as the stages extend it
    kinds: dict = field(default_factory=dict)  # candidate -> "cnn" | "baseline" | ...
    stored: dict = field(default_factory=dict)  # entry -> out-of-fold rows, as in oof/
    stored_stress: dict | None = None  # shift -> entry -> the same under the shift
    bag_choice: Any = None  # the patient stage's choice (a bag task)

    @property
    def fold_metric(self) -> str:
        """The per-fold metric that ranks before any lab column exists."""
        return base_metric(self.cfg.run.metric)

    @property
    def board_metric(self) -> str:
        """``[run] metric`` once the leaderboard has its column, else the per-fold one."""
        return self.cfg.run.metric if self.cfg.run.metric in self.board else self.fold_metric

    def write_board(self, metric: str | None = None) -> None:
        """Write the leaderboard (CSV and Markdown) as it stands."""
        self.run.write_leaderboard(self.board, to_markdown(self.board, metric or self.board_metric))

    def store(self, probas: dict[str, np.ndarray], stressed: dict | None) -> None:
        """Keep every entry's out-of-fold probabilities as written to ``oof/`` (float32):
        the fits saved later are reproducible from the run directory alone."""
        self.stored = {n: p.astype(np.float32).astype(np.float64) for n, p in probas.items()}
        self.stored_stress = {
            s: {n: p.astype(np.float32).astype(np.float64) for n, p in d.items()}
            for s, d in (stressed or {}).items()
        } or None


def always(ctx: RunContext) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """A step of ``bench run``: ``run(ctx)`` when ``enabled(ctx)``; its seconds are recorded
    under ``name`` in the manifest's ``stage_seconds`` unless ``timed`` is false."""

    name: str
    run: Callable[[RunContext], None]
    enabled: Callable[[RunContext], bool] = always
    timed: bool = True


__all__ = ["RunContext", "Stage", "always"]
