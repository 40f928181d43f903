"""Does a patient's diagnosis depend on the image pipeline? (issue: patients on a new cohort)

    python benchmarks/pipeline.py --model RUN/predictor \
        [--originals ../shared/data/deepapl/originals_sample/originals.csv]

For each patient of ``originals.csv`` (columns ``file``: the analyser's original file,
``copy``: the same cell as the shared copies were made, ``patient``; paths relative to the
CSV's dataset folder, the one above it), the saved bag predictor scores the patient's
cells made several ways:

* ``originals``: the analyser's files as they come (the reference);
* ``copies``: the shared copies (96 px, PIL bicubic, JPEG quality 90);
* ``jpeg75`` / ``jpeg95``: the originals re-encoded at JPEG quality 75 / 95, full size;
* ``bilinear128``: the originals resized to 128 px with PIL bilinear (lossless PNG);
* ``lanczos96_q85``: the originals resized to 96 px with Lanczos, JPEG quality 85.

Out of fold: the originals_sample patients are among the run's patients, so a patient is
scored only by the fold models that never saw it (the fold of ``folds.csv`` beside the
predictor that holds its cells); otherwise the models' memory of the copies (they trained
on them) would pass for pipeline sensitivity. ``--all-folds`` scores with the whole
predictor instead, as ``predict --bags`` does.

It prints, per variant, the largest and mean change of a patient's score against the
originals and how many calls flip (decision at the stored threshold, referred or not), and
writes the per-patient table to ``--csv``. The issue's target: at most 0.05, no flip.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.images import read_image  # noqa: E402
from ensembles.bags import call_bag  # noqa: E402
from bench.run.rundir import RunDir  # noqa: E402
from ensembles.predictor import load_predictor  # noqa: E402

DEFAULT = ROOT.parent / "shared" / "data" / "deepapl" / "originals_sample" / "originals.csv"


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _resize(a: np.ndarray, size: int, method) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), method))


#: variant name -> how an original becomes it (arrays in, arrays out)
VARIANTS = {
    "jpeg75": lambda a: _jpeg(a, 75),
    "jpeg95": lambda a: _jpeg(a, 95),
    "bilinear128": lambda a: _resize(a, 128, Image.BILINEAR),
    "lanczos96_q85": lambda a: _jpeg(_resize(a, 96, Image.LANCZOS), 85),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a saved bag predictor (RUN/predictor)")
    ap.add_argument("--originals", default=str(DEFAULT), help="originals.csv")
    ap.add_argument("--csv", default="", help="write the per-patient table here")
    ap.add_argument(
        "--all-folds",
        action="store_true",
        help="score with every fold model (the predictor as predict --bags uses it)",
    )
    args = ap.parse_args(argv)
    csv = Path(args.originals)
    if not csv.is_file():
        print(f"error: {csv} not found (the originals_sample of ../shared/data/deepapl)")
        return 2
    table = pd.read_csv(csv)
    root = csv.parent.parent
    pred = load_predictor(args.model)
    spec = pred.bag_task_
    if spec is None:
        print(f"error: {args.model} is not a bag predictor ([data] bags = true)")
        return 2
    t0 = time.perf_counter()
    ways = {"originals": {}, "copies": {}, **{v: {} for v in VARIANTS}}
    for patient, rows in table.groupby("patient", sort=True):
        originals = [read_image(root / f) for f in rows["file"]]
        ways["originals"][patient] = originals
        ways["copies"][patient] = [read_image(root / f) for f in rows["copy"]]
        for v, make in VARIANTS.items():
            ways[v][patient] = [make(a) for a in originals]
    fold_of = {}
    folds_csv = RunDir(Path(args.model).resolve().parent).folds_file  # the predictor's run
    if not args.all_folds:
        if not folds_csv.is_file():
            print(
                f"error: {folds_csv} not found: out-of-fold scoring needs the run's folds "
                "(or give --all-folds)"
            )
            return 2
        f = pd.read_csv(folds_csv, dtype={"bag": str})
        fold_of = f.drop_duplicates("bag").set_index("bag")["fold"].to_dict()
        missing = sorted(set(table["patient"]) - set(fold_of))
        if missing:
            print(f"error: patients {missing} are not in {folds_csv}; give --all-folds")
            return 2
    classes = [str(c) for c in pred.classes_]
    pos = classes.index(spec.positive)
    out = []
    for way, bags in ways.items():
        if args.all_folds:
            results = [(r["bag"], r["n_cells"], r["probability"]) for r in pred.predict_bags(bags)]
        else:
            results = []
            for name, items in bags.items():
                X, _, _ = pred.load_bag(items)  # as predict --bags reads a bag
                _, fold_proba = pred.predict_proba(X, len(X), folds=True, one_bag=True)
                p = fold_proba[int(fold_of[name])][:, pos]  # the fold that never saw it
                # a task over cell types: the stored cell-type model types the cells (it
                # saw every run patient's cells; the comparison is between ways)
                type_p, _ = pred.cell_type_proba(X)
                results.append((name, len(X), call_bag(spec, classes, p, None, type_p)[0]))
        for name, n, score in results:
            out.append(
                {
                    "way": way,
                    "patient": name,
                    "n_cells": n,
                    "score": score,
                    "call": spec.positive if score >= spec.threshold else "other",
                }
            )
    df = pd.DataFrame(out)
    ref = df[df["way"] == "originals"].set_index("patient")
    print(
        f"predictor {args.model} ({'every fold model' if args.all_folds else 'out of fold'}): "
        f"threshold {spec.threshold:.3f}, "
        f"{len(ref)} patients, {int(ref['n_cells'].sum())} cells "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'way':<15} {'max |d score|':>13} {'mean |d|':>9} {'flips':>6}")
    for way in ways:
        if way == "originals":
            continue
        d = df[df["way"] == way].set_index("patient")
        delta = (d["score"] - ref["score"]).abs()
        flips = int((d["call"] != ref["call"]).sum())
        print(f"{way:<15} {delta.max():>13.3f} {delta.mean():>9.3f} {flips:>6}")
    print("scores on the originals: " + ", ".join(f"{p} {s:.3f}" for p, s in ref["score"].items()))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
