"""``python -m bench run``: the order of the stages.

dataset -> folds -> candidates' ``prepare`` -> work units (candidate x fold) ->
out-of-fold probabilities -> ensembles -> leaderboard -> predictor -> report.

The runner knows no model by name: candidates and ensembles come from the config and
the registry. The run directory is read and written through :class:`bench.rundir.RunDir`;
a work unit is :func:`bench.units.run_unit`; ensembles are scored and chosen by
:mod:`ensembles.build`. A second ``run`` on the same directory skips finished units.
"""

from __future__ import annotations

import datetime as _dt
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from bench import conformal
from bench.config import Config, data_argument, load_config
from bench.datasets import Dataset
from bench.distill import distilled_row
from bench.external import score_external
from bench.stress import add_stress_columns, collect_stress, complete_stress, stress_shifts
from bench.folds import (folds_hash, folds_table, lab_folds, make_bag_folds, make_folds,
                         make_groups, read_bags)
from bench.leaderboard import ensemble_costs, make_table, to_markdown
from bench.labs import has_lab_columns, lab_names, lab_summary, leave_one_lab_out, runs_lolo
from bench.leakage import leakage_audit
from bench.outputs import check_writable, run_lock
from bench.sources import prepare_data, with_bag_colour
from bench.patients import bag_settings, check_cell_types, check_mil, score_patients
from bench.prepare import prepare_candidates
from bench.report import report_after_run
from bench.rundir import RunDir
from bench.scheduling import make_executor
from bench.tuning import candidate_tuning, open_storages, tuning_column
from bench.units import run_unit, tune_unit
from core import registry
from core.calibration import fit_temperature
from core.errors import BenchError
from core.io import git_commit, hardware, package_versions, stable_hash
from core.metrics import base_metric, summarize
from core.progress import info, stage, unit_progress, warn
from core.shift import ShiftReference
from core.splits import PredefinedFolds
from ensembles.build import choose_entry, evaluate_ensembles, final_ensemble
from ensembles.predictor import save_predictor


# ----------------------------------------------------------------------------- preparing

def _fingerprint(cfg: Config, ds: Dataset, fhash: str) -> dict:
    data = {k: v for k, v in cfg["data"].items()
            if k not in ("path", "cache_dir", "fallback", "same_as")}
    run = {k: cfg["run"][k] for k in ("seed", "folds")}
    tuning = {k: v for k, v in cfg["tuning"].items() if k != "storage"}   # where, not what
    shared = {"data": data, "run": run, "tuning": tuning}
    if cfg["patients"]["bag_jitter"]:   # changes what every unit trains on
        shared["bag_jitter"] = cfg["patients"]["bag_jitter"]
    return {"shared": stable_hash(shared), "dataset": ds.content_hash, "folds": fhash,
            "candidates": {n: stable_hash(e) for n, e in cfg.candidates.items()}}


def _check_out(run: RunDir, force: bool) -> None:
    """Before any work: ``--out`` is a folder, and a non-empty one that holds no run is
    refused, or (``--force``) moved aside whole. Nothing is ever deleted."""
    if run.path.exists() and not run.path.is_dir():
        raise BenchError(f"--out {run.path} is a file, not a folder")
    if not run.is_run() and run.path.exists() and any(run.path.iterdir()):
        if not force:
            raise BenchError(f"{run.path} exists and is not a bloodbench run; "
                             "choose another --out, or --force to move it aside")
        info(f"--force: moved the existing folder aside to {run.archive()}")


def _check_resume(run: RunDir, fp: dict, force: bool, names: list[str]) -> None:
    """Resume, refuse, or (``--force``) archive a run made with other data or settings;
    refuse a run of ``names`` that leaves out candidates of a finished run."""
    if not run.is_run():
        return
    old = run.read_state()["fingerprint"]
    changed = [k for k in ("dataset", "folds", "shared") if old.get(k) != fp[k]]
    changed += [f"candidate '{n}'" for n, h in fp["candidates"].items()
                if n in old.get("candidates", {}) and old["candidates"][n] != h]
    if changed and not force:
        raise BenchError(f"{run.path} holds a run with a different {', '.join(changed)}; "
                         "use another --out, or --force to archive it and start again")
    if changed and force:
        info(f"--force: archived the previous run to {run.archive()}")
        return
    board = run.file(run.LEADERBOARD_CSV)
    if board.is_file():   # a finished run: its leaderboard, predictor and report are kept
        done = pd.read_csv(board)
        missing = sorted(set(done["candidate"][~done["kind"].isin(["ensemble", "distilled"])])
                         - set(names))   # bench distill's row is not a candidate
        if missing:
            raise BenchError(
                f"{run.path} holds a finished run with {missing}, which this run leaves out "
                "(--only or select): its leaderboard, predictor and report would be replaced "
                "by a subset's. Use another --out (finished units are not shared), or --force "
                "to archive the finished run first")


def _manifest(cfg: Config, ds: Dataset, data_path, table, fhash, group_info) -> dict:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_path": str(data_path),
        "dataset": ds.summary(),
        "grouping": group_info,
        "folds": {"scheme": ("leave-one-lab-out: one fold per lab" if cfg["run"]["split"] == "lab"
                             and "domain" in table else "StratifiedGroupKFold(shuffle=True)" + (
                      " over bags, stratified by the bags' labels" if "bag" in table else
                      " stratified by lab and class" if "domain" in table else "")),
                  "n_folds": cfg["run"]["folds"],
                  "seed": cfg["run"]["seed"], "hash": fhash,
                  "counts": table.groupby("fold").size().to_dict()},
        "tuning": {"trials": cfg["tuning"]["trials"],
                   "scheme": "per outer fold, an Optuna study scored on an inner validation "
                             "split of that fold's training rows only (the evaluated fold "
                             "never scores a trial)"},
        "seeds": {"run": cfg["run"]["seed"], "unit": "run seed + fold number"},
        "profile": cfg.profile,
        "config_hash": stable_hash(cfg.data),
        "versions": package_versions(),
        "hardware": hardware(),
        "git_commit": git_commit(),
    }


def prepare_run(cfg: Config, force: bool = False, show_progress: bool = True):
    """Load the data, make the folds and write the run directory's files; no unit runs.

    Returns ``(run, dataset, fingerprint, stage_seconds)``. ``run`` and ``tune`` both
    start here, so every process sees the same data and folds.
    """
    times = {}
    with stage(times, "data_and_folds"):
        registry.import_plugins(cfg["run"]["plugins"])
        for e in [*cfg.candidates.values(), *cfg.ensembles.values()]:
            registry.get(e["type"])
        if not cfg.candidates:
            raise BenchError("no candidates to run (check the profile's select and --only)")
        run = RunDir(Path(cfg["run"]["out"]).expanduser())
        _check_out(run, force)
        ds, data_path = prepare_data(cfg, show_progress)
        data = cfg["data"]
        groups, group_info = make_groups(ds, cfg.path(data["groups"]),
                                         cfg.path(data["pairs"]), data["group_rule"],
                                         preset=ds.group_keys)
        bags = None
        if ds.domains and cfg["run"]["split"] == "lab":   # one fold per lab
            folds = lab_folds(ds.domains, groups)
            cfg.override("run", folds=int(folds.max()) + 1)
        elif data["bags"]:   # whole bags (patients) in a fold, stratified by the bags' labels
            if data["positive"] not in ds.classes:
                raise BenchError(f"[data] positive '{data['positive']}' is not a class of the "
                                 f"data {ds.classes}")
            bags = read_bags(ds, cfg.path(data["groups"]))
            folds = make_bag_folds(ds.labels, bags, groups, cfg["run"]["folds"],
                                   cfg["run"]["seed"], ds.classes)
            group_info["bags"] = int(len(np.unique(bags)))
            # each bag's cells colour-normalised together, before any candidate sees them
            ds = with_bag_colour(ds, bags, cfg["patients"]["bag_colour"])
            if "composition" in cfg["patients"]["aggregators"] or data["disease_cells"]:
                check_cell_types(cfg, ds, group_info["bags"])   # before any unit runs
            if "attention" in cfg["patients"]["aggregators"]:
                check_mil(cfg)
        else:
            folds = make_folds(ds.labels, groups, cfg["run"]["folds"], cfg["run"]["seed"],
                               ds.classes, ds.domains)
        table = folds_table(ds, groups, folds, bags)
        fhash = folds_hash(table)
    fp = _fingerprint(cfg, ds, fhash)
    _check_resume(run, fp, force, list(cfg.candidates))
    same_images = False
    if run.is_run():   # keep candidates of earlier runs in the state
        old = run.read_state()["fingerprint"]
        fp["candidates"] = {**old["candidates"], **fp["candidates"]}
        same_images = run.images_file.is_file() and old["dataset"] == ds.content_hash
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    run.write_folds(table)
    if not same_images:
        run.write_images(ds.images)
    run.write_state({"fingerprint": fp, "classes": ds.classes})
    run.write_manifest(_manifest(cfg, ds, data_path, table, fhash, group_info))

    with stage(times, "prepare"):
        # with [stress], the shifted images too: a work unit then finds the embeddings of the
        # images it scores under shift cached, and never loads a backbone for them
        per_candidate = prepare_candidates(cfg.candidates, ds.images, cfg["run"]["plugins"],
                                           stress_shifts(cfg), int(cfg["run"]["seed"]))
    run.update_manifest(prepare_seconds=per_candidate)   # a cache hit shows as ~0 s
    return run, ds, fp, times


# ----------------------------------------------------------------------------- running

def run_benchmark(cfg: Config, force: bool = False, workers: int | None = None,
                  show_progress: bool = True, scheduler=None,
                  predictor: bool = True) -> pd.DataFrame:
    """Run the whole benchmark described by ``cfg``; returns the leaderboard.

    Work units run in ``workers`` local processes, or on the Dask cluster ``scheduler``
    (``tcp://HOST:PORT``, a ``distributed.Client`` or ``LocalCluster``) when it is given.
    ``predictor=False``: no predictor is saved (the leave-one-lab-out run of bench.labs).
    """
    out = RunDir(Path(cfg["run"]["out"]).expanduser())
    _check_out(out, force)   # before the folder is made, so --force moves aside the user's
    check_writable(out.path, "--out")
    with ExitStack() as locks:
        locks.enter_context(run_lock(out.path, "bench run"))
        inode = os.stat(out.path).st_ino
        run, ds, fp, times = prepare_run(cfg, force, show_progress)
        if os.stat(run.path).st_ino != inode:   # --force moved another run aside
            locks.enter_context(run_lock(run.path, "bench run"))
        return _run_benchmark(cfg, run, ds, fp, times, workers, show_progress, scheduler,
                              predictor)


def _run_benchmark(cfg: Config, run: RunDir, ds, fp: dict, times: dict, workers,
                   show_progress: bool, scheduler, predictor: bool) -> pd.DataFrame:
    run_cfg = cfg["run"]
    fold_metric = base_metric(run_cfg["metric"])   # a worst/mean-lab metric ranks at the end

    with stage(times, "units"):
        # an absolute path: Dask workers elsewhere see the run directory on a shared file system
        units = [(str(run.path.resolve()), n, k) for n in cfg.candidates
                 for k in range(run_cfg["folds"])]
        todo = [u for u in units if not run.unit_done(u[1], u[2], fp["candidates"][u[1]])]
        # the longest first (CNNs before feature models), so both cores stay busy to the end;
        # results do not depend on the order (each unit is seeded by the run seed and its fold)
        kind = {n: registry.get(e["type"]).kind for n, e in cfg.candidates.items()}
        todo.sort(key=lambda u: kind[u[1]] != "cnn")
        if len(todo) < len(units):
            info(f"resuming: {len(units) - len(todo)} of {len(units)} work units already done")
        open_storages(cfg, {u[1] for u in todo}, run.path)
        executor = make_executor(workers or run_cfg["workers"],
                                 scheduler=scheduler or run_cfg["scheduler"])
        with unit_progress(len(todo), "work units") as advance:
            for args, res in executor.map_unordered(run_unit, todo):
                advance(f"{args[1]} fold {args[2]}: acc {res['metrics']['accuracy']:.3f}")

    shifts = stress_shifts(cfg)
    if shifts:   # units finished before a shift was configured (a resumed run)
        with stage(times, "stress"):
            complete_stress(run, list(cfg.candidates), shifts, int(run_cfg["seed"]))

    with stage(times, "ensembles_and_leaderboard"):
        folds = run.folds
        rows, oofs, kinds = _collect(run, cfg, ds, folds)
        stressed = collect_stress(run, list(cfg.candidates), shifts) if shifts else None
        ens_rows, ens_oofs, ens_stressed = evaluate_ensembles(cfg.ensembles, oofs, kinds, ds.labels,
                                                              folds, warn, stressed)
        by_name = {r["candidate"]: r for r in rows}
        for r in ens_rows:
            r.update(ensemble_costs([by_name[m] for m in r["members"].split(";")],
                                    r["combine_seconds"], r["n_folds"]))
            run.write_oof(r["candidate"], ens_oofs[r["candidate"]])
        if shifts:
            stressed = {s: stressed[s] | ens_stressed[s] for s in shifts}
            for s, by_name_s in ens_stressed.items():
                for n, p in by_name_s.items():
                    run.write_stress_oof(n, s, p)
            add_stress_columns(rows + ens_rows, stressed, ds.labels, folds, fold_metric)
        conformal.add_leaderboard_columns(rows + ens_rows, oofs | ens_oofs, ds.labels, folds,
                                          cfg.settings.predictor.conformal)
        board = make_table(rows + ens_rows, fold_metric)
        moved = run.keep_previous_outputs(board)
        if moved:
            info(f"the leaderboard changed: the previous leaderboard, predictor and report "
                 f"were moved to {moved}")
        run.write_leaderboard(board, to_markdown(board, fold_metric))
    if runs_lolo(cfg):   # before the predictor: it may be chosen by the worst held-out lab
        with stage(times, "leave_one_lab_out"):
            board, _ = leave_one_lab_out(run, cfg, board, run_benchmark, workers, scheduler,
                                         show_progress)
            run.write_leaderboard(board, to_markdown(board, run_cfg["metric"]))

    # the probabilities as written to oof/ (float32): the saved fits are reproducible from
    # the run directory alone
    stored = {n: p.astype(np.float32).astype(np.float64) for n, p in (oofs | ens_oofs).items()}
    stored_stress = {s: {n: p.astype(np.float32).astype(np.float64) for n, p in d.items()}
                     for s, d in (stressed or {}).items()} or None
    bag_choice = None
    if cfg["data"]["bags"]:
        with stage(times, "patients"):
            score_patients(run, cfg, ds, board, stored, folds, show_progress)
            bag_choice = run.read_patients()
    if cfg["external"]:   # before the predictor: its model card shows these figures
        with stage(times, "external"):
            board = score_external(run, cfg, ds, board, stored, kinds, folds, stored_stress)
            run.write_leaderboard(board, to_markdown(board, run_cfg["metric"]))
    if predictor:
        with stage(times, "predictor"):
            _save_predictor(run, cfg, ds, board, stored, kinds, folds, bag_choice,
                            stored_stress)
    kept = distilled_row(run) if predictor else None
    if kept is not None:   # an earlier `bench distill` whose teacher rows are unchanged
        board = make_table(board.to_dict("records") + [kept], run_cfg["metric"]
                           if run_cfg["metric"] in board else fold_metric)
        run.write_leaderboard(board, to_markdown(board, run_cfg["metric"]
                                                 if run_cfg["metric"] in board else fold_metric))
    if cfg["report"]["leakage_audit"]:   # the same entries, image-level folds
        with stage(times, "leakage_audit"):
            leakage_audit(run, cfg, run_benchmark, workers, scheduler, show_progress)
    run.update_manifest(stage_seconds=times, finished=_dt.datetime.now(
        _dt.timezone.utc).isoformat(timespec="seconds"))
    report = {}
    with stage(report, "report_seconds"):
        written = report_after_run(run.path, cfg.data)
    if written is not None:   # a failing report keeps the run
        run.update_manifest(**report)
    return board


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
        rows.append({"candidate": name, "kind": results[0]["kind"],
                     **summarize([r["metrics"] for r in results]),
                     "fit_seconds": float(np.mean([r["fit_seconds"] for r in results])),
                     "tune_seconds": float(np.sum([r["tune_seconds"] for r in results])),
                     "tuning": tuning_column([r.get("tuning") for r in results]),
                     "predict_ms_per_image": float(np.mean([r["predict_ms_per_image"]
                                                            for r in results])),
                     "model_size": results[0]["model_size"], "n_folds": len(results)})
    return rows, oofs, kinds


def _save_predictor(run: RunDir, cfg: Config, ds: Dataset, board, stored, kinds,
                    folds, patients=None, stressed=None) -> None:
    """Save the chosen entry (``[predictor] ensemble``, default the best ensemble, or in a
    bag task the entry of the best patient row a predictor can carry); ``stored``: every
    entry's out-of-fold probabilities as written to ``oof/`` (``stressed``: the same under
    each simulated shift)."""
    pred_cfg = cfg.settings.predictor
    metric = cfg["run"]["metric"]
    choice = pred_cfg.ensemble
    tolerance = float(pred_cfg.robust_tolerance)
    carried = patients[3].get("carried") if patients is not None else None
    chosen_by = {"best": "best ensemble by " + metric,
                 "robust": f"best {metric} under simulated shift ([stress]) of the ensembles "
                           f"within {tolerance} of the best {metric}"}.get(choice, "config")
    if choice in ("best", "robust") and carried:   # a bag task: the nested row's procedure
        row = choose_entry(board, carried["entry"])
        chosen_by = (f"the patient row chosen by ROC AUC, then log loss, among the rows a "
                     f"predictor can carry ({carried['row']}; see the nested figure)")
    else:
        row = choose_entry(board, choice, metric, tolerance)
    name = row["candidate"]
    members, ens = final_ensemble(name, row["kind"], cfg.ensembles, stored, kinds, ds.labels,
                                  folds, stressed)
    weights = ens.member_weights()
    info_ = {m: {"type": cfg.candidates[m]["type"], "kind": kinds[m],
                 "weight": None if weights is None else weights[i]}
             for i, m in enumerate(members)}
    calibration = {}
    if pred_cfg.temperature_scaling:   # one T fitted on the entry's OOF rows
        calibration = {"calibration": {
            "method": "temperature scaling", "temperature": fit_temperature(ds.labels,
                                                                            stored[name]),
            "fitted_on": f"out-of-fold probabilities of '{name}'"}}
    save_predictor(
        run.predictor_dir, ensemble_name=name, ensemble=ens,
        members={m: [run.unit_model_dir(m, k) for k in folds.fold_ids] for m in members},
        member_info=info_, classes=ds.classes, preprocessing=ds.preprocessing,
        training_data=ds.summary() | {"skipped": len(ds.skipped)},
        extra={"chosen_by": chosen_by,
               "leaderboard": {k: float(row[k]) for k in
                               dict.fromkeys([metric, "accuracy", "macro_f1"])},
               "member_models": "fold models of the cross-validation (bagged)",
               **calibration,
               **conformal.predictor_extra(run, pred_cfg.conformal, ds.labels, stored[name],
                                           folds, name, calibration,
                                           ens.combine([stored[m] for m in members])),
               **({"bags": bag_settings(cfg, patients, name)} if patients else {}),
               **({"leave_one_lab_out": lab_summary(row, lab_names(cfg))}
                  if has_lab_columns(board, lab_names(cfg)) else {})},
        tta=pred_cfg.tta, shift=ShiftReference.fit(ds.images))
    run.update_state(predictor=name)
    info(f"saved predictor '{name}' ({', '.join(members)}) to {run.predictor_dir}")


# ----------------------------------------------------------------------------- commands

def _cli_data(data, config):
    """``--data`` (:func:`bench.config.data_argument`): a path from cwd, or a dataset's name."""
    path, name = data_argument(data, config) if data else (None, data)
    return str(path.resolve()) if path is not None else name


def run_from_args(config=None, profile=None, data=None, out=None, only=None, force=False,
                  workers=None, show_progress=True, scheduler=None,
                  storage=None) -> tuple[pd.DataFrame, Path]:
    cfg = load_config(config, profile=profile, data=_cli_data(data, config), only=only, out=out)
    if storage:
        cfg.override("tuning", storage=storage)
    board = run_benchmark(cfg, force=force, workers=workers, show_progress=show_progress,
                          scheduler=scheduler)
    return board, Path(cfg["run"]["out"])


def tune_from_args(config=None, profile=None, data=None, out=None, candidate=None, trials=None,
                   fold=None, storage=None):
    """``python -m bench tune``: add trials to the studies of ``candidate`` in a run.

    A run directory that already holds a run is used as it is (its own config, data and
    folds); a new one is prepared first from ``config``/``profile``/``data``. Yields
    ``(fold, best_params, tuning_info)`` per fold once its study holds ``trials`` trials.
    """
    run = RunDir(Path(out).expanduser()) if out else None
    if run is None or not run.is_run():
        cfg = load_config(config, profile=profile, data=_cli_data(data, config), out=out)
        if storage:
            cfg.override("tuning", storage=storage)
        run = prepare_run(cfg)[0]
    cands = run.config.candidates
    if candidate not in cands:
        raise BenchError(f"{run.path}: no candidate '{candidate}' in this run; known: "
                         f"{list(cands)}")
    registry.import_plugins(run.config["run"]["plugins"])
    if not registry.get(cands[candidate]["type"]).tunable:
        raise BenchError(f"candidate '{candidate}' ({cands[candidate]['type']}) has no "
                         "param_space: nothing to tune")
    own = candidate_tuning(run.config["tuning"], cands[candidate])
    n = int(own.trials if trials is None else trials)
    if n < 1:
        raise BenchError("nothing to tune: pass --trials N or set [tuning] trials")
    n_folds = int(run.config["run"]["folds"])
    if fold is not None and not 0 <= fold < n_folds:
        raise BenchError(f"--fold must be in 0..{n_folds - 1}, got {fold}")
    configured = own.storage
    if storage and storage != configured:
        warn(f"--storage differs from the run's [tuning] storage "
             f"({configured or 'SQLite in the run directory'}): its work units will not see "
             "these trials")
    for k in ([fold] if fold is not None else range(n_folds)):
        best, tuning = tune_unit(run, candidate, k, trials=n, storage=storage)
        yield k, best, tuning


__all__ = ["run_benchmark", "run_from_args", "run_unit", "tune_from_args", "prepare_run"]
