"""The lever table of a bag task: one Markdown row per run directory.

    python benchmarks/patients.py RUN_DIR [RUN_DIR ...] [--label NAME=RUN_DIR ...]

Per run (``patient_leaderboard.csv`` and ``patients/meta.json``): its settings
(``[data] smooth``, ``[patients] bag_colour``, ``bag_jitter``, ``threshold``), the
predictor's row (the carried row, chosen by ROC AUC then log loss among the rows a
predictor can carry) with its out-of-fold ROC AUC and 95 % CI, sensitivity and
specificity at its fold thresholds (each chosen on the other folds' patients by the
stored rule), the **nested** figure of that choice with its referral (share referred and
accuracy of the called patients at ``[patients] refer_rate``), the best colour-only
(shortcut) row, the best restricted-cell row, the best typed-cell and type-model rows and
the cell-type stage's out-of-fold cell accuracy. With ``benchmarks/pipeline.py --csv`` files named
``pipeline.csv`` inside a run directory, the largest score change originals -> copies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run.rundir import RunDir  # noqa: E402


def _ci(r, m: str = "roc_auc") -> str:
    return f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]"


def row(run: Path) -> dict:
    board, _, _, meta = RunDir(run).read_patients()
    cfg = RunDir(run).config
    models = board[board["kind"] != "nested"]
    carried = models[models["entry"] == meta["carried"]["row"]].iloc[0]
    nested = board[board["kind"] == "nested"].iloc[0]
    short = models[models["shortcut"].astype(bool) & (models["cells"] == "all")]
    disease = models[models["cells"] == "disease"]
    typed = models[models["cells"] == "typed"]
    tmodel = models[(models["aggregator"] == "type_model") & ~models["shortcut"].astype(bool)]
    stage = meta.get("cell_type_stage") or {}
    ref = (meta.get("nested") or {}).get("referral") or {}
    mil = models[models["aggregator"] == "attention"]
    pipe = run / "pipeline.csv"
    moved = ""
    if pipe.is_file():
        p = pd.read_csv(pipe)
        ref = p[p["way"] == "originals"].set_index("patient")["score"]
        cp = p[p["way"] == "copies"].set_index("patient")["score"]
        moved = f"{(cp - ref).abs().max():.3f}"
    pat = cfg.patients
    return {
        "smooth": cfg.data.smooth,
        "bag_colour": pat.bag_colour,
        "bag_jitter": pat.bag_jitter,
        "threshold": pat.threshold,
        "predictor row": carried["entry"],
        "ROC AUC (row)": _ci(carried),
        "sens / spec (row)": f"{carried['sensitivity']:.2f} / {carried['specificity']:.2f}",
        "nested ROC AUC": _ci(nested),
        "nested sens / spec": f"{nested['sensitivity']:.2f} / {nested['specificity']:.2f}",
        "best row": f"{models.iloc[0]['entry']} {models.iloc[0]['roc_auc']:.3f}",
        "colour-only": "" if short.empty else f"{short['roc_auc'].max():.3f}",
        "disease cells": "" if disease.empty else f"{disease['roc_auc'].max():.3f}",
        "typed cells (best)": ""
        if typed.empty
        else f"{typed.iloc[0]['entry']} {_ci(typed.iloc[0])}",
        "type model (best)": ""
        if tmodel.empty
        else f"{tmodel.iloc[0]['entry']} {_ci(tmodel.iloc[0])}",
        "cell-type accuracy": f"{stage['out_of_fold_accuracy']:.3f}" if stage else "",
        "nested referred / accuracy of called": (
            f"{ref['referred']:.0%} / {ref['accuracy_called']:.3f} (sens "
            f"{ref['sensitivity_called']:.2f}, at most {ref['max_rate']:.0%})"
            if ref
            else ""
        ),
        "attention MIL": "" if mil.empty else _ci(mil.iloc[0]),
        "max |score change| copies": moved,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (LABEL=DIR names a row)")
    args = ap.parse_args(argv)
    rows = []
    for a in args.runs:
        label, _, path = a.rpartition("=")
        path = Path(path)
        if not (path / "patient_leaderboard.csv").is_file():
            print(f"error: {path} has no patient_leaderboard.csv (not a bag task run)")
            return 2
        rows.append({"run": label or path.name, **row(path)})
    table = pd.DataFrame(rows)
    cols = [c for c in table.columns if table[c].astype(str).str.len().max() > 0]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for _, r in table.iterrows():
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
