"""Print the several-labs table of a finished run (``--profile multi``): per entry the
pooled in-lab balanced accuracy, each held-out lab's (95 % bootstrap CI over its patients
or slides), the worst and the mean lab, the AdaBN (transductive) worst lab, and the run's
wall time per stage, with the machine and commit it ran on.

    python -m bench run --profile multi --data wbc5_multi --out runs/multi
    python benchmarks/labs.py runs/multi
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.run.rundir import RunDir  # noqa: E402

M = "balanced_accuracy"


def table(run: Path) -> str:
    rd = RunDir(run)
    board = rd.read_leaderboard()
    labs = list(dict.fromkeys(rd.read_labs()["lab"]))
    board = board.sort_values(f"worst_lab_{M}", ascending=False, kind="stable")
    adabn = f"adabn_worst_lab_{M}" in board
    head = ["entry", "in-lab"] + [f"{lab} held out" for lab in labs] + ["worst lab", "mean"]
    head += ["worst lab, AdaBN"] if adabn else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, r in board.iterrows():
        cells = [str(r["candidate"]), f"{r[M]:.3f}"]
        cells += [
            f"{r[f'{lab}_{M}']:.3f} [{r[f'{lab}_{M}_lo']:.2f}, {r[f'{lab}_{M}_hi']:.2f}]"
            for lab in labs
        ]
        cells += [f"{r[f'worst_lab_{M}']:.3f} ({r['worst_lab']})", f"{r[f'mean_lab_{M}']:.3f}"]
        if adabn:
            v = r[f"adabn_worst_lab_{M}"]
            cells.append("" if pd.isna(v) else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run directory of several labs")
    args = ap.parse_args(argv)
    run = RunDir(args.run)
    m, sub = run.read_manifest(), RunDir(run.labs_dir).read_manifest()
    hw = m.get("hardware", {})
    print(
        f"run {args.run}: commit {m.get('git_commit')}, {hw.get('cpu', hw)}; "
        f"data {m['dataset']['origin']}, {m['dataset']['n_images']} images"
    )
    print(
        "stage seconds (pooled run):",
        {k: round(v) for k, v in (m.get("stage_seconds") or {}).items()},
    )
    print(
        "stage seconds (leave-one-lab-out run):",
        {k: round(v) for k, v in (sub.get("stage_seconds") or {}).items()},
    )
    print(table(args.run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
