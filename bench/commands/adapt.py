"""``bench adapt``: a saved predictor adapted to a new lab's own images, without labels,
written as a new verified predictor (the original byte-identical).

What changes (Li et al. 2016, AdaBN; :mod:`cnn.adapt`):

* every member that declares ``adaptable`` (the CNNs: scratch and fine-tuned transfer) gets
  its trainable batch-norm statistics re-estimated on the lab's images; its fold models are
  saved anew, every other file of the predictor is hard-linked (copied where the file system
  cannot link), so the checksums still verify;
* the shift reference (``core.shift``) is refitted on the lab's images: review flags and the
  batch warning then judge images against this lab, not against the training labs.

The images used to adapt are a seeded sample of at most ``--max-images`` and never more than
half of the set; they are recorded in the new manifest (``adaptation.rows``), and ``bench
evaluate`` of the new predictor on the same set leaves them out, so a figure reported for the
adapted predictor never includes the cells it adapted on. With labels (a class-folder tree,
an ``.npz``, a dataset name or ``--labels``), the rest of the set is scored before and after
and the verdict (:func:`bench.stats.scoring.verdict`) is printed and recorded.

With ``--n N`` labelled cells (drawn, seeded, stratified by class, from the half adapted
on; the halves keep whole ``--groups`` apart), a **lab head** is fitted on them
(:mod:`core.labhead`): the combined output's temperature and class offsets and a linear map
of the cells' hand-crafted features (``[predictor] adapt_features``), shrunk toward the
original by inner cross-validation on the N cells, so a lab whose cells say nothing new
keeps (nearly) the original answers. The head is stored as arrays
(``adaptation/lab_head.npz``) and applied by the new predictor to every image. The
prediction sets and the review rule are then calibrated anew on the head's cross-fitted
outputs of the N cells. Without labels, the prediction sets stay as calibrated in the
training labs: recalibrate them on labelled cells of the lab (``bench calibrate``).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config import load_config
from bench.commands.evaluate import map_classes, predict_items, read_class_map
from bench.commands.outputs import check_not_inside, check_writable, run_of
from bench.data.external_data import load_external, resolve_data
from bench.stats.scoring import score, stats_of_run, verdict_of_score
from bench.stats.draws import adaptation_rows, draw
from core import labhead
from bench.commands.calibrate import review_rule
from core.conformal import few_cell_sets, review_of, set_minimum
from core.errors import BenchError
from core.images import find_images
from core.io import link_or_copy, staged
from core.progress import info, warn
from core.shift import ShiftReference
from ensembles.model_card import CARD
from ensembles.predictor import MANIFEST, load_predictor, verify_predictor
from ensembles.record import Review
from core.images import crop_side
from features import check_feature_set, extract_central
from ensembles.writer import write_manifest

METHOD = "AdaBN (batch-norm statistics re-estimated on the lab's images) + shift reference"
HEAD_METHOD = (
    "a lab head: the combined output's temperature and class offsets and a linear map of "
    "the cells' features, class-balanced, shrunk toward the original by inner "
    "cross-validation (core.labhead)"
)
#: the lab head's arrays in an adapted predictor (:class:`core.labhead.LabHead`)
LAB_HEAD = "adaptation/lab_head.npz"


@dataclass
class LabSet:
    """The new lab's images: ``labels`` (predictor class indices, -1 unknown) when known."""

    name: str
    path: Path
    items: list
    shown: list[str]
    labels: np.ndarray | None
    groups: list[str] | None


def _lab_set(data, labels, class_map, groups, config, classes) -> LabSet:
    """A labelled set (class folders, an .npz, a dataset name, ``--labels``), or, for a
    folder whose images carry no labels, every image under it."""
    try:
        ext = load_external(data, labels=labels, groups=groups, config=config)
    except BenchError:
        if labels is not None or groups is not None:
            raise
        path, name, _ = resolve_data(data, config)
        items = find_images(path)
        if not items:
            raise BenchError(f"--data {path}: no images there") from None
        return LabSet(name, path, items, [str(p.relative_to(path)) for p in items], None, None)
    user_map, src = read_class_map(class_map)
    mapping, _ = map_classes(sorted(set(ext.labels)), classes, user_map, src)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array(
        [index[mapping[lab]] if mapping.get(lab) is not None else -1 for lab in ext.labels]
    )
    return LabSet(ext.name, ext.path, ext.items, list(map(str, ext.shown)), y, ext.groups)


def _labelled_draw(lab: LabSet, used, n: int, seed: int) -> np.ndarray:
    """``n`` labelled cells among the rows adapted on, stratified by class (as the
    leave-one-lab-out curve draws them). The scored half shares no patient or slide with
    the rows adapted on (:func:`bench.stats.draws.adaptation_rows` splits whole groups), so
    the draw within them needs no grouping."""
    rows = np.asarray([i for i in used if lab.labels[i] >= 0])
    if n > len(rows):
        raise BenchError(
            f"--n {n}: only {len(rows)} labelled cells lie in the half of the set used to adapt "
            f"(the other half is kept out to score); lower --n or raise --max-images"
        )
    picked, _ = draw([str(lab.labels[i]) for i in rows], None, n, seed)
    return rows[picked]


def head_feature_set(config) -> tuple[str, dict, float]:
    """``(name, spec, crop)`` of the features the lab head reads: ``[predictor]
    adapt_features`` and ``adapt_crop`` of the config (``("", {}, 1.0)``: output
    recalibration only)."""
    cfg = load_config(config)
    name = cfg.predictor.adapt_features
    if not name:
        return "", {}, 1.0
    return name, dict(cfg.feature_sets[name]), float(cfg.predictor.adapt_crop)


def _head_cells(lab: LabSet, used, ok, X, drawn, head_set):
    """The drawn labelled cells that could be read: ``(rows, pos, feats)``, ``rows`` their
    indices in the set, ``pos`` their positions in ``X`` (the images adapted on), and
    ``feats`` the lab head's features of every image adapted on (``None`` for a head
    without a feature map), extracted once for both fits of :func:`_fit_head`."""
    at = {int(used[j]): i for i, j in enumerate(ok)}
    rows = np.asarray([int(r) for r in drawn if int(r) in at], dtype=np.int64)
    if len(rows) < 2:
        raise BenchError(
            f"only {len(rows)} of the {len(drawn)} labelled cells drawn could be read: "
            "draw with another --seed or remove the unreadable files"
        )
    name, spec, crop = head_set
    feats = None
    if spec:
        info(f"features of the {len(X)} images adapted on ({name}), for the lab head ...")
        feats = extract_central(X, spec, crop, progress=True)
    return rows, [at[int(r)] for r in rows], feats


def _fit_head(pred, lab: LabSet, cells, X, head_set, seed: int):
    """The lab head (:mod:`core.labhead`) on the labelled ``cells`` (:func:`_head_cells`)
    through ``pred``'s members as they are now; the features standardised on every image
    adapted on. Any earlier head is replaced: the new one is fitted on the members'
    combined output. Returns ``(fitted, record)``; ``pred`` is left without a head."""
    rows, pos, feats = cells
    pred.lab_head_ = pred.label_adaptation_ = None
    proba = pred.predict_proba(X[pos], preprocessed=True)
    name, spec, crop = head_set
    fitted = labhead.fit(
        proba,
        None if feats is None else feats[pos],
        lab.labels[rows],
        reference=feats,
        feature_set=spec,
        crop=crop,
        seed=int(seed),
        groups=None if lab.groups is None else [lab.groups[i] for i in rows],
    )
    head = fitted.head
    record = fitted.record | {
        "n": int(len(rows)),
        "rows": [lab.shown[i] for i in rows],
        "seed": int(seed),
        "method": HEAD_METHOD,
        "head": LAB_HEAD,
        "feature_set": name if head.uses_features else "",
        "crop": head.crop,
        "temperature": head.temperature,
        "bias": head.bias.tolist(),
    }
    return fitted, record


def _keep_adabn(plain, fitted, done: dict, adaptable: list) -> dict:
    """With labelled cells, they judge AdaBN: the lab head's inner cross-validated loss on
    the adapted members (``fitted``) against on the members as they were (``plain``); a
    lab the members were trained on can lose by it (Chula, 0.79 -> 0.70). The record,
    ``kept`` False when the unadapted loss is lower."""

    def best(f) -> float | None:
        losses = f.record["inner_log_loss"]
        return losses.get(f.record["chosen"]) if losses else None

    with_bn, without = best(fitted), best(plain)
    kept = with_bn is None or without is None or with_bn <= without
    if not kept:
        info(
            f"AdaBN not kept: on the labelled cells the head's inner log loss is "
            f"{without:.4f} on the members as they were, {with_bn:.4f} adapted"
        )
    return {
        "kept": bool(kept),
        "inner_log_loss_adapted": with_bn,
        "inner_log_loss_unadapted": without,
        "members": adaptable,
        "layers": done["layers"],
    }


def _sets_on(pred, oof, y, where: str):
    """The prediction sets and review rule calibrated anew on the lab head's cross-fitted
    outputs of the labelled cells (split-conformal, as ``bench calibrate``; Mondrian only
    where every class has enough cells, else pooled): ``(state, manifest entry)``, or
    ``None`` when the predictor has no sets or the cells are too few for its confidence
    (the old sets then stay, with a warning)."""
    old = pred.record.conformal
    if old is None:
        return None
    state = few_cell_sets(
        oof,
        y,
        old.method,
        float(old.confidence),
        old.raps_lambda,
        old.raps_k,
        fitted_on=f"cross-fitted lab-head outputs of {len(y)} labelled cells of {where} "
        "(bench adapt --n)",
    )
    if state is None:
        warn(
            f"{len(y)} labelled cells cannot calibrate {old.confidence:g} prediction sets "
            f"(at least {set_minimum(float(old.confidence))}): the sets stay as calibrated "
            "in the training labs"
        )
        return None
    entry = {**state.to_dict(), "review": review_rule(old.review, oof, y)}
    return state, entry


def _figures(
    pred, lab: LabSet, rows, batch_size, stats, in_lab, review=None
) -> tuple[dict, dict | None]:
    """The predictor on ``rows``: predicted class mix, share to review and, with labels,
    balanced accuracy with its interval; and the verdict on them (``None`` without labels)."""
    proba, ok, _, fold_proba, shift = predict_items(
        pred, [lab.items[i] for i in rows], batch_size, True
    )
    rows, proba = np.asarray(rows)[ok], proba[ok]
    fold_proba = None if fold_proba is None else fold_proba[:, ok]
    shift = None if shift is None else shift[ok]
    pred_cls = proba.argmax(axis=1)
    out = {
        "n": int(len(rows)),
        "class_mix": {
            str(c): int(n)
            for c, n in zip(pred.classes_, np.bincount(pred_cls, minlength=len(pred.classes_)))
        },
    }
    out["batch_check"] = pred.batch_check(proba) if len(rows) else None
    if pred.conformal_ is not None and len(rows):
        rule = review if review is not None else pred.record.conformal.review
        rv = review_of(pred.conformal_, rule, proba, shift, fold_proba)
        out["share_flagged"] = float(np.mean(rv["review"]))
    if lab.labels is not None:
        y = lab.labels[rows]
        known = y >= 0
        if known.sum() >= 2 and len(np.unique(y[known])) >= 2:
            groups = [lab.groups[i] for i in rows[known]] if lab.groups is not None else None
            sc = score(y[known], proba[known], list(pred.classes_), groups=groups, stats=stats)
            ci = sc["ci"]["balanced_accuracy"]
            out |= {
                "balanced_accuracy": sc["balanced_accuracy"],
                "balanced_accuracy_lo": ci["lo"],
                "balanced_accuracy_hi": ci["hi"],
                "accuracy": sc["accuracy"],
                "n_labelled": int(known.sum()),
            }
            judged = verdict_of_score(
                sc,
                int(known.sum()),
                stats,
                in_lab=in_lab,
                review_share=out.get("share_flagged"),
                what="labelled images not used to adapt",
            )
            return out, judged
    return out, None


def _write(model: Path, out: Path, pred, manifest: dict, adapted: set[str]) -> None:
    """The new predictor: adapted members' fold models saved anew (into fresh files, never
    through a link to the original's), every other file hard-linked; the manifest with the
    adaptation record, checksums and card rewritten."""
    with staged(out) as tmp:
        if pred.lab_head_ is not None and "label_adaptation" in manifest:
            pred.lab_head_.save(tmp / LAB_HEAD)
        for m in manifest["members"]:
            if m["name"] in adapted:
                for rel, cand in zip(m["models"], pred.members_[m["name"]]):
                    cand.save(tmp / rel)
        for rel in manifest["files"]:
            dest = tmp / rel
            if rel in (CARD, MANIFEST, LAB_HEAD) or dest.exists():
                continue  # rewritten below, or just saved (an earlier head is replaced)
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(model / rel, dest)
        body = {k: v for k, v in manifest.items() if k != "manifest_sha256"} | {"files": {}}
        write_manifest(tmp, body)


def adapt(
    model,
    data,
    out,
    *,
    labels=None,
    class_map=None,
    groups=None,
    max_images: int = 2000,
    seed: int = 0,
    batch_size: int = 128,
    config=None,
    n: int | None = None,
) -> dict:
    """Adapt the predictor in ``model`` to the images of ``data``; write it to ``out``.
    Returns the adaptation record (as stored in the new manifest)."""
    model, out = Path(model).expanduser(), Path(out).expanduser()
    if max_images < 1:
        raise BenchError(f"--max-images must be at least 1, got {max_images}")
    if batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    if n is not None and n < 2:
        raise BenchError(f"--n must be at least 2 labelled cells, got {n}")
    if not model.is_dir():
        raise BenchError(f"--model not found: {model}")
    if out.exists() or out.is_symlink():
        raise BenchError(f"--out {out} exists; give a new folder (nothing is overwritten)")
    check_not_inside(out, "--out", reads=(model, run_of(model)))
    check_writable(out, "--out")
    record = verify_predictor(model)
    manifest = record.raw
    if manifest.get("bags"):
        raise BenchError(
            f"{model} is a patient (bag) predictor: adapt its cell model on cells of single "
            "images, not implemented for bag tasks"
        )
    classes = list(record.classes)
    lab = _lab_set(data, labels, class_map, groups, config, classes)
    if n is not None and lab.labels is None:
        raise BenchError(
            f"--n {n} draws labelled cells: --data {data} has no labels (give class folders, "
            "an .npz, a dataset name or --labels FILE.csv:COLUMN)"
        )
    used, scored = adaptation_rows(len(lab.items), lab.groups, int(max_images), int(seed))
    drawn = _labelled_draw(lab, used, n, seed) if n is not None else None
    head_set = head_feature_set(config) if n is not None else ("", {}, 1.0)
    if head_set[1]:
        side = crop_side(record.prep.image_size, head_set[2])
        check_feature_set(head_set[1], side, "[predictor] adapt_features")
    stats, _ = stats_of_run(model)
    pred = load_predictor(model)
    adaptable = [n for n in pred.member_names_ if all(c.adaptable for c in pred.members_[n])]
    in_lab = (record.leaderboard or {}).get("balanced_accuracy")
    info(f"scoring the {len(scored)} images kept out of adaptation, before ...")
    before, verdict_before = _figures(pred, lab, scored, batch_size, stats, in_lab)
    info(f"adapting {', '.join(adaptable) or 'no member'} on {len(used)} images of {lab.path} ...")
    X, _, ok, _ = pred.preprocessing.load([lab.items[i] for i in used], skip_errors=True)
    if not len(X):
        raise BenchError(f"none of the {len(used)} images drawn to adapt on could be read")
    cells = plain = None
    if drawn is not None:  # the labelled cells; with AdaBN, first through the members as they were
        cells = _head_cells(lab, used, ok, X, drawn, head_set)
        if adaptable:
            plain = _fit_head(pred, lab, cells, X, head_set, seed)
    if drawn is None and pred.lab_head_ is not None and adaptable:
        warn(
            f"{model} has a lab head fitted on its members' output before this AdaBN; it is "
            "kept, but fit it anew on labelled cells (--n) for the adapted members"
        )
    done = pred.adapt(X, max_images=len(X), seed=seed, preprocessed=True)
    reference = ShiftReference.fit(X, seed=seed)
    label_adaptation = sets = review = adabn = None
    if drawn is not None:  # the labelled cells, through the adapted members
        fitted, label_adaptation = _fit_head(pred, lab, cells, X, head_set, seed)
        if plain is not None and done["layers"]:
            adabn = _keep_adabn(plain[0], fitted, done, adaptable)
            if not adabn["kept"]:  # the members as they were: the saved ones
                pred = load_predictor(model)
                fitted, label_adaptation = plain
                done, adaptable = {"fold_models": 0, "layers": 0}, []
        pred.lab_head_, pred.label_adaptation_ = fitted.head, label_adaptation
        rows = cells[0]
        sets = _sets_on(pred, fitted.oof, lab.labels[rows], lab.name)
        if sets is not None:
            pred.conformal_, review = sets[0], Review(**sets[1]["review"])
    pred.shift_reference_ = reference
    after, verdict_after = _figures(pred, lab, scored, batch_size, stats, in_lab, review)
    record_ = {
        "method": METHOD,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": str(lab.path.resolve()),
        "data_name": lab.name,
        "seed": int(seed),
        "max_images": int(max_images),
        "n_images": int(len(X)),
        "rows": [lab.shown[i] for i in used],
        "members_adapted": adaptable,
        "fold_models": done["fold_models"],
        "layers": done["layers"],
        "labels_used": label_adaptation is not None,
        "n_labelled": 0 if label_adaptation is None else label_adaptation["n"],
        "head": None if label_adaptation is None else label_adaptation["chosen"],
        "adabn_judged": adabn,
        "sets_recalibrated": sets is not None,
        "from_predictor": str(model.resolve()),
        "from_manifest_sha256": manifest["manifest_sha256"],
        "scored_rows": int(len(scored)),
        "before": before,
        "after": after,
        "verdict_before": verdict_before,
        "verdict": verdict_after,
    }
    new = {**manifest, "adaptation": record_, "shift": reference.to_dict()}
    if label_adaptation is not None:  # an earlier adaptation's head is replaced
        new["label_adaptation"] = label_adaptation
    if sets is not None:
        new["conformal"] = sets[1]
    new = json.loads(json.dumps(new))
    _write(model, out, pred, new, set(adaptable) if done["layers"] else set())
    verify_predictor(out)
    info(
        f"adapted {model} to {lab.path}: {done['layers']} batch-norm layers in "
        f"{done['fold_models']} fold models on {len(X)} images; wrote {out} (the original "
        "is unchanged)"
    )
    return record_


def summary(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [
        f"adapted on {r['n_images']} images of {r['data_name']} (seed {r['seed']}): "
        f"{r['layers']} batch-norm layers of {r['fold_models']} fold models "
        f"({', '.join(r['members_adapted']) or 'no adaptable member'}); shift reference refitted"
        + (f"; lab head on {r['n_labelled']} labelled cells: {r['head']}" if r.get("head") else "")
        + (
            "; AdaBN not kept (the labelled cells fit better without it)"
            if (r.get("adabn_judged") or {}).get("kept") is False
            else ""
        ),
        f"on the {b['n']} images kept out: share to review "
        f"{b.get('share_flagged', float('nan')):.0%} before, "
        f"{a.get('share_flagged', float('nan')):.0%} after",
        "  predicted class mix before: "
        + ", ".join(f"{c} {n}" for c, n in b["class_mix"].items() if n),
        "  predicted class mix after:  "
        + ", ".join(f"{c} {n}" for c, n in a["class_mix"].items() if n),
    ]
    for when in ("before", "after"):
        bc = r[when].get("batch_check")
        if bc:
            lines.append(
                f"  batch check {when}: {bc['score']:.1f} reference SDs"
                + (" (flagged: unlike the training labs)" if bc["flagged"] else " (not flagged)")
            )
    if r.get("verdict"):
        lines.append(f"before adaptation: {r['verdict_before']['line']}")
        lines.append(f"verdict: {r['verdict']['line']}")
    else:
        lines.append(
            "verdict: none without labels; score labelled cells of this lab with "
            "`bench evaluate` (the cells adapted on are left out)"
        )
    return "\n".join(lines)


def cmd_adapt(args) -> int:
    r = adapt(
        args.model,
        args.data,
        args.out,
        labels=args.labels,
        class_map=args.class_map,
        groups=args.groups,
        max_images=args.max_images,
        seed=args.seed,
        batch_size=args.batch_size,
        config=args.config,
        n=args.n,
    )
    print(summary(r))
    return 0


__all__ = ["adapt", "cmd_adapt", "summary"]
