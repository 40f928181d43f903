"""Grad-CAM audit: does a CNN look at the cell, and do its maps depend on what it learned?

* **Energy share**: the fraction of a Grad-CAM map's total mass that falls inside the
  segmented cell (:func:`features.morphology.segment_cell`, the segmentation behind the
  morphology features), next to the cell's share of the image area (what a map spread
  evenly would score).
* **Randomisation sanity check** (Adebayo et al., 2018, "Sanity checks for saliency
  maps"): the maps of the trained model are compared with those of the same
  architecture with re-initialised weights, for the same images and the same class, by
  Spearman rank correlation. Maps that barely change when the weights are destroyed
  explain the image (edges, stain), not the model; they are flagged.

Every fold model explains only its own test rows (out-of-fold), on a fixed, seeded
sample of images per class. An ensemble's map is the weighted mean of its CNN members'
maps for the ensemble's predicted class.
"""

from __future__ import annotations

import importlib.util
import math
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from core import registry
from core.candidate import load_candidate
from bench.protocols.stress import stress_shifts
from ensembles.build import build_ensemble, fit_ensemble, member_sets
from features.morphology import segment_cell


# ----------------------------------------------------------------------------- measures


def energy_share(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass inside ``mask`` (NaN for an all-zero map)."""
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if cam.shape != mask.shape:
        raise ValueError(f"map {cam.shape} and mask {mask.shape} differ in shape")
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else math.nan


def map_rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (NaN when either is constant)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError("maps differ in shape")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def randomization_check(maps_trained, maps_random, threshold: float = 0.5) -> dict:
    """Compare trained and randomised-weight maps image by image.

    Returns
    -------
    dict with ``rho`` (per image), ``rho_mean``, ``rho_median``, ``n`` and ``flagged``
    (``True`` when the mean correlation reaches ``threshold``: the maps hardly depend on
    the learned weights).
    """
    a, b = np.asarray(maps_trained), np.asarray(maps_random)
    if a.shape != b.shape:
        raise ValueError(f"trained {a.shape} and random {b.shape} maps differ in shape")
    rho = np.array([map_rank_correlation(x, y) for x, y in zip(a, b)])
    ok = rho[~np.isnan(rho)]
    mean = float(ok.mean()) if len(ok) else math.nan
    return {
        "rho": rho,
        "rho_mean": mean,
        "rho_median": float(np.median(ok)) if len(ok) else math.nan,
        "n": int(len(ok)),
        "flagged": bool(len(ok) and mean >= threshold),
    }


def resize_maps(maps: np.ndarray, shape) -> np.ndarray:
    """Maps resized (bilinear) to ``shape`` (H, W) when they differ."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[1:] == tuple(shape):
        return maps
    from skimage.transform import resize

    return np.stack(
        [resize(m, shape, order=1, preserve_range=True, anti_aliasing=False) for m in maps]
    ).astype(np.float32)


def overlay(img: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``img`` (H, W, 3) ``uint8`` blended with the ``jet`` colouring of ``cam``."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    out = (1 - alpha) * (np.asarray(img, dtype=np.float32) / 255.0) + alpha * heat
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling


def audit_sample(y: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of up to ``n_per_class`` rows of every class (sorted)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        rows.append(rng.choice(idx, size=min(n_per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=int)


def gallery_rows(y: np.ndarray, pred: np.ndarray, n: int, seed: int, n_classes: int) -> dict:
    """Per class, up to ``n`` correctly and ``n`` wrongly predicted rows (seeded)."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for c in range(n_classes):
        ok = np.where((y == c) & (pred == c))[0]
        bad = np.where((y == c) & (pred != c))[0]
        out[c] = (
            np.sort(rng.choice(ok, min(n, len(ok)), replace=False)),
            np.sort(rng.choice(bad, min(n, len(bad)), replace=False)),
        )
    return out


# ----------------------------------------------------------------------------- the audit


class MapStore:
    """Computes Grad-CAM maps fold by fold, each fold model loaded once."""

    def __init__(self, run, seed: int):
        self.run = run
        self.seed = seed
        self.requests: dict[tuple[str, str], dict[int, int]] = {}
        self.maps: dict[tuple[str, str, int, int], np.ndarray] = {}

    def want(self, member: str, mode: str, rows, classes) -> None:
        req = self.requests.setdefault((member, mode), {})
        for r, c in zip(rows, classes):
            req.setdefault(int(r), set()).add(int(c))

    def compute(self, images: np.ndarray, progress=None) -> None:
        run = self.run
        members = sorted({m for m, _ in self.requests})
        fold_of = run.folds
        for member in members:
            for k in run.fold_ids:
                jobs = {
                    mode: [
                        (r, c)
                        for r, cs in self.requests.get((member, mode), {}).items()
                        for c in sorted(cs)
                        if fold_of[r] == k
                    ]
                    for mode in ("trained", "random")
                }
                if not any(jobs.values()):
                    continue
                cand = load_candidate(run.unit_dir(member, k) / "model")
                for mode, pairs in jobs.items():
                    if not pairs:
                        continue
                    # explainable candidates: explain() and randomized() (declared)
                    explain = (
                        cand.explain
                        if mode == "trained"
                        else cand.randomized(self.seed + 1000 + k).explain
                    )
                    rows = np.array([r for r, _ in pairs])
                    cls = np.array([c for _, c in pairs])
                    X = np.asarray(images[rows])
                    maps = resize_maps(explain(X, class_index=cls), X.shape[1:3])
                    for r, c, m in zip(rows, cls, maps):
                        self.maps[(member, mode, int(r), int(c))] = m
                    if progress:
                        progress(f"Grad-CAM {member} fold {k} ({mode}): {len(rows)} maps")
                del cand

    def get(self, member, mode, row, cls) -> np.ndarray:
        return self.maps[(member, mode, int(row), int(cls))]


def ensemble_weights(run, name: str, cnn_members: list[str]) -> dict[int, dict[str, float]]:
    """Per fold, the ensemble's weights of its CNN members, renormalised (equal if unknown).

    Like the leaderboard's cross-validated ensemble, fold k's weights are fitted on the
    out-of-fold probabilities of the other folds. Ensembles that do not declare
    ``has_member_weights`` (stacking) are not fitted: their CNN members weigh the same.
    """
    members = run.members(name)
    entry = run.config.ensembles[name]
    weighted = build_ensemble(entry, name).has_member_weights  # declared capability
    sets = None  # as the run fitted it (member_sets): with stress = true also under each shift
    out = {}
    for k in run.fold_ids:
        w = np.ones(len(members))
        if weighted:
            try:
                if sets is None:  # read once, for every fold
                    stressed = (
                        {
                            s: {m: run.rundir.read_stress_oof(m, s) for m in members}
                            for s in stress_shifts(run.config)
                        }
                        if entry.stress
                        else None
                    )
                    sets, fit_sets = member_sets(name, entry, members, run.oof, stressed)
                train = run.splits.train(k)
                fitted = fit_ensemble(
                    build_ensemble(entry, name),
                    [[p[train] for p in s] for s in sets],
                    run.y[train],
                    name,
                    run.folds[train],
                    cross_val=False,
                    fit_sets=fit_sets,
                )
                weights = fitted.member_weights()
                if weights is not None and len(weights) == len(members):
                    w = np.asarray(weights, dtype=float)
            except Exception:  # noqa: BLE001 - a weighting we cannot read: equal weights
                pass
        sel = {m: float(wi) for m, wi in zip(members, w) if m in cnn_members}
        total = sum(sel.values())
        out[k] = (
            {m: v / total for m, v in sel.items()}
            if total > 0
            else {m: 1.0 / len(sel) for m in sel}
        )
    return out


def audit_targets(run, board) -> tuple[list[str], list[str]]:
    """CNN candidates, and the ensemble to audit (the predictor's, else the best one with
    CNN members)."""
    cnns = [
        n
        for n in run.names
        if run.kind(n) != "ensemble" and registry.get(run.units[n][0]["type"]).explainable
    ]  # declared capability
    ens = [
        n
        for n in board["candidate"]
        if run.kind(n) == "ensemble" and any(m in cnns for m in run.members(n))
    ]
    chosen = run.state.get("predictor")
    if chosen in ens:
        return cnns, [chosen]
    return cnns, ens[:1]


def run_audit(run, board, settings: dict, progress=None) -> dict:
    """Grad-CAM maps, energy shares and the randomisation check of the audited entries.

    Returns
    -------
    dict with ``entries`` (audited names), ``energy`` (DataFrame, one row per entry and
    audited image), ``randomization`` (DataFrame per entry and image), ``summary``
    (DataFrame per entry), ``gallery`` (entry -> {class: (rows_ok, rows_bad)}), ``maps``
    ((entry, row) -> map), ``masks`` (row -> cell mask), ``notes`` (list of str).
    """
    cnns, ens = audit_targets(run, board)
    notes = []
    if not cnns:
        return {"entries": [], "notes": ["no CNN candidate in this run: nothing to audit"]}
    images = run.images()
    seed = int(settings.seed)
    sample = audit_sample(run.y, int(settings.gradcam_per_class), seed)
    pred = {n: run.oof[n].argmax(axis=1) for n in cnns + ens}
    galleries = {
        n: gallery_rows(run.y, pred[n], int(settings.gallery_per_class), seed, len(run.classes))
        for n in cnns + ens
    }
    store = MapStore(run, seed)
    weights = {e: ensemble_weights(run, e, cnns) for e in ens}
    for e in ens:
        other = [m for m in run.members(e) if m not in cnns]
        if other:
            notes.append(
                f"the maps of ensemble '{e}' combine its CNN members only "
                f"({', '.join(other)} have no Grad-CAM)"
            )
    for n in cnns + ens:
        gal = np.concatenate([np.concatenate(v) for v in galleries[n].values()]).astype(int)
        rows = np.union1d(sample, gal)
        members = [n] if n in cnns else sorted({m for w in weights[n].values() for m in w})
        for m in members:
            store.want(m, "trained", rows, pred[n][rows])
            store.want(m, "random", sample, pred[n][sample])
    store.compute(images, progress)

    def entry_map(n, row, mode):
        if n in cnns:
            return store.get(n, mode, row, pred[n][row])
        w = weights[n][int(run.folds[row])]
        m = sum(wi * store.get(mem, mode, row, pred[n][row]) for mem, wi in w.items())
        peak = float(np.max(m))
        return (m / peak if peak > 0 else m).astype(np.float32)

    masks, nuclei = {}, {}  # the audited sample, and the gallery images for outlines
    shown = [np.concatenate([np.concatenate(v) for v in galleries[n].values()]) for n in cnns + ens]
    for r in np.union1d(sample, np.concatenate(shown)).astype(int):
        masks[int(r)], nuclei[int(r)] = segment_cell(np.asarray(images[r]))
    energy, rand_rows, summary, maps = [], [], [], {}
    thr = float(settings.randomization_threshold)
    for n in cnns + ens:
        gal = np.concatenate([np.concatenate(v) for v in galleries[n].values()]).astype(int)
        for r in np.union1d(sample, gal):
            maps[(n, int(r))] = entry_map(n, r, "trained")
        trained = np.stack([maps[(n, int(r))] for r in sample])
        random = np.stack([entry_map(n, r, "random") for r in sample])
        check = randomization_check(trained, random, thr)
        for r, rho in zip(sample, check["rho"]):
            rand_rows.append({"candidate": n, "row": int(r), "rho": rho})
        shares = []
        for r, cam in zip(sample, trained):
            r = int(r)
            row = {
                "candidate": n,
                "row": r,
                "source": str(run.folds_table["source"].iloc[r]),
                "true": run.classes[run.y[r]],
                "predicted": run.classes[pred[n][r]],
                "correct": bool(pred[n][r] == run.y[r]),
            }
            if r in masks and masks[r].any():
                row.update(
                    {
                        "energy_in_cell": energy_share(cam, masks[r]),
                        "cell_area_fraction": float(masks[r].mean()),
                        "energy_in_nucleus": energy_share(cam, nuclei[r])
                        if nuclei[r].any()
                        else math.nan,
                        "nucleus_area_fraction": float(nuclei[r].mean()),
                    }
                )
            else:
                row.update(
                    {
                        "energy_in_cell": math.nan,
                        "cell_area_fraction": math.nan,
                        "energy_in_nucleus": math.nan,
                        "nucleus_area_fraction": math.nan,
                    }
                )
            shares.append(row)
        energy += shares
        e = pd.DataFrame(shares)
        e_cell = e["energy_in_cell"].mean()
        area = e["cell_area_fraction"].mean()
        summary.append(
            {
                "candidate": n,
                "kind": run.kind(n),
                "images": len(sample),
                "segmented": int(e["energy_in_cell"].notna().sum()),
                "energy_in_cell": e_cell,
                "cell_area_fraction": area,
                "lift": e_cell / area if area and np.isfinite(area) else math.nan,
                "energy_in_nucleus": e["energy_in_nucleus"].mean(),
                "rho_random_mean": check["rho_mean"],
                "rho_random_median": check["rho_median"],
                "randomization_flagged": check["flagged"],
            }
        )
    n_seg = sum(bool(masks[int(r)].any()) for r in sample if int(r) in masks)
    if segment_cell is not None and n_seg < len(sample):
        notes.append(
            f"the cell segmentation failed on {len(sample) - n_seg} of {len(sample)} "
            "audited images (left out of the energy shares)"
        )
    return {
        "entries": cnns + ens,
        "energy": pd.DataFrame(energy),
        "randomization": pd.DataFrame(rand_rows),
        "summary": pd.DataFrame(summary),
        "gallery": galleries,
        "maps": maps,
        "masks": masks,
        "pred": pred,
        "sample": sample,
        "notes": notes,
        "images": images,
    }


# ----------------------------------------------------------------------------- figures


def gallery_figure(run, audit: dict, name: str):
    """Rows: classes; columns: correct then misclassified examples, Grad-CAM overlaid."""
    from matplotlib.figure import Figure
    from skimage.segmentation import find_boundaries

    gal = audit["gallery"][name]
    n = max(1, max(max(len(a), len(b)) for a, b in gal.values()))
    k = len(run.classes)
    images, maps, pred = audit["images"], audit["maps"], audit["pred"][name]
    fig = Figure(figsize=(1.5 * 2 * n + 1.2, 1.65 * k + 0.6))
    axes = np.atleast_2d(fig.subplots(k, 2 * n, squeeze=False))
    for c in range(k):
        ok, bad = gal[c]
        for j in range(2 * n):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            rows = ok if j < n else bad
            i = j if j < n else j - n
            if j == 0:
                ax.set_ylabel(run.classes[c], fontsize=8, rotation=0, ha="right", va="center")
            if i >= len(rows):
                ax.set_facecolor("#f2f2f2")
                for s in ax.spines.values():
                    s.set_visible(False)
                continue
            r = int(rows[i])
            img = np.asarray(images[r])
            ov = overlay(img, maps[(name, r)])
            mask = audit["masks"].get(r)
            if mask is not None and mask.any():
                ov[find_boundaries(mask, mode="inner")] = (255, 255, 255)
            ax.imshow(ov)
            good = pred[r] == c
            ax.set_title(
                f"→ {run.classes[pred[r]]}", fontsize=7, color="#1a7f37" if good else "#c0392b"
            )
    if n:
        axes[0, 0].annotate(
            "correct", xy=(0, 1.35), xycoords="axes fraction", fontsize=9, fontweight="bold"
        )
        axes[0, n].annotate(
            "misclassified", xy=(0, 1.35), xycoords="axes fraction", fontsize=9, fontweight="bold"
        )
    fig.suptitle(
        f"Grad-CAM of {name} (out-of-fold; arrow: predicted class; white: cell outline)",
        fontsize=10,
    )
    return fig


def energy_figure(audit: dict, colors: dict):
    """Energy share inside the cell per entry (box plot), with the cell's area share."""
    from matplotlib.figure import Figure

    e = audit["energy"]
    names = [n for n in audit["entries"] if e[e["candidate"] == n]["energy_in_cell"].notna().any()]
    fig = Figure(figsize=(max(5, 1.3 * len(names) + 2), 4))
    ax = fig.subplots()
    if not names:
        ax.text(0.5, 0.5, "no segmented images", ha="center", va="center")
        ax.axis("off")
        return fig
    data = [e[e["candidate"] == n]["energy_in_cell"].dropna().to_numpy() for n in names]
    area = [e[e["candidate"] == n]["cell_area_fraction"].dropna().mean() for n in names]
    bp = ax.boxplot(data, patch_artist=True, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1), labels=names, rotation=20, ha="right")
    for patch, n in zip(bp["boxes"], names):
        patch.set_facecolor(colors.get(n, "#999999"))
        patch.set_alpha(0.7)
    ax.scatter(
        range(1, len(names) + 1),
        area,
        marker="_",
        s=600,
        color="black",
        zorder=3,
        label="cell share of image area (uniform map)",
    )
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("share of Grad-CAM energy inside the cell")
    ax.set_title("Does the model look at the cell?")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def check_available() -> str | None:
    """``None`` when Grad-CAM can run here (Keras is installed), else why not."""
    if importlib.util.find_spec("keras") is None:
        return "Grad-CAM unavailable: Keras is not installed"
    return None


__all__ = [
    "energy_share",
    "map_rank_correlation",
    "randomization_check",
    "resize_maps",
    "overlay",
    "audit_sample",
    "gallery_rows",
    "run_audit",
    "gallery_figure",
    "energy_figure",
    "check_available",
    "MapStore",
    "ensemble_weights",
]
