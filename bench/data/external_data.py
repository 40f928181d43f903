"""The labelled external sets of ``bench evaluate`` and of a run's ``[external.NAME]``:
listing them (not decoding) and mapping their class names onto a predictor's.

Data: a class-folder tree, an ``.npz``, a ``[datasets.NAME]`` of the config, or a folder
plus a CSV label column (``--labels FILE.csv:COLUMN``; the CSV's ``file`` column is matched
to image files relative to the CSV's folder or to the image folder; rows with an empty
label are left out and counted; a labelled file missing or outside the folder is an error).

External class names map onto the predictor's classes case-insensitively by name, or as a
``--class-map`` (TOML ``external = "predictor"`` or CSV ``external,predictor``; an entry
overrides the name match, an empty predictor class leaves the external class out).
Every problem is one :class:`BenchError`, before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import config_file, data_argument, did_you_mean, load_config, read_toml
from bench.data.datasets import (
    class_files,
    class_folders,
    read_labelled_files,
    read_npz,
    read_table,
)
from core.errors import BenchError
from core.images import IMAGE_SUFFIXES

GENERIC_FOLDERS = {"images", "image", "img", "data", "cells", "test", "val", "train"}


@dataclass
class ExternalSet:
    """A labelled external set, listed but not decoded."""

    name: str
    path: Path
    kind: str  # "folder", "csv" or "npz"
    items: list  # image paths, or (H, W, 3) arrays for an npz
    shown: list[str]  # what predictions.csv calls each item
    labels: list[str]  # external class name per item
    groups: list[str] | None = None
    left_out: dict = field(default_factory=dict)  # reason -> count
    skipped: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # extra facts for evaluation.json


def resolve_data(data, config=None) -> tuple[Path, str, dict]:
    """``--data``: a path, or the name of a ``[datasets.NAME]`` of the config
    (:func:`bench.config.data_argument`) -> (path, name, info)."""
    p, name = data_argument(data, config)
    if p is not None:
        if not p.exists():
            raise BenchError(f"data not found: {p}")
        name = p.stem if p.is_file() else p.name
        if p.is_dir() and name.lower() in GENERIC_FOLDERS and p.resolve().parent.name:
            name = f"{p.resolve().parent.name}-{name}"
        return p, name, {}
    cfg_path = config_file(config)
    cfg = load_config(cfg_path, data=name)
    dpath = Path(cfg.path(cfg.data.path)).expanduser()
    if not cfg.data.path:
        raise BenchError(f"{cfg_path}: [datasets.{name}] has no path")
    if not dpath.exists():
        raise BenchError(f"data not found: {dpath} ([datasets.{name}] of {cfg_path})")
    return (
        dpath,
        name,
        {"config": str(cfg_path.resolve()), "dataset": name, "classes": list(cfg.data.classes)},
    )


def _list_folder(root: Path) -> ExternalSet:
    """A class-folder tree (the loader's layouts: split folders merged, links checked)."""
    skipped: list[dict] = []
    _, folders = class_folders(root, skipped)
    root_real = os.path.realpath(root)
    items, shown, labels = [], [], []
    for folder, prefix in folders:
        for p, src in class_files(folder, prefix, root_real, skipped):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": src, "reason": "not an image file (by its suffix)"})
                continue
            items.append(p)
            shown.append(str(root / src))
            labels.append(folder.name)
    if not items:
        raise BenchError(f"no image files in the class folders of {root}")
    return ExternalSet(root.name, root, "folder", items, shown, labels, skipped=skipped)


def _list_csv(root: Path, labels, group_col: str | None) -> ExternalSet:
    """Images under ``root`` labelled by a CSV column
    (:func:`bench.data.datasets.read_labelled_files`)."""
    if not root.is_dir():
        raise BenchError(f"--labels needs --data to be a folder of images, got {root}")
    listed = read_labelled_files(root, labels, "--labels", group_col)
    return ExternalSet(
        root.name,
        root,
        "csv",
        listed.files,
        [str(f) for f in listed.files],
        listed.labels,
        groups=listed.groups,
        left_out={"empty_label": listed.n_empty},
        info={
            "labels": {
                "file": str(listed.csv_path.resolve()),
                "column": listed.column,
                "rows": listed.n_rows,
            }
        },
    )


def _list_npz(path: Path, classes: list[str] | None) -> ExternalSet:
    """An ``.npz`` (``images/labels[/classes][/files]`` or MedMNIST), original size."""
    images, idx, names, shown, _ = read_npz(path, classes)
    return ExternalSet(path.stem, path, "npz", list(images), shown, [names[i] for i in idx])


def load_external(data, labels=None, groups=None, config=None) -> ExternalSet:
    """List (do not decode) the external set; every problem is one :class:`BenchError`."""
    path, name, info = resolve_data(data, config)
    if groups is not None and labels is None:
        raise BenchError(
            "--groups COLUMN is a column of the --labels CSV: give --labels FILE.csv:COLUMN too"
        )
    if labels is not None:
        if path.is_file():
            raise BenchError(
                f"--labels labels image files; --data {path} is a file, give "
                "the folder the CSV's 'file' column points into"
            )
        ext = _list_csv(path, labels, groups)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise BenchError(f"--data must be a folder, an .npz or a [datasets.NAME]: {path}")
        ext = _list_npz(path, info.get("classes"))
    else:
        ext = _list_folder(path)
    ext.name = name
    ext.info.update({k: v for k, v in info.items() if k != "classes"})
    return ext


# ----------------------------------------------------------------------------- class map


def read_class_map(spec) -> tuple[dict[str, str] | None, str]:
    """A class map from a TOML table, a CSV ``external,predictor`` or a dict; ``(None,
    "identity")`` without one. Values are predictor class names; ``""`` leaves the
    external class out."""
    if spec is None:
        return None, "identity"
    if isinstance(spec, dict):
        raw, src = spec, "(dict)"
    else:
        p = Path(spec).expanduser()
        src = str(p)
        if not p.is_file():
            raise BenchError(f"--class-map not found: {p}")
        suffix = p.suffix.lower()
        if suffix == ".toml":
            raw = read_toml(p)
            tables = [v for v in raw.values() if isinstance(v, dict)]
            if len(raw) == 1 and len(tables) == 1:  # one named table, e.g. [class_map]
                raw = tables[0]
        elif suffix == ".csv":
            df = read_table(p, "--class-map")
            cols = {c.lower(): c for c in df.columns}
            if not {"external", "predictor"} <= set(cols):
                raise BenchError(
                    f"--class-map {p}: needs the columns external,predictor; "
                    f"found {list(df.columns)}"
                )
            raw = {}
            for e, v in zip(df[cols["external"]].str.strip(), df[cols["predictor"]].str.strip()):
                if not e:
                    raise BenchError(f"--class-map {p}: a row has an empty 'external' class")
                if e in raw and raw[e] != v:
                    raise BenchError(
                        f"--class-map {p}: '{e}' is mapped twice ('{raw[e]}' and '{v}')"
                    )
                raw[e] = v
        else:
            raise BenchError(
                f'--class-map {p}: give a .toml (external = "predictor") or a '
                ".csv (external,predictor) file"
            )
    out = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            raise BenchError(
                f"--class-map {src}: '{k}' must map to a predictor class name "
                f"(a string), got {type(v).__name__}"
            )
        out[str(k).strip()] = v.strip()
    if not out:
        raise BenchError(f"--class-map {src} maps no class")
    return out, src


def map_classes(
    external: list[str],
    predictor_classes: list[str],
    user_map: dict[str, str] | None,
    src: str = "identity",
):
    """``{external class: predictor class or None}`` for every external class, and the
    map's entries that name no external class. A map value the predictor lacks is a
    :class:`BenchError`."""
    lower = {c.lower(): c for c in predictor_classes}
    resolved = {}
    if user_map is not None:
        for k, v in user_map.items():
            if v == "":
                resolved[k] = None
                continue
            hit = v if v in predictor_classes else lower.get(v.lower())
            if hit is None:
                raise BenchError(
                    f"--class-map {src}: '{k}' -> '{v}': the predictor has no "
                    f"class '{v}'; its classes: {', '.join(predictor_classes)}"
                    + did_you_mean(v, predictor_classes)
                )
            resolved[k] = hit
    by_lower = {k.lower(): k for k in resolved}
    mapping, used = {}, set()
    for e in external:
        key = e if e in resolved else by_lower.get(e.lower())
        if key is not None:
            mapping[e] = resolved[key]
            used.add(key)
        else:
            mapping[e] = lower.get(e.strip().lower())
    unused = sorted(set(resolved) - used)
    return mapping, unused


__all__ = ["ExternalSet", "resolve_data", "load_external", "read_class_map", "map_classes"]
