"""``python -m bench evaluate``: a saved predictor scored on a labelled external set.

One tiny real predictor (RF on HOG, trained in seconds on the toy folder) is shared by
the module; the external sets are fresh toy images at another size, with other class
names, subsets of the classes, CSV labels and groups.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from bench.commands.cli import main
from bench.commands.evaluate import evaluate
from bench.stats.scoring import WeightedScorer, bootstrap_weights, score
from core.calibration import ece
from core.errors import BenchError
from tests.conftest import toy_arrays, write_tiny_config

CLASSES = ["disc", "square", "stripes"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, toy_folder):
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("eval_run")
    cfg = write_tiny_config(root / "cfg.toml", toy_folder)
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        _, out = run_from_args(
            str(cfg), out=str(root / "run"), only=["rf_hog"], show_progress=False
        )
    return out


@pytest.fixture(scope="module")
def model(run_dir):
    return run_dir / "predictor"


def write_set(root, names: dict, n: int = 8, size: int = 48, seed: int = 21):
    """Toy images of 48 px (the predictor takes 32): ``names`` maps a toy class index to
    the folder name used for it."""
    images, labels = toy_arrays(n, size, seed=seed)
    for i, (im, c) in enumerate(zip(images, labels)):
        if int(c) not in names:
            continue
        d = root / names[int(c)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """Other case for two classes, plus a class the predictor lacks."""
    root = write_set(
        tmp_path_factory.mktemp("ext") / "lab2", {0: "Disc", 1: "SQUARE", 2: "stripes"}
    )
    blob = root / "blob"
    blob.mkdir()
    for i, im in enumerate(toy_arrays(3, 40, seed=3)[0][:5]):
        Image.fromarray(im).save(blob / f"b{i}.png")
    return root


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model (or the predictor) is loaded."""
    import bench.commands.evaluate
    import ensembles.predictor

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(ensembles.predictor, "load_candidate", boom)
    monkeypatch.setattr(bench.commands.evaluate, "load_predictor", boom)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def read_out(out):
    return json.loads((out / "evaluation.json").read_text()), pd.read_csv(out / "predictions.csv")


# ----------------------------------------------------------------------------- scoring


def test_score_matches_sklearn_and_core_ece():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    proba = rng.dirichlet(np.ones(5), 300)
    proba[np.arange(300), y] += rng.uniform(0, 1.2, 300)
    proba /= proba.sum(1, keepdims=True)
    s = score(y, proba, list("abcde"), n_boot=50)
    pred = proba.argmax(1)
    present = [0, 1, 2, 3]
    assert s["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert s["macro_f1"] == pytest.approx(
        f1_score(y, pred, labels=present, average="macro", zero_division=0)
    )
    with warnings.catch_warnings():  # sklearn warns when a class is predicted, never true
        warnings.simplefilter("ignore")
        assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["ece"] == pytest.approx(ece(y, proba))
    assert WeightedScorer(y, pred, proba.max(1), 5)(np.ones(300))["ece"] == pytest.approx(s["ece"])
    assert s["present_classes"] == list("abcd") and s["absent_classes"] == ["e"]
    assert [r["support"] for r in s["per_class"]] == [int((y == c).sum()) for c in present]
    assert np.array(s["confusion"]["counts"]).shape == (4, 5)
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert s["ci"][m]["lo"] <= s[m] <= s["ci"][m]["hi"]
    assert score(y, proba, list("abcde"), n_boot=50)["ci"] == s["ci"]  # seeded


def test_restricted_argmax_differs_from_the_full_one():
    """Two classes present out of three; the absent class takes the top probability of
    two images: the full argmax gets them wrong, the restricted argmax right."""
    y = np.array([0, 0, 1, 1])
    proba = np.array(
        [[0.30, 0.20, 0.50], [0.70, 0.10, 0.20], [0.15, 0.35, 0.50], [0.10, 0.80, 0.10]]
    )
    s = score(y, proba, CLASSES, n_boot=20)
    assert s["accuracy"] == 0.5 and s["restricted"]["accuracy"] == 1.0
    assert list(s["_pred"]) == [2, 0, 2, 1] and list(s["_pred_r"]) == [0, 0, 1, 1]
    assert s["absent_classes"] == ["stripes"]
    assert s["restricted"]["macro_f1"] == 1.0 and s["macro_f1"] < 1.0


def test_group_bootstrap_is_wider_when_groups_are_correlated():
    """20 groups of 10 images; every image of a group right or every one wrong: the
    interval over groups is wider than the one over images."""
    y = np.zeros(200, dtype=int)
    groups = np.repeat([f"p{i}" for i in range(20)], 10)
    right = np.repeat(np.arange(20) % 2 == 0, 10)
    proba = np.where(right[:, None], [[0.9, 0.1]], [[0.2, 0.8]])
    by_image = score(y, proba, ["a", "b"])
    by_group = score(y, proba, ["a", "b"], groups=groups)
    assert by_image["accuracy"] == by_group["accuracy"] == 0.5
    width = lambda s: s["ci"]["accuracy"]["hi"] - s["ci"]["accuracy"]["lo"]  # noqa: E731
    assert width(by_group) > 1.5 * width(by_image)
    assert by_group["bootstrap"]["unit"] == "group" and by_group["bootstrap"]["n_units"] == 20
    w = next(bootstrap_weights(200, groups, 1, 0))
    assert w.sum() == 200 and all(len(set(w[groups == g])) == 1 for g in set(groups))


# ----------------------------------------------------------------------------- end to end


def test_identity_map_outputs_consistent(model, ext, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(model), "--data", str(ext), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "blob 5" in printed and str(out) in printed
    for f in (
        "evaluation.json",
        "predictions.csv",
        "index.html",
        "img/confusion.png",
        "img/reliability.png",
        "img/confidence.png",
        "img/recall.png",
    ):
        assert (out / f).is_file(), f
    r, p = read_out(out)
    assert r["class_map"]["map"] == {
        "Disc": "disc",
        "SQUARE": "square",
        "stripes": "stripes",
        "blob": None,
    }
    assert r["class_map"]["unmapped"] == {"blob": 5}
    assert r["n"] == len(p) == 24 and r["n_left_out"] == 5 == r["left_out"]["unmapped_class"]
    assert list(p.columns[-3:]) == CLASSES
    # the numbers of evaluation.json, recomputed from predictions.csv
    assert r["accuracy"] == pytest.approx((p["prediction"] == p["true_class"]).mean())
    assert (p["prediction"] == p[CLASSES].idxmax(axis=1)).all()
    assert np.allclose(p["confidence"], p[CLASSES].max(axis=1))
    assert sum(map(sum, r["confusion"]["counts"])) == r["n"]
    assert r["restricted"]["accuracy"] == r["accuracy"]  # every class present
    assert r["accuracy"] > 0.7
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert r["ci"][m]["lo"] <= r[m] <= r["ci"][m]["hi"]
    assert r["bootstrap"] == {
        "resamples": 1000,
        "seed": 0,
        "level": 0.95,
        "method": "percentile",
        "unit": "image",
        "n_units": 24,
        "ece_bins": 15,  # [stats] of the predictor's own run
        "settings": f"[stats] of {Path(model).parent / 'config.toml'}",
    }
    # read at full size through the predictor's own preprocessing, as predict does
    from ensembles import load_predictor

    direct = load_predictor(model).predict_proba(list(p["path"]))
    np.testing.assert_allclose(p[CLASSES].to_numpy(), direct, atol=2e-6)
    assert (
        r["predictor"]["manifest_sha256"]
        == json.loads((model / "manifest.json").read_text())["manifest_sha256"]
    )
    # in-domain numbers from the run's out-of-fold probabilities
    assert r["in_domain"]["entry"] == "rf_hog" and r["in_domain"]["n"] == 60
    assert all(0 <= row["recall_in_domain"] <= 1 for row in r["per_class"])
    assert r["gradcam"]["status"] == "none"  # no CNN member
    html = (out / "index.html").read_text()
    assert 'http-equiv="Content-Security-Policy" content="default-src' in html
    # a second evaluation may replace the first
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(ext),
                "--out",
                str(out),
                "--no-gradcam",
            ]
        )
        == 0
    )


def test_class_map_toml_and_csv(model, tmp_path):
    data = write_set(tmp_path / "lab3", {0: "round", 1: "box", 2: "lines"})
    toml = tmp_path / "map.toml"
    toml.write_text('round = "disc"\nbox = "Square"\nlines = "stripes"\nunused = "disc"\n')
    r1 = evaluate(model, data, class_map=toml, out=tmp_path / "o1", progress=False)
    assert r1["class_map"]["map"] == {"box": "square", "lines": "stripes", "round": "disc"}
    assert r1["class_map"]["unused_entries"] == ["unused"] and r1["n"] == 24
    mapcsv = tmp_path / "map.csv"
    mapcsv.write_text("external,predictor\nround,disc\nbox,square\nlines,\n")
    r2 = evaluate(model, data, class_map=mapcsv, out=tmp_path / "o2", progress=False)
    assert r2["class_map"]["map"]["lines"] is None and r2["class_map"]["unmapped"] == {"lines": 8}
    assert r2["n"] == 16 and r2["absent_classes"] == ["stripes"]
    _, p1 = read_out(tmp_path / "o1")
    _, p2 = read_out(tmp_path / "o2")
    same = p1[p1["external_class"] != "lines"].reset_index(drop=True)
    np.testing.assert_allclose(same[CLASSES].to_numpy(), p2[CLASSES].to_numpy())
    # a named table works too
    (tmp_path / "named.toml").write_text('[class_map]\nround = "disc"\n')
    r3 = evaluate(
        model,
        data,
        class_map=tmp_path / "named.toml",
        out=tmp_path / "o3",
        progress=False,
        n_boot=10,
    )
    assert r3["n"] == 8 and r3["class_map"]["unmapped"] == {"box": 8, "lines": 8}


def test_many_to_one_map_scores_each_of_the_sets_own_classes(model, tmp_path, capsys):
    """Two of the set's classes onto one predictor class: the squares ('box') mapped onto
    'disc' are called squares, and the table by the set's own classes shows it."""
    data = write_set(tmp_path / "fine", {0: "round", 1: "box", 2: "lines"})
    toml = tmp_path / "map.toml"
    toml.write_text('round = "disc"\nbox = "disc"\nlines = "stripes"\n')
    out = tmp_path / "o"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--class-map",
                str(toml),
                "--out",
                str(out),
                "--no-gradcam",
            ]
        )
        == 0
    )
    r, p = read_out(out)
    rows = {e["external_class"]: e for e in r["per_external_class"]}
    assert [e["external_class"] for e in r["per_external_class"]] == ["box", "round", "lines"]
    for name, e in rows.items():
        sub = p[p["external_class"] == name]
        assert e["n"] == len(sub) == 8
        assert e["mapped_to"] == sub["true_class"].iloc[0]
        assert e["recall"] == pytest.approx((sub["prediction"] == sub["true_class"]).mean())
        wrong = sub.loc[sub["prediction"] != sub["true_class"], "prediction"].value_counts()
        assert dict(e["wrong"]) == {c: int(n) for c, n in wrong.head(3).items()}
    assert rows["box"]["mapped_to"] == "disc" and rows["box"]["recall"] < 0.5
    assert rows["box"]["wrong"][0][0] == "square"  # the squares are seen as squares
    assert rows["round"]["recall"] > 0.5
    table = pd.read_csv(out / "csv" / "per_external_class.csv")
    assert table["external_class"].tolist() == ["box", "round", "lines"]
    assert "By the set's own classes" in (out / "index.html").read_text()
    printed = capsys.readouterr().out
    assert "the set's own classes" in printed and "box -> disc" in printed
    # a one-to-one map has no such table
    one = evaluate(
        model,
        data,
        class_map={"round": "disc", "box": "square", "lines": "stripes"},
        out=tmp_path / "o1",
        progress=False,
        n_boot=10,
        gradcam=False,
    )
    assert one["per_external_class"] is None
    assert not (tmp_path / "o1" / "csv" / "per_external_class.csv").exists()


def test_subset_of_classes_scores_over_the_present_ones(model, tmp_path):
    data = write_set(tmp_path / "two", {0: "disc", 2: "stripes"})
    r = evaluate(model, data, out=tmp_path / "o", progress=False)
    assert r["present_classes"] == ["disc", "stripes"] and r["absent_classes"] == ["square"]
    assert [row["class"] for row in r["per_class"]] == ["disc", "stripes"]
    _, p = read_out(tmp_path / "o")
    restricted = p[["disc", "stripes"]].idxmax(axis=1)
    assert (p["prediction_restricted"] == restricted).all()
    assert r["restricted"]["accuracy"] == pytest.approx((restricted == p["true_class"]).mean())
    assert r["restricted"]["accuracy"] >= r["accuracy"]
    assert np.array(r["confusion"]["counts"]).shape == (2, 3)
    html = (tmp_path / "o" / "index.html").read_text()
    assert "Only some of the predictor" in html


def test_csv_label_column_with_empty_labels_and_groups(model, tmp_path, capsys):
    images, labels = toy_arrays(10, 40, seed=33)
    data = tmp_path / "lab" / "imgs"
    (data / "sub").mkdir(parents=True)
    rows = []
    for i, (im, c) in enumerate(zip(images, labels)):
        rel = f"sub/cell_{i:03d}.png"
        Image.fromarray(im).save(data / rel)
        label = "" if i % 5 == 0 else CLASSES[c].upper()
        # half the paths relative to the CSV's folder, half to the image folder
        rows.append(
            {"file": f"imgs/{rel}" if i % 2 else rel, "cell": label, "patient": f"P{i // 6}"}
        )
    table = tmp_path / "lab" / "cells.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    out = tmp_path / "o"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--labels",
                f"{table}:cell",
                "--groups",
                "patient",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    r, p = read_out(out)
    assert r["n"] == len(p) == 24 and r["left_out"] == {"empty_label": 6} and r["n_left_out"] == 6
    assert r["data"]["labels"]["column"] == "cell" and r["data"]["groups"] == "patient"
    assert r["bootstrap"]["unit"] == "group" and r["bootstrap"]["n_units"] == 5
    assert set(p["group"]) == {f"P{k}" for k in range(5)}
    assert "groups (patient)" in printed
    assert set(p["external_class"]) == {"DISC", "SQUARE", "STRIPES"}
    assert r["accuracy"] == pytest.approx((p["prediction"] == p["true_class"]).mean())
    # groups built from the correctness of the predictions: the group CI is at least as wide
    right = dict(
        zip(p["path"].map(lambda s: s.split("imgs/")[-1]), p["prediction"] == p["true_class"])
    )
    corr = [f"{right.get(r_['file'].split('imgs/')[-1], 'x')}-{i % 3}" for i, r_ in enumerate(rows)]
    pd.DataFrame(rows).assign(patient=corr).to_csv(table, index=False)
    by_group = evaluate(
        model, data, labels=f"{table}:cell", groups="patient", out=tmp_path / "g", progress=False
    )
    by_image = evaluate(model, data, labels=(table, "cell"), out=tmp_path / "i", progress=False)
    width = lambda s: s["ci"]["accuracy"]["hi"] - s["ci"]["accuracy"]["lo"]  # noqa: E731
    assert by_group["accuracy"] == by_image["accuracy"]
    assert width(by_group) >= width(by_image)


def test_npz_and_named_dataset(model, tmp_path, toy_folder):
    images, labels = toy_arrays(6, 40, seed=44)
    npz = tmp_path / "ext.npz"
    np.savez(npz, images=images, labels=labels, classes=np.array(CLASSES))
    r = evaluate(model, npz, out=tmp_path / "o", progress=False, n_boot=50)
    assert r["n"] == 18 and r["data"]["kind"] == "npz"
    cfg = write_tiny_config(
        tmp_path / "cfg.toml", toy_folder, f'\n[datasets.otherlab]\npath = "{npz}"\n'
    )
    r2 = evaluate(model, "otherlab", config=cfg, out=tmp_path / "o2", progress=False, n_boot=50)
    assert r2["data"]["dataset"] == "otherlab" and r2["accuracy"] == r["accuracy"]


def test_out_folder_is_never_someone_elses(model, ext, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["evaluate", "--model", str(model), "--data", str(ext), "--out", str(mine)]) == 2
    assert "not empty" in one_error_line(capsys.readouterr().err)
    assert (mine / "notes.txt").read_text() == "keep me"
    ev = tmp_path / "ev"
    evaluate(model, ext, out=ev, progress=False, n_boot=10, gradcam=False)
    (ev / "notes.txt").write_text("mine")
    (ev / "img" / "mine.png").write_text("mine too")
    evaluate(model, ext, out=ev, progress=False, n_boot=10)  # its own files replaced
    assert (ev / "notes.txt").read_text() == "mine"
    assert (ev / "img" / "mine.png").read_text() == "mine too"


def _bad_cases(tmp_path, ext):
    (tmp_path / "lacks.toml").write_text('Disc = "disc"\nSQUARE = "triangle"\n')
    (tmp_path / "cols.csv").write_text("from,to\nDisc,disc\n")
    other = write_set(tmp_path / "other", {0: "apple", 1: "pear"}, n=2)
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {
            "file": ["Disc/img_000.png", "Disc/nope.png"],
            "label": ["disc", "disc"],
            "patient": ["a", "b"],
        }
    ).to_csv(table, index=False)
    return {
        "map names a class the predictor lacks": (
            ["--class-map", str(tmp_path / "lacks.toml")],
            "no class 'triangle'",
        ),
        "csv map without its columns": (
            ["--class-map", str(tmp_path / "cols.csv")],
            "external,predictor",
        ),
        "map file missing": (["--class-map", str(tmp_path / "none.toml")], "not found"),
        "no overlap": (["--data", str(other)], "maps onto the predictor"),
        "bad label column": (["--labels", f"{table}:diagnosis"], "no column 'diagnosis'"),
        "bad group column": (
            ["--labels", f"{table}:label", "--groups", "patiennt"],
            "did you mean 'patient'",
        ),
        "groups without labels": (["--groups", "patient"], "--labels"),
        "labels csv missing": (["--labels", f"{tmp_path / 'x.csv'}:label"], "not found"),
        "labelled file missing": (["--labels", f"{table}:label"], "not found"),
        "data missing": (["--data", str(tmp_path / "nothing")], "not found"),
        "labels without a column": (["--labels", str(table)], "FILE.csv:COLUMN"),
        "out is a file": (["--out", str(table)], "is a file"),
        "batch size": (["--batch-size", "0"], "at least 1"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "map names a class the predictor lacks",
        "csv map without its columns",
        "map file missing",
        "no overlap",
        "bad label column",
        "bad group column",
        "groups without labels",
        "labels csv missing",
        "labelled file missing",
        "data missing",
        "labels without a column",
        "out is a file",
        "batch size",
    ],
)
def test_bad_arguments_are_one_error_line_before_any_model_loads(
    model, ext, tmp_path, capsys, no_loading, case
):
    extra, expect = _bad_cases(tmp_path, ext)[case]
    argv = ["evaluate", "--model", str(model), "--data", str(ext), "--out", str(tmp_path / "o")]
    for flag in ("--data", "--out"):
        if flag in extra:
            i = argv.index(flag)
            del argv[i : i + 2]
    assert main(argv + extra) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expect in line, line
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def cnn_model(tmp_path_factory, toy_folder):
    """A tiny CNN predictor (2 epochs: it makes errors to show)."""
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("eval_cnn")
    cfg = write_tiny_config(
        root / "cfg.toml",
        toy_folder,
        "\n[profiles.tiny.candidates.cnn_tiny.params]\nepochs = 2\n"
        "patience = 1\n\n[report]\nenabled = false\n",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        _, out = run_from_args(
            str(cfg), out=str(root / "run"), only=["cnn_tiny"], show_progress=False
        )
    return out / "predictor"


def test_gradcam_gallery_of_errors_with_a_cnn_member(cnn_model, ext, tmp_path):
    r = evaluate(cnn_model, ext, out=tmp_path / "o", progress=False, n_boot=50)
    _, p = read_out(tmp_path / "o")
    errors = p[p["prediction"] != p["true_class"]]
    assert len(errors), "the 2-epoch CNN should make errors"
    assert r["gradcam"]["status"] == "ok"
    shown = pd.read_csv(tmp_path / "o" / "csv" / "gradcam_errors.csv")
    assert 0 < len(shown) == r["gradcam"]["n"] <= 3 * 3
    assert set(shown["path"]) <= set(errors["path"])
    assert shown.groupby("true").size().max() <= 3
    assert (tmp_path / "o" / "img" / "gradcam_errors.png").is_file()
    assert "gradcam_errors.png" in (tmp_path / "o" / "index.html").read_text()
    off = evaluate(cnn_model, ext, out=tmp_path / "o2", progress=False, n_boot=10, gradcam=False)
    assert off["gradcam"]["status"] == "off"
    assert not (tmp_path / "o2" / "img" / "gradcam_errors.png").exists()


def test_names_from_the_data_are_escaped_in_the_page(model, tmp_path):
    data = write_set(tmp_path / "xss", {0: "<img src=x onerror=alert(1)>", 1: "square"}, n=3)
    r = evaluate(
        model,
        data,
        class_map={"<img src=x onerror=alert(1)>": "disc"},
        out=tmp_path / "o",
        progress=False,
        n_boot=10,
    )
    assert r["n"] == 6 and r["class_map"]["source"] == "(dict)"
    html = (tmp_path / "o" / "index.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_data_argument_is_one_rule_for_run_and_evaluate(tmp_path, monkeypatch, capsys, toy_folder):
    """The cases where ``run`` and ``evaluate`` used to disagree: an ``.NPZ`` suffix in
    capitals (run: a dataset name), a bare word naming no dataset (run: a path relative to
    the config), a folder in the working directory that is also a dataset's name."""
    from bench.config import data_argument

    monkeypatch.chdir(tmp_path)
    cfg = write_tiny_config(
        tmp_path / "cfg.toml",
        toy_folder,
        extra=f'\n[datasets.toy]\npath = "{toy_folder}"\n[datasets.here]\npath = "{toy_folder}"\n',
    )
    (tmp_path / "here").mkdir()
    assert data_argument("toy", cfg) == (None, "toy")
    assert data_argument("here", cfg) == (Path("here"), None)  # a folder first
    assert data_argument("lab.NPZ", cfg) == (Path("lab.NPZ"), None)
    assert data_argument("sub/x", cfg) == (Path("sub/x"), None)
    with pytest.raises(
        BenchError,
        match=r"neither a file or folder nor a \[datasets.NAME\]"
        r".*did you mean 'toy'",
    ):
        data_argument("tou", cfg)
    model = tmp_path / "model"
    model.mkdir()
    for arg, expect in (("lab.NPZ", "data not found: "), ("tou", "did you mean 'toy'")):
        for argv in (
            ["run", "--config", str(cfg), "--data", arg, "--out", str(tmp_path / "r")],
            [
                "evaluate",
                "--model",
                str(model),
                "--config",
                str(cfg),
                "--data",
                arg,
                "--out",
                str(tmp_path / "e"),
            ],
        ):
            assert main(argv) == 2, argv
            line = one_error_line(capsys.readouterr().err)
            assert expect in line and arg in line, (argv, line)


def test_a_labelled_file_outside_the_data_folder_is_an_error_everywhere(tmp_path, capsys):
    from bench.data.datasets import load_dataset

    images, labels = toy_arrays(3, 32, seed=5)
    lab = tmp_path / "lab"
    for d in ("imgs", "elsewhere"):
        (lab / d).mkdir(parents=True)
    rows = []
    for i, (im, c) in enumerate(zip(images, labels)):
        rel = f"{'elsewhere' if i == 0 else 'imgs'}/c{i}.png"
        Image.fromarray(im).save(lab / rel)
        rows.append({"file": rel, "label": CLASSES[c]})
    table = lab / "cells.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    with pytest.raises(BenchError, match="1 labelled file.* outside the data folder"):
        load_dataset(
            lab / "imgs",
            image_size=32,
            labels=f"{table}:label",
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
    model = tmp_path / "model"
    model.mkdir()
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(lab / "imgs"),
                "--labels",
                f"{table}:label",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --labels") and "outside the data folder" in line


def test_a_file_listed_twice_is_counted_once_per_file(tmp_path, capsys):
    """Two files on five rows (one spelt two ways) are 2 files, not 3 extra rows."""
    from bench.data.datasets import load_dataset

    images, labels = toy_arrays(2, 32, seed=6)
    imgs = tmp_path / "lab" / "imgs"
    imgs.mkdir(parents=True)
    for i, im in enumerate(images[:3]):
        Image.fromarray(im).save(imgs / f"c{i}.png")
    rows = [
        ("c0.png", "disc"),
        ("c0.png", "disc"),
        ("c0.png", "disc"),
        ("c1.png", "square"),
        ("./c1.png", "square"),
        ("c2.png", "disc"),
    ]
    table = tmp_path / "lab" / "cells.csv"
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(table, index=False)
    with pytest.raises(
        BenchError,
        match=r"^\[data\] labels .*: 2 file\(s\) listed more than "
        r"once \(5 rows\), e\.g\. c0\.png$",
    ):
        load_dataset(
            imgs,
            image_size=32,
            labels=f"{table}:label",
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
    model = tmp_path / "model"
    model.mkdir()
    pd.DataFrame(rows[3:], columns=["file", "label"]).to_csv(table, index=False)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(imgs),
                "--labels",
                f"{table}:label",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --labels") and line.endswith(
        "1 file(s) listed more than once (2 rows), e.g. c1.png (as c1.png, ./c1.png)"
    )
