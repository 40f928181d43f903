"""``python -m bench calibrate``: recalibrate a predictor's prediction sets for a new lab.

::

    python -m bench calibrate --model runs/quick/predictor --data ../shared/data/deepapl/images \\
        --labels ../shared/data/deepapl/cells.csv:pbc_class --groups patient --n 100 \\
        --out runs/quick/predictor_deepapl

draws ``--n`` labelled images of the new lab (seeded; stratified by class, or with
``--groups`` at most ``--per-group`` images of each patient, patients in a seeded order, the
rest of every patient drawn from left out of the evaluation), refits the
conformal thresholds (and the review threshold) on the predictor's probabilities of those
images, and writes a new predictor to ``--out``: the same members, a new ``conformal`` entry
that records the drawn images and the previous calibration, a new MODEL_CARD.md. The
original predictor is only read. ``bench evaluate`` of the new predictor on the same data
leaves the drawn images (and the rest of a cut patient) out and reports the coverage of
both calibrations on the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from bench.stats.draws import draw

from bench.commands.evaluate import predict_items, load_external, map_classes, read_class_map
from bench.stats.scoring import score, stats_of_run, verdict_of_score
from core.conformal import (
    METHODS,
    ConformalSets,
    check_confidence,
    review_of,
    review_threshold,
    set_minimum,
)
from core.errors import BenchError
from bench.commands.outputs import check_not_inside, check_writable, folder_size, run_of
from core.io import atomic_write_json, atomic_write_text, file_sha256, link_or_copy, staged
from core.progress import info, warn

from ensembles.model_card import CARD, model_card
from ensembles.predictor import MANIFEST, load_predictor, manifest_digest, verify_predictor
from ensembles.record import PredictorRecord, Review


def add_calibrate_parser(sub, add_common) -> None:
    p = sub.add_parser(
        "calibrate",
        help="refit a predictor's prediction sets on N labelled "
        "images of a new lab; writes a new predictor",
    )
    p.add_argument(
        "--model",
        required=True,
        help="predictor directory, or a run directory (its predictor); left unchanged",
    )
    p.add_argument("--data", required=True, help="the new lab's images: as for evaluate")
    p.add_argument("--labels", default=None, metavar="FILE.csv:COLUMN")
    p.add_argument("--class-map", "--class_map", dest="class_map", default=None, metavar="FILE")
    p.add_argument(
        "--groups",
        default=None,
        metavar="COLUMN",
        help="a column of the --labels CSV (e.g. patient): draw whole groups",
    )
    p.add_argument("--n", type=int, required=True, help="labelled images to calibrate on")
    p.add_argument(
        "--per-group",
        "--per_group",
        dest="per_group",
        type=int,
        default=10,
        help="with --groups: at most this many images of each patient (default 10)",
    )
    p.add_argument("--out", required=True, help="the new predictor's folder (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--method",
        default=None,
        choices=list(METHODS),
        help="conformal method (default: the predictor's; lac when its method is "
        "mondrian and a class has too few drawn images)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="nominal coverage in (0, 1) (default: the predictor's)",
    )
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128)
    p.add_argument("--config", default=None, help="config for --data NAME")
    add_common(p)


def review_rule(old: Review, proba, y) -> dict:
    """The review rule recalibrated on labelled cells of a new lab (``calibrate``,
    ``adapt --n``): the stored rule, its confidence threshold refitted on ``proba`` and
    ``y`` where the rule has a ``target_error``."""
    review = old.model_dump(exclude_none=True)
    if "target_error" in review:
        review["confidence_threshold"] = review_threshold(
            proba.max(axis=1), proba.argmax(axis=1) == y, float(review["target_error"])
        )
    return review


def check_n(n: int, confidence: float, n_classes: int, data) -> None:
    """``--n`` must reach :func:`set_minimum` and give one image of each of the labelled
    set's ``n_classes`` (its classes the predictor has); else one line naming the minimum
    and why."""
    need = set_minimum(confidence)
    least = max(need, n_classes)
    if n < least:
        raise BenchError(
            f"--n {n} is below the minimum of {least}: at confidence {confidence:g} a "
            f"prediction set calibrated on fewer than {need} images holds every class (a class "
            f"leaves it only when 1/(n+1) < 1 - confidence)"
            + (
                f", and the {n_classes} classes of {data} need at least one image each"
                if n_classes > need
                else ""
            )
        )


def _check_args(args) -> tuple[Path, Path]:
    if args.n < 1:
        raise BenchError(f"--n must be at least 1, got {args.n}")
    if args.per_group < 1:
        raise BenchError(f"--per-group must be at least 1, got {args.per_group}")
    if args.confidence is not None:
        check_confidence(args.confidence, "--confidence")
    if args.batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {args.batch_size}")
    model, out = Path(args.model).expanduser(), Path(args.out).expanduser()
    if not model.is_dir():
        raise BenchError(f"--model not found: {model}")
    if out.exists() or out.is_symlink():
        raise BenchError(f"--out {out} exists; give a new folder (nothing is overwritten)")
    check_not_inside(out, "--out", reads=(model, run_of(model)))
    check_writable(out, "--out", need_bytes=folder_size(model))  # the copy of the predictor
    return model, out


def calibrate(args) -> dict:
    """The command's work; returns the new conformal entry."""
    model, out = _check_args(args)
    ext = load_external(args.data, labels=args.labels, groups=args.groups, config=args.config)
    user_map, src = read_class_map(args.class_map)
    record = verify_predictor(model)
    manifest, old = record.raw, record.conformal
    if old is None:
        raise BenchError(
            f"predictor {model} has no conformal prediction sets to recalibrate "
            "(saved before [predictor] conformal); run it again"
        )
    classes = list(record.classes)
    external = sorted(set(ext.labels))
    mapping, _ = map_classes(external, classes, user_map, src)
    other = sorted(e for e in external if mapping[e] is None)
    if other:
        raise BenchError(
            f"{ext.path} has classes the predictor lacks ({', '.join(other[:8])}"
            f"{' ...' if len(other) > 8 else ''}); its sets cover only "
            f"{', '.join(classes)}: give --class-map or a set of those classes"
        )
    if args.n > len(ext.items):
        raise BenchError(
            f"--n {args.n} is larger than the {len(ext.items)} labelled images of {ext.path}"
        )
    method = args.method or old.method
    confidence = float(args.confidence if args.confidence is not None else old.confidence)
    check_n(args.n, confidence, len(external), ext.path)  # before any model is loaded
    drawn, excluded = draw(ext.labels, ext.groups, args.n, args.seed, args.per_group)
    if len(drawn) < args.n:
        raise BenchError(
            f"--n {args.n}: the {len(set(ext.groups))} groups give only "
            f"{len(drawn)} images at --per-group {args.per_group}; raise it"
        )
    pred = load_predictor(model)
    drawn_items = [ext.items[i] for i in drawn]  # split-conformal on the saved predictor
    proba, ok, errors, _, _ = predict_items(pred, drawn_items, args.batch_size, True)
    if not ok.all():
        raise BenchError(
            f"{len(errors)} of the drawn images could not be read "
            f"(e.g. {errors[0][1]}); remove them or draw with another --seed"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[mapping[ext.labels[i]]] for i in drawn], dtype=np.int64)
    if method == "mondrian":  # a class with q rows leaves a set only if 1/(q+1) < 1 - confidence
        need = set_minimum(confidence)
        counts = np.bincount(y, minlength=len(classes))
        few = [f"{classes[c]} ({counts[c]})" for c in range(len(classes)) if counts[c] < need]
        if few and args.method is None:
            method = "lac"
            warn(
                f"mondrian sets need {need} calibration images per class; these have fewer: "
                f"{', '.join(few)}; recalibrated with --method lac (pooled, marginal "
                "coverage) instead; give --method mondrian to keep it, or a larger --n"
            )
        elif few:
            warn(
                f"mondrian sets: classes with fewer than {need} calibration images are in "
                f"every set: {', '.join(few)}; larger --n, or --method lac (pooled, marginal "
                "coverage)"
            )
    state = ConformalSets.fit(
        proba,
        y,
        method,
        confidence,
        old.raps_lambda,
        old.raps_k,
        fitted_on=f"labelled images of {ext.path.name} (bench calibrate, seed {args.seed})",
    )
    review = review_rule(old.review, proba, y)
    judged = _verdict_on_rest(
        model, pred, ext, mapping, index, set(drawn) | set(excluded), state, review, args
    )
    before = {k: v for k, v in manifest["conformal"].items() if k != "recalibration"}
    entry = {
        **state.to_dict(),
        "review": review,
        "recalibration": {
            "data": str(ext.path.resolve()),
            "labels": args.labels,
            "groups": args.groups,
            "n": int(len(drawn)),
            "seed": args.seed,
            "per_group": args.per_group if args.groups else None,
            "rows": [str(ext.shown[i]) for i in drawn],
            "excluded_rows": [str(ext.shown[i]) for i in excluded],
            "from_predictor": str(model.resolve()),
            "from_manifest_sha256": manifest["manifest_sha256"],
            "verdict_on_rest": judged,
            "before": before,
        },
    }
    new = {**manifest, "conformal": entry}
    linked = 0
    with staged(out) as tmp:
        for rel in manifest["files"]:
            if rel == CARD:
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            linked += link_or_copy(model / rel, dest)  # the original's files, unchanged
        atomic_write_text(tmp / CARD, model_card(PredictorRecord.read(new, out / MANIFEST)))
        new["files"] = {rel: file_sha256(tmp / rel) for rel in sorted({*manifest["files"], CARD})}
        new.pop("manifest_sha256", None)
        new["manifest_sha256"] = manifest_digest(new)
        atomic_write_json(tmp / MANIFEST, json.loads(json.dumps(new)))
    verify_predictor(out)
    info(
        f"recalibrated {model} on {len(drawn)} images of {ext.path} ({method}, "
        f"{confidence:g}); wrote {out} (the original is unchanged; {linked} of its "
        f"{len(manifest['files']) - (CARD in manifest['files'])} files linked, not copied)"
    )
    return entry | {"verdict_on_rest": judged, "classes": classes}


def _verdict_on_rest(model, pred, ext, mapping, index, used, state, review, args) -> dict | None:
    """The new calibration's verdict on the set's labelled images that were neither drawn
    nor in a drawn image's group (:func:`bench.stats.scoring.verdict`), or ``None`` when no
    such image is left."""
    rest = [i for i in range(len(ext.items)) if i not in used]
    if not rest:
        return None
    proba, ok, _, _, shift = predict_items(
        pred, [ext.items[i] for i in rest], args.batch_size, True
    )
    rest = [i for i, good in zip(rest, ok) if good]
    if not rest:
        return None
    proba, shift = proba[ok], None if shift is None else shift[ok]
    y = np.array([index[mapping[ext.labels[i]]] for i in rest], dtype=np.int64)
    stats, _ = stats_of_run(model)
    groups = [ext.groups[i] for i in rest] if ext.groups is not None else None
    sc = score(y, proba, list(index), groups=groups, stats=stats)
    flagged = review_of(state, Review(**review), proba, shift)["review"]
    return verdict_of_score(
        sc,
        len(y),
        stats,
        review_share=float(np.mean(flagged)),
        what="labelled images not used to calibrate",
    )


def cmd_calibrate(args) -> int:
    entry = calibrate(args)
    counts = ", ".join(
        f"{c} {n}" for c, n in zip(entry["classes"], entry["calibration_counts"]) if n
    )
    print(
        f"calibrated on {entry['n_calibration']} images (per class: {counts}); "
        f"review below confidence {entry['review'].get('confidence_threshold', 0):.4f}"
    )
    judged = entry["verdict_on_rest"]
    print(
        f"verdict: {judged['line']}"
        if judged
        else "verdict: none (every labelled image was drawn to calibrate; score other "
        f"images of the lab with `bench evaluate --model {args.out}`)"
    )
    return 0


def inspect_lines(m: PredictorRecord) -> list[str]:
    """``bench inspect``'s lines on the stored prediction sets."""
    c = m.conformal
    if c is None:
        return ["  prediction sets: none stored (saved without [predictor] conformal)"]
    lab = (c.in_lab or {}).get("by_confidence") or {}
    figs = "; ".join(
        f"{k}: coverage {v['coverage']:.3f}, mean set size {v['mean_set_size']:.2f}"
        for k, v in lab.items()
    )
    rv, nan = c.review, float("nan")
    lines = [
        f"  prediction sets: {c.method} at {c.confidence:g} confidence (crepes), "
        f"calibrated on {c.n_calibration} {c.fitted_on}; scheme {c.scheme}",
        f"  review: set size other than 1, shift score >= {rv.shift_limit:g}, "
        f"or confidence < {_or(rv.confidence_threshold, nan):.4f} (target "
        f"error {_or(rv.target_error, nan):g} among the answered)",
    ]
    if figs:
        lines.append(
            f"  in-lab (each fold's out-of-fold rows against sets calibrated on the "
            f"other folds'): {figs}; AURC {c.in_lab['aurc']:.4f}"
        )
    if c.recalibration is not None:
        r = c.recalibration
        lines.append(
            f"  recalibrated (bench calibrate) on {r.n} images of {r.data}, "
            f"seed {r.seed}, from {r.from_predictor}"
        )
    return lines


def _or(value, default):
    return default if value is None else value


def review_counts(batches: list[dict], n: int, confidence: float) -> str:
    """The line ``bench predict`` prints: how many images were flagged, and why."""

    def total(key):
        return int(sum(int(b[key].sum()) for b in batches))

    return (
        f"{total('review')} of {n} images flagged for review (column review): "
        f"{total('set_not_one')} with a {confidence:g} prediction set of other than one "
        f"class, {total('low_confidence')} below the confidence threshold, "
        f"{total('shifted')} beyond the training images' colours"
    )


__all__ = [
    "calibrate",
    "cmd_calibrate",
    "draw",
    "inspect_lines",
    "review_counts",
    "add_calibrate_parser",
    "set_minimum",
    "review_rule",
    "check_n",
]
