"""The report's section on several labs (:mod:`bench.protocols.labs`): every entry on each held-out
lab, a lab x entry heatmap, which entry wins in-lab and which wins on the worst lab, and a
Friedman test with the labs as blocks (Nemenyi critical-difference diagram)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.run.leaderboard import fmt, md_escape
from bench.report import plots
from bench.protocols.labs import curve_sizes
from bench.stats.inference import friedman, nemenyi_cd

METRIC = "balanced_accuracy"  # what the section compares (over the classes each lab has)


def heatmap_figure(values: np.ndarray, rows: list[str], cols: list[str], title: str) -> Figure:
    """Entries (rows) x columns (in-lab, each held-out lab, worst), annotated."""
    fig = Figure(figsize=(1.2 * len(cols) + 2.6, 0.42 * len(rows) + 1.4))
    ax = fig.subplots()
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), labels=[plots.plain(r) for r in rows])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def curve_figure(table: pd.DataFrame, entries: list[str], labs: list[str], colors) -> Figure:
    """One panel per held-out lab: balanced accuracy against the lab's own labelled cells
    (N = 0: zero-shot), each entry a line, the range over draws as error bars."""
    sizes = curve_sizes(table.columns)
    fig = Figure(figsize=(3.2 * len(labs) + 1.5, 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(labs), sharey=True, squeeze=False)[0])
    for ax, lab in zip(axes, labs):
        sub = table[table["lab"] == lab].set_index("entry")
        for e in entries:
            if e not in sub.index:
                continue
            r = sub.loc[e]
            v = np.array([r[f"n{n}_balanced_accuracy"] for n in sizes], dtype=float)
            lo = np.array([r[f"n{n}_balanced_accuracy_lo"] for n in sizes], dtype=float)
            hi = np.array([r[f"n{n}_balanced_accuracy_hi"] for n in sizes], dtype=float)
            ax.errorbar(
                sizes,
                v,
                yerr=[v - lo, hi - v],
                marker="o",
                ms=3,
                lw=1.2,
                capsize=2,
                color=colors.get(e),
                label=plots.plain(e),
            )
        ax.set_title(f"{lab} held out", fontsize=9)
        ax.set_xlabel("labelled cells of the lab (N)")
        ax.set_xticks(sizes)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("balanced accuracy, other half of the lab")
    axes[-1].legend(fontsize=7, loc="lower right")
    return fig


def labs_section(run, out, colors, alpha: float = 0.05) -> dict:
    """Context of ``labs.html.j2``; ``shown`` False for a run without ``labs.csv``."""
    table = run.rundir.read_labs()
    board_file = run.rundir.leaderboard_file
    if table is None or not board_file.is_file():
        return {"shown": False}
    board = pd.read_csv(board_file)
    board["candidate"] = board["candidate"].astype(str)
    labs = list(dict.fromkeys(table["lab"]))
    worst = f"worst_lab_{METRIC}"
    if worst not in board:
        return {"shown": False}
    roles = dict(zip(board["candidate"], board.get("role", pd.Series([""] * len(board)))))
    predictor = next((n for n, r in roles.items() if r == "predictor"), None)
    board = board[board["candidate"].isin(set(table["entry"]))]
    board = board.sort_values(worst, ascending=False, kind="stable").reset_index(drop=True)
    names = list(board["candidate"])
    cols = ["in-lab (pooled folds)"] + [f"{lab} held out" for lab in labs] + ["worst lab"]
    values = np.column_stack(
        [board[METRIC]] + [board[f"{lab}_{METRIC}"] for lab in labs] + [board[worst]]
    ).astype(float)
    csv = out.csv(table, "labs")
    fig = out.fig(
        heatmap_figure(values, names, cols, "balanced accuracy: in-lab and on each held-out lab"),
        "labs_heatmap",
        "lab x entry heatmap",
        "Balanced accuracy over the classes each lab has: pooled in-lab folds, then "
        "each lab held out (trained, tuned and weighted on the other labs only), "
        "then the worst of them.",
        csv,
    )
    rows = []
    for _, r in board.iterrows():
        cells = [
            {
                "text": fmt(r[f"{lab}_{METRIC}"]),
                "ci": f"[{fmt(r[f'{lab}_{METRIC}_lo'])}, {fmt(r[f'{lab}_{METRIC}_hi'])}]",
            }
            for lab in labs
        ]
        rows.append(
            {
                "name": r["candidate"],
                "kind": r["kind"],
                "in_lab": fmt(r[METRIC]),
                "labs": cells,
                "worst": fmt(r[worst]),
                "mean": fmt(r[f"mean_lab_{METRIC}"]),
                "gap": fmt(r[f"lab_gap_{METRIC}"]),
                "worst_lab": r.get("worst_lab", ""),
                "adabn": fmt(r.get(f"adabn_worst_lab_{METRIC}", np.nan)),
            }
        )
    in_lab_best = board.sort_values(METRIC, ascending=False, kind="stable").iloc[0]
    worst_best = board.iloc[0]
    ctx = {
        "shown": True,
        "labs": labs,
        "rows": rows,
        "adabn": f"adabn_worst_lab_{METRIC}" in board,
        "fig": fig,
        "curve_fig": None,
        "csv": csv,
        "in_lab_winner": {
            "name": in_lab_best["candidate"],
            "in_lab": fmt(in_lab_best[METRIC]),
            "worst": fmt(in_lab_best[worst]),
        },
        "worst_winner": {
            "name": worst_best["candidate"],
            "in_lab": fmt(worst_best[METRIC]),
            "worst": fmt(worst_best[worst]),
            "lab": worst_best.get("worst_lab", ""),
        },
        "same_winner": in_lab_best["candidate"] == worst_best["candidate"],
        "n": {lab: int(table[table["lab"] == lab]["n"].iloc[0]) for lab in labs},
        "groups": {lab: int(table[table["lab"] == lab]["n_groups"].iloc[0]) for lab in labs},
    }
    if curve_sizes(table.columns):
        shown = names[:4] + [n for n in names[4:] if n == predictor]
        ctx["curve_fig"] = out.fig(
            curve_figure(table, shown, labs, colors),
            "labs_curve",
            "adaptation curve per held-out lab",
            "What a lab's own labelled cells buy: per held-out lab, N of its cells (seeded "
            "draws from the half adapted on) fit a lab head on the entry's output and the "
            "cells' features as `bench adapt --n N` does, scored on the lab's other half "
            "(N = 0: zero-shot on that half). "
            "Points: the mean over the draws; bars: their range. The four best entries by "
            "the worst lab, and the saved predictor.",
            csv,
        )
    scores = values[:, 1 : 1 + len(labs)].T  # labs (blocks) x entries
    if len(labs) >= 2 and len(names) >= 2 and np.isfinite(scores).all():
        fr = friedman(scores, higher_is_better=True)
        cd = nemenyi_cd(len(names), len(labs), alpha)
        avg = dict(zip(names, fr["avg_ranks"]))
        ctx["friedman"] = {
            "chi2": fmt(fr["chi2"], 2),
            "p": fmt(fr["p"]),
            "cd": fmt(cd, 2),
            "n_labs": len(labs),
        }
        ctx["cd_fig"] = out.fig(
            plots.cd_figure(avg, cd, colors, "average rank over the held-out labs (1 = best)"),
            "labs_cd",
            "critical-difference diagram over labs",
            f"Average rank of each entry's balanced accuracy over the "
            f"{len(labs)} held-out labs; entries joined by a bar are not "
            f"told apart by the Nemenyi test at {alpha}.",
            csv,
        )
    md = [
        "",
        "## Leave-one-lab-out",
        "",
        "Balanced accuracy over the classes each lab has; each lab held out in turn (every "
        "fit, tuning and ensemble weight on the other labs). [95 % bootstrap CI over the "
        "lab's patients or slides]",
        "",
        "| entry | in-lab | "
        + " | ".join(f"{md_escape(lab)} held out" for lab in labs)
        + " | worst lab | mean | gap |"
        + (" worst lab, AdaBN |" if ctx["adabn"] else ""),
        "|---|---|" + "---|" * (len(labs) + 3 + ctx["adabn"]),
    ]
    for r in rows:
        md.append(
            f"| {md_escape(r['name'])} | {r['in_lab']} | "
            + " | ".join(f"{c['text']} {c['ci']}" for c in r["labs"])
            + f" | {r['worst']} ({md_escape(str(r['worst_lab']))}) | {r['mean']} | {r['gap']} |"
            + (f" {r['adabn']} |" if ctx["adabn"] else "")
        )
    ctx["markdown"] = "\n".join(md) + "\n"
    return ctx
