"""The leaderboard: one flat row per candidate and ensemble (CSV + Markdown).

This module is the one definition of its columns and the one Markdown writer: the run's
``leaderboard.md`` and the report's (which adds intervals and comparisons) both come
from :func:`to_markdown`.

``role`` says what a row is to the user: ``predictor`` for the entry saved as the run's
predictor (the one the report's statistics compare against, starred), ``shortcut`` for a
colour-only candidate (``[report] colour_extractors``: it can score by reading the lab's stain
and camera, so it is never saved nor starred), empty for the rest (:func:`set_roles`).

Cost columns, for every row:

``fit_seconds``
    seconds to fit one fold's model (mean over folds). An ensemble's is the sum over its
    members (what it costs to train it) plus its own combination fit
    (``combine_seconds``, per fold).
``predict_ms_per_image``
    inference milliseconds per image; an ensemble's is the sum over its members.
``model_size``
    trainable parameters or stored values; an ensemble's is the sum over its members.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from core.metrics import METRICS, metric_label, metric_sort_ascending

COLUMNS = (
    ["candidate", "kind", "role"]
    + [c for m in METRICS for c in (m, f"{m}_std")]
    + ["fit_seconds", "predict_ms_per_image", "model_size", "n_folds"]
)
COSTS = ("fit_seconds", "predict_ms_per_image", "model_size")
PREDICTOR, SHORTCUT = "predictor", "shortcut"


def set_roles(board: pd.DataFrame, shortcuts, predictor: str | None = None) -> pd.DataFrame:
    """Fill ``board``'s ``role`` column (in place; returned): ``predictor`` for the saved
    entry, ``shortcut`` for the candidates in ``shortcuts``, else empty."""
    shortcuts = set(shortcuts)
    board["role"] = [
        PREDICTOR if n == predictor else SHORTCUT if n in shortcuts else ""
        for n in board["candidate"]
    ]
    return board


def role_of(board: pd.DataFrame, name: str) -> str:
    """The ``role`` of row ``name`` (empty for a board written before the column existed)."""
    if "role" not in board:
        return ""
    val = board.loc[board["candidate"] == name, "role"]
    return "" if val.empty or not isinstance(val.iloc[0], str) else val.iloc[0]


def ensemble_costs(members: list[dict], combine_seconds: float, n_folds: int) -> dict:
    """An ensemble's cost columns from its members' rows (see the module docstring)."""

    def total(key):
        vals = [math.nan if m.get(key) is None else float(m[key]) for m in members]
        return float(np.sum(vals)) if vals and not np.isnan(vals).any() else math.nan

    return {
        "fit_seconds": total("fit_seconds") + combine_seconds / max(1, n_folds),
        "predict_ms_per_image": total("predict_ms_per_image"),
        "model_size": total("model_size"),
        "combine_seconds": combine_seconds,
    }


def stress_column(board: pd.DataFrame, metric: str) -> str | None:
    """The board's column of ``metric`` under simulated shift (``[stress]``), or ``None``
    when the run has no stress test."""
    col = f"stress_{metric}"
    return col if col in board and board[col].notna().any() else None


def make_table(rows: list[dict], metric: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df:
            df[c] = "" if c == "role" else float("nan")
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + extra]
    return df.sort_values(
        metric, ascending=metric_sort_ascending(metric), kind="stable"
    ).reset_index(drop=True)


# ----------------------------------------------------------------------------- formatting


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}f}"
    return str(v)


def fmt_p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_size(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    v = float(v)
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def md_escape(text) -> str:
    """Text safe in a Markdown table cell (HTML-escaped, pipes and newlines neutralised)."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def significance_marker(cmp) -> str:
    """``★ predictor`` (the reference: the saved predictor), ``*`` (t-test), ``†``
    (McNemar), both (with ``▲`` when the row is better than the reference), or ``n.s.``."""
    if cmp["is_reference"]:
        return "★ predictor"
    marks = ("*" if cmp["significant_ttest"] else "") + ("†" if cmp["significant_mcnemar"] else "")
    if marks and str(cmp.get("verdict", "")).startswith("better"):
        marks = "▲" + marks
    return marks or "n.s."


def to_markdown(
    board: pd.DataFrame,
    metric: str,
    title: str = "Leaderboard",
    *,
    metrics=METRICS,
    digits: int = 4,
    comparisons: pd.DataFrame | None = None,
    note: str | None = None,
) -> str:
    """The leaderboard as a Markdown table, rows in ``board`` order.

    Cells are ``mean ± std``, followed by ``[lo, hi]`` when ``board`` has the interval
    columns ``<metric>_lo``/``_hi``. With ``comparisons`` (the report's tests against
    the saved predictor) the size, the marker and the Holm-adjusted p-values are added.
    """
    head = ["rank", "candidate", "kind", "role"] + [metric_label(m) for m in metrics]
    stress = stress_column(board, metric)
    if stress:
        head.append(f"{metric_label(metric)} under shift")
    head += ["fit s", "ms/img"]
    if comparisons is not None:
        head += ["size", "vs predictor", "p (t, Holm)", "p (McNemar, Holm)"]
        cmp = comparisons.set_index("candidate")
    lines = [
        f"# {title}",
        "",
        note or f"Sorted by **{metric_label(metric)}**; mean ± std over folds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i, (_, r) in enumerate(board.iterrows()):
        role = r.get("role", "")
        role = ("★ " if role == PREDICTOR else "") + (role if isinstance(role, str) else "")
        cells = [str(i + 1), md_escape(r["candidate"]), str(r["kind"]), role]
        for m in metrics:
            cell = f"{fmt(r[m], digits)} ± {fmt(r[f'{m}_std'], digits)}"
            if f"{m}_lo" in r and np.isfinite(r[f"{m}_lo"]):
                cell += f" [{fmt(r[f'{m}_lo'], digits)}, {fmt(r[f'{m}_hi'], digits)}]"
            cells.append(cell)
        if stress:
            cells.append(fmt(r[stress], digits))
        cells += [fmt(r["fit_seconds"], 1), fmt(r["predict_ms_per_image"], 2)]
        if comparisons is not None:
            c = cmp.loc[r["candidate"]]
            cells += [
                fmt_size(r["model_size"]),
                significance_marker(c),
                "" if c["is_reference"] else fmt_p(c["p_ttest_holm"]),
                "" if c["is_reference"] else fmt_p(c["p_mcnemar_holm"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
