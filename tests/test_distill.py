"""``bench distill`` (issue 31): a student learns the run's out-of-fold probabilities on the
run's folds and is saved as an ordinary, verified predictor."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench.commands.cli import main
from bench.protocols.distill import NAME, soft_targets
from bench.run.rundir import RunDir
from core.candidate import Candidate
from core.registry import register
from ensembles.predictor import load_predictor, verify_predictor
from tests.conftest import COLOUR_FOREST, toy_arrays, write_tiny_config

FEATURES_ONLY = """
[report]
enabled = false

[ensembles.vote_all]
type = "soft_voting"
members = "all"

[predictor]
ensemble = "vote_all"
""" + COLOUR_FOREST.format()


@register("_test_soft_spy")
class SoftSpy(Candidate):
    """Records every fit's images and soft targets; predicts the mean target it learnt."""

    fits: list = []
    fit_accepts = frozenset({"classes", "soft_targets"})

    def __init__(self, seed=0):
        self.seed = seed

    def fit(self, X, y, X_val=None, y_val=None, classes=None, soft_targets=None):
        self._set_classes(y, classes)
        SoftSpy.fits.append((np.asarray(X).copy(), np.asarray(soft_targets).copy()))
        self.mean_ = np.asarray(soft_targets, dtype=float).mean(axis=0)
        return self

    def predict_proba(self, X):
        return np.tile(self.mean_, (len(X), 1))

    def _save_model(self, path):
        np.save(path / "mean.npy", self.mean_)

    def _load_model(self, path):
        self.mean_ = np.load(path / "mean.npy")


def _run(tmp_path, toy_folder, distill_table: str, name: str) -> RunDir:
    cfg = write_tiny_config(tmp_path / f"{name}.toml", toy_folder, FEATURES_ONLY + distill_table)
    out = tmp_path / name
    assert main(["run", "--config", str(cfg), "--only", "rf_hog,rf_colour", "--out", str(out)]) == 0
    return RunDir(out)


def test_soft_targets_mix_the_tempered_teacher_with_the_label():
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    t = soft_targets(teacher, np.array([0, 1]), hard_weight=0.0, temperature=1.0)
    assert np.allclose(t, teacher)
    t = soft_targets(teacher, np.array([0, 1]), hard_weight=0.5, temperature=1.0)
    assert np.allclose(t[1], [0.05, 0.55, 0.4]) and np.allclose(t.sum(1), 1)
    warm = soft_targets(teacher, np.array([0, 1]), hard_weight=0.0, temperature=4.0)
    assert warm[0, 0] < 0.7 and warm[0, 2] > 0.1 and np.allclose(warm.sum(1), 1)


def test_each_fold_student_learns_only_other_folds_out_of_fold_soft_labels(
    tmp_path, toy_folder, capsys
):
    """The spy: fold k's student sees exactly the rows outside fold k, each with the
    teacher's stored out-of-fold row (mixed with its label); the saved student every row."""
    run = _run(
        tmp_path,
        toy_folder,
        """
[distill]
speed_images = 0
hard_weight = 0.25
student = { type = "_test_soft_spy" }
""",
        "spy",
    )
    SoftSpy.fits.clear()
    assert main(["distill", "--run", str(run.path), "--workers", "1"]) == 0
    images = np.asarray(run.images)
    index = {im.tobytes(): i for i, im in enumerate(images)}
    assert len(index) == len(images)  # every toy image unique
    expected = soft_targets(run.read_oof("vote_all"), run.labels, 0.25, 1.0)
    folds = run.folds
    assert len(SoftSpy.fits) == len(folds.fold_ids) + 1
    for k, (X, T) in zip(folds.fold_ids, SoftSpy.fits):
        rows = np.array([index[x.tobytes()] for x in X])
        assert set(rows) == set(folds.train(k)) and not set(rows) & set(folds.test(k))
        assert np.allclose(T, expected[rows], atol=1e-6)
    X, T = SoftSpy.fits[-1]
    assert len(X) == len(images) and np.allclose(T, expected, atol=1e-6)
    # the stored out-of-fold rows are each fold's teacher models on their own fold
    for k, _, test in folds:
        members = [run.unit_proba(m, k) for m in ("rf_hog", "rf_colour")]
        assert np.allclose(run.read_oof("vote_all")[test], np.mean(members, axis=0), atol=1e-6)
    assert "distilled 'vote_all'" in capsys.readouterr().out


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, toy_folder):
    tmp = tmp_path_factory.mktemp("distill")
    run = _run(
        tmp,
        toy_folder,
        """
[distill]
speed_images = 64
student = { type = "scratch_cnn", params = { blocks = 2, filters = 8, dense_units = 16, epochs = 12, patience = 12, batch_size = 16, learning_rate = 0.005 } }
""",
        "cnn",
    )
    assert main(["distill", "--run", str(run.path)]) == 0
    return run


def test_bench_distill_saves_a_predictor_that_loads_verifies_and_predicts(distilled):
    run = distilled
    out = run.path / NAME
    manifest = verify_predictor(out)
    assert manifest.distilled["teacher"] == "vote_all"
    assert [m.name for m in manifest.members] == [NAME]
    assert len(manifest.members[0].models) == 1  # one model, not a bag of folds
    pred = load_predictor(out)
    X, y = toy_arrays(10, 32, seed=5)
    proba = pred.predict_proba(X)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == y).mean() > 0.6  # it learnt (chance: 1/3)
    assert pred.explain(X[:4]).shape == (4, 32, 32)  # Grad-CAM
    assert pred.shift_scores(X[:4]).shape == (4,)
    assert manifest.conformal.confidence > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert (
        "Distilled: one `scratch_cnn` trained on the out-of-fold probabilities of `vote_all`"
        in card
        and "teacher" in card
        and "1 model(s)" in card
    )
    assert set(manifest.distilled["cross_validated"]) >= {"accuracy", "macro_f1"}
    board = pd.read_csv(run.path / "leaderboard.csv").set_index("candidate")
    row = board.loc[NAME]
    assert row["kind"] == "distilled" and row["accuracy"] > 0.6
    assert row["images_per_s"] > 0 and row["teacher_images_per_s"] > 0
    assert row["model_size"] == pred.members_[NAME][0].model_size()
    assert "vote_all" in board.index and "rf_hog" in board.index  # the other rows kept
    oof = run.read_oof(NAME)
    for k, _, test in run.folds:
        assert np.allclose(oof[test], run.unit_proba(NAME, k), atol=1e-6)
    result = json.loads((run.distill_dir / "result.json").read_text())
    assert result["speed_images"] == 60 and result["teacher"] == "vote_all"


def test_distill_resumes_and_refuses_a_foreign_out(distilled, tmp_path, capsys):
    run = distilled
    stamps = [
        (run.unit_dir(NAME, k) / "result.json").stat().st_mtime_ns for k in run.folds.fold_ids
    ]
    assert main(["distill", "--run", str(run.path), "--out", str(tmp_path / "p")]) == 0
    assert stamps == [
        (run.unit_dir(NAME, k) / "result.json").stat().st_mtime_ns for k in run.folds.fold_ids
    ]  # nothing refitted
    assert (pd.read_csv(run.path / "leaderboard.csv")["candidate"] == NAME).sum() == 1
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["distill", "--run", str(run.path), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a predictor written by bench distill" in err[0]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert main(["distill", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a bloodbench run directory" in capsys.readouterr().err


def test_a_student_that_cannot_learn_soft_targets_is_one_error_at_load(tmp_path, toy_folder):
    from bench.config import load_config
    from core.errors import BenchError

    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        '\n[distill]\nstudent = { type = "feature_forest", params = { features = "hog" } }\n',
    )
    with pytest.raises(
        BenchError,
        match=r"\[distill\] student type 'feature_forest' cannot "
        r"learn soft targets.*scratch_cnn",
    ):
        load_config(str(cfg), profile="tiny")


def test_the_report_shows_the_distilled_row_and_audits_its_grad_cam(distilled):
    run = distilled
    assert main(["report", str(run.path)]) == 0
    html = (run.report_dir / "index.html").read_text()
    assert NAME in html and "vote_all" in html
    md = (run.path / "leaderboard.md").read_text()
    assert f"| {NAME} " in md or f"{NAME}" in md


def test_a_resumed_run_keeps_the_distilled_row(distilled):
    run = distilled
    before = pd.read_csv(run.path / "leaderboard.csv").set_index("candidate").loc[NAME]
    cfg = run.path.parent / "cnn.toml"
    assert (
        main(["run", "--config", str(cfg), "--only", "rf_hog,rf_colour", "--out", str(run.path)])
        == 0
    )
    board = pd.read_csv(run.path / "leaderboard.csv").set_index("candidate")
    assert board.loc[NAME, "accuracy"] == pytest.approx(before["accuracy"])
    assert not (run.path / "previous").exists()  # nothing changed: nothing moved aside


def test_the_distilled_student_exports_to_onnx(distilled, tmp_path, capsys):
    pytest.importorskip("tf2onnx", reason="bench export needs tf2onnx (bloodbench[export])")
    ort = pytest.importorskip("onnxruntime", reason="bench export needs onnxruntime")
    student = distilled.path / "distilled"
    out = tmp_path / "student.onnx"
    assert main(["export", "--model", str(student), "--out", str(out), "--n", "32"]) == 0
    assert "largest probability difference" in capsys.readouterr().out
    images, _ = toy_arrays(5, 32, seed=31)
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: images})[0]
    want = load_predictor(student).predict_proba(images, preprocessed=True)
    assert got.shape == (15, 3) and np.max(np.abs(got - want)) <= 1e-4
