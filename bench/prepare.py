"""Before the work units: what candidates compute once for all images.

Candidates that declare ``needs_prepare`` (feature extraction, frozen-backbone
embeddings) run their ``prepare(X_all)`` here, without labels; its results are cached on
disk, keyed by the images' content, so every fold and every later run reuses them.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from core import registry
from core.candidate import build_candidate
from core.stress import simulate


def _prepare_here(entries: dict, images, plugins, shifts=(), seed: int = 0) -> dict:
    """Run each candidate's ``prepare``; ``images`` may be a ``.npy`` path (memory-mapped).
    With ``shifts`` ([stress]) also on every image under each simulated shift: the images
    the work units score their fold models on beside the clean ones."""
    if isinstance(images, str):
        images = np.load(images, mmap_mode="r")
    registry.import_plugins(plugins)
    seconds, shifted = {}, {}
    for name, entry in entries.items():
        cand = build_candidate(entry)
        if cand.needs_prepare:
            t = time.perf_counter()
            cand.prepare(images)
            for s in shifts:
                if s not in shifted:
                    shifted[s] = simulate(images, s, np.arange(len(images)), seed)
                cand.prepare(shifted[s])
            seconds[name] = time.perf_counter() - t
    return seconds


def prepare_candidates(entries: dict, images, plugins=(), shifts=(), seed: int = 0) -> dict:
    """Cache what candidates compute once for all images (and, with ``shifts``, for all
    images under each simulated shift, seeded by ``seed`` as the work units shift them);
    returns seconds per candidate.

    Candidates that declare ``prepare_in_child`` (frozen-backbone embeddings) run in one
    spawned child process: TensorFlow keeps the memory of a backbone's forward passes for
    the life of a process, and the runner must stay small while the work units run beside
    it. The others (feature extraction, joblib workers) run here.
    """
    def child_kind(e):
        return registry.get(e["type"]).prepare_in_child
    here = {n: e for n, e in entries.items() if not child_kind(e)}
    child = {n: e for n, e in entries.items() if child_kind(e)}
    seconds = _prepare_here(here, images, list(plugins), list(shifts), seed)
    if child:
        src = images
        fname = getattr(images, "filename", None)
        if isinstance(images, np.memmap) and fname and Path(fname).suffix == ".npy" \
                and np.load(fname, mmap_mode="r").shape == images.shape:
            src = str(fname)   # the cached array itself, not a copy through a pipe
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            seconds.update(ex.submit(_prepare_here, child, src, list(plugins), list(shifts),
                                     seed).result())
    return seconds
