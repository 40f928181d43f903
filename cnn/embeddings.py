"""Backbone embeddings cached on disk, one vector per image, keyed by the image's content.

A store holds the embeddings of one backbone setting (name, width, input size, weights,
image shape) in ``$BLOODBENCH_CACHE/embeddings/<key>.npz``; each row is found by a
digest of the image's pixels, so every fold, every candidate with the same backbone and
every later run reuse one forward pass per image. Like the hand-crafted feature cache
(:mod:`features.extract`), nothing in it depends on labels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from core.cache import default_cache_dir
from core.io import stable_hash
from core.progress import progress_iter

EMBEDDINGS_VERSION = 1


def store_dir() -> Path:
    return default_cache_dir() / "embeddings"


def digests(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def store_key(spec: dict) -> str:
    return stable_hash({"v": EMBEDDINGS_VERSION, **spec})[:24]


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            return dict(zip(z["digests"].tolist(), z["embeddings"]))
    except (OSError, ValueError, KeyError):
        return {}


def _save(path: Path, known: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, digests=np.array(list(known)), embeddings=np.stack(list(known.values())))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def cached_embeddings(
    images: np.ndarray,
    spec: dict,
    compute,
    batch_size: int = 256,
    use_cache: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Embeddings (N, D) ``float32`` of ``images``, computing only the missing ones.

    Parameters
    ----------
    images : (N, H, W, 3) ``uint8``.
    spec : what determines the embedding (backbone, weights digest, sizes); the store key.
    compute : ``fn(images_batch) -> (n, D)`` array, the backbone's forward pass.
    use_cache : read and extend the on-disk store.
    """
    images = np.asarray(images)
    keys = digests(images)
    path = store_dir() / f"{store_key({**spec, 'shape': list(images.shape[1:])})}.npz"
    known = _load(path) if use_cache else {}
    todo, seen = [], set()
    for i, d in enumerate(keys):  # each missing image once, duplicates share a row
        if d not in known and d not in seen:
            seen.add(d)
            todo.append(i)
    if todo:
        chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        for chunk in progress_iter(chunks, total=len(chunks), desc="embeddings", enabled=progress):
            out = np.asarray(compute(images[chunk]), dtype=np.float32)
            for i, e in zip(chunk, out):
                known[keys[i]] = e
        if use_cache:
            _save(path, known)
    if not len(images):
        return np.zeros((0, 0), np.float32)
    return np.stack([known[d] for d in keys]).astype(np.float32)
