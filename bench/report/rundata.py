"""Read a finished run directory into one object the report works from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.run.rundir import RunDir
from bench.run.leaderboard import COSTS, PREDICTOR, SHORTCUT
from core.errors import BenchError
from core.metrics import base_metric


class RunData:
    """Everything the report needs from ``run_dir`` (nothing is recomputed by training).

    Attributes
    ----------
    config, manifest, state : the run's files.
    classes : class names; ``y`` int labels and ``folds`` fold numbers, aligned with folds.csv.
    entries : DataFrame, one row per candidate and ensemble (``name``, ``kind``, ``members``),
        in leaderboard order.
    oof : name -> (N, K) out-of-fold probabilities.
    units : name -> list of per-fold ``result.json`` dicts (candidates only).
    external : set name -> ``(scores, per_class, meta)`` of each external set scored at the
        end of the run (``external/<NAME>/``; :meth:`RunDir.read_external`), names as str.
    leakage : ``leakage.csv`` of the leakage audit (grouped against image-level scores,
        :mod:`bench.protocols.leakage`), or ``None`` when the run has none; ``leakage_error`` says why
        it could not be read.
    """

    def __init__(self, run_dir):
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.path
        rd = self.rundir
        rd.check_finished()
        self.config = rd.config  # the run's typed config (bench.config.Config)
        self.manifest = rd.read_manifest()
        self.state = rd.state
        self.classes = rd.classes
        self.folds_table = rd.folds_table
        self.y = rd.labels
        self.splits = rd.folds
        self.folds = rd.folds.folds
        self.fold_ids = rd.folds.fold_ids
        # the fold metric the per-fold statistics use; a worst/mean-lab ranking is the labs
        # section's (bench.report.labs)
        self.metric = base_metric(self.config.run.metric)
        board = rd.read_leaderboard()
        self.oof, self.units, self.costs, self.stress, rows = {}, {}, {}, {}, []
        for _, r in board.iterrows():
            name = str(r["candidate"])
            p = rd.read_oof(name)
            if p.shape != (len(self.y), len(self.classes)):
                raise BenchError(
                    f"{rd.oof_file(name)}: shape {p.shape}, expected "
                    f"{(len(self.y), len(self.classes))}"
                )
            self.oof[name] = p
            members = r.get("members")
            members = [] if not isinstance(members, str) or not members else members.split(";")
            rows.append({"name": name, "kind": str(r["kind"]), "members": members})
            self.costs[name] = {
                c: float(r[c]) if c in r and pd.notna(r[c]) else float("nan") for c in COSTS
            }
            # the stress test's columns ([stress]): the run's metric under simulated shift
            self.stress[name] = {
                c: float(r[c]) for c in board.columns if c.startswith("stress_") and pd.notna(r[c])
            }
            if r["kind"] != "ensemble":
                self.units[name] = [rd.unit_result(name, k) for k in self.fold_ids]
        self.entries = pd.DataFrame(rows)
        self.names = list(self.entries["name"])
        # roles (bench.run.leaderboard.set_roles): the saved predictor's entry, the
        # colour-only shortcuts; a run written before the column existed gets them from its
        # state and config
        shortcuts = set(self.config.colour_only_candidates()) & set(self.names)
        saved = self.state.get("predictor")
        if "role" in board:
            roles = dict(zip(board["candidate"].astype(str), board["role"].fillna("")))
            saved = next((n for n, r in roles.items() if r == PREDICTOR), saved)
            shortcuts |= {n for n, r in roles.items() if r == SHORTCUT}
        self.shortcuts = shortcuts
        self.predictor = saved if saved in self.names else None
        self.external, self.external_errors = {}, {}
        for name in rd.external_sets():
            try:
                scores, per_class, meta = rd.read_external(name)
                scores["candidate"] = scores["candidate"].astype(str)
                per_class["candidate"] = per_class["candidate"].astype(str)
                per_class["class"] = per_class["class"].astype(str)
            except Exception as exc:  # noqa: BLE001 - the rest of the report stays useful
                self.external_errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            self.external[name] = (scores, per_class, meta)
        self.leakage, self.leakage_error = None, None
        try:
            self.leakage = rd.read_leakage()
        except Exception as exc:  # noqa: BLE001 - the rest of the report stays useful
            self.leakage_error = f"{type(exc).__name__}: {exc}"

    def unit_dir(self, name: str, fold: int) -> Path:
        return self.rundir.unit_dir(name, fold)

    def role(self, name: str) -> str:
        """``predictor``, ``shortcut`` or empty (:func:`bench.run.leaderboard.set_roles`)."""
        return PREDICTOR if name == self.predictor else SHORTCUT if name in self.shortcuts else ""

    def reference(self, order) -> str:
        """The entry the report's statistics compare against: the saved predictor, else the
        first entry of ``order`` (a leaderboard order) that is not a shortcut, else the first."""
        if self.predictor:
            return self.predictor
        order = list(order)
        return next((n for n in order if n not in self.shortcuts), order[0])

    def kind(self, name: str) -> str:
        return str(self.entries.set_index("name").loc[name, "kind"])

    def members(self, name: str) -> list[str]:
        return list(self.entries.set_index("name").loc[name, "members"])

    def images(self) -> np.ndarray:
        """The run's images (memory-mapped), rows aligned with folds.csv."""
        return self.rundir.images

    def fold_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Test and train sizes per fold."""
        n_test = np.array([len(test) for _, _, test in self.splits])
        return n_test, len(self.folds) - n_test

    @property
    def title(self) -> str:
        ds = self.manifest.get("dataset", {})
        origin = ds.get("origin") or self.manifest.get("data_path") or ""
        return Path(str(origin)).name or self.run_dir.name
