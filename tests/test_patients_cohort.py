"""Patient calls that hold on a new cohort: per-bag colour normalisation, the nested
choice of the predictor's row, the threshold for a stated sensitivity, the shortcut and
restricted-cell rows, and scores that do not move with the image pipeline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score

from bench.protocols import patients as patients_mod
from bench.config import load_config
from bench.run.rundir import RunDir
from bench.run.runner import run_benchmark
from core.colour import bag_colour, bag_jitter, bag_reinhard, lab_moments, smooth
from core.errors import BenchError
from core.images import Preprocessing
from core.splits import PredefinedFolds
from ensembles.bags import choose_threshold
from ensembles.predictor import load_predictor
from features.extract import extract
from tests.test_patients import BAG_CONFIG, write_patients

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepapl"


# ----------------------------------------------------------------------------- colour


def _shape_cell(rng, positive: int, cast, size: int = 32) -> np.ndarray:
    """A purple nucleus on a pale background: elongated in positive bags, round in
    negative ones (with noise), the whole image tinted by its bag's ``cast``."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    a = rng.normal(7.5 if positive else 5.5, 0.6)
    b = rng.normal(4.0 if positive else 5.5, 0.6)
    t = rng.uniform(0, np.pi)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    mask = (u / a) ** 2 + (v / b) ** 2 < 1
    img = rng.normal(215, 8, (size, size, 3))
    img[mask] = np.array([120, 60, 150]) + rng.normal(0, 12, (mask.sum(), 3))
    return np.clip(img * np.asarray(cast), 0, 255).astype(np.uint8)


def _bags(rng, n_bags: int, cells: int, cast_of):
    X, bag, y = [], [], []
    for b in range(n_bags):
        pos = b % 2
        cast = cast_of(pos)
        for _ in range(cells):
            X.append(_shape_cell(rng, pos, cast))
            bag.append(b)
            y.append(pos)
    return np.stack(X), np.array(bag), np.array(y)


def _bag_auc(p, bag, y) -> float:
    d = pd.DataFrame({"p": p, "bag": bag, "y": y}).groupby("bag").mean()
    return roc_auc_score(d["y"], d["p"])


@pytest.fixture(scope="module")
def cast_bags():
    """Training bags: the label goes with a per-bag colour cast (a per-channel gain, as a
    camera's white balance or a stain batch gives) and, less clearly, with the nucleus's
    shape; new bags: the cast is reversed, only shape carries the label."""
    rng = np.random.default_rng(0)
    red, blue = (1.08, 0.92, 0.92), (0.92, 0.95, 1.1)
    return (
        _bags(rng, 16, 20, lambda pos: red if pos else blue),
        _bags(rng, 12, 20, lambda pos: blue if pos else red),
    )


def _cast_pipeline(cast_bags, norm: str, jitter: float) -> float:
    (Xtr, btr, ytr), (Xte, bte, yte) = cast_bags
    spec = {"color": {"bins": 8, "spaces": ["rgb"], "moments": True}, "morphology": {}}
    ftr = extract(bag_colour(bag_jitter(Xtr, btr, jitter, 0), btr, norm), spec, progress=False)
    fte = extract(bag_colour(Xte, bte, norm), spec, progress=False)
    rf = RandomForestClassifier(200, random_state=0, n_jobs=1).fit(np.nan_to_num(ftr), ytr)
    return _bag_auc(rf.predict_proba(np.nan_to_num(fte))[:, 1], bte, yte)


def test_the_plain_pipeline_learns_the_cast(cast_bags):
    assert _cast_pipeline(cast_bags, "none", 0.0) < 0.5  # the cast decides, reversed


@pytest.mark.parametrize("norm, jitter", [("rgb", 0.0), ("reinhard", 0.1), ("none", 0.2)])
def test_bag_normalisation_or_jitter_lets_shape_carry_the_label(cast_bags, norm, jitter):
    """Per-bag RGB normalisation undoes a per-channel cast; L*a*b* Reinhard leaves a
    residue a forest still reads, which per-bag jitter in training drowns; jitter alone,
    strong enough, does too."""
    assert _cast_pipeline(cast_bags, norm, jitter) >= 0.8


def test_bag_jitter_is_one_gain_per_bag_and_seeded():
    rng = np.random.default_rng(2)
    X = rng.integers(60, 200, (12, 8, 8, 3), dtype=np.uint8)
    bag = np.repeat([0, 1, 2], 4)
    a, b = bag_jitter(X, bag, 0.1, 5), bag_jitter(X, bag, 0.1, 5)
    assert np.array_equal(a, b) and not np.array_equal(a, bag_jitter(X, bag, 0.1, 6))
    assert np.array_equal(bag_jitter(X, bag, 0.0, 5), X)
    ratio = a.astype(float).mean((1, 2)) / X.astype(float).mean((1, 2))
    for k in range(3):  # the cells of one bag share their cast
        assert np.ptp(ratio[bag == k], axis=0).max() < 0.05


def test_bag_reinhard_maps_each_bag_to_one_target_and_keeps_contrast_within_a_bag():
    rng = np.random.default_rng(1)
    X, bag, _ = _bags(rng, 4, 10, lambda pos: (1.1, 0.9, 0.9) if pos else (0.9, 0.9, 1.1))
    out = bag_reinhard(X, bag)
    assert out.shape == X.shape and out.dtype == np.uint8
    means = np.array([lab_moments(out[bag == b])[0] for b in range(4)])
    raw = np.array([lab_moments(X[bag == b])[0] for b in range(4)])
    assert np.ptp(means[:, 1:], axis=0).max() < 0.25 * np.ptp(raw[:, 1:], axis=0).max()
    # a bag's transform uses its own cells only: one bag alone gives the same pixels
    alone = bag_reinhard(X[bag == 2], bag[bag == 2])
    assert np.array_equal(alone, out[bag == 2])
    assert np.array_equal(bag_colour(X, bag, "none"), X)
    with pytest.raises(ValueError, match="unknown"):
        bag_colour(X, bag, "macenko")


# ----------------------------------------------------------------------------- nested


def test_nested_selection_never_lets_an_outer_folds_bags_choose(monkeypatch):
    """Every score encodes its bag, so the spy reads which bags each choice saw."""
    rng = np.random.default_rng(0)
    n = 40
    y = np.array([i % 3 == 0 for i in range(n)]).astype(int)
    fold = np.arange(n) % 4
    bags = patients_mod.Bags(np.array([f"b{i:02d}" for i in range(n)]), y, 1, PredefinedFolds(fold))
    keys = [f"row{j}" for j in range(5)]
    # bag i's score ends in i / 1e6, so a slice tells which bags it holds
    scores = {
        k: np.clip(rng.uniform(0.1, 0.9, n) + 0.3 * y * j / 5, 0, 0.99).round(4)
        + np.arange(n) / 1e6
        for j, k in enumerate(keys)
    }
    seen = []
    real_row, real_thr = patients_mod.choose_row, patients_mod.choose_threshold

    def bag_ids(v):
        return set(np.round((np.asarray(v) * 1e6) % 100).astype(int))

    def spy_row(sc, yy, kk):
        seen.append(("row", set().union(*(bag_ids(v) for v in sc.values()))))
        return real_row(sc, yy, kk)

    def spy_thr(sc, yy, rule):
        seen.append(("threshold", bag_ids(sc)))
        return real_thr(sc, yy, rule)

    real_band = patients_mod.refer_band

    def spy_band(sc, pos, t, rate):
        seen.append(("band", bag_ids(sc)))
        return real_band(sc, pos, t, rate)

    monkeypatch.setattr(patients_mod, "choose_row", spy_row)
    monkeypatch.setattr(patients_mod, "choose_threshold", spy_thr)
    monkeypatch.setattr(patients_mod, "refer_band", spy_band)
    nested, thr, choices, bands = patients_mod.nested_selection(
        scores, bags, keys, "youden", (0.0, 0.25)
    )
    assert len(choices) == 4 and len(seen) == 16 and set(bands) == {0.0, 0.25}
    lo, hi = bands[0.0]
    assert not ((nested >= lo) & (nested <= hi)).any()  # a zero band refers nobody
    for k, c in enumerate(choices):
        outer = set(np.flatnonzero(fold == k))
        for what, ids in seen[4 * k : 4 * k + 4]:
            assert ids and not ids & outer, what  # no outer bag chose anything
            assert ids == set(range(n)) - outer
        # the fold's scores on the scale of the inner negative bags of its row
        neg = np.sort(scores[c["row"]][(fold != k) & (y == 0)])
        assert np.allclose(
            nested[fold == k], patients_mod._negative_quantile(scores[c["row"]][fold == k], neg)
        )
        assert np.allclose(
            thr[fold == k], patients_mod._negative_quantile(np.array([c["threshold"]]), neg)
        )
        # decisions as the row and threshold chosen without the fold would make them
        assert np.array_equal(
            nested[fold == k] >= thr[fold == k], scores[c["row"]][fold == k] >= c["threshold"]
        )


def test_choose_row_prefers_auc_then_log_loss():
    y = np.array([0, 0, 1, 1])
    scores = {
        "a": np.array([0.1, 0.6, 0.5, 0.9]),
        "b": np.array([0.2, 0.3, 0.6, 0.7]),
        "c": np.array([0.01, 0.02, 0.98, 0.99]),
    }
    assert patients_mod.choose_row(scores, y, ["a", "b", "c"]) == "c"  # AUC 1, lowest loss
    assert patients_mod.choose_row(scores, y, ["a", "b"]) == "b"


@pytest.mark.parametrize("target", [0.5, 0.75, 0.9, 1.0])
def test_sensitivity_threshold_keeps_the_stated_sensitivity(target):
    rng = np.random.default_rng(3)
    s, y = rng.uniform(size=60), (rng.uniform(size=60) < 0.4).astype(int)
    t = choose_threshold(s, y, f"sensitivity:{target}")
    sens = np.mean(s[y == 1] >= t)
    assert sens >= target
    # the highest such cut: one step up loses the sensitivity
    above = np.sort(s[(s > t)])
    if len(above) and target > 0:
        assert np.mean(s[y == 1] >= above[0] + 1e-12) < target or above[0] > s[y == 1].max()


def test_a_bad_threshold_rule_is_one_line(tmp_path):
    root = write_patients(tmp_path / "d", n_patients=8, cells=4)
    p = tmp_path / "c.toml"
    p.write_text(
        BAG_CONFIG.format(root=root).replace(
            "[patients]\n", '[patients]\nthreshold = "sensitivity:1.5"\n'
        )
    )
    with pytest.raises(BenchError, match=r"\[patients\] threshold"):
        load_config(p)


# ----------------------------------------------------------------------------- the run

COHORT_EXTRA = """
[candidates.emb]
type = "transfer_frozen"
params = {{ backbone = "MobileNetV2", alpha = 0.35, weights = "none.h5", weights_missing = "random", input_size = 32, epochs = 2, dense_units = 0 }}

[candidates.rf_shape]
type = "feature_forest"
params = {{ features = "shape", n_estimators = 40 }}

[feature_sets.shape]
hog = {{ orientations = 8, pixels_per_cell = 8, cells_per_block = 1, channel = "gray" }}
"""


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cohort")
    root = write_patients(tmp / "data", n_patients=20, cells=12)
    cfg_text = (
        BAG_CONFIG.format(root=root)
        .replace('cell_types = "', 'disease_cells = ["promyelocyte", "blast"]\ncell_types = "')
        .replace(
            "[patients]\n",
            '[patients]\nbag_colour = "reinhard"\nbag_jitter = 0.1\n'
            'aggregators = ["mean", "trimmed_mean", "top_k_mean", "composition", "attention"]\n'
            'mil_embeddings = "emb"\n'
            'threshold = "sensitivity:0.9"\n',
        )
    )
    p = tmp / "c.toml"
    p.write_text(cfg_text + COHORT_EXTRA.format())
    cfg = load_config(p, out=str(tmp / "run"))
    run_benchmark(cfg, show_progress=False)
    return tmp / "run", root


def test_the_leaderboard_has_shortcut_disease_and_nested_rows(cohort_run):
    run, _ = cohort_run
    board = pd.read_csv(run / "patient_leaderboard.csv")
    nested = board[board["kind"] == "nested"]
    assert len(nested) == 1 and np.isnan(nested["rank"].iloc[0])
    assert (
        0
        <= nested["roc_auc_lo"].iloc[0]
        <= nested["roc_auc"].iloc[0]
        <= nested["roc_auc_hi"].iloc[0]
        <= 1
    )
    disease = board[board["cells"] == "disease"]
    assert len(disease) == 5 * 3 and disease["entry"].str.endswith("[disease cells]").all()
    assert set(board.loc[board["shortcut"], "source"]) == {"rf_color", "rf_color2"}
    meta = json.loads((run / "patients" / "meta.json").read_text())
    carried = meta["carried"]
    row = board[board["entry"] == carried["row"]].iloc[0]
    assert row["cells"] == "all" and not row["shortcut"]  # never a shortcut or restricted row
    assert carried["row"] == meta["nested"]["chosen_on_all_bags"]
    assert {c["fold"] for c in meta["nested"]["choices"]} == {0, 1, 2, 3}
    assert meta["threshold_rule"] == "sensitivity:0.9"
    scores = pd.read_csv(run / "patients" / "scores.csv")
    key = carried["row"]
    # each fold's threshold keeps >= 90 % sensitivity on the other folds' APL patients
    for k in range(4):
        other = scores[(scores["fold"] != k) & (scores["y"] == 1)]
        t = scores.loc[scores["fold"] == k, f"threshold:{key}"].iloc[0]
        assert np.mean(other[f"score:{key}"] >= t) >= 0.9


def test_the_predictor_normalises_each_bag_as_in_training(cohort_run, tmp_path):
    run, root = cohort_run
    pred = load_predictor(run / "predictor")
    assert pred.bag_colour_ == "reinhard"
    manifest = json.loads((run / "predictor" / "manifest.json").read_text())
    assert "nested_roc_auc" in manifest["bags"]["patient_leaderboard"]
    cells = pd.read_csv(root / "cells.csv")
    files = [root / f for f in cells.file[cells.patient == "P00"]]
    X = Preprocessing(24).apply_batch(files)
    # a colour cast over the whole bag is normalised away: nearly the same call
    cast = np.clip(X * np.array([0.9, 0.95, 1.12]), 0, 255).astype(np.uint8)
    a, b = pred.predict_bags({"P00": X, "cast": cast})
    assert abs(a["probability"] - b["probability"]) < 0.1
    # the cells the run trained on are the bag-normalised ones (its images file)
    rd = RunDir(run)
    bag_of_row = pd.read_csv(run / "folds.csv", dtype={"bag": str})["bag"].to_numpy()
    rows = np.flatnonzero(bag_of_row == "P00")
    raw = Preprocessing(24).apply_batch(
        [root / "images" / f for f in rd.folds_table["source"].iloc[rows]]
    )
    assert np.array_equal(np.asarray(rd.images[rows]), bag_reinhard(raw, np.zeros(len(rows))))


def test_a_bag_colour_predictor_is_refused_without_bags(cohort_run, tmp_path, capsys):
    """Its colour is normalised per patient: without --bags, a cell's probabilities would
    depend on the batch it happens to share (issue 40), so predict refuses in one line."""
    from bench.commands.cli import main

    run, root = cohort_run
    cells = pd.read_csv(root / "cells.csv")
    files = [root / f for f in cells.file[cells.patient == "P00"]]
    assert (
        main(
            [
                "predict",
                "--model",
                str(run / "predictor"),
                "--img_path",
                str(files[0].parent),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "normalises colour per patient" in err[0] and "--bags" in err[0]
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            'cell_types = "',
            'disease_cells = ["myeloblast"]\ncell_types = "',
            r"disease_cells: \['myeloblast'\]",
        ),
        (
            "[patients]\n",
            '[patients]\naggregators = ["mean", "attention"]\n',
            r"mil_embeddings .*'tl_mnv2_frozen' is not one of",
        ),
    ],
)
def test_bad_patient_settings_are_refused_before_any_unit(tmp_path, old, new, message):
    root = write_patients(tmp_path / "d", n_patients=12, cells=4)
    p = tmp_path / "c.toml"
    p.write_text(BAG_CONFIG.format(root=root).replace(old, new))
    cfg = load_config(p, out=str(tmp_path / "run"))
    with pytest.raises(BenchError, match=message):
        run_benchmark(cfg, show_progress=False)
    assert not (tmp_path / "run" / "units").exists() or not any(
        (tmp_path / "run" / "units").iterdir()
    )


# ----------------------------------------------------------------------------- pipeline


def _original(rng, size: int = 240) -> np.ndarray:
    """A large 'analyser' image: a granular nucleus on a pale, noisy background."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    mask = (xx / (size * 0.22)) ** 2 + (yy / (size * 0.18)) ** 2 < 1
    img = rng.normal(214, 6, (size, size, 3))
    img[mask] = np.array([130, 70, 160]) + rng.normal(0, 30, (mask.sum(), 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.2)))


def _jpeg(a: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _ways(a: np.ndarray) -> dict:
    small = lambda s, m: np.asarray(Image.fromarray(a).resize((s, s), m))  # noqa: E731
    return {
        "copy96_q90": _jpeg(small(96, Image.BICUBIC), 90),
        "jpeg75": _jpeg(a, 75),
        "jpeg95": _jpeg(a, 95),
        "bilinear128": small(128, Image.BILINEAR),
        "lanczos96_q85": _jpeg(small(96, Image.LANCZOS), 85),
    }


def test_smoothing_keeps_scores_across_the_image_pipeline():
    """Cells re-encoded at JPEG quality 75-95 or resized another way: with ``smooth`` the
    model input hardly moves, and a colour/texture forest's per-bag score moves by at most
    0.05; without it the inputs differ more."""
    rng = np.random.default_rng(0)
    originals = [_original(rng) for _ in range(24)]
    plain, smoothed = Preprocessing(64), Preprocessing(64, smooth=1.0)

    def mad(prep, way):
        return np.mean(
            [
                np.abs(prep.apply(o).astype(float) - prep.apply(_ways(o)[way]).astype(float)).mean()
                for o in originals[:8]
            ]
        )

    for way in ("copy96_q90", "jpeg75", "bilinear128", "lanczos96_q85"):
        assert mad(smoothed, way) < 0.75 * mad(plain, way), way
    # a forest trained on copies (two classes: the nucleus tint), scored on one bag made
    # each way
    spec = {
        "color": {"bins": 16, "spaces": ["rgb", "hsv"], "moments": True},
        "lbp": {"radii": [1, 2], "points": 8},
    }
    train = [_ways(_original(rng))["copy96_q90"] for _ in range(40)]
    y = np.arange(40) % 2
    Xtr = smoothed.apply_batch(
        [np.clip(t * (1 + 0.06 * c), 0, 255).astype(np.uint8) for t, c in zip(train, y)]
    )
    rf = RandomForestClassifier(200, random_state=0).fit(extract(Xtr, spec, progress=False), y)
    bag = originals[8:]

    def score(items):
        return rf.predict_proba(extract(smoothed.apply_batch(items), spec, progress=False))[
            :, 1
        ].mean()

    ref = score(bag)
    for way in ("copy96_q90", "jpeg75", "jpeg95", "bilinear128", "lanczos96_q85"):
        assert abs(score([_ways(o)[way] for o in bag]) - ref) <= 0.05, way


def test_the_smooth_step_is_stored_and_applied_by_preprocessing():
    p = Preprocessing(32, smooth=1.0)
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert "smooth" not in Preprocessing(32).to_dict()  # older records read the same
    a = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    assert np.array_equal(p.apply(a), smooth(Preprocessing(32).apply(a), 1.0))
    # an array at the model's size goes through every step, smooth included, unless it is
    # declared model input (preprocessed=True): its shape decides nothing
    batch = p.apply_batch([a, a])
    at_size = np.stack([Preprocessing(32).apply(a)] * 2)
    assert np.array_equal(p.apply_batch(at_size), np.stack([smooth(x, 1.0) for x in at_size]))
    assert not np.array_equal(p.apply_batch(at_size), at_size)
    assert np.array_equal(p.apply_batch(batch, preprocessed=True), batch)
    with pytest.raises(BenchError, match="preprocessed images must be an"):
        p.apply_batch(a, preprocessed=True)
    with pytest.raises(BenchError, match="smooth"):
        Preprocessing(32, smooth=-1)


@pytest.mark.skipif(
    not (SHARED / "originals_sample" / "originals.csv").is_file(),
    reason="../shared/data/deepapl/originals_sample not here",
)
def test_smoothing_brings_the_analysers_files_close_to_the_shared_copies():
    table = pd.read_csv(SHARED / "originals_sample" / "originals.csv").iloc[::6]
    diffs = {}
    for sigma in (0.0, 1.0):
        prep = Preprocessing(64, smooth=sigma)
        a = prep.apply_batch([SHARED / f for f in table["file"]]).astype(float)
        b = prep.apply_batch([SHARED / f for f in table["copy"]]).astype(float)
        diffs[sigma] = np.abs(a - b).mean()
    assert diffs[1.0] < 0.6 * diffs[0.0]


# ----------------------------------------------------------------------------- MIL


def _mil_bags(rng, n_bags: int, d: int = 24):
    """Bags of 20-40 cell embeddings; a positive bag holds a few cells (10 %) displaced
    along one direction: the label sits in a minority of cells, as APL's promyelocytes."""
    key = np.zeros(d)
    key[3] = 4.0
    bags, y, marks = [], [], []
    for b in range(n_bags):
        n = int(rng.integers(20, 40))
        e = rng.normal(0, 1, (n, d))
        m = np.zeros(n, bool)
        if b % 2:
            m[rng.choice(n, max(2, n // 10), replace=False)] = True
            e[m] += key
        bags.append(e.astype(np.float32))
        y.append(b % 2)
        marks.append(m)
    return bags, np.array(y), marks


def test_attention_mil_learns_from_a_minority_of_cells_and_attends_to_them():
    from ensembles.mil import AttentionMIL

    rng = np.random.default_rng(0)
    train, ytr, _ = _mil_bags(rng, 40)
    test, yte, marks = _mil_bags(rng, 20)
    mil = AttentionMIL(components=16, epochs=150, seed=0).fit(train, ytr)
    s = mil.score(test)
    assert s.shape == (20,) and ((0 <= s) & (s <= 1)).all()
    assert roc_auc_score(yte, s) >= 0.8
    a = mil.attention(test[1])
    assert a.shape == (len(test[1]),) and abs(a.sum() - 1) < 1e-4
    assert a[marks[1]].mean() > 2 * a[~marks[1]].mean()  # the key cells weigh more


def test_a_run_has_an_attention_row(cohort_run):
    run, _ = cohort_run
    board = pd.read_csv(run / "patient_leaderboard.csv")
    row = board[board["aggregator"] == "attention"]
    assert len(row) == 1 and row["kind"].iloc[0] == "mil"
    assert 0 <= row["roc_auc_lo"].iloc[0] <= row["roc_auc"].iloc[0] <= 1
    meta = json.loads((run / "patients" / "meta.json").read_text())
    assert meta["carried"]["aggregator"] != "attention"  # not a row a predictor carries


def test_evaluate_reads_each_patient_as_one_bag_like_predict_bags(cohort_run, tmp_path):
    from bench.commands.evaluate import evaluate

    run, root = cohort_run
    cells = pd.read_csv(root / "cells.csv")
    keep = ["P00", "P01", "P02", "P03"]
    sub = cells[cells.patient.isin(keep)]
    sub.to_csv(root / "cells_sub.csv", index=False)
    # without --groups a per-patient normaliser cannot know the patients: one line
    with pytest.raises(BenchError, match="--groups"):
        evaluate(
            run / "predictor",
            root / "images",
            labels=f"{root / 'cells_sub.csv'}:diagnosis",
            out=tmp_path / "ev0",
            gradcam=False,
            progress=False,
            n_boot=50,
        )
    res = evaluate(
        run / "predictor",
        root / "images",
        labels=f"{root / 'cells_sub.csv'}:diagnosis",
        groups="patient",
        out=tmp_path / "ev",
        gradcam=False,
        progress=False,
        n_boot=50,
    )
    rows = {r["bag"]: r for r in res["patients"]["rows"]}
    pred = load_predictor(run / "predictor")
    for p in keep:
        direct = pred.predict_bags({p: [root / f for f in sub.file[sub.patient == p]]})[0]
        assert direct["probability"] == pytest.approx(rows[p]["probability"], abs=1e-6)
