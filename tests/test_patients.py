"""Bag (patient-level) tasks: patient-disjoint folds, aggregators that never see a test
patient, the patient leaderboard, and the predictor's per-patient diagnosis."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.protocols import patients as patients_mod
from bench.config import PatientsSection, load_config
from bench.data.folds import make_bag_folds
from bench.run.runner import run_benchmark
from core.errors import BenchError
from core.splits import PredefinedFolds
from ensembles.bags import (
    CompositionAggregator,
    MeanAggregator,
    TopKMeanAggregator,
    TrimmedMeanAggregator,
    choose_threshold,
)
from ensembles.predictor import load_predictor
from ensembles.record import BagTask

REPO = Path(__file__).resolve().parents[1]
CELL_TYPES = ["blast", "promyelocyte", "neutrophil"]


def _cell(rng, kind: int, diagnosis: int, size: int = 24) -> np.ndarray:
    """A cell whose type sets its shape and whose patient's diagnosis tints its colour."""
    img = rng.normal(225, 10, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    r = size * (0.2 + 0.08 * kind)
    mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r**2
    base = np.array([150, 60, 140]) if diagnosis == 0 else np.array([200, 90, 60])
    img[mask] = base + rng.normal(0, 25, (mask.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_patients(root: Path, n_patients: int = 20, cells: int = 12, seed: int = 0) -> Path:
    """``root/images/<type>/<patient>__<i>.png`` and ``root/cells.csv`` (file, patient,
    diagnosis, cell_class); a third of the patients are APL (more promyelocytes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        apl = int(p % 3 == 0)
        n = cells + int(rng.integers(0, 6))
        weights = [0.3, 0.5, 0.2] if apl else [0.6, 0.1, 0.3]
        for i in range(n):
            kind = int(rng.choice(3, p=weights))
            rel = f"images/{CELL_TYPES[kind]}/P{p:02d}__{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_cell(rng, kind, apl)).save(root / rel)
            rows.append(
                {
                    "file": rel,
                    "patient": f"P{p:02d}",
                    "diagnosis": "APL" if apl else "AML",
                    "cell_class": CELL_TYPES[kind],
                }
            )
    pd.DataFrame(rows).to_csv(root / "cells.csv", index=False)
    return root


BAG_CONFIG = """
[run]
seed = 0
folds = 4
profile = "tiny"

[data]
path = "{root}/images"
image_size = 24
labels = "{root}/cells.csv:diagnosis"
groups = "{root}/cells.csv"
bags = true
positive = "APL"
cell_types = "{root}/cells.csv:cell_class"

[patients]
n_boot = 300

[feature_sets.color]
color = {{ bins = 8, spaces = ["rgb"], moments = true }}

[candidates.rf_color]
type = "feature_forest"
params = {{ features = "color", n_estimators = 40 }}

[candidates.rf_color2]
type = "feature_forest"
params = {{ features = "color", n_estimators = 20, max_depth = 3 }}

[ensembles.vote]
type = "soft_voting"
members = "all"

[report]
enabled = false

[profiles.tiny]
description = "tests"
patients = {{ composition_features = "color" }}
"""


@pytest.fixture(scope="module")
def bag_data(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("patients"))


def _config(tmp_path: Path, root: Path, extra: str = "") -> Path:
    p = tmp_path / "bags.toml"
    p.write_text(BAG_CONFIG.format(root=root) + extra)
    return p


# ----------------------------------------------------------------------------- folds


def test_bag_folds_hold_whole_bags_stratified_by_bag_label():
    rng = np.random.default_rng(1)
    bag_sizes = rng.integers(3, 60, size=30)
    bags = np.repeat([f"p{i}" for i in range(30)], bag_sizes)
    bag_label = (np.arange(30) % 3 == 0).astype(int)
    labels = np.repeat(bag_label, bag_sizes)
    groups = np.unique(bags, return_inverse=True)[1]
    folds = make_bag_folds(labels, bags, groups, 5, 0, ["AML", "APL"])
    table = pd.DataFrame({"bag": bags, "fold": folds})
    assert (table.groupby("bag")["fold"].nunique() == 1).all()  # no bag split
    per_fold = table.drop_duplicates("bag").assign(y=bag_label).groupby("fold")["y"]
    assert per_fold.sum().tolist() == [2, 2, 2, 2, 2]  # 10 positive bags / 5
    assert per_fold.size().tolist() == [6, 6, 6, 6, 6]  # counted in bags, not cells


def test_bag_folds_refuse_too_few_bags_of_a_class():
    bags = np.repeat(["a", "b", "c", "d", "e", "f"], 4)
    labels = np.repeat([1, 1, 0, 0, 0, 0], 4)
    with pytest.raises(BenchError, match="class 'APL' has 2 bag"):
        make_bag_folds(labels, bags, np.unique(bags, return_inverse=True)[1], 3, 0, ["AML", "APL"])


# ----------------------------------------------------------------------------- aggregators


def test_aggregators_numbers():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 1.0, 0.0, 0.5, 0.6, 0.7])
    assert MeanAggregator().score_bag(p) == pytest.approx(0.47)
    assert TrimmedMeanAggregator(0.1).score_bag(p) == pytest.approx(np.mean(np.sort(p)[1:-1]))
    assert TopKMeanAggregator(0.2).score_bag(p) == pytest.approx(0.95)
    assert TopKMeanAggregator(0.01).score_bag(p) == pytest.approx(1.0)  # at least one cell


def test_youden_threshold_separates_training_scores():
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 0, 1, 1, 1])
    t = choose_threshold(s, y)
    assert 0.3 < t < 0.6 and t == pytest.approx(0.45)
    assert choose_threshold(s, y, "half") == 0.5


def test_fold_thresholds_never_use_the_folds_own_bags():
    rng = np.random.default_rng(0)
    n = 40
    bag_of_row = np.repeat(np.arange(n), 3).astype(str)
    y_bag = (np.arange(n) % 2).astype(int)
    labels = np.repeat(y_bag, 3)
    fold_of_bag = np.arange(n) % 4
    bags = patients_mod.Bags(bag_of_row, labels, 1, PredefinedFolds(np.repeat(fold_of_bag, 3)))
    scores = rng.uniform(size=n)
    t1 = patients_mod._fold_thresholds(scores, bags, "youden")
    changed = scores.copy()
    changed[bags.fold == 2] = rng.uniform(size=(bags.fold == 2).sum()) * 100  # fold 2 only
    t2 = patients_mod._fold_thresholds(changed, bags, "youden")
    assert np.array_equal(t1[bags.fold == 2], t2[bags.fold == 2])
    assert not np.array_equal(t1[bags.fold != 2], t2[bags.fold != 2])


def _numbered_images(n: int) -> np.ndarray:
    """Tiny images whose first pixel carries the row's number (read back by a spy)."""
    X = np.random.default_rng(1).integers(0, 255, (n, 8, 8, 3)).astype(np.uint8)
    X[:, 0, 0, 0], X[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return X


def _ids(X) -> set:
    X = np.asarray(X)
    return set((X[:, 0, 0, 0].astype(int) + 256 * X[:, 0, 0, 1].astype(int)).tolist())


def test_cell_type_stage_and_patient_models_never_see_a_test_bag(monkeypatch):
    """Every cell-type model, composition model and type model of outer fold k is fitted
    without fold k's bags (each image carries its row's number, recorded at every fit);
    every cell's out-of-fold types come from a model that never saw its bag."""
    from baselines.models import FeatureLDA
    from ensembles.bags import TypeModelAggregator

    rng = np.random.default_rng(0)
    n_bags, per = 24, 10
    bag_of_row = np.repeat([f"b{i:02d}" for i in range(n_bags)], per)
    y_bag = (np.arange(n_bags) % 3 == 0).astype(int)
    fold_of_bag = np.arange(n_bags) % 4
    bags = patients_mod.Bags(
        bag_of_row, np.repeat(y_bag, per), 1, PredefinedFolds(np.repeat(fold_of_bag, per))
    )
    types = rng.choice(["a", "b", "c"], size=len(bag_of_row))
    images = _numbered_images(len(types))
    cell_fits, bag_fits = [], []
    real_lda, real_comp, real_type = (
        FeatureLDA.fit,
        CompositionAggregator.fit,
        TypeModelAggregator.fit,
    )

    def spy_lda(self, X, y, *a, **k):
        cell_fits.append(_ids(X))
        return real_lda(self, X, y, *a, **k)

    def spy(real):
        def fit(self, X, y):
            bag_fits.append(len(X))
            return real(self, X, y)

        return fit

    monkeypatch.setattr(FeatureLDA, "fit", spy_lda)
    monkeypatch.setattr(CompositionAggregator, "fit", spy(real_comp))
    monkeypatch.setattr(TypeModelAggregator, "fit", spy(real_type))
    features = {"color": {"bins": 4, "spaces": ["rgb"], "moments": True}}
    stage = patients_mod.CellTypeStage(images, features, types, bags, show_progress=False)
    per_fold = patients_mod.INNER_FOLDS + 1
    assert len(cell_fits) == 4 * per_fold  # the final model only when a carried row asks
    stage.final
    assert len(cell_fits) == 4 * per_fold + 1  # and the final model, on every cell
    for k in range(4):
        test_rows = set(np.flatnonzero(np.repeat(fold_of_bag, per) == k))
        for rows in cell_fits[k * per_fold : (k + 1) * per_fold]:
            assert rows and not rows & test_rows
    assert cell_fits[-1] == set(range(len(types)))
    assert stage.types == ["a", "b", "c"] and stage.oof.shape == (len(types), 3)
    assert np.allclose(stage.oof.sum(1), 1)
    settings = PatientsSection(seed=0, threshold="youden")
    scores, thresholds = patients_mod.composition_scores(stage, bags, settings, False)
    p_cell = np.repeat(y_bag, per) * 0.3 + rng.uniform(0, 0.7, len(types))
    t_scores, _ = patients_mod.type_model_scores(stage, p_cell, bags, settings)
    train = [int((fold_of_bag != k).sum()) for k in range(4)]
    # each fold: one fit on the training bags, then the threshold's cross-validation fits
    assert [n for n in bag_fits if n in train][:1] == train[:1]
    assert max(bag_fits) == max(train)
    assert np.all((scores >= 0) & (scores <= 1)) and np.all((t_scores >= 0) & (t_scores <= 1))
    # the cell scores carry the diagnosis, so the type model separates the bags
    assert _auc(t_scores, y_bag) > 0.9
    typed = stage.typed_rows(bags, ["a"])
    assert all(set(t) <= set(r) and len(t) for t, r in zip(typed, bags.rows))


def _auc(s, y) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


# ----------------------------------------------------------------------------- config


def test_bags_need_groups_and_a_positive_class(tmp_path, bag_data):
    cfg = _config(tmp_path, bag_data).read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.replace(f'groups = "{bag_data}/cells.csv"\n', ""))
    with pytest.raises(BenchError, match="bags = true needs \\[data\\] groups"):
        load_config(bad)
    bad.write_text(cfg.replace('positive = "APL"\n', ""))
    with pytest.raises(BenchError, match="needs \\[data\\] positive"):
        load_config(bad)
    bad.write_text(cfg.replace(f'cell_types = "{bag_data}/cells.csv:cell_class"\n', ""))
    with pytest.raises(BenchError, match="needs \\[data\\] cell_types"):
        load_config(bad)


def test_mixed_labels_in_a_bag_are_refused(tmp_path, bag_data):
    cells = pd.read_csv(bag_data / "cells.csv")
    cells.loc[0, "diagnosis"] = "APL" if cells.loc[0, "diagnosis"] == "AML" else "AML"
    cells["file"] = [str(bag_data / f) for f in cells["file"]]  # absolute paths work too
    cells.to_csv(tmp_path / "cells.csv", index=False)
    text = (
        _config(tmp_path, bag_data)
        .read_text()
        .replace(
            f'labels = "{bag_data}/cells.csv:diagnosis"',
            f'labels = "{tmp_path}/cells.csv:diagnosis"',
        )
    )
    (tmp_path / "mixed.toml").write_text(text)
    cfg = load_config(tmp_path / "mixed.toml", out=str(tmp_path / "run"))
    with pytest.raises(BenchError, match="bag\\(s\\) hold images of several labels"):
        run_benchmark(cfg, show_progress=False)


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def bag_run(tmp_path_factory, bag_data):
    tmp = tmp_path_factory.mktemp("bagrun")
    cfg = load_config(_config(tmp, bag_data), out=str(tmp / "run"))
    run_benchmark(cfg, show_progress=False)
    return tmp / "run"


def test_run_writes_a_patient_leaderboard(bag_run, bag_data):
    full = pd.read_csv(bag_run / "patient_leaderboard.csv")
    assert full["kind"].iloc[0] == "nested" and np.isnan(full["rank"].iloc[0])
    board = full[full["kind"] != "nested"].reset_index(drop=True)
    assert set(board["aggregator"]) == {
        "mean",
        "trimmed_mean",
        "top_k_mean",
        "composition",
        "type_model",
    }
    assert len(board) == 3 * 4 + 1  # 2 candidates + 1 ensemble, x4; composition
    # both forests read colour only: shortcut rows, never the predictor's
    assert set(board.loc[board["shortcut"], "source"]) == {"rf_color", "rf_color2"}
    assert (board["n_bags"] == 20).all()
    for m in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "log_loss"):
        assert ((board[f"{m}_lo"] <= board[m] + 1e-9) & (board[m] <= board[f"{m}_hi"] + 1e-9)).all()
    assert board["roc_auc"].is_monotonic_decreasing
    assert board["roc_auc"].iloc[0] >= 0.9  # the diagnosis tints every cell
    assert np.isnan(board["p_vs_best"].iloc[0]) and board["p_vs_best"].iloc[1:].between(0, 1).all()
    folds = pd.read_csv(bag_run / "folds.csv", dtype={"bag": str})
    assert (folds.groupby("bag")["fold"].nunique() == 1).all()
    scores = pd.read_csv(bag_run / "patients" / "scores.csv")
    assert len(scores) == 20 and set(scores["label"]) == {"APL", "AML"}
    truth = pd.read_csv(bag_data / "cells.csv").drop_duplicates("patient").set_index("patient")
    assert (scores.set_index("bag")["label"] == truth.loc[scores["bag"], "diagnosis"].values).all()
    meta = json.loads((bag_run / "patients" / "meta.json").read_text())
    assert meta["positive"] == "APL" and meta["n_positive"] == 7
    manifest = json.loads((bag_run / "manifest.json").read_text())
    assert "over bags" in manifest["folds"]["scheme"]


def test_predictor_diagnoses_patient_folders(bag_run, bag_data, tmp_path):
    cells = pd.read_csv(bag_data / "cells.csv")
    shown = ["P00", "P01", "P03", "P04"]  # APL, AML, APL, AML
    for p in shown:
        for f in cells.file[cells.patient == p]:
            (tmp_path / "pats" / p).mkdir(parents=True, exist_ok=True)
            (tmp_path / "pats" / p / Path(f).name).write_bytes((bag_data / f).read_bytes())
    pred = load_predictor(bag_run / "predictor")
    assert pred.bag_task_.positive == "APL"
    out = tmp_path / "patients.csv"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "predict",
            "--model",
            str(bag_run / "predictor"),
            "--img_path",
            str(tmp_path / "pats"),
            "--bags",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["bag"] for r in rows] == shown
    assert [r["decision"] for r in rows] == ["APL", "AML", "APL", "AML"]
    assert [int(r["n_cells"]) for r in rows] == [int((cells.patient == p).sum()) for p in shown]
    cell_rows = pd.read_csv(tmp_path / "patients_cells.csv")
    assert len(cell_rows) == sum(int(r["n_cells"]) for r in rows)
    # one patient's folder on its own is one bag
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "predict",
            "--model",
            str(bag_run / "predictor"),
            "--img_path",
            str(tmp_path / "pats" / "P00"),
            "--bags",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert one.returncode == 0 and one.stdout.splitlines()[1].startswith("P00,")


def test_a_type_model_predictor_carries_its_cell_types(tmp_path, bag_data):
    """A run whose carried row is a type model: the predictor holds the cell-type model
    and the type model, answers a patient as the run scored it, and takes the analyser's
    types from the folders when asked (and says which it used)."""
    text = _config(tmp_path, bag_data).read_text()
    text = text.replace(
        "[patients]\nn_boot = 300\n",
        '[patients]\nn_boot = 300\naggregators = ["type_model"]\nrefer_rate = 0.1\n',
    )
    (tmp_path / "tm.toml").write_text(text)
    cfg = load_config(tmp_path / "tm.toml", out=str(tmp_path / "run"))
    run_benchmark(cfg, show_progress=False)
    meta = json.loads((tmp_path / "run" / "patients" / "meta.json").read_text())
    assert meta["carried"]["row"] == "vote+type_model"  # the only row not a shortcut
    curve = meta["nested"]["referral_curve"]
    assert [c["max_rate"] for c in curve][:3] == [0.0, 0.05, 0.1]
    assert all(c["referred"] <= 0.35 for c in curve if c["max_rate"] <= 0.25)
    pred_dir = tmp_path / "run" / "predictor"
    manifest = json.loads((pred_dir / "manifest.json").read_text())
    bags = manifest["bags"]
    assert bags["aggregator"] == "type_model" and bags["refer_rate"] == 0.1
    assert bags["cell_types"]["types"] == sorted(CELL_TYPES)
    assert "bag/type_model.npz" in manifest["files"]
    assert any(f.startswith("bag/cell_types/") for f in manifest["files"])
    assert "referral" in (pred_dir / "MODEL_CARD.md").read_text()
    cells = pd.read_csv(bag_data / "cells.csv")
    for p in ("P00", "P01"):
        for f in cells.file[cells.patient == p]:
            dest = tmp_path / "pats" / p / Path(f).parent.name / Path(f).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes((bag_data / f).read_bytes())
    outs = {}
    for how in ("model", "folders"):
        out = tmp_path / f"{how}.csv"
        res = subprocess.run(
            [sys.executable, "-m", "bench", "predict", "--model", str(pred_dir)]
            + ["--img_path", str(tmp_path / "pats"), "--bags", "--out", str(out)]
            + (["--cell-types", "folders"] if how == "folders" else []),
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert res.returncode == 0, res.stderr
        outs[how] = list(csv.DictReader(out.open()))
        said = "the analyser (folders)" if how == "folders" else "the predictor's model"
        assert f"2 patient(s) from {said}" in res.stderr
    assert [r["cell_types"] for r in outs["model"]] == ["model", "model"]
    assert [r["cell_types"] for r in outs["folders"]] == ["given", "given"]
    assert [r["decision"] for r in outs["folders"]] == ["APL", "AML"]
    # the cell-type model types these cells well, so both answer alike
    for a, b in zip(outs["model"], outs["folders"]):
        assert abs(float(a["probability_APL"]) - float(b["probability_APL"])) < 0.2
    # evaluate types the cells from its own decoded batches, as predict --bags does
    from bench.commands.evaluate import evaluate

    sub = cells[cells.patient.isin(["P00", "P01"])]
    sub.to_csv(tmp_path / "two.csv", index=False)
    (tmp_path / "images").symlink_to(bag_data / "images")
    res = evaluate(
        pred_dir,
        tmp_path / "images",
        labels=f"{tmp_path / 'two.csv'}:diagnosis",
        groups="patient",
        out=tmp_path / "ev",
        gradcam=False,
        progress=False,
        n_boot=50,
    )
    scored = {r["bag"]: r["probability"] for r in res["patients"]["rows"]}
    direct = load_predictor(pred_dir).predict_bags(
        {p: [str(bag_data / f) for f in sub.file[sub.patient == p]] for p in ("P00", "P01")}
    )
    assert {r["bag"]: r["probability"] for r in direct} == pytest.approx(scored, abs=1e-9)
    bad = subprocess.run(
        [sys.executable, "-m", "bench", "predict", "--model", str(pred_dir)]
        + ["--img_path", str(tmp_path / "pats"), "--bags", "--cell-types", "nocolumn"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and bad.stderr.startswith("error: --cell-types")
    assert "Traceback" not in bad.stderr
    # the types from a CSV: P00's listed, P01's not (it keeps the model's)
    listed = [
        {"file": f"P00/{Path(f).parent.name}/{Path(f).name}", "kind": Path(f).parent.name}
        for f in cells.file[cells.patient == "P00"]
    ]
    pd.DataFrame(listed).to_csv(tmp_path / "pats" / "types.csv", index=False)
    out = tmp_path / "csv.csv"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "predict", "--model", str(pred_dir)]
        + ["--img_path", str(tmp_path / "pats"), "--bags", "--out", str(out)]
        + ["--cell-types", f"{tmp_path / 'pats' / 'types.csv'}:kind"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    got = list(csv.DictReader(out.open()))
    assert [r["cell_types"] for r in got] == ["given", "model"]
    assert float(got[0]["probability_APL"]) == pytest.approx(
        float(outs["folders"][0]["probability_APL"]), abs=1e-9
    )


def test_an_empty_patient_folder_gets_a_none_row(bag_run, bag_data, tmp_path):
    """A patient folder without any image is one row with decision none (issue 40), as the
    README promises, not dropped."""
    cells = pd.read_csv(bag_data / "cells.csv")
    pats = tmp_path / "pats"
    for f in cells.file[cells.patient == "P00"]:
        (pats / "P00").mkdir(parents=True, exist_ok=True)
        (pats / "P00" / Path(f).name).write_bytes((bag_data / f).read_bytes())
    (pats / "P99").mkdir()
    (pats / "P98").mkdir()
    (pats / "P98" / "notes.txt").write_text("no images here")
    out = tmp_path / "patients.csv"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "predict",
            "--model",
            str(bag_run / "predictor"),
            "--img_path",
            str(pats),
            "--bags",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    rows = {r["bag"]: r for r in csv.DictReader(out.open())}
    assert list(rows) == ["P00", "P98", "P99"]
    for empty in ("P98", "P99"):
        assert rows[empty]["decision"] == "none" and rows[empty]["n_cells"] == "0"
        assert rows[empty]["reason"] == "no image file"
    assert rows["P00"]["decision"] == "APL"
    assert "2 none (no readable image)" in res.stderr
    # a second run replaces its own files, and refuses a cell file of the user's
    (tmp_path / "mine_cells.csv").write_text("keep")
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "predict",
            "--model",
            str(bag_run / "predictor"),
            "--img_path",
            str(pats),
            "--bags",
            "--out",
            str(tmp_path / "mine.csv"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert again.returncode == 2 and "mine_cells.csv" in again.stderr
    assert (tmp_path / "mine_cells.csv").read_text() == "keep"
    assert not (tmp_path / "mine.csv").exists()


def test_predict_bags_refuses_a_single_image_predictor(tmp_path, toy_folder):
    from tests.conftest import write_tiny_config

    cfg = load_config(
        write_tiny_config(tmp_path / "c.toml", toy_folder),
        only=["rf_hog"],
        out=str(tmp_path / "run"),
    )
    run_benchmark(cfg, show_progress=False)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "predict",
            "--model",
            str(tmp_path / "run" / "predictor"),
            "--img_path",
            str(toy_folder),
            "--bags",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error: --bags: predictor")


def test_report_has_the_patient_section(bag_run):
    from bench.report import write_report

    index = write_report(bag_run, gradcam=False, progress=False)
    html = index.read_text()
    assert 'id="patients"' in html and 'href="#patients"' in html
    assert html.count("<tr") >= 10 + 20  # leaderboard rows and one row per patient
    for f in ("patients_roc.png", "patients_scores.png", "patients_cells.png"):
        assert (index.parent / "img" / f).stat().st_size > 5000
    calls = pd.read_csv(index.parent / "csv" / "patient_calls.csv")
    assert len(calls) == 20 and set(calls["call"]) <= {"APL", "AML"}


def test_a_bad_bag_field_in_the_manifest_is_refused(bag_run, tmp_path):
    import shutil
    from ensembles.predictor import manifest_digest, verify_predictor

    pred = tmp_path / "predictor"
    shutil.copytree(bag_run / "predictor", pred)
    m = json.loads((pred / "manifest.json").read_text())
    m["bags"]["aggregator"] = "max"
    m["manifest_sha256"] = manifest_digest(m)
    (pred / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BenchError, match="bags 'aggregator' must be"):
        verify_predictor(pred)


def test_leakage_audit_of_a_bag_task_scores_cells_on_image_level_folds(tmp_path, bag_data):
    from bench.protocols.leakage import audit_config

    cfg = load_config(_config(tmp_path, bag_data), out=str(tmp_path / "run"))
    audit = audit_config(cfg, tmp_path / "run" / "leakage")
    assert audit.data.bags is False and audit.data.groups == ""
    assert audit.data.labels == cfg.data.labels  # the same weak labels


def test_too_few_cell_types_are_refused_before_any_unit_runs(tmp_path, bag_data):
    cells = pd.read_csv(bag_data / "cells.csv")
    cells["file"] = [str(bag_data / f) for f in cells["file"]]
    cells.loc[5:, "cell_class"] = ""
    cells.to_csv(tmp_path / "cells.csv", index=False)
    text = (
        _config(tmp_path, bag_data)
        .read_text()
        .replace(
            f'cell_types = "{bag_data}/cells.csv:cell_class"',
            f'cell_types = "{tmp_path}/cells.csv:cell_class"',
        )
    )
    (tmp_path / "few.toml").write_text(text)
    cfg = load_config(tmp_path / "few.toml", out=str(tmp_path / "run"))
    with pytest.raises(BenchError, match="cell_types: only 5 of"):
        run_benchmark(cfg, show_progress=False)
    assert not (tmp_path / "run" / "units").exists()


# ----------------------------------------------------------------------------- bad files, few cells


def _patient_folders(bag_data: Path, root: Path, shown: list[str]) -> Path:
    cells = pd.read_csv(bag_data / "cells.csv")
    for p in shown:
        (root / p).mkdir(parents=True, exist_ok=True)
        for f in cells.file[cells.patient == p]:
            (root / p / Path(f).name).write_bytes((bag_data / f).read_bytes())
    return root


def _predict_bags_cli(model: Path, folder: Path, out: Path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "predict",
            "--model",
            str(model),
            "--img_path",
            str(folder),
            "--bags",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "400"},
    )  # warnings unwrapped
    return res, (pd.read_csv(out, dtype=str, keep_default_na=False) if out.exists() else None)


def test_the_predictor_stores_min_cells_from_the_training_bags(bag_run, bag_data):
    spec = load_predictor(bag_run / "predictor").bag_task_
    counts = pd.read_csv(bag_data / "cells.csv").groupby("patient").size()
    assert spec.min_cells == int(np.floor(np.percentile(counts, 5)))
    assert 1 <= spec.min_cells <= counts.min() + 1
    assert "percentile" in spec.min_cells_rule


def test_one_bad_file_does_not_stop_the_batch(bag_run, bag_data, tmp_path):
    shown = ["P00", "P01", "P03", "P04"]
    clean = _patient_folders(bag_data, tmp_path / "clean", shown)
    dirty = _patient_folders(bag_data, tmp_path / "dirty", shown)
    (dirty / "P01" / "zz_corrupt.jpg").write_bytes(b"this is not an image")
    (dirty / "P01" / "zz_empty.png").write_bytes(b"")
    good = next((dirty / "P01").glob("*.png")).read_bytes()
    (dirty / "P01" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    # a patient whose every file is unreadable
    (dirty / "P99").mkdir()
    (dirty / "P99" / "a.jpg").write_bytes(b"junk")
    (dirty / "P99" / "b.png").write_bytes(b"")
    (dirty / "P99" / "c.png").write_bytes(b"\x89PNG")
    model = bag_run / "predictor"
    res0, ref = _predict_bags_cli(model, clean, tmp_path / "clean.csv")
    res, got = _predict_bags_cli(model, dirty, tmp_path / "dirty.csv")
    assert res0.returncode == 0 and res.returncode == 0, res.stderr
    assert list(got.columns[:6]) == [
        "bag",
        "n_cells",
        "n_skipped",
        "probability_APL",
        "decision",
        "reason",
    ]
    got = got.set_index("bag")
    ref = ref.set_index("bag")
    assert list(got.index) == shown + ["P99"]
    # the other patients, and the patient with bad files, score as in the clean run
    for p in shown:
        assert got.loc[p, "probability_APL"] == ref.loc[p, "probability_APL"]
        assert got.loc[p, "decision"] == ref.loc[p, "decision"]
        assert got.loc[p, "n_cells"] == ref.loc[p, "n_cells"]
    assert got.loc["P01", "n_skipped"] == "3"
    assert (got.loc[["P00", "P03", "P04"], "n_skipped"] == "0").all()
    assert got.loc["P99", "decision"] == "none" and got.loc["P99", "n_cells"] == "0"
    assert got.loc["P99", "n_skipped"] == "3" and got.loc["P99", "reason"] == "no readable image"
    assert got.loc["P99", "probability_APL"] == ""
    err = " ".join(res.stderr.split())  # one warning line per file, then a count
    assert err.count("warning: skipped cannot read image") == 5
    assert "zz_corrupt.jpg" in err and "warning: skipped 1 more unreadable file(s)" in err
    assert "1 none (no readable image)" in res.stderr
    cells = pd.read_csv(tmp_path / "dirty_cells.csv")
    assert not cells["path"].str.contains("zz_|P99").any()
    assert len(cells) == got["n_cells"].astype(int).sum()


def test_a_batch_of_only_unreadable_files_is_an_error(bag_run, tmp_path):
    (tmp_path / "pats" / "P1").mkdir(parents=True)
    (tmp_path / "pats" / "P1" / "x.jpg").write_bytes(b"junk")
    res, _ = _predict_bags_cli(bag_run / "predictor", tmp_path / "pats", tmp_path / "o.csv")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error: none of the 1 image file(s)")
    assert not (tmp_path / "o.csv").exists()


def test_too_few_cells_are_referred_not_called(bag_run, bag_data, tmp_path):
    pred = load_predictor(bag_run / "predictor")
    min_cells = pred.bag_task_.min_cells
    root = _patient_folders(bag_data, tmp_path / "pats", ["P00", "P01"])
    few = sorted((root / "P00").glob("*.png"))
    for f in few[3:]:
        f.unlink()
    assert 3 < min_cells
    res, got = _predict_bags_cli(bag_run / "predictor", root, tmp_path / "p.csv")
    assert res.returncode == 0, res.stderr
    got = got.set_index("bag")
    assert got.loc["P00", "decision"] == "refer" and got.loc["P00", "n_cells"] == "3"
    assert got.loc["P00", "reason"].startswith(
        f"too few cells (3 < min_cells {min_cells}); leaning "
    )
    assert got.loc["P00", "leaning"] in ("APL", "AML")  # the call at the threshold alone
    assert 0 <= float(got.loc["P00", "probability_APL"]) <= 1  # the score is still shown
    assert got.loc["P01", "decision"] == "AML" and got.loc["P01", "reason"] == ""
    assert "1 refer (too few cells)" in res.stderr
    # the Python API says the same
    r = pred.predict_bags({"few": [str(f) for f in few[:3]]})[0]
    assert (r["decision"], r["n_cells"], r["n_skipped"]) == ("refer", 3, 0)


def _min_cells_config(tmp_path: Path, root: Path, value) -> Path:
    p = tmp_path / "bags.toml"
    p.write_text(
        BAG_CONFIG.format(root=root).replace("n_boot = 300", f"n_boot = 300\nmin_cells = {value}")
    )
    return p


@pytest.mark.parametrize(
    "value,message",
    [
        ("0", "[patients] min_cells must be at least 1, got 0"),
        ("2.5", "[patients] min_cells must be an integer, got 2.5"),
        ('"many"', "[patients] min_cells must be an integer, got 'many'"),
    ],
)
def test_a_bad_min_cells_is_one_line(tmp_path, bag_data, value, message):
    with pytest.raises(BenchError) as exc:
        load_config(_min_cells_config(tmp_path, bag_data, value))
    assert str(exc.value).endswith(message) and "\n" not in str(exc.value)


def test_a_set_min_cells_is_stored(tmp_path, bag_data):
    cfg = load_config(
        _min_cells_config(tmp_path, bag_data, 7), out=str(tmp_path / "run"), only=["rf_color"]
    )
    run_benchmark(cfg, show_progress=False)
    spec = load_predictor(tmp_path / "run" / "predictor").bag_task_
    assert spec.min_cells == 7 and spec.min_cells_rule == "[patients] min_cells = 7"


def test_call_bags_applies_threshold_min_cells_and_skips_per_bag():
    from ensembles.bags import call_bags

    spec = BagTask(positive="APL", aggregator="mean", threshold=0.5, min_cells=3)
    rows = call_bags(
        spec,
        ["AML", "APL"],
        ["a", "a", "a", "b", "b", "c", "c", "c"],
        [0.9, 0.8, 0.7, 0.9, 0.9, 0.1, 0.2, 0.3],
        labels=["APL"] * 5 + ["AML"] * 3,
        skipped_groups=["b", "d"],
    )
    got = {r["bag"]: (r["n_cells"], r["n_skipped"], r["decision"], r["label"]) for r in rows}
    assert got == {
        "a": (3, 0, "APL", "APL"),
        "b": (2, 1, "refer", "APL"),
        "c": (3, 0, "AML", "AML"),
        "d": (0, 1, "none", None),
    }
    assert rows[0]["probability"] == pytest.approx(0.8) and np.isnan(rows[3]["probability"])
    assert rows[1]["reason"].startswith("too few cells (2 < min_cells 3); leaning ")
    # a predictor saved before min_cells existed has no minimum
    old = BagTask.model_validate({"positive": "APL", "aggregator": "mean", "threshold": 0.5})
    assert old.min_cells == 1
    assert call_bags(old, ["AML", "APL"], ["b"], [0.9])[0]["decision"] == "APL"


def test_evaluate_with_groups_calls_each_patient_by_the_same_rules(bag_run, bag_data, tmp_path):
    import shutil
    from bench.commands.evaluate import evaluate, summary

    root = tmp_path / "set"
    shutil.copytree(bag_data, root)
    cells = pd.read_csv(root / "cells.csv")
    keep = ["P00", "P01", "P02", "P03", "P04", "P05"]
    cells = cells[cells.patient.isin(keep)]
    few = cells.index[cells.patient == "P03"][3:]  # P03 (APL) keeps 3 cells
    cells = cells.drop(few)
    bad = root / "images" / "blast" / "P01__zz_corrupt.png"
    bad.write_bytes(b"not an image")
    cells = pd.concat(
        [
            cells,
            pd.DataFrame(
                [
                    {
                        "file": "images/blast/P01__zz_corrupt.png",
                        "patient": "P01",
                        "diagnosis": "AML",
                        "cell_class": "blast",
                    }
                ]
            ),
        ]
    )
    cells.to_csv(root / "cells.csv", index=False)
    res = evaluate(
        bag_run / "predictor",
        root / "images",
        labels=f"{root / 'cells.csv'}:diagnosis",
        groups="patient",
        out=tmp_path / "ev",
        gradcam=False,
        progress=False,
        n_boot=50,
    )
    pat = res["patients"]
    rows = {r["bag"]: r for r in pat["rows"]}
    assert set(rows) == set(keep)
    assert rows["P03"]["decision"] == "refer" and rows["P03"]["n_cells"] == 3
    assert rows["P01"]["n_skipped"] == 1 and rows["P01"]["decision"] == "AML"
    assert (pat["n"], pat["n_refer"], pat["n_none"], pat["n_called"]) == (6, 1, 0, 5)
    # the same calls as predict --bags on the same cells
    pred = load_predictor(bag_run / "predictor")
    for p in ("P00", "P01"):
        files = [str(root / f) for f in cells.file[cells.patient == p]]
        direct = pred.predict_bags({p: files})[0]
        assert direct["decision"] == rows[p]["decision"]
        assert direct["probability"] == pytest.approx(rows[p]["probability"], abs=1e-12)
        assert direct["n_skipped"] == rows[p]["n_skipped"]
    assert pat["sensitivity"] == 1.0 and pat["specificity"] == 1.0  # P00 APL, the rest AML
    table = pd.read_csv(tmp_path / "ev" / "patients.csv")
    assert len(table) == 6 and set(table["decision"]) == {"APL", "AML", "refer"}
    assert "refer 1 (column reason)" in summary(res)


def test_refer_band_refers_and_scoring_counts_the_lean_at_threshold():
    from bench.stats.scoring import score_patients
    from ensembles.bags import call_bags

    spec = BagTask(
        positive="APL",
        aggregator="mean",
        threshold=0.5,
        min_cells=1,
        refer_band={"lo": 0.45, "hi": 0.62},
    )
    rows = call_bags(
        spec,
        ["AML", "APL"],
        ["a", "b", "c", "d"],
        [0.9, 0.55, 0.3, 0.48],
        labels=["APL", "APL", "AML", "APL"],
    )
    got = {r["bag"]: (r["decision"], r["leaning"]) for r in rows}
    assert got == {
        "a": ("APL", "APL"),
        "b": ("refer", "APL"),
        "c": ("AML", "AML"),
        "d": ("refer", "AML"),
    }
    assert rows[1]["reason"].endswith("leaning APL")
    s = score_patients(rows, "APL")
    assert (s["n_called"], s["n_refer"]) == (2, 2)
    assert s["sensitivity"] == 1.0 and s["specificity"] == 1.0  # called ones only
    assert s["sensitivity_at_threshold"] == pytest.approx(2 / 3)  # d leans AML
    assert s["specificity_at_threshold"] == 1.0
    with pytest.raises(Exception, match="'lo' above 'hi'"):
        BagTask.model_validate({**spec.model_dump(), "refer_band": {"lo": 0.7, "hi": 0.2}})
