"""Ensembles from a config: members, honest fold-by-fold scores, and the saved choice.

The runner hands this module the candidates' out-of-fold probabilities (and, with
``[stress]``, the same under each simulated shift); it returns the ensembles' out-of-fold
probabilities and leaderboard rows, and, for the chosen entry, the fitted ensemble to save.
An ensemble with ``stress = true`` is fitted on the members' shifted rows as well as the
clean ones, so its weights or meta-learner favour members that hold up under a shift. It
reads and writes no files.
"""

from __future__ import annotations

import time

import numpy as np

from core import registry
from core.errors import BenchError
from core.metrics import base_metric, fold_metrics, metric_sort_ascending, summarize
from core.splits import PredefinedFolds
from ensembles.base import Ensemble, cross_val_combine_sets, fold_groups, stacked_sets
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


def build_ensemble(entry, name: str = "") -> Ensemble:
    """The (unfitted) ensemble of a config entry (its ``type`` and ``params()``: the typed
    ``[ensembles.NAME]`` entry of the config)."""
    try:
        return registry.get(entry.type)(**entry.params())
    except TypeError as exc:
        raise BenchError(f"[ensembles.{name}]: bad settings ({exc})") from None


def member_sets(name: str, entry, members: list[str], oofs: dict, stressed: dict | None):
    """``(sets, fit_sets)``: the members' clean rows, then their rows under each simulated
    shift; ensemble ``name`` is fitted on the first ``fit_sets`` of them."""
    sets = [[oofs[m] for m in members]]
    sets += [[by_name[m] for m in members] for by_name in (stressed or {}).values()]
    if entry.stress and len(sets) == 1:
        raise BenchError(f"[ensembles.{name}]: stress = true needs [stress] shifts")
    return sets, (len(sets) if entry.stress else 1)


def fit_ensemble(
    ens: Ensemble, sets, y, name: str, folds, cross_val: bool = True, fit_sets: int = 1
):
    """Out-of-fold ensemble probabilities of each set of member probabilities in ``sets``
    (``cross_val``: :func:`ensembles.base.cross_val_combine_sets`) or the ensemble fitted
    on all rows of the first ``fit_sets`` sets (the rows' folds passed to ensembles that
    declare ``uses_fold_groups``); a bad setting becomes one line naming the ensemble."""
    try:
        if cross_val:
            return cross_val_combine_sets(ens, sets, y, folds, fit_sets)
        probas, y_all, folds_all = stacked_sets(sets[:fit_sets], y, folds)
        return ens.fit(probas, y_all, **fold_groups(ens, folds_all))
    except ValueError as exc:
        raise BenchError(f"[ensembles.{name}]: {exc}") from None


def evaluate_ensembles(
    entries: dict,
    oofs: dict[str, np.ndarray],
    kinds: dict[str, str],
    y: np.ndarray,
    folds: PredefinedFolds,
    warn=None,
    stressed: dict[str, dict[str, np.ndarray]] | None = None,
):
    """Score every configured ensemble fold by fold on the shared folds.

    ``stressed``: ``{shift: {candidate: out-of-fold probabilities under the shift}}``.

    Returns ``(rows, oof, stressed_oof)``: one leaderboard row per ensemble (metrics mean
    ± std over folds, ``members``, ``member_weights`` fitted on all rows,
    ``combine_seconds``), each ensemble's out-of-fold probabilities, and
    ``{shift: {ensemble: its out-of-fold probabilities under the shift}}``.
    """
    rows, out = [], {}
    out_stressed = {s: {} for s in (stressed or {})}
    for name, entry in entries.items():
        members = ensemble_members(entry.members, kinds)
        if not members:
            if warn:
                warn(f"ensemble '{name}' has no members in this run; skipped")
            continue
        ens = build_ensemble(entry, name)
        sets, fit_sets = member_sets(name, entry, members, oofs, stressed)
        t = time.perf_counter()
        outs = fit_ensemble(ens, sets, y, name, folds.folds, fit_sets=fit_sets)
        combine_s = time.perf_counter() - t
        weights = fit_ensemble(
            ens, sets, y, name, folds.folds, cross_val=False, fit_sets=fit_sets
        ).member_weights()
        out[name] = oof = outs[0]
        for s, o in zip(out_stressed, outs[1:]):
            out_stressed[s][name] = o
        per_fold = [fold_metrics(y[test], oof[test]) for _, _, test in folds]
        rows.append(
            {
                "candidate": name,
                "kind": "ensemble",
                **summarize(per_fold),
                "combine_seconds": combine_s,
                "n_folds": len(per_fold),
                "members": ";".join(members),
                "member_weights": ""
                if weights is None
                # fitted on all rows
                else ";".join(f"{m}:{w:.3f}" for m, w in zip(members, weights)),
            }
        )
    return rows, out, out_stressed


def choose_entry(
    board,
    choice: str = "best",
    metric: str = "accuracy",
    tolerance: float = 0.005,
    exclude=(),
):
    """The leaderboard row to save: ``choice`` by name; ``"best"``: the best row, single
    candidate or ensemble (the board is sorted by the run metric), leaving out the rows in
    ``exclude`` (colour-only shortcuts) unless every row is one; ``"robust"``: of those rows within ``tolerance`` of
    the best one's ``metric``, the best under simulated shift (column ``stress_<metric>``)."""
    if choice not in ("best", "robust"):
        if choice not in set(board["candidate"]):
            raise BenchError(f"[predictor] ensemble '{choice}' is not on the leaderboard")
        return board[board["candidate"] == choice].iloc[0]
    pool = board[~board["candidate"].isin(set(exclude))]
    if pool.empty:  # every row a shortcut: the best of them (the caller says so)
        pool = board
    if choice == "best":
        return pool.iloc[0]
    col = f"stress_{base_metric(metric)}"
    if col not in board or board[col].isna().all():
        raise BenchError("[predictor] ensemble = 'robust' needs [stress] shifts")
    ascending = metric_sort_ascending(metric)
    best = pool[metric].iloc[0]
    close = (
        pool[pool[metric] <= best + tolerance]
        if ascending
        else pool[pool[metric] >= best - tolerance]
    )
    return close.sort_values(col, ascending=ascending, kind="stable").iloc[0]


def final_ensemble(
    name: str,
    kind: str,
    entries: dict,
    oofs: dict[str, np.ndarray],
    kinds: dict[str, str],
    y: np.ndarray,
    folds: PredefinedFolds,
    stressed: dict[str, dict[str, np.ndarray]] | None = None,
):
    """``(members, ensemble)`` to save for entry ``name``: an ensemble's weights or
    meta-learner fitted on all out-of-fold rows (and, with ``stress = true``, on all rows
    under each simulated shift of ``stressed``), members with weight 0 dropped; a single
    candidate becomes a one-member soft vote."""
    if kind != "ensemble":
        return [name], SoftVoting().fit([oofs[name]], y)
    entry = entries[name]
    members = ensemble_members(entry.members, kinds)
    ens = build_ensemble(entry, name)
    sets, fit_sets = member_sets(name, entry, members, oofs, stressed)
    fit_ensemble(ens, sets, y, name, folds.folds, cross_val=False, fit_sets=fit_sets)
    return [members[i] for i in ens.drop_unused()], ens
