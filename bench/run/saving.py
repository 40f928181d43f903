"""The predictor stage of ``bench run``: the chosen entry saved as a predictor.

``[predictor] ensemble`` picks the entry (default the best row, single candidate or ensemble,
never a colour-only shortcut; ``robust`` the best under ``[stress]`` of the rows within
``robust_tolerance`` of it; in a bag task the patient row the nested procedure chose among those a
predictor can carry); its members' fold models, its combiner fitted on every out-of-fold
row, temperature, prediction sets, bag task, lab figures and the training images' colour
description go into ``DIR/predictor`` (:func:`ensembles.writer.save_predictor`).
"""

from __future__ import annotations

from bench.stats import conformal_sets as conformal
from bench.config import Config
from bench.run.context import RunContext, Stage
from bench.data.datasets import Dataset
from bench.protocols.labs import has_lab_columns, lab_names, lab_summary
from bench.protocols.patients import bag_settings
from bench.run.rundir import RunDir
from core.batch import batch_reference
from core.calibration import apply_temperature, fit_temperature
from core.progress import info, warn
from core.shift import ShiftReference
from ensembles.build import choose_entry, final_ensemble
from ensembles.predictor import save_predictor
from bench.run.leaderboard import set_roles


def save_run_predictor(
    run: RunDir, cfg: Config, ds: Dataset, board, stored, kinds, folds, patients=None, stressed=None
) -> str:
    """Save the chosen entry (``[predictor] ensemble``, default the best row that is not a
    colour-only shortcut, or in a
    bag task the entry of the best patient row a predictor can carry); ``stored``: every
    entry's out-of-fold probabilities as written to ``oof/`` (``stressed``: the same under
    each simulated shift)."""
    pred_cfg = cfg.predictor
    metric = cfg.run.metric
    choice = pred_cfg.ensemble
    tolerance = float(pred_cfg.robust_tolerance)
    carried = patients[3].get("carried") if patients is not None else None
    shortcuts = cfg.colour_only_candidates()
    chosen_by = {
        "best": f"best {metric} of the candidates and ensembles (colour-only shortcuts left out)",
        "robust": f"best {metric} under simulated shift ([stress]) of the candidates and "
        f"ensembles within {tolerance} of the best {metric} (colour-only shortcuts left out)",
    }.get(choice, "config")
    if choice in ("best", "robust") and carried:  # a bag task: the nested row's procedure
        row = choose_entry(board, carried["entry"])
        chosen_by = (
            f"the patient row chosen by ROC AUC, then log loss, among the rows a "
            f"predictor can carry ({carried['row']}; see the nested figure)"
        )
    else:
        row = choose_entry(board, choice, metric, tolerance, shortcuts)
    name = row["candidate"]
    if name in shortcuts:
        warn(
            f"the saved predictor '{name}' is a colour-only candidate: it can score by "
            "reading this lab's stain and camera (an acquisition shortcut); add a candidate "
            "that sees shapes (a CNN, HOG) before using it elsewhere"
        )
    members, ens = final_ensemble(
        name, row["kind"], cfg.ensembles, stored, kinds, ds.labels, folds, stressed
    )
    weights = ens.member_weights()
    info_ = {
        m: {
            "type": cfg.candidates[m].type,
            "kind": kinds[m],
            "weight": None if weights is None else weights[i],
        }
        for i, m in enumerate(members)
    }
    calibration = {}
    if pred_cfg.temperature_scaling:  # one T fitted on the entry's OOF rows
        calibration = {
            "calibration": {
                "method": "temperature scaling",
                "temperature": fit_temperature(ds.labels, stored[name]),
                "fitted_on": f"out-of-fold probabilities of '{name}'",
            }
        }
    bag, bag_files = bag_settings(cfg, patients, name) if patients else (None, {})
    save_predictor(
        run.predictor_dir,
        ensemble_name=name,
        ensemble=ens,
        members={m: [run.unit_model_dir(m, k) for k in folds.fold_ids] for m in members},
        member_info=info_,
        classes=ds.classes,
        preprocessing=ds.preprocessing,
        training_data=ds.summary()
        | {
            "skipped": len(ds.skipped),
            "dataset_name": cfg.data.name or "",
            "grouping": run.read_manifest().get("grouping"),
        },
        extra={
            "chosen_by": chosen_by,
            "leaderboard": {
                k: float(row[k]) for k in dict.fromkeys([metric, "accuracy", "macro_f1"])
            },
            "member_models": "fold models of the cross-validation (bagged)",
            **calibration,
            **conformal.predictor_extra(
                run,
                pred_cfg.conformal,
                ds.labels,
                stored[name],
                folds,
                name,
                calibration,
                ens.combine([stored[m] for m in members]),
            ),
            **({"bags": bag} if bag else {}),
            # the batch-level warning's reference (core.batch): batches of the entry's
            # out-of-fold rows, as the predictor answers them (temperature included)
            "batch_reference": batch_reference(
                apply_temperature(stored[name], calibration["calibration"]["temperature"])
                if calibration
                else stored[name],
                ds.labels,
                seed=cfg.run.seed,
            ),
            **(
                {"leave_one_lab_out": lab_summary(row, lab_names(cfg))}
                if has_lab_columns(board, lab_names(cfg))
                else {}
            ),
        },
        tta=pred_cfg.tta,
        shift=ShiftReference.fit(ds.images),
        files={rel: run.patient_model_path(src) for rel, src in bag_files.items()},
    )
    run.update_state(predictor=name)
    info(f"saved predictor '{name}' ({', '.join(members)}) to {run.predictor_dir}")
    return name


def _predictor_stage(ctx: RunContext) -> None:
    name = save_run_predictor(
        ctx.run,
        ctx.cfg,
        ctx.ds,
        ctx.board,
        ctx.stored,
        ctx.kinds,
        ctx.run.folds,
        ctx.bag_choice,
        ctx.stored_stress,
    )
    set_roles(ctx.board, ctx.cfg.colour_only_candidates(), name)
    ctx.write_board()


#: the saved predictor (not in a protocol's own sub-run)
STAGE = Stage("predictor", _predictor_stage, lambda ctx: ctx.predictor)

__all__ = ["save_run_predictor", "STAGE"]
