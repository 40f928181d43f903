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
to 8-bit RGB and listed in the summary. Files that cannot be decoded are skipped and
listed with the reason. Decoded images are cached as a memory-mapped ``.npy`` keyed by
the files' content and the image size, so a second run never decodes the files again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.config import Config
from bench.download import fetch
from core.cache import default_cache_dir
from core.errors import BenchError
from core.images import Preprocessing, composite_on_white, pixel_hash, read_rgb, scale_to_uint8
from core.io import atomic_save_npy, atomic_write_json, file_sha256, read_json
from core.progress import info, progress_iter, warn

LOADER_VERSION = 1
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}
MEDMNIST_SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Decoded images and their labels, rows in a fixed order."""

    images: np.ndarray            # (N, S, S, 3) uint8, possibly memory-mapped
    labels: np.ndarray            # (N,) int64, indices into ``classes``
    classes: list[str]
    sources: list[str]            # file path relative to the dataset root, or "npz:<split>/<row>"
    pixel_hashes: list[str]       # hash of the decoded full-resolution pixels (exact duplicates)
    origin: str                   # where the data came from
    content_hash: str             # hash of the files' content and the image size
    original_sizes: list[str] = field(default_factory=list)   # "WxH" per row
    skipped: list[dict] = field(default_factory=list)         # {"path", "reason"}
    converted: list[dict] = field(default_factory=list)       # {"path", "mode"}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def preprocessing(self) -> Preprocessing:
        """How every image was made (the record a predictor stores)."""
        return Preprocessing(self.image_size)

    def subset(self, rows: np.ndarray) -> "Dataset":
        rows = np.asarray(rows)
        pick = lambda seq: [seq[i] for i in rows] if seq else []  # noqa: E731
        return Dataset(np.asarray(self.images[rows]), self.labels[rows], list(self.classes),
                       pick(self.sources), pick(self.pixel_hashes), self.origin,
                       self.content_hash, pick(self.original_sizes), self.skipped, self.converted)

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
        }


def load_dataset(path: str | os.PathLike, image_size: int = 64, cache_dir=None,
                 classes: list[str] | None = None, show_progress: bool = True) -> Dataset:
    """Load a class-folder tree or an ``.npz`` file as a :class:`Dataset`.

    Parameters
    ----------
    path : folder in the Kaggle layout, or ``.npz`` (keys ``images/labels/classes`` or
        MedMNIST's ``train_images/train_labels/val_*/test_*``).
    image_size : side of the square images the benchmark works on.
    cache_dir : where decoded arrays are cached; default ``$BLOODBENCH_CACHE`` or
        ``~/.cache/bloodbench``.
    classes : class names for an ``.npz`` that carries none (MedMNIST).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BenchError(f"data not found: {path}")
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise BenchError(f"data must be a folder of class folders or an .npz file: {path}")
        return _load_npz(path, image_size, cache_root, classes)
    return _load_folder(path, image_size, cache_root, show_progress)


# ----------------------------------------------------------------------------- folders

def _class_folders(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Return (class names, [(class folder, source prefix)])."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise BenchError(f"no class folders in {root} (expected {root}/<class>/<images>)")
    if all(p.name.lower() in SPLIT_NAMES for p in subdirs):
        folders = []
        for split in subdirs:
            for c in sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")):
                folders.append((c, f"{split.name}/{c.name}"))
        if not folders:
            raise BenchError(f"split folders in {root} hold no class folders")
    else:
        folders = [(p, p.name) for p in subdirs]
    classes = sorted({f.name for f, _ in folders})
    return classes, folders


def _load_folder(root: Path, image_size: int, cache_root: Path, show_progress: bool) -> Dataset:
    classes, folders = _class_folders(root)
    files: list[tuple[Path, str, int]] = []
    for folder, prefix in folders:
        found = sorted(p for p in folder.rglob("*") if p.is_file())
        if not found:
            raise BenchError(f"class folder is empty: {folder}")
        label = classes.index(folder.name)
        files += [(p, f"{prefix}/{p.relative_to(folder).as_posix()}", label) for p in found]

    digests = {}
    hasher = hashlib.sha256(f"folder:v{LOADER_VERSION}:{image_size}".encode())
    for p, src, label in files:
        d = hashlib.sha1(p.read_bytes()).hexdigest()
        digests[src] = d
        hasher.update(f"{src}\0{label}\0{d}\n".encode())
    key = hasher.hexdigest()
    cached = _read_cache(cache_root, key)
    if cached is not None:
        return cached

    prep = Preprocessing(image_size)

    def decode(item):
        p, src, label = item
        try:
            img, mode, size = read_rgb(p)
        except BenchError as exc:
            return src, label, None, str(exc), None, None
        return src, label, prep.resize_pil(img), None, mode, size

    rows, skipped, converted = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = pool.map(decode, files)
        for src, label, arr, err, mode, size in progress_iter(
                results, total=len(files), desc="decoding images", enabled=show_progress):
            if err is not None:
                skipped.append({"path": src, "reason": err})
                continue
            if mode != "RGB":
                converted.append({"path": src, "mode": mode})
            rows.append((src, label, arr[0], arr[1], size))
    counts = Counter(label for _, label, *_ in rows)
    for i, c in enumerate(classes):
        if counts[i] == 0:
            raise BenchError(f"class '{c}' in {root} has no readable images "
                             f"({sum(1 for s in skipped if s['path'].split('/')[-2] == c)} skipped)")
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
    _write_cache(cache_root, ds)
    return _read_cache(cache_root, key) or ds


# ----------------------------------------------------------------------------- npz

def _load_npz(path: Path, image_size: int, cache_root: Path, classes) -> Dataset:
    key = hashlib.sha256(
        f"npz:v{LOADER_VERSION}:{image_size}:{file_sha256(path)}:{classes}".encode()).hexdigest()
    cached = _read_cache(cache_root, key)
    if cached is not None:
        return cached
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad file
        raise BenchError(f"cannot read npz {path}: {exc}") from None
    if {"images", "labels"} <= keys:
        images, labels = z["images"], z["labels"].reshape(-1)
        names = [str(c) for c in z["classes"]] if "classes" in keys else None
        sources = [str(f) for f in z["files"]] if "files" in keys else [
            f"npz:{i}" for i in range(len(labels))]
    elif "train_images" in keys:
        parts = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys]
        images = np.concatenate([z[f"{s}_images"] for s in parts])
        labels = np.concatenate([z[f"{s}_labels"].reshape(len(z[f"{s}_images"]), -1)[:, 0]
                                 for s in parts])
        sources = [f"npz:{s}/{i}" for s in parts for i in range(len(z[f"{s}_images"]))]
        names = None
    else:
        raise BenchError(f"npz {path} has keys {sorted(keys)}; expected images/labels[/classes] "
                         "or MedMNIST's train_images/train_labels/...")
    if len(images) != len(labels):
        raise BenchError(f"npz {path}: {len(images)} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    n_cls = int(labels.max()) + 1 if len(labels) else 0
    if names is None:
        names = list(classes) if classes else [f"class_{i}" for i in range(n_cls)]
    if labels.min(initial=0) < 0 or n_cls > len(names):
        raise BenchError(f"npz {path}: labels go up to {n_cls - 1} but only {len(names)} class names")
    images, mode = _npz_to_rgb(images, path)
    out, hashes = np.empty((len(images), image_size, image_size, 3), np.uint8), []
    prep = Preprocessing(image_size)
    for i, im in enumerate(progress_iter(images, total=len(images), desc="preparing npz",
                                         enabled=len(images) > 2000)):
        hashes.append(pixel_hash(im))
        out[i] = prep.resize_array(im)
    h, w = images.shape[1:3]
    ds = Dataset(out, labels, names, sources, hashes, str(path.resolve()), key,
                 [f"{w}x{h}"] * len(labels), [],
                 [{"path": str(path), "mode": mode}] if mode != "RGB" else [])
    _write_cache(cache_root, ds)
    return _read_cache(cache_root, key) or ds


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

def _cache_paths(cache_root: Path, key: str) -> tuple[Path, Path]:
    d = cache_root / "datasets" / key[:32]
    return d / "images.npy", d / "meta.json"


def _write_cache(cache_root: Path, ds: Dataset) -> None:
    img_path, meta_path = _cache_paths(cache_root, ds.content_hash)
    try:
        atomic_save_npy(img_path, np.ascontiguousarray(ds.images))
        atomic_write_json(meta_path, {
            "key": ds.content_hash, "labels": ds.labels.tolist(), "classes": ds.classes,
            "sources": ds.sources, "pixel_hashes": ds.pixel_hashes, "origin": ds.origin,
            "original_sizes": ds.original_sizes, "skipped": ds.skipped, "converted": ds.converted,
        })
    except OSError as exc:  # a read-only cache must not stop a run
        warnings.warn(f"could not write the image cache in {cache_root}: {exc}", stacklevel=2)


def _read_cache(cache_root: Path, key: str) -> Dataset | None:
    img_path, meta_path = _cache_paths(cache_root, key)
    if not (img_path.exists() and meta_path.exists()):
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("key") != key:
            return None
        images = np.load(img_path, mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return Dataset(images, np.array(meta["labels"], dtype=np.int64), meta["classes"],
                   meta["sources"], meta["pixel_hashes"], meta["origin"], key,
                   meta["original_sizes"], meta["skipped"], meta["converted"])


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
    data = cfg["data"]
    path = str(data.get("path") or "")
    p = Path(path).expanduser() if path else None
    if p is not None and not p.is_absolute() and cfg.source is not None:
        p = cfg.source.parent / p   # relative paths in a config file start at its folder
    if p is not None and p.exists():
        return p, None
    fb = data.get("fallback") or {}
    if fb.get("url"):
        cache = Path(data.get("cache_dir") or default_cache_dir()).expanduser()
        dest = cache / "downloads" / fb.get("filename", Path(fb["url"].split("?")[0]).name)
        where = f"{p} (or {dest})" if p else str(dest)
        info(f"data not found at {p}; using the default dataset {fb.get('name', '')} at {dest}")
        path = fetch(fb["url"], fb["md5"], dest, hint=f"no network? put a dataset folder or "
                     f".npz at {where}, or pass --data PATH")
        return path, fb.get("classes") or None
    if p is None:
        raise BenchError("no data configured: pass --data PATH or set [data] path")
    raise BenchError(f"data not found: {p}")


def prepare_dataset(cfg: Config, show_progress=True) -> tuple[Dataset, Path]:
    data = cfg["data"]
    path, fb_classes = resolve_data_path(cfg)
    ds = load_dataset(path, image_size=data["image_size"], cache_dir=data.get("cache_dir") or None,
                      classes=data.get("classes") or fb_classes, show_progress=show_progress)
    for s in ds.skipped:
        warn(f"skipped {s['path']}: {s['reason']}")
    if data.get("max_images") and len(ds) > data["max_images"]:
        rows = stratified_subset(ds.labels, data["max_images"], cfg["run"]["seed"],
                                 min_per_class=cfg["run"]["folds"] * 2)
        ds = ds.subset(rows)
    return ds, path
