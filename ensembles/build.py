"""Ensembles from a config: members, honest fold-by-fold scores, and the saved choice.

The runner hands this module the candidates' out-of-fold probabilities; it returns the
ensembles' out-of-fold probabilities and leaderboard rows, and, for the chosen entry,
the fitted ensemble to save. It reads and writes no files.
"""

from __future__ import annotations

import time

import numpy as np

from core import registry
from core.errors import BenchError
from core.metrics import fold_metrics, summarize
from core.splits import PredefinedFolds
from ensembles.base import Ensemble, cross_val_combine, fold_groups
from ensembles.voting import SoftVoting


def ensemble_members(spec, kinds: dict[str, str]) -> list[str]:
    """Member names from an ensemble's ``members``: "cnn", "all", or a list of names."""
    if spec in (None, "cnn"):
        return [n for n, k in kinds.items() if k == "cnn"]
    if spec == "all":
        return list(kinds)
    if isinstance(spec, list):
        missing = [m for m in spec if m not in kinds]
        if missing:
            raise BenchError(f"ensemble members {missing} are not candidates of this run")
        return list(spec)
    raise BenchError(f"ensemble members must be 'cnn', 'all' or a list of names, got {spec!r}")


def build_ensemble(entry: dict, name: str = "") -> Ensemble:
    """The (unfitted) ensemble of a config entry (``type`` + its settings)."""
    params = {k: v for k, v in entry.items() if k not in ("type", "members")}
    try:
        return registry.get(entry["type"])(**params)
    except TypeError as exc:
        raise BenchError(f"[ensembles.{name}]: bad settings ({exc})") from None


def fit_ensemble(ens: Ensemble, probas, y, name: str, folds, cross_val: bool = True):
    """Out-of-fold ensemble probabilities (``cross_val``) or the ensemble fitted on all rows
    (the rows' folds passed to ensembles that declare ``uses_fold_groups``); a bad setting
    becomes one line naming the ensemble."""
    try:
        if cross_val:
            return cross_val_combine(ens, probas, y, folds)
        return ens.fit(probas, y, **fold_groups(ens, folds))
    except ValueError as exc:
        raise BenchError(f"[ensembles.{name}]: {exc}") from None


def evaluate_ensembles(entries: dict, oofs: dict[str, np.ndarray], kinds: dict[str, str],
                       y: np.ndarray, folds: PredefinedFolds, warn=None):
    """Score every configured ensemble fold by fold on the shared folds.

    Returns ``(rows, oof)``: one leaderboard row per ensemble (metrics mean ± std over
    folds, ``members``, ``member_weights`` fitted on all rows, ``combine_seconds``) and
    each ensemble's out-of-fold probabilities.
    """
    rows, out = [], {}
    for name, entry in entries.items():
        members = ensemble_members(entry.get("members", "cnn"), kinds)
        if not members:
            if warn:
                warn(f"ensemble '{name}' has no members in this run; skipped")
            continue
        ens = build_ensemble(entry, name)
        probas = [oofs[m] for m in members]
        t = time.perf_counter()
        oof = fit_ensemble(ens, probas, y, name, folds.folds)
        combine_s = time.perf_counter() - t
        weights = fit_ensemble(ens, probas, y, name, folds.folds,
                               cross_val=False).member_weights()
        out[name] = oof
        per_fold = [fold_metrics(y[test], oof[test]) for _, _, test in folds]
        rows.append({"candidate": name, "kind": "ensemble", **summarize(per_fold),
                     "combine_seconds": combine_s, "n_folds": len(per_fold),
                     "members": ";".join(members),
                     "member_weights": "" if weights is None else   # fitted on all rows
                     ";".join(f"{m}:{w:.3f}" for m, w in zip(members, weights))})
    return rows, out


def choose_entry(board, choice: str = "best"):
    """The leaderboard row to save: ``choice`` by name, else the best ensemble (the
    board is sorted by the run metric), else the best candidate."""
    if choice != "best":
        if choice not in set(board["candidate"]):
            raise BenchError(f"[predictor] ensemble '{choice}' is not on the leaderboard")
        return board[board["candidate"] == choice].iloc[0]
    ens_rows = board[board["kind"] == "ensemble"]
    return ens_rows.iloc[0] if len(ens_rows) else board.iloc[0]


def final_ensemble(name: str, kind: str, entries: dict, oofs: dict[str, np.ndarray],
                   kinds: dict[str, str], y: np.ndarray, folds: PredefinedFolds):
    """``(members, ensemble)`` to save for entry ``name``: an ensemble's weights or
    meta-learner fitted on all out-of-fold rows, members with weight 0 dropped; a single
    candidate becomes a one-member soft vote."""
    if kind != "ensemble":
        return [name], SoftVoting().fit([oofs[name]], y)
    entry = entries[name]
    members = ensemble_members(entry.get("members", "cnn"), kinds)
    ens = build_ensemble(entry, name)
    fit_ensemble(ens, [oofs[m] for m in members], y, name, folds.folds, cross_val=False)
    return [members[i] for i in ens.drop_unused()], ens
