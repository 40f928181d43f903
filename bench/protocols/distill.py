"""``python -m bench distill``: one fast model with the ensemble's accuracy.

A finished run's saved predictor bags every fold model of every member (40 models in the
``quick`` profile, a frozen backbone at 160 px among them): 30-50 images/s on 2 cores. Here
one compact CNN, the **student**, learns the **teacher**'s class probabilities (``[distill]
teacher``, default the run's saved predictor entry) instead of the hard labels, and is
saved as an ordinary verified predictor (same manifest checks, Grad-CAM, shift score,
prediction sets). The student is any candidate type that declares ``"soft_targets"`` in
``fit_accepts`` (``[distill] student``: a type and its params; default a deep scratch CNN).

Honest figures: the student is cross-validated on the run's own folds (work units
``units/distilled/fold<k>``). Fold k's student learns only the rows outside fold k, each
with its **out-of-fold** soft label (the teacher's probabilities for that row, from the
fold models that never saw that row's fold), and is scored on fold k. Those per-fold
scores are the leaderboard's ``distilled`` row; they measure the procedure that makes the
saved student (the same settings, fitted on every row with every row's out-of-fold soft
label). One second-order path remains and is stated, not hidden: the teacher's fold-m
models, whose out-of-fold rows in fold m teach fold k's student, were fitted on folds that
include fold k (as the stacked ensembles' per-fold meta-learners are; a fully nested
teacher would refit every member on each pair of folds).

Targets: ``(1 - hard_weight) * tempered(teacher) + hard_weight * one_hot(label)``, the
teacher's rows tempered by ``p ** (1 / temperature)`` renormalised.

Writes (the run directory's layout, :mod:`bench.run.rundir`): ``units/distilled/fold<k>/``,
``distill/final/`` (the student fitted on every row), ``distill/result.json``,
``oof/distilled.npy``, the leaderboard's ``distilled`` row (accuracy, images/s of the
saved student and of the run's predictor on the same 64-px arrays, size); and the
predictor at ``--out`` (default ``DIR/distilled``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.stats import conformal_sets as conformal
from bench.run.context import RunContext, Stage
from bench.run.leaderboard import make_table, to_markdown
from bench.run.rundir import RunDir
from bench.run.scheduling import make_executor
from bench.protocols.stress import add_stress_columns, predict_stressed, stress_shifts
from bench.run.units import fitted_record, seeded_entry
from core import registry
from core.calibration import fit_temperature
from core.candidate import build_candidate, fit_candidate, predict_proba_for, release_memory
from core.errors import BenchError
from bench.commands.outputs import check_not_inside, check_writable, run_lock
from core.io import atomic_write_json, read_json, stable_hash, staged
from core.metrics import base_metric, summarize
from core.progress import info, unit_progress
from core.shift import ShiftReference
from ensembles.predictor import load_predictor, save_predictor, verify_predictor
from ensembles.voting import SoftVoting

NAME = "distilled"  # the student's work units, out-of-fold file and leaderboard row


def soft_targets(
    teacher: np.ndarray, labels: np.ndarray, hard_weight: float, temperature: float
) -> np.ndarray:
    """Each row's target (module docstring): the teacher's probabilities tempered, mixed
    with the one-hot label."""
    p = np.clip(np.asarray(teacher, dtype=np.float64), 1e-12, None) ** (1.0 / temperature)
    p /= p.sum(axis=1, keepdims=True)
    hard = np.eye(p.shape[1])[np.asarray(labels)]
    return ((1.0 - hard_weight) * p + hard_weight * hard).astype(np.float32)


def _settings(run: RunDir):
    """The run's ``[distill]`` settings (its config.toml; defaults for a run made before
    the section existed) and the teacher entry's name."""
    s = run.config.distill
    return s, (s.teacher or run.state.get("predictor") or "")


def _student_entry(s, seed: int) -> dict:
    """The student's candidate entry, seeded as every work unit's (:func:`seeded_entry`)."""
    return seeded_entry({"type": s.student.type, "params": dict(s.student.params)}, seed)


def _teacher_targets(run: RunDir) -> tuple[np.ndarray, str]:
    s, teacher = _settings(run)
    oof = run.read_oof(teacher)
    return soft_targets(
        oof, run.labels, float(s.hard_weight), float(s.temperature)
    ), hashlib.sha256(oof.astype(np.float32).tobytes()).hexdigest()


def unit_hash(run: RunDir) -> str:
    """What a student unit depends on: the student, the target settings, the teacher's
    out-of-fold rows, the folds."""
    s, teacher = _settings(run)
    _, teacher_hash = _teacher_targets(run)
    return stable_hash(
        {
            "student": s.student.model_dump(),
            "hard_weight": s.hard_weight,
            "temperature": s.temperature,
            "teacher": teacher,
            "teacher_oof": teacher_hash,
            "folds": run.read_state()["fingerprint"]["folds"],
        }
    )


def student_unit(run_dir: str, fold: int) -> dict:
    """Fit fold ``fold``'s student on the other folds' rows and their out-of-fold soft
    labels; score it on fold ``fold`` (a work unit, ``units/distilled/fold<k>``)."""
    run = RunDir(run_dir)
    registry.import_plugins(run.config.run.plugins)
    s, teacher = _settings(run)
    seed = run.config.fold_seed(fold)
    targets, _ = _teacher_targets(run)
    train, test = run.folds.train(fold), run.folds.test(fold)
    classes = np.arange(len(run.classes))
    cand = build_candidate(_student_entry(s, seed))
    with run.staged_unit(NAME, fold) as tmp:
        t0 = time.perf_counter()
        fit_candidate(
            cand,
            np.asarray(run.images[train]),
            run.labels[train],
            classes=classes,
            workdir=tmp,
            soft_targets=targets[train],
        )
        t1 = time.perf_counter()
        X_test = np.asarray(run.images[test])
        proba = predict_proba_for(cand, X_test, classes)
        t2 = time.perf_counter()
        stressed = predict_stressed(
            cand, X_test, test, stress_shifts(run.config), run.config.run.seed, classes
        )
        cand.save(tmp / "model")
        result = {
            "candidate": NAME,
            "fold": fold,
            "type": s.student.type,
            "candidate_hash": unit_hash(run),
            "seed": seed,
            "teacher": teacher,
            "tuning": {},
            "tune_seconds": 0.0,
            **fitted_record(cand, run.labels[test], proba, len(train), t1 - t0, t2 - t1),
        }
        run.write_unit(tmp, result, proba, stressed)
    del cand
    release_memory()
    return result


def final_unit(run_dir: str) -> dict:
    """The saved student: the same settings fitted on every row with every row's
    out-of-fold soft label (``distill/final``)."""
    run = RunDir(run_dir)
    registry.import_plugins(run.config.run.plugins)
    s, _ = _settings(run)
    targets, _ = _teacher_targets(run)
    cand = build_candidate(_student_entry(s, run.config.run.seed))
    h = unit_hash(run)
    with staged(run.distill_final_dir) as tmp:
        t0 = time.perf_counter()
        fit_candidate(
            cand,
            np.asarray(run.images),
            run.labels,
            classes=np.arange(len(run.classes)),
            workdir=tmp / "log",
            soft_targets=targets,
        )
        cand.save(tmp / "model")
        out = {
            "candidate_hash": h,
            "fit_seconds": time.perf_counter() - t0,
            "epochs_run": getattr(cand, "epochs_run_", None),
            "model_size": cand.model_size(),
        }
        atomic_write_json(tmp / "result.json", out)
    del cand
    release_memory()
    return out


def _final_done(run: RunDir, h: str) -> bool:
    f = run.distill_final_dir / "result.json"
    return f.is_file() and read_json(f).get("candidate_hash") == h


def images_per_second(predictor, images: np.ndarray, repeats: int = 2) -> float:
    """``predictor.predict_proba`` throughput on ``images`` (model-size arrays): the best
    of ``repeats`` timed passes after a warm-up batch."""
    predictor.predict_proba(images[:64], preprocessed=True)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict_proba(images, preprocessed=True)
        best = min(best, time.perf_counter() - t0)
    return float(len(images) / best)


def _all_cores() -> None:
    os.environ["BLOODBENCH_TF_THREADS"] = "0"


def speeds(run_dir: str, predictors: list[str], n: int, seed: int = 0) -> list[float]:
    """Images/s of each saved predictor on the same ``n`` of the run's images (seeded)."""
    run = RunDir(run_dir)
    rows = np.sort(np.random.default_rng(seed).choice(len(run.labels), n, replace=False))
    sample = np.asarray(run.images[rows])
    return [images_per_second(load_predictor(p), sample) for p in predictors]


def check_distill(run: RunDir, out: Path) -> tuple:
    """Every refusal before any fit: a finished run with a saved predictor, a teacher with
    out-of-fold rows, a free entry name, a student that learns soft targets, an ``--out``
    that is empty, new, or an earlier distilled predictor."""
    if not run.is_run():
        raise BenchError(f"--run {run.path}: not a bloodbench run directory (no state.json)")
    run.check_finished()
    registry.import_plugins(run.config.run.plugins)
    if not run.predictor_dir.is_dir():
        raise BenchError(
            f"--run {run.path}: the run has no saved predictor (run it to the end, "
            "or resume it with `python -m bench run --out DIR`)"
        )
    cfg = run.config
    if cfg.data.bags:
        raise BenchError(
            f"--run {run.path}: a bag task (patients); bench distill trains a "
            "cell-level student and does not carry the patient calls"
        )
    if NAME in cfg.candidates or NAME in cfg.ensembles:
        raise BenchError(
            f"--run {run.path}: the run has an entry named '{NAME}', the name "
            "of the distilled row; rename it"
        )
    s, teacher = _settings(run)
    if not teacher or not run.oof_file(teacher).is_file():
        raise BenchError(
            f"[distill] teacher '{teacher}': no out-of-fold probabilities in "
            f"{run.path / 'oof'} (an entry of the leaderboard)"
        )
    cls = registry.get(s.student.type)
    if "soft_targets" not in cls.fit_accepts:
        raise BenchError(f"[distill] student type '{s.student.type}' cannot learn soft targets")
    out = Path(out)
    # never inside a predictor, nor elsewhere in the run than its own distilled/ folder
    check_not_inside(out, "--out", reads=(run.path,), allowed=(run.path / NAME,))
    check_writable(run.path, "--run")  # the student folds are written into the run
    check_writable(out, "--out")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        try:
            earlier = verify_predictor(out).distilled
        except BenchError:
            earlier = None
        if not earlier:
            raise BenchError(
                f"--out {out}: exists and is not a predictor written by bench "
                "distill; choose a new folder (nothing is overwritten)"
            )
    return s, teacher


def distill(run_dir, out=None, workers: int | None = None) -> dict:
    """Train, score and save the student of the run in ``run_dir`` (module docstring);
    returns the leaderboard row (also in ``distill/result.json``)."""
    run = RunDir(Path(run_dir).expanduser())
    out = Path(out).expanduser() if out else run.path / NAME
    s, teacher = check_distill(run, out)
    with run_lock(run.path, "bench distill"):
        return _distill(run, out, s, teacher, workers)


def _distill(run: RunDir, out: Path, s, teacher: str, workers: int | None) -> dict:
    cfg = run.config
    folds = run.folds
    h = unit_hash(run)
    todo = [(str(run.path.resolve()), k) for k in folds.fold_ids if not run.unit_done(NAME, k, h)]
    if len(todo) < len(folds.fold_ids):
        info(
            f"resuming: {len(folds.fold_ids) - len(todo)} of {len(folds.fold_ids)} student "
            "folds already done"
        )
    jobs = [(student_unit, t) for t in todo]
    if not _final_done(run, h):
        jobs.append((final_unit, (str(run.path.resolve()),)))
    executor = make_executor(workers or cfg.run.workers)
    with unit_progress(len(jobs), f"distilling '{teacher}' into one {s.student.type}") as advance:
        for fn in (student_unit, final_unit):  # one kind of unit per map
            args = [a for f, a in jobs if f is fn]
            for a, res in executor.map_unordered(fn, args):
                advance(
                    f"fold {a[1]}: acc {res['metrics']['accuracy']:.3f}"
                    if fn is student_unit
                    else "student on every row"
                )
    return _publish(run, out, s, teacher)


def distilled_row(run: RunDir) -> dict | None:
    """The leaderboard row of an earlier ``bench distill`` of this run, while it still
    holds: its student folds were fitted on the teacher's current out-of-fold rows
    (``bench run`` resumed with unchanged units keeps the row; otherwise it is dropped and
    ``bench distill`` refits)."""
    f = run.distill_dir / "result.json"
    if not f.is_file() or not run.oof_file(NAME).is_file():
        return None
    try:
        h = unit_hash(run)
    except BenchError:  # the teacher's out-of-fold rows are gone
        return None
    if not all(run.unit_done(NAME, k, h) for k in run.folds.fold_ids):
        return None
    return read_json(f).get("row")


def _publish(run: RunDir, out: Path, s, teacher: str) -> dict:
    cfg = run.config
    folds, y = run.folds, run.labels
    results = [run.unit_result(NAME, k) for k in folds.fold_ids]
    oof = np.zeros((len(y), len(run.classes)))
    for k, _, test in folds:
        oof[test] = run.unit_proba(NAME, k)
    run.write_oof(NAME, oof)
    stored = run.read_oof(NAME)  # as written (float32), as the report reads it
    final = read_json(run.distill_final_dir / "result.json")
    pred_cfg = cfg.predictor
    calibration = {}
    if pred_cfg.temperature_scaling:
        calibration = {
            "calibration": {
                "method": "temperature scaling",
                "temperature": fit_temperature(y, stored),
                "fitted_on": "out-of-fold probabilities of the cross-validated students",
            }
        }
    teacher_record = verify_predictor(run.predictor_dir)
    prep = teacher_record.prep
    row = {
        "candidate": NAME,
        "kind": "distilled",
        **summarize([r["metrics"] for r in results]),
        "fit_seconds": float(np.mean([r["fit_seconds"] for r in results])),
        "predict_ms_per_image": float(np.mean([r["predict_ms_per_image"] for r in results])),
        "model_size": final["model_size"],
        "n_folds": len(results),
        "members": teacher,
        "tuning": f"distilled from '{teacher}'",
    }
    teacher_row = (
        run.read_leaderboard().set_index("candidate").loc[teacher]
        if teacher in set(run.read_leaderboard()["candidate"])
        else None
    )
    shifts = stress_shifts(cfg)
    if shifts:
        stressed = {sh: {NAME: np.zeros_like(oof)} for sh in shifts}
        for k, _, test in folds:
            for sh in shifts:
                f = run.unit_stress_file(NAME, k, sh)
                if f.is_file():
                    stressed[sh][NAME][test] = np.load(f)
        add_stress_columns([row], stressed, y, folds, base_metric(cfg.run.metric))
    stress_cols = [c for c in row if c.startswith("stress_")]

    def figures(r) -> dict:
        return {
            m: float(r[m])
            for m in ["accuracy", "macro_f1", *stress_cols]
            if m in r and r[m] == r[m]
        }

    conf_settings = pred_cfg.conformal.model_copy(update={"scheme": "split"})  # one model
    extra = {
        "chosen_by": f"bench distill: one {s.student.type} trained on the out-of-fold "
        f"probabilities of '{teacher}'",
        "distilled": {
            "teacher": teacher,
            "student": s.student.model_dump(),
            "hard_weight": float(s.hard_weight),
            "temperature": float(s.temperature),
            "cross_validated": figures(row),
            "teacher_cross_validated": None if teacher_row is None else figures(teacher_row),
        },
        "leaderboard": {
            m: float(row[m])
            for m in dict.fromkeys([base_metric(cfg.run.metric), "accuracy", "macro_f1"])
        },
        "member_models": "one student fitted on every row (the cross-validated students "
        "give its figures)",
        **calibration,
        **conformal.predictor_extra(
            run, conf_settings, y, stored, folds, NAME, calibration, stored
        ),
    }
    save_predictor(
        out,
        ensemble_name=NAME,
        ensemble=SoftVoting().fit([stored], y),
        members={NAME: [run.distill_final_dir / "model"]},
        member_info={NAME: {"type": s.student.type, "kind": "cnn", "weight": 1.0}},
        classes=run.classes,
        preprocessing=prep,
        training_data=teacher_record.training_data or {},
        extra=extra,
        tta="none",
        shift=ShiftReference.fit(np.asarray(run.images)),
    )
    verify_predictor(out)
    # images/s of the student and of the run's predictor on the same model-size arrays,
    # in a fresh process with every core for TensorFlow (as `bench predict` runs)
    n = min(int(s.speed_images), len(y))
    student_ips = teacher_ips = float("nan")
    if n:
        with ProcessPoolExecutor(
            1, mp_context=mp.get_context("spawn"), initializer=_all_cores
        ) as pool:
            student_ips, teacher_ips = pool.submit(
                speeds, str(run.path), [str(out), str(run.predictor_dir)], n
            ).result()
    row.update(
        {"images_per_s": student_ips, "teacher_images_per_s": teacher_ips, "speed_images": n}
    )
    conformal.add_leaderboard_columns([row], {NAME: stored}, y, folds, pred_cfg.conformal)
    board = run.read_leaderboard()
    board = board[board["candidate"] != NAME]
    rows = board.to_dict("records") + [row]
    metric = cfg.run.metric
    metric = metric if metric in board else base_metric(metric)  # the board's own order
    board = make_table(rows, metric)
    run.write_leaderboard(board, to_markdown(board, metric))
    summary = {
        **row,
        "row": row,
        "teacher": teacher,
        "predictor": str(out),
        "final_fit_seconds": final["fit_seconds"],
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(run.distill_dir / "result.json", summary)
    return summary


def _keep_distilled(ctx: RunContext) -> None:
    kept = distilled_row(ctx.run)
    if kept is not None:  # an earlier `bench distill` whose teacher rows are unchanged
        metric = ctx.board_metric
        ctx.board = make_table(ctx.board.to_dict("records") + [kept], metric)
        ctx.write_board(metric)


#: the row of an earlier ``bench distill`` kept on the leaderboard while it holds
STAGE = Stage("distilled_row", _keep_distilled, lambda ctx: ctx.predictor, timed=False)


__all__ = [
    "distill",
    "distilled_row",
    "soft_targets",
    "student_unit",
    "final_unit",
    "images_per_second",
    "NAME",
]
