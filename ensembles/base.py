"""What every ensemble shares: fitting on member probabilities, honest fold evaluation."""

from __future__ import annotations

import numpy as np

from core.splits import PredefinedFolds


class Ensemble:
    """Combines members' class probabilities.

    Subclasses implement ``fit(probas, y)`` (``probas``: list of (N, K) arrays, one per
    member, ``y``: int labels) and ``combine(probas)``; their learned state is JSON
    (``get_state``/``set_state``), so a saved predictor never needs pickle.
    """

    type_name = None
    n_members_: int
    uses_fold_groups = False  # declared: ``fit(probas, y, groups=folds)`` takes the rows' folds
    has_member_weights = False  # declared: ``member_weights()`` returns each member's share

    def fit(self, probas: list[np.ndarray], y: np.ndarray) -> "Ensemble":  # pragma: no cover
        raise NotImplementedError

    def combine(self, probas: list[np.ndarray]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def get_state(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def set_state(self, state: dict) -> "Ensemble":  # pragma: no cover
        raise NotImplementedError

    def get_params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def member_weights(self) -> list[float] | None:
        """Each member's share of the combination, or ``None`` when it has no such
        notion (stacking); used to weight the members' Grad-CAM maps. Ensembles that
        return shares declare ``has_member_weights = True``."""
        return None

    def drop_unused(self) -> list[int]:
        """Forget members the fitted ensemble gives no weight; return the kept indices
        (in order). The saved predictor then loads and runs only those."""
        return list(range(self.n_members_))


def fold_groups(ensemble: Ensemble, folds) -> dict:
    """``{"groups": folds}`` for ensembles that declare ``uses_fold_groups``, else ``{}``."""
    return {"groups": folds} if ensemble.uses_fold_groups else {}


def cross_val_combine(
    ensemble: Ensemble, probas: list[np.ndarray], y: np.ndarray, folds: np.ndarray
) -> np.ndarray:
    """Out-of-fold ensemble probabilities.

    For each fold k the ensemble is fitted on the members' out-of-fold probabilities of
    the *other* folds only, then combines fold k's rows: fold k never chooses its own
    weights (or meta-learner). Ensembles whose ``fit`` takes ``groups`` get those rows'
    fold numbers (e.g. for an inner leave-one-fold-out choice of a setting).
    """
    return cross_val_combine_sets(ensemble, [probas], y, folds)[0]


def stacked_sets(sets: list[list[np.ndarray]], y: np.ndarray, folds: np.ndarray):
    """``(probas, y, folds)`` of several sets of the same rows (the members' probabilities
    on the clean images, then under each simulated shift) stacked into one: what an
    ensemble fitted on shifted rows too is fitted on."""
    n = len(sets)
    return (
        [np.concatenate([s[i] for s in sets]) for i in range(len(sets[0]))],
        np.tile(np.asarray(y), n),
        np.tile(np.asarray(folds), n),
    )


def cross_val_combine_sets(
    ensemble: Ensemble,
    sets: list[list[np.ndarray]],
    y: np.ndarray,
    folds: np.ndarray,
    fit_sets: int = 1,
) -> list[np.ndarray]:
    """:func:`cross_val_combine` of each set of member probabilities in ``sets`` (the
    same rows: clean, then under each simulated shift). The ensemble that combines fold k
    is fitted on the other folds' rows of the first ``fit_sets`` sets, and combines fold
    k's rows of every set."""
    folds = np.asarray(folds)
    y = np.asarray(y)
    outs = [np.zeros_like(s[0], dtype=np.float64) for s in sets]
    for _, train, test in PredefinedFolds(folds):
        fit_p, fit_y, fit_g = stacked_sets(
            [[p[train] for p in s] for s in sets[:fit_sets]], y[train], folds[train]
        )
        ensemble.fit(fit_p, fit_y, **fold_groups(ensemble, fit_g))
        for out, s in zip(outs, sets):
            out[test] = ensemble.combine([p[test] for p in s])
    return outs
