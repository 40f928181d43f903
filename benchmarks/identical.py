"""Are two runs of one profile the same result? For a refactoring that must not change
behaviour (issue 41: the smoke profile before and after).

    python benchmarks/identical.py RUN_A RUN_B [--images ../shared/data/pbc/images] [--n 100]

Prints, and exits 1 when anything differs:

* the leaderboard's columns, and per column whether every entry's value is bit-identical
  (timings, sizes and costs are listed apart: they are measurements of the machine);
* per ``oof/*.npy`` whether the out-of-fold probabilities are bit-identical;
* with ``--images``: the largest difference between the two saved predictors'
  probabilities on ``--n`` of those images (every k-th file in sorted order), both loaded
  by the code this script runs with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run.rundir import RunDir  # noqa: E402
from ensembles.predictor import load_predictor  # noqa: E402

#: leaderboard columns that measure the machine, not the result
MEASURED = ("seconds", "_ms", "model_size")


def _same(a, b) -> bool:
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
    return a.astype(str).tolist() == b.astype(str).tolist()


def compare(run_a: Path, run_b: Path, images: Path | None, n: int) -> bool:
    a, b = RunDir(run_a), RunDir(run_b)
    la, lb = a.read_leaderboard(), b.read_leaderboard()
    ok = list(la.columns) == list(lb.columns) and list(la["candidate"]) == list(lb["candidate"])
    print(
        f"leaderboard: {len(la)} entries, {len(la.columns)} columns; same entries and columns: {ok}"
    )
    measured = [c for c in la.columns if any(m in c for m in MEASURED)]
    differ = [c for c in la.columns if c in lb and c not in measured and not _same(la[c], lb[c])]
    print(f"  result columns differing: {differ or 'none'}")
    print(f"  machine measurements (not compared): {measured}")
    ok &= not differ
    names = list(la["candidate"])
    same_oof = {
        n_: np.array_equal(a.read_oof(n_), b.read_oof(n_))
        for n_ in names
        if a.oof_file(n_).is_file() and b.oof_file(n_).is_file()
    }
    print(
        f"oof: {sum(same_oof.values())} of {len(same_oof)} bit-identical"
        + (
            ""
            if all(same_oof.values())
            else f"; differing: {[k for k, v in same_oof.items() if not v]}"
        )
    )
    ok &= all(same_oof.values())
    if images is not None:
        files = sorted(
            str(p)
            for p in images.rglob("*")
            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
        )
        files = files[:: max(1, len(files) // n)][:n]
        pa = load_predictor(a.predictor_dir).predict_proba(files)
        pb = load_predictor(b.predictor_dir).predict_proba(files)
        diff = float(np.abs(pa - pb).max())
        print(
            f"predictor: {len(files)} images, largest probability difference {diff:g}; "
            f"identical: {np.array_equal(pa, pb)}"
        )
        ok &= bool(np.array_equal(pa, pb))
    print("IDENTICAL" if ok else "DIFFERENT")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    return 0 if compare(args.run_a, args.run_b, args.images, args.n) else 1


if __name__ == "__main__":
    raise SystemExit(main())
