"""Datasets: class folders (Kaggle layout) or ``.npz`` arrays, decoded once and cached.

Every dataset becomes an array of RGB ``uint8`` images of one size (``image_size``),
resized from the whole image with PIL bicubic (antialiased), the same way the shared
``pbc_64.npz`` was made and the same way the predictor resizes new images.

Folder layouts accepted:

* ``ROOT/<class>/<image>`` (files may sit in sub-folders of a class folder);
* ``ROOT/{train,val,test}/<class>/<image>``: the split folders are **merged** (the
  benchmark makes its own cross-validation folds); each image's split is kept in its
  ``source`` path, so users can still see it.

Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted
to 8-bit RGB and listed in the summary. Files that cannot be decoded, or that have more
pixels than :func:`core.images.max_pixels` (refused from the header), are skipped and
listed with the reason. Decoded images are cached as a memory-mapped ``.npy`` keyed by
the files' content and the image size, so a second run never decodes the files again.

Symbolic links are followed to files, and to folders outside the dataset; links that are
broken, that loop, or that point to a folder inside the dataset (``zloop -> .``) are not
followed and are listed as skipped, as are files outside any class folder.

An ``.npz`` is checked before use: labels are whole, non-negative class numbers below the
number of class names, or names found in ``classes``; object arrays are refused; pixels
are 0..255 or 0..65535 for integers and 0..1 or 0..255 for floats (see
:func:`core.images.scale_to_uint8`). :func:`prepare_dataset` then refuses data with fewer
than two classes, or a class with fewer images than ``[run] folds``, before any training.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import Config, did_you_mean
from bench.data.download import fetch
from core.cache import default_cache_dir
from core.errors import BenchError
from core.images import (
    MAX_PIXELS,
    Preprocessing,
    composite_on_white,
    max_pixels,
    pixel_hash,
    read_rgb,
    scale_to_uint8,
)
from core.io import atomic_save_npy, atomic_write_json, file_sha256, is_inside, read_json
from core.progress import info, progress_iter, warn

LOADER_VERSION = 1  # in the content hash (a run's dataset identity): change only with the pixels
# In the cache folder's name only: caches written before the checks of version 2 may hold data
# they refuse (float labels truncated, a symlink loop as a class), so they are not read.
CHECKS_VERSION = 2
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}
MEDMNIST_SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Decoded images and their labels, rows in a fixed order."""

    images: np.ndarray  # (N, S, S, 3) uint8, possibly memory-mapped
    labels: np.ndarray  # (N,) int64, indices into ``classes``
    classes: list[str]
    sources: list[str]  # file path relative to the dataset root, or "npz:<split>/<row>"
    pixel_hashes: list[str]  # hash of the decoded full-resolution pixels (exact duplicates)
    origin: str  # where the data came from
    content_hash: str  # hash of the files' content and the image size
    original_sizes: list[str] = field(default_factory=list)  # "WxH" per row
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    converted: list[dict] = field(default_factory=list)  # {"path", "mode"}
    # several labs in one dataset (bench.data.sources): each row's lab, and its group (patient,
    # slide, near-duplicate pair) as "<lab>:<id>"; empty for a single-lab dataset
    domains: list[str] = field(default_factory=list)
    group_keys: list[str] = field(default_factory=list)
    class_maps: dict = field(default_factory=dict)  # lab -> {its class: shared}
    smooth: float = 0.0  # Gaussian low-pass applied to ``images`` ([data] smooth)
    colour_norm: str = "none"  # per-image colour normalisation applied after it

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def preprocessing(self) -> Preprocessing:
        """How every image was made (the record a predictor stores)."""
        return Preprocessing(
            self.image_size, smooth=float(self.smooth), colour_norm=self.colour_norm
        )

    def subset(self, rows: np.ndarray) -> "Dataset":
        rows = np.asarray(rows)
        pick = lambda seq: [seq[i] for i in rows] if seq else []  # noqa: E731
        return Dataset(
            np.asarray(self.images[rows]),
            self.labels[rows],
            list(self.classes),
            pick(self.sources),
            pick(self.pixel_hashes),
            self.origin,
            self.content_hash,
            pick(self.original_sizes),
            self.skipped,
            self.converted,
            pick(self.domains),
            pick(self.group_keys),
            dict(self.class_maps),
            self.smooth,
            self.colour_norm,
        )

    def summary(self) -> dict:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        dup_groups = [n for n in Counter(self.pixel_hashes).values() if n > 1]
        return {
            "origin": self.origin,
            "content_hash": self.content_hash,
            "n_images": len(self),
            "classes": list(self.classes),
            "counts": {c: int(n) for c, n in zip(self.classes, counts)},
            "image_size": self.image_size,
            "original_sizes": dict(Counter(self.original_sizes).most_common()),
            "exact_duplicate_groups": len(dup_groups),
            "exact_duplicate_images": int(sum(dup_groups)),
            "skipped": self.skipped,
            "converted": self.converted,
            **({"labs": self.lab_summary(), "class_maps": self.class_maps} if self.domains else {}),
        }

    def lab_summary(self) -> dict:
        """Per lab: its images and its count of each shared class (0 where it has none)."""
        out = {}
        for lab in dict.fromkeys(self.domains):
            rows = np.array([d == lab for d in self.domains])
            counts = np.bincount(self.labels[rows], minlength=len(self.classes))
            out[lab] = {
                "n_images": int(rows.sum()),
                "counts": {c: int(n) for c, n in zip(self.classes, counts)},
            }
        return out


def load_dataset(
    path: str | os.PathLike,
    image_size: int = 64,
    cache_dir=None,
    classes: list[str] | None = None,
    show_progress: bool = True,
    labels: str | None = None,
) -> Dataset:
    """Load a class-folder tree or an ``.npz`` file as a :class:`Dataset`.

    Parameters
    ----------
    path : folder in the Kaggle layout, or ``.npz`` (keys ``images/labels/classes`` or
        MedMNIST's ``train_images/train_labels/val_*/test_*``).
    image_size : side of the square images the benchmark works on.
    cache_dir : where decoded arrays are cached; default ``$BLOODBENCH_CACHE`` or
        ``~/.cache/bloodbench``.
    classes : class names for an ``.npz`` that carries none (MedMNIST).
    labels : ``FILE.csv:COLUMN``: the images under the folder ``path`` listed in the CSV's
        ``file`` column (relative to the CSV's folder or to ``path``), labelled by
        ``COLUMN`` instead of by class folders; rows with an empty label are left out.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BenchError(f"data not found: {path}")
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise BenchError(f"data must be a folder of class folders or an .npz file: {path}")
        if labels:
            raise BenchError(
                f"[data] labels labels image files; {path} is a file, give the "
                "folder the CSV's 'file' column points into"
            )
        return _load_npz(path, image_size, cache_root, classes)
    if labels:
        return _load_csv_labelled(path, labels, image_size, cache_root, show_progress)
    return _load_folder(path, image_size, cache_root, show_progress)


# ----------------------------------------------------------------------------- folders

LINK_BROKEN = "broken symbolic link"
LINK_LOOP = "symbolic link loop"
LINK_INSIDE = "symbolic link to a folder inside the dataset"
NOT_IN_CLASS = "not in a class folder"


def _link_target(link: str) -> tuple[str | None, str | None]:
    """(real path, None) of a symbolic link's target, or (None, why it cannot be followed)."""
    try:
        os.stat(link)
    except FileNotFoundError:
        return None, LINK_BROKEN
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, LINK_LOOP
        return None, f"cannot follow symbolic link ({exc.strerror or exc})"
    return os.path.realpath(link), None


def _dir_link_problem(target: str, root_real: str, chain: tuple[str, ...]) -> str | None:
    """Why a symbolic link to the folder ``target`` must not be followed, or None.

    ``chain``: real paths of the folders being walked, from the class folder down.
    """
    if is_inside(target, root_real):
        return LINK_INSIDE  # its images are read where they are (or it is a loop)
    if is_inside(root_real, target) or any(is_inside(c, target) for c in chain):
        return LINK_LOOP  # leads back to the dataset or to a folder being walked
    return None


def _scandir(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def class_folders(root: Path, skipped: list[dict]) -> tuple[list[str], list[tuple[Path, str]]]:
    """Return (class names, [(class folder, source prefix)]).

    Symbolic links are followed only to folders outside the dataset; those that cannot
    be (broken, loops, folders inside the dataset) and files outside any class folder
    are added to ``skipped``. Hidden entries (``.name``) are ignored.
    """
    root_real = os.path.realpath(root)

    def subfolders(folder: Path, prefix: str) -> list[Path]:
        out = []
        try:
            entries = _scandir(folder)
        except OSError as exc:
            raise BenchError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            src = f"{prefix}{e.name}"
            if e.is_symlink():
                target, why = _link_target(e.path)
                if why is None and os.path.isdir(target):
                    why = _dir_link_problem(target, root_real, ())
                elif why is None:
                    why = NOT_IN_CLASS
                if why is not None:
                    skipped.append({"path": src, "reason": why})
                    continue
                out.append(Path(e.path))
            elif e.is_dir():
                out.append(Path(e.path))
            else:
                skipped.append({"path": src, "reason": NOT_IN_CLASS})
        return out

    top_skipped = len(skipped)
    subdirs = subfolders(root, "")
    if not subdirs:
        what = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[top_skipped:][:3])
        raise BenchError(
            f"no class folders in {root} (expected {root}/<class>/<images>)"
            + (f"; skipped {what}" if what else "")
        )
    if all(p.name.lower() in SPLIT_NAMES for p in subdirs):
        folders = []
        for split in subdirs:
            for c in subfolders(split, f"{split.name}/"):
                folders.append((c, f"{split.name}/{c.name}"))
        if not folders:
            raise BenchError(f"split folders in {root} hold no class folders")
    else:
        folders = [(p, p.name) for p in subdirs]
    classes = sorted({f.name for f, _ in folders})
    return classes, folders


def class_files(
    folder: Path, prefix: str, root_real: str, skipped: list[dict]
) -> list[tuple[Path, str]]:
    """Every file under a class folder, as (path, source), sorted by source.

    Walks without following symbolic links blindly (never loops): a link to a file is
    read, a link to a folder outside the dataset is walked once per path, and links that
    are broken, loop, or point to a folder inside the dataset go to ``skipped``.
    """
    files = []
    stack = [(str(folder), prefix, (os.path.realpath(folder),))]
    while stack:
        d, src_dir, chain = stack.pop()
        try:
            entries = _scandir(d)
        except OSError as exc:
            skipped.append(
                {"path": src_dir, "reason": f"cannot read folder ({exc.strerror or exc})"}
            )
            continue
        subdirs = []
        for e in entries:
            src = f"{src_dir}/{e.name}"
            try:
                if e.is_symlink():
                    target, why = _link_target(e.path)
                    if why is None and os.path.isdir(target):
                        why = _dir_link_problem(target, root_real, chain)
                        if why is None:
                            subdirs.append((e.path, src, chain + (target,)))
                            continue
                    elif why is None and os.path.isfile(target):
                        files.append((Path(e.path), src))
                        continue
                    skipped.append({"path": src, "reason": why or "not a regular file"})
                elif e.is_dir():
                    subdirs.append((e.path, src, chain + (os.path.realpath(e.path),)))
                elif e.is_file():
                    files.append((Path(e.path), src))
                else:
                    skipped.append({"path": src, "reason": "not a regular file"})
            except OSError as exc:
                skipped.append({"path": src, "reason": f"cannot read ({exc.strerror or exc})"})
        stack.extend(reversed(subdirs))
    return sorted(files, key=lambda f: f[1].split("/"))  # as sorted Paths


def _load_folder(root: Path, image_size: int, cache_root: Path, show_progress: bool) -> Dataset:
    link_skipped: list[dict] = []  # found while listing: links, stray files
    classes, folders = class_folders(root, link_skipped)
    root_real = os.path.realpath(root)
    files: list[tuple[Path, str, int]] = []
    for folder, prefix in folders:
        n_skipped = len(link_skipped)
        found = class_files(folder, prefix, root_real, link_skipped)
        if not found and len(link_skipped) == n_skipped:
            raise BenchError(f"class folder is empty: {folder}")
        label = classes.index(folder.name)
        files += [(p, src, label) for p, src in found]
    prefixes = {
        c: tuple(f"{prefix}/" for folder, prefix in folders if folder.name == c) for c in classes
    }
    return _decode_listed(
        root,
        files,
        classes,
        prefixes,
        f"folder:v{LOADER_VERSION}",
        image_size,
        cache_root,
        show_progress,
        link_skipped,
    )


def read_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV of strings (no NA guessing), column names stripped; one-line errors."""
    if not path.is_file():
        raise BenchError(f"{what} not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        UnicodeDecodeError,
        ValueError,
        OSError,
    ) as exc:
        raise BenchError(f"cannot read {what} {path}: {' '.join(str(exc).split())}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def parse_csv_spec(spec, what: str) -> tuple[Path, str]:
    """``FILE.csv:COLUMN`` (or a ``(file, column)`` pair) of the setting or option ``what``
    -> (path, column); one-line errors."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return Path(spec[0]).expanduser(), str(spec[1])
    text = str(spec)
    file, _, column = text.rpartition(":")
    if not file or not column.strip():
        raise BenchError(f"{what} {text}: give FILE.csv:COLUMN, e.g. cells.csv:diagnosis")
    return Path(file).expanduser(), column.strip()


def read_csv_column(spec: str, what: str) -> tuple[pd.DataFrame, Path, str, str]:
    """``FILE.csv:COLUMN`` of a ``[data]`` setting (``what``: its name) -> the table, its
    path, its file column (``file`` or ``path``) and ``COLUMN``; one-line errors."""
    csv_path, column = parse_csv_spec(spec, f"[data] {what}")
    df = read_table(csv_path, f"[data] {what} file")
    file_col = next((c for c in ("file", "path") if c in df.columns), None)
    if file_col is None or column not in df.columns:
        missing = "no 'file' column" if file_col is None else f"no column '{column}'"
        raise BenchError(f"[data] {what} {csv_path}: {missing}; columns: {list(df.columns)}")
    return df, csv_path, file_col, column


@dataclass
class LabelledFiles:
    """The image files a CSV labels (:func:`read_labelled_files`), in the CSV's order."""

    csv_path: Path
    column: str
    n_rows: int  # rows of the CSV
    n_empty: int  # rows with an empty label, left out
    files: list[Path]  # each labelled file, as found
    real: list[str]  # its real path (links resolved)
    labels: list[str]
    groups: list[str] | None  # the ``group_col`` value of each, when asked for


def read_labelled_files(
    root: Path, spec, what: str, group_col: str | None = None, group_what: str = "--groups"
) -> LabelledFiles:
    """The images under the folder ``root`` that a CSV (``FILE.csv:COLUMN``) labels: its
    ``file`` (or ``path``) column names each image relative to the CSV's folder or to
    ``root`` (or absolute); rows with an empty label are left out and counted. A listed
    file that is missing, listed twice, or outside ``root`` is a :class:`BenchError` (one
    line, starting with ``what``, e.g. ``[data] labels`` or ``--labels``)."""
    csv_path, column = parse_csv_spec(spec, what)
    df = read_table(csv_path, f"{what} file")
    file_col = next((c for c in ("file", "path") if c in df.columns), None)
    if file_col is None:
        raise BenchError(
            f"{what} {csv_path}: no 'file' column (the image path relative to "
            f"the CSV's folder or to the data folder); columns: {list(df.columns)}"
        )
    for col, opt in ((column, what), (group_col, group_what)):
        if col is not None and col not in df.columns:
            raise BenchError(
                f"{opt}: no column '{col}' in {csv_path}; columns: "
                f"{list(df.columns)}" + did_you_mean(col, df.columns)
            )
    labels = df[column].str.strip()
    labelled = (labels != "").to_numpy()
    if not labelled.any():
        raise BenchError(
            f"{what} {csv_path}:{column}: "
            + ("the CSV has no rows" if not len(df) else "every label is empty")
        )
    files = df[file_col].str.strip()[labelled]
    root_real = os.path.realpath(root)
    found, real, missing, outside, where = [], [], [], [], {}
    for row, f in zip(np.flatnonzero(labelled), files.tolist()):
        cands = [Path(f)] if os.path.isabs(f) else [csv_path.parent / f, root / f]
        hit = next((c for c in cands if c.is_file()), None) if f else None
        if hit is None:
            missing.append(f or f"(row {row + 2}: empty '{file_col}')")
        elif not is_inside(hit, root_real):
            outside.append(f)
        else:
            found.append(hit)
            real.append(os.path.realpath(hit))
            # one path however its rows spell it (a.png, ./a.png, or from the CSV's folder)
            where.setdefault(os.path.abspath(hit), []).append(f)
    if missing:
        raise BenchError(
            f"{what} {csv_path}: {len(missing)} labelled file(s) not found "
            f"(looked in {csv_path.parent} and {root}), e.g. {missing[0]}"
        )
    if outside:
        raise BenchError(
            f"{what} {csv_path}: {len(outside)} labelled file(s) outside the data "
            f"folder {root}, e.g. {outside[0]}"
        )
    dup = [rows for rows in where.values() if len(rows) > 1]
    if dup:
        spelt = list(dict.fromkeys(dup[0]))
        raise BenchError(
            f"{what} {csv_path}: {len(dup)} file(s) listed more than once "
            f"({sum(map(len, dup))} rows), e.g. {spelt[0]}"
            + (f" (as {', '.join(spelt)})" if len(spelt) > 1 else "")
        )
    groups = df[group_col].str.strip()[labelled].tolist() if group_col else None
    return LabelledFiles(
        csv_path,
        column,
        len(df),
        int((~labelled).sum()),
        found,
        real,
        labels[labelled].tolist(),
        groups,
    )


def _load_csv_labelled(
    root: Path, spec: str, image_size: int, cache_root: Path, show_progress: bool
) -> Dataset:
    """The images under ``root`` that a CSV lists, labelled by one of its columns."""
    listed = read_labelled_files(root, spec, "[data] labels")
    classes = sorted(set(listed.labels))
    root_real = os.path.realpath(root)
    files = [
        (hit, os.path.relpath(real, root_real).replace(os.sep, "/"), classes.index(lab))
        for hit, real, lab in zip(listed.files, listed.real, listed.labels)
    ]
    files.sort(key=lambda f: f[1].split("/"))
    tag = f"csv:v{LOADER_VERSION}:{listed.column}"
    return _decode_listed(
        root,
        files,
        classes,
        {c: () for c in classes},
        tag,
        image_size,
        cache_root,
        show_progress,
        [],
    )


def _decode_listed(
    root: Path,
    files: list,
    classes: list[str],
    prefixes: dict,
    tag: str,
    image_size: int,
    cache_root: Path,
    show_progress: bool,
    link_skipped: list[dict],
) -> Dataset:
    """Hash, decode (or read from the cache) listed ``(path, source, label)`` files."""
    digests = {}
    limit = max_pixels()  # a raised limit may decode files the default skips: its own key
    hasher = hashlib.sha256(
        (f"{tag}:{image_size}" + (f":max_pixels{limit}" if limit != MAX_PIXELS else "")).encode(
            "utf-8", "surrogateescape"
        )
    )
    readable = []
    for p, src, label in files:
        try:
            d = hashlib.sha1(p.read_bytes()).hexdigest()
        except OSError as exc:
            link_skipped.append(
                {"path": src, "reason": f"cannot read file ({exc.strerror or exc})"}
            )
            continue
        digests[src] = d
        readable.append((p, src, label))
        hasher.update(f"{src}\0{label}\0{d}\n".encode("utf-8", "surrogateescape"))
    files = readable
    key = hasher.hexdigest()
    slot = _cache_slot(key, link_skipped)
    cached = _read_cache(cache_root, key, slot)
    if cached is not None:
        return cached

    prep = Preprocessing(image_size)

    def decode(item):
        p, src, label = item
        try:
            img, mode, size = read_rgb(p)
        except BenchError as exc:
            return src, label, None, str(exc), None, None
        except OSError as exc:  # e.g. removed or made unreadable since it was listed
            return src, label, None, f"cannot read file ({exc.strerror or exc})", None, None
        return src, label, prep.resize_pil(img), None, mode, size

    rows, skipped, converted = [], list(link_skipped), []
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = pool.map(decode, files)
        for src, label, arr, err, mode, size in progress_iter(
            results, total=len(files), desc="decoding images", enabled=show_progress
        ):
            if err is not None:
                skipped.append({"path": src, "reason": err})
                continue
            if mode != "RGB":
                converted.append({"path": src, "mode": mode})
            rows.append((src, label, arr[0], arr[1], size))
    counts = Counter(label for _, label, *_ in rows)
    for i, c in enumerate(classes):
        if counts[i] == 0:
            lost = [s for s in skipped if s["path"].startswith(prefixes[c])]
            example = f", e.g. {lost[0]['path']}: {lost[0]['reason']}" if lost else ""
            raise BenchError(
                f"class '{c}' in {root} has no readable images ({len(lost)} skipped{example})"
            )
    ds = Dataset(
        images=np.stack([r[2] for r in rows]).astype(np.uint8),
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        classes=classes,
        sources=[r[0] for r in rows],
        pixel_hashes=[r[3] for r in rows],
        origin=str(root.resolve()),
        content_hash=key,
        original_sizes=[r[4] for r in rows],
        skipped=skipped,
        converted=converted,
    )
    _write_cache(cache_root, ds, slot)
    return _read_cache(cache_root, key, slot) or ds


# ----------------------------------------------------------------------------- npz


def read_npz(path: Path, classes=None):
    """Images (8-bit RGB, original size), int labels, class names, sources and the
    original pixel mode of an ``.npz`` (``images/labels[/classes][/files]`` or MedMNIST's
    splits, merged); every problem is one :class:`BenchError`."""
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad file
        raise BenchError(f"cannot read npz {path}: {exc}") from None
    get = lambda k: _npz_array(z, k, path)  # noqa: E731
    if {"images", "labels"} <= keys:
        images = _npz_images(get("images"), path, "images")
        raw = _one_label_per_image(get("labels"), len(images), path, "labels")
        names = _npz_class_names(get("classes"), path) if "classes" in keys else None
        if "files" in keys:
            files = get("files")
            if files.ndim != 1 or len(files) != len(images):
                raise BenchError(
                    f"npz {path}: 'files' has shape {files.shape}; expected one "
                    f"name per image ({len(images)},)"
                )
            sources = [f.decode() if isinstance(f, bytes) else str(f) for f in files]
        else:
            sources = [f"npz:{i}" for i in range(len(images))]
    elif "train_images" in keys:
        parts = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys]
        missing = [f"{s}_labels" for s in parts if f"{s}_labels" not in keys]
        if missing:
            raise BenchError(
                f"npz {path}: has {', '.join(f'{s}_images' for s in parts)} "
                f"but no {', '.join(missing)}"
            )
        arrays = [_npz_images(get(f"{s}_images"), path, f"{s}_images") for s in parts]
        if len({a.shape[1:] for a in arrays}) > 1:
            raise BenchError(
                f"npz {path}: the splits' images differ in shape "
                f"({', '.join(f'{s}: {a.shape}' for s, a in zip(parts, arrays))})"
            )
        raws = [
            _one_label_per_image(get(f"{s}_labels"), len(a), path, f"{s}_labels")
            for s, a in zip(parts, arrays)
        ]
        if len({r.dtype.kind in "US" for r in raws}) > 1:
            raise BenchError(f"npz {path}: some splits' labels are names and others numbers")
        images, raw = np.concatenate(arrays), np.concatenate(raws)
        sources = [f"npz:{s}/{i}" for s, a in zip(parts, arrays) for i in range(len(a))]
        names = None
    else:
        raise BenchError(
            f"npz {path} has keys {sorted(keys)}; expected images/labels[/classes] "
            "or MedMNIST's train_images/train_labels/..."
        )
    if len(images) == 0:
        raise BenchError(f"npz {path} holds no images")
    if names is None and classes:
        names = [str(c) for c in classes]
    labels, names = _npz_labels(raw, names, path)
    images, mode = _npz_to_rgb(images, path)
    return images, labels, names, sources, mode


def _load_npz(path: Path, image_size: int, cache_root: Path, classes) -> Dataset:
    key = hashlib.sha256(
        f"npz:v{LOADER_VERSION}:{image_size}:{file_sha256(path)}:{classes}".encode()
    ).hexdigest()
    slot = _cache_slot(key, [])
    cached = _read_cache(cache_root, key, slot)
    if cached is not None:
        return cached
    images, labels, names, sources, mode = read_npz(path, classes)
    out, hashes = np.empty((len(images), image_size, image_size, 3), np.uint8), []
    prep = Preprocessing(image_size)
    for i, im in enumerate(
        progress_iter(images, total=len(images), desc="preparing npz", enabled=len(images) > 2000)
    ):
        hashes.append(pixel_hash(im))
        out[i] = prep.resize_array(im)
    h, w = images.shape[1:3]
    ds = Dataset(
        out,
        labels,
        names,
        sources,
        hashes,
        str(path.resolve()),
        key,
        [f"{w}x{h}"] * len(labels),
        [],
        [{"path": str(path), "mode": mode}] if mode != "RGB" else [],
    )
    _write_cache(cache_root, ds, slot)
    return _read_cache(cache_root, key, slot) or ds


def _npz_array(z, key: str, path) -> np.ndarray:
    """One array of an open npz; a clear error when it cannot be loaded (object arrays)."""
    try:
        return z[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise BenchError(
                f"npz {path}: '{key}' is an array of Python objects (dtype=object), "
                "which is not loaded (unsafe); save it as numbers or strings, e.g. "
                f"np.asarray({key}, dtype=str) or .astype(int)"
            ) from None
        raise BenchError(f"npz {path}: cannot read '{key}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged member of the archive
        raise BenchError(f"npz {path}: cannot read '{key}': {exc}") from None


def _npz_images(images: np.ndarray, path, key: str) -> np.ndarray:
    """Check an images array's dtype, shape and pixel range (see :func:`scale_to_uint8`)."""
    if images.dtype.kind not in "uif":
        raise BenchError(
            f"npz {path}: '{key}' has dtype {images.dtype}; expected uint8, "
            "16-bit integers or floats"
        )
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise BenchError(
            f"npz {path}: '{key}' has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3|4)"
        )
    if images.dtype == np.uint8 or images.size == 0:
        return images
    if images.dtype.kind == "f":
        bad = ~np.isfinite(images)
        if bad.any():
            raise BenchError(
                f"npz {path}: '{key}' holds {int(bad.sum())} NaN or infinite pixel value(s)"
            )
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 255:
            raise BenchError(
                f"npz {path}: '{key}' ({images.dtype}) has pixel values from "
                f"{lo:g} to {hi:g}; float images must be in 0..1 (scaled by 255) "
                "or 0..255"
            )
        return images
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi > 65535:
        raise BenchError(
            f"npz {path}: '{key}' ({images.dtype}) has pixel values from {lo} to "
            f"{hi}; integer images must be in 0..255 or 0..65535 (16-bit)"
        )
    return images


def _one_label_per_image(labels: np.ndarray, n: int, path, key: str) -> np.ndarray:
    """Labels as a 1-D array of length ``n``: (n,) or (n, 1); one-hot/multi-label refused."""
    if labels.ndim == 2 and labels.shape[0] == n and labels.shape[1] == 1 or labels.ndim == 1:
        labels = labels.reshape(-1)
    else:
        raise BenchError(
            f"npz {path}: '{key}' has shape {labels.shape}; expected one class per "
            f"image, shape ({n},) (one-hot or multi-label arrays are not supported)"
        )
    if len(labels) != n:
        raise BenchError(f"npz {path}: {n} images but {len(labels)} labels in '{key}'")
    return labels


def _npz_class_names(arr: np.ndarray, path) -> list[str]:
    if arr.ndim != 1 or arr.dtype.kind not in "USiu":
        raise BenchError(
            f"npz {path}: 'classes' has shape {arr.shape} and dtype {arr.dtype}; "
            "expected a 1-D array of class names"
        )
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in arr]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise BenchError(f"npz {path}: class names repeat in 'classes': {repeated}")
    return names


def _npz_labels(raw: np.ndarray, names: list[str] | None, path) -> tuple[np.ndarray, list[str]]:
    """Labels as int64 indices into the class names (made up when there are none).

    Names are mapped to their index in ``classes``; numbers must be whole, non-negative
    and below the number of class names.
    """
    kind = raw.dtype.kind
    if kind in "US":
        if names is None:
            raise BenchError(
                f"npz {path}: labels are names (e.g. {_first(raw)!r}) but there is "
                "no 'classes' array to map them to; add 'classes' to the npz "
                "or set [data] classes"
            )
        text = np.char.decode(raw) if kind == "S" else raw
        index = {c: i for i, c in enumerate(names)}
        unknown = sorted(set(np.unique(text).tolist()) - set(index))
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise BenchError(
                f"npz {path}: {len(unknown)} label name(s) not in 'classes' "
                f"{_shown(names)}: {shown}"
            )
        return np.array([index[t] for t in text.tolist()], dtype=np.int64), names
    if kind == "b":
        raw = raw.astype(np.int64)
    elif kind == "f":
        nan = np.isnan(raw)
        if nan.any():
            raise BenchError(
                f"npz {path}: {int(nan.sum())} label(s) are NaN (first at row "
                f"{int(np.argmax(nan))}); every image needs a class"
            )
        inf = np.isinf(raw)
        if inf.any():
            raise BenchError(
                f"npz {path}: {int(inf.sum())} label(s) are infinite (first at "
                f"row {int(np.argmax(inf))})"
            )
        frac = raw != np.round(raw)
        if frac.any():
            i = int(np.argmax(frac))
            raise BenchError(
                f"npz {path}: labels must be whole class numbers, but "
                f"{int(frac.sum())} are not (e.g. {raw[i]:g} at row {i})"
            )
    elif kind not in "iu":
        raise BenchError(
            f"npz {path}: labels have dtype {raw.dtype}; expected integer class "
            "numbers or class names"
        )
    neg = raw < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise BenchError(
            f"npz {path}: {int(neg.sum())} label(s) are negative (e.g. "
            f"{raw[i]:g} at row {i}); labels are class numbers 0, 1, ..."
        )
    if kind == "u" and raw.dtype.itemsize == 8 and int(raw.max()) > np.iinfo(np.int64).max:
        raise BenchError(f"npz {path}: label {int(raw.max())} is far out of range")
    labels = raw.astype(np.int64)
    top = int(labels.max())
    if names is None:
        names = [f"class_{i}" for i in range(top + 1)]
    elif top >= len(names):
        i = int(np.argmax(labels >= len(names)))
        raise BenchError(
            f"npz {path}: label {labels[i]} (row {i}) is out of range of the "
            f"{len(names)} class names {_shown(names)} "
            f"(labels must be 0..{len(names) - 1})"
        )
    return labels, names


def _shown(names: list[str], n: int = 10) -> str:
    return str(names) if len(names) <= n else f"{names[:n]} (+{len(names) - n} more)"


def _first(a: np.ndarray):
    v = a.reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def _npz_to_rgb(images: np.ndarray, path) -> tuple[np.ndarray, str]:
    mode = "RGB"
    if images.dtype != np.uint8:
        mode = str(images.dtype)
        images = scale_to_uint8(images)
    if images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1), "L"
    if images.ndim == 4 and images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1), "L"
    if images.ndim == 4 and images.shape[-1] == 4:
        return composite_on_white(images), "RGBA"
    if images.ndim == 4 and images.shape[-1] == 3:
        return images, mode
    raise BenchError(f"npz {path}: images have shape {images.shape}; expected (N, H, W[, C])")


# ----------------------------------------------------------------------------- cache


def _cache_slot(key: str, listed: list[dict]) -> str:
    """Name of a dataset's cache folder: its content hash, the checks' version, and the
    files skipped while listing (links), which the content hash does not cover."""
    h = hashlib.sha256(f"{key}:checks{CHECKS_VERSION}".encode())
    for s in listed:
        h.update(f"{s['path']}\0{s['reason']}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _cache_paths(cache_root: Path, slot: str) -> tuple[Path, Path]:
    d = cache_root / "datasets" / slot[:32]
    return d / "images.npy", d / "meta.json"


def _write_cache(cache_root: Path, ds: Dataset, slot: str) -> None:
    img_path, meta_path = _cache_paths(cache_root, slot)
    try:
        atomic_save_npy(img_path, np.ascontiguousarray(ds.images))
        atomic_write_json(
            meta_path,
            {
                "key": ds.content_hash,
                "labels": ds.labels.tolist(),
                "classes": ds.classes,
                "sources": ds.sources,
                "pixel_hashes": ds.pixel_hashes,
                "origin": ds.origin,
                "original_sizes": ds.original_sizes,
                "skipped": ds.skipped,
                "converted": ds.converted,
            },
        )
    except OSError as exc:  # a read-only cache must not stop a run
        warnings.warn(f"could not write the image cache in {cache_root}: {exc}", stacklevel=2)


def _read_cache(cache_root: Path, key: str, slot: str) -> Dataset | None:
    img_path, meta_path = _cache_paths(cache_root, slot)
    if not (img_path.exists() and meta_path.exists()):
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("key") != key:
            return None
        images = np.load(img_path, mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return Dataset(
        images,
        np.array(meta["labels"], dtype=np.int64),
        meta["classes"],
        meta["sources"],
        meta["pixel_hashes"],
        meta["origin"],
        key,
        meta["original_sizes"],
        meta["skipped"],
        meta["converted"],
    )


def stratified_subset(labels: np.ndarray, n: int, seed: int, min_per_class: int) -> np.ndarray:
    """Row indices of a seeded, class-stratified sample of about ``n`` rows (sorted)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    rows = []
    for c, k in zip(classes, counts):
        take = min(k, max(min_per_class, int(round(n * k / len(labels)))))
        rows.append(rng.choice(np.flatnonzero(labels == c), size=take, replace=False))
    return np.sort(np.concatenate(rows))


# ----------------------------------------------------------------------------- from a config


def resolve_data_path(cfg: Config) -> tuple[Path, list[str] | None]:
    """The data path, downloading the fallback dataset when the configured one is missing.

    Returns the path and, for the fallback, its class names.
    """
    data = cfg.data
    path = data.path
    p = Path(cfg.path(path)).expanduser() if path else None  # relative: from the config
    if p is not None and p.exists():
        return p, None
    fb = data.fallback  # {} or a validated [data.fallback]
    if fb:
        cache = Path(data.cache_dir or default_cache_dir()).expanduser()
        dest = cache / "downloads" / (fb["filename"] or Path(fb["url"].split("?")[0]).name)
        where = f"{p} (or {dest})" if p else str(dest)
        info(f"data not found at {p}; using the default dataset {fb['name']} at {dest}")
        path = fetch(
            fb["url"],
            fb["md5"],
            dest,
            hint=f"no network? put a dataset folder or .npz at {where}, or pass --data PATH",
        )
        return path, fb["classes"] or None
    if p is None:
        raise BenchError("no data configured: pass --data PATH or set [data] path")
    raise BenchError(f"data not found: {p}")


def prepare_dataset(cfg: Config, show_progress=True) -> tuple[Dataset, Path]:
    data = cfg.data
    path, fb_classes = resolve_data_path(cfg)
    ds = load_dataset(
        path,
        image_size=data.image_size,
        cache_dir=data.cache_dir or None,
        classes=data.classes or fb_classes,
        show_progress=show_progress,
        labels=cfg.path(data.labels) or None,
    )
    for s in ds.skipped:
        warn(f"skipped {s['path']}: {s['reason']}")
    folds = cfg.run.folds
    if data.min_class_size:
        ds = drop_small_classes(ds, data.min_class_size)
    check_classes(ds, folds)
    if data.max_images and len(ds) > data.max_images:
        rows = stratified_subset(ds.labels, data.max_images, cfg.run.seed, min_per_class=folds * 2)
        ds = ds.subset(rows)
        check_classes(ds, folds, after=f" after [data] max_images = {data.max_images}")
    return ds, path


def drop_small_classes(ds: Dataset, min_size: int) -> Dataset:
    """``ds`` without the classes of fewer than ``min_size`` images (``[data]
    min_class_size``), each left-out class warned and recorded in ``skipped``."""
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    small = [i for i, n in enumerate(counts) if n < min_size]
    if not small:
        return ds
    keep = [i for i in range(len(ds.classes)) if i not in small]
    for i in small:
        warn(
            f"class '{ds.classes[i]}' left out: {int(counts[i])} image(s), fewer than "
            f"[data] min_class_size = {min_size}"
        )
    rows = np.flatnonzero(np.isin(ds.labels, keep))
    out = ds.subset(rows)
    remap = {old: new for new, old in enumerate(keep)}
    out.labels = np.array([remap[int(c)] for c in out.labels], dtype=np.int64)
    out.classes = [ds.classes[i] for i in keep]
    out.skipped = list(ds.skipped) + [
        {
            "path": ds.classes[i],
            "reason": f"class of {int(counts[i])} image(s) < min_class_size {min_size}",
        }
        for i in small
    ]
    return out


def check_classes(ds: Dataset, folds: int, after: str = "") -> None:
    """Refuse, before any training, data that cannot be cross-validated: fewer than two
    classes, or a class with fewer images than ``[run] folds``."""
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    if len(ds.classes) < 2:
        what = (
            f"one class ('{ds.classes[0]}', {int(counts[0])} image(s))"
            if ds.classes
            else "no classes"
        )
        raise BenchError(
            f"{ds.origin} has {what}; a classifier needs at least two classes "
            "(one folder, or one label value, per class)"
        )
    for c, n in zip(ds.classes, counts):
        if n < folds:
            raise BenchError(
                f"class '{c}' has {int(n)} image(s){after}, fewer than [run] folds "
                f"= {folds}; add images or lower [run] folds"
            )
