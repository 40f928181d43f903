"""Report figures (matplotlib, no display needed: figures render straight to PNG).

Every candidate keeps one colour in every figure (:func:`palette`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

DPI = 110


def plain(text) -> str:
    """``text`` shown as it is (a ``$`` would otherwise start matplotlib's mathtext)."""
    return str(text).replace("$", r"\$")


def palette(names: list[str]) -> dict[str, str]:
    """A fixed colour per name (tab10, then tab20 for more than ten)."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: to_hex(cmap(i % cmap.N)) for i, n in enumerate(names)}


def save(fig: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path.name


def scores_figure(per_fold, board, metric: str, label: str, colors: dict) -> Figure:
    """Per-fold scores (dots), mean and confidence interval (bar) of every entry."""
    names = list(board["candidate"])
    fig = Figure(figsize=(7.5, 0.45 * len(names) + 1.4))
    ax = fig.subplots()
    for i, name in enumerate(names):
        r = board.iloc[i]
        f = per_fold[per_fold["candidate"] == name][metric].to_numpy()
        y = len(names) - 1 - i
        ax.scatter(
            f,
            np.full(len(f), y) + np.linspace(-0.12, 0.12, len(f)),
            s=14,
            color=colors[name],
            alpha=0.6,
            zorder=2,
        )
        if np.isfinite(r[f"{metric}_lo"]):
            ax.plot(
                [r[f"{metric}_lo"], r[f"{metric}_hi"]],
                [y, y],
                color=colors[name],
                lw=3,
                alpha=0.9,
                zorder=1,
            )
        ax.scatter([r[metric]], [y], marker="D", s=40, color="black", zorder=3)
    ax.set_yticks(range(len(names)), labels=names[::-1])
    ax.set_xlabel(f"{label} (dots: folds; diamond: mean; bar: 95% CI)")
    ax.set_title(f"{label} per fold")
    ax.grid(axis="x", alpha=0.3)
    return fig


def cost_figure(board, metric: str, label: str, colors: dict) -> Figure:
    """Score against inference time per image (entries at the same point share a label)."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    points: dict[tuple, list[str]] = {}
    for _, r in board.iterrows():
        x, y = r["predict_ms_per_image"], r[metric]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        ax.scatter([x], [y], s=60, color=colors[r["candidate"]], edgecolor="black", linewidth=0.5)
        points.setdefault((round(float(x), 9), round(float(y), 9)), []).append(r["candidate"])
    for (x, y), names in points.items():
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("inference ms per image (log scale; ensembles: sum of members)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against inference cost")
    ax.grid(alpha=0.3)
    return fig


def confusion_figure(
    cm,
    norm,
    classes: list[str],
    title: str,
    predicted: list[str] | None = None,
    xlabel: str = "predicted class",
) -> Figure:
    """Counts (left) and row-normalised (right) confusion matrices; rows are ``classes``
    (true), columns ``predicted`` (default: the same classes)."""
    predicted = list(classes) if predicted is None else list(predicted)
    cm = np.asarray(cm)
    r, c = len(classes), len(predicted)
    w, h = max(4.0, 0.55 * c + 2), max(2.6 if r != c else 4.0, 0.55 * r + 2)
    fig = Figure(figsize=(2 * w + 1, h))
    axes = fig.subplots(1, 2)
    counts_fmt = "d" if np.issubdtype(cm.dtype, np.integer) else ".0f"
    for ax, mat, sub, fmt in (
        (axes[0], cm, "counts", counts_fmt),
        (axes[1], norm, "normalised by true class", ".2f"),
    ):
        top = max(float(mat.max()), 1e-9) if fmt != ".2f" else 1
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=top, aspect="auto" if r != c else None)
        ax.set_xticks(range(c), labels=predicted, rotation=45, ha="right")
        ax.set_yticks(range(r), labels=classes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("true class")
        ax.set_title(sub)
        hi = mat.max() / 2 if mat.max() else 0.5
        if c <= 20:
            for i in range(r):
                for j in range(c):
                    ax.text(
                        j,
                        i,
                        format(mat[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if mat[i, j] > hi else "black",
                    )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def roc_figure(roc, classes: list[str], title: str) -> Figure:
    """One-vs-rest ROC curves, one line per class."""
    from sklearn.metrics import auc

    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, cls in enumerate(classes):
        r = roc[roc["class"] == cls]
        if len(r) < 2:
            continue
        ax.plot(
            r["fpr"],
            r["tpr"],
            color=cmap(i % cmap.N),
            lw=1.5,
            label=f"{cls} (AUC {auc(r['fpr'], r['tpr']):.3f})",
        )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    return fig


def reliability_figure(tables: dict, eces: dict, colors: dict) -> Figure:
    """Reliability diagrams, one panel per entry: accuracy against confidence per bin."""
    names = list(tables)
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig = Figure(figsize=(3.6 * cols, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        t = tables[name]
        width = float(t["bin_hi"].iloc[0] - t["bin_lo"].iloc[0])
        mid = (t["bin_lo"] + t["bin_hi"]) / 2
        ok = t["count"] > 0
        ax.bar(
            mid[ok],
            t["accuracy"][ok],
            width=width * 0.95,
            color=colors[name],
            alpha=0.8,
            edgecolor="black",
            linewidth=0.4,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        ax.scatter(t["confidence"][ok], t["accuracy"][ok], s=8, color="black", zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ECE {eces[name]:.3f}", fontsize=9)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("Reliability diagrams (pooled out-of-fold predictions)")
    fig.tight_layout()
    return fig


def counts_figure(counts: dict) -> Figure:
    """Images per class."""
    names = list(counts)
    fig = Figure(figsize=(max(5, 0.6 * len(names) + 2), 3.6))
    ax = fig.subplots()
    ax.bar(range(len(names)), [counts[n] for n in names], color="#4c72b0")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Images per class")
    ax.grid(axis="y", alpha=0.3)
    return fig


def cd_figure(avg_ranks: dict, cd: float, colors: dict, title: str) -> Figure:
    """Critical-difference diagram (Demšar 2006): average ranks on an axis, methods whose
    ranks differ by less than ``cd`` joined by a bar."""
    items = sorted(avg_ranks.items(), key=lambda kv: kv[1])
    k = len(items)
    fig = Figure(figsize=(8, 1.6 + 0.32 * k))
    ax = fig.subplots()
    lo, hi = 1, max(k, 2)
    ax.set_xlim(lo - 0.3, hi + 0.3)
    ax.hlines(0, lo, hi, color="black", lw=1)
    for r in range(lo, hi + 1):
        ax.vlines(r, -0.08, 0.08, color="black", lw=1)
        ax.text(r, 0.15, str(r), ha="center", fontsize=8)
    half = (k + 1) // 2
    for i, (name, rank) in enumerate(items):
        left = i < half
        depth = -0.4 - 0.3 * (i if left else k - 1 - i)
        x_text = lo - 0.2 if left else hi + 0.2
        ax.plot([rank, rank, x_text], [0, depth, depth], color=colors.get(name, "black"), lw=1.2)
        ax.text(
            x_text,
            depth,
            f"{name} ({rank:.2f})",
            ha="right" if left else "left",
            va="center",
            fontsize=8,
            color=colors.get(name, "black"),
        )
    # cliques: maximal runs of methods whose average ranks differ by less than the CD
    ranks = [r for _, r in items]
    cliques, level = [], 0
    for i in range(k):
        j = max(j for j in range(i, k) if ranks[j] - ranks[i] < cd)
        if j > i and not any(a <= i and j <= b for a, b in cliques):
            cliques.append((i, j))
    for a, b in cliques:
        y = -0.18 - 0.09 * level
        ax.hlines(y, ranks[a] - 0.03, ranks[b] + 0.03, color="black", lw=3)
        level += 1
    ax.hlines(0.45, lo, lo + cd, color="firebrick", lw=2)
    ax.text(lo + cd / 2, 0.52, f"CD = {cd:.2f}", ha="center", fontsize=8, color="firebrick")
    ax.set_ylim(-0.5 - 0.3 * half, 0.7)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return fig


def external_scatter_figure(table, colors: dict, title: str) -> Figure:
    """In-domain (cross-validated) against external balanced accuracy, one point per entry
    (external 95% bootstrap interval as a vertical bar), the diagonal = no loss."""
    fig = Figure(figsize=(6.2, 5.4))
    ax = fig.subplots()
    points: dict[tuple, list[str]] = {}
    for _, r in table.iterrows():
        x, y = r["in_domain_balanced_accuracy"], r["external_balanced_accuracy"]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        c = colors.get(r["candidate"], "black")
        lo, hi = r["external_balanced_accuracy_lo"], r["external_balanced_accuracy_hi"]
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([x, x], [lo, hi], color=c, lw=1.5, alpha=0.6, zorder=1)
        ax.scatter([x], [y], s=60, color=c, edgecolor="black", linewidth=0.5, zorder=3)
        points.setdefault((round(float(x), 9), round(float(y), 9)), []).append(r["candidate"])
    for (x, y), names in points.items():
        ax.annotate(
            plain(", ".join(names)), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="external = in-domain")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("in-domain balanced accuracy (cross-validated, mean over folds)")
    ax.set_ylabel("external balanced accuracy (bar: 95% bootstrap CI)")
    ax.set_title(plain(title), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def external_recall_figure(
    recall, rows: list[tuple[str, str]], classes: list[str], title: str
) -> Figure:
    """Heat map of recall per class: for each ``(entry, role)`` one row in-domain
    (out-of-fold) and one row on the external set; classes the external set lacks are grey;
    each class is labelled with its number of external images."""
    labels, mat = [], []
    for name, role in rows:
        t = recall[recall["candidate"] == name].set_index("class").reindex(classes)
        for col, where in (("in_domain_recall", "in-domain"), ("external_recall", "external")):
            labels.append(plain(f"{name} ({role}): {where}"))
            mat.append(t[col].to_numpy(dtype=float))
    mat = np.array(mat, dtype=float)
    k = len(classes)
    fig = Figure(figsize=(max(6.0, 0.62 * k + 4.5), 0.5 * len(labels) + 2.0))
    ax = fig.subplots()
    cmap = colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    support = (
        recall.drop_duplicates("class")
        .set_index("class")["external_support"]
        .reindex(classes)
        .fillna(0)
        .astype(int)
    )
    ax.set_xticks(
        range(k), labels=[f"{plain(c)} (n={support[c]})" for c in classes], rotation=45, ha="right"
    )
    ax.set_yticks(range(len(labels)), labels=labels)
    for i in range(len(labels)):
        for j in range(k):
            v = mat[i, j]
            dark = np.isfinite(v) and (v < 0.15 or v > 0.85)
            ax.text(
                j,
                i,
                "absent" if not np.isfinite(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
    for i in range(2, len(labels), 2):
        ax.axhline(i - 0.5, color="white", lw=3)
    ax.set_title(plain(title), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="recall")
    return fig


def leakage_figure(table, colors: dict, metric: str, label: str) -> Figure:
    """Grouped (circle) and image-level (triangle) ``metric`` per entry, joined by a line
    (the inflation); rows in ``table`` order."""
    names = list(table["candidate"])
    fig = Figure(figsize=(7.5, 0.42 * len(names) + 1.6))
    ax = fig.subplots()
    for i, name in enumerate(names):
        r = table.iloc[i]
        y = len(names) - 1 - i
        c = colors.get(name, "black")
        g, im = r[f"grouped_{metric}"], r[f"image_level_{metric}"]
        if np.isfinite(g) and np.isfinite(im):
            ax.plot([g, im], [y, y], color=c, lw=2.5, alpha=0.45, zorder=1)
        for x, marker in ((g, "o"), (im, "^")):
            if np.isfinite(x):
                ax.scatter(
                    [x],
                    [y],
                    marker=marker,
                    s=55,
                    color=c,
                    edgecolor="black",
                    linewidth=0.5,
                    zorder=3,
                )
    ax.scatter([], [], marker="o", color="white", edgecolor="black", label="grouped folds")
    ax.scatter([], [], marker="^", color="white", edgecolor="black", label="image-level folds")
    ax.set_yticks(range(len(names)), labels=[plain(n) for n in names[::-1]])
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.margins(x=0.08)
    ax.set_xlabel(f"{label} (mean over folds)")
    ax.set_title(f"Leakage audit: {label} on grouped and image-level folds", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    return fig
