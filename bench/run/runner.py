"""``python -m bench run``: the stages, in order.

dataset -> folds -> candidates' ``prepare`` (:func:`bench.run.prepare.prepare_run`) -> the
:data:`STAGES`: work units (candidate x fold) -> out-of-fold probabilities -> ensembles ->
leaderboard -> the protocols each run has (stress, leave-one-lab-out, patients, external
sets) -> predictor -> report.

Each stage is a :class:`bench.run.context.Stage`; a protocol's lives in its own module beside
its work. ``run_benchmark`` walks the list with one :class:`bench.run.context.RunContext`. The
runner knows no model by name: candidates and ensembles come from the config and the
registry. The run directory is read and written through :class:`bench.run.rundir.RunDir`; a
work unit is :func:`bench.run.units.run_unit`; ensembles are scored and chosen by
:mod:`ensembles.build`. A second ``run`` on the same directory skips finished units.
"""

from __future__ import annotations

import datetime as _dt
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from bench.commands.outputs import check_writable, run_lock
from bench.config import Config, data_argument, load_config
from bench.data.datasets import Dataset
from bench.protocols import distill, external, labs, leakage, patients, stress
from bench.report import report_after_run
from bench.run import saving
from bench.run.context import RunContext, Stage
from bench.run import tracking
from bench.run.leaderboard import ensemble_costs, make_table, set_roles
from bench.run.prepare import check_out, prepare_run
from bench.run.rundir import RunDir
from bench.run.scheduling import make_executor
from bench.run.tuning import open_storages, tuning_column
from bench.run.units import run_unit
from bench.stats import conformal_sets as conformal
from core import registry
from core.metrics import summarize
from core.progress import info, stage, unit_progress, warn
from core.splits import PredefinedFolds
from ensembles.build import evaluate_ensembles


# ----------------------------------------------------------------------------- stages


def _units_stage(ctx: RunContext) -> None:
    """Every unfinished work unit (candidate x fold), in local processes or on Dask."""
    cfg, run = ctx.cfg, ctx.run
    # an absolute path: Dask workers elsewhere see the run directory on a shared file system
    units = [(str(run.path.resolve()), n, k) for n in cfg.candidates for k in range(cfg.run.folds)]
    todo = [u for u in units if not run.unit_done(u[1], u[2], ctx.fp["candidates"][u[1]])]
    # the longest first (CNNs before feature models), so both cores stay busy to the end;
    # results do not depend on the order (each unit is seeded by the run seed and its fold)
    kind = {n: registry.get(e.type).kind for n, e in cfg.candidates.items()}
    todo.sort(key=lambda u: kind[u[1]] != "cnn")
    if len(todo) < len(units):
        info(f"resuming: {len(units) - len(todo)} of {len(units)} work units already done")
    open_storages(cfg, {u[1] for u in todo}, run.path)
    executor = make_executor(
        ctx.workers or cfg.run.workers, scheduler=ctx.scheduler or cfg.run.scheduler
    )
    with unit_progress(len(todo), "work units") as advance:
        for args, res in executor.map_unordered(run_unit, todo):
            advance(f"{args[1]} fold {args[2]}: acc {res['metrics']['accuracy']:.3f}")


def _ensembles_stage(ctx: RunContext) -> None:
    """The candidates' out-of-fold rows, every ensemble fitted and scored on them, the
    leaderboard (earlier outputs moved aside when it changed)."""
    cfg, run, ds = ctx.cfg, ctx.run, ctx.ds
    folds, shifts = run.folds, stress.stress_shifts(cfg)
    rows, oofs, ctx.kinds = _collect(run, cfg, ds, folds)
    stressed = stress.collect_stress(run, list(cfg.candidates), shifts) if shifts else None
    ens_rows, ens_oofs, ens_stressed = evaluate_ensembles(
        cfg.ensembles, oofs, ctx.kinds, ds.labels, folds, warn, stressed
    )
    by_name = {r["candidate"]: r for r in rows}
    for r in ens_rows:
        r.update(
            ensemble_costs(
                [by_name[m] for m in r["members"].split(";")], r["combine_seconds"], r["n_folds"]
            )
        )
        run.write_oof(r["candidate"], ens_oofs[r["candidate"]])
    if shifts:
        stressed = {s: stressed[s] | ens_stressed[s] for s in shifts}
        for s, by_name_s in ens_stressed.items():
            for n, p in by_name_s.items():
                run.write_stress_oof(n, s, p)
        stress.add_stress_columns(rows + ens_rows, stressed, ds.labels, folds, ctx.fold_metric)
    conformal.add_leaderboard_columns(
        rows + ens_rows, oofs | ens_oofs, ds.labels, folds, cfg.predictor.conformal
    )
    ctx.board = set_roles(
        make_table(rows + ens_rows, ctx.fold_metric), cfg.colour_only_candidates()
    )
    moved = run.keep_previous_outputs(ctx.board)
    if moved:
        info(
            f"the leaderboard changed: the previous leaderboard, predictor and report "
            f"were moved to {moved}"
        )
    ctx.write_board(ctx.fold_metric)
    ctx.store(oofs | ens_oofs, stressed)


def _report_stage(ctx: RunContext) -> None:
    """The run is finished (its manifest says when); then its report, whose failure keeps
    the run."""
    ctx.run.update_manifest(
        stage_seconds=ctx.times,
        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    report = {}
    with stage(report, "report_seconds"):
        written = report_after_run(ctx.run.path, ctx.cfg)
    if written is not None:
        ctx.run.update_manifest(**report)


#: the stages of ``bench run``, in order: a new protocol is one module, one entry here and
#: one config section
STAGES: list[Stage] = [
    Stage("units", _units_stage),
    stress.STAGE,
    Stage("ensembles_and_leaderboard", _ensembles_stage),
    labs.STAGE,
    patients.STAGE,
    external.STAGE,
    saving.STAGE,
    distill.STAGE,
    leakage.STAGE,
    Stage("report", _report_stage, timed=False),
    tracking.STAGE,
]


# ----------------------------------------------------------------------------- running


def run_benchmark(
    cfg: Config,
    force: bool = False,
    workers: int | None = None,
    show_progress: bool = True,
    scheduler=None,
    predictor: bool = True,
) -> pd.DataFrame:
    """Run the whole benchmark described by ``cfg``; returns the leaderboard.

    Work units run in ``workers`` local processes, or on the Dask cluster ``scheduler``
    (``tcp://HOST:PORT``, a ``distributed.Client`` or ``LocalCluster``) when it is given.
    ``predictor=False``: no predictor is saved (the leave-one-lab-out run of bench.protocols.labs).
    """
    out = RunDir(Path(cfg.run.out).expanduser())
    check_out(out, force)  # before the folder is made, so --force moves aside the user's
    made = not out.path.exists()
    check_writable(out.path, "--out")
    try:
        with ExitStack() as locks:
            locks.enter_context(run_lock(out.path, "bench run"))
            inode = os.stat(out.path).st_ino
            run, ds, fp, times = prepare_run(cfg, force, show_progress)
            if os.stat(run.path).st_ino != inode:  # --force moved another run aside
                locks.enter_context(run_lock(run.path, "bench run"))
            ctx = RunContext(
                cfg,
                run,
                ds,
                fp,
                rerun=run_benchmark,
                workers=workers,
                scheduler=scheduler,
                show_progress=show_progress,
                predictor=predictor,
                times=times,
            )
            for st in STAGES:
                if st.enabled(ctx):
                    with stage(times, st.name) if st.timed else ExitStack():
                        st.run(ctx)
            return ctx.board
    except BaseException:
        _drop_if_empty(out.path, made)
        raise


def _drop_if_empty(path: Path, made: bool) -> None:
    """A refused run leaves no trace: the ``--out`` folder this run made, still empty, goes."""
    if made and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _collect(run: RunDir, cfg: Config, ds: Dataset, folds: PredefinedFolds):
    """Candidates' out-of-fold probabilities (written to ``oof/``) and leaderboard rows."""
    rows, oofs, kinds = [], {}, {}
    for name in cfg.candidates:
        oof = np.zeros((len(ds), len(ds.classes)), dtype=np.float64)
        results = []
        for k, _, test in folds:
            oof[test] = run.unit_proba(name, k)
            results.append(run.unit_result(name, k))
        run.write_oof(name, oof)
        oofs[name], kinds[name] = oof, results[0]["kind"]
        rows.append(
            {
                "candidate": name,
                "kind": results[0]["kind"],
                **summarize([r["metrics"] for r in results]),
                "fit_seconds": float(np.mean([r["fit_seconds"] for r in results])),
                "tune_seconds": float(np.sum([r["tune_seconds"] for r in results])),
                "tuning": tuning_column([r.get("tuning") for r in results]),
                "predict_ms_per_image": float(
                    np.mean([r["predict_ms_per_image"] for r in results])
                ),
                "model_size": results[0]["model_size"],
                "n_folds": len(results),
            }
        )
    return rows, oofs, kinds


# ----------------------------------------------------------------------------- commands


def cli_data(data, config):
    """``--data`` (:func:`bench.config.data_argument`): a path from cwd, or a dataset's name."""
    path, name = data_argument(data, config) if data else (None, data)
    return str(path.resolve()) if path is not None else name


def run_from_args(
    config=None,
    profile=None,
    data=None,
    out=None,
    only=None,
    force=False,
    workers=None,
    show_progress=True,
    scheduler=None,
    storage=None,
) -> tuple[pd.DataFrame, Path]:
    cfg = load_config(config, profile=profile, data=cli_data(data, config), only=only, out=out)
    if storage:
        cfg.override("tuning", storage=storage)
    board = run_benchmark(
        cfg, force=force, workers=workers, show_progress=show_progress, scheduler=scheduler
    )
    return board, Path(cfg.run.out)


__all__ = ["run_benchmark", "run_from_args", "run_unit", "prepare_run"]
