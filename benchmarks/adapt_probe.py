"""What a new lab's own cells buy, per way of using them (issue 42).

    python benchmarks/adapt_probe.py RUN_DIR [--entry xgb_all] [--n 25,100] [--draws 5]
                                     [--keep 0.5]

On a finished run of several labs (``--profile multi``), per held-out lab and draw, the lab
is split as ``bench adapt`` splits a set (half adapted on, whole slides or patients; the
other half scored) and N labelled cells are drawn from the adapted half (stratified), with
the seeds of the leave-one-lab-out adaptation curve (the run's seed + draw). Scored on the
other half (balanced accuracy, mean over the draws):

* ``recalibrate``: the entry's out-of-lab output recalibrated (``core.recalibrate``: one
  temperature and class offsets; what ``bench adapt --n N`` did before the lab head);
* ``head``: the lab head (``core.labhead``, what ``bench adapt --n N`` and the curve do):
  output and the cells' features (``[predictor] adapt_features`` of the run's config, of
  the central ``adapt_crop``), shrunk toward the original by inner cross-validation;
* ``probe``: a plain logistic regression on the entry's log-probabilities and the same
  features (scikit-learn, C by inner cross-validation, balanced): the prototype the head
  replaced;
* ``self-training`` (no labels): the head fitted on the entry's own confident answers on
  the adapted half (the ``--keep`` most confident share of each predicted class, as
  pseudo-labels), the unlabelled lever the issue asks to measure.
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
from core import labhead, recalibrate  # noqa: E402
from features import extract_central  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def _ba(y, p) -> float:
    pred = p.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _probe(proba, feats, y, tr, te, k):
    X = np.column_stack([np.log(np.clip(proba, 1e-6, 1)), feats])
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
    p = np.zeros((len(te), k))
    p[:, model[-1].classes_] = model.predict_proba(X[te])
    return p


def _pseudo(proba, keep: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of the ``keep`` most confident share of each predicted class."""
    pred, conf = proba.argmax(1), proba.max(1)
    rows = []
    for c in np.unique(pred):
        at = np.flatnonzero(pred == c)
        rows += list(at[np.argsort(-conf[at])[: max(1, int(keep * len(at)))]])
    rows = np.sort(np.asarray(rows))
    return rows, pred[rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run of several labs (its labs/ sub-run)")
    ap.add_argument("--entry", default="xgb_all")
    ap.add_argument("--n", default="25,100")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.5, help="self-training: share kept")
    args = ap.parse_args(argv)
    lab_run = RunDir(Path(args.run) / "labs")
    cfg = lab_run.config
    table, classes = lab_run.folds_table, lab_run.classes
    k = len(classes)
    y = np.array([classes.index(str(c)) for c in table["label"]])
    proba = lab_run.read_oof(args.entry)
    head_set = cfg.predictor.adapt_features or "all"
    spec, crop = cfg.feature_sets[head_set], cfg.predictor.adapt_crop
    feats = extract_central(lab_run.images, spec, crop)
    ns = [int(v) for v in args.n.split(",")]
    seed = int(cfg.run.seed)
    print(
        f"{args.run}: entry {args.entry}; features '{head_set}' of the central {crop:g} "
        f"({feats.shape[1]} values); {args.draws} draws, seeds {seed}..{seed + args.draws - 1}"
    )
    ways = ("recalibrate", "head", "probe")
    print(
        "| held-out lab | zero-shot | self-training (no labels) | "
        + " | ".join(f"N = {n} {w}" for n in ns for w in ways)
        + " |"
    )
    print("|---|---:|---:|" + "---:|" * (len(ns) * len(ways)))
    for lab in dict.fromkeys(table["domain"]):
        rows = np.flatnonzero((table["domain"] == lab).to_numpy())
        groups = table["group"].to_numpy()[rows]
        grouped = len(np.unique(groups)) < len(rows)
        got = {"zero": [], "self": [], **{(n, w): [] for n in ns for w in ways}}
        for d in range(args.draws):
            s = seed + d
            used, scored = adaptation_rows(len(rows), groups if grouped else None, len(rows), s)
            te, half = rows[scored], rows[used]
            got["zero"].append(_ba(y[te], proba[te]))
            at, pseudo = _pseudo(proba[half], args.keep)
            fit = labhead.fit(proba[half][at], feats[half][at], pseudo, reference=feats[half])
            got["self"].append(_ba(y[te], fit.head.apply(proba[te], feats[te])))
            for n in ns:
                picked, _ = draw([str(v) for v in y[half]], None, n, s)
                tr = half[picked]
                rc = recalibrate.fit(proba[tr], y[tr], seed=s)
                got[(n, "recalibrate")].append(
                    _ba(y[te], recalibrate.apply(proba[te], rc["temperature"], rc["bias"]))
                )
                head = labhead.fit(proba[tr], feats[tr], y[tr], reference=feats[half], seed=s)
                got[(n, "head")].append(_ba(y[te], head.head.apply(proba[te], feats[te])))
                got[(n, "probe")].append(_ba(y[te], _probe(proba, feats, y, tr, te, k)))
        m = {key: np.mean(v) for key, v in got.items()}
        print(
            f"| {lab} | {m['zero']:.3f} | {m['self']:.3f} | "
            + " | ".join(f"{m[(n, w)]:.3f}" for n in ns for w in ways)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
