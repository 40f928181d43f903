"""Seeded draws of a new lab's cells: the labelled cells a lab gives (``bench calibrate``,
``bench adapt --n``, the leave-one-lab-out adaptation curve) and the half of a set adapted on
(the other half scored)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from core.errors import BenchError


def draw(
    labels: list[str], groups: list[str] | None, n: int, seed: int, per_group: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``(drawn, excluded)`` row indices: ``n`` rows stratified by label; or, with groups
    (patients), at most ``per_group`` random rows of each group in a seeded order of the
    groups, the other rows of every group drawn from ``excluded`` from the rest (which
    then holds only groups never drawn from)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(labels))
    if groups is None:
        lab = np.asarray(labels)
        _, counts = np.unique(lab, return_counts=True)
        if n == len(rows):
            return rows, np.zeros(0, dtype=np.int64)
        strat = (
            lab if counts.min() >= 2 and n >= len(counts) and len(rows) - n >= len(counts) else None
        )
        drawn, _ = train_test_split(rows, train_size=n, stratify=strat, random_state=seed)
        return np.sort(drawn), np.zeros(0, dtype=np.int64)
    g = np.asarray(groups)
    drawn, excluded = [], []
    for name in rng.permutation(np.unique(g)):
        members = rng.permutation(rows[g == name])
        take = min(n - len(drawn), per_group)
        drawn += list(members[:take])
        excluded += list(members[take:])
        if len(drawn) >= n:
            break
    return np.sort(np.asarray(drawn)), np.sort(np.asarray(excluded, dtype=np.int64))


def adaptation_rows(n: int, groups, max_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(adapt, scored)`` row indices: a seeded sample of at most ``max_images`` rows and
    never more than half of them (whole groups when ``groups`` are given); ``scored``: the
    rows of no group adapted on."""
    rng = np.random.default_rng(seed)
    k = int(min(max_images, n // 2))
    if k < 1:
        raise BenchError(f"--data: {n} image(s); adaptation needs at least 2 (half are kept out)")
    rows = np.arange(n)
    if groups is None:
        used = np.sort(rng.choice(rows, k, replace=False))
        return used, np.setdiff1d(rows, used)
    g = np.asarray(groups)
    used: list[int] = []
    for name in rng.permutation(np.unique(g)):
        members = rows[g == name]
        if used and len(used) + len(members) > k:
            break
        used += list(members)
    used_arr = np.sort(np.asarray(used))
    return used_arr, np.setdiff1d(rows, used_arr)


__all__ = ["draw", "adaptation_rows"]
