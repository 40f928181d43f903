"""The report's patient-level section (bag tasks, :mod:`bench.protocols.patients`).

The patient leaderboard with bootstrap intervals and the paired tests, ROC curves of the
best rows, the best row's per-patient table and scores, and the cells behind each positive
call of the predictor's row, with their out-of-fold Grad-CAM maps when it has CNN members.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from bench.run.leaderboard import fmt
from bench.report.gradcam_audit import MapStore, audit_targets, ensemble_weights, overlay

TOP_ROC = 6  # rows drawn in the ROC figure
CELLS_PER_CALL = 4  # top cells shown per positive call
MAX_CALLS = 8  # positive calls shown


def _ci(r, m: str, digits: int = 3) -> dict:
    return {
        "text": fmt(r[m], digits),
        "ci": f"[{fmt(r[f'{m}_lo'], digits)}, {fmt(r[f'{m}_hi'], digits)}]",
        "sort": float(r[m]) if np.isfinite(r[m]) else "",
    }


def _rows(board: pd.DataFrame) -> list[dict]:
    out = []
    for _, r in board.iterrows():
        p = r["p_vs_best_holm"]
        out.append(
            {
                "rank": int(r["rank"]) if np.isfinite(r["rank"]) else "",
                "entry": r["entry"],
                "source": r["source"],
                "aggregator": r["aggregator"],
                "kind": r["kind"],
                "disease": r.get("cells", "all") == "disease",
                "typed": r.get("cells", "all") == "typed",
                "shortcut": bool(r.get("shortcut", False)),
                "nested": r["kind"] == "nested",
                "auc": _ci(r, "roc_auc"),
                "ba": _ci(r, "balanced_accuracy"),
                "sens": _ci(r, "sensitivity"),
                "spec": _ci(r, "specificity"),
                "ll": _ci(r, "log_loss"),
                "p": "" if not np.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001"),
                "significant": bool(np.isfinite(p) and p < 0.05),
            }
        )
    return out


def roc_figure(scores: pd.DataFrame, rows: list[str], title: str) -> Figure:
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    y = scores["y"].to_numpy()
    for i, row in enumerate(rows):
        fpr, tpr, _ = roc_curve(y, scores[f"score:{row}"].to_numpy())
        ax.plot(fpr, tpr, color=cmap(i % 10), lw=1.8 if i == 0 else 1.2, label=row)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    return fig


def scores_figure(scores: pd.DataFrame, row: str, positive: str, negative: str) -> Figure:
    """Each patient's out-of-fold score by true diagnosis, with the fold thresholds."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for j, (lab, col) in enumerate(((negative, "#4c72b0"), (positive, "#c44e52"))):
        sel = scores["label"] == lab
        s = scores.loc[sel, f"score:{row}"].to_numpy()
        ax.scatter(
            s,
            j + rng.uniform(-0.15, 0.15, len(s)),
            s=18,
            color=col,
            alpha=0.8,
            label=f"{lab} ({len(s)})",
        )
    t = scores[f"threshold:{row}"]
    ax.axvspan(float(t.min()), float(t.max()), color="0.85", zorder=0, label="fold thresholds")
    ax.set_yticks([0, 1], [negative, positive])
    ax.set_xlabel(f"patient score ({row}, out-of-fold)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def referral_figure(curve: list[dict], rate: float) -> Figure:
    """The nested risk-referral curve: accuracy of the called patients against the share
    referred, the configured ``refer_rate`` marked."""
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    x = [100 * c["referred"] for c in curve]
    for key, label, style in (
        ("accuracy_called", "accuracy of the called", "-o"),
        ("sensitivity_called", "sensitivity of the called", "--s"),
        ("specificity_called", "specificity of the called", ":^"),
    ):
        ax.plot(x, [c[key] for c in curve], style, ms=4, label=label)
    at = next((c for c in curve if c["max_rate"] == rate), None)
    if at is not None:
        ax.axvline(100 * at["referred"], color="0.6", lw=0.8)
        ax.annotate(
            f"refer_rate {rate:.0%}: {at['referred']:.0%} referred",
            (100 * at["referred"], 0.3),
            fontsize=7,
            xytext=(4, 0),
            textcoords="offset points",
        )
    ax.set_xlabel("patients referred (%), nested")
    ax.set_ylabel("share of the called patients")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def cells_figure(
    run, picks: list[tuple[str, float, list[int]]], maps: dict, probs: dict, positive: str
):
    """Rows: patients called positive; columns: their most positive cells, titled with
    their probability ``probs[row]``, Grad-CAM ``maps[row]`` overlaid when there is one."""
    images = run.images()
    n_cols = max(len(r) for _, _, r in picks)
    fig = Figure(figsize=(1.7 * n_cols + 0.6, 1.8 * len(picks)))
    axes = np.atleast_2d(fig.subplots(len(picks), n_cols, squeeze=False))
    for i, (bag, score, rows) in enumerate(picks):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(rows):
                ax.axis("off")
                continue
            img = np.asarray(images[rows[j]])
            cam = maps.get(rows[j])
            ax.imshow(overlay(img, cam) if cam is not None else img)
            ax.set_title(f"p={probs[rows[j]]:.2f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{bag}\n{positive} {score:.2f}", fontsize=7)
    fig.suptitle(
        f"Most {positive}-like cells of each patient called {positive}"
        + (" (Grad-CAM, out-of-fold)" if maps else ""),
        fontsize=9,
    )
    return fig


def _cell_maps(run, board, entry: str, rows: list[int], pos: int, progress=None) -> dict:
    """Out-of-fold Grad-CAM maps (for the positive class) of ``entry`` on ``rows``: each
    cell explained by the fold model that never saw its patient; ensembles combine their
    CNN members' maps with their fold weights. Empty when ``entry`` has no CNN."""
    cnns, _ = audit_targets(run, board)
    members = (
        [entry]
        if entry in cnns
        else ([m for m in run.members(entry) if m in cnns] if run.kind(entry) == "ensemble" else [])
    )
    if not members or not rows:
        return {}
    store = MapStore(run, int(run.config.report.seed))
    for m in members:
        store.want(m, "trained", rows, [pos] * len(rows))
    store.compute(run.images(), progress)
    weights = ensemble_weights(run, entry, cnns) if run.kind(entry) == "ensemble" else None
    out = {}
    for r in rows:
        if weights is None:
            out[r] = store.get(entry, "trained", r, pos)
            continue
        w = weights[int(run.folds[r])]
        m = sum(wi * store.get(mem, "trained", r, pos) for mem, wi in w.items())
        peak = float(np.max(m))
        out[r] = (m / peak if peak > 0 else m).astype(np.float32)
    return out


def patient_section(run, board_cells: pd.DataFrame, out, gradcam: bool, progress=None) -> dict:
    """Context of the report's patient section; ``{"shown": False}`` without a bag task."""
    got = run.rundir.read_patients()
    if got is None:
        return {"shown": False}
    board, scores, cells, meta = got
    positive, negative = meta["positive"], meta.get("negative", "other")
    rows_only = board[board["kind"] != "nested"]
    best = str(rows_only["entry"].iloc[0])
    b_csv = out.csv(board, "patient_leaderboard")
    figs = []
    top = list(rows_only["entry"].head(TOP_ROC))
    r_csv = out.csv(scores, "patient_scores")
    figs.append(
        out.fig(
            roc_figure(scores, top, f"Patient-level ROC ({positive} vs {negative}), out-of-fold"),
            "patients_roc",
            "patient-level ROC curves",
            f"ROC curves of the {len(top)} best rows over the {len(scores)} "
            "patients' out-of-fold scores.",
            r_csv,
        )
    )
    figs.append(
        out.fig(
            scores_figure(scores, best, positive, negative),
            "patients_scores",
            "patient scores by diagnosis",
            f"Each patient's out-of-fold score from {best}; grey: the range of "
            "the fold thresholds (each chosen on the other folds' patients).",
            r_csv,
        )
    )
    nested = meta.get("nested")
    curve = (nested or {}).get("referral_curve")
    if curve:
        rate = float(nested["refer_rate"])
        figs.append(
            out.fig(
                referral_figure(curve, rate),
                "patients_referral",
                "risk-referral curve",
                "Nested: per outer fold, the row, threshold and a referral band holding at "
                "most a given share of the other folds' patients are chosen without the "
                "fold's patients; the fold's patients inside the band are referred. Each "
                "point: the share referred and how often the called patients are right.",
                out.csv(pd.DataFrame(curve), "patient_referral"),
            )
        )
    per_patient = []
    s, t = scores[f"score:{best}"], scores[f"threshold:{best}"]
    for i, r in scores.sort_values(f"score:{best}", ascending=False).iterrows():
        call = positive if s[i] >= t[i] else negative
        per_patient.append(
            {
                "bag": r["bag"],
                "label": r["label"],
                "n_cells": int(r["n_cells"]),
                "fold": int(r["fold"]),
                "score": fmt(s[i], 3),
                "threshold": fmt(t[i], 3),
                "call": call,
                "correct": call == r["label"],
            }
        )
    pp_csv = out.csv(pd.DataFrame(per_patient), "patient_calls")

    carried = meta.get("carried")
    cells_fig, cells_note = None, ""
    if carried and len(cells):
        row = carried["row"]
        called = scores[scores[f"score:{row}"] >= scores[f"threshold:{row}"]]
        called = called.sort_values(f"score:{row}", ascending=False).head(MAX_CALLS)
        picks = []
        for _, r in called.iterrows():
            mine = cells[cells["bag"] == r["bag"]].nlargest(CELLS_PER_CALL, "cell_probability")
            picks.append((r["bag"], float(r[f"score:{row}"]), [int(x) for x in mine["row"]]))
        if picks:
            rows = [x for _, _, rs in picks for x in rs]
            pos = list(meta["classes"]).index(positive)
            maps = {}
            if gradcam:
                try:
                    maps = _cell_maps(run, board_cells, carried["entry"], rows, pos, progress)
                except Exception as exc:  # noqa: BLE001 - the section stays without maps
                    cells_note = f"Grad-CAM maps could not be computed: {exc}"
            prob = cells.set_index("row")["cell_probability"]
            probs = {x: float(prob[x]) for x in rows}
            cells_fig = out.fig(
                cells_figure(run, picks, maps, probs, positive),
                "patients_cells",
                f"top cells of each {positive} call",
                f"{carried['entry']} (the predictor's entry, aggregator "
                f"{carried['aggregator']}): the {CELLS_PER_CALL} cells with the "
                f"highest out-of-fold {positive} probability of each patient it "
                f"calls {positive} (at most {MAX_CALLS} patients).",
            )
    best_row = rows_only.iloc[0]
    stage = meta.get("cell_type_stage")
    return {
        "cell_types": stage
        and {
            "n_types": len(stage["types"]),
            "features": stage["features"],
            "accuracy": fmt(stage["out_of_fold_accuracy"], 3),
            "mean_typed": fmt(stage["mean_typed_cells"], 1)
            if stage.get("mean_typed_cells") is not None
            else "",
            "all_cells": stage.get("bags_scored_on_all_cells"),
        },
        "referral": nested
        and nested.get("referral")
        and {
            "rate": f"{nested['refer_rate']:.0%}",
            "referred": f"{nested['referral']['referred']:.0%}",
            "accuracy": fmt(nested["referral"]["accuracy_called"], 3),
            "sens": fmt(nested["referral"]["sensitivity_called"], 3),
        },
        "nested": nested
        and {
            "auc": _ci(board[board["kind"] == "nested"].iloc[0], "roc_auc"),
            "sens": fmt(nested["nested_sensitivity"], 3),
            "spec": fmt(nested["nested_specificity"], 3),
            "n_candidates": nested["n_candidates"],
            "choices": nested["choices"],
        },
        "shortcut_warning": meta.get("shortcut_warning", ""),
        "disease_cells": meta.get("disease_cells") or [],
        "bag_colour": (meta.get("settings") or {}).get("bag_colour", "none"),
        "shown": True,
        "rows": _rows(board),
        "csv": b_csv,
        "figs": figs,
        "per_patient": per_patient,
        "per_patient_csv": pp_csv,
        "best": best,
        "best_auc": _ci(best_row, "roc_auc"),
        "positive": positive,
        "negative": negative,
        "n_bags": int(meta["n_bags"]),
        "n_positive": int(meta["n_positive"]),
        "threshold_rule": meta["threshold_rule"],
        "n_boot": meta["bootstrap"]["n_boot"],
        "carried": carried,
        "cells_fig": cells_fig,
        "cells_note": cells_note,
        "wide": bool(best_row["roc_auc_hi"] - best_row["roc_auc_lo"] > 0.15),
    }
