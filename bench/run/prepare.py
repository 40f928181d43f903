"""Before the work units: the run directory prepared, and what candidates compute once.

:func:`prepare_run` checks ``--out``, loads the data, makes the folds and writes the run
directory's files (config, folds, images, state, manifest); ``run`` and ``tune`` both start
there, so every process sees the same data and folds. A second run on the same directory
resumes, is refused, or (``--force``) archives the first (:func:`check_resume`).

Candidates that declare ``needs_prepare`` (feature extraction, frozen-backbone
embeddings) run their ``prepare(X_all)`` here, without labels; its results are cached on
disk, keyed by the images' content, so every fold and every later run reuses them.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import Config
from bench.data.datasets import Dataset
from bench.data.folds import (
    folds_hash,
    folds_table,
    lab_folds,
    make_bag_folds,
    make_folds,
    make_groups,
    read_bags,
)
from bench.protocols.patients import check_cell_types, check_mil
from bench.run.rundir import RunDir
from bench.data.sources import prepare_data, with_bag_colour
from bench.protocols.stress import stress_shifts
from core import registry
from ensembles.bags import aggregators_needing
from core.candidate import build_candidate
from core.errors import BenchError
from core.io import git_commit, hardware, package_versions, stable_hash
from core.progress import info, stage
from core.stress import simulate


def _prepare_here(entries: dict, images, plugins, shifts=(), seed: int = 0) -> dict:
    """Run each candidate's ``prepare``; ``images`` may be a ``.npy`` path (memory-mapped).
    With ``shifts`` ([stress]) also on every image under each simulated shift: the images
    the work units score their fold models on beside the clean ones."""
    if isinstance(images, str):
        images = np.load(images, mmap_mode="r")
    registry.import_plugins(plugins)
    seconds, shifted = {}, {}
    for name, entry in entries.items():
        cand = build_candidate(entry)
        if cand.needs_prepare:
            t = time.perf_counter()
            cand.prepare(images)
            for s in shifts:
                if s not in shifted:
                    shifted[s] = simulate(images, s, np.arange(len(images)), seed)
                cand.prepare(shifted[s])
            seconds[name] = time.perf_counter() - t
    return seconds


def prepare_candidates(entries: dict, images, plugins=(), shifts=(), seed: int = 0) -> dict:
    """Cache what candidates compute once for all images (and, with ``shifts``, for all
    images under each simulated shift, seeded by ``seed`` as the work units shift them);
    returns seconds per candidate.

    Candidates that declare ``prepare_in_child`` (frozen-backbone embeddings) run in one
    spawned child process: TensorFlow keeps the memory of a backbone's forward passes for
    the life of a process, and the runner must stay small while the work units run beside
    it. The others (feature extraction, joblib workers) run here.
    """

    def child_kind(e):
        return registry.get(e["type"]).prepare_in_child

    here = {n: e for n, e in entries.items() if not child_kind(e)}
    child = {n: e for n, e in entries.items() if child_kind(e)}
    seconds = _prepare_here(here, images, list(plugins), list(shifts), seed)
    if child:
        src = images
        fname = getattr(images, "filename", None)
        if (
            isinstance(images, np.memmap)
            and fname
            and Path(fname).suffix == ".npy"
            and np.load(fname, mmap_mode="r").shape == images.shape
        ):
            src = str(fname)  # the cached array itself, not a copy through a pipe
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            seconds.update(
                ex.submit(_prepare_here, child, src, list(plugins), list(shifts), seed).result()
            )
    return seconds


def fingerprint(cfg: Config, ds: Dataset, fhash: str) -> dict:
    data = cfg.data.model_dump(exclude={"path", "cache_dir", "fallback", "same_as"})
    if data.get("colour_norm") == "none":  # runs made before the step existed resume
        data.pop("colour_norm")
    run = cfg.run.model_dump(include={"seed", "folds"})
    tuning = cfg.tuning.model_dump(exclude={"storage"})  # where, not what
    shared = {"data": data, "run": run, "tuning": tuning}
    if cfg.patients.bag_jitter:  # changes what every unit trains on
        shared["bag_jitter"] = cfg.patients.bag_jitter
    return {
        "shared": stable_hash(shared),
        "dataset": ds.content_hash,
        "folds": fhash,
        "candidates": {n: stable_hash(e.spec()) for n, e in cfg.candidates.items()},
    }


def check_out(run: RunDir, force: bool) -> None:
    """Before any work: ``--out`` is a folder, and a non-empty one that holds no run is
    refused, or (``--force``) moved aside whole. Nothing is ever deleted."""
    if run.path.exists() and not run.path.is_dir():
        raise BenchError(f"--out {run.path} is a file, not a folder")
    if not run.is_run() and run.path.exists() and any(run.path.iterdir()):
        if not force:
            raise BenchError(
                f"{run.path} exists and is not a bloodbench run; "
                "choose another --out, or --force to move it aside"
            )
        info(f"--force: moved the existing folder aside to {run.archive()}")


def check_resume(run: RunDir, fp: dict, force: bool, names: list[str]) -> None:
    """Resume, refuse, or (``--force``) archive a run made with other data or settings;
    refuse a run of ``names`` that leaves out candidates of a finished run."""
    if not run.is_run():
        return
    old = run.read_state()["fingerprint"]
    changed = [k for k in ("dataset", "folds", "shared") if old.get(k) != fp[k]]
    changed += [
        f"candidate '{n}'"
        for n, h in fp["candidates"].items()
        if n in old.get("candidates", {}) and old["candidates"][n] != h
    ]
    if changed and not force:
        raise BenchError(
            f"{run.path} holds a run with a different {', '.join(changed)}; "
            "use another --out, or --force to archive it and start again"
        )
    if changed and force:
        info(f"--force: archived the previous run to {run.archive()}")
        return
    board = run.file(run.LEADERBOARD_CSV)
    if board.is_file():  # a finished run: its leaderboard, predictor and report are kept
        done = pd.read_csv(board)
        missing = sorted(
            set(done["candidate"][~done["kind"].isin(["ensemble", "distilled"])]) - set(names)
        )  # bench distill's row is not a candidate
        if missing:
            raise BenchError(
                f"{run.path} holds a finished run with {missing}, which this run leaves out "
                "(--only or select): its leaderboard, predictor and report would be replaced "
                "by a subset's. Use another --out (finished units are not shared), or --force "
                "to archive the finished run first"
            )


def run_manifest(cfg: Config, ds: Dataset, data_path, table, fhash, group_info) -> dict:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_path": str(data_path),
        "dataset": ds.summary(),
        "grouping": group_info,
        "folds": {
            "scheme": (
                "leave-one-lab-out: one fold per lab"
                if cfg.run.split == "lab" and "domain" in table
                else "StratifiedGroupKFold(shuffle=True)"
                + (
                    " over bags, stratified by the bags' labels"
                    if "bag" in table
                    else " stratified by lab and class"
                    if "domain" in table
                    else ""
                )
            ),
            "n_folds": cfg.run.folds,
            "seed": cfg.run.seed,
            "hash": fhash,
            "counts": table.groupby("fold").size().to_dict(),
        },
        "tuning": {
            "trials": cfg.tuning.trials,
            "scheme": "per outer fold, an Optuna study scored on an inner validation "
            "split of that fold's training rows only (the evaluated fold "
            "never scores a trial)",
        },
        "seeds": {"run": cfg.run.seed, "unit": "run seed + fold number"},
        "profile": cfg.profile,
        "config_hash": stable_hash(cfg.to_dict()),
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
        registry.import_plugins(cfg.run.plugins)
        for e in [*cfg.candidates.values(), *cfg.ensembles.values()]:
            registry.get(e.type)
        if not cfg.candidates:
            raise BenchError("no candidates to run (check the profile's select and --only)")
        run = RunDir(Path(cfg.run.out).expanduser())
        check_out(run, force)
        ds, data_path = prepare_data(cfg, show_progress)
        data = cfg.data
        groups, group_info = make_groups(
            ds, cfg.path(data.groups), cfg.path(data.pairs), data.group_rule, preset=ds.group_keys
        )
        bags = None
        if ds.domains and cfg.run.split == "lab":  # one fold per lab
            folds = lab_folds(ds.domains, groups)
            cfg.override("run", folds=int(folds.max()) + 1)
        elif data.bags:  # whole bags (patients) in a fold, stratified by the bags' labels
            if data.positive not in ds.classes:
                raise BenchError(
                    f"[data] positive '{data.positive}' is not a class of the data {ds.classes}"
                )
            bags = read_bags(ds, cfg.path(data.groups))
            folds = make_bag_folds(ds.labels, bags, groups, cfg.run.folds, cfg.run.seed, ds.classes)
            group_info["bags"] = int(len(np.unique(bags)))
            # each bag's cells colour-normalised together, before any candidate sees them
            ds = with_bag_colour(ds, bags, cfg.patients.bag_colour)
            aggs = cfg.patients.aggregators
            if aggregators_needing(aggs, "needs_cell_types") or data.disease_cells:
                check_cell_types(cfg, ds, group_info["bags"])  # before any unit runs
            if aggregators_needing(aggs, "needs_embeddings"):
                check_mil(cfg)
        else:
            folds = make_folds(
                ds.labels, groups, cfg.run.folds, cfg.run.seed, ds.classes, ds.domains
            )
        table = folds_table(ds, groups, folds, bags)
        fhash = folds_hash(table)
    fp = fingerprint(cfg, ds, fhash)
    check_resume(run, fp, force, list(cfg.candidates))
    same_images = False
    if run.is_run():  # keep candidates of earlier runs in the state
        old = run.read_state()["fingerprint"]
        fp["candidates"] = {**old["candidates"], **fp["candidates"]}
        same_images = run.images_file.is_file() and old["dataset"] == ds.content_hash
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    run.write_folds(table)
    if not same_images:
        run.write_images(ds.images)
    run.write_state({"fingerprint": fp, "classes": ds.classes})
    run.write_manifest(run_manifest(cfg, ds, data_path, table, fhash, group_info))

    with stage(times, "prepare"):
        # with [stress], the shifted images too: a work unit then finds the embeddings of the
        # images it scores under shift cached, and never loads a backbone for them
        per_candidate = prepare_candidates(
            cfg.candidate_specs(), ds.images, cfg.run.plugins, stress_shifts(cfg), cfg.run.seed
        )
    run.update_manifest(prepare_seconds=per_candidate)  # a cache hit shows as ~0 s
    return run, ds, fp, times


__all__ = [
    "prepare_run",
    "prepare_candidates",
    "fingerprint",
    "check_out",
    "check_resume",
    "run_manifest",
]
