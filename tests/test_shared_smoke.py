"""The `smoke` profile on real blood-cell images from ../shared (skipped when absent)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.commands.cli import main
from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
PBC = SHARED / "data" / "pbc"
pytestmark = pytest.mark.skipif(
    not (PBC / "images").is_dir() or not (PBC / "pbc_64.npz").is_file(),
    reason=f"shared PBC data not found at {PBC}",
)


def test_smoke_profile_on_real_images_then_predict_unseen(tmp_path):
    out = tmp_path / "smoke"
    assert (
        main(
            [
                "run",
                "--config",
                str(ROOT / "benchmarks.toml"),
                "--profile",
                "smoke",
                "--data",
                str(PBC / "images"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lb = pd.read_csv(out / "leaderboard.csv").set_index("candidate")
    assert {"rf_hog", "cnn_small", "soft_vote"} <= set(lb.index)
    for name in ("rf_hog", "cnn_small", "soft_vote"):
        assert lb.loc[name, "accuracy"] > 0.35, (name, lb.loc[name, "accuracy"])  # chance 0.125

    # unseen images: npz rows whose original files are not in images/
    with np.load(PBC / "pbc_64.npz") as npz:  # read each array once (an NpzFile re-reads)
        z = {k: npz[k] for k in ("files", "classes", "labels", "images")}
    seen = {p.relative_to(PBC / "images").as_posix() for p in (PBC / "images").rglob("*.jpg")}
    rng = np.random.default_rng(0)
    rows = [i for i in rng.permutation(len(z["files"])) if str(z["files"][i]) not in seen][:80]
    new = tmp_path / "unseen"
    for i in rows:
        d = new / str(z["classes"][z["labels"][i]])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(z["images"][i]).save(d / f"{Path(str(z['files'][i])).stem}.png")
    csv_path = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "predictor"),
                "--img_path",
                str(new),
                "--out",
                str(csv_path),
            ]
        )
        == 0
    )
    preds = list(csv.DictReader(open(csv_path)))
    assert len(preds) == 80
    acc = np.mean([r["prediction"] == Path(r["path"]).parent.name for r in preds])
    assert acc > 0.35, acc
