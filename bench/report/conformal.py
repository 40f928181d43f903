"""The report's section on knowing when not to answer (:mod:`core.conformal`): risk-coverage
curves and AURC of every entry (out-of-fold), the cross-conformal coverage and set size of
the leaderboard, and the saved predictor's model card."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.run.leaderboard import fmt
from core.conformal import accuracy_at_coverage, aurc, risk_coverage

SHOWN = 8  # curves drawn (the leaderboard's first entries)


def risk_coverage_figure(curves: dict[str, tuple], colors: dict) -> Figure:
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for name, (cov, risk) in curves.items():
        ax.plot(cov, risk, lw=1.4, color=colors.get(name), label=name)
    ax.set_xlabel("coverage (share of images answered, most confident first)")
    ax.set_ylabel("risk (error rate of the answered)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def conformal_section(run, out, colors) -> dict:
    """Context of ``conformal.html.j2``: ``shown`` False when the run has no entries."""
    board_file = run.rundir.leaderboard_file
    board = pd.read_csv(board_file) if board_file.is_file() else pd.DataFrame()
    cols = {"conformal_coverage", "conformal_set_size"} <= set(board.columns)
    rows, curves, table = [], {}, []
    for name in run.names:
        p = run.oof[name]
        conf, correct = p.max(axis=1), p.argmax(axis=1) == run.y
        a = aurc(conf, correct)
        r = (
            board[board["candidate"] == name].iloc[0]
            if cols and (board["candidate"] == name).any()
            else None
        )
        row = {
            "name": name,
            "aurc": a["aurc"],
            "excess_aurc": a["excess_aurc"],
            "accuracy_at_0.5": accuracy_at_coverage(conf, correct, 0.5),
            "accuracy_at_0.8": accuracy_at_coverage(conf, correct, 0.8),
            "coverage": float(r["conformal_coverage"]) if r is not None else np.nan,
            "set_size": float(r["conformal_set_size"]) if r is not None else np.nan,
        }
        table.append(row)
        if len(curves) < SHOWN:
            cov, risk = risk_coverage(conf, correct)
            curves[name] = (cov, risk)
    if not table:
        return {"shown": False}
    df = pd.DataFrame(table).sort_values("aurc", kind="stable")
    csv = out.csv(df, "risk_coverage")
    fig = out.fig(
        risk_coverage_figure(curves, colors),
        "risk_coverage",
        "risk-coverage curves",
        "Out-of-fold error rate of the answered images "
        "against the share answered, most confident (maximum probability) first.",
        csv,
    )
    for r in df.to_dict("records"):
        rows.append(
            {
                k: fmt(v, 4 if "aurc" in k else 3) if isinstance(v, float) else v
                for k, v in r.items()
            }
        )
    card = run.rundir.model_card
    s = run.config.predictor.conformal  # the validated dump: every key present
    return {
        "shown": True,
        "rows": rows,
        "fig": fig,
        "csv": csv,
        "confidence": s.confidence,
        "method": s.method,
        "card": card.read_text(encoding="utf-8") if card.is_file() else None,
    }
