"""External validation inside a run: [external.NAME] sets scored at the end of `run`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.config import load_config
from tests.conftest import TOY_CLASSES, run_error_line, toy_arrays, write_tiny_config


def _external_folder(root: Path) -> Path:
    """Another lab: paler, pinker toy images; class names in capitals; one class the run
    does not have."""
    X, y = toy_arrays(6, 32, seed=11)
    x = np.clip(0.75 * X.astype(float) + 0.25 * np.array([255, 210, 230]), 0, 255)
    for i, (im, c) in enumerate(zip(x.astype(np.uint8), y)):
        d = root / TOY_CLASSES[c].upper()
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    (root / "other").mkdir()
    Image.fromarray(x[0].astype(np.uint8)).save(root / "other" / "x.png")
    return root


EXTRA = """
[datasets.toy]
path = "{data}"

[datasets.elsewhere]
path = "/nonexistent"

[external.lab2]
path = "{ext}"
datasets = ["toy"]
"""


@pytest.fixture(scope="module")
def ext_run(tmp_path_factory, toy_folder):
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("ext")
    ext = _external_folder(root / "lab2")
    cfg = write_tiny_config(
        root / "c.toml", toy_folder, extra=EXTRA.format(data=toy_folder, ext=ext)
    )
    board, out = run_from_args(
        str(cfg), data="toy", out=str(root / "run"), only=["rf_hog"], show_progress=False
    )
    return cfg, out, ext


def test_external_sets_apply_to_their_datasets_only(ext_run, toy_folder):
    cfg, _, ext = ext_run
    assert list(load_config(cfg, data="toy").external) == ["lab2"]
    assert list(load_config(cfg, data=str(toy_folder)).external) == ["lab2"]  # same path
    assert load_config(cfg, data="elsewhere").external == {}
    assert load_config(cfg).external == {}


def test_every_entry_is_scored_on_the_external_set(ext_run):
    from bench.stats.scoring import score
    from bench.run.rundir import RunDir
    from core.candidate import load_candidate
    from core.images import Preprocessing

    _, out, ext = ext_run
    board = pd.read_csv(out / "leaderboard.csv")
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert f"lab2_{m}" in board and board[f"lab2_{m}"].notna().all()
    run = RunDir(out)
    scores, per_class, meta = run.read_external("lab2")
    assert list(scores["candidate"]) == list(board["candidate"])
    assert meta["n"] == 18 and meta["unmapped"] == {"other": 1}  # capitals matched by name
    # the candidate is the bag of its fold models, on images preprocessed as in training
    y = np.array(meta["labels"])
    paths = sorted(p for p in ext.rglob("*.png") if p.parent.name != "other")
    X = Preprocessing(32).load(paths)[0]
    bag = np.mean(
        [
            load_candidate(run.unit_model_dir("rf_hog", k)).predict_proba(X)
            for k in run.folds.fold_ids
        ],
        axis=0,
    )
    stored = np.load(out / "external" / "lab2" / "proba" / "rf_hog.npy")
    assert stored.shape == (18, 3)
    got = {tuple(np.round(r, 5)) for r in stored}
    assert got == {tuple(np.round(r, 5)) for r in bag.astype(np.float32)}
    s = score(y, stored.astype(np.float64), TOY_CLASSES, n_boot=10)
    row = scores.set_index("candidate").loc["rf_hog"]
    assert row["balanced_accuracy"] == pytest.approx(s["balanced_accuracy"])
    assert board.set_index("candidate").loc["rf_hog", "lab2_accuracy"] == pytest.approx(
        s["accuracy"]
    )


def test_external_intervals_follow_the_stats_confidence(ext_run, toy_folder, tmp_path):
    """[stats] confidence sets the level of the external table's intervals, as of every
    other interval: the same run at 0.9 gives each interval inside the 0.95 one drawn from
    the same resamples, and narrower."""
    from bench.run.rundir import RunDir
    from bench.run.runner import run_from_args

    _, out95, ext = ext_run
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        extra=EXTRA.format(data=toy_folder, ext=ext) + "\n[stats]\nconfidence = 0.9\n",
    )
    _, out90 = run_from_args(
        str(cfg), data="toy", out=str(tmp_path / "run"), only=["rf_hog"], show_progress=False
    )
    wide = RunDir(out95).read_external("lab2")[0].set_index("candidate").loc["rf_hog"]
    table, _, meta = RunDir(out90).read_external("lab2")
    narrow = table.set_index("candidate").loc["rf_hog"]
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert narrow[m] == pytest.approx(wide[m])  # the same predictions
        assert wide[f"{m}_lo"] <= narrow[f"{m}_lo"] <= narrow[f"{m}_hi"] <= wide[f"{m}_hi"]
    assert any(
        narrow[f"{m}_lo"] > wide[f"{m}_lo"] or narrow[f"{m}_hi"] < wide[f"{m}_hi"]
        for m in ("accuracy", "balanced_accuracy", "macro_f1")
    )


@pytest.mark.parametrize(
    "entry,fragment",
    [
        ('[external.x]\npath = "/p"\ndatasets = ["nope"]\n', "datasets ['nope'] are not"),
        ('[external.x]\npath = "/p"\nlabels = "cells.csv"\n', "[external.x] labels"),
        ('[external.x]\npath = "/p"\nlabls = "a.csv:c"\n', "did you mean 'labels'"),
        ('[external."../x"]\npath = "/p"\n', "external set name '../x' is not allowed"),
    ],
)
def test_bad_external_entries_are_one_line(entry, fragment, toy_folder, tmp_path, capsys):
    assert fragment in run_error_line(entry, toy_folder, tmp_path, capsys)
