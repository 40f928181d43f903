"""External validation inside a run: every candidate and ensemble scored on other labs' images.

For each ``[external.NAME]`` that applies to the run's dataset, at the end of ``run``:

* the set is listed and its classes mapped onto the run's (:mod:`bench.data.external_data`), then
  decoded once at the run's image size through the same :class:`core.images.Preprocessing`
  as the training images (an optional seeded, stratified ``max_images`` sample);
* every candidate is the **bag of its fold models** (as the saved predictor uses them),
  run through one fused predictor graph (frozen backbones shared by their fold models);
* every ensemble combines its members with its weights or meta-learner fitted on **all**
  out-of-fold rows (as the saved predictor does);
* each entry is scored over the classes present (accuracy, balanced accuracy, macro-F1,
  ECE, with bootstrap CIs over images or groups: ``[stats] confidence``, ``n_boot_external``,
  ``seed`` and ``ece_bins``, recorded in ``meta.json``'s ``bootstrap``) and per class.

Nothing from the external set is fitted on: it is only scored. Results go to
``external/<NAME>/`` (``scores.csv``, ``per_class.csv``, ``proba/<entry>.npy``,
``meta.json``) and into ``leaderboard.csv`` as ``<NAME>_<metric>`` columns.

A set whose images, labels CSV or class map is not on this machine (a clone without
``../shared``) is skipped with one warning line naming the missing file; the run goes on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import ExternalEntry
from bench.run.context import RunContext, Stage
from bench.data.datasets import stratified_subset
from bench.data.external_data import load_external, map_classes, read_class_map
from bench.run.rundir import RunDir
from bench.stats.scoring import score
from core.candidate import load_candidate
from core.errors import BenchError
from core.images import Preprocessing
from core.metrics import LABEL_METRICS
from core.progress import info, warn
from ensembles.build import final_ensemble
from ensembles.predictor import Predictor

COLUMNS = LABEL_METRICS  # accuracy, balanced accuracy, macro-F1 (core.metrics)


def missing_input(entry: ExternalEntry) -> str | None:
    """The first of an external set's files (images, labels CSV, class map) that does not
    exist, or ``None``."""
    files = [entry.path]
    if entry.labels:
        files.append(entry.labels.rpartition(":")[0])
    if entry.class_map:
        files.append(entry.class_map)
    return next((f for f in files if not Path(f).expanduser().exists()), None)


def load_set(name: str, entry: ExternalEntry, classes: list[str], prep: Preprocessing, seed: int):
    """``(X, y, groups, info)`` of external set ``name`` at the run's image size."""
    ext = load_external(entry.path, labels=entry.labels or None, groups=entry.groups or None)
    user_map, src = read_class_map(entry.class_map or None)
    mapping, _ = map_classes(sorted(set(ext.labels)), classes, user_map, src)
    keep = [i for i, c in enumerate(ext.labels) if mapping.get(c) is not None]
    if not keep:
        raise BenchError(
            f"[external.{name}]: none of its classes "
            f"{sorted(set(ext.labels))} maps onto the run's {classes}"
        )
    y = np.array([classes.index(mapping[ext.labels[i]]) for i in keep])
    n = int(entry.max_images)
    rows = stratified_subset(y, n, seed, min_per_class=1) if 0 < n < len(y) else np.arange(len(y))
    items = [ext.items[keep[r]] for r in rows]
    groups = None if ext.groups is None else [ext.groups[keep[r]] for r in rows]
    X, _, ok, errors = prep.load(items, skip_errors=True)
    for _, exc in errors[:5]:
        warn(f"[external.{name}]: skipped {exc}")
    y = y[rows][ok]
    groups = None if groups is None else [groups[i] for i in ok]
    left = {c: n for c, n in pd.Series(ext.labels).value_counts().items() if mapping.get(c) is None}
    return (
        X,
        y,
        groups,
        {
            "n": int(len(y)),
            "n_unreadable": len(errors),
            "unmapped": {str(k): int(v) for k, v in left.items()},
            "sampled": bool(len(rows) < len(keep)),
            "left_out": ext.left_out,
        },
    )


def bagged_probas(
    run: RunDir, names: list[str], kinds: dict, classes, prep: Preprocessing, X: np.ndarray
) -> dict[str, np.ndarray]:
    """Each candidate's probabilities on ``X``: the mean over its fold models, run in one
    fused graph (:class:`ensembles.predictor.Predictor`)."""
    members = {
        n: [load_candidate(run.unit_model_dir(n, k)) for k in run.folds.fold_ids] for n in names
    }
    manifest = {
        "classes": list(classes),
        "members": [{"name": n, "kind": kinds[n]} for n in names],
        "preprocessing": prep.to_dict(),
    }
    pred = Predictor(manifest, members, ensemble=None, path=run.path)
    out = {}
    for i in range(0, len(X), 512):
        for n, p in zip(names, pred.member_probas(X[i : i + 512])):
            out.setdefault(n, []).append(p)
    return {n: np.concatenate(v) for n, v in out.items()}


def score_external(
    run: RunDir,
    cfg,
    ds,
    board: pd.DataFrame,
    stored: dict,
    kinds: dict,
    folds,
    stressed: dict | None = None,
) -> pd.DataFrame:
    """Score every entry of ``board`` on each applicable external set; returns ``board``
    with ``<set>_<metric>`` columns (also written under ``external/``). ``stored``: the
    out-of-fold probabilities as written to ``oof/`` (what the ensembles are fitted on;
    ``stressed``: the same under each simulated shift, for ``stress = true`` ensembles)."""
    entries = cfg.external
    if not entries:
        return board
    candidates = [n for n in board["candidate"] if n in kinds]
    ensembles = [n for n in board["candidate"] if n not in kinds]
    for name, entry in entries.items():
        gone = missing_input(entry)
        if gone:
            warn(f"external set '{name}' skipped: {gone} not found")
            continue
        t = time.perf_counter()
        X, y, groups, meta = load_set(name, entry, ds.classes, ds.preprocessing, cfg.run.seed)
        info(f"external set '{name}': {meta['n']} images; scoring {len(board)} entries")
        probas = bagged_probas(run, candidates, kinds, ds.classes, ds.preprocessing, X)
        for e in ensembles:
            members, ens = final_ensemble(
                e, "ensemble", cfg.ensembles, stored, kinds, ds.labels, folds, stressed
            )
            probas[e] = ens.combine([probas[m] for m in members])
        rows, per_class = [], []
        for e in board["candidate"]:
            s = score(
                y,
                probas[e],
                list(ds.classes),
                groups=groups,
                stats=cfg.stats,
                n_boot=cfg.stats.n_boot_external,
            )
            rows.append(
                {
                    "candidate": e,
                    **{m: s[m] for m in (*COLUMNS, "ece")},
                    **{f"{m}_lo": s["ci"][m]["lo"] for m in COLUMNS},
                    **{f"{m}_hi": s["ci"][m]["hi"] for m in COLUMNS},
                    **{f"restricted_{m}": s["restricted"][m] for m in COLUMNS},
                }
            )
            per_class += [{"candidate": e, **pc} for pc in s["per_class"]]
            run.write_external_proba(name, e, probas[e])
        scores = pd.DataFrame(rows)
        run.write_external(
            name,
            scores,
            pd.DataFrame(per_class),
            {
                **meta,
                "entry": entry.model_dump(mode="json"),
                "seconds": time.perf_counter() - t,
                "bootstrap": s["bootstrap"],
                "labels": y.tolist(),
            },
        )
        board = board.merge(
            scores[["candidate", *COLUMNS]].rename(columns={m: f"{name}_{m}" for m in COLUMNS}),
            on="candidate",
            how="left",
        )
        best = scores.sort_values("balanced_accuracy", ascending=False).iloc[0]
        info(
            f"external set '{name}': best balanced accuracy {best['balanced_accuracy']:.3f} "
            f"({best['candidate']}); {time.perf_counter() - t:.0f} s"
        )
    return board


def _external_stage(ctx: RunContext) -> None:
    ctx.board = score_external(
        ctx.run, ctx.cfg, ctx.ds, ctx.board, ctx.stored, ctx.kinds, ctx.run.folds, ctx.stored_stress
    )
    ctx.write_board(ctx.cfg.run.metric)


#: ``[external.*]``: before the predictor, whose model card shows these figures
STAGE = Stage("external", _external_stage, lambda ctx: bool(ctx.cfg.external))
