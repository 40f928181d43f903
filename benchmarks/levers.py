"""Robustness levers, each measured in-domain and outside the training lab.

    python benchmarks/levers.py --data pbc --out /tmp/levers [--only baseline,stain_aug]

Each lever is the ``levers`` profile of ``benchmarks.toml`` (one candidate on a seeded
stratified sample of the dataset, 5 shared folds: the scratch ``cnn_deep`` at 48 px, the
fine-tuned MobileNetV2 ``tl_mnv2_finetune`` at 64 px as in the ``quick`` profile, or the
feature models ``xgb_all`` and ``rf_color``) with one change.
Every run scores its entries on the dataset's ``[external.*]`` sets (for PBC: the DeepAPL
cells with a PBC class). Test-time augmentation needs no training: the baseline's saved
predictor is evaluated again with ``tta = "flips"``. Prints one Markdown row per lever:
in-domain 5-fold accuracy and balanced accuracy (mean over folds), external balanced
accuracy and accuracy (the bag of fold models), and the run's wall time; writes
``OUT/levers.json``. Unsupervised test-time adaptation (``evaluate --adapt bn``, AdaBN) is
measured the same way as TTA, on a trained lever's saved predictor (``EVALUATED``), and is
transductive (it uses the external images' statistics): report it apart.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVERS = {  # name -> (candidate, changes to its params)
    "baseline": ("cnn_deep", {}),
    "stain_aug": ("cnn_deep", {"augment": "stain"}),
    "reinhard": ("cnn_deep", {"stain_norm": "reinhard"}),
    "group_norm": ("cnn_deep", {"norm": "group"}),
    "stain_aug+reinhard": ("cnn_deep", {"augment": "stain", "stain_norm": "reinhard"}),
    # heavy augmentation needs more epochs to converge: the same, trained twice as long
    "stain_aug_16ep": ("cnn_deep", {"augment": "stain", "epochs": 16, "patience": 16}),
    "robust_aug_16ep": ("cnn_deep", {"augment": "robust", "epochs": 16, "patience": 16}),
    "baseline_16ep": ("cnn_deep", {"epochs": 16, "patience": 16}),
    # an ImageNet-pretrained backbone, fine-tuned (the quick profile's settings), and the same
    # with the robust augmentation
    "finetune": ("tl_mnv2_finetune", {}),
    "finetune_robust_aug": ("tl_mnv2_finetune", {"augment": "robust"}),
    "finetune_stain_aug": ("tl_mnv2_finetune", {"augment": "stain"}),
    "finetune_robust_aug_16ep": (
        "tl_mnv2_finetune",
        {"augment": "robust", "epochs": 16, "patience": 16},
    ),
    # the full-width MobileNetV2 (alpha 1.0; its weights beside the project, ../shared/weights)
    "finetune_alpha1": (
        "tl_mnv2_finetune",
        {
            "alpha": 1.0,
            "weights": str(
                ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_imagenet_notop.weights.h5"
            ),
        },
    ),
    # the central part of the frame only (the cell; cnn.models.center_crop): the share of
    # the image side kept
    "finetune_crop50": ("tl_mnv2_finetune", {"crop": 0.5}),
    "finetune_crop35": ("tl_mnv2_finetune", {"crop": 0.35}),
    "finetune_crop50_input96": ("tl_mnv2_finetune", {"crop": 0.5, "input_size": 96}),
    "crop50": ("cnn_deep", {"crop": 0.5}),
    "crop35": ("cnn_deep", {"crop": 0.35}),
    # the crop with colour or geometry augmentation on top, and the full-width backbone
    "finetune_crop50_stain_aug": ("tl_mnv2_finetune", {"crop": 0.5, "augment": "stain"}),
    "finetune_crop50_colour": ("tl_mnv2_finetune", {"crop": 0.5, "augment": "colour"}),
    "finetune_crop50_zoom": (
        "tl_mnv2_finetune",
        {"crop": 0.5, "augment": {"flip": True, "rot90": True, "zoom": 0.15, "translate": 0.05}},
    ),
    "finetune_crop50_alpha1": (
        "tl_mnv2_finetune",
        {
            "crop": 0.5,
            "alpha": 1.0,
            "weights": str(
                ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_imagenet_notop.weights.h5"
            ),
        },
    ),
    # the feature models, whole image and centre crop
    "xgb_all": ("xgb_all", {}),
    "xgb_all_crop50": ("xgb_all", {"crop": 0.5}),
    "rf_color": ("rf_color", {}),
    "rf_color_crop50": ("rf_color", {"crop": 0.5}),
}
#: levers applied when predicting, no training: name -> (the lever whose saved predictor is
#: evaluated again, evaluate() keywords). AdaBN is transductive (it uses the external
#: images' statistics): report it apart.
EVALUATED = {
    "tta_flips": ("baseline", {"tta": "flips"}),
    "adabn": ("baseline", {"adapt": "bn"}),
    "crop50_adabn": ("crop50", {"adapt": "bn"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="pbc")
    ap.add_argument("--out", default="runs/levers")
    ap.add_argument("--config", default=str(ROOT / "benchmarks.toml"))
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    import pandas as pd

    from bench.config import load_config
    from bench.commands.evaluate import evaluate
    from bench.run.runner import run_benchmark

    only = [s for s in args.only.split(",") if s]
    out = Path(args.out)
    results = (
        json.loads((out / "levers.json").read_text()) if (out / "levers.json").is_file() else {}
    )
    base = load_config(args.config, profile="levers", data=args.data)
    ext = list(base.external)
    for name, (candidate, change) in LEVERS.items():
        if only and name not in only:
            continue
        cfg = load_config(args.config, profile="levers", data=args.data, only=[candidate])
        spec = cfg.candidates[candidate].spec()
        cfg = cfg.derive(
            run={"out": str(out / name)},
            candidates={
                **{n: e.spec() for n, e in cfg.candidates.items()},
                candidate: {**spec, "params": {**spec["params"], **copy.deepcopy(change)}},
            },
        )
        t = time.perf_counter()
        board = run_benchmark(cfg, show_progress=False)
        row = board.set_index("candidate").loc[candidate]
        results[name] = {
            "candidate": candidate,
            "change": change,
            "seconds": time.perf_counter() - t,
            "accuracy": float(row["accuracy"]),
            "balanced_accuracy": float(row["balanced_accuracy"]),
            **{
                f"{e}_{m}": float(row[f"{e}_{m}"])
                for e in ext
                for m in ("accuracy", "balanced_accuracy")
            },
        }
        (out / "levers.json").write_text(json.dumps(results, indent=2))
    for name, (trained, kw) in EVALUATED.items():
        if not ext or trained not in results or (only and name not in only):
            continue
        e = base["external"][ext[0]]
        t = time.perf_counter()
        r = evaluate(
            out / trained / "predictor",
            e["path"],
            labels=e.get("labels"),
            groups=e.get("groups") or None,
            out=out / f"{name}_eval",
            gradcam=False,
            n_boot=200,
            progress=False,
            **kw,
        )
        what = {("[predictor] tta" if k == "tta" else f"evaluate --{k}"): v for k, v in kw.items()}
        results[name] = {
            "candidate": results[trained].get("candidate"),
            "change": {**results[trained]["change"], **what},
            "seconds": time.perf_counter() - t,
            "accuracy": results[trained]["accuracy"],
            "balanced_accuracy": results[trained]["balanced_accuracy"],
            f"{ext[0]}_accuracy": r["accuracy"],
            f"{ext[0]}_balanced_accuracy": r["balanced_accuracy"],
            "note": f"in-domain figures are {trained}'s (applied only when predicting)",
        }
        (out / "levers.json").write_text(json.dumps(results, indent=2))
    df = pd.DataFrame(results).T
    print(df.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
