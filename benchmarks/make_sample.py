"""Regenerate the blood-cell sample packaged with bloodbench (``bench/sample/``).

    python benchmarks/make_sample.py [--src ../shared/data/pbc/pbc_64.npz] \\
        [--per-class 64] [--seed 2026] [--out bench/sample/pbc_sample_64.npz]

A seeded, class-stratified sample of ``--per-class`` images of each of the 8 PBC classes,
taken from ``pbc_64.npz`` (every image already resized whole to 64 px, PIL bicubic,
antialiased; see ``../shared/data/pbc/SOURCE.md``), written with ``np.savez_compressed``
under the keys ``images`` (uint8, N x 64 x 64 x 3), ``labels`` (int64), ``classes`` (str)
and ``files`` (the original file names). Rows are sorted by class, then file name.

Near duplicates: of each pair in ``near_duplicates.csv`` (next to the source), the second
file is never drawn, so the sample holds at most one image of a pair and its folds need
no pairs file. The same arguments always give the same file (byte for byte, since
``np.savez_compressed`` writes fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "pbc" / "pbc_64.npz"
DEFAULT_OUT = ROOT / "bench" / "sample" / "pbc_sample_64.npz"


def excluded_files(src: Path) -> set[str]:
    """The second file of each near-duplicate pair listed beside ``src``."""
    pairs = src.parent / "near_duplicates.csv"
    if not pairs.is_file():
        return set()
    with open(pairs, newline="") as fh:
        return {row["file_b"] for row in csv.DictReader(fh)}


def sample_rows(
    labels: np.ndarray, files: np.ndarray, per_class: int, seed: int, exclude: set[str]
) -> np.ndarray:
    """``per_class`` rows of each class, drawn without replacement (seeded), sorted."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        pool = np.array([i for i in np.flatnonzero(labels == c) if str(files[i]) not in exclude])
        if len(pool) < per_class:
            raise SystemExit(
                f"class {c} has {len(pool)} images, fewer than --per-class {per_class}"
            )
        rows.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(DEFAULT_SRC))
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    src = Path(args.src)
    with np.load(src) as z:
        images, labels, classes, files = (z[k] for k in ("images", "labels", "classes", "files"))
    rows = sample_rows(labels, files, args.per_class, args.seed, excluded_files(src))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=np.ascontiguousarray(images[rows], dtype=np.uint8),
        labels=labels[rows].astype(np.int64),
        classes=classes.astype(str),
        files=files[rows].astype(str),
    )
    counts = np.bincount(labels[rows], minlength=len(classes))
    print(
        f"{out}: {len(rows)} images ({', '.join(f'{c} {n}' for c, n in zip(classes, counts))}),"
        f" {out.stat().st_size / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
