"""Data card and run card: where the data came from, how it was split, how the run ran;
and the warnings a reader must see before trusting a number."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.run.tuning import fold_decision


def warnings_for(run, board: pd.DataFrame, settings: dict) -> list[dict]:
    """Warnings shown at the top of the report: ``{"title", "text"}``."""
    out = []
    manifest, cfg = run.manifest, run.config
    grouping = manifest.get("grouping", {}) or {}
    data_cfg = cfg.data
    if (
        not grouping.get("user_groups")
        and not data_cfg.groups
        and not data_cfg.group_rule
        and not grouping.get("group_rule")
    ):
        out.append(
            {
                "title": "no patient groups",
                "text": "No patient or slide groups were given ([data] groups or group_rule): "
                "cells of one patient may sit in both training and test folds, "
                "which makes every score here optimistic.",
            }
        )
    colour = cfg.colour_only_candidates()
    limit = float(settings.colour_only_warning)
    for name, ex in colour.items():
        row = board[board["candidate"] == name]
        if len(row) and row["balanced_accuracy"].iloc[0] >= limit:
            n_classes = len(run.classes)
            out.append(
                {
                    "title": f"colour-only baseline '{name}' scores high",
                    "text": f"'{name}' uses colour features only ({', '.join(ex)}) and reaches "
                    f"a balanced accuracy of {row['balanced_accuracy'].iloc[0]:.3f} "
                    f"(chance: {1 / n_classes:.3f}; warning at {limit:.2f}). Classes "
                    "may differ by staining, scanner or lab rather than by "
                    "morphology: an acquisition shortcut the CNNs can use too.",
                }
            )
    conflicts = grouping.get("duplicate_label_conflicts") or []
    if conflicts:
        out.append(
            {
                "title": "identical images with different labels",
                "text": f"{len(conflicts)} group(s) of pixel-identical images carry more than "
                "one label.",
            }
        )
    ds = manifest.get("dataset", {}) or {}
    if ds.get("skipped"):
        out.append(
            {
                "title": "files skipped",
                "text": f"{len(ds['skipped'])} file(s) could not be read (see the data card).",
            }
        )
    per_fold_class = run.folds_table.groupby(["fold", "label"]).size()
    if len(per_fold_class) and per_fold_class.min() < 5:
        out.append(
            {
                "title": "few test images per class",
                "text": f"Some fold has only {int(per_fold_class.min())} test image(s) of a "
                "class: per-fold scores and intervals are noisy.",
            }
        )
    for name, units in run.units.items():
        notes = sorted({n for u in units for n in (u.get("notes") or [])})
        if notes:
            out.append(
                {
                    "title": f"'{name}': not what its name says",
                    "text": "; ".join(notes) + ". Its scores are not those of the method "
                    "configured.",
                }
            )
    if len(run.fold_ids) < 3:
        out.append(
            {
                "title": "few folds",
                "text": f"{len(run.fold_ids)} folds: confidence intervals are very wide.",
            }
        )
    return out


def data_card(run) -> dict:
    """Source, counts, sizes, duplicates and grouping, skipped files, fold scheme."""
    m = run.manifest
    ds = m.get("dataset", {}) or {}
    g = m.get("grouping", {}) or {}
    folds = m.get("folds", {}) or {}
    counts = ds.get("counts") or {
        c: int(n) for c, n in zip(run.classes, np.bincount(run.y, minlength=len(run.classes)))
    }
    per_fold = (
        run.folds_table.groupby(["label", "fold"])
        .size()
        .unstack(fill_value=0)
        .reindex(run.classes)
        .fillna(0)
        .astype(int)
    )
    per_fold.columns = [f"fold {c}" for c in per_fold.columns]
    data_cfg = run.config.data
    sources = run.folds_table["source"].astype(str)
    splits = sorted({s.split("/")[0] for s in sources if s.count("/") >= 2})
    return {
        "source": m.get("data_path") or ds.get("origin", ""),
        "dataset_name": data_cfg.name or "",
        "n_images": ds.get("n_images", len(run.y)),
        "counts": counts,
        "image_size": ds.get("image_size"),
        "original_sizes": ds.get("original_sizes", {}),
        "converted": ds.get("converted", []),
        "skipped": ds.get("skipped", []),
        "subset": data_cfg.max_images,
        "grouping": {
            "exact duplicate groups": g.get(
                "exact_duplicate_groups", ds.get("exact_duplicate_groups")
            ),
            "images in exact duplicate groups": ds.get("exact_duplicate_images"),
            "identical images with different labels": len(g.get("duplicate_label_conflicts") or []),
            "patient/slide groups file": data_cfg.groups or "none",
            "groups from the file": g.get("user_groups", 0),
            "near-duplicate pairs file": data_cfg.pairs or "none",
            "near-duplicate pairs joined": g.get("pairs", 0),
            "file-number rule": data_cfg.group_rule or g.get("group_rule") or "none",
            "names not matched": len(g.get("unmatched") or []),
            "groups in all": g.get("n_groups"),
        },
        "splits_merged": splits,
        "folds": {
            "scheme": folds.get("scheme"),
            "n_folds": folds.get("n_folds"),
            "seed": folds.get("seed"),
            "hash": folds.get("hash"),
        },
        "per_fold": per_fold,
    }


def run_card(run) -> dict:
    """Config, profile, seeds, versions, hardware, wall time per stage."""
    m = run.manifest
    stages = m.get("stage_seconds", {}) or {}
    return {
        "run_dir": str(run.run_dir),
        "profile": m.get("profile"),
        "created": m.get("created"),
        "finished": m.get("finished"),
        "git_commit": m.get("git_commit"),
        "config_hash": m.get("config_hash"),
        "seeds": m.get("seeds", {}),
        "tuning": m.get("tuning", {}),
        "versions": m.get("versions", {}),
        "hardware": m.get("hardware", {}),
        "stages": stages,
        "total_seconds": float(sum(stages.values())) if stages else None,
        "prepare_seconds": m.get("prepare_seconds", {}) or {},
        "unit_times": unit_times(run),
        "config_toml": run.rundir.config_file.read_text(),
        "predictor": run.state.get("predictor"),
    }


def unit_times(run) -> list[dict]:
    """Per candidate, summed over its folds: tuning, fitting and prediction seconds.

    Training images/s for the CNNs is ``n_train * epochs_run / fit_seconds`` (their fit
    includes the pass over the early-stopping split and graph tracing, so it is a floor).
    """
    rows = []
    for name, units in run.units.items():

        def total(key):
            return float(sum(u.get(key) or 0.0 for u in units))

        fit, epochs = total("fit_seconds"), [u.get("epochs_run") for u in units]
        epochs = [e for e in epochs if e]
        img_s = (
            sum(u["n_train"] * u["epochs_run"] for u in units if u.get("epochs_run")) / fit
            if epochs and fit > 0
            else None
        )
        rows.append(
            {
                "candidate": name,
                "units": len(units),
                "tune_s": total("tune_seconds"),
                "fit_s": fit,
                "predict_s": total("predict_seconds"),
                "epochs": f"{min(epochs)}-{max(epochs)}" if epochs else "",
                "train_img_s": img_s,
                **trial_summary(units),
            }
        )
    return rows


def trial_summary(units: list[dict]) -> dict:
    """Optuna trials of a candidate's units: per fold (in fold order), pruned and failed
    counts, the folds whose best trial was not the configured parameters, and the trials'
    fidelity (``bench.run.tuning``)."""
    tun = [u.get("tuning") or {} for u in sorted(units, key=lambda u: u.get("fold", 0))]
    n = [int(t.get("n_trials") or 0) for t in tun]
    if not any(n):
        return {
            "trials": "",
            "trials_total": 0,
            "trials_pruned": 0,
            "trials_failed": 0,
            "tuned_folds": 0,
            "checked_folds": 0,
            "per_fold": [],
            "fidelity": "",
        }
    fid = next((t.get("fidelity") for t in tun if t.get("fidelity")), {}) or {}
    cap = next((t.get("max_samples") for t in tun if t.get("max_samples")), 0)
    fidelity = ", ".join([f"{k}={v}" for k, v in fid.items()] + ([f"<= {cap} rows"] if cap else []))
    return {
        "trials": "/".join(map(str, n)),
        "trials_total": sum(n),
        "trials_pruned": sum(int(t.get("n_pruned") or 0) for t in tun),
        "trials_failed": sum(int(t.get("n_fail") or 0) for t in tun),
        "tuned_folds": sum(bool(t.get("best_params")) for t in tun),
        "checked_folds": sum(bool(t.get("confirm")) for t in tun),
        "per_fold": [fold_decision(t) for t in tun],
        "fidelity": fidelity,
    }
