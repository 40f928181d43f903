"""Datasets made of several labs (``[data] sources``): one class list, one domain per lab.

A multi-lab dataset lists its labs, each with its own images (class folders, an ``.npz``,
or a folder listed by ``labels = "FILE.csv:COLUMN"``), its groups (patients or slides:
``groups = "FILE.csv"`` with ``file,group`` columns, or ``"FILE.csv:COLUMN"``), its
near-duplicate ``pairs``, and a ``class_map`` from its class names onto the shared
``[data] classes``::

    [datasets.wbc5_multi]
    classes = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    [[datasets.wbc5_multi.sources]]
    domain = "pbc"
    path = "../shared/data/pbc/pbc_64.npz"
    [[datasets.wbc5_multi.sources]]
    domain = "chula"
    path = "../shared/data/chula/images"
    groups = "../shared/data/chula/cells.csv:slide"

``[data] max_images`` is shared equally by the labs (a source's own ``max_images`` caps it
further). Each lab is loaded (and cached) as a dataset of its own; a class of a lab that maps onto no
shared class is left out with one warning line and recorded in the data card's
``skipped``; a lab may lack shared classes (its metrics are over the classes it has,
:mod:`bench.protocols.labs`). Rows keep their lab (``Dataset.domains``, ``folds.csv`` ``domain``) and
their group as ``<lab>:<id>`` (``Dataset.group_keys``): groups of two labs never merge,
except through identical pixels (:func:`bench.data.folds.make_groups`). Every path is checked
before any image is decoded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from bench.config import Config, SourceEntry, did_you_mean
from bench.data.datasets import (
    Dataset,
    check_classes,
    load_dataset,
    parse_csv_spec,
    prepare_dataset,
    stratified_subset,
)
from bench.data.folds import column_by_row, make_groups
from core.colour import bag_colour, image_colour, smooth
from core.errors import BenchError
from core.io import stable_hash
from core.progress import info, warn


def _is_column_spec(spec: str) -> bool:
    """``FILE.csv:COLUMN`` (a column of a CSV) rather than a plain ``FILE.csv``."""
    file, _, column = spec.rpartition(":")
    return (
        bool(file)
        and bool(column)
        and "/" not in column
        and "\\" not in column
        and not spec.lower().endswith(".csv")
    )


def _check_paths(cfg: Config) -> None:
    """Every source's files exist: one line naming the lab and the setting, before any
    image is decoded."""
    for i, src in enumerate(cfg.data.sources):
        where = f"[data] sources[{i}] ({src.domain})"
        p = Path(cfg.path(src.path)).expanduser()
        if not p.exists():
            raise BenchError(f"{where} path not found: {p}")
        for key in ("labels", "groups", "pairs"):
            spec = getattr(src, key)
            if not spec:
                continue
            f = (
                parse_csv_spec(spec, f"{where} {key}")[0]
                if key == "labels" or _is_column_spec(spec)
                else Path(spec)
            )
            f = Path(cfg.path(str(f))).expanduser()
            if not f.is_file():
                raise BenchError(f"{where} {key} file not found: {f}")


def class_mapping(own: list[str], shared: list[str], class_map: dict, where: str) -> dict:
    """``{own class index: shared class index}`` of one lab; classes it leaves out are
    absent. A ``class_map`` key naming no class of the lab is a one-line error."""
    unknown = [k for k in class_map if k not in own]
    if unknown:
        raise BenchError(
            f"{where} class_map names '{unknown[0]}', which is not a class of "
            f"this lab {own}" + did_you_mean(unknown[0], own)
        )
    lower = {c.lower(): j for j, c in enumerate(shared)}
    out = {}
    for i, c in enumerate(own):
        target = class_map.get(c, c)
        if target and target.lower() in lower:
            out[i] = lower[target.lower()]
    return out


def _groups(cfg: Config, ds: Dataset, src: SourceEntry) -> np.ndarray:
    """Group id per row of one lab: its groups (file,group CSV or a CSV column), pairs
    and exact duplicates united (:func:`bench.data.folds.make_groups`)."""
    spec = src.groups
    column = _is_column_spec(spec) if spec else False
    preset = None
    if column:
        file, _, col = spec.rpartition(":")
        preset = column_by_row(ds.sources, f"{cfg.path(file)}:{col}", "sources groups")
    ids, _ = make_groups(
        ds,
        "" if column or not spec else cfg.path(spec),
        cfg.path(src.pairs) if src.pairs else "",
        preset=preset,
    )
    return ids


def prepare_data(cfg: Config, show_progress: bool = True) -> tuple[Dataset, Path]:
    """The run's dataset and where it came from: the labs of ``[data] sources``
    (:func:`load_sources`), else :func:`bench.data.datasets.prepare_dataset`."""
    if not cfg.data.sources:
        ds, path = prepare_dataset(cfg, show_progress)
    else:
        ds = load_sources(cfg, show_progress)
        check_classes(ds, cfg.run.folds)
        path = Path(ds.origin)
    return with_colour(with_smoothing(ds, float(cfg.data.smooth)), cfg.data.colour_norm), path


def with_smoothing(ds: Dataset, sigma: float) -> Dataset:
    """``ds`` with ``[data] smooth`` applied to its images (:func:`core.colour.smooth`);
    its content hash and preprocessing record say so."""
    if not sigma:
        return ds
    ds.images = smooth(ds.images, sigma)
    ds.smooth = sigma
    ds.content_hash = stable_hash({"images": ds.content_hash, "smooth": sigma})
    return ds


def with_colour(ds: Dataset, method: str) -> Dataset:
    """``ds`` with ``[data] colour_norm`` applied to each image
    (:func:`core.colour.image_colour`); its content hash and preprocessing record say so."""
    if method == "none":
        return ds
    ds.images = image_colour(ds.images, method)
    ds.colour_norm = method
    ds.content_hash = stable_hash({"images": ds.content_hash, "colour_norm": method})
    return ds


def with_bag_colour(ds: Dataset, bag_of_row, method: str) -> Dataset:
    """``ds`` with each bag's cells colour-normalised together (``[patients] bag_colour``,
    :func:`core.colour.bag_colour`); its content hash says so."""
    if method == "none":
        return ds
    ds.images = bag_colour(np.asarray(ds.images), bag_of_row, method)
    ds.content_hash = stable_hash({"images": ds.content_hash, "bag_colour": method})
    return ds


def load_sources(cfg: Config, show_progress: bool = True) -> Dataset:
    """The labs of ``[data] sources`` as one :class:`Dataset` over ``[data] classes``."""
    data = cfg.data
    shared = list(data.classes)
    seed = cfg.run.seed
    _check_paths(cfg)
    parts, skipped, maps, hashes, said, left_out = [], [], {}, [], [], []
    # [data] max_images: shared equally by the labs (each a class-stratified, seeded sample)
    share = data.max_images // len(data.sources) if data.max_images else 0
    for i, src in enumerate(data.sources):
        lab, where = src.domain, f"[data] sources[{i}] ({src.domain})"
        ds = load_dataset(
            cfg.path(src.path),
            image_size=data.image_size,
            cache_dir=data.cache_dir or None,
            show_progress=show_progress,
            labels=cfg.path(src.labels) if src.labels else None,
        )
        mapping = class_mapping(ds.classes, shared, src.class_map, where)
        counts = np.bincount(ds.labels, minlength=len(ds.classes))
        for c, name in enumerate(ds.classes):
            if c not in mapping and counts[c]:
                left_out.append(
                    f"lab '{lab}': class '{name}' ({int(counts[c])} images) maps "
                    "onto no shared class; left out"
                )
                skipped.append(
                    {
                        "path": f"{lab}/{name}",
                        "reason": f"class of lab '{lab}' not in [data] classes "
                        f"({int(counts[c])} images)",
                    }
                )
        skipped += [{**s, "path": f"{lab}/{s['path']}"} for s in ds.skipped]
        maps[lab] = {ds.classes[c]: shared[t] for c, t in mapping.items()}
        rows = np.flatnonzero(np.isin(ds.labels, list(mapping)))
        ds = ds.subset(rows)
        ds.labels = np.array([mapping[int(c)] for c in ds.labels], dtype=np.int64)
        ds.classes = shared
        cap = min([c for c in (src.max_images, share) if c] or [0])
        if cap and len(ds) > cap:
            ds = ds.subset(stratified_subset(ds.labels, cap, seed, min_per_class=2))
        present = sorted({shared[c] for c in ds.labels})
        if len(present) < 2:
            raise BenchError(
                f"{where}: the lab has {len(present)} class(es) of [data] classes "
                f"after its class_map ({present}); a held-out lab needs at least "
                "two to be scored"
            )
        ids = _groups(cfg, ds, src)
        said.append(
            f"lab '{lab}': {len(ds)} images, {len(present)} of {len(shared)} classes, "
            f"{len(np.unique(ids))} groups"
        )
        ds.domains = [lab] * len(ds)
        ds.group_keys = [f"{lab}:{g}" for g in ids]
        ds.sources = [f"{lab}/{s}" for s in ds.sources]
        parts.append(ds)
        hashes.append(f"{lab}:{ds.content_hash}:{sorted(mapping.items())}:{cap}")
    for line in left_out:  # after every lab is checked: an error stays one line
        warn(line)
    for line in said:
        info(line)
    key = hashlib.sha256(("multi:" + "|".join(hashes) + f":{seed}").encode()).hexdigest()
    cat = lambda attr: [x for p in parts for x in getattr(p, attr)]  # noqa: E731
    return Dataset(
        np.concatenate([np.asarray(p.images) for p in parts]),
        np.concatenate([p.labels for p in parts]),
        shared,
        cat("sources"),
        cat("pixel_hashes"),
        "labs: " + ", ".join(s.domain for s in data.sources),
        key,
        cat("original_sizes"),
        skipped,
        cat("converted"),
        cat("domains"),
        cat("group_keys"),
        maps,
    )


def lab_balanced_rows(rows: np.ndarray, domains, seed: int) -> np.ndarray:
    """``rows`` (training row indices) redrawn so every lab present contributes the mean
    lab size: labs above it are subsampled without replacement, labs below it drawn with
    replacement (all their rows first). Seeded; sorted. One lab: ``rows`` unchanged."""
    rows = np.asarray(rows)
    labs = np.asarray(domains)[rows]
    names = list(dict.fromkeys(labs.tolist()))
    if len(names) < 2:
        return rows
    target = int(round(len(rows) / len(names)))
    rng = np.random.default_rng(seed)
    out = []
    for lab in names:
        own = rows[labs == lab]
        if len(own) >= target:
            out.append(rng.choice(own, size=target, replace=False))
        else:
            out += [own, rng.choice(own, size=target - len(own), replace=True)]
    return np.sort(np.concatenate(out))
