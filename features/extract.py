"""Feature extraction over many images: parallel (joblib), cached per image on disk.

The cache is content-addressed: one store per extractor and parameters, keyed by a digest
of each image's pixels, so every candidate, feature set and fold reuses one extraction and
new images (a new fold, a new dataset) only compute what is missing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from core.cache import default_cache_dir
from core.errors import BenchError
from core.images import center_crop
from core.io import stable_hash
from core.progress import progress_iter
from features.color import color_features
from features.glcm import glcm_features
from features.hog import hog_features
from features.lbp import lbp_features
from features.morphology import morphology_features

FEATURES_VERSION = 2  # 2: one store per extractor, concatenated in sorted order
#: Extractor name -> function ``f(img, **params) -> 1-D float32`` (fixed length for a given
#: image size and params; see each function's docstring for the length).
EXTRACTORS = {
    "hog": hog_features,
    "lbp": lbp_features,
    "glcm": glcm_features,
    "color": color_features,
    "morphology": morphology_features,
}
_CACHE_DIR: Path | None = None
MEMO_STORES = 6  # stores kept in memory per process (a store is re-read when its file changes)
_MEMO: dict = {}
_NO_CACHE = "off"


def set_cache_dir(path) -> None:
    """Set where feature stores live (``None``: default cache; ``"off"``: no disk cache)."""
    global _CACHE_DIR
    _CACHE_DIR = path if path == _NO_CACHE else (Path(path) if path else None)


def _store_dir() -> Path | None:
    if _CACHE_DIR == _NO_CACHE:
        return None
    if _CACHE_DIR is not None:
        return _CACHE_DIR
    return default_cache_dir() / "features"


def _check_spec(spec: dict) -> None:
    if not isinstance(spec, dict) or not spec:
        raise BenchError(f"a feature set must be a non-empty table of extractors, got {spec!r}")
    unknown = [k for k in spec if k not in EXTRACTORS]
    if unknown:
        raise BenchError(f"unknown feature extractor(s) {unknown}; known: {sorted(EXTRACTORS)}")


def check_feature_set(spec: dict, image_size: int, where: str = "feature set") -> None:
    """Refuse, in one line naming ``where``, a feature set whose extractors are unknown or
    whose parameters an extractor rejects (each runs once on a blank image of the run's
    size: cheap, and exactly the code that will run)."""
    if not isinstance(spec, dict) or not spec:
        raise BenchError(
            f"{where}: a feature set must be a non-empty table of extractors, got {spec!r}"
        )
    for name, params in spec.items():
        if name not in EXTRACTORS:
            raise BenchError(
                f"{where}: unknown feature extractor '{name}'; known: {sorted(EXTRACTORS)}"
            )
        if params is not None and not isinstance(params, dict):
            raise BenchError(f"{where} {name}: parameters must be a table, got {params!r}")
        try:
            EXTRACTORS[name](np.zeros((image_size, image_size, 3), np.uint8), **(params or {}))
        except BenchError as exc:
            raise BenchError(f"{where} {name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any rejection of the parameters
            raise BenchError(
                f"{where} {name}: bad parameters {params!r} ({type(exc).__name__}: {exc})"
            ) from None


def extract_one(img: np.ndarray, spec: dict) -> np.ndarray:
    """The feature vector of one RGB ``uint8`` image (extractors in alphabetical order)."""
    parts = [EXTRACTORS[name](img, **(spec[name] or {})) for name in sorted(spec)]
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in parts])


def feature_length(spec: dict, image_size: int) -> int:
    _check_spec(spec)
    return len(extract_one(np.zeros((image_size, image_size, 3), np.uint8), spec))


def _chunk(images, todo: dict) -> dict:
    """``{name: (n, d) features}`` of ``images`` for the extractors ``todo = {name: params}``."""
    out = {}
    for name, params in todo.items():
        f = EXTRACTORS[name]
        out[name] = np.stack(
            [np.asarray(f(np.asarray(im), **params), dtype=np.float32).ravel() for im in images]
        )
    return out


def _digests(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def extract(
    images: np.ndarray,
    spec: dict,
    n_jobs: int | None = None,
    chunk_size: int = 128,
    progress: bool = False,
    use_cache: bool = True,
) -> np.ndarray:
    """Feature matrix (N, D) ``float32`` of ``images`` (N, H, W, 3) ``uint8``.

    The columns are the extractors' vectors in alphabetical order of their names. Each
    extractor (with its parameters) has its own on-disk store, so feature sets that share
    an extractor (``hog`` and ``all``, say) compute it once. Extractors missing the same
    images are computed together, in one parallel pass over those images.

    Parameters
    ----------
    spec : feature set, ``{extractor: params}``.
    n_jobs : joblib processes; default ``$BLOODBENCH_JOBS`` or all cores.
    use_cache : read and extend the on-disk stores.
    """
    _check_spec(spec)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise BenchError(f"features need RGB images (N, H, W, 3); got shape {images.shape}")
    if not len(images):
        return np.zeros((0, 0), np.float32)
    digests = _digests(images)
    store_dir = _store_dir() if use_cache else None
    names = sorted(spec)
    stores, known, groups = {}, {}, {}
    for name in names:
        key = stable_hash(
            {
                "v": FEATURES_VERSION,
                "extractor": name,
                "params": spec[name] or {},
                "shape": images.shape[1:],
            }
        )[:24]
        stores[name] = store_dir / f"{name}-{key}.npz" if store_dir else None
        known[name] = _load_store(stores[name]) if stores[name] else {}
        seen, todo = set(), []
        for i, d in enumerate(digests):  # identical images are computed once
            if d not in known[name] and d not in seen:
                seen.add(d)
                todo.append(i)
        if todo:
            groups.setdefault(tuple(todo), []).append(name)
    for todo, group in groups.items():
        _compute(
            images,
            digests,
            list(todo),
            {n: spec[n] or {} for n in group},
            known,
            n_jobs,
            chunk_size,
            progress,
        )
        for name in group:
            if stores[name]:
                _save_store(stores[name], known[name])
    return np.concatenate([np.stack([known[n][d] for d in digests]) for n in names], axis=1)


def _compute(images, digests, todo, params, known, n_jobs, chunk_size, progress) -> None:
    jobs = n_jobs or int(os.environ.get("BLOODBENCH_JOBS", 0)) or os.cpu_count() or 1
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    if jobs == 1 or len(chunks) == 1:
        results = (_chunk(images[c], params) for c in chunks)
    else:
        results = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(_chunk)(images[c], params) for c in chunks
        )
    for c, feats in progress_iter(
        zip(chunks, results),
        total=len(chunks),
        desc=f"features {'+'.join(params)}",
        enabled=progress,
    ):
        for name, block in feats.items():
            for i, f in zip(c, block):
                known[name][digests[i]] = f


def _load_store(store: Path) -> dict:
    """``{digest: vector}`` of a store; the last few are kept in memory while unchanged."""
    try:
        st = store.stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _MEMO.get(store)
    if hit and hit[0] == stamp:
        return dict(hit[1])
    try:
        with np.load(store, allow_pickle=False) as z:
            known = dict(zip(z["digests"].tolist(), z["features"]))
    except (OSError, ValueError, KeyError):
        return {}
    _remember(store, stamp, known)
    return dict(known)


def _remember(store: Path, stamp, known: dict) -> None:
    _MEMO.pop(store, None)
    _MEMO[store] = (stamp, dict(known))
    while len(_MEMO) > MEMO_STORES:
        _MEMO.pop(next(iter(_MEMO)))


def _save_store(store: Path, known: dict) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, digests=np.array(list(known)), features=np.stack(list(known.values())))
        os.replace(tmp, store)
        st = store.stat()
        _remember(store, (st.st_mtime_ns, st.st_size), known)
    except OSError:
        tmp.unlink(missing_ok=True)


def extract_central(images: np.ndarray, spec: dict, crop: float | None = None, **kwargs):
    """:func:`extract` of the central ``crop`` of each image's side
    (:func:`core.images.center_crop`; ``None`` or 1: the whole image)."""
    return extract(np.ascontiguousarray(center_crop(np.asarray(images), crop)), spec, **kwargs)
