"""Leave-one-lab-out: every entry judged on labs it never saw, ranked by the worst.

A dataset of several labs (``[data] sources``, :mod:`bench.data.sources`) is run twice by
``python -m bench run``:

* the ordinary grouped k-fold over the pooled labs (folds stratified by lab and class):
  the **in-lab** figure, and the fold models the saved predictor is made of (each fitted
  on rows of every lab);
* **leave-one-lab-out** in ``DIR/labs``, an ordinary run directory whose folds are the labs
  (``[run] split = "lab"``): fold k holds lab k's rows; every candidate is tuned,
  early-stopped and fitted, and every ensemble weighted, on the other labs' rows only
  (ensembles are cross-fitted over the folds, :func:`ensembles.base.cross_val_combine_sets`,
  so the combiner of lab k is fitted on the other labs' out-of-lab rows). Every image gets
  an out-of-lab prediction.

:func:`lab_scores` scores each entry's out-of-lab probabilities per held-out lab, over the
classes that lab has (:func:`bench.stats.scoring.score`: accuracy, balanced accuracy, macro-F1,
CIs at ``[stats] confidence`` by a bootstrap over the lab's patients or slides), and
:func:`add_lab_columns` adds to the pooled leaderboard ``<lab>_<metric>`` (with ``_lo`` / ``_hi``),
``worst_lab_<metric>``, ``mean_lab_<metric>``, ``worst_lab`` and ``lab_gap_<metric>``
(pooled in-lab minus the mean over held-out labs), before the predictor is chosen, so
``[run] metric = "worst_lab_balanced_accuracy"`` ranks and chooses by the worst lab. The
long table is ``DIR/labs.csv``.

:func:`adaptation_curve` (``[run] lab_curve``) adds what a lab's own labelled cells buy:
per held-out lab, N = 25 ... 200 of its cells (seeded draws from the half of the lab adapted
on) fit a lab head on each entry's output as ``bench adapt --n N`` does, scored on the lab's
other half: columns ``<lab>_n<N>_balanced_accuracy`` (``n0``: the same half, zero-shot),
``worst_lab_n<N>_balanced_accuracy`` and ``mean_lab_n<N>_balanced_accuracy``; never a
ranking.

With ``[run] lab_adabn``, :func:`adabn_scores` adds a **transductive** figure for the
candidates that declare ``adaptable`` (batch-norm CNNs): each held-out lab's fold model
with its batch-norm statistics re-estimated on that lab's own images (AdaBN, no label),
scored on them: columns ``adabn_<lab>_balanced_accuracy`` and
``adabn_worst_lab_balanced_accuracy``. It uses the test lab's images, so it is never the
headline or the ranking; it says what adapting to a new lab's unlabelled images would buy.

The runner calls :func:`leave_one_lab_out` with its own ``run_benchmark`` (passed in, as for
:mod:`bench.protocols.leakage`, so this module does not import the runner).
"""

from __future__ import annotations

import os
from typing import Callable

from joblib import Parallel, delayed

import numpy as np
import pandas as pd

from bench.config import Config, StatsSection
from bench.run.context import RunContext, Stage
from bench.run.rundir import RunDir
from bench.stats.scoring import score
from core import registry
from bench.stats.draws import adaptation_rows, draw
from core import labhead
from core.conformal import few_cell_sets
from core.candidate import load_candidate, predict_proba_for, release_memory
from core.metrics import LAB_METRICS, LAB_SUMMARIES, base_metric, metric_sort_ascending
from core.progress import info, progress_iter
from features import extract_central


def is_multi_lab(cfg: Config) -> bool:
    return bool(cfg.data.sources)


def runs_lolo(cfg: Config) -> bool:
    """Whether ``run`` adds the leave-one-lab-out run: several labs, pooled k-fold folds,
    ``[run] leave_one_lab_out``."""
    return is_multi_lab(cfg) and cfg.run.split == "kfold" and cfg.run.leave_one_lab_out


def lolo_config(cfg: Config, out) -> Config:
    """``cfg`` for the leave-one-lab-out run in ``out``: one fold per lab, ranked by the
    fold metric, no report, external sets, leakage audit or studies shared with the
    pooled run (SQLite in ``out``: the study names ``NAME-foldK`` would clash)."""
    return cfg.derive(
        run={
            "out": str(out),
            "split": "lab",
            "leave_one_lab_out": False,
            "lab_adabn": False,
            "metric": base_metric(cfg.run.metric),
        },
        report={"enabled": False, "leakage_audit": False},
        external={},
        tuning={"storage": ""},
    )


def _metric_cells(sc: dict, prefix: str = "") -> dict:
    """``<prefix><m>``, ``_lo`` and ``_hi`` of each lab metric of a :func:`score` result."""
    return {
        f"{prefix}{m}{suffix}": v
        for m in LAB_METRICS
        for suffix, v in (("", sc[m]), ("_lo", sc["ci"][m]["lo"]), ("_hi", sc["ci"][m]["hi"]))
    }


def lab_scores(
    table: pd.DataFrame,
    classes: list[str],
    probas: dict[str, np.ndarray],
    stats: StatsSection | None = None,
    n_boot: int | None = None,
) -> pd.DataFrame:
    """One row per entry and held-out lab: ``n``, ``n_groups``, ``classes_present`` and,
    per metric of :data:`core.metrics.LAB_METRICS`, the value over the lab's classes and
    its bootstrap interval over the lab's groups (``_lo`` / ``_hi``).

    ``table``: the leave-one-lab-out run's ``folds.csv`` (``domain``, ``label``, ``group``);
    ``probas``: each entry's out-of-lab probabilities, rows aligned with it; ``stats``: the
    run's ``[stats]`` (level, resamples, seed; default: its defaults), ``n_boot`` other
    resamples than ``stats.n_boot``."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[str(c)] for c in table["label"]], dtype=np.int64)
    rows = []
    for name, proba in probas.items():
        for lab in dict.fromkeys(table["domain"]):
            sel = (table["domain"] == lab).to_numpy()
            groups = table["group"].to_numpy()[sel]
            sc = score(y[sel], proba[sel], classes, groups=groups, stats=stats, n_boot=n_boot)
            rows.append(
                {
                    "entry": name,
                    "lab": lab,
                    "n": int(sel.sum()),
                    "n_groups": int(len(np.unique(groups))),
                    "classes_present": ";".join(sc["present_classes"]),
                    **_metric_cells(sc),
                }
            )
    return pd.DataFrame(rows)


def adabn_scores(
    lab_run: RunDir, names: list[str], stats: StatsSection | None = None
) -> pd.DataFrame:
    """One row per adaptable candidate of ``names`` and held-out lab: ``adabn_<metric>``
    (and ``_lo`` / ``_hi``) of its fold model adapted on the lab's images (see the module
    docstring)."""
    cfg = lab_run.config
    registry.import_plugins(cfg.run.plugins)
    table, classes, y = lab_run.folds_table, lab_run.classes, lab_run.labels
    rows = []
    for name in names:
        if name not in cfg.candidates or not registry.get(cfg.candidates[name].type).adaptable:
            continue
        for k, _, test in lab_run.folds:
            cand = load_candidate(lab_run.unit_model_dir(name, k))
            X = np.asarray(lab_run.images[test])
            cand.adapt(X)
            proba = predict_proba_for(cand, X, np.arange(len(classes)))
            del cand
            release_memory()
            sc = score(y[test], proba, classes, groups=table["group"].to_numpy()[test], stats=stats)
            rows.append(
                {
                    "entry": name,
                    "lab": str(table["domain"].iloc[test[0]]),
                    **_metric_cells(sc, "adabn_"),
                }
            )
    return pd.DataFrame(rows)


def _balanced_accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (the full argmax, as the lab columns)."""
    pred = proba.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def adaptation_curve(
    table: pd.DataFrame,
    classes: list[str],
    probas: dict[str, np.ndarray],
    ns: list[int],
    draws: int,
    seed: int = 0,
    show_progress: bool = False,
    features: np.ndarray | None = None,
    sets: tuple[str, float] | None = None,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """The leave-one-lab-out adaptation curve: per entry, held-out lab and draw, the lab's
    rows split as ``bench adapt`` splits a set (:func:`bench.stats.draws.adaptation_rows`:
    half adapted on, whole patients or slides, the other half scored); from the adapted
    half, N labelled cells (stratified, :func:`bench.stats.draws.draw`) fit a lab head on
    the entry's out-of-lab output and the cells' ``features`` (:func:`core.labhead.fit`,
    standardised on the adapted half, as ``bench adapt --n N``; ``None``: the output
    only), and the scored half is scored before (``n0``) and after. One row per entry and
    lab: ``n<N>_balanced_accuracy`` the mean over the ``draws`` draws, ``_lo`` / ``_hi``
    their range, and ``n<N>_head_share`` the share of draws whose head read the features.
    With ``sets`` (``(method, confidence, raps_lambda, raps_k)``), prediction sets are calibrated on the head's
    cross-fitted outputs of the N cells (whole slides or patients out, where the lab has
    them) as ``bench adapt --n N`` calibrates them
    (:func:`core.conformal.few_cell_sets`), and ``n<N>_coverage`` is the share of the
    scored half whose set holds its class (mean over the draws; NaN where N is too few).
    The scored half never enters a fit. Entries run in ``n_jobs`` processes (default
    ``$BLOODBENCH_JOBS`` or all cores)."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[str(c)] for c in table["label"]], dtype=np.int64)
    labs = list(dict.fromkeys(table["domain"]))
    splits = {}
    for lab in labs:
        rows = np.flatnonzero((table["domain"] == lab).to_numpy())
        groups = table["group"].to_numpy()[rows]
        grouped = len(np.unique(groups)) < len(rows)  # patients or slides, else images
        for d in range(draws):
            used, scored = adaptation_rows(
                len(rows), groups if grouped else None, len(rows), seed + d
            )
            picks = {}
            for n in ns:
                if n <= len(used):
                    picked, _ = draw([str(v) for v in y[rows[used]]], None, n, seed + d)
                    picks[n] = rows[used[picked]]
            splits[(lab, d)] = (rows[scored], picks, rows[used], grouped)
    jobs = n_jobs or int(os.environ.get("BLOODBENCH_JOBS", 0)) or os.cpu_count() or 1
    run = Parallel(n_jobs=min(jobs, len(probas)) or 1, return_as="generator")(
        delayed(_curve_rows)(
            name, proba, y, labs, splits, ns, draws, seed, features, sets, table["group"]
        )
        for name, proba in probas.items()
    )
    out = []
    for rows in progress_iter(
        run, total=len(probas), desc="adaptation curve", enabled=show_progress
    ):
        out += rows
    return pd.DataFrame(out)


def _curve_rows(
    name, proba, y, labs, splits, ns, draws, seed, features, sets, groups
) -> list[dict]:
    """One entry's rows of :func:`adaptation_curve`."""
    groups = np.asarray(groups)
    out = []
    for lab in labs:
        got: dict[int, list[float]] = {0: [], **{n: [] for n in ns}}
        heads: dict[int, list[bool]] = {n: [] for n in ns}
        cover: dict[int, list[float]] = {n: [] for n in ns}
        for d in range(draws):
            scored, picks, used, grouped = splits[(lab, d)]
            got[0].append(_balanced_accuracy(y[scored], proba[scored]))
            for n, drawn in picks.items():
                fitted = labhead.fit(
                    proba[drawn],
                    None if features is None else features[drawn],
                    y[drawn],
                    reference=None if features is None else features[used],
                    seed=seed + d,
                    groups=groups[drawn] if grouped else None,
                )
                scored_x = None if features is None else features[scored]
                adapted = fitted.head.apply(proba[scored], scored_x)
                got[n].append(_balanced_accuracy(y[scored], adapted))
                heads[n].append(fitted.head.uses_features)
                state = few_cell_sets(fitted.oof, y[drawn], *sets) if sets else None
                if state is not None:
                    held = state.sets(adapted)[np.arange(len(scored)), y[scored]]
                    cover[n].append(float(np.mean(held)))
        row = {"entry": name, "lab": lab}
        for n, vals in got.items():
            key = f"n{n}_balanced_accuracy"
            row[key] = float(np.mean(vals)) if vals else np.nan
            row[f"{key}_lo"] = float(np.min(vals)) if vals else np.nan
            row[f"{key}_hi"] = float(np.max(vals)) if vals else np.nan
            if n:
                row[f"n{n}_head_share"] = float(np.mean(heads[n])) if heads[n] else np.nan
                if sets:
                    row[f"n{n}_coverage"] = float(np.mean(cover[n])) if cover[n] else np.nan
        out.append(row)
    return out


def _or_none(v) -> float | None:
    """A number for JSON: ``None`` for a missing or NaN value."""
    return None if v is None or not np.isfinite(float(v)) else float(v)


def curve_sizes(columns) -> list[int]:
    """The N of the adaptation curve's columns (``n<N>_balanced_accuracy``), 0 first."""
    found = {
        int(c[1:].split("_", 1)[0])
        for c in columns
        if c.startswith("n")
        and c.endswith("_balanced_accuracy")
        and c[1:].split("_", 1)[0].isdigit()
    }
    return sorted(found)


def add_lab_columns(board: pd.DataFrame, scores: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``board`` with the per-lab, worst-lab, mean-lab and gap columns of ``scores``
    (:func:`lab_scores`) for the entries it has, sorted by ``metric`` (a fold metric or
    ``worst_lab_<m>`` / ``mean_lab_<m>``); entries the leave-one-lab-out run lacks get NaN."""
    board = board.copy()
    labs = list(dict.fromkeys(scores["lab"]))
    by = scores.set_index(["entry", "lab"])

    def per_lab(*cols: str, prefix: str = "") -> np.ndarray:
        """Set ``<prefix><lab>_<col>`` from ``scores[<prefix><col>]`` for each lab and
        column (in that order); returns (entries x labs) of the first column."""
        for lab in labs:
            for col in cols:
                board[f"{prefix}{lab}_{col}"] = [
                    float(by.loc[(e, lab), prefix + col]) if (e, lab) in by.index else np.nan
                    for e in board["candidate"]
                ]
        return board[[f"{prefix}{lab}_{cols[0]}" for lab in labs]].to_numpy(dtype=float)

    for m in LAB_METRICS:
        values = per_lab(m, f"{m}_lo", f"{m}_hi")
        board[f"worst_lab_{m}"] = np.min(values, axis=1)
        board[f"mean_lab_{m}"] = np.mean(values, axis=1)
        board[f"lab_gap_{m}"] = board[m] - board[f"mean_lab_{m}"]
    if labs:
        values = board[[f"{lab}_balanced_accuracy" for lab in labs]].to_numpy(dtype=float)
        board["worst_lab"] = [
            labs[int(np.nanargmin(r))] if np.isfinite(r).any() else "" for r in values
        ]
    for n in curve_sizes(scores.columns):  # the adaptation curve: own columns, never a ranking
        values = per_lab(
            f"n{n}_balanced_accuracy", f"n{n}_balanced_accuracy_lo", f"n{n}_balanced_accuracy_hi"
        )
        board[f"worst_lab_n{n}_balanced_accuracy"] = np.min(values, axis=1)
        board[f"mean_lab_n{n}_balanced_accuracy"] = np.mean(values, axis=1)
        if f"n{n}_coverage" in scores:  # of the sets calibrated on the N cells
            board[f"worst_lab_n{n}_coverage"] = np.min(per_lab(f"n{n}_coverage"), axis=1)
    if "adabn_balanced_accuracy" in scores:  # transductive: its own columns, never a ranking
        board["adabn_worst_lab_balanced_accuracy"] = np.min(
            per_lab("balanced_accuracy", prefix="adabn_"), axis=1
        )
    return board.sort_values(
        metric, ascending=metric_sort_ascending(metric), kind="stable"
    ).reset_index(drop=True)


def lab_summary(board_row, labs: list[str]) -> dict:
    """The per-lab out-of-lab figures of one leaderboard row (the predictor's manifest)."""
    out = {
        "labs": {},
        "protocol": "leave-one-lab-out: each lab held out in turn, every fit, "
        "tuning and ensemble weight on the other labs",
    }
    for lab in labs:
        out["labs"][lab] = {
            m: {
                "value": float(board_row[f"{lab}_{m}"]),
                "ci": [float(board_row[f"{lab}_{m}_lo"]), float(board_row[f"{lab}_{m}_hi"])],
            }
            for m in LAB_METRICS
        }
    for s in LAB_SUMMARIES:
        out[f"{s}_lab"] = {m: float(board_row[f"{s}_lab_{m}"]) for m in LAB_METRICS}
    out["in_lab"] = {m: float(board_row[m]) for m in LAB_METRICS}
    out["worst_lab_name"] = str(board_row.get("worst_lab", ""))
    sizes = (
        curve_sizes(c[len(labs[0]) + 1 :] for c in board_row.index if c.startswith(f"{labs[0]}_n"))
        if labs
        else []
    )
    if sizes:  # the adaptation curve: labelled cells of the lab -> balanced accuracy
        out["adaptation_curve"] = {
            "labelled_cells": sizes,
            "method": "a lab head (output and cell features, core.labhead) fitted on N "
            "labelled cells of the held-out lab's adapted half (bench adapt --n N), scored "
            "on its other half; mean of the draws",
            "labs": {
                lab: [float(board_row[f"{lab}_n{n}_balanced_accuracy"]) for n in sizes]
                for lab in labs
            },
            "worst_lab": [float(board_row[f"worst_lab_n{n}_balanced_accuracy"]) for n in sizes],
        }
        if f"{labs[0]}_n{sizes[-1]}_coverage" in board_row.index:
            out["adaptation_curve"]["coverage"] = {
                lab: [_or_none(board_row.get(f"{lab}_n{n}_coverage")) for n in sizes if n]
                for lab in labs
            }
    return out


def lab_names(cfg: Config) -> list[str]:
    """The labs of a multi-lab dataset, in the order its sources list them."""
    return [src.domain for src in cfg.data.sources]


def has_lab_columns(board: pd.DataFrame, labs: list[str]) -> bool:
    return bool(labs) and all(f"{lab}_{LAB_METRICS[0]}" in board for lab in labs)


def leave_one_lab_out(
    run: RunDir,
    cfg: Config,
    board: pd.DataFrame,
    run_benchmark: Callable,
    workers=None,
    scheduler=None,
    show_progress: bool = True,
):
    """Run ``cfg``'s candidates and ensembles leave-one-lab-out in ``run.labs_dir`` (by
    ``run_benchmark``, the runner's), write ``DIR/labs.csv`` and return ``(board with the
    lab columns, the long table)``."""
    sub = lolo_config(cfg, run.labs_dir)
    info(f"leave-one-lab-out over {len(cfg.data.sources)} labs in {run.labs_dir}")
    run_benchmark(
        sub, workers=workers, show_progress=show_progress, scheduler=scheduler, predictor=False
    )
    lab_run = RunDir(run.labs_dir)
    lab_board = lab_run.read_leaderboard()
    probas = {
        n: lab_run.read_oof(n) for n in board["candidate"] if n in set(lab_board["candidate"])
    }
    scores = lab_scores(lab_run.folds_table, lab_run.classes, probas, stats=cfg.stats)
    if cfg.run.lab_curve:
        head = cfg.predictor.adapt_features
        info(
            f"adaptation curve per held-out lab: N = {list(cfg.run.lab_curve)} labelled cells, "
            f"{cfg.run.lab_curve_draws} draws, a lab head on the output"
            + (f" and the '{head}' features" if head else "")
            + " (bench adapt --n)"
        )
        feats = (
            extract_central(
                lab_run.images,
                cfg.feature_sets[head],
                cfg.predictor.adapt_crop,
                progress=show_progress,
            )
            if head
            else None
        )
        curve = adaptation_curve(
            lab_run.folds_table,
            lab_run.classes,
            probas,
            list(cfg.run.lab_curve),
            int(cfg.run.lab_curve_draws),
            seed=int(cfg.run.seed),
            show_progress=show_progress,
            features=feats,
            sets=(
                cfg.predictor.conformal.method,
                float(cfg.predictor.conformal.confidence),
                float(cfg.predictor.conformal.raps_lambda),
                int(cfg.predictor.conformal.raps_k),
            ),
        )
        scores = scores.merge(curve, on=["entry", "lab"], how="left")
    if cfg.run.lab_adabn:
        info(
            "AdaBN per held-out lab (transductive: batch-norm statistics of each lab's own images)"
        )
        adapted = adabn_scores(lab_run, list(probas), stats=cfg.stats)
        if len(adapted):
            scores = scores.merge(adapted, on=["entry", "lab"], how="left")
    run.write_labs(scores)
    return add_lab_columns(board, scores, cfg.run.metric), scores


def _lolo_stage(ctx: RunContext) -> None:
    # before the predictor: it may be chosen by the worst held-out lab
    ctx.board, _ = leave_one_lab_out(
        ctx.run, ctx.cfg, ctx.board, ctx.rerun, ctx.workers, ctx.scheduler, ctx.show_progress
    )
    ctx.write_board(ctx.cfg.run.metric)


#: ``[run] leave_one_lab_out`` with several labs: the lab columns of the leaderboard
STAGE = Stage("leave_one_lab_out", _lolo_stage, lambda ctx: runs_lolo(ctx.cfg))
