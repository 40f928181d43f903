"""How well the batch-level warning (core/batch.py) tells a new lab from the training labs,
measured in leave-one-lab-out on a finished several-labs run (``--profile multi``).

    python benchmarks/batch_shift.py runs/multi [--entry NAME] [--n 50] [--batches 500]

For each held-out lab L and entry: *positive* batches are ``--n`` cells of L scored by the
leave-one-lab-out models that never saw L (``RUN/labs/oof``); *negative* batches are ``--n``
cells of the other labs' held-out folds (``RUN/oof``, pooled folds). The reference of
:func:`core.batch.batch_reference` is fitted on one half of the negative rows (by group) and
the negative batches are drawn from the other half, so no batch is judged against itself.
Printed per lab: ROC AUC of the score, of each statistic alone, and the share of positive
and negative batches flagged at the stored limit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run.rundir import RunDir  # noqa: E402
from core.batch import batch_check, batch_reference, batch_stats  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--entry", action="append", default=None)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run, labs = RunDir(args.run), RunDir(Path(args.run) / "labs")
    pooled, lolo = run.folds_table, labs.folds_table
    y = run.labels
    entries = args.entry or [str(c) for c in run.read_leaderboard()["candidate"]]
    print(f"batches of {args.n} cells, {args.batches} per side and lab, seed {args.seed}")
    print(
        f"{'entry':22s} {'held-out lab':12s} {'AUC':>6s} {'AUC conf':>9s} {'AUC mix':>8s} "
        f"{'flagged lab':>12s} {'flagged in-lab':>15s}"
    )
    for entry in entries:
        p_in, p_out = run.read_oof(entry), labs.read_oof(entry)
        for lab in dict.fromkeys(lolo["domain"]):
            rng = np.random.default_rng(args.seed)
            pos_rows = np.flatnonzero(lolo["domain"].to_numpy() == lab)
            others = np.flatnonzero(pooled["domain"].to_numpy() != lab)
            groups = pooled["group"].to_numpy()[others]
            ug = rng.permutation(np.unique(groups))
            half = set(ug[: len(ug) // 2])
            ref_rows = others[[g in half for g in groups]]
            neg_rows = others[[g not in half for g in groups]]
            ref = batch_reference(p_in[ref_rows], y[ref_rows], seed=args.seed)

            def draw(p, rows):
                out = []
                for _ in range(args.batches):
                    b = p[rng.choice(rows, args.n, replace=len(rows) < args.n)]
                    c = batch_check(b, ref)
                    conf, mix = batch_stats(b, np.asarray(ref["prevalence"]))
                    out.append((c["score"], -conf, mix, c["flagged"]))
                return np.array(out, dtype=float)

            pos, neg = draw(p_out, pos_rows), draw(p_in, neg_rows)
            lab_y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            aucs = [roc_auc_score(lab_y, np.r_[pos[:, j], neg[:, j]]) for j in range(3)]
            print(
                f"{entry:22s} {lab:12s} {aucs[0]:6.3f} {aucs[1]:9.3f} {aucs[2]:8.3f} "
                f"{pos[:, 3].mean():12.0%} {neg[:, 3].mean():15.0%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
