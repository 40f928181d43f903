"""The page of ``bench evaluate`` (``index.html`` with its figures and CSVs) and its
``predictions.csv``, on the report's HTML basis (:mod:`bench.report.html`)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.run.leaderboard import fmt
from bench.report import plots
from bench.report.gradcam_audit import overlay
from bench.report.html import SORT_SCRIPT, Out, csp, env
from bench.stats.scoring import METRIC_KEYS
from core.calibration import reliability
from core.images import read_image
from core.io import atomic_write_text
from core.metrics import metric_label
from core.progress import warn
from ensembles.overlay import upsample

GALLERY_PER_CLASS = 3


# ----------------------------------------------------------------------------- figures


def _confusion_figure(cm: np.ndarray, true: list[str], predicted: list[str]):
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    return plots.confusion_figure(
        cm,
        norm,
        true,
        "Confusion matrix on the external set",
        predicted=predicted,
        xlabel="predicted class (all predictor classes)",
    )


def _recall_figure(rows: list[dict], has_in_domain: bool):
    from matplotlib.figure import Figure

    names = [r["class"] for r in rows]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(5.5, 0.8 * len(names) + 2.5), 3.8))
    ax = fig.subplots()
    wd = 0.38 if has_in_domain else 0.6
    if has_in_domain:
        ax.bar(
            x - wd / 2,
            [r.get("recall_in_domain", math.nan) for r in rows],
            wd,
            color="#8fa8c8",
            label="in-domain (out-of-fold)",
        )
    ax.bar(
        x + (wd / 2 if has_in_domain else 0),
        [r["recall"] for r in rows],
        wd,
        color="#c0392b",
        label="external",
    )
    ax.set_xticks(x, labels=names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title("Recall per class: in-domain beside external")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _confidence_figure(conf_ext, correct_ext, conf_in):
    from matplotlib.figure import Figure

    bins = np.linspace(0, 1, 21)
    fig = Figure(figsize=(10, 3.6))
    a, b = fig.subplots(1, 2)
    if conf_in is not None:
        a.hist(
            conf_in,
            bins=bins,
            density=True,
            histtype="stepfilled",
            alpha=0.45,
            color="#4c72b0",
            label=f"in-domain (n={len(conf_in)})",
        )
    a.hist(
        conf_ext,
        bins=bins,
        density=True,
        histtype="step",
        lw=2,
        color="#c0392b",
        label=f"external (n={len(conf_ext)})",
    )
    a.set_title("Confidence (top-class probability)")
    a.set_xlabel("confidence")
    a.set_ylabel("density")
    a.legend(fontsize=8, loc="upper left")
    b.hist(
        [conf_ext[correct_ext], conf_ext[~correct_ext]],
        bins=bins,
        stacked=True,
        color=["#1a7f37", "#c0392b"],
        label=["external, correct", "external, wrong"],
    )
    b.set_title("External set: correct and wrong predictions")
    b.set_xlabel("confidence")
    b.set_ylabel("images")
    b.legend(fontsize=8, loc="upper left")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _gallery_figure(cells: list[dict], classes_shown: list[str], n: int):
    from matplotlib.figure import Figure

    rows = len(classes_shown)
    fig = Figure(figsize=(1.9 * n + 1.4, 2.05 * rows + 0.6))
    axes = np.atleast_2d(fig.subplots(rows, n, squeeze=False))
    for i, cls in enumerate(classes_shown):
        mine = [c for c in cells if c["true"] == cls]
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(cls, fontsize=8, rotation=0, ha="right", va="center")
            if j >= len(mine):
                ax.set_facecolor("#f2f2f2")
                for s in ax.spines.values():
                    s.set_visible(False)
                continue
            c = mine[j]
            img = c["image"]
            cam = c["cam"]
            peak = float(np.max(cam)) if np.size(cam) else 0.0
            up = upsample(cam / peak if peak > 0 else cam, *img.shape[:2])
            ax.imshow(overlay(img, up))
            ax.set_title(f"→ {c['predicted']} ({c['confidence']:.2f})", fontsize=7, color="#c0392b")
    fig.suptitle(
        "Grad-CAM of external errors (map for the predicted class; row: true class)", fontsize=10
    )
    return fig


# ----------------------------------------------------------------------------- the page


def predictions_csv(ext_shown, ext_labels, groups, classes, y, proba, pred, pred_r) -> str:
    """``predictions.csv``: one row per scored image (path, true, external class, group,
    predictions full and restricted, confidence, every class's probability)."""
    fixed = [
        "path",
        "true_class",
        "external_class",
        "group",
        "prediction",
        "prediction_restricted",
        "confidence",
    ]
    if groups is None:
        fixed.remove("group")
    cols = [c if c not in fixed else f"proba_{c}" for c in classes]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(fixed + cols)
    for i in range(len(y)):
        row = [ext_shown[i], classes[y[i]], ext_labels[i]]
        if groups is not None:
            row.append(groups[i])
        row += [classes[pred[i]], classes[pred_r[i]], f"{proba[i, pred[i]]:.6f}"]
        w.writerow(row + [f"{v:.6f}" for v in proba[i]])
    return buf.getvalue()


def gradcam_gallery(pred, items, y, pred_full, proba, present, gradcam: bool, seed: int):
    """Up to :data:`GALLERY_PER_CLASS` seeded errors per class, explained for the class
    predicted; returns (cells, status dict)."""
    if not gradcam:
        return [], {"status": "off", "note": "Grad-CAM gallery skipped (--no-gradcam)"}
    if not pred.cnn_members_:
        return [], {
            "status": "none",
            "note": "no Grad-CAM gallery: the predictor has no CNN member",
        }
    rng = np.random.default_rng(seed + 1)
    rows = []
    for c in present:
        bad = np.flatnonzero((y == c) & (pred_full != c))
        if len(bad):
            rows += sorted(rng.choice(bad, min(GALLERY_PER_CLASS, len(bad)), replace=False))
    if not rows:
        return [], {"status": "none", "note": "no errors to show"}
    try:
        sel = [items[r] for r in rows]
        cams = pred.explain(sel, class_index=pred_full[rows])
        cells = [
            {
                "row": int(r),
                "image": read_image(items[r]),
                "cam": cam,
                "true": str(pred.classes_[y[r]]),
                "predicted": str(pred.classes_[pred_full[r]]),
                "confidence": float(proba[r, pred_full[r]]),
            }
            for r, cam in zip(rows, cams)
        ]
    except Exception as exc:  # noqa: BLE001 - the numbers stay useful without the gallery
        warn(f"Grad-CAM gallery failed: {type(exc).__name__}: {exc}")
        return [], {
            "status": "error",
            "note": f"the Grad-CAM gallery failed: {type(exc).__name__}: {exc}",
        }
    return cells, {
        "status": "ok",
        "n": len(cells),
        "note": f"{len(cells)} errors, up to {GALLERY_PER_CLASS} per class (seeded)",
    }


def write_page(
    tmp: Path, result: dict, ext, keep, y, proba, sc, dom, cells, gallery_status
) -> None:
    """The page of an evaluation in ``tmp``: ``index.html``, its figures (``img/``) and
    tables (``csv/``); ``ext``: the :class:`bench.data.external_data.ExternalSet` scored."""
    classes = result["predictor"]["classes"]
    out = Out(tmp)
    pc = pd.DataFrame(result["per_class"])
    pc_csv = out.csv(pc, "per_class")
    conf = result["confusion"]
    cm_df = pd.DataFrame(conf["counts"], columns=conf["predicted"])
    cm_df.insert(0, "true", conf["true"])
    cm_csv = out.csv(cm_df, "confusion")
    figs = {
        "confusion": out.fig(
            _confusion_figure(np.array(conf["counts"]), conf["true"], conf["predicted"]),
            "confusion",
            "confusion matrix",
            "Rows: the true classes present in the set; columns: every "
            "class of the predictor (full argmax).",
            cm_csv,
        )
    }
    pe_csv = None
    if result["per_external_class"]:
        pe_csv = out.csv(
            pd.DataFrame(
                [
                    {
                        **{k: v for k, v in r.items() if k != "wrong"},
                        "wrong": "; ".join(f"{c} {n}" for c, n in r["wrong"]),
                    }
                    for r in result["per_external_class"]
                ]
            ),
            "per_external_class",
        )
    figs["recall"] = out.fig(
        _recall_figure(result["per_class"], dom is not None),
        "recall",
        "recall per class, in-domain and external",
        "Recall per class on the external set"
        + (
            " beside the run's out-of-fold recall of the same predictor."
            if dom is not None
            else " (in-domain numbers unavailable)."
        ),
        pc_csv,
    )
    bins = int(sc["bootstrap"]["ece_bins"])
    rel = {"external": reliability(y, proba, bins)}
    eces = {"external": result["ece"]}
    if dom is not None:
        rel["in-domain (out-of-fold)"] = reliability(dom["_y"], dom["_proba"], bins)
        eces["in-domain (out-of-fold)"] = dom["ece"]
    rel_csv = out.csv(
        pd.concat([t.assign(set=n) for n, t in rel.items()], ignore_index=True), "reliability"
    )
    fig = plots.reliability_figure(
        rel, eces, {"external": "#c0392b", "in-domain (out-of-fold)": "#4c72b0"}
    )
    fig.suptitle("Reliability diagrams (top-label confidence, full argmax)")
    figs["reliability"] = out.fig(
        fig,
        "reliability",
        "reliability diagrams",
        f"Accuracy against confidence in {bins} bins; the gap to the diagonal is miscalibration.",
        rel_csv,
    )
    conf_ext = proba.max(axis=1)
    correct = sc["_pred"] == y
    conf_in = dom["_proba"].max(axis=1) if dom is not None else None
    figs["confidence"] = out.fig(
        _confidence_figure(conf_ext, correct, conf_in),
        "confidence",
        "confidence histograms",
        "Top-class probability: in-domain (out-of-fold) against "
        "external, and on the external set split by correctness.",
    )
    gallery = None
    if cells:
        shown = [c for c in result["present_classes"] if any(x["true"] == c for x in cells)]
        n = max(sum(1 for x in cells if x["true"] == c) for c in shown)
        g_csv = out.csv(
            pd.DataFrame(
                [
                    {
                        "path": ext.shown[keep[x["row"]]],
                        "true": x["true"],
                        "predicted": x["predicted"],
                        "confidence": x["confidence"],
                    }
                    for x in cells
                ]
            ),
            "gradcam_errors",
        )
        gallery = out.fig(
            _gallery_figure(cells, shown, n),
            "gradcam_errors",
            "Grad-CAM of misclassified external images",
            "Misclassified external images (seeded, up to "
            f"{GALLERY_PER_CLASS} per true class) with the predictor's Grad-CAM "
            "for the class it predicted.",
            g_csv,
        )
    metric_rows = []
    for m in METRIC_KEYS:
        r = result["restricted"]
        metric_rows.append(
            {
                "label": metric_label(m),
                "value": fmt(result[m]),
                "ci": f"[{fmt(result['ci'][m]['lo'])}, {fmt(result['ci'][m]['hi'])}]",
                "r_value": fmt(r[m]),
                "r_ci": f"[{fmt(result['ci']['restricted'][m]['lo'])}, "
                f"{fmt(result['ci']['restricted'][m]['hi'])}]",
                "in_domain": fmt(dom["same_classes"][m]) if dom is not None else "",
            }
        )
    ctx = {
        "title": f"{result['data']['name']}",
        "r": result,
        "metric_rows": metric_rows,
        "figs": figs,
        "gallery": gallery,
        "gallery_status": gallery_status,
        "per_class_csv": pc_csv,
        "per_external_csv": pe_csv,
        "csvs": out.csvs,
        "csp": csp(),
        "script": SORT_SCRIPT,
        "fmt": fmt,
        "left_out": result["left_out"],
        "classes": classes,
    }
    html = env().get_template("evaluate.html.j2").render(**ctx)
    atomic_write_text(tmp / "index.html", html)


__all__ = ["write_page", "predictions_csv", "gradcam_gallery", "GALLERY_PER_CLASS"]
