"""End to end on a learnable toy set: files, learning, resume, refusal, predictor, CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from bench.commands.cli import main
from core.errors import BenchError
from core.io import read_json
from core.progress import stage
from bench.run.runner import run_from_args
from ensembles import load_predictor
from tests.conftest import toy_arrays, write_tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, toy_folder):
    base = tmp_path_factory.mktemp("run")
    cfg = write_tiny_config(base / "bench.toml", toy_folder)
    out = base / "out"
    board, _ = run_from_args(str(cfg), out=str(out), show_progress=False)
    return cfg, out, board


def _finished(out):
    return {
        p.parent.relative_to(out).as_posix(): read_json(p)["finished"]
        for p in sorted(out.glob("units/*/fold*/result.json"))
    }


def test_run_writes_every_artifact(tiny_run):
    _, out, board = tiny_run
    for f in (
        "config.toml",
        "manifest.json",
        "folds.csv",
        "leaderboard.csv",
        "leaderboard.md",
        "predictor/manifest.json",
        "oof/rf_hog.npy",
        "oof/cnn_tiny.npy",
        "oof/soft_vote.npy",
    ):
        assert (out / f).is_file(), f
    folds = pd.read_csv(out / "folds.csv")
    assert list(folds.columns) == ["index", "source", "label", "group", "fold"]
    assert len(folds) == 60 and sorted(folds["fold"].unique()) == [0, 1, 2]
    oof = np.load(out / "oof" / "cnn_tiny.npy")
    assert oof.shape == (60, 3) and np.allclose(oof.sum(axis=1), 1, atol=1e-4)
    m = read_json(out / "manifest.json")
    assert m["dataset"]["counts"] == {"disc": 20, "square": 20, "stripes": 20}
    assert m["folds"]["hash"] and m["versions"]["numpy"] and m["seeds"]["run"] == 0
    assert set(m["stage_seconds"]) == {
        "data_and_folds",
        "prepare",
        "units",
        "ensembles_and_leaderboard",
        "predictor",
    }
    assert all(v >= 0 for v in m["stage_seconds"].values())


def test_stage_records_its_wall_time_when_it_finishes():
    times = {}
    with stage(times, "a"):
        time.sleep(0.02)
    assert 0.02 <= times["a"] < 10
    with pytest.raises(ValueError), stage(times, "b"):
        raise ValueError("a failed stage records nothing")
    assert set(times) == {"a"}


def test_every_candidate_learns_above_chance(tiny_run):
    _, out, board = tiny_run
    lb = pd.read_csv(out / "leaderboard.csv")
    assert set(lb["candidate"]) == {"rf_hog", "cnn_tiny", "soft_vote"}
    assert dict(zip(lb["candidate"], lb["kind"])) == {
        "rf_hog": "baseline",
        "cnn_tiny": "cnn",
        "soft_vote": "ensemble",
    }
    for col in (
        "candidate",
        "kind",
        "accuracy",
        "accuracy_std",
        "balanced_accuracy",
        "macro_f1",
        "roc_auc",
        "log_loss",
        "fit_seconds",
    ):
        assert col in lb.columns
    acc = dict(zip(lb["candidate"], lb["accuracy"]))
    assert acc["rf_hog"] > 0.8 and acc["cnn_tiny"] > 0.6, acc  # chance is 1/3
    assert list(lb["accuracy"]) == sorted(lb["accuracy"], reverse=True)


def test_resume_skips_finished_units(tiny_run, monkeypatch):
    cfg, out, _ = tiny_run
    before = _finished(out)
    import bench.run.runner as runner

    monkeypatch.setattr(runner, "run_unit", lambda *a: pytest.fail(f"recomputed {a}"))
    run_from_args(str(cfg), out=str(out), show_progress=False)
    assert _finished(out) == before


def test_lost_unit_is_recomputed_alone(tiny_run):
    cfg, out, _ = tiny_run
    before = _finished(out)
    shutil.rmtree(out / "units" / "rf_hog" / "fold1")
    run_from_args(str(cfg), out=str(out), show_progress=False)
    after = _finished(out)
    assert set(after) == set(before)
    assert [k for k in after if after[k] != before[k]] == ["units/rf_hog/fold1"]


def test_changed_config_is_refused_then_forced(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    changed = tmp_path / "changed.toml"
    changed.write_text(cfg.read_text().replace("n_estimators = 60", "n_estimators = 61"))
    with pytest.raises(BenchError, match="different candidate 'rf_hog'"):
        run_from_args(str(changed), out=str(work), only=["rf_hog"], show_progress=False)
    reseeded = tmp_path / "reseeded.toml"
    reseeded.write_text(cfg.read_text().replace("seed = 0", "seed = 5"))
    with pytest.raises(BenchError, match="different .*shared"):
        run_from_args(str(reseeded), out=str(work), only=["rf_hog"], show_progress=False)
    run_from_args(str(changed), out=str(work), only=["rf_hog"], force=True, show_progress=False)
    archived = list(tmp_path.glob("copy.old-*"))
    assert len(archived) == 1 and (archived[0] / "units" / "cnn_tiny").is_dir()
    assert list(pd.read_csv(work / "leaderboard.csv")["candidate"]) == ["rf_hog"]


def test_predictor_round_trip(tiny_run, tmp_path):
    _, out, _ = tiny_run
    pred = load_predictor(out / "predictor")
    assert list(pred.classes_) == ["disc", "square", "stripes"]
    images, labels = toy_arrays(6, 32, seed=99)  # images never seen in training
    p1 = pred.predict_proba(images)
    assert p1.shape == (18, 3) and np.allclose(p1.sum(axis=1), 1, atol=1e-5)
    assert (pred.predict(images) == np.array(pred.classes_)[labels]).mean() > 0.6
    copy = tmp_path / "pred"
    shutil.copytree(out / "predictor", copy)
    assert np.array_equal(load_predictor(copy).predict_proba(images), p1)
    big = np.stack([np.kron(im, np.ones((3, 3, 1), np.uint8)) for im in images])  # 96 px input
    assert (load_predictor(copy).predict(big) == pred.predict(images)).mean() > 0.8


def test_tampered_predictor_is_refused(tiny_run, tmp_path):
    _, out, _ = tiny_run
    copy = tmp_path / "pred"
    shutil.copytree(out / "predictor", copy)
    model = next(copy.rglob("model.keras"))
    model.write_bytes(model.read_bytes() + b"x")
    with pytest.raises(BenchError, match="altered"):
        load_predictor(copy)
    model.unlink()
    with pytest.raises(BenchError, match="missing"):
        load_predictor(copy)


def test_cli_predict_writes_csv(tiny_run, tmp_path, capsys):
    _, out, _ = tiny_run
    from tests.conftest import write_toy_folder

    imgs = write_toy_folder(tmp_path / "new", n_per_class=4, seed=7, fmt="jpg")
    (imgs / "disc" / "broken.jpg").write_bytes(b"nope")
    csv_path = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "predictor"),
                "--img-path",
                str(imgs),
                "--out",
                str(csv_path),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == [
        "path",
        "prediction",
        "confidence",
        "disc",
        "square",
        "stripes",
        "shift_score",
        "prediction_set",
        "set_size",
        "review",
        "review_reason",
        "in_set",
        "error",
    ]
    broken = [r for r in rows if r["error"]]  # the unreadable file keeps a row: why
    assert [os.path.basename(r["path"]) for r in broken] == ["broken.jpg"]
    rows = [r for r in rows if not r["error"]]
    assert all(0 <= float(r["shift_score"]) <= 1 for r in rows)
    assert len(rows) == 12
    for r in rows:  # the reasons are the review flag's, the set holds the prediction or not
        reasons = set(filter(None, r["review_reason"].split(";")))
        assert reasons <= {"set_not_one", "low_confidence", "shifted"}
        assert bool(reasons) == (r["review"] == "1")
        assert ("set_not_one" in reasons) == (r["set_size"] != "1")
        assert r["in_set"] == str(int(r["prediction"] in r["prediction_set"].split("|")))
    correct = sum(r["prediction"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert correct >= 8
    assert all(
        abs(float(r["confidence"]) - max(float(r[c]) for c in ("disc", "square", "stripes"))) < 1e-6
        for r in rows
    )
    assert "skipped" in capsys.readouterr().err


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    cfg, out, _ = tiny_run
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    cases = [
        ["run", "--config", str(bad)],
        ["run", "--config", str(cfg), "--only", "nosuch"],
        [
            "run",
            "--config",
            str(cfg),
            "--data",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o"),
        ],
        ["predict", "--model", str(tmp_path), "--img_path", str(tmp_path)],
        ["predict", "--model", str(out / "predictor"), "--img_path", str(tmp_path / "none.png")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)


def test_list_and_inspect(tiny_run, capsys):
    cfg, out, _ = tiny_run
    assert main(["list", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "rf_hog" in text and "tiny" in text and "scratch_cnn" in text
    assert main(["inspect", str(out / "predictor")]) == 0
    text = capsys.readouterr().out
    assert "verified" in text and "cnn_tiny" in text
    manifest = json.loads((out / "predictor" / "manifest.json").read_text())
    assert manifest["classes"] == ["disc", "square", "stripes"] and manifest["image_size"] == 32


def test_progress_in_a_log_is_occasional_text_lines(monkeypatch, capsys):
    """With stderr not a terminal (a batch job's log), progress is a text line at most every
    PLAIN_INTERVAL seconds and a last one when the work took that long; short work prints
    nothing."""
    from core import progress

    assert not progress.console.is_terminal  # pytest captures stderr
    assert list(progress.progress_iter(range(3), total=3, desc="things")) == [0, 1, 2]
    with progress.unit_progress(2, "units") as advance:
        advance("a fold 0")
        advance("a fold 1")
    assert capsys.readouterr().err == ""  # quicker than the interval: silent
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    assert list(progress.progress_iter(range(3), total=3, desc="things")) == [0, 1, 2]
    with progress.unit_progress(2, "units") as advance:
        advance("a fold 0")
        advance("a fold 1")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "things: 1/3",
        "things: 2/3",
        "things: 3/3",
        "things: 3/3",
        "units: 1/2",
        "units: 2/2",
        "units: 2/2",
    ]
    assert lines[4].endswith(") a fold 0") and lines[-1].endswith(") done")
    assert all(re.search(r"\(\d+:\d\d\)", line) for line in lines)
