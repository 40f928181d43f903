"""MODEL_CARD.md of a saved predictor, made from its manifest alone.

Headings after Mitchell et al. 2019 ("Model Cards for Model Reporting"); the items TRIPOD+AI
(Collins et al. 2024) asks a prediction model's report for (data source, participants,
outcome, sample size, development, performance with CIs, limitations) are under them.
Every figure is read from the manifest's record (:class:`ensembles.record.PredictorRecord`:
``leaderboard``, ``conformal``, ``external``, ``bags``, ``shift``, ``training_data``);
nothing is typed in.
"""

from __future__ import annotations

import math
from pathlib import Path

from ensembles.record import NO_BAG_COLOUR, PredictorRecord

CARD = "MODEL_CARD.md"


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _or_na(v) -> str:
    return "n/a" if v is None else str(v)


def _data_name(td: dict) -> str:
    """The training data as a reader elsewhere can name it: the config's dataset name, a file
    shipped with bloodbench as ``bloodbench:REL``, else the file or folder's own name (never
    this machine's absolute path)."""
    if td.get("dataset_name"):
        return f"dataset `{td['dataset_name']}`"
    origin = str(td.get("origin") or "")
    if not origin:
        return "n/a"
    package = str(Path(__file__).resolve().parents[1] / "bench") + "/"
    if origin.startswith(package):
        return f"`bloodbench:{origin[len(package) :]}`"
    return f"`{Path(origin).name}`"


def _grouping_line(td: dict, distilled: bool, n_models: int) -> str:
    """How the folds kept related images apart, as the run recorded it."""
    g = td.get("grouping")
    bag = (
        f" The ensemble is the bag of the {n_models} fold models."
        if not distilled
        else " One student fitted on every row; its figures are those of the students "
        "cross-validated on the same folds."
    )
    if g is None:
        return "- How the folds grouped images was not recorded with this predictor." + bag
    kept = []
    if g.get("user_groups"):
        kept.append(f"{g['user_groups']} patient/slide groups from the groups file")
    if g.get("group_rule"):
        kept.append(f"groups by the file-number rule `{g['group_rule']}`")
    if g.get("pairs"):
        kept.append(f"{g['pairs']} near-duplicate pairs")
    dup = f"{g.get('exact_duplicate_groups', 0)} groups of identical images"
    if kept:
        return f"- Cross-validation folds keep together {', '.join(kept)} and {dup}." + bag
    return (
        f"- No patient or slide groups were given: the folds keep only {dup} together, so "
        "cells of one patient or slide can lie on both sides of a fold and the figures "
        "below can be optimistic." + bag
    )


def _distilled_lines(d: dict | None) -> list[str]:
    """A distilled predictor (``bench distill``): what it learnt from, and how far it
    follows its teacher in the lab and under simulated shift."""
    if not d:
        return []
    mine, teacher = d.get("cross_validated") or {}, d.get("teacher_cross_validated") or {}
    pairs = "; ".join(f"{k} {_f(v)} (teacher {_f(teacher.get(k))})" for k, v in mine.items())
    return [
        f"- Distilled: one `{d['student']['type']}` trained on the out-of-fold "
        f"probabilities of `{d['teacher']}` (target {1 - d['hard_weight']:g} x teacher + "
        f"{d['hard_weight']:g} x label, temperature {d['temperature']:g}); cross-validated "
        f"on the run's folds: {pairs or 'n/a'}. A student follows its teacher where it "
        "was taught (in the lab); check it outside (`stress_*`: under simulated shift)."
    ]


def _bag_rule(bags) -> str:
    """How a bag task turns a patient's cells into its score, in words."""
    stage = bags.cell_types
    if bags.aggregator == "type_model":
        return (
            "a logistic regression on the patient's cell-type composition and per-type "
            f"mean score (cell types from a {len(stage.types)}-type model, out-of-fold "
            f"cell accuracy {_f(stage.accuracy)}; `predict --cell-types` takes the "
            "analyser's instead)"
        )
    if bags.cells == "typed":
        return (
            f"the {bags.aggregator} of the cells likely of a diagnostic type "
            f"({', '.join(stage.disease)}: probability at least {_f(stage.cut, 2)} by a "
            f"{len(stage.types)}-type model, out-of-fold cell accuracy {_f(stage.accuracy)}; "
            "every cell when none is)"
        )
    return f"the {bags.aggregator} of the cells"


def model_card(m: PredictorRecord) -> str:
    """The card's Markdown for the manifest's record ``m`` (its files and digest not
    needed)."""
    ens, td = m.ensemble, m.training_data or {}
    classes = m.classes
    models = "model(s), fitted on every row" if m.distilled else "fold models"
    members = ", ".join(f"{x.name} ({x.type}, {len(x.models)} {models})" for x in m.members)
    counts = td.get("counts") or {}
    cp, bags, ext = m.conformal, m.bags, m.external or {}
    out = [
        f"# Model card: {ens.name} ({ens.type})",
        "",
        "## Model details",
        f"- Ensemble `{ens.name}` of {members}; chosen as {_or_na(m.chosen_by)}.",
        *_distilled_lines(m.distilled),
        f"- Input: RGB images resized to {m.prep.image_size} px ({m.prep.resize}); "
        f"test-time views: {m.tta}; created {_or_na(m.created)} by bloodbench.",
        f"- Output: one of {len(classes)} classes ({', '.join(classes)}) with probabilities"
        + (
            f"; a {cp.confidence:g} conformal prediction set and a review flag per image"
            if cp
            else ""
        )
        + (f"; per patient: {bags.positive} or not" if bags else "")
        + ".",
        "",
        "## Intended use",
        "- Research benchmark and pre-classification of single blood-cell images for a "
        "technologist who verifies every flagged image (`review` = 1) "
        + ("and every referred patient " if bags else "")
        + "before any report.",
        "- Out of scope (misuse): unsupervised diagnosis; classes other than the ones "
        "above (blasts, promyelocytes and other abnormal cells get one of these labels); "
        "images of another lab, scanner or stain without checking the coverage there "
        "(`bench evaluate`) and recalibrating (`bench calibrate`).",
        "",
        "## Factors",
        "- Lab, scanner, stain and magnification change the images (see the shift score and "
        "the external figures below); class prevalence differs between labs and patients.",
        "",
        "## Metrics",
        "- Accuracy, balanced accuracy and macro F1 (out-of-fold in the lab, percentile "
        "bootstrap CIs outside); conformal coverage and mean set size; risk-coverage and "
        "AURC of the maximum probability (Geifman et al. 2019).",
        "",
        "## Training data",
        f"- {td.get('n_images', 'n/a')} images from {_data_name(td)}"
        + (f"; per class: {', '.join(f'{k} {v}' for k, v in counts.items())}" if counts else "")
        + ".",
        _grouping_line(td, bool(m.distilled), len(m.members[0].models)),
        "",
        "## Quantitative analyses",
        "### In the lab (out-of-fold)",
    ]
    board = m.leaderboard or {}
    out += [f"- {k}: {_f(v)}" for k, v in board.items()] or ["- n/a"]
    if cp:
        lab = cp.in_lab or {}
        out += [
            "",
            "### Conformal prediction sets",
            f"- Method {cp.method} (crepes), nominal {cp.confidence:g}; calibrated on "
            f"{cp.n_calibration} rows ({cp.fitted_on}); scheme {cp.scheme} "
            f"({_or_na(cp.scheme_rule)}).",
        ]
        for k, v in (lab.get("by_confidence") or {}).items():
            out.append(
                f"- In-lab at {k} (each fold's out-of-fold rows against sets "
                f"calibrated on the other folds'): coverage {_f(v['coverage'])}, mean "
                f"set size {_f(v['mean_set_size'], 2)}, singletons "
                f"{_f(v['singleton_share'])}"
            )
        if lab:
            acc = lab.get("accuracy_at_coverage") or {}
            out.append(
                f"- Risk-coverage (maximum probability): AURC {_f(lab.get('aurc'), 4)}, "
                f"excess AURC {_f(lab.get('excess_aurc'), 4)}; accuracy of the most "
                f"confident 50 % {_f(acc.get('0.5'))}, 80 % {_f(acc.get('0.8'))}."
            )
        rv, r = cp.review, cp.recalibration
        source = (
            f"fitted on the {r.n} labelled images of `{Path(r.data).name}` that `bench "
            "calibrate` drew"
            if r
            else "fitted on the out-of-fold rows"
        )
        out.append(
            f"- Review flag: set size other than 1, shift score >= "
            f"{rv.shift_limit:g}, or maximum probability < "
            f"{_f(rv.confidence_threshold, 4)} (target error "
            f"{_or_na(rv.target_error)} among answered images, {source})."
        )
        if r:
            out.append(
                f"- Recalibrated for a new lab on {r.n} labelled images of "
                f"`{Path(r.data).name}` (seed {r.seed}); the previous calibration: "
                f"{_or_na(r.before.fitted_on)}. Score the new lab's other images with "
                "`bench evaluate`."
            )
            judged = (r.model_extra or {}).get("verdict_on_rest")
            if judged:
                out.append(f"- Verdict at calibration: {judged['line']}.")
    ad = (m.model_extra or {}).get("adaptation")
    if ad:
        v = ad.get("verdict")
        out += [
            "",
            "### Adapted to a new lab",
            f"- `bench adapt` on {ad['n_images']} images of `{ad.get('data_name')}` "
            f"(seed {ad['seed']}): {ad['method']}; {ad['layers']} batch-norm layers of "
            f"{ad['fold_models']} fold models ({', '.join(ad['members_adapted']) or 'none'}). "
            "Those images are recorded (`adaptation.rows`) and `bench evaluate` leaves them "
            "out."
            + (
                " The prediction sets were calibrated anew on the labelled cells."
                if ad.get("sets_recalibrated")
                else " The prediction sets are still those of the training labs: "
                "recalibrate them with `bench calibrate`."
            ),
        ]
        la = (m.model_extra or {}).get("label_adaptation")
        out.append(
            f"- {la['n']} of those images were used with their labels (seed {la['seed']}): "
            + (
                f"{la['method']}; the inner cross-validation chose {la['chosen']}"
                + (
                    f" on the `{la['feature_set']}` features of the central "
                    f"{la.get('crop', 1.0):g} of each image"
                    if la.get("feature_set")
                    else ""
                )
                + f", temperature {_f(float(la['temperature']))}."
                if la.get("chosen")
                else f"the combined output recalibrated ({la['method']}; temperature "
                f"{_f(float(la['temperature']))}, penalty {la['lambda']:g})."
            )
            if la
            else "- No labels were used (AdaBN and the shift reference need none)."
        )
        judged = ad.get("adabn_judged") or {}
        if judged.get("kept") is False:
            out.append(
                f"- AdaBN of {', '.join(judged['members'])} was tried and not kept: the "
                "labelled cells fit better on the members as they were (inner log loss "
                f"{_f(judged['inner_log_loss_unadapted'], 4)} against "
                f"{_f(judged['inner_log_loss_adapted'], 4)})."
            )
        out += [f"- Verdict at adaptation: {v['line']}."] if v else []
    out += ["", "### Outside the lab"]
    labs = m.leave_one_lab_out
    if labs:
        ba = "balanced_accuracy"
        out.append(
            f"- Leave-one-lab-out (each training lab held out in turn; every fit, "
            f"tuning and ensemble weight on the other labs): balanced accuracy worst "
            f"lab {_f(labs['worst_lab'][ba])} ({labs.get('worst_lab_name', '')}), mean "
            f"{_f(labs['mean_lab'][ba])}, against {_f(labs['in_lab'][ba])} in-lab. "
            "Chosen by one of these figures, the entry's own figure is biased upward; "
            "the saved fold models were each trained on every lab."
        )
        for lab, d in labs["labs"].items():
            v = d[ba]
            out.append(
                f"  - `{lab}` held out: balanced accuracy {_f(v['value'])} "
                f"[{_f(v['ci'][0])}, {_f(v['ci'][1])}], accuracy "
                f"{_f(d['accuracy']['value'])}, macro-F1 {_f(d['macro_f1']['value'])}"
            )
        curve = labs.get("adaptation_curve")
        if curve:
            ns = curve["labelled_cells"]
            out += [
                "",
                "Adaptation curve: balanced accuracy of each held-out lab after its own N "
                "labelled cells fitted a lab head (`bench adapt --n N`), scored on the "
                "half of the lab never drawn from (N = 0: the same half, zero-shot; mean of "
                "the seeded draws).",
                "",
                "| held-out lab | " + " | ".join(f"N = {n}" for n in ns) + " |",
                "|---|" + "---:|" * len(ns),
            ]
            rows = [*curve["labs"].items(), ("worst lab", curve["worst_lab"])]
            out += [f"| {lab} | " + " | ".join(_f(v) for v in vals) + " |" for lab, vals in rows]
            cover = curve.get("coverage")
            if cover:
                out += [
                    "",
                    "Coverage of the prediction sets calibrated on those N cells (the "
                    "head's cross-fitted outputs), on the same scored half:",
                    "",
                    "| held-out lab | " + " | ".join(f"N = {n}" for n in ns if n) + " |",
                    "|---|" + "---:|" * len([n for n in ns if n]),
                ]
                out += [
                    f"| {lab} | " + " | ".join(_f(v) for v in vals) + " |"
                    for lab, vals in cover.items()
                ]
    if not ext and not labs:
        out.append(
            "- No external set was scored with this predictor's run; score one with "
            "`bench evaluate` before use elsewhere."
        )
    for name, e in ext.items():
        out.append(
            f"- `{name}` ({e.get('n')} images): accuracy {_f(e.get('accuracy'))} "
            f"[{_f(e.get('accuracy_lo'))}, {_f(e.get('accuracy_hi'))}], balanced "
            f"accuracy {_f(e.get('balanced_accuracy'))} [{_f(e.get('balanced_accuracy_lo'))}"
            f", {_f(e.get('balanced_accuracy_hi'))}]"
            + (
                f"; conformal coverage {_f(e['coverage'])} (nominal "
                f"{_f(e['confidence'], 2)}), mean set size {_f(e['mean_set_size'], 2)}, "
                f"AURC {_f(e['aurc'], 4)}; flagged for review (prediction set or "
                f"confidence; no shift score here) {_f(e.get('share_flagged'))}, "
                f"accuracy of the answered {_f(e.get('answered_accuracy'))}"
                + (
                    " **(coverage below nominal: the sets do not hold there; "
                    "recalibrate with `bench calibrate`)**"
                    if e.get("below_nominal")
                    else ""
                )
                if "coverage" in e
                else ""
            )
        )
        low = e.get("low_recall") or {}
        if low:
            out.append(
                "  - Classes below 0.5 recall there: "
                + ", ".join(f"{c} {_f(v, 2)}" for c, v in low.items())
            )
    shift = m.shift
    out += [
        "",
        "### Shift score",
        "- "
        + (
            "Each image's colours are placed against the training images' (0-1: the "
            "share of training images closer to their mean); `bench predict` warns "
            "when more than half of a batch lies beyond 0.99."
            if shift
            else "No description of the training images is stored."
        ),
    ]
    if bags:
        pl = bags.patient_leaderboard or {}
        band = bags.refer_band
        out += [
            "",
            "### Patients",
            f"- {bags.positive} per patient by {_bag_rule(bags)}, "
            f"threshold {_f(bags.threshold, 4)}; ROC AUC {_f(pl.get('roc_auc'))} "
            f"[{_f(pl.get('roc_auc_lo'))}, {_f(pl.get('roc_auc_hi'))}], sensitivity "
            f"{_f(pl.get('sensitivity'))}, specificity {_f(pl.get('specificity'))} "
            "(out-of-fold patients; the best of the rows, picked on the same patients: "
            "optimistic).",
        ]
        if pl.get("nested_roc_auc") is not None:
            out.append(
                f"- Nested figure (the row and threshold chosen without each outer "
                f"fold's patients): ROC AUC {_f(pl['nested_roc_auc'])} "
                f"[{_f(pl.get('nested_roc_auc_lo'))}, {_f(pl.get('nested_roc_auc_hi'))}], "
                f"sensitivity {_f(pl.get('nested_sensitivity'))}, specificity "
                f"{_f(pl.get('nested_specificity'))}: the figure to expect."
            )
        if bags.bag_colour != NO_BAG_COLOUR:
            out.append(
                f"- Each patient's cells are colour-normalised together "
                f"({bags.bag_colour}): give a patient's cells as one bag "
                "(`predict --bags`)."
            )
        if band and (band.model_extra or {}).get("n_inside", 1) == 0:
            out.append(
                "- No referral band: no out-of-fold patient would have been referred at "
                "`[patients] refer_rate`; patients are referred for too few cells or "
                "shifted cells only."
            )
        elif band:
            extra = band.model_extra or {}
            inside = extra.get("n_inside")
            out.append(
                f"- Referred when the score lies in [{_f(band.lo, 4)}, "
                f"{_f(band.hi, 4)}]"
                + (
                    f" ({inside} of {band.n} out-of-fold patients there, at most "
                    f"{_f(100 * extra.get('max_rate', 1), 0)} % by `[patients] refer_rate`; "
                    f"{extra.get('n_wrong_outside')} of the {band.n_wrong} misclassified "
                    "ones lie outside it)"
                    if inside is not None
                    else f" ({band.n_wrong} of {band.n} out-of-fold patients misclassified there)"
                )
                + " or the cells look shifted."
            )
        curve = (bags.model_extra or {}).get("referral_curve")
        if curve:
            out += [
                "",
                "Nested risk-referral curve (band, threshold and row chosen without each "
                "outer fold's patients): the accuracy of the patients called against the "
                "share referred.",
                "",
                "| at most referred | referred | accuracy of the called | sensitivity | specificity |",
                "|---:|---:|---:|---:|---:|",
            ]
            out += [
                f"| {_f(100 * c['max_rate'], 0)} % | {_f(100 * c['referred'], 0)} % | "
                f"{_f(c['accuracy_called'])} | {_f(c['sensitivity_called'])} | "
                f"{_f(c['specificity_called'])} |"
                for c in curve
            ]
    out += [
        "",
        "## Ethical considerations",
        "- Not a medical device. Errors fall unevenly on rare and abnormal cells; the "
        "coverage guarantee holds only for images exchangeable with the calibration rows.",
        "",
        "## Caveats and recommendations",
        "- Coverage and accuracy outside the lab are lower (above); measure them on "
        "labelled images of the new lab and recalibrate (`bench calibrate --n 100`).",
        "- Figures are out-of-fold estimates on one dataset; the saved ensemble averages "
        "the fold models, so its own probabilities are slightly more confident than the "
        "out-of-fold rows it was calibrated on.",
        "",
    ]
    return "\n".join(out)


__all__ = ["model_card", "CARD"]
