"""The saved predictor, end to end: one tiny run (RF on HOG + a tiny CNN, voting, greedy
and stacking ensembles) shared by every test of this module."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.commands.cli import main
from bench.commands.outputs import MARKER
from core.errors import BenchError
from core.images import Preprocessing
from core.io import read_json
from ensembles.overlay import FIG_SIZE_PX
from tests.conftest import toy_arrays, write_tiny_config

EXTRA = """
[ensembles.stack]
type = "stacking"
members = "all"

[ensembles.greedy]
type = "soft_voting"
members = "all"
weights = "greedy"
rounds = 10

[predictor]
ensemble = "stack"

[profiles.tiny.candidates.cnn_tiny.params]
epochs = 8
patience = 4

[profiles.tiny.candidates.rf_hog.params]
n_estimators = 30
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_folder):
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("ens_run")
    cfg = write_tiny_config(root / "cfg.toml", toy_folder, EXTRA)
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        board, out = run_from_args(str(cfg), out=str(root / "run"), show_progress=False)
    return board, out


@pytest.fixture(scope="module")
def predictor(run):
    from ensembles import load_predictor

    return load_predictor(run[1] / "predictor")


@pytest.fixture(scope="module")
def fresh():
    """Toy images the run never saw."""
    return toy_arrays(6, 32, seed=11)


def test_ensembles_on_the_leaderboard_and_the_choice_recorded(run):
    board, out = run
    rows = board.set_index("candidate")
    for name in ("soft_vote", "stack", "greedy"):
        assert rows.loc[name, "kind"] == "ensemble"
        for m in ("accuracy", "macro_f1", "log_loss", "roc_auc"):
            assert np.isfinite(rows.loc[name, m])
    assert rows.loc["stack", "members"] == "rf_hog;cnn_tiny"
    weights = dict(kv.split(":") for kv in rows.loc["greedy", "member_weights"].split(";"))
    assert set(weights) == {"rf_hog", "cnn_tiny"}
    assert abs(sum(float(w) for w in weights.values()) - 1) < 0.01
    assert read_json(out / "state.json")["predictor"] == "stack"
    man = read_json(out / "predictor" / "manifest.json")
    assert man["ensemble"]["name"] == "stack" and man["ensemble"]["type"] == "stacking"
    assert [m["name"] for m in man["members"]] == ["rf_hog", "cnn_tiny"]
    assert man["leaderboard"]["accuracy"] == pytest.approx(rows.loc["stack", "accuracy"])
    assert len(man["members"][1]["models"]) == 3  # the 3 fold models


def test_the_model_card_states_what_the_run_recorded(run, toy_folder):
    _, out = run
    man = read_json(out / "predictor" / "manifest.json")
    card = (out / "predictor" / "MODEL_CARD.md").read_text()
    assert f"created {man['created']} by bloodbench" in card and "n/a" not in man["created"]
    # no groups were given: the card says so, as the report does
    grouping = man["training_data"]["grouping"]
    assert grouping == read_json(out / "manifest.json")["grouping"]
    assert grouping["user_groups"] == 0 and not grouping["group_rule"]
    assert "No patient or slide groups were given" in card
    assert "keep groups (patients" not in card
    # the data by its name, never this machine's path
    assert f"{man['training_data']['n_images']} images from `{toy_folder.name}`" in card
    assert str(toy_folder.parent) not in card
    cp = man["conformal"]
    assert f"calibrated on {cp['n_calibration']} rows (the saved combiner" in card
    assert "fitted on the out-of-fold rows" in card
    assert f"Ensemble `{man['ensemble']['name']}` of rf_hog" in card
    # the batch-level warning's reference: batches of the 60 out-of-fold rows
    ref = man["batch_reference"]
    assert set(ref["by_size"]) == {"20", "50"} and len(ref["prevalence"]) == 3
    assert 0 < ref["by_size"]["50"]["confidence_mean"] <= 1


def test_round_trip_gives_identical_probabilities(run, predictor, fresh):
    """The predictor loaded from disk gives the numbers of the run's own fold models
    (``units/``) combined by a meta-learner refitted on the out-of-fold probabilities."""
    from core.candidate import load_candidate
    from bench.run.rundir import RunDir
    from ensembles.stacking import Stacking

    _, out = run
    X, y = fresh
    proba = predictor.predict_proba(X)
    np.testing.assert_array_equal(predictor.predict_proba(X), proba)  # deterministic
    members = ["rf_hog", "cnn_tiny"]
    by_hand = [
        np.mean(
            [
                load_candidate(RunDir(out).unit_dir(m, k) / "model").predict_proba(X)
                for k in range(3)
            ],
            axis=0,
        )
        for m in members
    ]
    table = pd.read_csv(out / "folds.csv")
    labels = np.array([predictor.classes_.tolist().index(c) for c in table["label"]])
    meta = Stacking().fit(
        [np.load(out / "oof" / f"{m}.npy").astype(np.float64) for m in members],
        labels,
        groups=table["fold"].to_numpy(),
    )
    assert predictor.ensemble_.C_ == meta.C_
    np.testing.assert_allclose(proba, meta.combine(by_hand), rtol=0, atol=1e-6)
    assert (predictor.predict(X) == predictor.classes_[y]).mean() > 0.8


def test_paths_and_arrays_of_any_size(predictor, tmp_path):
    big, _ = toy_arrays(2, 48, seed=5)
    paths = []
    for i, im in enumerate(big):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    from_paths = predictor.predict_proba(paths)
    np.testing.assert_array_equal(from_paths, predictor.predict_proba(big))
    np.testing.assert_array_equal(from_paths, predictor.predict_proba(list(big)))
    # other batch sizes: the same numbers up to float32 rounding (the CNN's kernels may
    # sum in another order for another batch size: seen at 8e-7 relative)
    one = predictor.predict_proba(str(paths[0]))
    np.testing.assert_allclose(from_paths[:1], one, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        from_paths, predictor.predict_proba(big, batch_size=1), rtol=1e-5, atol=1e-9
    )
    with pytest.raises(BenchError, match="uint8"):
        predictor.predict_proba(big.astype(np.float32))


def test_tampered_predictor_is_refused(run, tmp_path, capsys):
    from ensembles import load_predictor

    src = run[1] / "predictor"

    def copy(name):
        return shutil.copytree(src, tmp_path / name)

    d = copy("altered")
    model = next(d.rglob("model.keras"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BenchError, match="altered"):
        load_predictor(d)
    assert main(["predict", "--model", str(d), "--img_path", str(src)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: predictor file altered")

    d = copy("missing")
    next(d.rglob("candidate.json")).unlink()
    with pytest.raises(BenchError, match="missing"):
        load_predictor(d)

    d = copy("extra")
    (d / "members" / "evil.py").write_text("import os")
    with pytest.raises(BenchError, match="unexpected file"):
        load_predictor(d)

    d = copy("manifest")
    man = json.loads((d / "manifest.json").read_text())
    man["classes"] = man["classes"][::-1]
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BenchError, match="manifest altered"):
        load_predictor(d)


def test_explain_is_the_ensemble_gradcam(predictor, fresh):
    X, _ = fresh
    assert predictor.explain_weights() == {"cnn_tiny": 1.0}  # stacking: equal weights
    maps = predictor.explain(X)
    assert maps.shape == (len(X), 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.reshape(len(X), -1).max(1) > 0).all()
    # the predicted class is the default; the mean of the fold models' maps
    top = predictor.predict_proba(X).argmax(1)
    folds = predictor.members_["cnn_tiny"]
    by_hand = np.mean([m.explain(X, class_index=top) for m in folds], axis=0)
    np.testing.assert_allclose(maps, by_hand, atol=1e-6)
    assert predictor.explain(X[:2], class_index="disc").shape == (2, 32, 32)
    with pytest.raises(BenchError, match="unknown class"):
        predictor.explain(X[:1], class_index="cat")


def test_predict_cli_writes_gradcam_pngs(run, tmp_path):
    images, _ = toy_arrays(1, 40, seed=3)
    root = tmp_path / "imgs"
    for sub, im in zip(["a", "b", "b/c"], images):  # same file name in three folders
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / sub / "cell.png")
    (root / "notes.txt").write_text("not an image")
    out, csv_file = tmp_path / "cams", tmp_path / "p.csv"
    rc = main(
        [
            "predict",
            "--model",
            str(run[1] / "predictor"),
            "--img_path",
            str(root),
            "--gradcam",
            str(out),
            "--out",
            str(csv_file),
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    expected = {"a__cell.png.png", "b__cell.png.png", "b__c__cell.png.png"}
    assert {p.name for p in out.iterdir()} == expected | {MARKER}  # the folder's own record
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            assert im.size == FIG_SIZE_PX
    rows = list(csv.DictReader(csv_file.open()))
    assert {r["gradcam"] for r in rows} == expected
    assert all(r["prediction"] in ("disc", "square", "stripes") for r in rows)


def test_predictor_without_cnn_member(run, tmp_path, capsys):
    from bench.run.rundir import RunDir
    from core.images import Preprocessing
    from ensembles import load_predictor, save_predictor
    from ensembles.voting import SoftVoting

    _, out = run
    d = save_predictor(
        tmp_path / "rf",
        ensemble_name="rf_only",
        ensemble=SoftVoting().fit([np.eye(3)], np.arange(3)),
        members={"rf_hog": [RunDir(out).unit_dir("rf_hog", k) / "model" for k in range(3)]},
        member_info={"rf_hog": {"type": "feature_forest", "kind": "baseline"}},
        classes=["disc", "square", "stripes"],
        preprocessing=Preprocessing(32),
        training_data={},
    )
    with pytest.raises(BenchError, match="Grad-CAM needs a CNN member"):
        load_predictor(d).explain(toy_arrays(1, 32)[0])
    rc = main(
        ["predict", "--model", str(d), "--img_path", str(d), "--gradcam", str(tmp_path / "cams")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "Grad-CAM needs a CNN member" in err and "rf_hog (baseline)" in err
    assert main(["inspect", str(d)]) == 0
    assert "unavailable (no CNN member)" in capsys.readouterr().out


def test_inspect_describes_without_loading(run, capsys):
    assert main(["inspect", str(run[1] / "predictor")]) == 0
    text = capsys.readouterr().out
    assert "verified" in text and "stack (stacking)" in text
    assert "member cnn_tiny: type=scratch_cnn kind=cnn fold models=3" in text
    assert "Grad-CAM: from cnn_tiny" in text and "per class" in text


def test_frozen_backbone_runs_once_for_its_fold_models(tmp_path):
    """Fold models of a frozen-transfer member share their backbone: the predictor's graph
    runs it once per batch (one trunk per distinct weights), with the numbers of running
    every fold model on its own."""
    import keras

    from core.candidate import load_candidate
    from cnn.backbones import build_backbone
    from cnn.train import predict_keras
    from cnn.transfer import FrozenTransferCNN
    from ensembles import load_predictor, save_predictor
    from ensembles.voting import SoftVoting

    X, y = toy_arrays(10, 32, seed=21)
    weights = []
    for seed in (0, 1):  # two distinct "pretrained" backbones
        keras.utils.set_random_seed(seed)
        weights.append(tmp_path / f"w{seed}.weights.h5")
        build_backbone("MobileNetV2", 32, None, alpha=0.35).save_weights(weights[-1])
    folders = {"tf_a": [], "tf_b": []}
    for name, w, seeds in (("tf_a", weights[0], (0, 1)), ("tf_b", weights[1], (2,))):
        for seed in seeds:
            cand = FrozenTransferCNN(
                weights=str(w),
                alpha=0.35,
                input_size=32,
                dense_units=8,
                epochs=2,
                batch_size=8,
                use_cache=False,
                seed=seed,
            )
            cand.fit(X, y)
            cand.save(tmp_path / f"{name}{seed}")
            folders[name].append(tmp_path / f"{name}{seed}")
    d = save_predictor(
        tmp_path / "pred",
        ensemble_name="vote",
        ensemble=SoftVoting().fit([np.eye(3)] * 2, np.arange(3)),
        members=folders,
        member_info={n: {"type": "transfer_frozen", "kind": "cnn"} for n in folders},
        classes=["disc", "square", "stripes"],
        preprocessing=Preprocessing(32),
        training_data={},
    )
    pred = load_predictor(d)
    keys = [key for key, _, _ in pred._fused_plan()]
    assert pred._fused_names == ["tf_a", "tf_b"]
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]
    by_hand = [
        np.mean([predict_keras(load_candidate(f).model_, X) for f in folders[n]], axis=0)
        for n in ("tf_a", "tf_b")
    ]
    np.testing.assert_allclose(pred.predict_proba(X), np.mean(by_hand, axis=0), atol=1e-5)


def test_fused_graph_runs_in_chunks_with_the_same_numbers(predictor, fresh, monkeypatch):
    """Batches larger than ``FUSED_BATCH`` go through the fused Keras graph in chunks (a
    memory bound) and give the numbers of one call."""
    from ensembles import predictor as module

    X, _ = fresh
    whole = predictor.predict_proba(X)
    calls = []
    fn = predictor._fused_fn()
    monkeypatch.setattr(module, "FUSED_BATCH", 4)
    monkeypatch.setattr(predictor, "_fused", lambda x: calls.append(len(x)) or fn(x))
    np.testing.assert_allclose(predictor.predict_proba(X), whole, rtol=0, atol=1e-6)
    assert calls == [4] * (len(X) // 4) + ([len(X) % 4] if len(X) % 4 else [])


def test_a_smoothing_predictor_gives_arrays_and_files_the_same_probabilities(toy_folder, tmp_path):
    """``[data] smooth`` is a step of the predictor's preprocessing: an array at the
    model's size goes through it as files do (whether input is preprocessed is said by an
    argument, never guessed from an array's shape)."""
    from bench.run.runner import run_from_args
    from ensembles.predictor import load_predictor
    from tests.conftest import TINY_CONFIG

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        TINY_CONFIG.format(data=toy_folder).replace(
            "image_size = 32", "image_size = 32\nsmooth = 1.0"
        )
    )
    _, out = run_from_args(
        str(cfg), out=str(tmp_path / "run"), only=["rf_hog"], show_progress=False
    )
    pred = load_predictor(out / "predictor")
    assert pred.record.prep.smooth == 1.0
    files = sorted(toy_folder.rglob("*.png"))[::4]
    arrays = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert arrays.shape[1:] == (32, 32, 3)  # already at the model's size
    from_files = pred.predict_proba([str(f) for f in files])
    assert np.array_equal(pred.predict_proba(arrays), from_files)
    # told they are preprocessed, the same arrays skip the low-pass: other probabilities
    assert not np.allclose(pred.predict_proba(arrays, preprocessed=True), from_files)


def test_a_run_directory_stands_for_its_predictor(run, tmp_path, capsys):
    """``--model RUN`` (a natural mistake) uses the run's saved predictor and says so; a run
    without one is refused in one line naming what is missing."""
    from bench.run.rundir import RunDir

    _, out = run
    assert main(["inspect", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"is a run: using its saved predictor {out / 'predictor'}" in captured.err
    assert "verified" in captured.out
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(RunDir(out).file(RunDir.STATE), bare / RunDir.STATE)
    assert main(["predict", "--model", str(bare), "--img_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a run directory without a saved predictor" in err[0]


def test_predict_on_a_folder_writes_the_differential_and_a_gallery(run, tmp_path, capsys):
    """The differential (count, share and flagged per predicted class) printed and written
    beside --out, with a self-contained gallery of the images per class; a user's file
    where a side file would go is refused before any work, never overwritten."""
    from bench.commands.differential import PER_CLASS
    from tests.conftest import write_toy_folder

    _, out = run
    imgs = write_toy_folder(tmp_path / "imgs", n_per_class=5, seed=3)
    (imgs / "disc" / "broken.png").write_bytes(b"nope")
    csv_path = tmp_path / "p.csv"
    argv = ["predict", "--model", str(out / "predictor"), "--img_path", str(imgs)]
    assert main([*argv, "--out", str(csv_path)]) == 0
    err = capsys.readouterr().err
    assert "differential (predicted class: images, share" in err
    rows = [r for r in csv.DictReader(open(csv_path)) if not r["error"]]
    summary = pd.read_csv(tmp_path / "p_summary.csv").set_index("class")
    classes = ["disc", "square", "stripes"]
    assert list(summary.index) == [*classes, "all", "unreadable"]
    for c in classes:
        assert summary.loc[c, "count"] == sum(r["prediction"] == c for r in rows)
    assert summary.loc["all", "count"] == len(rows) == 15
    assert summary.loc[classes, "percent"].sum() == pytest.approx(100, abs=0.05)
    assert summary.loc["unreadable", "count"] == 1
    if "review" in rows[0]:
        assert summary.loc["all", "flagged"] == sum(r["review"] == "1" for r in rows)
    page = (tmp_path / "p_gallery.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == min(len(rows), PER_CLASS * 3)
    assert page.count('class="flagged"') == sum(bool(r.get("review_reason")) for r in rows)
    assert "<script" not in page and "http" not in page.split("</head>")[1]
    # predict wrote them: a second predict replaces them; a user's gallery is refused
    assert main([*argv, "--out", str(csv_path)]) == 0
    mine = tmp_path / "q_gallery.html"
    mine.write_text("my page")
    assert main([*argv, "--out", str(tmp_path / "q.csv")]) == 2
    assert "was not written by bench predict" in capsys.readouterr().err
    assert mine.read_text() == "my page" and not (tmp_path / "q.csv").exists()
    # --no-summary: no side files
    assert main([*argv, "--out", str(tmp_path / "r.csv"), "--no-summary"]) == 0
    assert not (tmp_path / "r_summary.csv").exists() and not (tmp_path / "r_gallery.html").exists()


def test_the_predictor_is_a_scikit_learn_classifier(predictor, fresh):
    """scikit-learn reads it as a fitted classifier; ``score`` is the accuracy of
    ``predict`` against class names."""
    from sklearn.base import is_classifier
    from sklearn.utils import get_tags

    from tests.conftest import TOY_CLASSES

    assert is_classifier(predictor)
    assert get_tags(predictor).estimator_type == "classifier"
    X, y = fresh
    names = np.array(TOY_CLASSES)[y]
    acc = predictor.score(X, names)
    assert acc == pytest.approx(np.mean(predictor.predict(X) == names))
    assert acc > 0.6  # it learnt (chance 1/3)
    weights = (y == 0).astype(float)  # only the first class counts
    assert predictor.score(X, names, sample_weight=weights) == pytest.approx(
        np.mean(predictor.predict(X)[y == 0] == names[y == 0])
    )
    with pytest.raises(BenchError, match="not classes of this predictor"):
        predictor.score(X, ["nope"] * len(X))
