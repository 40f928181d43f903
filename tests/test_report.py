"""The report of a finished run: files, numbers, escaping, the browser, Grad-CAM audit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.calibration import apply_temperature
from bench.report import RunData, report_after_run, write_cross_report, write_report
from bench.report.browser import check_report, find_browser
from bench.report.gradcam_audit import (
    audit_sample,
    energy_share,
    map_rank_correlation,
    randomization_check,
)
from cnn.gradcam import randomized_clone
from bench.stats.inference import friedman, t_interval
from tests.conftest import write_tiny_config

EXTRA = """
[feature_sets.colour]
color = { bins = 8 }

[candidates.rf_colour]
type = "feature_forest"
params = { features = "colour", n_estimators = 30 }

[predictor]
temperature_scaling = true

[report]
gradcam_per_class = 4
gallery_per_class = 2
"""
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, toy_folder):
    """One tiny finished run (RF on HOG, RF on colour, a tiny CNN, soft voting), whose
    report was written at the end of ``run``."""
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("report_run")
    cfg = write_tiny_config(root / "bench.toml", toy_folder, EXTRA)
    # a few epochs are enough to report on (the CPU is shared)
    cfg.write_text(re.sub(r"\bepochs = \d+", "epochs = 3", cfg.read_text()))
    _, out = run_from_args(str(cfg), out=str(root / "run"), show_progress=False)
    return out


def _copy(run_dir, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("report", "predictor"))
    return dest


def test_run_writes_the_report(run_dir):
    rep = run_dir / "report"
    html = (rep / "index.html").read_text()
    for section in (
        "leaderboard",
        "statistics",
        "per-class",
        "calibration",
        "gradcam",
        "data-card",
        "run-card",
    ):
        assert f'id="{section}"' in html
    md = (rep / "leaderboard.md").read_text()
    for name in ("rf_hog", "rf_colour", "cnn_tiny", "soft_vote"):
        assert f"| {name} |" in md
        assert name in html
    # the saved predictor is starred and is what the statistics compare against; the
    # colour-only baseline is marked a shortcut, never starred
    saved = json.loads((run_dir / "predictor" / "manifest.json").read_text())["ensemble"]["name"]
    assert f"| {saved} | {RunData(run_dir).kind(saved)} | ★ predictor |" in md
    assert "| rf_colour | baseline | shortcut |" in md
    assert f"paired comparison with <b>{saved}</b>" in html
    # every image and CSV the page links to is there
    links = re.findall(r'(?:src|href)="((?:img|csv)/[^"]+)"', html)
    assert len([x for x in links if x.startswith("img/")]) >= 8
    for rel in links:
        assert (rep / rel).is_file(), rel
    # warnings: the colour-only baseline aces the toy data, no patient groups were given
    assert "colour-only baseline &#39;rf_colour&#39; scores high" in html
    assert "no patient groups" in html


def test_run_card_records_where_the_time_went(run_dir):
    from bench.report.cards import run_card

    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["report_seconds"] > 0
    assert set(m["prepare_seconds"]) == {"rf_hog", "rf_colour"}  # features; the CNN has none
    card = run_card(RunData(run_dir))
    times = {r["candidate"]: r for r in card["unit_times"]}
    assert set(times) == {"rf_hog", "rf_colour", "cnn_tiny"}
    assert all(r["units"] == 3 and r["fit_s"] > 0 for r in times.values())
    assert times["cnn_tiny"]["epochs"] == "3-3" and times["cnn_tiny"]["train_img_s"] > 0
    assert times["rf_hog"]["train_img_s"] is None
    html = (run_dir / "report" / "index.html").read_text()
    assert "Work units per candidate" in html and "Prepare (features, embeddings)" in html


def test_leaderboard_numbers(run_dir):
    run = RunData(run_dir)
    rep = run_dir / "report" / "csv"
    per_fold = pd.read_csv(rep / "metrics_per_fold.csv")
    board = pd.read_csv(rep / "leaderboard.csv")
    assert set(board["candidate"]) == {"rf_hog", "rf_colour", "cnn_tiny", "soft_vote"}
    assert list(board["rank"]) == [1, 2, 3, 4]
    assert board["accuracy"].is_monotonic_decreasing
    for _, r in board.iterrows():
        f = per_fold[per_fold["candidate"] == r["candidate"]].sort_values("fold")
        # per-fold accuracy from the saved out-of-fold probabilities
        p = run.oof[r["candidate"]]
        acc = [np.mean(p[run.folds == k].argmax(1) == run.y[run.folds == k]) for k in run.fold_ids]
        assert f["accuracy"].to_numpy() == pytest.approx(acc)
        ci = t_interval(f["accuracy"], 0.95)
        assert (r["accuracy_lo"], r["accuracy_hi"]) == pytest.approx((ci["lo"], ci["hi"]))
        assert 0 <= r["ece"] <= 1
    # candidates: costs from their work units; above chance on learnable toy images
    res = json.loads((run_dir / "units" / "rf_hog" / "fold0" / "result.json").read_text())
    assert board.set_index("candidate").loc["rf_hog", "model_size"] == res["model_size"]
    assert board["accuracy"].max() > 0.6
    comps = pd.read_csv(rep / "comparisons.csv")
    roles = pd.read_csv(run_dir / "leaderboard.csv").set_index("candidate")["role"].fillna("")
    (saved,) = roles.index[roles == "predictor"]
    assert roles["rf_colour"] == "shortcut" and saved != "rf_colour"
    assert set(roles[roles == ""].index) == {"rf_hog", "cnn_tiny", "soft_vote"} - {saved}
    assert saved == json.loads((run_dir / "state.json").read_text())["predictor"]
    assert list(comps.loc[comps["is_reference"], "candidate"]) == [saved]
    assert dict(zip(board["candidate"], board["role"].fillna(""))) == dict(roles)
    others = comps[~comps["is_reference"]]
    # the verdict's direction follows the sign of the difference
    for _, c in others[others["significant_ttest"]].iterrows():
        assert c["verdict"].startswith("better" if c["mean_diff"] > 0 else "worse")
    assert others["p_ttest"].between(0, 1).all() and others["p_mcnemar"].between(0, 1).all()
    assert (others["p_ttest_holm"] >= others["p_ttest"] - 1e-12).all()
    assert others["test_train_ratio"].iloc[0] == pytest.approx(0.5)  # 3 folds: 20 / 40
    pc = pd.read_csv(rep / "per_class.csv")
    assert set(pc["class"]) == {"disc", "square", "stripes"}
    assert (pc.groupby("candidate")["support"].sum() == 60).all()


def test_gradcam_audit_of_the_run(run_dir):
    rep = run_dir / "report" / "csv"
    summ = pd.read_csv(rep / "gradcam_summary.csv").set_index("candidate")
    assert list(summ.index) == ["cnn_tiny", "soft_vote"]  # the CNN and the ensemble
    assert (summ["images"] == 12).all()  # 4 per class
    assert summ["rho_random_mean"].between(-1, 1).all()
    e = pd.read_csv(rep / "gradcam_energy.csv")
    assert e["energy_in_cell"].dropna().between(0, 1).all()
    assert (run_dir / "report" / "img" / "gradcam_cnn_tiny.png").is_file()


def test_audit_fits_only_ensembles_that_declare_member_weights(run_dir, monkeypatch):
    """The audit's per-fold weights come from a fit of the ensemble on the other folds,
    but only for ensembles that declare ``has_member_weights``; a stacking ensemble is
    not fitted, and its CNN members weigh the same."""
    from bench.report import gradcam_audit
    from ensembles.stacking import Stacking
    from ensembles.voting import SoftVoting

    assert SoftVoting.has_member_weights and not Stacking.has_member_weights
    calls = []
    real = gradcam_audit.fit_ensemble
    monkeypatch.setattr(
        gradcam_audit, "fit_ensemble", lambda *a, **k: calls.append(a[3]) or real(*a, **k)
    )
    run = RunData(run_dir)
    monkeypatch.setattr(run, "members", lambda name: ["cnn_tiny", "rf_colour"])
    entries = run.config.ensembles
    from bench.config import EnsembleEntry  # a run's entries are validated dumps

    entries["soft_vote"] = EnsembleEntry(type="soft_voting", weights="optimized", members="all")
    voted = gradcam_audit.ensemble_weights(run, "soft_vote", ["cnn_tiny"])
    assert calls == ["soft_vote"] * len(run.fold_ids)
    assert sorted(voted) == sorted(run.fold_ids)
    assert all(w == {"cnn_tiny": 1.0} for w in voted.values())  # the only CNN member
    calls.clear()
    entries["soft_vote"] = EnsembleEntry(type="stacking", members="all")
    stacked = gradcam_audit.ensemble_weights(run, "soft_vote", ["cnn_tiny", "rf_colour"])
    assert calls == []
    assert all(w == {"cnn_tiny": 0.5, "rf_colour": 0.5} for w in stacked.values())


def test_predictor_applies_the_oof_temperature(run_dir):
    from ensembles.predictor import load_predictor

    pred = load_predictor(run_dir / "predictor")
    t = pred.record.temperature
    assert 0.05 <= t <= 20 and t != pytest.approx(1.0)
    X = np.load(run_dir / "data" / "images.npy")[:6]
    raw = pred.ensemble_.combine(pred.member_probas(X))
    assert pred.predict_proba(X) == pytest.approx(apply_temperature(raw, t))


def test_html_escapes_hostile_class_names(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "evil")
    state = json.loads((d / "state.json").read_text())
    rename = {"disc": EVIL, "square": 'a "b" & <i>c</i>'}
    state["classes"] = [rename.get(c, c) for c in state["classes"]]
    (d / "state.json").write_text(json.dumps(state))
    table = pd.read_csv(d / "folds.csv")
    table["label"] = table["label"].map(lambda c: rename.get(c, c))
    table.to_csv(d / "folds.csv", index=False)
    m = json.loads((d / "manifest.json").read_text())
    m["dataset"]["counts"] = {rename.get(c, c): n for c, n in m["dataset"]["counts"].items()}
    (d / "manifest.json").write_text(json.dumps(m))
    index = write_report(d, gradcam=False, progress=False)
    html = index.read_text()
    assert EVIL not in html and "<i>c</i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # the report's own sorting script only
    md = (d / "report" / "leaderboard.md").read_text()
    assert "<script>" not in md
    if find_browser() is not None:
        pytest.importorskip("selenium")
        r = check_report(index, tmp_path / "evil.png")
        assert r["alert"] is None and r["ok"], r


def test_headless_browser_renders_the_report(run_dir, tmp_path):
    if find_browser() is None:
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    shot = tmp_path / "report.png"
    r = check_report(run_dir / "report" / "index.html", shot)
    assert r["console_errors"] == [], r["console"]
    assert r["table_visible"] and r["table_rows"] == 4
    assert r["images"] >= 8 and r["broken"] == [] and r["hidden"] == []
    assert r["ok"]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and im.size[1] > 2000
    # the check can fail: a page that opens a dialog and misses an image
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<table id="leaderboard-table"><tbody><tr><td>x</td></tr></tbody></table>'
        '<img src="missing.png"><script>alert("hi")</script>'
    )
    r = check_report(bad)
    assert not r["ok"] and r["alert"] == "hi" and r["broken"] == ["missing.png"]


def test_cli_report_several_runs_adds_friedman(run_dir, tmp_path, monkeypatch):
    import bench.commands.cli
    from bench.commands.cli import main

    written = []  # each run's own report is tested above; here only that the CLI asks for it
    monkeypatch.setattr(
        bench.commands.cli,
        "write_report",
        lambda d, gradcam=None, out=None: written.append((str(d), gradcam)) or d,
    )
    d2 = _copy(run_dir, tmp_path / "second")
    rng = np.random.default_rng(0)
    p = np.load(d2 / "oof" / "rf_hog.npy")
    np.save(d2 / "oof" / "rf_hog.npy", rng.permutation(p))  # a data set where rf_hog fails
    out = tmp_path / "cross"
    assert main(["report", str(run_dir), str(d2), "--no-gradcam", "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    assert "Friedman" in html and (out / "img" / "cd_diagram.png").is_file()
    s = pd.read_csv(out / "csv" / "scores_and_ranks.csv")
    names = [c for c in s.columns if c != "dataset" and not c.startswith("rank_")]
    assert set(names) == {"rf_hog", "rf_colour", "cnn_tiny", "soft_vote"}
    fr = friedman(s[names].to_numpy())
    assert f"{fr['chi2']:.3f}" in html
    assert s.loc[1, "rank_rf_hog"] >= s.loc[0, "rank_rf_hog"]
    assert written == [(str(run_dir), False), (str(d2), False)]
    with pytest.raises(Exception, match="at least two"):
        write_cross_report([run_dir], out)


def test_report_failure_does_not_lose_the_run(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path / "broken")
    (d / "leaderboard.csv").unlink()
    assert report_after_run(d, {"report": {}}) is None
    err = capsys.readouterr()
    assert "report failed" in err.out + err.err and "python -m bench report" in err.out + err.err
    assert report_after_run(d, {"report": {"enabled": False}}) is None


# ----------------------------------------------------------------------------- Grad-CAM


def _pointer_model(channel: int):
    """A CNN that scores class 0 by the amount of colour ``channel``: its feature map is
    that channel (1x1 convolution), so it looks wherever that colour is."""
    import keras
    from keras import layers

    inp = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255)(inp)
    x = layers.Conv2D(1, 1, use_bias=False, name="conv")(x)
    x = layers.Activation("relu", name="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(2, name="logits")(x)
    model = keras.Model(inp, layers.Activation("softmax", name="probs")(x))
    w = np.zeros((1, 1, 3, 1), np.float32)
    w[..., channel, 0] = 1.0
    model.get_layer("conv").set_weights([w])
    model.get_layer("logits").set_weights(
        [np.array([[1.0, -1.0]], np.float32), np.zeros(2, np.float32)]
    )
    return model


def _two_squares(n=4):
    """Black images, a red square top-left (the 'cell') and a green one bottom-right."""
    X = np.zeros((n, 32, 32, 3), np.uint8)
    X[:, 4:14, 4:14, 0] = 200
    X[:, 18:28, 18:28, 1] = 200
    cell = np.zeros((32, 32), bool)
    cell[4:14, 4:14] = True
    return X, cell


def test_energy_share_separates_right_and_wrong_attention():
    import tensorflow  # noqa: F401  (a required dependency: imported, never skipped)
    from cnn.gradcam import gradcam

    X, cell = _two_squares()
    right = gradcam(_pointer_model(0), X, class_index=0)  # looks at red: the cell
    wrong = gradcam(_pointer_model(1), X, class_index=0)  # looks at green: elsewhere
    assert min(energy_share(m, cell) for m in right) > 0.95
    assert max(energy_share(m, cell) for m in wrong) < 0.05
    assert energy_share(np.ones((32, 32)), cell) == pytest.approx(cell.mean())
    assert np.isnan(energy_share(np.zeros((32, 32)), cell))


def test_randomisation_check_flags_maps_that_ignore_the_weights():
    import tensorflow  # noqa: F401  (a required dependency: imported, never skipped)
    from cnn.gradcam import gradcam

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (6, 32, 32, 1)).astype(np.uint8)
    X = np.repeat(gray, 3, axis=-1)
    # On gray images a 1x1 convolution only rescales brightness: whatever its weights, the
    # map is the image itself. The check must flag it.
    model = _pointer_model(0)
    trained = gradcam(model, X, class_index=0)
    for seed in range(20):
        clone = randomized_clone(model, seed)
        assert not np.allclose(
            clone.get_layer("conv").get_weights()[0], model.get_layer("conv").get_weights()[0]
        )
        random = gradcam(clone, X, class_index=0)
        if all(np.ptp(m) > 0 for m in random):
            break
    r = randomization_check(trained, random, threshold=0.5)
    assert r["flagged"] and r["rho_mean"] > 0.99
    # maps that do change with the weights pass
    noise = rng.random(trained.shape).astype(np.float32)
    r = randomization_check(trained, noise, threshold=0.5)
    assert not r["flagged"] and abs(r["rho_mean"]) < 0.2
    assert np.isnan(map_rank_correlation(np.zeros((4, 4)), np.eye(4)))


def test_audit_sample_is_seeded_and_per_class():
    y = np.repeat([0, 1, 2], [10, 3, 7])
    a, b = audit_sample(y, 4, seed=5), audit_sample(y, 4, seed=5)
    assert (a == b).all()
    assert np.bincount(y[a]).tolist() == [4, 3, 4]
    assert not (audit_sample(y, 4, seed=6) == a).all()


def test_a_fit_note_becomes_a_report_warning(tmp_path):
    """A unit's fit notes (e.g. a backbone left random) are warned about at the top."""
    import pandas as pd
    from bench.config import Config, ReportSection
    from bench.report.cards import warnings_for

    class Run:
        manifest = {"grouping": {"user_groups": 1}, "dataset": {}}
        config = Config.from_dict({"data": {"groups": "g.csv"}})
        folds_table = pd.DataFrame({"fold": [0, 0, 1, 1, 2, 2] * 5, "label": ["a", "b"] * 15})
        fold_ids = [0, 1, 2]
        classes = ["a", "b"]
        units = {
            "tl": [{"notes": ["MobileNetV2 started from random weights"]}, {"notes": []}],
            "cnn": [{"notes": []}],
        }

    settings = ReportSection(colour_extractors=["color"], colour_only_warning=0.6)
    got = warnings_for(Run(), pd.DataFrame({"candidate": [], "balanced_accuracy": []}), settings)
    titles = [w["title"] for w in got]
    assert titles == ["'tl': not what its name says"]
    assert "random weights" in got[0]["text"]
