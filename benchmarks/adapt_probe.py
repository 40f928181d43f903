"""What a new lab's labelled cells could buy beyond recalibrating the output (issue 42).

    python benchmarks/adapt_probe.py RUN_DIR [--entry xgb_all] [--n 25,100] [--draws 3]

On a finished run of several labs (``--profile multi``), per held-out lab and draw, the lab
is split as ``bench adapt`` splits a set (half adapted on, whole slides or patients; the
other half scored) and N labelled cells are drawn from the adapted half (stratified), as
the leave-one-lab-out adaptation curve draws them. Two adaptations are scored on the other
half (balanced accuracy, mean over the draws):

* ``recalibrate``: the entry's out-of-lab output recalibrated (``core.recalibrate``, what
  ``bench adapt --n N`` does today);
* ``probe``: a logistic regression on the entry's out-of-lab log-probabilities and the
  entry's own features of the cell (its feature set), L2 strength chosen by inner
  cross-validation on the N cells, balanced class weights: a stand-in for refitting the
  members' heads on the lab's cells (not in the product yet).

A prototype measurement, not a product path: it reads the entry's feature set, so
``--entry`` must be a feature candidate (``xgb_all``, ``rf_color``, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run.rundir import RunDir  # noqa: E402
from bench.stats.draws import adaptation_rows, draw  # noqa: E402
from core import recalibrate  # noqa: E402
from core.candidate import build_candidate  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def _ba(y, p) -> float:
    pred = p.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run of several labs (its labs/ sub-run)")
    ap.add_argument("--entry", default="xgb_all")
    ap.add_argument("--n", default="25,100")
    ap.add_argument("--draws", type=int, default=3)
    args = ap.parse_args(argv)
    lab_run = RunDir(Path(args.run) / "labs")
    cfg = lab_run.config
    table, classes = lab_run.folds_table, lab_run.classes
    y = np.array([classes.index(str(c)) for c in table["label"]])
    proba = lab_run.read_oof(args.entry)
    feats = build_candidate(cfg.candidates[args.entry].spec())._features(np.asarray(lab_run.images))
    X = np.column_stack([np.log(np.clip(proba, 1e-6, 1)), feats])
    ns = [int(v) for v in args.n.split(",")]
    print(f"{args.run}: entry {args.entry}, {feats.shape[1]} features, {args.draws} draws")
    print(
        "| held-out lab | zero-shot | "
        + " | ".join(f"N = {n} recalibrate | N = {n} probe" for n in ns)
        + " |"
    )
    print("|---|---:|" + "---:|---:|" * len(ns))
    for lab in dict.fromkeys(table["domain"]):
        rows = np.flatnonzero((table["domain"] == lab).to_numpy())
        groups = table["group"].to_numpy()[rows]
        grouped = len(np.unique(groups)) < len(rows)
        got = {"zero": [], **{(n, k): [] for n in ns for k in ("recal", "probe")}}
        for d in range(args.draws):
            used, scored = adaptation_rows(len(rows), groups if grouped else None, len(rows), d)
            te = rows[scored]
            got["zero"].append(_ba(y[te], proba[te]))
            for n in ns:
                picked, _ = draw([str(v) for v in y[rows[used]]], None, n, d)
                tr = rows[used[picked]]
                fit = recalibrate.fit(proba[tr], y[tr], seed=d)
                got[(n, "recal")].append(
                    _ba(y[te], recalibrate.apply(proba[te], fit["temperature"], fit["bias"]))
                )
                counts = np.bincount(y[tr])
                model = make_pipeline(
                    SimpleImputer(keep_empty_features=True),
                    StandardScaler(),
                    LogisticRegressionCV(
                        Cs=[0.001, 0.01, 0.1, 1.0],
                        cv=max(2, min(5, int(counts[counts > 0].min()))),
                        class_weight="balanced",
                        max_iter=2000,
                    ),
                ).fit(X[tr], y[tr])
                p = np.zeros((len(te), len(classes)))
                p[:, model[-1].classes_] = model.predict_proba(X[te])
                got[(n, "probe")].append(_ba(y[te], p))
        m = {k: np.mean(v) for k, v in got.items()}
        print(
            f"| {lab} | {m['zero']:.3f} | "
            + " | ".join(f"{m[(n, 'recal')]:.3f} | {m[(n, 'probe')]:.3f}" for n in ns)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
