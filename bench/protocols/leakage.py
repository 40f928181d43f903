"""Leakage audit: what grouped folds are worth, measured (``[report] leakage_audit``).

For a dataset whose folds are grouped beyond exact duplicates (``[data] groups``, e.g.
patients; ``pairs``, near duplicates; ``group_rule``, e.g. one smear's fields), the same
candidates and ensembles are run again, with the same seed, folds, parameters and tuning,
on **image-level** folds: the same config with ``groups``, ``pairs`` and ``group_rule``
emptied. Exact duplicates (identical decoded pixels) stay together in both runs
(:func:`bench.data.folds.make_groups` always unites them): the audit removes patient, smear and
near-duplicate grouping, not duplicate grouping.

The image-level run is an ordinary run directory, ``DIR/leakage`` (it resumes like any
run: a second ``run`` skips its finished units); its report and its own audit are off and
it scores no external set. ``DIR/leakage.csv`` (:func:`compare`) holds one row per
candidate and ensemble: grouped and image-level mean and std over folds of accuracy,
balanced accuracy and macro-F1 (and the run's metric), and the inflation (image-level -
grouped) of each: what leakage between folds would have added to the scores.

The runner calls :func:`leakage_audit` with its own ``run_benchmark`` (passed in, so that
this module does not import the runner that imports it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from bench.config import Config
from bench.run.context import RunContext, Stage
from bench.run.rundir import RunDir
from core.metrics import LABEL_METRICS, metric_sort_ascending
from core.progress import info, warn

GROUPING_KEYS = ("groups", "pairs", "group_rule")
AUDIT_METRICS = LABEL_METRICS  # accuracy, balanced accuracy, macro-F1 (core.metrics)


def grouping_removed(cfg: Config) -> dict:
    """The ``[data]`` grouping settings the audit removes (only those that are set)."""
    return {k: getattr(cfg.data, k) for k in GROUPING_KEYS if getattr(cfg.data, k)}


def audit_config(cfg: Config, out) -> Config | None:
    """The image-level copy of ``cfg`` written to ``out``; ``None`` when the dataset has no
    grouping to remove (no ``groups``, ``pairs`` or ``group_rule``)."""
    if not grouping_removed(cfg):
        return None
    # a bag task's cells, split at image level: cell scores only; its own studies (SQLite
    # in DIR/leakage): in a shared storage they would carry the grouped run's names
    # (NAME-foldK) and the grouped run's trials
    return cfg.derive(
        run={"out": str(out)},
        data={**{k: "" for k in GROUPING_KEYS}, "bags": False},
        report={"enabled": False, "leakage_audit": False},
        external={},
        tuning={"storage": ""},
    )


def audit_metrics(metric: str) -> tuple[str, ...]:
    """The metrics compared: accuracy, balanced accuracy, macro-F1 and the run's metric."""
    return AUDIT_METRICS + (() if metric in AUDIT_METRICS else (metric,))


def compare(
    grouped: pd.DataFrame, image_level: pd.DataFrame, metric: str = "accuracy"
) -> pd.DataFrame:
    """One row per entry of ``grouped`` (leaderboards of the grouped and the image-level
    run): ``grouped_<m>``, ``grouped_<m>_std``, ``image_level_<m>``, ``image_level_<m>_std``
    and ``inflation_<m>`` (image-level - grouped) per metric, sorted by the grouped
    ``metric`` (best first)."""
    metrics = [m for m in audit_metrics(metric) if m in grouped and m in image_level]
    img = image_level.set_index(image_level["candidate"].astype(str))
    rows = []
    for _, r in grouped.iterrows():
        name = str(r["candidate"])
        other = img.loc[name] if name in img.index else None
        row = {"candidate": name, "kind": r["kind"]}
        for m in metrics:
            g = float(r[m])
            i = float(other[m]) if other is not None else float("nan")
            row |= {
                f"grouped_{m}": g,
                f"grouped_{m}_std": float(r.get(f"{m}_std", np.nan)),
                f"image_level_{m}": i,
                f"image_level_{m}_std": float(other.get(f"{m}_std", np.nan))
                if other is not None
                else float("nan"),
                f"inflation_{m}": i - g,
            }
        rows.append(row)
    table = pd.DataFrame(rows)
    key = f"grouped_{metric}" if metric in metrics else f"grouped_{metrics[0]}"
    return table.sort_values(
        key, ascending=metric_sort_ascending(metric), kind="stable"
    ).reset_index(drop=True)


def split_groups(grouped_folds: pd.DataFrame, image_folds: pd.DataFrame) -> dict:
    """How many of the grouped run's groups (``folds.csv`` ``group``) of two or more images
    the image-level folds split across folds, and how many images those groups hold."""
    g = grouped_folds[["source", "group"]].reset_index(drop=True)
    if (
        len(image_folds) == len(g)
        and (image_folds["source"].astype(str).to_numpy() == g["source"].astype(str)).all()
    ):
        g["image_fold"] = image_folds["fold"].to_numpy()
    else:  # rows in another order: match them by file
        g = g.merge(
            image_folds[["source", "fold"]].rename(columns={"fold": "image_fold"}),
            on="source",
            how="inner",
        )
    per = g.groupby("group").agg(size=("image_fold", "size"), folds=("image_fold", "nunique"))
    multi = per[per["size"] > 1]
    split = multi[multi["folds"] > 1]
    return {
        "groups": int(len(multi)),
        "groups_split": int(len(split)),
        "images_in_groups": int(multi["size"].sum()),
        "images_in_split_groups": int(split["size"].sum()),
    }


def leakage_audit(
    run: RunDir,
    cfg: Config,
    run_benchmark: Callable,
    workers=None,
    scheduler=None,
    show_progress: bool = True,
) -> pd.DataFrame | None:
    """Run ``cfg``'s candidates and ensembles on image-level folds in ``run.leakage_dir``
    (by ``run_benchmark``, the runner's) and write ``DIR/leakage.csv``; returns that table,
    or ``None`` when the dataset has no grouping to remove (one info line) or the audit
    failed (one warning: the grouped run itself is complete and kept)."""
    audit = audit_config(cfg, run.leakage_dir)
    if audit is None:
        info(
            "leakage audit skipped: the dataset has no [data] groups, pairs or group_rule "
            "(its folds are image-level already, apart from exact duplicates)"
        )
        return None
    removed = ", ".join(f"{k} = {v!r}" for k, v in grouping_removed(cfg).items())
    info(
        f"leakage audit: the same candidates on image-level folds (without {removed}) "
        f"in {run.leakage_dir}"
    )
    try:
        image_board = run_benchmark(
            audit, workers=workers, show_progress=show_progress, scheduler=scheduler
        )
        table = compare(run.read_leaderboard(), image_board, cfg.run.metric)
        split = split_groups(run.read_folds_table(), RunDir(run.leakage_dir).read_folds_table())
    except Exception as exc:  # noqa: BLE001 - the grouped run is complete and saved
        warn(f"the leakage audit failed ({type(exc).__name__}: {exc}); the run itself is complete")
        return None
    run.write_leakage(table)
    run.update_manifest(
        leakage_audit={"dir": run.leakage_dir.name, "removed": grouping_removed(cfg), **split}
    )
    best = table.iloc[0]
    m = "accuracy"
    info(
        f"leakage audit: image-level folds split {split['groups_split']} of "
        f"{split['groups']} groups; {best['candidate']} accuracy "
        f"{best[f'grouped_{m}']:.3f} grouped, {best[f'image_level_{m}']:.3f} image-level "
        f"(inflation {best[f'inflation_{m}']:+.3f}); {run.file(run.LEAKAGE_CSV)}"
    )
    return table


def _leakage_stage(ctx: RunContext) -> None:
    leakage_audit(ctx.run, ctx.cfg, ctx.rerun, ctx.workers, ctx.scheduler, ctx.show_progress)


#: ``[report] leakage_audit``: the same entries on image-level folds
STAGE = Stage("leakage_audit", _leakage_stage, lambda ctx: ctx.cfg.report.leakage_audit)
