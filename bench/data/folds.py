"""Shared cross-validation folds: stratified, grouped, saved with their hash.

Rows that must never be split across folds are put in one group (union-find):

* exact duplicates (identical decoded pixels);
* a user mapping ``file,group`` (e.g. patient or slide id), ``[data] groups``;
* listed pairs ``file_a,file_b`` (near duplicates), ``[data] pairs``;
* a rule on file names, ``[data] group_rule = "number_block:N"``: files whose last number
  falls in the same block of N consecutive numbers, within one class, share a group
  (consecutive numbers often come from one smear).

Folds are :class:`sklearn.model_selection.StratifiedGroupKFold` (shuffled, seeded).
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bench.data.datasets import Dataset, read_csv_column
from core.errors import BenchError


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_all(self, rows) -> None:
        rows = list(rows)
        for r in rows[1:]:
            self.union(rows[0], r)


def _source_index(sources: list[str]):
    """Map a file name from a user CSV to row numbers: by relative path, else by base name."""
    by_path, by_name = {}, {}
    for i, s in enumerate(sources):
        p = PurePosixPath(s)
        by_path.setdefault(s, []).append(i)
        # a path relative to the class folder, ignoring a train/val/test level
        if len(p.parts) >= 2:
            by_path.setdefault("/".join(p.parts[-2:]), []).append(i)
        by_name.setdefault(p.name, []).append(i)

    def lookup(name: str) -> list[int]:
        name = name.strip().replace("\\", "/")
        return by_path.get(name) or by_name.get(PurePosixPath(name).name, [])

    return lookup


def _read_csv_rows(path: str, what: str) -> list[list[str]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BenchError(f"[data] {what} file not found: {p}")
    with open(p, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip().lower() in ("file", "file_a", "path", "filename"):
        rows = rows[1:]
    if any(len(r) < 2 for r in rows):
        raise BenchError(f"[data] {what} file {p} needs two columns per row")
    return rows


def make_groups(
    ds: Dataset, groups_csv: str = "", pairs_csv: str = "", group_rule: str = "", preset=None
) -> tuple[np.ndarray, dict]:
    """Group id per row, and a summary of what was grouped. ``preset``: a key per row
    (e.g. a multi-lab dataset's ``group_keys``); rows with one key share a group ("" for
    none)."""
    n = len(ds)
    uf = _UnionFind(n)
    if preset is not None and len(preset):
        first: dict[str, int] = {}
        for i, key in enumerate(preset):
            if key:
                uf.union(first.setdefault(key, i), i)
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(ds.pixel_hashes):
        by_hash.setdefault(h, []).append(i)
    dup = [rows for rows in by_hash.values() if len(rows) > 1]
    for rows in dup:
        uf.union_all(rows)
    conflicts = [
        [ds.sources[r] for r in rows] for rows in dup if len({int(ds.labels[r]) for r in rows}) > 1
    ]
    info = {
        "exact_duplicate_groups": len(dup),
        "duplicate_label_conflicts": conflicts,
        "user_groups": 0,
        "pairs": 0,
        "group_rule": group_rule or None,
        "unmatched": [],
    }
    lookup = _source_index(ds.sources)
    if groups_csv:
        members: dict[str, list[int]] = {}
        for row in _read_csv_rows(groups_csv, "groups"):
            hits = lookup(row[0])
            if not hits:
                info["unmatched"].append(row[0])
            members.setdefault(row[1].strip(), []).extend(hits)
        for rows in members.values():
            if rows:
                uf.union_all(rows)
        info["user_groups"] = len(members)
    if pairs_csv:
        for row in _read_csv_rows(pairs_csv, "pairs"):
            a, b = lookup(row[0]), lookup(row[1])
            if a and b:
                uf.union_all(a + b)
                info["pairs"] += 1
            else:
                info["unmatched"] += [f for f, h in ((row[0], a), (row[1], b)) if not h]
    if group_rule:
        _apply_rule(group_rule, ds, uf)
    roots = np.array([uf.find(i) for i in range(n)])
    _, group_ids = np.unique(roots, return_inverse=True)
    info["n_groups"] = int(group_ids.max()) + 1 if n else 0
    return group_ids.astype(np.int64), info


def _apply_rule(rule: str, ds: Dataset, uf: _UnionFind) -> None:
    m = re.fullmatch(r"number_block:(\d+)", rule.strip())
    if not m or int(m.group(1)) < 1:
        raise BenchError(f"[data] group_rule '{rule}' is not understood; use 'number_block:N'")
    size = int(m.group(1))
    blocks: dict[tuple, list[int]] = {}
    for i, src in enumerate(ds.sources):
        nums = re.findall(r"\d+", PurePosixPath(src).stem)
        if nums:
            blocks.setdefault((int(ds.labels[i]), int(nums[-1]) // size), []).append(i)
    for rows in blocks.values():
        uf.union_all(rows)


def make_folds(
    labels: np.ndarray,
    groups: np.ndarray,
    n_folds: int,
    seed: int,
    classes: list[str] | None = None,
    domains=None,
) -> np.ndarray:
    """Fold number (0..n_folds-1) per row. ``domains`` (a multi-lab dataset's lab per row):
    stratified by lab and class together, so every fold holds each lab's share."""
    counts = np.bincount(labels, minlength=len(classes) if classes else 0)
    for c, k in enumerate(counts):
        if k < n_folds:
            name = classes[c] if classes else str(c)
            raise BenchError(
                f"class '{name}' has {k} image(s), fewer than the {n_folds} folds; "
                "add images or lower [run] folds"
            )
    if len(np.unique(groups)) < n_folds:
        raise BenchError(f"only {len(np.unique(groups))} groups for {n_folds} folds")
    folds = np.full(len(labels), -1, dtype=np.int64)
    strata = (
        labels
        if domains is None or not len(domains)
        else np.unique([f"{d}\0{c}" for d, c in zip(domains, labels)], return_inverse=True)[1]
    )
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(sgkf.split(np.zeros(len(labels)), strata, groups)):
        folds[test] = k
    return folds


def lab_folds(domains: list[str], groups: np.ndarray) -> np.ndarray:
    """Leave-one-lab-out: fold k holds the k-th lab (in the order the sources list them).
    A group that spans two labs (identical pixels in both) is refused: its rows would sit
    on both sides of a split."""
    labs = list(dict.fromkeys(domains))
    folds = np.array([labs.index(d) for d in domains], dtype=np.int64)
    spans = pd.DataFrame({"g": groups, "f": folds}).groupby("g")["f"].nunique()
    if (spans > 1).any():
        raise BenchError(
            f"{int((spans > 1).sum())} group(s) of identical images span two labs; "
            "leave-one-lab-out cannot keep them on one side (remove the copies)"
        )
    return folds


def column_by_row(sources: list[str], spec: str, what: str) -> np.ndarray:
    """One column of a CSV (``FILE.csv:COLUMN``, rows matched on its ``file`` column as
    :func:`make_groups` matches them) for every row; ``""`` where the CSV has none."""
    df, _, file_col, column = read_csv_column(spec, what)
    lookup = _source_index(sources)
    out = np.full(len(sources), "", dtype=object)
    for f, v in zip(df[file_col], df[column]):
        out[lookup(f)] = v.strip()
    return out.astype(str)


def read_bags(ds: Dataset, groups_csv: str) -> np.ndarray:
    """The bag (e.g. patient) of every row, from the ``file,group`` CSV of ``[data] groups``.

    Every row needs a bag, and a bag's images one label (the bag's: its diagnosis).
    """
    lookup = _source_index(ds.sources)
    bags = np.full(len(ds), "", dtype=object)
    for row in _read_csv_rows(groups_csv, "groups"):
        bags[lookup(row[0])] = row[1].strip()
    missing = np.flatnonzero(bags == "")
    if len(missing):
        raise BenchError(
            f"[data] bags = true: {len(missing)} image(s) have no group in "
            f"{groups_csv}, e.g. {ds.sources[missing[0]]}"
        )
    bags = bags.astype(str)
    table = pd.DataFrame({"bag": bags, "label": ds.labels})
    mixed = table.groupby("bag")["label"].nunique()
    mixed = mixed[mixed > 1]
    if len(mixed):
        b = mixed.index[0]
        found = sorted({ds.classes[i] for i in table.label[table.bag == b]})
        raise BenchError(
            f"[data] bags = true: the label belongs to the bag, but {len(mixed)} "
            f"bag(s) hold images of several labels, e.g. '{b}': {found}"
        )
    return bags


def make_bag_folds(
    labels: np.ndarray,
    bags: np.ndarray,
    groups: np.ndarray,
    n_folds: int,
    seed: int,
    classes: list[str],
) -> np.ndarray:
    """Fold number per row, drawn over bags (whole bags in a fold) stratified by the bags'
    labels: each fold holds about 1/n_folds of every class's bags, whatever their sizes.
    Bags joined by a group (e.g. an image shared by two patients) stay in one fold."""
    names, first, inverse = np.unique(bags, return_index=True, return_inverse=True)
    bag_labels, bag_groups = labels[first], groups[first]
    counts = np.bincount(bag_labels, minlength=len(classes))
    for c, k in enumerate(counts):
        if k < n_folds:
            raise BenchError(
                f"class '{classes[c]}' has {k} bag(s), fewer than the {n_folds} "
                "folds; add bags or lower [run] folds"
            )
    bag_fold = np.full(len(names), -1, dtype=np.int64)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(sgkf.split(np.zeros(len(names)), bag_labels, bag_groups)):
        bag_fold[test] = k
    return bag_fold[inverse]


def folds_table(
    ds: Dataset, groups: np.ndarray, folds: np.ndarray, bags: np.ndarray | None = None
) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "index": np.arange(len(ds)),
            "source": ds.sources,
            "label": [ds.classes[i] for i in ds.labels],
            "group": groups,
            "fold": folds,
        }
    )
    if bags is not None:
        table["bag"] = bags
    if ds.domains:
        table["domain"] = ds.domains
    return table


def folds_hash(table: pd.DataFrame) -> str:
    h = hashlib.sha256()
    cols = ["source", "label", "group", "fold"] + [c for c in ("bag", "domain") if c in table]
    h.update(table[cols].to_csv(index=False).encode("utf-8", "surrogateescape"))
    return h.hexdigest()
