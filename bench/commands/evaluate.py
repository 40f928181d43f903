"""Score a saved predictor on a labelled external image set: ``python -m bench evaluate``.

::

    python -m bench evaluate --model runs/quick/predictor --data ../shared/data/deepapl/images \\
        --labels ../shared/data/deepapl/cells.csv:pbc_class --groups patient --out eval_deepapl

    from bench.commands.evaluate import evaluate
    result = evaluate("runs/quick/predictor", "other_lab/", class_map="map.toml")

Data: a class-folder tree, an ``.npz``, a ``[datasets.NAME]`` of the config, or a folder
plus a CSV label column (``--labels FILE.csv:COLUMN``; the CSV's ``file`` column is matched
to image files relative to the CSV's folder or to the image folder; rows with an empty
label are left out and counted). Images are read at their own resolution and go through
the predictor's own :class:`core.images.Preprocessing`, as in ``predict``.

External class names map onto the predictor's classes case-insensitively by name, or as a
``--class-map`` (TOML ``external = "predictor"`` or CSV ``external,predictor``; an entry
overrides the name match, an empty predictor class leaves the external class out).
Unmapped classes are listed with their counts and left out. Every problem with the
arguments (missing file, bad column, a map naming a class the predictor lacks, no
overlap) is one :class:`BenchError` before any model is loaded.

Scores are over the classes present in the set, with the predictor's full argmax and with
the argmax restricted to the present classes; 95 % CIs by a seeded percentile bootstrap
over images, or over groups (``--groups COLUMN``, e.g. patients) when given.

This module runs an evaluation (:func:`evaluate`) and sums it up (:func:`summary`); the
set is listed and mapped by :mod:`bench.data.external_data`, scored by :mod:`bench.stats.scoring`,
and its page drawn by :mod:`bench.report.evaluation`.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.data.external_data import load_external, map_classes, read_class_map
from bench.run.leaderboard import fmt
from bench.report.evaluation import gradcam_gallery, predictions_csv, write_page
from bench.report.html import slug
from bench.stats.scoring import (
    METRIC_KEYS,
    verdict_of_score,
    in_domain,
    stats_of_run,
    per_external_class,
    score,
    score_patients,
)
from core.errors import BenchError
from bench.commands.outputs import OutputFolder, run_of
from core.io import atomic_write_json, atomic_write_text, package_versions
from bench.stats import conformal_sets as conformal
from core.metrics import metric_label
from core.progress import progress_iter, warn
from ensembles.bags import call_bags
from ensembles.predictor import load_predictor, verify_predictor
from ensembles.tta import TTA_VIEWS

EVAL_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
PATIENTS_FILE = "patients.csv"  # a bag predictor's calls per group (--groups)
# what an evaluation folder holds: an --out with anything else is never replaced
OUTPUTS = {EVAL_FILE, PREDICTIONS_FILE, PATIENTS_FILE, "index.html", "img", "csv"}
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- output folder


def default_out(name: str) -> Path:
    return Path.cwd() / f"evaluation-{slug(name)}"


def output_folder(out: Path, predictor_dir: Path) -> OutputFolder:
    """The ``--out`` folder (:class:`bench.commands.outputs.OutputFolder`): new, empty, or an earlier
    evaluation (its files replaced, nothing else touched); never inside the predictor or
    its run. A folder of an evaluation written before the marker existed is moved aside
    whole (``OUT.old-<timestamp>``), nothing deleted."""
    return OutputFolder(
        out, "bench evaluate", "--out", reads=(predictor_dir, run_of(predictor_dir)), legacy=_legacy
    )


def _legacy(out: Path) -> Path | None:
    names = {e.name for e in out.iterdir()}
    if EVAL_FILE not in names or names - OUTPUTS:
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while aside.exists():
        aside, n = out.with_name(f"{out.name}.old-{stamp}-{n}"), n + 1
    return aside


# ----------------------------------------------------------------------------- predicting


def predict_items(pred, items, batch_size: int, show: bool, groups=None, on_batch=None):
    """``(proba, ok, errors, fold_proba, shift)`` of every item
    (:meth:`Predictor.predict_batches`, each file decoded once): rows of unreadable items
    are zeros (``ok`` False); ``fold_proba`` (n_folds, N, K) when the predictor's
    prediction sets are cross-conformal, else ``None``; ``shift`` each image's shift score
    (``None`` for a predictor without a description of its training images).

    A bag predictor that normalises colour per patient (``[patients] bag_colour``) reads
    each group of ``groups`` (its patient) as one bag, as ``predict --bags`` does; it
    needs them. ``on_batch(rows, X)``: called with each batch's readable positions and
    their model input, as decoded for the prediction (nothing read twice)."""
    if pred.bag_colour_ != "none":
        if groups is None:
            raise BenchError(
                f"predictor {pred.path} normalises colour per patient "
                f'([patients] bag_colour = "{pred.bag_colour_}"): give '
                "--groups COLUMN so each patient's cells are read together"
            )
        return _predict_by_group(pred, items, groups, batch_size, show, on_batch)
    k = len(pred.classes_)
    proba = np.zeros((len(items), k))
    fold_proba = np.zeros((pred.n_folds_, len(items), k)) if pred.needs_fold_proba_ else None
    ref = pred.shift_reference_
    shift = np.zeros(len(items)) if ref is not None else None
    ok = np.zeros(len(items), dtype=bool)
    errors = []
    for rows, X, _, p, errs, pf in pred.predict_batches(
        items, batch_size, desc="evaluating", show=show
    ):
        errors += errs
        if len(rows):
            proba[rows] = p
            ok[rows] = True
            if fold_proba is not None:
                fold_proba[:, rows] = pf
            if shift is not None:
                shift[rows] = ref.score(X)
            if on_batch is not None:
                on_batch(rows, X)
    return proba, ok, errors, fold_proba, shift


def _predict_by_group(pred, items, groups, batch_size: int, show: bool, on_batch=None):
    """:func:`predict_items` one group (bag) at a time, its cells colour-normalised
    together (:meth:`Predictor.load_bag`, as :meth:`Predictor.predict_bags`)."""
    k = len(pred.classes_)
    proba, ok = np.zeros((len(items), k)), np.zeros(len(items), dtype=bool)
    fold_proba = np.zeros((pred.n_folds_, len(items), k)) if pred.needs_fold_proba_ else None
    ref = pred.shift_reference_
    shift = np.zeros(len(items)) if ref is not None else None
    errors = []
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for g, idx in progress_iter(
        by_group.items(), total=len(by_group), desc="patients", enabled=show and len(by_group) > 1
    ):
        X, good, errs = pred.load_bag([items[i] for i in idx])
        errors += [(idx[j], exc) for j, exc in errs]
        if not good:
            continue
        rows = np.asarray(idx)[good]
        out = pred.predict_proba(X, batch_size, folds=fold_proba is not None, one_bag=True)
        p, pf = out if fold_proba is not None else (out, None)
        proba[rows], ok[rows] = p, True
        if fold_proba is not None:
            fold_proba[:, rows] = pf
        if shift is not None:
            shift[rows] = ref.score(X)
        if on_batch is not None:
            on_batch(rows, X)
    return proba, ok, errors, fold_proba, shift


def _clean(obj):
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python, private ``_`` keys dropped."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------- entry point


def _map_set(ext, classes: list[str], user_map, map_src):
    """The set's classes onto the predictor's: ``(mapping, unused --class-map entries,
    {unmapped class: images})``; a set none of whose classes maps is refused."""
    external = sorted(set(ext.labels))
    mapping, unused = map_classes(external, classes, user_map, map_src)
    counts = pd.Series(ext.labels).value_counts()
    unmapped = {e: int(counts[e]) for e in external if mapping[e] is None}
    if len(unmapped) == len(external):
        raise BenchError(
            f"no class of {ext.path} maps onto the predictor's classes "
            f"({', '.join(classes)}); the set's classes: "
            f"{', '.join(external[:12])}{' ...' if len(external) > 12 else ''}; "
            'give --class-map FILE (TOML external = "predictor", or CSV '
            "external,predictor)"
        )
    for u in unused:
        warn(f"--class-map entry '{u}' names no class of the set")
    return mapping, unused, unmapped


def _check_arguments(predictor_dir, batch_size, n_boot) -> Path:
    """The numbers given, and that ``predictor_dir`` is a folder (before any work)."""
    if int(batch_size) < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    if n_boot is not None and int(n_boot) < 1:
        raise BenchError(f"the bootstrap needs at least one resample, got {n_boot}")
    predictor_dir = Path(predictor_dir).expanduser()
    if not predictor_dir.is_dir():
        raise BenchError(f"--model not found: {predictor_dir}")
    return predictor_dir


def _data_fields(ext, groups) -> dict:
    """What ``evaluation.json`` records of the set scored."""
    return {
        "path": str(ext.path.resolve()),
        "name": ext.name,
        "kind": ext.kind,
        "groups": groups,
        "n_listed": len(ext.items) + sum(ext.left_out.values()),
        "skipped": ext.skipped[:50],
        "n_skipped": len(ext.skipped),
        **ext.info,
    }


def _groups_of(ext, keep):
    """The scored images' groups (an image without one is its own group) and how many had
    none; ``(None, 0)`` without groups."""
    if ext.groups is None:
        return None, 0
    grp = [ext.groups[i] for i in keep]
    return [g if g else f"\0image{i}" for i, g in zip(keep, grp)], sum(1 for g in grp if not g)


def _in_domain(predictor_dir, record, sc: dict, ece_bins: int):
    """The run's own out-of-fold figures beside the set's (each class's recall added to
    ``sc["per_class"]``), or ``(None, why)``."""
    dom, note = in_domain(predictor_dir, record, sc["present_classes"], ece_bins=ece_bins)
    if dom is not None:
        for r in sc["per_class"]:
            r["recall_in_domain"] = dom["recall"].get(r["class"], math.nan)
    return dom, note


def _publish(
    guard, result: dict, t, ext, keep, grp, classes, y, proba, sc, patients, dom, cells, gal
) -> dict:
    """Write the evaluation's files into its folder (staged, then published); ``t``: the
    start and the scoring's start (``perf_counter``). Returns ``evaluation.json``'s content."""
    t0, t2 = t
    with guard.staged() as tmp:
        _write_tables(tmp, ext, keep, grp, classes, y, proba, sc, patients)
        t3 = time.perf_counter()
        result["timings"]["scoring_s"] = t3 - t2
        write_page(tmp, result, ext, keep, y, proba, sc, dom, cells, gal)
        result["timings"]["report_s"] = time.perf_counter() - t3
        result["timings"]["total_s"] = time.perf_counter() - t0
        clean = _clean(result)
        atomic_write_json(tmp / EVAL_FILE, clean)
    if guard.moved_aside is not None:
        warn(
            f"{guard.path} held an earlier evaluation without a record of its files; it was "
            f"moved aside whole to {guard.moved_aside}"
        )
    return clean


def _load(predictor_dir, tta, adapt, items, seed):
    """The predictor, with ``--tta`` instead of its own views, adapted (``--adapt bn``) on
    the set's own ``items``; and what the adaptation did."""
    pred = load_predictor(predictor_dir)
    if tta is not None:
        if tta not in TTA_VIEWS:
            raise BenchError(f"--tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
        pred.tta = tta
    if adapt is None:
        return pred, None
    if adapt != "bn":
        raise BenchError(f"--adapt must be 'bn', got {adapt!r}")
    return pred, pred.adapt(items, seed=seed)


def _say_unreadable(errors, ok, n: int, where) -> None:
    """The first unreadable images, a count of the rest; none readable is an error."""
    for _, exc in errors[:10]:
        warn(f"skipped {exc}")
    if len(errors) > 10:
        warn(f"... and {len(errors) - 10} more unreadable images")
    if not ok.any():
        raise BenchError(f"none of the {n} mapped images of {where} could be read")


class _CellTypes:
    """The cell-type stage's probabilities of the scored cells, collected from the
    prediction's own decoded batches (``on_batch`` of :func:`predict_items`); ``None``
    for a predictor whose bag task reads no cell types."""

    def __init__(self, pred, n: int):
        stage = pred.bag_task_.cell_types if pred.bag_task_ is not None else None
        self.pred = pred
        self.proba = None if stage is None else np.zeros((n, len(stage.types)))

    def __call__(self, rows, X) -> None:
        self.proba[rows] = self.pred.cell_type_proba(X)[0]

    @property
    def hook(self):
        return None if self.proba is None else self


def _patients(pred, grp, proba, y, shift, skipped_groups, type_proba):
    """A bag predictor's call per patient, as ``predict --bags`` makes it (``None`` for
    other predictors or a set without groups)."""
    spec = pred.bag_task_
    if spec is None or grp is None:
        return None
    classes = [str(c) for c in pred.classes_]
    cell = [j for j, g in enumerate(grp) if not g.startswith("\0")]  # cells of a patient
    return score_patients(
        call_bags(
            spec,
            classes,
            [grp[j] for j in cell],
            proba[cell, classes.index(spec.positive)],
            labels=[classes[y[j]] for j in cell],
            skipped_groups=skipped_groups,
            shift=None if shift is None else shift[cell],
            type_proba=None if type_proba is None else type_proba[cell],
        ),
        spec.positive,
    )


def _predictor_fields(record, pred) -> dict:
    """What ``evaluation.json`` records of the predictor scored."""
    return {
        "ensemble": record.ensemble.name,
        "type": record.ensemble.type,
        "manifest_sha256": record.manifest_sha256,
        "classes": list(record.classes),
        "image_size": pred.image_size,
        "tta": pred.tta,
        "members": [
            {"name": m.name, "kind": m.kind, "fold_models": len(m.models)} for m in record.members
        ],
        "temperature": record.temperature,
    }


def _write_tables(tmp: Path, ext, keep, grp, classes, y, proba, sc, patients) -> None:
    """``predictions.csv`` and (a bag predictor) ``patients.csv`` into ``tmp``."""
    atomic_write_text(
        tmp / PREDICTIONS_FILE,
        predictions_csv(
            [ext.shown[i] for i in keep],
            [ext.labels[i] for i in keep],
            [g if not g.startswith("\0") else "" for g in grp] if grp is not None else None,
            classes,
            y,
            proba,
            sc["_pred"],
            sc["_pred_r"],
        ),
    )
    if patients is not None:
        atomic_write_text(
            tmp / PATIENTS_FILE,
            pd.DataFrame(patients["rows"]).to_csv(index=False, float_format="%.6f"),
        )


def evaluate(
    predictor_dir,
    data,
    *,
    labels=None,
    class_map=None,
    groups=None,
    out=None,
    batch_size: int = 128,
    gradcam: bool = True,
    config=None,
    n_boot: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    tta: str | None = None,
    adapt: str | None = None,
) -> dict:
    """Score the predictor in ``predictor_dir`` on a labelled external set.

    Parameters
    ----------
    predictor_dir : a saved predictor (``DIR/predictor``).
    data : a class-folder tree, an ``.npz``, a ``[datasets.NAME]`` of ``config``, or (with
        ``labels``) a folder of images.
    labels : ``"FILE.csv:COLUMN"`` or ``(file, column)``: labels from a CSV column.
    class_map : a ``.toml``/``.csv`` file or a dict ``{external: predictor class}``.
    groups : a column of the ``labels`` CSV (e.g. patients): the bootstrap resamples groups.
    tta : test-time views to use instead of the predictor's own ``[predictor] tta``
        (``"none"``, ``"flips"``, ``"d4"``); recorded in ``evaluation.json``.
    adapt : ``"bn"``: unsupervised test-time adaptation (AdaBN) on the set's own images
        before predicting; transductive, so it is recorded and reported apart.
    out : output folder; default ``./evaluation-<dataset name>``.
    batch_size : images per ``predict_proba`` call.
    gradcam : draw the Grad-CAM gallery of errors (CNN members only).
    config : config file for ``[datasets.NAME]`` (default ``benchmarks.toml``).
    n_boot, seed : bootstrap resamples and seed (default: ``[stats] n_boot`` and ``seed``
        of the predictor's run, as its level and ECE bins; else their defaults).

    Returns
    -------
    The content of ``evaluation.json`` plus ``"out"`` (the folder written).
    """
    t0 = time.perf_counter()
    predictor_dir = _check_arguments(predictor_dir, batch_size, n_boot)
    guard = output_folder(Path(out).expanduser(), predictor_dir).check() if out else None
    ext = load_external(data, labels=labels, groups=groups, config=config)
    user_map, map_src = read_class_map(class_map)
    if guard is None:
        guard = output_folder(default_out(ext.name), predictor_dir).check()
    out = guard.path
    record = verify_predictor(predictor_dir)  # checksums; loads no model
    stats, stats_src = stats_of_run(predictor_dir)
    seed = stats.seed if seed is None else int(seed)
    classes = list(record.classes)
    mapping, unused, unmapped = _map_set(ext, classes, user_map, map_src)
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([i for i, lab in enumerate(ext.labels) if mapping[lab] is not None])
    keep = conformal.leave_out_calibration_rows(record, ext, keep)  # bench calibrate's
    t_list = time.perf_counter() - t0

    pred, adaptation = _load(predictor_dir, tta, adapt, [ext.items[i] for i in keep], seed)
    t1 = time.perf_counter()
    items = [ext.items[i] for i in keep]
    types = _CellTypes(pred, len(items))  # a bag task's cell types, from the same batches
    proba, ok, errors, fold_proba, shift = predict_items(
        pred,
        items,
        int(batch_size),
        progress,
        groups=None if ext.groups is None else [ext.groups[i] for i in keep],
        on_batch=types.hook,
    )
    t_pred = time.perf_counter() - t1
    _say_unreadable(errors, ok, len(items), ext.path)
    unread = keep[~ok]
    keep, proba = keep[ok], proba[ok]
    fold_proba = None if fold_proba is None else fold_proba[:, ok]
    shift = None if shift is None else shift[ok]
    y = np.array([index[mapping[ext.labels[i]]] for i in keep], dtype=np.int64)
    grp, empty_groups = _groups_of(ext, keep)
    t2 = time.perf_counter()
    sc = score(
        y, proba, classes, groups=grp, n_boot=n_boot, stats=stats.model_copy(update={"seed": seed})
    )
    sc["bootstrap"]["settings"] = stats_src
    patients = _patients(
        pred,
        grp,
        proba,
        y,
        shift,
        [ext.groups[i] for i in unread if ext.groups[i]] if grp else None,
        None if types.proba is None else types.proba[ok],
    )
    dom, dom_note = _in_domain(predictor_dir, record, sc, stats.ece_bins)
    cells, gal = gradcam_gallery(
        pred,
        items=[ext.items[i] for i in keep],
        y=y,
        pred_full=sc["_pred"],
        proba=proba,
        present=np.unique(y),
        gradcam=gradcam,
        seed=int(seed),
    )
    left = {
        **ext.left_out,
        **({"unmapped_class": int(sum(unmapped.values()))} if unmapped else {}),
        **({"unreadable": len(errors)} if errors else {}),
    }
    result = {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "predictor": {
            "path": str(predictor_dir.resolve()),
            **_predictor_fields(record, pred),
            "adaptation": adaptation,
        },
        "data": _data_fields(ext, groups),
        "class_map": {
            "source": map_src,
            "map": mapping,
            "unmapped": unmapped,
            "unused_entries": unused,
        },
        "n": int(len(y)),
        "n_left_out": int(sum(left.values())),
        "left_out": left,
        "counts": {classes[c]: int((y == c).sum()) for c in np.unique(y)},
        **{k: v for k, v in sc.items()},
        "per_external_class": per_external_class(
            [ext.labels[i] for i in keep], y, sc["_pred"], mapping, classes
        ),
        "in_domain": dom,
        "in_domain_note": dom_note,
        **conformal.evaluation_figures(
            record.conformal, len(record.classes), proba, y, shift, fold_proba=fold_proba
        ),
        "gradcam": gal,
        "patients": patients,
        "versions": package_versions(),
    }
    if empty_groups:
        result["data"]["images_without_group"] = empty_groups
    result["verdict"] = set_verdict(result, record, stats)
    result["batch_check"] = pred.batch_check(proba)
    if result["batch_check"] and result["batch_check"]["flagged"]:
        warn(result["batch_check"]["line"])
    result["timings"] = {
        "listing_s": t_list,
        "predict_s": t_pred,
        "images_per_s": len(items) / t_pred if t_pred > 0 else None,
    }
    clean = _publish(
        guard, result, (t0, t2), ext, keep, grp, classes, y, proba, sc, patients, dom, cells, gal
    )
    return {**clean, "out": str(out)}


def set_verdict(r: dict, record, stats) -> dict:
    """The plain-words verdict of an evaluation (:func:`bench.stats.scoring.verdict`): its
    balanced accuracy with the interval, against the run's in-lab figure on the same classes
    (else the predictor's recorded one), and the share that would go to review."""
    dom = r.get("in_domain")
    in_lab = (
        dom["same_classes"]["balanced_accuracy"]
        if dom
        else (record.leaderboard or {}).get("balanced_accuracy")
    )
    review = (r.get("conformal") or {}).get("share_flagged")
    unit = r["bootstrap"]
    what = "images" if unit["unit"] != "group" else f"images ({unit['n_units']} groups)"
    used = [
        w
        for w, k in (
            ("calibrate", "calibration_rows_left_out"),
            ("adapt", "adaptation_rows_left_out"),
        )
        if r["data"].get(k)
    ]
    if used:
        what += " not used to " + " or ".join(used)
    return verdict_of_score(r, r["n"], stats, in_lab=in_lab, review_share=review, what=what)


# ----------------------------------------------------------------------------- summary


def summary(result: dict) -> str:
    """One screen of text: what was scored, the scores with CIs, per class, where."""
    r = result
    b = r["bootstrap"]
    unit = (
        f"{b['n_units']} groups ({r['data'].get('groups')})"
        if b["unit"] == "group"
        else f"{b['n_units']} images"
    )
    lines = [
        f"evaluated {r['predictor']['path']} ({r['predictor']['ensemble']}) on {r['data']['path']}"
    ]
    left = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["left_out"].items() if v)
    lines.append(
        f"  {r['n']} images scored, {r['n_left_out']} left out" + (f" ({left})" if left else "")
    )
    if r["class_map"]["unmapped"]:
        lines.append(
            "  unmapped classes: "
            + ", ".join(
                f"{k} {v}"
                for k, v in sorted(r["class_map"]["unmapped"].items(), key=lambda kv: -kv[1])
            )
        )
    pres = r["present_classes"]
    lines.append(
        f"  classes present: {len(pres)} of {len(r['predictor']['classes'])}"
        + (f" (absent: {', '.join(r['absent_classes'])})" if r["absent_classes"] else "")
    )
    dom = r.get("in_domain")
    lines.append(
        f"  {'':20s}{'full argmax':>24s}{'restricted argmax':>26s}"
        + ("   in-domain" if dom else "")
    )
    for m in METRIC_KEYS:
        ci, cr = r["ci"][m], r["ci"]["restricted"][m]
        lines.append(
            f"  {metric_label(m):20s}{fmt(r[m]):>8s} [{fmt(ci['lo'])}, "
            f"{fmt(ci['hi'])}]{fmt(r['restricted'][m]):>10s} [{fmt(cr['lo'])}, "
            f"{fmt(cr['hi'])}]" + (f"{fmt(dom['same_classes'][m]):>12s}" if dom else "")
        )
    lines.append(
        f"  95% CIs: percentile bootstrap, {b['resamples']} resamples of {unit}, "
        f"seed {b['seed']}"
        + ("; in-domain: the run's out-of-fold predictions on the same classes" if dom else "")
    )
    lines.append(
        f"  {'class':16s}{'n':>7s}{'precision':>11s}{'recall':>8s}{'F1':>7s}"
        + ("  recall in-domain" if dom else "")
    )
    for p in r["per_class"]:
        lines.append(
            f"  {p['class'][:16]:16s}{p['support']:>7d}{fmt(p['precision']):>11s}"
            f"{fmt(p['recall']):>8s}{fmt(p['f1']):>7s}"
            + (f"{fmt(p.get('recall_in_domain')):>18s}" if dom else "")
        )
    if r.get("per_external_class"):
        names = [f"{e['external_class']} -> {e['mapped_to']}" for e in r["per_external_class"]]
        head = "the set's own classes"
        w = min(max(len(n) for n in names + [head]), 44)
        lines.append(f"  {head:{w}s}{'n':>7s}{'recall':>8s}  most frequent wrong answers")
        for name, e in zip(names, r["per_external_class"]):
            lines.append(
                f"  {name[:w]:{w}s}{e['n']:>7d}{fmt(e['recall']):>8s}  "
                + ", ".join(f"{c} {n}" for c, n in e["wrong"])
            )
    pat = r.get("patients")
    if pat:
        lines.append(
            f"  patients ({r['data'].get('groups')}): {pat['n']}, called "
            f"{pat['n_called']}, refer {pat['n_refer']} (column reason), none (no "
            f"readable image) {pat['n_none']}; {pat['positive']} ROC AUC "
            f"{fmt(pat['roc_auc'])}, sensitivity {fmt(pat['sensitivity'])}, "
            f"specificity {fmt(pat['specificity'])} of the called; at the "
            f"threshold alone {fmt(pat['sensitivity_at_threshold'])} / "
            f"{fmt(pat['specificity_at_threshold'])} ({PATIENTS_FILE})"
        )
    lines += conformal.summary_lines(r)
    if not dom and r.get("in_domain_note"):
        lines.append(f"  {r['in_domain_note']}")
    if r.get("verdict"):
        lines.append(f"verdict: {r['verdict']['line']}")
    t = r.get("timings", {})
    lines.append(
        f"  wrote {Path(r['out']) / 'index.html'} ({EVAL_FILE}, {PREDICTIONS_FILE}); "
        f"{t.get('total_s', 0):.0f} s, {t.get('images_per_s') or 0:.0f} images/s"
    )
    return "\n".join(lines)


__all__ = ["evaluate", "summary", "predict_items", "EVAL_FILE", "PREDICTIONS_FILE"]
