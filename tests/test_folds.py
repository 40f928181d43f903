"""Shared folds: stratified, grouped (duplicates, user groups, pairs, number blocks), hashed."""

from __future__ import annotations

import numpy as np
import pytest

from bench.data.datasets import Dataset
from core.errors import BenchError
from bench.data.folds import folds_hash, folds_table, make_folds, make_groups


def _ds(labels, sources=None, hashes=None):
    n = len(labels)
    return Dataset(
        np.zeros((n, 4, 4, 3), np.uint8),
        np.asarray(labels),
        ["a", "b", "c"],
        sources or [f"{'abc'[c]}/img_{i:03d}.png" for i, c in enumerate(labels)],
        hashes or [f"h{i}" for i in range(n)],
        "mem",
        "key",
    )


def test_folds_are_stratified_and_cover_every_row():
    labels = np.repeat([0, 1, 2], [60, 30, 15])
    ds = _ds(labels)
    groups, _ = make_groups(ds)
    folds = make_folds(labels, groups, 5, seed=0, classes=ds.classes)
    assert set(folds) == set(range(5))
    for k in range(5):
        assert np.bincount(labels[folds == k], minlength=3).tolist() == [12, 6, 3]


def test_exact_duplicates_share_a_fold():
    labels = np.repeat([0, 1, 2], 20)
    hashes = [f"h{i}" for i in range(60)]
    dup_rows = [(0, 7, 13), (21, 22), (45, 59)]
    for rows in dup_rows:
        for r in rows:
            hashes[r] = hashes[rows[0]]
    ds = _ds(labels, hashes=hashes)
    groups, info = make_groups(ds)
    assert info["exact_duplicate_groups"] == 3
    for seed in range(5):
        folds = make_folds(labels, groups, 4, seed=seed, classes=ds.classes)
        for rows in dup_rows:
            assert len({folds[r] for r in rows}) == 1


def test_user_groups_pairs_and_number_blocks(tmp_path):
    labels = np.repeat([0, 1, 2], 20)
    ds = _ds(labels)
    (tmp_path / "groups.csv").write_text(
        "file,group\n" + "".join(f"img_{i:03d}.png,patient{i % 4}\n" for i in range(0, 20))
    )
    (tmp_path / "pairs.csv").write_text("file_a,file_b,dist\nb/img_020.png,b/img_039.png,0.1\n")
    groups, info = make_groups(ds, str(tmp_path / "groups.csv"), str(tmp_path / "pairs.csv"))
    assert info["user_groups"] == 4 and info["pairs"] == 1 and not info["unmatched"]
    assert groups[0] == groups[4] == groups[8] and groups[0] != groups[1]
    assert groups[20] == groups[39]
    g2, _ = make_groups(ds, group_rule="number_block:10")
    assert g2[40] == g2[49] and g2[49] != g2[50]  # 40..49 one block, 50.. the next


def test_unknown_rule_and_missing_csv_are_clear_errors(tmp_path):
    ds = _ds(np.repeat([0, 1, 2], 5))
    with pytest.raises(BenchError, match="group_rule 'by_magic'"):
        make_groups(ds, group_rule="by_magic")
    with pytest.raises(BenchError, match="groups file not found"):
        make_groups(ds, groups_csv=str(tmp_path / "nope.csv"))


def test_too_small_class_is_an_error():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
    ds = _ds(labels)
    groups, _ = make_groups(ds)
    with pytest.raises(BenchError, match="class 'c' has 2 image"):
        make_folds(labels, groups, 5, seed=0, classes=ds.classes)


def test_hash_is_stable_and_sensitive():
    labels = np.repeat([0, 1, 2], 10)
    ds = _ds(labels)
    groups, _ = make_groups(ds)
    f1 = make_folds(labels, groups, 3, seed=0)
    t1 = folds_table(ds, groups, f1)
    assert folds_hash(t1) == folds_hash(folds_table(ds, groups, make_folds(labels, groups, 3, 0)))
    f2 = make_folds(labels, groups, 3, seed=1)
    assert folds_hash(t1) != folds_hash(folds_table(ds, groups, f2))
    assert list(t1.columns) == ["index", "source", "label", "group", "fold"]
