"""The folds of a run as a split iterator, like scikit-learn's ``PredefinedSplit``.

Every place that scores, stacks or audits fold by fold walks the same
``(k, train_idx, test_idx)`` triples, so "fold k" means one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PredefinedFolds:
    """Rows' fold numbers -> ``(k, train_idx, test_idx)`` for each fold ``k`` (sorted).

    Parameters
    ----------
    folds : (N,) integer fold number of every row.
    """

    def __init__(self, folds):
        self.folds = np.asarray(folds)
        self.fold_ids = [int(k) for k in np.unique(self.folds)]

    def __len__(self) -> int:
        return len(self.fold_ids)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for k in self.fold_ids:
            yield k, self.train(k), self.test(k)

    def split(self, X=None, y=None, groups=None):
        """scikit-learn's ``split``: ``(train_idx, test_idx)`` per fold."""
        for _, train, test in self:
            yield train, test

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return len(self)

    def test(self, k: int) -> np.ndarray:
        """Row indices of fold ``k`` (sorted)."""
        return np.flatnonzero(self.folds == k)

    def train(self, k: int) -> np.ndarray:
        """Row indices of every fold but ``k`` (sorted)."""
        return np.flatnonzero(self.folds != k)
