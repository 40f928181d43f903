"""Score a saved predictor on a labelled external image set: ``python -m bench evaluate``.

::

    python -m bench evaluate --model runs/quick/predictor --data ../shared/data/deepapl/images \\
        --labels ../shared/data/deepapl/cells.csv:pbc_class --groups patient --out eval_deepapl

    from bench.evaluate import evaluate
    result = evaluate("runs/quick/predictor", "other_lab/", class_map="map.toml")

Data: a class-folder tree, an ``.npz``, a ``[datasets.NAME]`` of the config, or a folder
plus a CSV label column (``--labels FILE.csv:COLUMN``; the CSV's ``file`` column is matched
to image files relative to the CSV's folder or to the image folder; rows with an empty
label are left out and counted). Images are read at their own resolution and go through
the predictor's own :class:`core.images.Preprocessing`, as in ``predict``.

External class names map onto the predictor's classes case-insensitively by name, or as a
``--class-map`` (TOML ``external = "predictor"`` or CSV ``external,predictor``; an entry
overrides the name match, an empty predictor class leaves the external class out).
Unmapped classes are listed with their counts and left out. Every problem with the
arguments (missing file, bad column, a map naming a class the predictor lacks, no
overlap) is one :class:`BenchError` before any model is loaded.

Scores are over the classes present in the set, with the predictor's full argmax and with
the argmax restricted to the present classes; 95 % CIs by a seeded percentile bootstrap
over images, or over groups (``--groups COLUMN``, e.g. patients) when given.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import DEFAULT_CONFIG, did_you_mean, load_config, read_toml
from bench.datasets import _class_files, _class_folders, read_npz, read_table
from bench.leaderboard import METRIC_LABELS, fmt
from bench.report import plots
from bench.report.build import SORT_SCRIPT, _csp, _env, _Out, slug
from bench.report.gradcam_audit import overlay
from bench.rundir import RunDir
from core.calibration import ece as ece_score
from core.calibration import apply_temperature, reliability
from core.errors import BenchError
from core.images import IMAGE_SUFFIXES, read_image
from core.io import atomic_write_json, atomic_write_text, package_versions, staged
from core.metrics import log_loss
from core.progress import progress_iter, warn
from bench import conformal
from ensembles.overlay import upsample
from ensembles.predictor import TTA_VIEWS, load_predictor, verify_predictor

EVAL_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
# what an evaluation folder holds: an --out with anything else is never replaced
OUTPUTS = {EVAL_FILE, PREDICTIONS_FILE, "index.html", "img", "csv"}
FORMAT_VERSION = 1
N_BOOT = 1000
SEED = 0
LEVEL = 0.95
ECE_BINS = 15
GALLERY_PER_CLASS = 3
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "ece")
GENERIC_FOLDERS = {"images", "image", "img", "data", "cells", "test", "val", "train"}


# ----------------------------------------------------------------------------- the data

@dataclass
class ExternalSet:
    """A labelled external set, listed but not decoded."""

    name: str
    path: Path
    kind: str                       # "folder", "csv" or "npz"
    items: list                     # image paths, or (H, W, 3) arrays for an npz
    shown: list[str]                # what predictions.csv calls each item
    labels: list[str]               # external class name per item
    groups: list[str] | None = None
    left_out: dict = field(default_factory=dict)     # reason -> count
    skipped: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)         # extra facts for evaluation.json


def parse_labels(spec) -> tuple[Path, str]:
    """``FILE.csv:COLUMN`` (or a ``(file, column)`` pair) -> (path, column)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return Path(spec[0]).expanduser(), str(spec[1])
    text = str(spec)
    if ":" not in text:
        raise BenchError(f"--labels {text}: give FILE.csv:COLUMN, e.g. cells.csv:pbc_class")
    file, column = text.rsplit(":", 1)
    if not file or not column.strip():
        raise BenchError(f"--labels {text}: give FILE.csv:COLUMN, e.g. cells.csv:pbc_class")
    return Path(file).expanduser(), column.strip()


def resolve_data(data, config=None) -> tuple[Path, str, dict]:
    """A path, or the name of a ``[datasets.NAME]`` of the config -> (path, name, info)."""
    text = str(data)
    p = Path(text).expanduser()
    if p.exists():
        name = p.stem if p.is_file() else p.name
        if p.is_dir() and name.lower() in GENERIC_FOLDERS and p.resolve().parent.name:
            name = f"{p.resolve().parent.name}-{name}"
        return p, name, {}
    looks_like_path = "/" in text or os.sep in text or text.lower().endswith(".npz")
    cfg_path = Path(config or DEFAULT_CONFIG)
    if looks_like_path or not cfg_path.is_file():
        if config and not cfg_path.is_file():
            raise BenchError(f"config file not found: {cfg_path}")
        raise BenchError(f"data not found: {p}")
    datasets = read_toml(cfg_path).get("datasets", {}) or {}
    if text not in datasets:
        raise BenchError(f"data not found: '{text}' is neither a file or folder nor a "
                         f"[datasets.NAME] of {cfg_path} (known: {sorted(datasets) or 'none'})"
                         + did_you_mean(text, datasets))
    cfg = load_config(cfg_path, data=text)
    dpath = Path(cfg.path(str(cfg["data"].get("path") or ""))).expanduser()
    if not str(cfg["data"].get("path") or ""):
        raise BenchError(f"{cfg_path}: [datasets.{text}] has no path")
    if not dpath.exists():
        raise BenchError(f"data not found: {dpath} ([datasets.{text}] of {cfg_path})")
    return dpath, text, {"config": str(cfg_path.resolve()), "dataset": text,
                         "classes": list(cfg["data"].get("classes") or [])}


def _list_folder(root: Path) -> ExternalSet:
    """A class-folder tree (the loader's layouts: split folders merged, links checked)."""
    skipped: list[dict] = []
    _, folders = _class_folders(root, skipped)
    root_real = os.path.realpath(root)
    items, shown, labels = [], [], []
    for folder, prefix in folders:
        for p, src in _class_files(folder, prefix, root_real, skipped):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": src, "reason": "not an image file (by its suffix)"})
                continue
            items.append(p)
            shown.append(str(root / src))
            labels.append(folder.name)
    if not items:
        raise BenchError(f"no image files in the class folders of {root}")
    return ExternalSet(root.name, root, "folder", items, shown, labels, skipped=skipped)


def _list_csv(root: Path, csv_path: Path, column: str, group_col: str | None) -> ExternalSet:
    """Images under ``root`` labelled by a CSV column (``file`` matched to the files)."""
    if not root.is_dir():
        raise BenchError(f"--labels needs --data to be a folder of images, got {root}")
    df = read_table(csv_path, "--labels CSV")
    file_col = next((c for c in ("file", "path") if c in df.columns), None)
    if file_col is None:
        raise BenchError(f"--labels {csv_path}: no 'file' column (the image path relative to "
                         f"the CSV's folder or to --data); columns: {list(df.columns)}")
    for col, what in ((column, "--labels"), (group_col, "--groups")):
        if col is not None and col not in df.columns:
            raise BenchError(f"{what}: no column '{col}' in {csv_path}; columns: "
                             f"{list(df.columns)}" + did_you_mean(col, df.columns))
    if not len(df):
        raise BenchError(f"--labels {csv_path} has no rows")
    files = df[file_col].str.strip()
    labels = df[column].str.strip()
    dup = files[files.duplicated()]
    if len(dup):
        raise BenchError(f"--labels {csv_path}: {len(dup)} file(s) listed more than once, "
                         f"e.g. {dup.iloc[0]}")
    empty = (labels == "").to_numpy()
    csv_dir = csv_path.parent
    root_real = os.path.realpath(root)
    items, shown, labs, groups = [], [], [], []
    missing, outside = [], 0
    gvals = df[group_col].str.strip().tolist() if group_col else None
    for i, (f, lab) in enumerate(zip(files.tolist(), labels.tolist())):
        if empty[i]:
            continue
        if not f:
            missing.append(f"(row {i + 2}: empty '{file_col}')")
            continue
        cands = [Path(f)] if os.path.isabs(f) else [csv_dir / f, root / f]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            missing.append(f)
            continue
        real = os.path.realpath(hit)
        if not (real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)):
            outside += 1
            continue
        items.append(hit)
        shown.append(str(hit))
        labs.append(lab)
        if gvals is not None:
            groups.append(gvals[i])
    if missing:
        raise BenchError(f"--labels {csv_path}: {len(missing)} labelled file(s) not found "
                         f"(looked in {csv_dir} and {root}), e.g. {missing[0]}")
    if not items:
        raise BenchError(f"--labels {csv_path}:{column}: no labelled image under {root} "
                         f"({int(empty.sum())} row(s) with an empty label, {outside} outside "
                         "--data)")
    left = {"empty_label": int(empty.sum())}
    if outside:
        left["outside_data"] = outside
    return ExternalSet(root.name, root, "csv", items, shown, labs,
                       groups=groups if group_col else None, left_out=left,
                       info={"labels": {"file": str(csv_path.resolve()), "column": column,
                                        "rows": int(len(df))}})


def _list_npz(path: Path, classes: list[str] | None) -> ExternalSet:
    """An ``.npz`` (``images/labels[/classes][/files]`` or MedMNIST), original size."""
    images, idx, names, shown, _ = read_npz(path, classes)
    return ExternalSet(path.stem, path, "npz", list(images), shown,
                       [names[i] for i in idx])


def load_external(data, labels=None, groups=None, config=None) -> ExternalSet:
    """List (do not decode) the external set; every problem is one :class:`BenchError`."""
    path, name, info = resolve_data(data, config)
    if groups is not None and labels is None:
        raise BenchError("--groups COLUMN is a column of the --labels CSV: give --labels "
                         "FILE.csv:COLUMN too")
    if labels is not None:
        if path.is_file():
            raise BenchError(f"--labels labels image files; --data {path} is a file, give "
                             "the folder the CSV's 'file' column points into")
        csv_path, column = parse_labels(labels)
        ext = _list_csv(path, csv_path, column, groups)
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
            if len(raw) == 1 and len(tables) == 1:   # one named table, e.g. [class_map]
                raw = tables[0]
        elif suffix == ".csv":
            df = read_table(p, "--class-map")
            cols = {c.lower(): c for c in df.columns}
            if not {"external", "predictor"} <= set(cols):
                raise BenchError(f"--class-map {p}: needs the columns external,predictor; "
                                 f"found {list(df.columns)}")
            raw = {}
            for e, v in zip(df[cols["external"]].str.strip(), df[cols["predictor"]].str.strip()):
                if not e:
                    raise BenchError(f"--class-map {p}: a row has an empty 'external' class")
                if e in raw and raw[e] != v:
                    raise BenchError(f"--class-map {p}: '{e}' is mapped twice ('{raw[e]}' and "
                                     f"'{v}')")
                raw[e] = v
        else:
            raise BenchError(f"--class-map {p}: give a .toml (external = \"predictor\") or a "
                             ".csv (external,predictor) file")
    out = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            raise BenchError(f"--class-map {src}: '{k}' must map to a predictor class name "
                             f"(a string), got {type(v).__name__}")
        out[str(k).strip()] = v.strip()
    if not out:
        raise BenchError(f"--class-map {src} maps no class")
    return out, src


def map_classes(external: list[str], predictor_classes: list[str],
                user_map: dict[str, str] | None, src: str = "identity"):
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
                raise BenchError(f"--class-map {src}: '{k}' -> '{v}': the predictor has no "
                                 f"class '{v}'; its classes: {', '.join(predictor_classes)}"
                                 + did_you_mean(v, predictor_classes))
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


# ----------------------------------------------------------------------------- scores

def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # as core.calibration: bins (0, 1/n], (1/n, 2/n], ...; 0 goes to the first bin
    return np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)


class _Scorer:
    """Accuracy, balanced accuracy, macro-F1 (over the classes with support) and top-label
    ECE from per-image weights: ones for the point estimate, bootstrap counts for a
    resample (a class drawn no image is left out of that resample's averages)."""

    def __init__(self, y, pred, conf, k: int, n_bins: int = ECE_BINS):
        self.k = k
        self.cell = np.asarray(y) * k + np.asarray(pred)
        self.correct = (np.asarray(y) == np.asarray(pred)).astype(float)
        self.conf = np.asarray(conf, dtype=float)
        self.bins = _bin_index(self.conf, n_bins)
        self.n_bins = n_bins

    def __call__(self, w) -> dict[str, float]:
        k = self.k
        cm = np.bincount(self.cell, weights=w, minlength=k * k).reshape(k, k)
        support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
        rows = support > 0
        total = support.sum()
        f1 = 2 * tp[rows] / (support[rows] + predicted[rows])
        cnt_conf = np.bincount(self.bins, weights=w * self.conf, minlength=self.n_bins)
        cnt_corr = np.bincount(self.bins, weights=w * self.correct, minlength=self.n_bins)
        return {"accuracy": float(tp.sum() / total),
                "balanced_accuracy": float(np.mean(tp[rows] / support[rows])),
                "macro_f1": float(np.mean(f1)),
                "ece": float(np.abs(cnt_corr - cnt_conf).sum() / total)}


def bootstrap_weights(n: int, groups=None, n_boot: int = N_BOOT, seed: int = SEED):
    """Yield per-image weights of ``n_boot`` resamples: images drawn with replacement, or
    whole groups drawn with replacement (each image weighted by its group's draws)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
    else:
        _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        g = int(codes.max()) + 1
        for _ in range(n_boot):
            yield np.bincount(rng.integers(0, g, g), minlength=g)[codes].astype(float)


def _restricted(proba: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Probabilities over the present classes only, renormalised (uniform where all 0)."""
    p = np.clip(proba[:, present], 0.0, None)
    s = p.sum(axis=1, keepdims=True)
    return np.where(s > 0, p / np.where(s > 0, s, 1), 1.0 / len(present))


def _per_class(y, pred, present, classes, k) -> list[dict]:
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    out = []
    for c in present:
        tp, sup, prd = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        prec = tp / prd if prd else 0.0
        rec = tp / sup if sup else math.nan
        out.append({"class": classes[c], "support": sup, "predicted": prd, "precision": prec,
                    "recall": rec, "f1": 2 * tp / (sup + prd) if sup + prd else 0.0})
    return out


def per_external_class(ext_labels, y, pred, mapping: dict, classes: list[str],
                       top: int = 3) -> list[dict] | None:
    """Recall of each of the set's own classes, when the map sends two or more of them onto
    one predictor class (e.g. band and segmented neutrophils onto ``neutrophil``): which
    kinds of cell a predictor class misses. ``None`` for a one-to-one map (the per-class
    table says it all). Each row: ``external_class``, ``mapped_to``, ``n``, ``recall`` (of
    the full argmax), ``wrong``: the ``top`` most frequent wrong answers ``[[class, n]]``."""
    targets = [v for v in mapping.values() if v is not None]
    if len(targets) == len(set(targets)):
        return None
    ext_labels = np.asarray(ext_labels, dtype=object)
    rows = []
    for e in sorted({str(v) for v in ext_labels}):
        sel = ext_labels == e
        truth, got = int(y[sel][0]), pred[sel]
        wrong = pd.Series(got[got != truth]).value_counts()
        rows.append({"external_class": e, "mapped_to": classes[truth], "n": int(sel.sum()),
                     "recall": float((got == truth).mean()),
                     "wrong": [[classes[int(c)], int(n)] for c, n in wrong.head(top).items()]})
    return sorted(rows, key=lambda r: (r["mapped_to"], -r["n"], r["external_class"]))


def score(y, proba, classes, groups=None, n_boot: int = N_BOOT, seed: int = SEED,
          level: float = LEVEL, ece_bins: int = ECE_BINS) -> dict:
    """The numbers of an evaluation (see the module docstring).

    ``y``: indices into ``classes`` (the predictor's); ``proba``: (N, K). Returns the
    metrics over the present classes with the full argmax, ``restricted`` ones with the
    argmax over the present classes, ``per_class``, ``confusion``, and ``ci`` (percentile
    bootstrap; over ``groups`` when given).
    """
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    present = np.unique(y)
    pred = proba.argmax(axis=1)
    pr = _restricted(proba, present)
    pred_r = present[pr.argmax(axis=1)]
    y_r = np.searchsorted(present, y)
    full = _Scorer(y, pred, proba.max(axis=1), k, ece_bins)
    restr = _Scorer(y, pred_r, pr.max(axis=1), k, ece_bins)
    ones = np.ones(len(y))
    out = {**full(ones), "log_loss": log_loss(y, np.clip(proba, 1e-15, 1.0))}
    out["ece"] = ece_score(y, proba, ece_bins)      # the one definition (equal to the scorer's)
    out["restricted"] = {**restr(ones), "ece": ece_score(y_r, pr, ece_bins),
                         "log_loss": log_loss(y_r, np.clip(pr, 1e-15, 1.0))}
    boot = {m: [] for m in METRIC_KEYS}
    boot_r = {m: [] for m in METRIC_KEYS}
    for w in bootstrap_weights(len(y), groups, n_boot, seed):
        for store, sc in ((boot, full), (boot_r, restr)):
            for m, v in sc(w).items():
                store[m].append(v)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def ci(store):
        return {m: dict(zip(("lo", "hi"), map(float, np.nanpercentile(v, q)))) if v else
                {"lo": math.nan, "hi": math.nan} for m, v in store.items()}
    out["ci"] = {**ci(boot), "restricted": ci(boot_r)}
    n_units = len(set(map(str, groups))) if groups is not None else len(y)
    out["bootstrap"] = {"resamples": n_boot, "seed": seed, "level": level,
                        "method": "percentile", "unit": "group" if groups is not None
                        else "image", "n_units": n_units}
    pc = _per_class(y, pred, present, classes, k)
    pcr = _per_class(y, pred_r, present, classes, k)
    for a, b in zip(pc, pcr):
        a.update({f"{m}_restricted": b[m] for m in ("precision", "recall", "f1")})
    out["per_class"] = pc
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)[present]
    out["confusion"] = {"true": [classes[c] for c in present], "predicted": list(classes),
                        "counts": cm.astype(int).tolist()}
    out["present_classes"] = [classes[c] for c in present]
    out["absent_classes"] = [c for i, c in enumerate(classes) if i not in set(present)]
    out["_pred"], out["_pred_r"] = pred, pred_r
    return out


# ----------------------------------------------------------------------------- in-domain

def in_domain(predictor_dir: Path, manifest: dict, present: list[str]):
    """The run's out-of-fold numbers of the saved entry (``DIR/predictor`` ->
    ``RunDir(DIR)``); ``(None, why)`` when they are not available."""
    run = RunDir(Path(predictor_dir).resolve().parent)
    entry = manifest["ensemble"]["name"]
    if not run.is_run():
        return None, (f"in-domain numbers unavailable: {run.path} is not a run directory "
                      "(the predictor was moved out of its run)")
    try:
        proba = run.read_oof(entry)
        y = run.labels
        classes = run.classes
    except (BenchError, OSError, ValueError, KeyError) as exc:
        return None, f"in-domain numbers unavailable: {exc}"
    if list(classes) != list(manifest["classes"]) or proba.shape != (len(y), len(classes)):
        return None, (f"in-domain numbers unavailable: the run's classes or out-of-fold "
                      f"probabilities of '{entry}' do not match the predictor")
    t = (manifest.get("calibration") or {}).get("temperature")
    if t:
        proba = apply_temperature(proba, float(t))
    pred = proba.argmax(axis=1)
    k = len(classes)
    recall = {}
    for c in range(k):
        m = y == c
        recall[classes[c]] = float((pred[m] == c).mean()) if m.any() else math.nan
    keep = np.isin(y, [classes.index(c) for c in present])
    sub = _Scorer(y[keep], pred[keep], proba[keep].max(axis=1), k)(np.ones(int(keep.sum())))
    return {"run": str(run.path), "entry": entry, "n": int(len(y)),
            "accuracy": float((pred == y).mean()), "ece": ece_score(y, proba, ECE_BINS),
            "same_classes": {"n": int(keep.sum()), **sub},
            "recall": recall, "temperature_applied": float(t) if t else None,
            "_y": y, "_proba": proba}, None


# ----------------------------------------------------------------------------- output folder

def default_out(name: str) -> Path:
    return Path.cwd() / f"evaluation-{slug(name)}"


def check_out(out: Path) -> None:
    """An ``--out`` that may be (re)written: new, empty, or an earlier evaluation holding
    nothing else (nothing of the user's is ever replaced)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BenchError(f"--out {out} is a file; give a folder")
        entries = sorted(e.name for e in out.iterdir())
        if entries:
            if not (out / EVAL_FILE).is_file():
                raise BenchError(f"--out {out} is not empty and holds no earlier evaluation "
                                 f"({EVAL_FILE}); give a new or empty folder")
            extra = [e for e in entries if e not in OUTPUTS]
            if extra:
                raise BenchError(f"--out {out} holds an earlier evaluation and other files "
                                 f"({', '.join(extra[:3])}), which replacing it would lose; "
                                 "move them or give another folder")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise BenchError(f"--out {out}: cannot write in {probe}")


# ----------------------------------------------------------------------------- predicting

def _predict(pred, items, batch_size: int, show: bool):
    """Probabilities of every readable item (the next batch decoded meanwhile)."""
    n, k = len(items), len(pred.classes_)
    proba = np.zeros((n, k))
    ok = np.zeros(n, dtype=bool)
    errors = []
    n_batches = -(-n // batch_size)
    for s, X, _, good, errs in progress_iter(pred.preprocessing.batches(items, batch_size),
                                             total=n_batches, desc="evaluating",
                                             enabled=show and n_batches > 1):
        errors += [(s + j, exc) for j, exc in errs]
        if len(X):
            rows = s + np.asarray(good)
            proba[rows] = pred.predict_proba(X, batch_size=len(X))
            ok[rows] = True
    return proba, ok, errors


# ----------------------------------------------------------------------------- figures

def _confusion_figure(cm: np.ndarray, true: list[str], predicted: list[str]):
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    return plots.confusion_figure(cm, norm, true, "Confusion matrix on the external set",
                                  predicted=predicted,
                                  xlabel="predicted class (all predictor classes)")


def _recall_figure(rows: list[dict], has_in_domain: bool):
    from matplotlib.figure import Figure
    names = [r["class"] for r in rows]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(5.5, 0.8 * len(names) + 2.5), 3.8))
    ax = fig.subplots()
    wd = 0.38 if has_in_domain else 0.6
    if has_in_domain:
        ax.bar(x - wd / 2, [r.get("recall_in_domain", math.nan) for r in rows], wd,
               color="#8fa8c8", label="in-domain (out-of-fold)")
    ax.bar(x + (wd / 2 if has_in_domain else 0), [r["recall"] for r in rows], wd,
           color="#c0392b", label="external")
    ax.set_xticks(x, labels=names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title("Recall per class: in-domain beside external")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _confidence_figure(conf_ext, correct_ext, conf_in):
    from matplotlib.figure import Figure
    bins = np.linspace(0, 1, 21)
    fig = Figure(figsize=(10, 3.6))
    a, b = fig.subplots(1, 2)
    if conf_in is not None:
        a.hist(conf_in, bins=bins, density=True, histtype="stepfilled", alpha=0.45,
               color="#4c72b0", label=f"in-domain (n={len(conf_in)})")
    a.hist(conf_ext, bins=bins, density=True, histtype="step", lw=2, color="#c0392b",
           label=f"external (n={len(conf_ext)})")
    a.set_title("Confidence (top-class probability)")
    a.set_xlabel("confidence")
    a.set_ylabel("density")
    a.legend(fontsize=8, loc="upper left")
    b.hist([conf_ext[correct_ext], conf_ext[~correct_ext]], bins=bins, stacked=True,
           color=["#1a7f37", "#c0392b"], label=["external, correct", "external, wrong"])
    b.set_title("External set: correct and wrong predictions")
    b.set_xlabel("confidence")
    b.set_ylabel("images")
    b.legend(fontsize=8, loc="upper left")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _gallery_figure(cells: list[dict], classes_shown: list[str], n: int):
    from matplotlib.figure import Figure
    rows = len(classes_shown)
    fig = Figure(figsize=(1.9 * n + 1.4, 2.05 * rows + 0.6))
    axes = np.atleast_2d(fig.subplots(rows, n, squeeze=False))
    for i, cls in enumerate(classes_shown):
        mine = [c for c in cells if c["true"] == cls]
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(cls, fontsize=8, rotation=0, ha="right", va="center")
            if j >= len(mine):
                ax.set_facecolor("#f2f2f2")
                for s in ax.spines.values():
                    s.set_visible(False)
                continue
            c = mine[j]
            img = c["image"]
            cam = c["cam"]
            peak = float(np.max(cam)) if np.size(cam) else 0.0
            up = upsample(cam / peak if peak > 0 else cam, *img.shape[:2])
            ax.imshow(overlay(img, up))
            ax.set_title(f"→ {c['predicted']} ({c['confidence']:.2f})", fontsize=7,
                         color="#c0392b")
    fig.suptitle("Grad-CAM of external errors (map for the predicted class; row: true class)",
                 fontsize=10)
    return fig


# ----------------------------------------------------------------------------- the report

def _clean(obj):
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python, private ``_`` keys dropped."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _predictions_csv(ext_shown, ext_labels, groups, classes, y, proba, pred, pred_r) -> str:
    fixed = ["path", "true_class", "external_class", "group", "prediction",
             "prediction_restricted", "confidence"]
    if groups is None:
        fixed.remove("group")
    cols = [c if c not in fixed else f"proba_{c}" for c in classes]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(fixed + cols)
    for i in range(len(y)):
        row = [ext_shown[i], classes[y[i]], ext_labels[i]]
        if groups is not None:
            row.append(groups[i])
        row += [classes[pred[i]], classes[pred_r[i]], f"{proba[i, pred[i]]:.6f}"]
        w.writerow(row + [f"{v:.6f}" for v in proba[i]])
    return buf.getvalue()


def _gradcam_gallery(pred, items, y, pred_full, proba, present, gradcam: bool, seed: int):
    """Up to :data:`GALLERY_PER_CLASS` seeded errors per class, explained for the class
    predicted; returns (cells, status dict)."""
    if not gradcam:
        return [], {"status": "off", "note": "Grad-CAM gallery skipped (--no-gradcam)"}
    if not pred.cnn_members_:
        return [], {"status": "none", "note": "no Grad-CAM gallery: the predictor has no CNN "
                                              "member"}
    rng = np.random.default_rng(seed + 1)
    rows = []
    for c in present:
        bad = np.flatnonzero((y == c) & (pred_full != c))
        if len(bad):
            rows += sorted(rng.choice(bad, min(GALLERY_PER_CLASS, len(bad)), replace=False))
    if not rows:
        return [], {"status": "none", "note": "no errors to show"}
    try:
        sel = [items[r] for r in rows]
        cams = pred.explain(sel, class_index=pred_full[rows])
        cells = [{"row": int(r), "image": read_image(items[r]), "cam": cam,
                  "true": str(pred.classes_[y[r]]), "predicted": str(pred.classes_[pred_full[r]]),
                  "confidence": float(proba[r, pred_full[r]])} for r, cam in zip(rows, cams)]
    except Exception as exc:   # noqa: BLE001 - the numbers stay useful without the gallery
        warn(f"Grad-CAM gallery failed: {type(exc).__name__}: {exc}")
        return [], {"status": "error", "note": f"the Grad-CAM gallery failed: "
                                               f"{type(exc).__name__}: {exc}"}
    return cells, {"status": "ok", "n": len(cells),
                   "note": f"{len(cells)} errors, up to {GALLERY_PER_CLASS} per class (seeded)"}


def _write_outputs(tmp: Path, result: dict, ext: ExternalSet, keep, y, proba, sc, dom,
                   cells, gallery_status) -> None:
    classes = result["predictor"]["classes"]
    out = _Out(tmp)
    pc = pd.DataFrame(result["per_class"])
    pc_csv = out.csv(pc, "per_class")
    conf = result["confusion"]
    cm_df = pd.DataFrame(conf["counts"], columns=conf["predicted"])
    cm_df.insert(0, "true", conf["true"])
    cm_csv = out.csv(cm_df, "confusion")
    figs = {"confusion": out.fig(_confusion_figure(np.array(conf["counts"]), conf["true"],
                                                   conf["predicted"]),
                                 "confusion", "confusion matrix",
                                 "Rows: the true classes present in the set; columns: every "
                                 "class of the predictor (full argmax).", cm_csv)}
    pe_csv = None
    if result["per_external_class"]:
        pe_csv = out.csv(pd.DataFrame(
            [{**{k: v for k, v in r.items() if k != "wrong"},
              "wrong": "; ".join(f"{c} {n}" for c, n in r["wrong"])}
             for r in result["per_external_class"]]), "per_external_class")
    figs["recall"] = out.fig(_recall_figure(result["per_class"], dom is not None), "recall",
                             "recall per class, in-domain and external",
                             "Recall per class on the external set"
                             + (" beside the run's out-of-fold recall of the same predictor."
                                if dom is not None else " (in-domain numbers unavailable)."),
                             pc_csv)
    rel = {"external": reliability(y, proba, ECE_BINS)}
    eces = {"external": result["ece"]}
    if dom is not None:
        rel["in-domain (out-of-fold)"] = reliability(dom["_y"], dom["_proba"], ECE_BINS)
        eces["in-domain (out-of-fold)"] = dom["ece"]
    rel_csv = out.csv(pd.concat([t.assign(set=n) for n, t in rel.items()], ignore_index=True),
                      "reliability")
    fig = plots.reliability_figure(rel, eces, {"external": "#c0392b",
                                               "in-domain (out-of-fold)": "#4c72b0"})
    fig.suptitle("Reliability diagrams (top-label confidence, full argmax)")
    figs["reliability"] = out.fig(fig, "reliability", "reliability diagrams",
                                  f"Accuracy against confidence in {ECE_BINS} bins; the gap to "
                                  "the diagonal is miscalibration.", rel_csv)
    conf_ext = proba.max(axis=1)
    correct = sc["_pred"] == y
    conf_in = dom["_proba"].max(axis=1) if dom is not None else None
    figs["confidence"] = out.fig(_confidence_figure(conf_ext, correct, conf_in), "confidence",
                                 "confidence histograms",
                                 "Top-class probability: in-domain (out-of-fold) against "
                                 "external, and on the external set split by correctness.")
    gallery = None
    if cells:
        shown = [c for c in result["present_classes"] if any(x["true"] == c for x in cells)]
        n = max(sum(1 for x in cells if x["true"] == c) for c in shown)
        g_csv = out.csv(pd.DataFrame([{"path": ext.shown[keep[x["row"]]], "true": x["true"],
                                       "predicted": x["predicted"],
                                       "confidence": x["confidence"]} for x in cells]),
                        "gradcam_errors")
        gallery = out.fig(_gallery_figure(cells, shown, n), "gradcam_errors",
                          "Grad-CAM of misclassified external images",
                          "Misclassified external images (seeded, up to "
                          f"{GALLERY_PER_CLASS} per true class) with the predictor's Grad-CAM "
                          "for the class it predicted.", g_csv)
    metric_rows = []
    for m in METRIC_KEYS:
        r = result["restricted"]
        metric_rows.append({"label": METRIC_LABELS[m], "value": fmt(result[m]),
                            "ci": f"[{fmt(result['ci'][m]['lo'])}, {fmt(result['ci'][m]['hi'])}]",
                            "r_value": fmt(r[m]),
                            "r_ci": f"[{fmt(result['ci']['restricted'][m]['lo'])}, "
                                    f"{fmt(result['ci']['restricted'][m]['hi'])}]",
                            "in_domain": fmt(dom["same_classes"][m]) if dom is not None
                            else ""})
    ctx = {"title": f"{result['data']['name']}", "r": result, "metric_rows": metric_rows,
           "figs": figs, "gallery": gallery, "gallery_status": gallery_status,
           "per_class_csv": pc_csv, "per_external_csv": pe_csv, "csvs": out.csvs,
           "csp": _csp(), "script": SORT_SCRIPT, "fmt": fmt, "left_out": result["left_out"],
           "classes": classes}
    html = _env().get_template("evaluate.html.j2").render(**ctx)
    atomic_write_text(tmp / "index.html", html)


# ----------------------------------------------------------------------------- entry point

def evaluate(predictor_dir, data, *, labels=None, class_map=None, groups=None, out=None,
             batch_size: int = 128, gradcam: bool = True, config=None, n_boot: int = N_BOOT,
             seed: int = SEED, progress: bool = True, tta: str | None = None,
             adapt: str | None = None) -> dict:
    """Score the predictor in ``predictor_dir`` on a labelled external set.

    Parameters
    ----------
    predictor_dir : a saved predictor (``DIR/predictor``).
    data : a class-folder tree, an ``.npz``, a ``[datasets.NAME]`` of ``config``, or (with
        ``labels``) a folder of images.
    labels : ``"FILE.csv:COLUMN"`` or ``(file, column)``: labels from a CSV column.
    class_map : a ``.toml``/``.csv`` file or a dict ``{external: predictor class}``.
    groups : a column of the ``labels`` CSV (e.g. patients): the bootstrap resamples groups.
    tta : test-time views to use instead of the predictor's own ``[predictor] tta``
        (``"none"``, ``"flips"``, ``"d4"``); recorded in ``evaluation.json``.
    adapt : ``"bn"``: unsupervised test-time adaptation (AdaBN) on the set's own images
        before predicting; transductive, so it is recorded and reported apart.
    out : output folder; default ``./evaluation-<dataset name>``.
    batch_size : images per ``predict_proba`` call.
    gradcam : draw the Grad-CAM gallery of errors (CNN members only).
    config : config file for ``[datasets.NAME]`` (default ``benchmarks.toml``).
    n_boot, seed : bootstrap resamples and seed.

    Returns
    -------
    The content of ``evaluation.json`` plus ``"out"`` (the folder written).
    """
    t0 = time.perf_counter()
    if int(batch_size) < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    if int(n_boot) < 1:
        raise BenchError(f"the bootstrap needs at least one resample, got {n_boot}")
    predictor_dir = Path(predictor_dir).expanduser()
    if not predictor_dir.is_dir():
        raise BenchError(f"--model not found: {predictor_dir}")
    ext = load_external(data, labels=labels, groups=groups, config=config)
    user_map, map_src = read_class_map(class_map)
    out = Path(out).expanduser() if out else default_out(ext.name)
    check_out(out)
    manifest = verify_predictor(predictor_dir)     # checksums; loads no model
    classes = list(manifest["classes"])
    external = sorted(set(ext.labels))
    mapping, unused = map_classes(external, classes, user_map, map_src)
    counts = pd.Series(ext.labels).value_counts()
    unmapped = {e: int(counts[e]) for e in external if mapping[e] is None}
    if len(unmapped) == len(external):
        raise BenchError(f"no class of {ext.path} maps onto the predictor's classes "
                         f"({', '.join(classes)}); the set's classes: "
                         f"{', '.join(external[:12])}{' ...' if len(external) > 12 else ''}; "
                         "give --class-map FILE (TOML external = \"predictor\", or CSV "
                         "external,predictor)")
    for u in unused:
        warn(f"--class-map entry '{u}' names no class of the set")
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([i for i, lab in enumerate(ext.labels) if mapping[lab] is not None])
    keep = conformal.leave_out_calibration_rows(manifest, ext, keep)   # bench calibrate's
    t_list = time.perf_counter() - t0

    pred = load_predictor(predictor_dir)
    if tta is not None:
        if tta not in TTA_VIEWS:
            raise BenchError(f"--tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
        pred.tta = tta
    adaptation = None
    if adapt is not None:
        if adapt != "bn":
            raise BenchError(f"--adapt must be 'bn', got {adapt!r}")
        adaptation = pred.adapt([ext.items[i] for i in keep], seed=seed)
    t1 = time.perf_counter()
    items = [ext.items[i] for i in keep]
    proba, ok, errors = _predict(pred, items, int(batch_size), progress)
    t_pred = time.perf_counter() - t1
    for _, exc in errors[:10]:
        warn(f"skipped {exc}")
    if len(errors) > 10:
        warn(f"... and {len(errors) - 10} more unreadable images")
    if not ok.any():
        raise BenchError(f"none of the {len(items)} mapped images of {ext.path} could be read")
    keep, proba = keep[ok], proba[ok]
    y = np.array([index[mapping[ext.labels[i]]] for i in keep], dtype=np.int64)
    grp = [ext.groups[i] for i in keep] if ext.groups is not None else None
    empty_groups = 0
    if grp is not None:   # an image without a group is its own group
        empty_groups = sum(1 for g in grp if not g)
        grp = [g if g else f"\0image{i}" for i, g in zip(keep, grp)]
    t2 = time.perf_counter()
    sc = score(y, proba, classes, groups=grp, n_boot=int(n_boot), seed=int(seed))
    dom, dom_note = in_domain(predictor_dir, manifest, sc["present_classes"])
    if dom is not None:
        for r in sc["per_class"]:
            r["recall_in_domain"] = dom["recall"].get(r["class"], math.nan)
    cells, gal = _gradcam_gallery(pred, items=[ext.items[i] for i in keep], y=y,
                                  pred_full=sc["_pred"], proba=proba,
                                  present=np.unique(y), gradcam=gradcam, seed=int(seed))
    left = dict(ext.left_out)
    if unmapped:
        left["unmapped_class"] = int(sum(unmapped.values()))
    if errors:
        left["unreadable"] = len(errors)
    result = {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "predictor": {"path": str(predictor_dir.resolve()),
                      "ensemble": manifest["ensemble"]["name"],
                      "type": manifest["ensemble"]["type"],
                      "manifest_sha256": manifest.get("manifest_sha256"),
                      "classes": classes, "image_size": pred.image_size, "tta": pred.tta,
                      "adaptation": adaptation,
                      "members": [{"name": m["name"], "kind": m.get("kind"),
                                   "fold_models": len(m["models"])} for m in manifest["members"]],
                      "temperature": (manifest.get("calibration") or {}).get("temperature")},
        "data": {"path": str(ext.path.resolve()), "name": ext.name, "kind": ext.kind,
                 "groups": groups, "n_listed": len(ext.items) + sum(ext.left_out.values()),
                 "skipped": ext.skipped[:50], "n_skipped": len(ext.skipped), **ext.info},
        "class_map": {"source": map_src, "map": mapping, "unmapped": unmapped,
                      "unused_entries": unused},
        "n": int(len(y)), "n_left_out": int(sum(left.values())), "left_out": left,
        "counts": {classes[c]: int((y == c).sum()) for c in np.unique(y)},
        **{k: v for k, v in sc.items()},
        "per_external_class": per_external_class([ext.labels[i] for i in keep], y,
                                                 sc["_pred"], mapping, classes),
        "in_domain": dom, "in_domain_note": dom_note,
        **conformal.evaluation_figures(manifest, proba, y, pred.shift_scores(
            [ext.items[i] for i in keep])),
        "gradcam": gal,
        "versions": package_versions(),
    }
    if empty_groups:
        result["data"]["images_without_group"] = empty_groups
    with staged(out) as tmp:
        atomic_write_text(tmp / PREDICTIONS_FILE, _predictions_csv(
            [ext.shown[i] for i in keep], [ext.labels[i] for i in keep],
            [g if not g.startswith("\0") else "" for g in grp] if grp is not None else None,
            classes, y, proba, sc["_pred"], sc["_pred_r"]))
        t3 = time.perf_counter()
        result["timings"] = {"listing_s": t_list, "predict_s": t_pred,
                             "images_per_s": len(items) / t_pred if t_pred > 0 else None,
                             "scoring_s": t3 - t2}
        _write_outputs(tmp, result, ext, keep, y, proba, sc, dom, cells, gal)
        result["timings"]["report_s"] = time.perf_counter() - t3
        result["timings"]["total_s"] = time.perf_counter() - t0
        clean = _clean(result)
        atomic_write_json(tmp / EVAL_FILE, clean)
    return {**clean, "out": str(out)}


# ----------------------------------------------------------------------------- summary

def summary(result: dict) -> str:
    """One screen of text: what was scored, the scores with CIs, per class, where."""
    r = result
    b = r["bootstrap"]
    unit = (f"{b['n_units']} groups ({r['data'].get('groups')})" if b["unit"] == "group"
            else f"{b['n_units']} images")
    lines = [f"evaluated {r['predictor']['path']} ({r['predictor']['ensemble']}) on "
             f"{r['data']['path']}"]
    left = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["left_out"].items() if v)
    lines.append(f"  {r['n']} images scored, {r['n_left_out']} left out" + (f" ({left})" if left
                                                                          else ""))
    if r["class_map"]["unmapped"]:
        lines.append("  unmapped classes: " + ", ".join(
            f"{k} {v}" for k, v in sorted(r["class_map"]["unmapped"].items(),
                                          key=lambda kv: -kv[1])))
    pres = r["present_classes"]
    lines.append(f"  classes present: {len(pres)} of {len(r['predictor']['classes'])}"
                 + (f" (absent: {', '.join(r['absent_classes'])})" if r["absent_classes"] else ""))
    dom = r.get("in_domain")
    lines.append(f"  {'':20s}{'full argmax':>24s}{'restricted argmax':>26s}"
                 + ("   in-domain" if dom else ""))
    for m in METRIC_KEYS:
        ci, cr = r["ci"][m], r["ci"]["restricted"][m]
        lines.append(f"  {METRIC_LABELS[m]:20s}{fmt(r[m]):>8s} [{fmt(ci['lo'])}, "
                     f"{fmt(ci['hi'])}]{fmt(r['restricted'][m]):>10s} [{fmt(cr['lo'])}, "
                     f"{fmt(cr['hi'])}]"
                     + (f"{fmt(dom['same_classes'][m]):>12s}" if dom else ""))
    lines.append(f"  95% CIs: percentile bootstrap, {b['resamples']} resamples of {unit}, "
                 f"seed {b['seed']}" + ("; in-domain: the run's out-of-fold predictions on "
                                        "the same classes" if dom else ""))
    lines.append(f"  {'class':16s}{'n':>7s}{'precision':>11s}{'recall':>8s}{'F1':>7s}"
                 + ("  recall in-domain" if dom else ""))
    for p in r["per_class"]:
        lines.append(f"  {p['class'][:16]:16s}{p['support']:>7d}{fmt(p['precision']):>11s}"
                     f"{fmt(p['recall']):>8s}{fmt(p['f1']):>7s}"
                     + (f"{fmt(p.get('recall_in_domain')):>18s}" if dom else ""))
    if r.get("per_external_class"):
        names = [f"{e['external_class']} -> {e['mapped_to']}" for e in r["per_external_class"]]
        head = "the set's own classes"
        w = min(max(len(n) for n in names + [head]), 44)
        lines.append(f"  {head:{w}s}{'n':>7s}{'recall':>8s}  most frequent wrong answers")
        for name, e in zip(names, r["per_external_class"]):
            lines.append(f"  {name[:w]:{w}s}{e['n']:>7d}{fmt(e['recall']):>8s}  "
                         + ", ".join(f"{c} {n}" for c, n in e["wrong"]))
    lines += conformal.summary_lines(r)
    if not dom and r.get("in_domain_note"):
        lines.append(f"  {r['in_domain_note']}")
    t = r.get("timings", {})
    lines.append(f"  wrote {Path(r['out']) / 'index.html'} ({EVAL_FILE}, {PREDICTIONS_FILE}); "
                 f"{t.get('total_s', 0):.0f} s, {t.get('images_per_s') or 0:.0f} images/s")
    return "\n".join(lines)


__all__ = ["evaluate", "score", "summary", "load_external", "read_class_map", "map_classes",
           "per_external_class", "bootstrap_weights", "EVAL_FILE", "PREDICTIONS_FILE"]
