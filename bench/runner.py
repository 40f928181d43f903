"""``python -m bench run``: dataset -> folds -> work units -> out-of-fold probabilities
-> ensembles -> leaderboard and predictor.

The runner knows no model by name: candidates and ensembles come from the config and
the registry. Every candidate x fold work unit writes its result atomically under
``units/``; a second ``run`` on the same directory skips finished units.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import registry
from bench.candidate import build_candidate
from bench.config import Config, deep_merge, load_config, read_toml
from bench.datasets import Dataset, default_cache_dir, load_dataset, stratified_subset
from bench.download import fetch
from bench.errors import BenchError
from bench.folds import folds_hash, folds_table, make_folds, make_groups
from bench.io import (atomic_save_npy, atomic_write_json, atomic_write_text, git_commit,
                      hardware, package_versions, publish_dir, read_json, stable_hash)
from bench.leaderboard import write_leaderboard
from bench.metrics import fold_metrics, metric_sort_ascending, summarize
from bench.progress import info, unit_progress, warn
from bench.scheduling import make_executor

STATE_FILE = "state.json"
RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------- context

class RunContext:
    """What a work unit needs, read back from a run directory."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.config = Config(read_toml(self.run_dir / "config.toml"))
        self.images = np.load(self.run_dir / "data" / "images.npy", mmap_mode="r")
        table = pd.read_csv(self.run_dir / "folds.csv")
        self.folds = table["fold"].to_numpy()
        self.state = read_json(self.run_dir / STATE_FILE)
        self.classes = self.state["classes"]
        self.labels = np.array([self.classes.index(c) for c in table["label"]], dtype=np.int64)


def unit_dir(run_dir, name: str, fold: int) -> Path:
    return Path(run_dir) / "units" / name / f"fold{fold}"


def unit_done(run_dir, name: str, fold: int, cand_hash: str) -> bool:
    f = unit_dir(run_dir, name, fold) / RESULT_FILE
    if not f.is_file():
        return False
    try:
        return read_json(f).get("candidate_hash") == cand_hash
    except (OSError, ValueError):
        return False


def _seeded(entry: dict, seed: int) -> dict:
    """Give the candidate the run's seed unless its params set one."""
    cls = registry.get(entry["type"])
    params = dict(entry.get("params", {}))
    names = cls().get_params(deep=False)
    for key in ("seed", "random_state"):
        if key in names and key not in params:
            params[key] = seed
    return {**entry, "params": params}


def run_unit(run_dir: str, name: str, fold: int) -> dict:
    """Fit candidate ``name`` on every fold but ``fold``, predict ``fold``; write the result."""
    ctx = RunContext(run_dir)
    cfg = ctx.config
    seed = int(cfg["run"]["seed"]) + fold
    entry = _seeded(cfg.candidates[name], seed)
    train, test = ctx.folds != fold, ctx.folds == fold
    X_train, y_train = np.asarray(ctx.images[train]), ctx.labels[train]
    classes = np.arange(len(ctx.classes))
    final = unit_dir(run_dir, name, fold)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    best, tuning = tune_unit(ctx, name, fold)
    if best:
        entry = {**entry, "params": {**entry["params"], **best}}
    t1 = time.perf_counter()
    cand = build_candidate(entry)
    cand.fit(X_train, y_train, classes=classes, **_fit_kwargs(cand, tmp))
    t2 = time.perf_counter()
    X_test = np.asarray(ctx.images[test])
    proba = cand.predict_proba(X_test)
    t3 = time.perf_counter()
    cand.save(tmp / "model")
    np.save(tmp / "proba.npy", proba.astype(np.float32))
    result = {
        "candidate": name, "fold": fold, "kind": cand.kind, "type": entry["type"],
        "candidate_hash": stable_hash(cfg.candidates[name]), "seed": seed,
        "params": cand.get_params(deep=False), "tuning": tuning,
        "tune_seconds": t1 - t0, "fit_seconds": t2 - t1, "predict_seconds": t3 - t2,
        "predict_ms_per_image": 1000 * (t3 - t2) / max(1, int(test.sum())),
        "n_train": int(train.sum()), "n_test": int(test.sum()),
        "model_size": cand.model_size(), "epochs_run": getattr(cand, "epochs_run_", None),
        "metrics": fold_metrics(ctx.labels[test], proba),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "worker": f"{platform.node()}:{os.getpid()}",
    }
    atomic_write_json(tmp / RESULT_FILE, result)
    publish_dir(tmp, final)
    del cand
    _release_memory()
    return result


def _release_memory() -> None:
    """Let a long-lived worker process give back what a finished unit's models held."""
    import gc
    import sys
    if "keras" in sys.modules:   # graphs, layers and tf.functions of the unit's models
        sys.modules["keras"].utils.clear_session(free_memory=True)
    gc.collect()


def _base_param_space():
    from bench.candidate import Candidate
    return Candidate.param_space.__func__


def tune_unit(ctx: RunContext, name: str, fold: int, trials: int | None = None,
              storage: str | None = None) -> tuple[dict, dict]:
    """Tune candidate ``name`` on the training rows of ``fold`` (Optuna study ``NAME-foldK``).

    ``run`` (inside the work unit) and ``tune`` (any number of extra processes) both call
    this, so they share one objective and one study per candidate and fold.

    Parameters
    ----------
    ctx : the prepared run directory.
    trials : finished trials the study should hold; default ``[tuning] trials``.
    storage : Optuna storage URL; default ``[tuning] storage`` (SQLite in the run dir).

    Returns
    -------
    ``(best_params, tuning_info)``; ``({}, {})`` when there is nothing to tune.
    """
    cfg = ctx.config
    seed = int(cfg["run"]["seed"]) + fold
    entry = _seeded(cfg.candidates[name], seed)
    overrides = {**({} if trials is None else {"trials": int(trials)}),
                 **({"storage": storage} if storage else {})}
    if overrides:   # over [tuning] and over the candidate's own tuning table
        entry = {**entry, "tuning": {**(entry.get("tuning") or {}), **overrides}}
    tuning = dict(cfg["tuning"])
    if not int({**tuning, **(entry.get("tuning") or {})}.get("trials", 0) or 0) or \
            registry.get(entry["type"]).param_space.__func__ is _base_param_space():
        return {}, {}
    from bench.tuning import tune_candidate
    train = ctx.folds != fold
    return tune_candidate(entry, np.asarray(ctx.images[train]), ctx.labels[train],
                          np.arange(len(ctx.classes)), study=f"{name}-fold{fold}",
                          tuning=tuning, run_dir=str(ctx.run_dir), seed=seed)


def _fit_kwargs(cand, workdir: Path) -> dict:
    import inspect
    sig = inspect.signature(cand.fit).parameters
    return {"workdir": workdir} if "workdir" in sig else {}


# ----------------------------------------------------------------------------- run

def resolve_data_path(cfg: Config) -> tuple[Path, list[str] | None]:
    """The data path, downloading the fallback dataset when the configured one is missing.

    Returns the path and, for the fallback, its class names.
    """
    data = cfg["data"]
    path = str(data.get("path") or "")
    p = Path(path).expanduser() if path else None
    if p is not None and not p.is_absolute() and cfg.source is not None:
        p = cfg.source.parent / p   # relative paths in a config file start at its folder
    if p is not None and p.exists():
        return p, None
    fb = data.get("fallback") or {}
    if fb.get("url"):
        cache = Path(data.get("cache_dir") or default_cache_dir()).expanduser()
        dest = cache / "downloads" / fb.get("filename", Path(fb["url"].split("?")[0]).name)
        where = f"{p} (or {dest})" if p else str(dest)
        info(f"data not found at {p}; using the default dataset {fb.get('name', '')} at {dest}")
        path = fetch(fb["url"], fb["md5"], dest, hint=f"no network? put a dataset folder or "
                     f".npz at {where}, or pass --data PATH")
        return path, fb.get("classes") or None
    if p is None:
        raise BenchError("no data configured: pass --data PATH or set [data] path")
    raise BenchError(f"data not found: {p}")


def prepare_dataset(cfg: Config, show_progress=True) -> tuple[Dataset, Path]:
    data = cfg["data"]
    path, fb_classes = resolve_data_path(cfg)
    ds = load_dataset(path, image_size=data["image_size"], cache_dir=data.get("cache_dir") or None,
                      classes=data.get("classes") or fb_classes, show_progress=show_progress)
    for s in ds.skipped:
        warn(f"skipped {s['path']}: {s['reason']}")
    if data.get("max_images") and len(ds) > data["max_images"]:
        rows = stratified_subset(ds.labels, data["max_images"], cfg["run"]["seed"],
                                 min_per_class=cfg["run"]["folds"] * 2)
        ds = ds.subset(rows)
    return ds, path


def _fingerprint(cfg: Config, ds: Dataset, fhash: str) -> dict:
    data = {k: v for k, v in cfg["data"].items() if k not in ("path", "cache_dir", "fallback")}
    run = {k: cfg["run"][k] for k in ("seed", "folds")}
    tuning = {k: v for k, v in cfg["tuning"].items() if k != "storage"}   # where, not what
    shared = {"data": data, "run": run, "tuning": tuning}
    return {"shared": stable_hash(shared), "dataset": ds.content_hash,
            "folds": fhash,
            "candidates": {n: stable_hash(e) for n, e in cfg.candidates.items()}}


def _check_resume(run_dir: Path, fp: dict, force: bool) -> None:
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        if run_dir.exists() and any(run_dir.iterdir()) and not force:
            raise BenchError(f"{run_dir} exists and is not a bloodbench run; "
                             "choose another --out or pass --force")
        return
    old = read_json(state_file)["fingerprint"]
    changed = [k for k in ("dataset", "folds", "shared") if old.get(k) != fp[k]]
    changed += [f"candidate '{n}'" for n, h in fp["candidates"].items()
                if n in old.get("candidates", {}) and old["candidates"][n] != h]
    if changed and not force:
        raise BenchError(f"{run_dir} holds a run with a different {', '.join(changed)}; "
                         "use another --out, or --force to archive it and start again")
    if changed and force:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        archive = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
        os.replace(run_dir, archive)
        info(f"--force: archived the previous run to {archive}")


def prepare_run(cfg: Config, force: bool = False, show_progress: bool = True):
    """Load the data, make the folds and write the run directory's files; no unit runs.

    Returns ``(run_dir, dataset, folds, fingerprint, stage_seconds)``. ``run`` and
    ``tune`` both start here, so every process sees the same data and folds.
    """
    times = {}
    t = time.perf_counter()
    registry.import_plugins(cfg["run"].get("plugins", []))
    for e in cfg.candidates.values():
        registry.get(e["type"])
    for e in cfg.ensembles.values():
        registry.get(e["type"])
    if not cfg.candidates:
        raise BenchError("no candidates to run (check the profile's select and --only)")
    run_cfg = cfg["run"]
    run_dir = Path(run_cfg["out"]).expanduser()
    ds, data_path = prepare_dataset(cfg, show_progress)
    groups, group_info = make_groups(ds, cfg["data"].get("groups", ""), cfg["data"].get("pairs", ""),
                                     cfg["data"].get("group_rule", ""))
    folds = make_folds(ds.labels, groups, run_cfg["folds"], run_cfg["seed"], ds.classes)
    table = folds_table(ds, groups, folds)
    fhash = folds_hash(table)
    times["data_and_folds"] = time.perf_counter() - t
    fp = _fingerprint(cfg, ds, fhash)
    _check_resume(run_dir, fp, force)
    if (run_dir / STATE_FILE).is_file():   # keep candidates of earlier runs in the state
        old = read_json(run_dir / STATE_FILE)["fingerprint"]["candidates"]
        fp["candidates"] = {**old, **fp["candidates"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_run_files(run_dir, cfg, ds, data_path, table, fhash, group_info, fp)

    t = time.perf_counter()
    per_candidate = prepare_candidates(cfg.candidates, ds.images,
                                       cfg["run"].get("plugins", []))
    times["prepare"] = time.perf_counter() - t
    manifest = read_json(run_dir / "manifest.json")
    manifest["prepare_seconds"] = per_candidate   # a cache hit shows as ~0 s
    atomic_write_json(run_dir / "manifest.json", manifest)
    return run_dir, ds, folds, fp, times


def _prepare_here(entries: dict, images, plugins) -> dict:
    """Run each candidate's ``prepare``; ``images`` may be a ``.npy`` path (memory-mapped)."""
    if isinstance(images, str):
        images = np.load(images, mmap_mode="r")
    registry.import_plugins(plugins)
    seconds = {}
    for name, entry in entries.items():
        cand = build_candidate(entry)
        if hasattr(cand, "prepare"):
            t = time.perf_counter()
            cand.prepare(images)
            seconds[name] = time.perf_counter() - t
    return seconds


def prepare_candidates(entries: dict, images, plugins=()) -> dict:
    """Cache what candidates compute once for all images (features, embeddings).

    Feature extraction runs here (joblib workers). CNN candidates with a ``prepare``
    (frozen-backbone embeddings) run in one spawned child process: TensorFlow keeps the
    memory of a backbone's forward passes for the life of a process, and the runner must
    stay small while the work units run beside it. Returns seconds per candidate.
    """
    def heavy(e):
        cls = registry.get(e["type"])
        return cls.kind == "cnn" and hasattr(cls, "prepare")
    here = {n: e for n, e in entries.items() if not heavy(e)}
    child = {n: e for n, e in entries.items() if heavy(e)}
    seconds = _prepare_here(here, images, list(plugins))
    if child:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        src = images
        fname = getattr(images, "filename", None)
        if isinstance(images, np.memmap) and fname and Path(fname).suffix == ".npy" \
                and np.load(fname, mmap_mode="r").shape == images.shape:
            src = str(fname)   # the cached array itself, not a copy through a pipe
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            seconds.update(ex.submit(_prepare_here, child, src, list(plugins)).result())
    return seconds


def run_benchmark(cfg: Config, force: bool = False, workers: int | None = None,
                  show_progress: bool = True, scheduler=None) -> pd.DataFrame:
    """Run the whole benchmark described by ``cfg``; returns the leaderboard.

    Work units run in ``workers`` local processes, or on the Dask cluster ``scheduler``
    (``tcp://HOST:PORT``, a ``distributed.Client`` or ``LocalCluster``) when it is given.
    """
    run_dir, ds, folds, fp, times = prepare_run(cfg, force, show_progress)
    run_cfg = cfg["run"]

    t = time.perf_counter()
    n_folds = run_cfg["folds"]
    # an absolute path: Dask workers elsewhere see the run directory on a shared file system
    units = [(str(run_dir.resolve()), n, k) for n in cfg.candidates for k in range(n_folds)]
    todo = [u for u in units if not unit_done(run_dir, u[1], u[2], fp["candidates"][u[1]])]
    if len(todo) < len(units):
        info(f"resuming: {len(units) - len(todo)} of {len(units)} work units already done")
    executor = make_executor(workers or run_cfg.get("workers", 1),
                             scheduler=scheduler or run_cfg.get("scheduler"))
    with unit_progress(len(todo), "work units") as advance:
        for args, res in executor.map_unordered(run_unit, todo):
            advance(f"{args[1]} fold {args[2]}: acc {res['metrics']['accuracy']:.3f}")
    times["units"] = time.perf_counter() - t

    t = time.perf_counter()
    rows, oofs, kinds = _collect(run_dir, cfg, ds, folds)
    rows += _ensembles(run_dir, cfg, ds, folds, oofs, kinds)
    board = write_leaderboard(rows, run_dir, run_cfg["metric"])
    times["ensembles_and_leaderboard"] = time.perf_counter() - t

    t = time.perf_counter()
    _save_best_predictor(run_dir, cfg, ds, board, kinds)
    times["predictor"] = time.perf_counter() - t
    manifest = read_json(run_dir / "manifest.json")
    manifest["stage_seconds"] = times
    manifest["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(run_dir / "manifest.json", manifest)
    from bench.report import report_after_run   # a failing report keeps the finished run
    t = time.perf_counter()
    if report_after_run(run_dir, cfg.data) is not None:
        manifest["report_seconds"] = time.perf_counter() - t
        atomic_write_json(run_dir / "manifest.json", manifest)
    return board


def _write_run_files(run_dir, cfg, ds, data_path, table, fhash, group_info, fp):
    atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    atomic_write_text(run_dir / "folds.csv", table.to_csv(index=False))
    img_file = run_dir / "data" / "images.npy"
    state_file = run_dir / STATE_FILE
    if not (state_file.is_file() and img_file.is_file()
            and read_json(state_file)["fingerprint"]["dataset"] == ds.content_hash):
        atomic_save_npy(img_file, np.ascontiguousarray(ds.images))
    atomic_write_json(state_file, {"fingerprint": fp, "classes": ds.classes})
    atomic_write_json(run_dir / "manifest.json", {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_path": str(data_path),
        "dataset": ds.summary(),
        "grouping": group_info,
        "folds": {"scheme": "StratifiedGroupKFold(shuffle=True)", "n_folds": cfg["run"]["folds"],
                  "seed": cfg["run"]["seed"], "hash": fhash,
                  "counts": table.groupby("fold").size().to_dict()},
        "tuning": {"trials": cfg["tuning"].get("trials", 0),
                   "scheme": "per outer fold, an Optuna study scored on an inner validation "
                             "split of that fold's training rows only (the evaluated fold "
                             "never scores a trial)"},
        "seeds": {"run": cfg["run"]["seed"], "unit": "run seed + fold number"},
        "profile": cfg.profile,
        "config_hash": stable_hash(cfg.data),
        "versions": package_versions(),
        "hardware": hardware(),
        "git_commit": git_commit(),
    })


def _collect(run_dir, cfg, ds, folds):
    rows, oofs, kinds = [], {}, {}
    for name in cfg.candidates:
        oof = np.zeros((len(ds), len(ds.classes)), dtype=np.float64)
        results = []
        for k in range(cfg["run"]["folds"]):
            d = unit_dir(run_dir, name, k)
            res = read_json(d / RESULT_FILE)
            oof[folds == k] = np.load(d / "proba.npy")
            results.append(res)
        atomic_save_npy(run_dir / "oof" / f"{name}.npy", oof.astype(np.float32))
        oofs[name], kinds[name] = oof, results[0]["kind"]
        rows.append({"candidate": name, "kind": results[0]["kind"],
                     **summarize([r["metrics"] for r in results]),
                     "fit_seconds": float(np.mean([r["fit_seconds"] for r in results])),
                     "tune_seconds": float(np.sum([r["tune_seconds"] for r in results])),
                     "predict_ms_per_image": float(np.mean([r["predict_ms_per_image"]
                                                            for r in results])),
                     "model_size": results[0]["model_size"], "n_folds": len(results)})
    return rows, oofs, kinds


def ensemble_members(spec, kinds: dict[str, str]) -> list[str]:
    """Member names from an ensemble's ``members``: "cnn", "all", or a list of names."""
    if spec in (None, "cnn"):
        return [n for n, k in kinds.items() if k == "cnn"]
    if spec == "all":
        return list(kinds)
    if isinstance(spec, list):
        missing = [m for m in spec if m not in kinds]
        if missing:
            raise BenchError(f"ensemble members {missing} are not candidates of this run")
        return list(spec)
    raise BenchError(f"ensemble members must be 'cnn', 'all' or a list of names, got {spec!r}")


def _build_ensemble(entry: dict, name: str = ""):
    params = {k: v for k, v in entry.items() if k not in ("type", "members")}
    try:
        return registry.get(entry["type"])(**params)
    except TypeError as exc:
        raise BenchError(f"[ensembles.{name}]: bad settings ({exc})") from None


def _fit_ensemble(ens, probas, y, name: str, folds, cross_val: bool = True):
    """Out-of-fold ensemble probabilities (``cross_val``) or a fit on all rows (the rows'
    folds passed to ensembles that use them); a bad setting becomes one line naming the
    ensemble."""
    from ensembles.base import cross_val_combine, fold_groups
    try:
        if cross_val:
            return cross_val_combine(ens, probas, y, folds)
        return ens.fit(probas, y, **fold_groups(ens, folds))
    except ValueError as exc:
        raise BenchError(f"[ensembles.{name}]: {exc}") from None


def _ensembles(run_dir, cfg, ds, folds, oofs, kinds):
    rows = []
    for name, entry in cfg.ensembles.items():
        members = ensemble_members(entry.get("members", "cnn"), kinds)
        if not members:
            warn(f"ensemble '{name}' has no members in this run; skipped")
            continue
        ens = _build_ensemble(entry, name)
        t = time.perf_counter()
        oof = _fit_ensemble(ens, [oofs[m] for m in members], ds.labels, name, folds)
        fit_s = time.perf_counter() - t
        weights = _fit_ensemble(ens, [oofs[m] for m in members], ds.labels, name, folds,
                                cross_val=False).member_weights()
        atomic_save_npy(run_dir / "oof" / f"{name}.npy", oof.astype(np.float32))
        per_fold = [fold_metrics(ds.labels[folds == k], oof[folds == k])
                    for k in range(cfg["run"]["folds"])]
        rows.append({"candidate": name, "kind": "ensemble", **summarize(per_fold),
                     "fit_seconds": fit_s, "n_folds": len(per_fold),
                     "members": ";".join(members),
                     "member_weights": "" if weights is None else   # fitted on all rows
                     ";".join(f"{m}:{w:.3f}" for m, w in zip(members, weights))})
    return rows


def _save_best_predictor(run_dir, cfg, ds, board, kinds):
    pred_cfg = cfg.get("predictor", {})
    metric = cfg["run"]["metric"]
    choice = pred_cfg.get("ensemble", "best")
    ens_rows = board[board["kind"] == "ensemble"]
    if choice != "best":
        if choice not in set(board["candidate"]):
            raise BenchError(f"[predictor] ensemble '{choice}' is not on the leaderboard")
        row = board[board["candidate"] == choice].iloc[0]
    elif len(ens_rows):
        row = ens_rows.iloc[0]   # board is sorted by the metric
    else:
        row = board.iloc[0]
    name = row["candidate"]
    if row["kind"] == "ensemble":
        entry = cfg.ensembles[name]
        members = ensemble_members(entry.get("members", "cnn"), kinds)
        ens = _build_ensemble(entry, name)
        oofs = [np.load(run_dir / "oof" / f"{m}.npy").astype(np.float64) for m in members]
        folds = pd.read_csv(Path(run_dir) / "folds.csv")["fold"].to_numpy()
        # final weights (or meta-learner) from all out-of-fold rows
        _fit_ensemble(ens, oofs, ds.labels, name, folds, cross_val=False)
        members = [members[i] for i in ens.drop_unused()]   # weight 0: not saved, not run
    else:   # no ensemble configured: the best single candidate
        from ensembles.voting import SoftVoting
        members, ens = [name], SoftVoting().fit([np.load(run_dir / "oof" / f"{name}.npy")],
                                                ds.labels)
    from ensembles.predictor import save_predictor
    folders = {m: [unit_dir(run_dir, m, k) / "model" for k in range(cfg["run"]["folds"])]
               for m in members}
    weights = ens.member_weights()
    info_ = {m: {"type": cfg.candidates[m]["type"], "kind": kinds[m],
                 "weight": None if weights is None else weights[i]}
             for i, m in enumerate(members)}
    save_predictor(run_dir / "predictor", ensemble_name=name, ensemble=ens, members=folders,
                   member_info=info_, classes=ds.classes, image_size=ds.image_size,
                   training_data=ds.summary() | {"skipped": len(ds.skipped)},
                   extra={"chosen_by": f"{'best ensemble by ' + metric if choice == 'best' else 'config'}",
                          "leaderboard": {k: float(row[k]) for k in
                                          dict.fromkeys([metric, "accuracy", "macro_f1"])},
                          "member_models": "fold models of the cross-validation (bagged)",
                          **_temperature(run_dir, cfg, name, ds.labels)})
    state = read_json(run_dir / STATE_FILE)
    state["predictor"] = name
    atomic_write_json(run_dir / STATE_FILE, state)
    info(f"saved predictor '{name}' ({', '.join(members)}) to {run_dir / 'predictor'}")


def _temperature(run_dir, cfg, name: str, y) -> dict:
    """``[predictor] temperature_scaling``: one temperature fitted on the chosen entry's
    out-of-fold probabilities; stored in the predictor manifest, applied by ``Predictor``."""
    if not cfg.get("predictor", {}).get("temperature_scaling", False):
        return {}
    from bench.calibration import fit_temperature
    t = fit_temperature(y, np.load(Path(run_dir) / "oof" / f"{name}.npy"))
    return {"calibration": {"method": "temperature scaling", "temperature": t,
                            "fitted_on": f"out-of-fold probabilities of '{name}'"}}


def run_from_args(config=None, profile=None, data=None, out=None, only=None, force=False,
                  workers=None, show_progress=True, scheduler=None,
                  storage=None) -> tuple[pd.DataFrame, Path]:
    if data and (Path(data).exists() or "/" in data or data.endswith(".npz")):
        data = str(Path(data).expanduser().resolve())   # a path on the command line: from cwd
    cfg = load_config(config, profile=profile, data=data, only=only, out=out)
    if storage:
        cfg["tuning"]["storage"] = storage
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
    if data and (Path(data).exists() or "/" in data or data.endswith(".npz")):
        data = str(Path(data).expanduser().resolve())
    run_dir = Path(out).expanduser() if out else None
    if run_dir is None or not (run_dir / STATE_FILE).is_file():
        cfg = load_config(config, profile=profile, data=data, out=out)
        if storage:
            cfg["tuning"]["storage"] = storage
        run_dir = prepare_run(cfg)[0]
    ctx = RunContext(run_dir)
    cands = ctx.config.candidates
    if candidate not in cands:
        raise BenchError(f"{run_dir}: no candidate '{candidate}' in this run; known: {list(cands)}")
    if registry.get(cands[candidate]["type"]).param_space.__func__ is _base_param_space():
        raise BenchError(f"candidate '{candidate}' ({cands[candidate]['type']}) has no "
                         "param_space: nothing to tune")
    own = {**ctx.config["tuning"], **(cands[candidate].get("tuning") or {})}
    n = int((own.get("trials", 0) or 0) if trials is None else trials)
    if n < 1:
        raise BenchError("nothing to tune: pass --trials N or set [tuning] trials")
    n_folds = int(ctx.config["run"]["folds"])
    if fold is not None and not 0 <= fold < n_folds:
        raise BenchError(f"--fold must be in 0..{n_folds - 1}, got {fold}")
    configured = own.get("storage", "")
    if storage and storage != configured:
        warn(f"--storage differs from the run's [tuning] storage "
             f"({configured or 'SQLite in the run directory'}): its work units will not see "
             "these trials")
    for k in ([fold] if fold is not None else range(n_folds)):
        best, tuning = tune_unit(ctx, candidate, k, trials=n, storage=storage)
        yield k, best, tuning


__all__ = ["RunContext", "run_benchmark", "run_from_args", "run_unit", "deep_merge",
           "metric_sort_ascending"]
