"""Prediction sets end to end: stored by a tiny run (calibrated only on rows no fit saw),
written by predict and the Python API, shown by inspect, scored by evaluate, refitted by
calibrate (the original left byte-identical), and the model card."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.commands.cli import main
from tests.conftest import run_error_line, write_tiny_config, write_toy_folder

EXTRA = """
[predictor]
ensemble = "rf_hog"
conformal = { confidence = 0.9, method = "mondrian", target_error = 0.05, scheme = "cross" }

[profiles.tiny.candidates.cnn_tiny.params]
epochs = 2
patience = 2
"""


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def spied(tmp_path_factory, toy_folder):
    """A tiny run whose work units and conformal calibration are watched."""
    import bench.run.units as units
    import core.conformal as cc
    from bench.run.runner import run_from_args

    fits, preds, calib = {}, [], []
    real_fit, real_pred, real_entry = (
        units.fit_candidate,
        units.predict_proba_for,
        cc.predictor_entry,
    )

    def fit_spy(cand, X, y, **kw):
        fits[id(cand)] = {_digest(x) for x in X}
        return real_fit(cand, X, y, **kw)

    def pred_spy(cand, X, classes):
        p = real_pred(cand, X, classes)
        preds.append((id(cand), type(cand).__name__, [_digest(x) for x in X], np.array(p)))
        return p

    def entry_spy(proba, y, *a, **kw):
        calib.append((np.array(proba), np.array(y)))
        return real_entry(proba, y, *a, **kw)

    root = tmp_path_factory.mktemp("conformal_run")
    cfg = write_tiny_config(root / "cfg.toml", toy_folder, EXTRA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        mp.setattr(units, "fit_candidate", fit_spy)
        mp.setattr(units, "predict_proba_for", pred_spy)
        mp.setattr("bench.stats.conformal_sets.predictor_entry", entry_spy)
        board, out = run_from_args(str(cfg), out=str(root / "run"), show_progress=False)
    return {"board": board, "out": Path(out), "fits": fits, "preds": preds, "calib": calib}


def _tree_digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_no_calibration_row_is_scored_by_a_model_that_saw_it(spied):
    from bench.run.rundir import RunDir

    run = RunDir(spied["out"])
    assert len(spied["calib"]) == 1  # the saved entry's calibration
    proba, y = spied["calib"][0]
    images = np.asarray(run.images)
    assert len(proba) == len(images) and (y == run.labels).all()
    by_image = {}
    for model, kind, digests, p in spied["preds"]:
        if model in spied["fits"]:  # the units' own fitted models (rf_hog + cnn)
            for d, row in zip(digests, p):
                by_image.setdefault(d, []).append((model, kind, row))
    for i, img in enumerate(images):
        d = _digest(img)
        hits = [(m, row) for m, kind, row in by_image[d] if "Forest" in kind]  # rf_hog
        match = [m for m, row in hits if np.allclose(row, proba[i], atol=1e-6)]
        assert match, f"row {i}: its calibration probabilities come from no unit's prediction"
        for m in match:
            assert d not in spied["fits"][m], f"row {i} was calibrated on a model that saw it"


def test_predictor_stores_sets_card_and_leaderboard_columns(spied, capsys):
    from ensembles.predictor import verify_predictor

    m = verify_predictor(spied["out"] / "predictor")
    cp = m.conformal
    assert cp.method == "mondrian" and cp.confidence == 0.9
    assert cp.n_calibration == 60 and set(cp.in_lab["by_confidence"]) == {"0.9", "0.95"}
    assert 0 < cp.review.confidence_threshold <= 1.000001
    assert "MODEL_CARD.md" in m.files
    card = (spied["out"] / "predictor" / "MODEL_CARD.md").read_text()
    for heading in (
        "## Intended use",
        "## Training data",
        "## Quantitative analyses",
        "### Conformal prediction sets",
        "## Caveats and recommendations",
    ):
        assert heading in card
    board = spied["board"]
    for col in ("conformal_coverage", "conformal_set_size", "aurc", "excess_aurc"):
        assert board[col].notna().all(), col
    assert (board["excess_aurc"] >= -1e-12).all() and (board["aurc"] >= board["excess_aurc"]).all()
    html = (spied["out"] / "report" / "index.html").read_text()
    assert 'id="conformal"' in html and "Model card of the saved predictor" in html
    assert (spied["out"] / "report" / "img" / "risk_coverage.png").is_file()
    assert main(["inspect", str(spied["out"] / "predictor")]) == 0
    text = capsys.readouterr().out
    assert "prediction sets: mondrian at 0.9 confidence" in text and "review:" in text


def test_predict_writes_sets_and_flags_like_the_api(spied, tmp_path, capsys):
    from ensembles.predictor import load_predictor

    data = write_toy_folder(tmp_path / "new", n_per_class=4, seed=5)
    out = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(spied["out"] / "predictor"),
                "--img_path",
                str(data),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12
    n_flag = sum(int(r["review"]) for r in rows)
    assert f"{n_flag} of 12 images flagged for review" in err
    pred = load_predictor(spied["out"] / "predictor")
    api = pred.predict_review(sorted(str(p) for p in data.rglob("*.png")))
    by_path = {r["path"]: r for r in rows}
    for i, p in enumerate(sorted(str(p) for p in data.rglob("*.png"))):
        r = by_path[p]
        assert r["prediction_set"] == api["prediction_set"][i]
        assert (
            int(r["set_size"])
            == api["set_size"][i]
            == len(r["prediction_set"].split("|")) - (r["prediction_set"] == "")
        )
        assert int(r["review"]) == int(api["review"][i])
        if int(r["set_size"]) != 1:
            assert int(r["review"]) == 1


def _toy_with_extra_class(root: Path) -> Path:
    data = write_toy_folder(root, n_per_class=10, seed=7)
    shutil.copytree(data / sorted(p.name for p in data.iterdir())[0], data / "zzz_other")
    return data


def test_calibrate_leaves_the_original_byte_identical_and_refuses_bad_input(
    spied, tmp_path, capsys
):
    model = spied["out"] / "predictor"
    before = _tree_digest(model)
    new_lab = write_toy_folder(tmp_path / "lab", n_per_class=10, seed=9)  # 30 images
    out = tmp_path / "recal"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model),
                "--data",
                str(new_lab),
                "--n",
                "15",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert _tree_digest(model) == before
    # 5 images per class cannot carry mondrian sets at 0.9 (10 needed): pooled instead
    said = capsys.readouterr()
    assert "with --method lac" in said.err
    # class names beside the counts, and a verdict on the 15 images not drawn
    assert "(per class: disc 5, square 5, stripes 5)" in said.out, said.out
    (line,) = [ln for ln in said.out.splitlines() if ln.startswith("verdict: ")]
    assert "on 15 labelled images not used to calibrate" in line
    assert line.split(": ")[1].split(" on this set")[0] in (
        "usable",
        "not usable",
        "not shown usable",
    )
    from ensembles.predictor import verify_predictor

    m = verify_predictor(out)
    assert m.conformal.method == "lac"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model),
                "--data",
                str(new_lab),
                "--n",
                "15",
                "--method",
                "mondrian",
                "--out",
                str(tmp_path / "kept"),
            ]
        )
        == 0
    )
    assert "calibration images are in" in capsys.readouterr().err
    assert verify_predictor(tmp_path / "kept").conformal.method == "mondrian"
    rc = m.conformal.recalibration
    assert m.conformal.n_calibration == 15 and len(rc.rows) == 15
    assert rc.before.n_calibration == 60
    card = (out / "MODEL_CARD.md").read_text()
    assert "Recalibrated for a new lab on 15" in card
    # the review threshold is said to come from the drawn images, not the out-of-fold rows
    (review,) = [ln for ln in card.splitlines() if ln.startswith("- Review flag")]
    assert "fitted on the 15 labelled images of `lab`" in review and "out-of-fold" not in review
    assert str(tmp_path) not in card  # no absolute local path
    # the unchanged members are hard links to the original's files, not copies
    for rel in m.raw["files"]:
        if rel not in ("MODEL_CARD.md", "manifest.json"):
            assert (out / rel).stat().st_ino == (model / rel).stat().st_ino, rel
    # evaluate leaves the drawn images out and reports both calibrations on the rest
    ev = tmp_path / "ev"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--data",
                str(new_lab),
                "--out",
                str(ev),
                "--no-gradcam",
            ]
        )
        == 0
    )
    res = json.loads((ev / "evaluation.json").read_text())
    assert res["n"] == 15 and res["data"]["calibration_rows_left_out"] == 15
    for k in ("confidence", "coverage", "mean_set_size", "aurc"):
        assert isinstance(res[k], float), k
    assert "coverage" in res["conformal"]["before_recalibration"]
    said = capsys.readouterr().out
    assert "before bench calibrate: coverage" in said
    v = res["verdict"]
    assert v["verdict"] in ("usable", "not usable", "not shown")
    assert f"verdict: {v['line']}" in said and "15 images not used to calibrate" in v["line"]
    ba, ci = res["balanced_accuracy"], res["ci"]["balanced_accuracy"]
    assert f"balanced accuracy {ba:.2f} [{ci['lo']:.2f}, {ci['hi']:.2f}]" in v["line"]
    assert ("usable" == v["verdict"]) == (
        ci["lo"] >= 0.8 and res["conformal"]["share_flagged"] <= 0.5
    )
    assert v["line"] in (ev / "index.html").read_text()

    def refused(args):
        assert main(["calibrate", "--model", str(model), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        return err[0]

    assert "larger than the 30 labelled images" in refused(
        ["--data", str(new_lab), "--n", "31", "--out", str(tmp_path / "a")]
    )
    other = _toy_with_extra_class(tmp_path / "other")
    assert "classes the predictor lacks (zzz_other)" in refused(
        ["--data", str(other), "--n", "5", "--out", str(tmp_path / "b")]
    )
    for bad in ("0", "1", "1.5"):
        assert "between 0 and 1" in refused(
            ["--data", str(new_lab), "--n", "5", "--confidence", bad, "--out", str(tmp_path / "c")]
        )
    assert "exists" in refused(["--data", str(new_lab), "--n", "5", "--out", str(out)])
    assert _tree_digest(model) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_fewest_calibration_images_follow_the_split_conformal_p_values():
    from bench.commands.calibrate import check_n
    from core.conformal import set_minimum
    from core.conformal import ConformalSets
    from core.errors import BenchError

    assert [set_minimum(c) for c in (0.5, 0.8, 0.9, 0.95, 0.99)] == [2, 5, 10, 20, 100]
    rng = np.random.default_rng(0)
    for c in (0.8, 0.9, 0.95):
        n = set_minimum(c)
        for q, leaves in ((n - 1, False), (n, True)):  # pooled sets from q images
            proba = rng.dirichlet(np.ones(3), size=q)
            sets = ConformalSets.fit(proba, proba.argmax(axis=1), "lac", c).sets(
                np.array([[1.0, 0.0, 0.0]])
            )
            assert (not sets.all()) == leaves, (c, q)
    check_n(50, 0.95, 8, "lab")  # 8 classes at 0.95: 50 is enough (pooled if needed)
    with pytest.raises(
        BenchError,
        match=r"^--n 19 is below the minimum of 20: at confidence "
        r"0.95 a prediction set calibrated on fewer than 20 "
        r"images holds every class",
    ):
        check_n(19, 0.95, 8, "lab")
    with pytest.raises(
        BenchError,
        match=r"minimum of 12: .*, and the 12 classes of lab need "
        r"at least one image each$",
    ):
        check_n(11, 0.9, 12, "lab")


def test_calibrate_refuses_too_small_an_n_before_any_model_is_loaded(
    spied, tmp_path, capsys, monkeypatch
):
    import bench.commands.calibrate as cal

    monkeypatch.setattr(
        cal, "load_predictor", lambda *a, **k: pytest.fail("the predictor's models were loaded")
    )
    model = spied["out"] / "predictor"  # stored at confidence 0.9: 10 images at least
    new_lab = write_toy_folder(tmp_path / "lab", n_per_class=10, seed=9)  # 3 classes
    for args, fragment in (
        (
            ["--n", "1"],
            "--n 1 is below the minimum of 10: at confidence 0.9 a prediction "
            "set calibrated on fewer than 10 images holds every class",
        ),
        (["--n", "9"], "--n 9 is below the minimum of 10"),
        (["--n", "15", "--confidence", "0.95"], "--n 15 is below the minimum of 20"),
        (
            ["--n", "2", "--confidence", "0.5"],
            f"--n 2 is below the minimum of 3: at confidence 0.5 a prediction set calibrated "
            f"on fewer than 2 images holds every class (a class leaves it only when 1/(n+1) "
            f"< 1 - confidence), and the 3 classes of {new_lab} need at least one image each",
        ),
    ):
        out = tmp_path / "out"
        assert (
            main(
                [
                    "calibrate",
                    "--model",
                    str(model),
                    "--data",
                    str(new_lab),
                    *args,
                    "--out",
                    str(out),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {fragment}"), err
        assert not out.exists()


def test_evaluate_reports_coverage_keys(spied, tmp_path):
    data = write_toy_folder(tmp_path / "ext", n_per_class=6, seed=21)
    ev = tmp_path / "ev"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(spied["out"] / "predictor"),
                "--data",
                str(data),
                "--out",
                str(ev),
                "--no-gradcam",
            ]
        )
        == 0
    )
    res = json.loads((ev / "evaluation.json").read_text())
    assert res["confidence"] == 0.9 and 0 <= res["coverage"] <= 1
    assert res["mean_set_size"] >= res["conformal"]["singleton_share"]
    scores = res["conformal"]["confidence_scores"]
    assert set(scores) == {"max_softmax", "set_size", "shift_score", "combined"}


@pytest.mark.parametrize("value", ["0", "1", "1.2", "-0.5"])
def test_config_confidence_outside_0_1_is_one_line(value, toy_folder, tmp_path, capsys):
    line = run_error_line(
        f"[predictor]\nconformal = {{ confidence = {value} }}", toy_folder, tmp_path, capsys
    )
    assert "conformal.confidence" in line


def test_config_unknown_method_is_one_line(toy_folder, tmp_path, capsys):
    line = run_error_line(
        '[predictor]\nconformal = { method = "bayes" }', toy_folder, tmp_path, capsys
    )
    assert "conformal.method must be one of" in line


def test_bag_predictor_stores_a_refer_band_and_predict_bags_writes_refer(tmp_path):
    from bench.config import load_config
    from bench.run.runner import run_benchmark
    from ensembles.bags import call_bag
    from ensembles.predictor import load_predictor, verify_predictor
    from tests.test_patients import _config, write_patients

    data = write_patients(tmp_path / "patients")
    run_benchmark(
        load_config(_config(tmp_path, data), out=str(tmp_path / "run")), show_progress=False
    )
    model = tmp_path / "run" / "predictor"
    m = verify_predictor(model)
    band = m.bags.refer_band
    assert band.lo <= band.hi and band.n == 20
    # the default scheme: split-conformal sets of the fold average, no fold models asked for
    assert m.conformal.scheme == "split" and m.conformal.folds is None
    assert not load_predictor(model).needs_fold_proba_
    pats = tmp_path / "pats"
    cells = (
        sorted((data / "images").rglob("*.png"))
        if (data / "images").is_dir()
        else sorted(data.rglob("*.png"))
    )
    (pats / "A").mkdir(parents=True)
    for f in cells[:6]:
        (pats / "A" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "bags.csv"
    assert (
        main(
            ["predict", "--model", str(model), "--img_path", str(pats), "--bags", "--out", str(out)]
        )
        == 0
    )
    row = next(csv.DictReader(out.open()))
    p = float(row[next(k for k in row if k.startswith("probability_"))])
    if band.lo <= p <= band.hi:
        assert row["decision"] == "refer" and row["reason"].startswith("score in the band")
    from ensembles.record import BagTask

    spec = BagTask(
        positive="APL",
        aggregator="mean",
        threshold=0.5,
        min_cells=1,
        refer_band={"lo": 0.4, "hi": 0.6},
    )
    classes = ["AML", "APL"]
    assert call_bag(spec, classes, [0.5, 0.5])[1:] == (
        "refer",
        "score in the band 0.400-0.600 where out-of-fold patients were misclassified; leaning APL",
    )
    assert call_bag(spec, classes, [0.7, 0.7])[1:] == ("APL", "")
    assert call_bag(spec, classes, [0.3, 0.3])[1:] == ("AML", "")
    shifted = call_bag(spec, classes, [0.7, 0.7], np.full(2, 1.0))  # cells far out
    assert shifted[1] == "refer" and shifted[2].startswith("cells unlike the training")
    assert call_bag(spec.model_copy(update={"refer_band": None}), classes, [0.5])[1] == "APL"


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("confidence", 1.5, "between 0 and 1"),
        ("method", "bayes", "one of"),
        ("labels", "cut", "class indices"),
    ],
)
def test_a_bad_conformal_entry_is_refused_in_one_line(
    spied, tmp_path, capsys, field, value, fragment
):
    from ensembles.predictor import manifest_digest

    d = tmp_path / "pred"
    shutil.copytree(spied["out"] / "predictor", d)
    m = json.loads((d / "manifest.json").read_text())
    m["conformal"][field] = [-1] * len(m["conformal"]["scores"]) if value == "cut" else value
    m["manifest_sha256"] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("error: bad predictor manifest") and fragment in err[0]
    ), err


def test_saved_sets_are_cross_conformal_over_the_fold_models(spied, tmp_path):
    """The predictor stores each calibration row's fold model; at prediction time fold k's
    ensemble (the ensemble over the members' fold-k models) is compared with fold k's rows."""
    from core.conformal import cross_p_values, nonconformity
    from ensembles.predictor import load_predictor

    pred = load_predictor(spied["out"] / "predictor")
    cp = pred.record.raw["conformal"]
    assert len(cp["folds"]) == cp["n_calibration"] and pred.needs_fold_proba_
    assert pred.conformal_.n_folds == pred.n_folds_ == 3
    data = write_toy_folder(tmp_path / "new", n_per_class=3, seed=9)
    files = sorted(str(p) for p in data.rglob("*.png"))
    proba, fold_proba = pred.predict_proba(files, folds=True)
    assert fold_proba.shape == (3, len(files), len(pred.classes_))
    X = pred.preprocessing.apply_batch(files)
    for k in range(3):  # each fold's ensemble, from that fold's model of every member
        own = [pred.members_[n][k].predict_proba(X) for n in pred.member_names_]
        assert np.allclose(fold_proba[k], pred.ensemble_.combine(own), atol=1e-5)
    st = pred.conformal_
    pv = cross_p_values(
        st.cal_scores,
        st.cal_labels,
        st.cal_folds,
        np.stack([nonconformity(f, st.method) for f in fold_proba]),
        st.mondrian,
    )
    api = pred.predict_review(files)
    assert (api["set_size"] == (pv >= 1 - st.confidence - 1e-12).sum(axis=1)).all()


def test_model_card_says_when_an_external_sets_coverage_falls_below_nominal(spied):
    from ensembles.model_card import model_card
    from ensembles.predictor import verify_predictor

    m = verify_predictor(spied["out"] / "predictor")
    ext = {
        "n": 50,
        "accuracy": 0.4,
        "balanced_accuracy": 0.3,
        "confidence": 0.9,
        "coverage": 0.55,
        "mean_set_size": 1.1,
        "aurc": 0.4,
        "share_flagged": 0.3,
        "answered_accuracy": 0.5,
    }
    held = model_card(m.model_copy(update={"external": {"lab_b": {**ext, "below_nominal": False}}}))
    fell = model_card(m.model_copy(update={"external": {"lab_b": {**ext, "below_nominal": True}}}))
    assert "`lab_b` (50 images)" in held and "coverage below nominal" not in held
    assert "coverage below nominal: the sets do not hold there" in fell
