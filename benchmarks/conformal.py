"""Prediction-set figures of a saved predictor at 90 % and 95 %, from files already written.

    python benchmarks/conformal.py --model DIR/predictor [--eval EVAL_DIR ...]

Prints the in-lab cross-conformal figures stored in the manifest (each fold's out-of-fold
rows scored by sets calibrated on the other folds' out-of-fold rows), and for each
``bench evaluate`` folder (its ``predictions.csv`` probabilities, with the rows it scored):
coverage, mean set size and singletons of the predictor's stored calibration at 0.90 and
0.95, accuracy, the accuracy of the most confident 50 % and 80 %, AURC and excess AURC.
``--recalibrate N`` also repeats what ``bench calibrate --n N`` does on each evaluation's
rows for ``--seeds`` seeds (the same draw: whole groups when predictions.csv has a group
column; the same refit) and prints the coverage on the rest at 0.90 and 0.95 per method.
Runs no model, except with ``--data NPZ``: the predictor scores that labelled npz
(``images``, ``labels``, ``classes``; e.g. a lab's images no fit saw) and the coverage and
set size at 0.90 and 0.95 are printed for the cross-conformal scheme (each fold's ensemble
against its own fold's rows; the rows' folds from the manifest, or from the run's
``folds.csv`` beside the predictor) and for split-conformal sets of the fold average against
every row, with the stored method.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from core.conformal import ConformalSets, accuracy_at_coverage, aurc, set_figures

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="predictor directory")
    ap.add_argument("--eval", nargs="*", default=[], help="bench evaluate output folders")
    ap.add_argument("--recalibrate", type=int, default=0, metavar="N")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--per-group", dest="per_group", type=int, default=10)
    ap.add_argument("--data", help="a labelled npz to score with the predictor")
    ap.add_argument("--n", type=int, default=0, help="with --data: a seeded sample (0: all)")
    args = ap.parse_args(argv)
    from ensembles.record import verify_predictor

    m = verify_predictor(args.model).raw  # checked: a predictor, not a run or a stray file
    classes, cp = m["classes"], m["conformal"]
    print(
        f"{args.model}: {cp['method']} at {cp['confidence']:g}, calibrated on "
        f"{cp['n_calibration']} {cp['fitted_on']}"
    )
    for c, f in (cp.get("in_lab") or {}).get("by_confidence", {}).items():
        print(
            f"  in-lab (each fold's rows vs the other folds') {c}: coverage {f['coverage']:.4f}, mean set size "
            f"{f['mean_set_size']:.3f}, singletons {f['singleton_share']:.3f}"
        )
    state = ConformalSets.from_dict(cp, len(classes))
    for ev in args.eval:
        df = pd.read_csv(Path(ev) / "predictions.csv")
        p = df[classes].to_numpy(np.float64)
        y = np.array([classes.index(c) for c in df["true_class"]])
        pv = state.p_values(p)
        conf, ok = p.max(axis=1), p.argmax(axis=1) == y
        print(
            f"  {ev}: {len(y)} images, accuracy {ok.mean():.4f}, most confident 50 % "
            f"{accuracy_at_coverage(conf, ok, 0.5):.4f}, 80 % "
            f"{accuracy_at_coverage(conf, ok, 0.8):.4f}, AURC {aurc(conf, ok)['aurc']:.4f} "
            f"(excess {aurc(conf, ok)['excess_aurc']:.4f})"
        )
        for c in (0.90, 0.95):
            f = set_figures(pv >= 1 - c - 1e-12, y)
            print(
                f"    {c:.2f}: coverage {f['coverage']:.4f}, mean set size "
                f"{f['mean_set_size']:.3f}, singletons {f['singleton_share']:.3f}"
            )
        if args.recalibrate:
            recalibrate(
                p,
                y,
                df["group"].astype(str).tolist() if "group" in df else None,
                args.recalibrate,
                args.seeds,
                args.per_group,
            )
    if args.data:
        score_npz(args.model, cp, classes, args.data, args.n)
    return 0


def score_npz(model, cp: dict, classes: list, data: str, n: int) -> None:
    from core.conformal import ConformalSets, accuracy_at_coverage, set_figures
    from ensembles.predictor import load_predictor

    d = np.load(data, allow_pickle=True)
    names = [str(c) for c in d["classes"]]
    y = np.array([classes.index(names[int(v)]) for v in d["labels"]])
    rows = np.arange(len(y))
    if n and n < len(y):
        rows = np.sort(np.random.default_rng(0).choice(rows, n, replace=False))
    pred = load_predictor(model)
    p, pf = pred.predict_proba(d["images"][rows], folds=True)
    y = y[rows]
    ok = p.argmax(axis=1) == y
    print(
        f"  {data}: {len(y)} images, accuracy {ok.mean():.4f} (fold models "
        f"{', '.join(f'{(f.argmax(axis=1) == y).mean():.4f}' for f in pf)}), most confident "
        f"50 % {accuracy_at_coverage(p.max(axis=1), ok, 0.5):.4f}"
    )
    folds = cp.get("folds")
    from bench.run.rundir import RunDir

    run_folds = RunDir(Path(model).parent).folds_file  # a split-scheme predictor in its run
    if folds is None and run_folds.is_file():
        f = pd.read_csv(run_folds)["fold"].to_numpy()
        if len(f) == cp["n_calibration"]:
            ids = sorted(set(f.tolist()))
            folds = [ids.index(k) for k in f]
    cal = np.asarray(cp["scores"]), np.asarray(cp["labels"]), folds
    method = cp["method"]  # the stored scores are the stored method's
    for c in (0.90, 0.95):
        st = ConformalSets(method, c, cal[0], cal[1], len(classes), cal_folds=cal[2])
        split = ConformalSets(method, c, cal[0], cal[1], len(classes))
        a, b = set_figures(st.sets(p, fold_proba=pf), y), set_figures(split.sets(p), y)
        print(
            f"    {method} {c:.2f}: cross-conformal coverage {a['coverage']:.4f} (set "
            f"{a['mean_set_size']:.3f}); split on the fold average {b['coverage']:.4f} "
            f"(set {b['mean_set_size']:.3f})"
        )


def recalibrate(p, y, groups, n: int, seeds: int, per_group: int) -> None:
    from bench.stats.draws import draw
    from core.conformal import ConformalSets, set_figures

    for method in ("mondrian", "lac", "aps"):
        res = {0.90: [], 0.95: []}
        for seed in range(seeds):
            drawn, excluded = draw([str(v) for v in y], groups, n, seed, per_group)
            rest = np.setdiff1d(np.arange(len(y)), np.concatenate([drawn, excluded]))
            for c in res:
                st = ConformalSets.fit(p[drawn], y[drawn], method, c)
                f = set_figures(st.sets(p[rest]), y[rest])
                res[c].append((f["coverage"], f["mean_set_size"]))
        for c, v in res.items():
            cov = np.array([a for a, _ in v])
            print(
                f"    recalibrated on {n} ({f'<= {per_group} per group' if groups else 'stratified'}), "
                f"{method} {c:.2f}: coverage on the rest mean {cov.mean():.4f} (min "
                f"{cov.min():.4f}, max {cov.max():.4f}, {seeds} seeds), mean set size "
                f"{np.mean([b for _, b in v]):.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
