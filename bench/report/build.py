"""Assemble the report of one run (``DIR/report``) and the cross-dataset report."""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.calibration import reliability
from core.errors import BenchError
from core.metrics import REPORT_METRICS, metric_label
from bench.run.leaderboard import fmt, fmt_p, fmt_size, md_escape, stress_column, to_markdown
from bench.protocols.leakage import audit_metrics
from bench.report.patients import patient_section
from bench.report.conformal import conformal_section
from bench.report.labs import labs_section
from core.io import atomic_write_text
from bench.commands.outputs import OutputFolder
from bench.run.rundir import RunDir
from core.progress import info, warn
from bench.report import cards, plots, tables
from bench.report import gradcam_audit as ga
from bench.report.html import SORT_SCRIPT, Out, csp, env, slug
from bench.report.rundata import RunData
from bench.stats.inference import friedman, nemenyi_cd
from bench.protocols.stress import stress_shifts

# ----------------------------------------------------------------------------- helpers


def _sortval(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return repr(float(v)) if isinstance(v, (int, float, np.number)) else str(v)


# ----------------------------------------------------------------------------- one run


def _metric_cell(r, m: str) -> dict:
    return {
        "text": f"{fmt(r[m])} ± {fmt(r[f'{m}_std'])}",
        "ci": f"[{fmt(r[f'{m}_lo'])}, {fmt(r[f'{m}_hi'])}]" if np.isfinite(r[f"{m}_lo"]) else "",
        "sort": _sortval(r[m]),
    }


def _board_rows(board, comps, colors, stress_col=None):
    c = comps.set_index("candidate")
    rows = []
    for _, r in board.iterrows():
        cmp = c.loc[r["candidate"]]
        shift = float(r[stress_col]) if stress_col else math.nan
        rows.append(
            {
                "shift": fmt(shift),
                "shift_sort": _sortval(shift),
                "rank": int(r["rank"]),
                "name": r["candidate"],
                "kind": r["kind"],
                "members": r["members"],
                "color": colors[r["candidate"]],
                "metrics": [_metric_cell(r, m) for m in REPORT_METRICS],
                "fit": fmt(r["fit_seconds"], 1),
                "fit_sort": _sortval(r["fit_seconds"]),
                "ms": fmt(r["predict_ms_per_image"], 2),
                "ms_sort": _sortval(r["predict_ms_per_image"]),
                "size": fmt_size(r["model_size"]),
                "size_sort": _sortval(r["model_size"]),
                "verdict": cmp["verdict"],
                "role": r["role"],
                "best": bool(cmp["is_reference"]),
                "better": str(cmp["verdict"]).startswith("better"),
                "p_t": None if cmp["is_reference"] else cmp["p_ttest_holm"],
                "p_m": None if cmp["is_reference"] else cmp["p_mcnemar_holm"],
                "sig_t": bool(cmp["significant_ttest"]),
                "sig_m": bool(cmp["significant_mcnemar"]),
            }
        )
    return rows


def _best_of(board, kinds) -> str | None:
    rows = board[board["kind"].isin(kinds)]
    return rows["candidate"].iloc[0] if len(rows) else None


def _color_order(run) -> list[str]:
    cfg = run.config
    order = [n for n in list(cfg.candidates) + list(cfg.ensembles) if n in run.names]
    return order + [n for n in run.names if n not in order]


def _say(progress, msg):
    if progress:
        info(msg)


def report_folder(run_dir, out=None) -> OutputFolder:
    """Where the report of the run in ``run_dir`` goes: ``RUN/report`` (an earlier report
    there written before the output marker existed is moved to ``RUN/previous/``), or
    ``out`` outside the run (:class:`bench.commands.outputs.OutputFolder`: only the report's own
    files are ever replaced)."""
    rundir = RunDir(run_dir)
    own = rundir.report_dir
    return OutputFolder(
        out or own,
        "bench report",
        "--out",
        reads=(rundir.path,),
        allowed=(own,),
        legacy=None if out else rundir.aside,
    )


def write_report(run_dir, gradcam: bool | None = None, progress: bool = True, out=None) -> Path:
    """Write ``run_dir/report`` (index.html, leaderboard.md, csv/, img/), or the folder
    ``out``; return its index.html.

    Parameters
    ----------
    run_dir : a finished run directory.
    gradcam : run the Grad-CAM audit; default ``[report] gradcam``.
    progress : print what is being done.
    out : another folder for the report (outside the run).
    """
    t0 = time.perf_counter()
    folder = report_folder(run_dir, out).check()
    run = RunData(run_dir)
    s = run.config.report
    metric = run.metric
    final = folder.path
    with folder.staged() as tmp:
        ctx = _build(run, s, metric, Out(tmp), gradcam, progress)
        ctx["elapsed"] = time.perf_counter() - t0
        html = env().get_template("report.html.j2").render(**ctx)
        atomic_write_text(tmp / "index.html", html)
    _say(progress, f"report: {final / 'index.html'} ({time.perf_counter() - t0:.0f} s)")
    return final / "index.html"


def _build(run, s, metric, out: Out, gradcam, progress) -> dict:
    st = run.config.stats  # [stats]: the level of every interval and the ECE bins
    conf, alpha, bins = float(st.confidence), float(s.alpha), int(st.ece_bins)
    label = metric_label(metric)
    if metric not in REPORT_METRICS:
        raise BenchError(f"[run] metric '{metric}' is not one of {list(REPORT_METRICS)}")
    per_fold = tables.per_fold_metrics(run, bins)
    board = tables.leaderboard(run, per_fold, metric, conf)
    comps = tables.comparisons(run, per_fold, board, metric, alpha)
    colors = plots.palette(_color_order(run))
    figs = {}
    out.csv(per_fold, "metrics_per_fold")
    board_csv = out.csv(board, "leaderboard")
    comps_csv = out.csv(comps, "comparisons")
    figs["scores"] = out.fig(
        plots.scores_figure(per_fold, board, metric, label, colors),
        "scores",
        f"{label} per fold and candidate",
        f"{label} of every fold (dots), mean (diamond) and {conf:.0%} t-interval (bar).",
        "csv/metrics_per_fold.csv",
    )
    figs["cost"] = out.fig(
        plots.cost_figure(board, metric, label, colors),
        "cost",
        f"{label} against inference time",
        "Score against inference cost.",
        board_csv,
    )

    best_cand = _best_of(board, ["cnn", "baseline"]) or board["candidate"].iloc[0]
    best_ens = _best_of(board, ["ensemble"])
    pc_csv, per_class_tables, conf_figs, roc_figs = _per_class_section(
        run, out, best_cand, best_ens
    )
    cal, cal_csv, figs["reliability"] = _calibration_section(
        run, board, per_fold, out, colors, bins
    )
    # data card
    dc = cards.data_card(run)
    out.csv(
        pd.DataFrame({"class": list(dc["counts"]), "images": list(dc["counts"].values())}),
        "class_counts",
    )
    figs["counts"] = out.fig(
        plots.counts_figure(dc["counts"]),
        "class_counts",
        "images per class",
        "Images per class.",
        "csv/class_counts.csv",
    )
    fold_csv = out.csv(
        dc["per_fold"].reset_index().rename(columns={"label": "class"}), "class_per_fold"
    )
    warnings = cards.warnings_for(run, board, s)

    # external sets
    external_ctx = _external_section(run, board, out, colors)
    warnings += external_ctx["warnings"]
    leakage_ctx = _leakage_section(run, metric, out, colors)
    patients_ctx = patient_section(run, board, out, s.gradcam if gradcam is None else gradcam)
    conformal_ctx = conformal_section(run, out, colors)
    labs_ctx = labs_section(run, out, colors, alpha)

    # Grad-CAM
    audit_ctx = _gradcam_section(run, board, s, out, colors, gradcam, progress)
    if audit_ctx.get("flagged"):
        warnings.append(
            {
                "title": "Grad-CAM sanity check failed",
                "text": "The maps of " + ", ".join(audit_ctx["flagged"]) + " barely "
                "change when the model's weights are randomised: they do not "
                "show what the model learned.",
            }
        )
    stress_col = stress_column(board, metric)
    md = to_markdown(
        board,
        metric,
        f"Leaderboard: {md_escape(run.title)}",
        metrics=REPORT_METRICS,
        digits=3,
        comparisons=comps,
        note=f"Sorted by **{label}**. Cells: mean ± std over {len(run.fold_ids)} folds "
        f"[{conf:.0%} t-interval]. Compared with the saved predictor (★, role `predictor`): "
        f"`*` corrected resampled t-test (Nadeau-Bengio) and `†` McNemar on the out-of-fold "
        f"predictions, significant at {alpha} after Holm's adjustment (`▲`: better than the "
        "predictor); `n.s.` neither. Role `shortcut`: a colour-only candidate, never saved. "
        "Ensembles: costs are sums over members.",
    )
    atomic_write_text(
        out.root / "leaderboard.md",
        md + labs_ctx.get("markdown", "") + leakage_ctx.get("markdown", ""),
    )
    return {
        "title": run.title,
        "run": run,
        "metric": metric,
        "metric_label": label,
        "metrics": [(m, metric_label(m)) for m in REPORT_METRICS],
        "confidence": conf,
        "alpha": alpha,
        "bins": bins,
        "board": _board_rows(board, comps, colors, stress_col),
        "board_csv": board_csv,
        "stress": stress_col is not None,
        "stress_shifts": stress_shifts(run.config),
        "comparisons": comps.to_dict("records"),
        "comps_csv": comps_csv,
        "ratio": float(comps["test_train_ratio"].dropna().iloc[0])
        if "test_train_ratio" in comps and comps["test_train_ratio"].notna().any()
        else None,
        "best": comps.loc[comps["is_reference"].astype(bool), "candidate"].iloc[0],
        "best_is_predictor": run.predictor is not None,
        "best_cand": best_cand,
        "best_ens": best_ens,
        "figs": figs,
        "conf_figs": conf_figs,
        "roc_figs": roc_figs,
        "per_class": per_class_tables,
        "per_class_csv": pc_csv,
        "calibration": cal.to_dict("records"),
        "cal_csv": cal_csv,
        "temperature_scaling": run.config.predictor.temperature_scaling,
        "predictor_temperature": _predictor_temperature(run),
        "data_card": dc,
        "class_per_fold_csv": fold_csv,
        "run_card": cards.run_card(run),
        "warnings": warnings,
        "audit": audit_ctx,
        "external": external_ctx,
        "colors": colors,
        "leakage": leakage_ctx,
        "patients": patients_ctx,
        "conformal": conformal_ctx,
        "labs": labs_ctx,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "csvs": out.csvs,
        "csp": csp(),
        "script": SORT_SCRIPT,
    }


def _per_class_section(run, out: Out, best_cand: str, best_ens: str | None):
    """Per-class metrics of every entry; confusion matrix and ROC of the best candidate
    and the best ensemble."""
    pc_all = pd.concat([tables.per_class(run, n) for n in run.names], ignore_index=True)
    pc_csv = out.csv(pc_all, "per_class")
    per_class_tables, conf_figs, roc_figs = [], [], []
    for n in [n for n in (best_cand, best_ens) if n]:
        role = "best ensemble" if n == best_ens else "best candidate"
        per_class_tables.append(
            {"name": n, "role": role, "rows": pc_all[pc_all["candidate"] == n].to_dict("records")}
        )
        cm, norm = tables.confusion(run, n)
        c_csv = out.csv(tables.confusion_csv(run, n), f"confusion_{slug(n)}")
        conf_figs.append(
            out.fig(
                plots.confusion_figure(cm, norm, run.classes, f"Confusion matrix: {n} ({role})"),
                f"confusion_{slug(n)}",
                f"confusion matrix of {n}",
                f"{n} ({role}): out-of-fold predictions, counts and normalised by true class.",
                c_csv,
            )
        )
        roc = tables.roc_points(run, n)
        r_csv = out.csv(roc, f"roc_{slug(n)}")
        roc_figs.append(
            out.fig(
                plots.roc_figure(roc, run.classes, f"One-vs-rest ROC: {n}"),
                f"roc_{slug(n)}",
                f"ROC curves of {n}",
                f"{n} ({role}): one-vs-rest ROC per class (pooled out-of-fold probabilities).",
                r_csv,
            )
        )
    return pc_csv, per_class_tables, conf_figs, roc_figs


def _calibration_section(run, board, per_fold, out: Out, colors, bins: int):
    """Reliability curves and the calibration table: (table, its CSV, the figure)."""
    rel = {n: reliability(run.y, run.oof[n], bins) for n in board["candidate"]}
    rel_csv = out.csv(
        pd.concat([t.assign(candidate=n) for n, t in rel.items()], ignore_index=True), "reliability"
    )
    cal = tables.calibration_table(run, per_fold, bins)
    cal_csv = out.csv(cal, "calibration")
    eces = dict(zip(cal["candidate"], cal["ece_pooled"]))
    fig = out.fig(
        plots.reliability_figure(rel, eces, colors),
        "reliability",
        "reliability diagrams",
        f"Accuracy against confidence in {bins} bins; the gap to the diagonal is miscalibration.",
        rel_csv,
    )
    return cal, cal_csv, fig


def _predictor_temperature(run):
    f = run.rundir.predictor_manifest
    if not f.is_file():
        return None
    import json

    cal = json.loads(f.read_text()).get("calibration") or {}
    return cal.get("temperature")


EXTERNAL_FLOOR, EXTERNAL_DROP = 0.5, 0.2  # the warning: external balanced accuracy below
# 0.5, or more than 0.2 below the in-domain one


def _ci_text(lo, hi) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def _external_rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    for _, r in table.iterrows():

        def cell(v, lo=math.nan, hi=math.nan, signed=False):
            v = float(v)
            text = (
                (f"{v:+.3f}".replace("-", "\u2212") if signed else fmt(v)) if np.isfinite(v) else ""
            )
            return {"text": text, "ci": _ci_text(float(lo), float(hi)), "sort": _sortval(v)}

        rank = {
            k: (None if pd.isna(r[k]) else int(r[k]))
            for k in ("leaderboard_rank", "in_domain_rank", "external_rank")
        }
        rows.append(
            {
                "name": r["candidate"],
                "kind": r["kind"],
                **rank,
                "in_ba": cell(
                    r["in_domain_balanced_accuracy"],
                    r["in_domain_balanced_accuracy_lo"],
                    r["in_domain_balanced_accuracy_hi"],
                ),
                "in_acc": cell(r["in_domain_accuracy"]),
                "ext_ba": cell(
                    r["external_balanced_accuracy"],
                    r["external_balanced_accuracy_lo"],
                    r["external_balanced_accuracy_hi"],
                ),
                "ext_acc": cell(
                    r["external_accuracy"], r["external_accuracy_lo"], r["external_accuracy_hi"]
                ),
                "gap": cell(r["gap_balanced_accuracy"], signed=True),
                "shift": cell(r["under_shift"]),
                "big_gap": bool(
                    np.isfinite(r["gap_balanced_accuracy"])
                    and r["gap_balanced_accuracy"] < -EXTERNAL_DROP
                ),
                "moved": (
                    rank["in_domain_rank"] is not None
                    and rank["external_rank"] is not None
                    and rank["in_domain_rank"] != rank["external_rank"]
                ),
            }
        )
    return rows


def _external_header(run, name: str, per_class: pd.DataFrame, meta: dict) -> dict:
    entry = meta.get("entry") or {}
    boot = meta.get("bootstrap") or {}
    present = set(per_class["class"])
    by_group = boot.get("unit") == "group"
    return {
        "path": entry.get("path", ""),
        "labels": entry.get("labels") or "",
        "n": meta.get("n"),
        "n_unreadable": int(meta.get("n_unreadable") or 0),
        "groups": (entry.get("groups") or "") if by_group else "",
        "n_groups": boot.get("n_units") if by_group else None,
        "unmapped": sorted(
            ((str(c), int(k)) for c, k in (meta.get("unmapped") or {}).items()),
            key=lambda t: (-t[1], t[0]),
        ),
        "left_out": sorted((str(c), int(k)) for c, k in (meta.get("left_out") or {}).items()),
        "sampled": bool(meta.get("sampled")),
        "max_images": entry.get("max_images"),
        "present": [c for c in run.classes if c in present],
        "absent": [c for c in run.classes if c not in present],
        "chance": 1 / len(present) if present else math.nan,
        "resamples": boot.get("resamples"),
        "level": boot.get("level"),
        "unit": boot.get("unit", "image"),
    }


def _external_section(run, board: pd.DataFrame, out: Out, colors) -> dict:
    """Every external set scored at the end of the run: header, in-domain against external
    table (with CSV), whether the leaderboard's winner holds (Spearman), the figures and
    the warnings when the winner's result does not hold outside the training lab."""
    sets, warnings = [], []
    notes = [
        f"external set '{n}' could not be read: {why}"
        for n, why in sorted(run.external_errors.items())
    ]
    for name, (scores, per_class, meta) in sorted(run.external.items()):
        table = tables.external_table(board, scores, stress_column(board, run.metric))
        t_csv = out.csv(table, f"external_{slug(name)}")
        agree = tables.external_agreement(table)
        head = _external_header(run, name, per_class, meta)
        missing = [n for n in table["candidate"] if n not in set(scores["candidate"])]
        figs = [
            out.fig(
                plots.external_scatter_figure(
                    table, colors, f"In-domain against external ({name}) balanced accuracy"
                ),
                f"external_{slug(name)}_scatter",
                f"in-domain against external balanced accuracy on {name}",
                f"Balanced accuracy of every entry: cross-validated (x) against {name} "
                "(y); below the dashed diagonal an entry loses accuracy outside the "
                "training lab.",
                t_csv,
            )
        ]
        focus = []
        if agree["best_in_domain"]:
            focus.append(
                (
                    agree["best_in_domain"],
                    "leaderboard winner"
                    if agree["winner_holds"] is not True
                    else "leaderboard and external winner",
                )
            )
        if agree["best_external"] and agree["best_external"] != agree["best_in_domain"]:
            focus.append((agree["best_external"], "external winner"))
        if focus:
            recall = tables.external_recall(run, per_class, [n for n, _ in focus])
            role = dict(focus)
            r_csv = out.csv(
                recall.assign(role=recall["candidate"].map(role)), f"external_{slug(name)}_recall"
            )
            figs.append(
                out.fig(
                    plots.external_recall_figure(
                        recall,
                        focus,
                        run.classes,
                        f"Recall per class: in-domain (out-of-fold) and on {name}",
                    ),
                    f"external_{slug(name)}_recall",
                    f"recall per class in-domain and on {name}",
                    "Recall per class of "
                    + " and ".join(n for n, _ in focus)
                    + ": pooled out-of-fold predictions (in-domain) and on "
                    f"{name} (external); grey: class absent from {name}.",
                    r_csv,
                )
            )
        best = table.iloc[0] if len(table) else None
        if best is not None and np.isfinite(best["external_balanced_accuracy"]):
            e, i = (
                float(best["external_balanced_accuracy"]),
                float(best["in_domain_balanced_accuracy"]),
            )
            if e < EXTERNAL_FLOOR or (np.isfinite(i) and e < i - EXTERNAL_DROP):
                warnings.append(
                    {
                        "title": f"Results do not hold outside the training lab ({name})",
                        "text": f"Results do not hold outside the training lab: the leaderboard's "
                        f"best entry '{best['candidate']}' reaches a balanced accuracy of "
                        f"{e:.3f} on the external set '{name}' "
                        f"[{fmt(best['external_balanced_accuracy_lo'])}, "
                        f"{fmt(best['external_balanced_accuracy_hi'])}] against {fmt(i)} "
                        f"in-domain (gap {e - i:+.3f}; warning below {EXTERNAL_FLOOR} or "
                        f"more than {EXTERNAL_DROP} below in-domain). The cross-validated "
                        "scores measure this lab's images, not the task.",
                    }
                )
        sets.append(
            {
                "name": name,
                "id": f"external-{slug(name)}",
                "head": head,
                "has_shift": bool(table["under_shift"].notna().any()),
                "rows": _external_rows(table),
                "csv": t_csv,
                "agree": agree,
                "figs": figs,
                "missing": missing,
                "best_in_row": None if best is None else _external_rows(table.iloc[:1])[0],
                "best_ext_row": next(
                    (r for r in _external_rows(table) if r["name"] == agree["best_external"]), None
                ),
            }
        )
    return {"sets": sets, "notes": notes, "warnings": warnings, "shown": bool(sets or notes)}


def _removed_grouping(run) -> list[str]:
    """What the leakage audit's image-level folds leave out, in words (from the manifest)."""
    grouping = run.manifest.get("grouping") or {}
    removed = (run.manifest.get("leakage_audit") or {}).get("removed") or {}
    parts = []
    if removed.get("groups") or grouping.get("user_groups"):
        where = Path(str(removed["groups"])).name if removed.get("groups") else ""
        parts.append(
            f"[data] groups ({grouping.get('user_groups', '?')} groups"
            + (f" from {where}" if where else "")
            + ")"
        )
    if removed.get("pairs") or grouping.get("pairs"):
        where = Path(str(removed["pairs"])).name if removed.get("pairs") else ""
        parts.append(
            f"[data] pairs ({grouping.get('pairs', '?')} near-duplicate pairs"
            + (f" from {where}" if where else "")
            + ")"
        )
    rule = removed.get("group_rule") or grouping.get("group_rule")
    if rule:
        parts.append(f'[data] group_rule = "{rule}"')
    return parts


def _leakage_section(run, metric: str, out: Out, colors) -> dict:
    """The leakage audit (``leakage.csv``): every entry on grouped and on image-level folds,
    the inflation, which grouping was removed and how many groups the image-level folds
    split; absent when the run has no audit."""
    if run.leakage_error:
        return {
            "shown": True,
            "rows": [],
            "notes": [f"leakage.csv could not be read: {run.leakage_error}"],
        }
    if run.leakage is None:
        return {"shown": False}
    table = run.leakage[run.leakage["candidate"].isin(run.names)]
    metrics = [
        m
        for m in audit_metrics(metric)
        if all(f"{k}_{m}" in table for k in ("grouped", "image_level", "inflation"))
    ]
    if not metrics or table.empty:
        return {"shown": True, "rows": [], "notes": ["leakage.csv holds no entry of this run"]}
    key = metric if metric in metrics else metrics[0]
    table = table.sort_values(
        f"grouped_{key}", ascending=tables.lower_is_better(key), kind="stable"
    ).reset_index(drop=True)
    t_csv = out.csv(table, "leakage")
    rows = []
    for _, r in table.iterrows():
        cells = []
        for m in metrics:
            infl = float(r[f"inflation_{m}"])
            cells.append(
                {
                    "grouped": _metric_pair(r, f"grouped_{m}"),
                    "image": _metric_pair(r, f"image_level_{m}"),
                    "inflation": {
                        "text": f"{infl:+.3f}".replace("-", "\u2212") if np.isfinite(infl) else "",
                        "sort": _sortval(infl),
                    },
                }
            )
        rows.append({"name": r["candidate"], "kind": r["kind"], "cells": cells})
    plot_m = "accuracy" if "accuracy" in metrics else key
    plot_label = metric_label(plot_m)
    fig = out.fig(
        plots.leakage_figure(table, colors, plot_m, plot_label),
        "leakage",
        f"{plot_label} on grouped and image-level folds",
        f"{plot_label} of every entry on the grouped folds (circle) and on "
        "image-level folds (triangle); the line between them is the inflation.",
        t_csv,
    )
    audit = run.manifest.get("leakage_audit") or {}
    best = table.iloc[0]
    img_best = table.sort_values(
        f"image_level_{key}", ascending=tables.lower_is_better(key), kind="stable"
    )["candidate"].iloc[0]
    labels = [(m, metric_label(m)) for m in metrics]
    md = [
        "",
        "## Leakage audit",
        "",
        f"The same entries on image-level folds (without {'; '.join(_removed_grouping(run))}"
        "; exact duplicates stay together in both). Inflation = image-level − grouped.",
        "",
        "| candidate | kind | "
        + " | ".join(f"{lab} grouped | {lab} image-level | {lab} inflation" for _, lab in labels)
        + " |",
        "|---|---|" + "---|" * (3 * len(labels)),
    ]
    for r, row in zip(table.to_dict("records"), rows):
        md.append(
            f"| {md_escape(r['candidate'])} | {r['kind']} | "
            + " | ".join(
                f"{c['grouped']['text']} | {c['image']['text']} | {c['inflation']['text']}"
                for c in row["cells"]
            )
            + " |"
        )
    return {
        "shown": True,
        "rows": rows,
        "notes": [],
        "metrics": labels,
        "csv": t_csv,
        "fig": fig,
        "removed": _removed_grouping(run),
        "split": audit,
        "key_label": metric_label(key),
        "best": {
            "name": best["candidate"],
            "grouped": fmt(best[f"grouped_{key}"]),
            "image": fmt(best[f"image_level_{key}"]),
            "inflation": f"{best[f'inflation_{key}']:+.3f}",
        },
        "image_winner": img_best if img_best != best["candidate"] else None,
        "nested": os.path.join("..", audit.get("dir", "leakage"), "leaderboard.md"),
        "markdown": "\n".join(md) + "\n",
    }


def _metric_pair(r, col: str) -> dict:
    v, sd = float(r[col]), float(r.get(f"{col}_std", math.nan))
    return {"text": f"{fmt(v)} ± {fmt(sd)}" if np.isfinite(sd) else fmt(v), "sort": _sortval(v)}


def _gradcam_section(run, board, s, out: Out, colors, gradcam, progress) -> dict:
    enabled = s.gradcam if gradcam is None else gradcam
    if not enabled:
        return {
            "status": "off",
            "notes": [
                "the Grad-CAM audit is switched off ([report] gradcam = false or --no-gradcam)"
            ],
        }
    if not any(run.kind(n) == "cnn" for n in run.names):
        return {"status": "none", "notes": ["no CNN candidate in this run: nothing to audit"]}
    why = ga.check_available()
    if why:
        return {"status": "error", "notes": [why]}
    _say(
        progress, f"report: Grad-CAM audit ({s.gradcam_per_class} images per class, seed {s.seed})"
    )
    try:
        audit = ga.run_audit(run, board, s, progress=None)
    except Exception as exc:  # noqa: BLE001 - the rest of the report stays useful
        warn(f"Grad-CAM audit failed: {type(exc).__name__}: {exc}")
        return {"status": "error", "notes": [f"the audit failed: {type(exc).__name__}: {exc}"]}
    e_csv = out.csv(audit["energy"], "gradcam_energy")
    r_csv = out.csv(audit["randomization"], "gradcam_randomization")
    sum_csv = out.csv(audit["summary"], "gradcam_summary")
    galleries = []
    for n in audit["entries"]:
        rows = []
        for c, (ok, bad) in audit["gallery"][n].items():
            for kind, rr in (("correct", ok), ("misclassified", bad)):
                for r in rr:
                    rows.append(
                        {
                            "candidate": n,
                            "row": int(r),
                            "class": run.classes[c],
                            "predicted": run.classes[audit["pred"][n][r]],
                            "shown_as": kind,
                            "source": str(run.folds_table["source"].iloc[int(r)]),
                        }
                    )
        g_csv = out.csv(pd.DataFrame(rows), f"gallery_{slug(n)}")
        galleries.append(
            out.fig(
                ga.gallery_figure(run, audit, n),
                f"gradcam_{slug(n)}",
                f"Grad-CAM gallery of {n}",
                f"{n}: per class, correctly classified (left) and "
                "misclassified (right) out-of-fold examples.",
                g_csv,
            )
        )
    energy_fig = out.fig(
        ga.energy_figure(audit, colors),
        "gradcam_energy",
        "Grad-CAM energy inside the cell",
        "Share of each map's energy inside the segmented cell, per audited "
        "image; the black bar is the cell's share of the image area.",
        e_csv,
    )
    summ = audit["summary"]
    return {
        "status": "ok",
        "summary": summ.to_dict("records"),
        "summary_csv": sum_csv,
        "rand_csv": r_csv,
        "galleries": galleries,
        "energy_fig": energy_fig,
        "notes": audit["notes"],
        "threshold": float(s.randomization_threshold),
        "n_per_class": int(s.gradcam_per_class),
        "flagged": [r["candidate"] for r in summ.to_dict("records") if r["randomization_flagged"]],
    }


# ----------------------------------------------------------------------------- several runs


def cross_report_folder(run_dirs, out_dir) -> OutputFolder:
    """The cross-dataset report's folder, checked (:class:`bench.commands.outputs.OutputFolder`):
    outside the runs, or the first run's ``cross_dataset_report``."""
    return OutputFolder(
        out_dir,
        "bench report (cross-dataset)",
        "--out",
        reads=run_dirs,
        allowed=(RunDir(run_dirs[0]).cross_report_dir,),
    ).check()


def write_cross_report(run_dirs, out_dir, progress: bool = True) -> Path:
    """Friedman test and critical-difference diagram over several runs (data sets).

    Entries present in every run are compared on each run's ``[run] metric`` (the first
    run's metric is used for all); returns ``out_dir/index.html``.
    """
    runs = [RunData(d) for d in run_dirs]
    if len(runs) < 2:
        raise BenchError("a cross-dataset report needs at least two run directories")
    folder = cross_report_folder(run_dirs, out_dir)
    metric = runs[0].metric
    alpha = float(runs[0].config.report.alpha)
    label = metric_label(metric)
    common = [n for n in runs[0].names if all(n in r.names for r in runs[1:])]
    left_out = sorted({n for r in runs for n in r.names} - set(common))
    if len(common) < 2:
        raise BenchError(
            "a cross-dataset report needs at least two candidates or ensembles "
            f"present in every run; common to all: {common or 'none'}"
        )
    labels, seen = [], {}
    for r in runs:
        base = r.run_dir.name
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    scores = np.array(
        [
            [
                tables.per_fold_metrics(r, int(r.config.stats.ece_bins))
                .groupby("candidate")[metric]
                .mean()[n]
                for n in common
            ]
            for r in runs
        ]
    )
    lower = tables.lower_is_better(metric)
    fr = friedman(scores, higher_is_better=not lower)
    cd = nemenyi_cd(len(common), len(runs), alpha)
    avg = dict(zip(common, fr["avg_ranks"]))
    out_dir = Path(out_dir)
    with folder.staged() as tmp:
        out = Out(tmp)
        tab = pd.DataFrame(scores, columns=common)
        tab.insert(0, "dataset", labels)
        ranks = pd.DataFrame(fr["ranks"], columns=[f"rank_{n}" for n in common])
        s_csv = out.csv(pd.concat([tab, ranks], axis=1), "scores_and_ranks")
        colors = plots.palette(_color_order(runs[0]))  # as in the first run's report
        cd_fig = out.fig(
            plots.cd_figure(
                avg,
                cd,
                colors,
                f"Average rank by {label} over {len(runs)} data sets (Nemenyi CD at {alpha})",
            ),
            "cd_diagram",
            "critical difference diagram",
            "Lower rank is better; entries joined by a bar are not significantly "
            "different (Nemenyi).",
            s_csv,
        )
        pairs = []
        for i, a in enumerate(common):
            for b in common[i + 1 :]:
                d = abs(avg[a] - avg[b])
                pairs.append({"a": a, "b": b, "rank_difference": d, "significant": d > cd})
        p_csv = out.csv(pd.DataFrame(pairs), "nemenyi_pairs")
        ctx = {
            "title": "Cross-dataset comparison",
            "metric_label": label,
            "alpha": alpha,
            "datasets": [
                {
                    "label": lb,
                    "run_dir": str(r.run_dir),
                    "origin": r.title,
                    "n": len(r.y),
                    "classes": len(r.classes),
                    "report": os.path.relpath(r.rundir.report_index, out_dir),
                }
                for lb, r in zip(labels, runs)
            ],
            "common": common,
            "left_out": left_out,
            "rows": [
                {"dataset": lb, "scores": [fmt(v) for v in row], "ranks": [fmt(v, 1) for v in rk]}
                for lb, row, rk in zip(labels, scores, fr["ranks"])
            ],
            "avg_ranks": [fmt(avg[n], 2) for n in common],
            "friedman": fr,
            "cd": cd,
            "pairs": pairs,
            "pairs_csv": p_csv,
            "scores_csv": s_csv,
            "cd_fig": cd_fig,
            "few": len(runs) < 5,
            "colors": colors,
            "csp": csp(),
            "script": SORT_SCRIPT,
            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        html = env().get_template("cross.html.j2").render(**ctx)
        atomic_write_text(tmp / "index.html", html)
        lines = [
            f"# Cross-dataset comparison ({md_escape(label)})",
            "",
            f"Friedman chi2 = {fr['chi2']:.3f}, p = {fmt_p(fr['p'])}; Iman-Davenport "
            f"F = {fmt(fr['F'])}, p = {fmt_p(fr['p_F'])}; Nemenyi CD = {cd:.3f} "
            f"(alpha {alpha}, {len(common)} entries, {len(runs)} data sets).",
            "",
            "| dataset | " + " | ".join(md_escape(n) for n in common) + " |",
            "|---|" + "---|" * len(common),
        ]
        for lb, row in zip(labels, scores):
            lines.append(f"| {md_escape(lb)} | " + " | ".join(fmt(v) for v in row) + " |")
        lines.append("| average rank | " + " | ".join(fmt(avg[n], 2) for n in common) + " |")
        atomic_write_text(tmp / "leaderboard.md", "\n".join(lines) + "\n")
    _say(progress, f"cross-dataset report: {out_dir / 'index.html'}")
    return out_dir / "index.html"
