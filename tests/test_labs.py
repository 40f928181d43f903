"""Several labs in one dataset and leave-one-lab-out (bench.data.sources, bench.protocols.labs).

A tiny synthetic three-lab set: lab ``a`` plain, lab ``b`` colour-shifted, lab ``c`` without
the stripes class and with its own class names (mapped by ``class_map``) and slides as
groups. Every image carries its lab in a corner pixel, so a spy on the fits sees which
labs' rows reach them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.protocols.labs import add_lab_columns, lab_scores
from core.errors import BenchError
from tests.conftest import SHARED, TOY_CLASSES, toy_arrays

MARK = {"a": 11, "b": 22, "c": 33}  # corner pixel (channel 0) of each lab's images
N = 10  # images per class and lab


def _lab_images(lab: str, seed: int, n_classes: int = 3):
    images, labels = toy_arrays(N, 32, seed, n_classes)
    if lab == "b":  # another stain: a yellow cast
        images = np.clip(images.astype(int) + np.array([25, 20, -40]), 0, 255).astype(np.uint8)
    images[:, 0, 0, 0] = MARK[lab]
    return images, labels


def write_labs(root):
    for lab, seed in (("a", 1), ("b", 2)):
        images, labels = _lab_images(lab, seed)
        np.savez_compressed(
            root / f"{lab}.npz", images=images, labels=labels, classes=np.array(TOY_CLASSES)
        )
    images, labels = _lab_images("c", 3, n_classes=2)
    names = ["round", "box"]
    rows = []
    for i, (im, c) in enumerate(zip(images, labels)):
        d = root / "c" / names[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{names[c]}_{i:03d}.png")
        rows.append({"file": f"{names[c]}/{names[c]}_{i:03d}.png", "slide": f"s{i % 5}"})
    pd.DataFrame(rows).to_csv(root / "c" / "cells.csv", index=False)
    return root


CONFIG = """
[run]
seed = 0
folds = 3
profile = "tiny"
{run_extra}

[data]
image_size = 32
classes = ["disc", "square", "stripes"]

[[data.sources]]
domain = "a"
path = "{root}/a.npz"

[[data.sources]]
domain = "b"
path = "{root}/b.npz"

[[data.sources]]
domain = "c"
path = "{root}/c"
groups = "{root}/c/cells.csv:slide"
class_map = {{ round = "disc", box = "square" }}
{source_extra}

[tuning]
trials = 1
max_samples = 0

[feature_sets.hog]
hog = {{ orientations = 8, pixels_per_cell = 8, cells_per_block = 2 }}

[candidates.rf_hog]
type = "feature_forest"
params = {{ features = "hog", n_estimators = 30 }}

[candidates.cnn_tiny]
type = "scratch_cnn"
lab_balance = true
tuning = {{ trials = 0 }}
params = {{ blocks = 1, filters = 4, dense_units = 8, epochs = 3, patience = 3, batch_size = 16 }}

[ensembles.vote_all]
type = "soft_voting"
members = "all"
weights = "optimized"

[report]
enabled = false

[profiles.tiny]
description = "tests"
"""


def write_config(path, root, run_extra="lab_adabn = true", source_extra=""):
    path.write_text(CONFIG.format(root=root, run_extra=run_extra, source_extra=source_extra))
    return path


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """A run on the three labs with spies on every fit, tuning trial and ensemble fit."""
    import bench.run.units as units
    import ensembles.voting as voting

    base = tmp_path_factory.mktemp("labs")
    root = write_labs(base)
    cfg = write_config(base / "bench.toml", root)
    seen = {"fit": [], "tune": [], "ens": [], "counts": []}
    fit, tune, ens_fit = units.fit_candidate, units.tune_candidate, voting.SoftVoting.fit

    def spy_fit(cand, X, y, **kw):
        marks = np.asarray(X)[:, 0, 0, 0]
        seen["fit"].append(set(marks.tolist()))
        seen["counts"].append((type(cand).__name__, pd.Series(marks).value_counts().to_dict()))
        return fit(cand, X, y, **kw)

    def spy_tune(entry, X, y, *a, **kw):
        seen["tune"].append(set(np.asarray(X)[:, 0, 0, 0].tolist()))
        return tune(entry, X, y, *a, **kw)

    def spy_ens(self, probas, y, *a, **kw):
        seen["ens"].append(len(y))
        return ens_fit(self, probas, y, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(units, "fit_candidate", spy_fit)
    mp.setattr(units, "tune_candidate", spy_tune)
    mp.setattr(voting.SoftVoting, "fit", spy_ens)
    from bench.run.runner import run_from_args

    board, out = run_from_args(str(cfg), out=str(base / "run"), workers=1, show_progress=False)
    mp.undo()
    return board, out, seen


def test_folds_carry_the_lab_and_every_lab_is_loaded(lab_run):
    _, out, _ = lab_run
    table = pd.read_csv(out / "folds.csv")
    assert table["domain"].value_counts().to_dict() == {"a": 3 * N, "b": 3 * N, "c": 2 * N}
    # lab c's classes mapped onto the shared names; it has no stripes
    assert set(table.label[table.domain == "c"]) == {"disc", "square"}
    # pooled folds hold every lab; slides of lab c never split
    assert all(table.groupby("fold")["domain"].nunique() == 3)
    c = table[table.domain == "c"]
    slides = c["source"].str.extract(r"_(\d+)\.png")[0].astype(int) % 5
    assert (c.groupby(slides.to_numpy())["fold"].nunique() == 1).all()
    labs = pd.read_csv(out / "labs" / "folds.csv")
    assert labs.groupby("domain")["fold"].nunique().eq(1).all()
    assert labs.groupby("fold")["domain"].nunique().eq(1).all()


def test_no_row_of_the_held_out_lab_reaches_a_fit_a_trial_or_a_weight(lab_run):
    _, out, seen = lab_run
    labs = pd.read_csv(out / "labs" / "folds.csv")
    # the leave-one-lab-out units come after the pooled ones: 2 candidates x 3 folds, then
    # 2 candidates x 3 held-out labs (the CNN's early-stopping rows are drawn inside its fit);
    # the forest alone is tuned (3 pooled studies, then 3 held-out labs)
    lolo_fits, lolo_trials = seen["fit"][6:], seen["tune"][3:]
    assert len(lolo_fits) == 6 and len(lolo_trials) == 3
    for marks in lolo_fits + lolo_trials:
        assert len(marks) == 2  # two labs' rows, never the third
    # the CNN draws each lab to the mean lab size (lab_balance); the forest takes every row
    for kind, counts in seen["counts"]:
        if kind == "ScratchCNN":
            assert max(counts.values()) - min(counts.values()) <= 1, counts
        elif MARK["c"] in counts and len(counts) > 1:  # lab c is smaller: rows as they come
            assert counts[MARK["c"]] < max(counts.values()), counts
    assert {frozenset(m) for m in lolo_fits} == {
        frozenset(v for k, v in MARK.items() if k != h) for h in MARK
    }
    # the ensemble's weights for each held-out lab: fitted on the other labs' rows only
    sizes = labs["domain"].value_counts()
    n = len(labs)
    assert {n - int(sizes[lab]) for lab in MARK} <= set(seen["ens"])


def test_leaderboard_has_per_lab_worst_and_mean_columns_over_present_classes(lab_run):
    board, out, _ = lab_run
    for col in (
        "a_balanced_accuracy",
        "b_balanced_accuracy",
        "c_balanced_accuracy",
        "worst_lab_balanced_accuracy",
        "mean_lab_balanced_accuracy",
        "lab_gap_balanced_accuracy",
        "c_macro_f1_lo",
        "worst_lab",
    ):
        assert col in board, col
    labs = pd.read_csv(out / "labs" / "folds.csv")
    oof = np.load(out / "labs" / "oof" / "rf_hog.npy")
    c = (labs.domain == "c").to_numpy()
    y = labs.label.map({n: i for i, n in enumerate(TOY_CLASSES)}).to_numpy()
    pred = oof[c].argmax(1)
    recalls = [np.mean(pred[y[c] == k] == k) for k in (0, 1)]  # lab c has 2 classes
    row = board[board.candidate == "rf_hog"].iloc[0]
    assert row["c_balanced_accuracy"] == pytest.approx(np.mean(recalls))
    per_lab = [row[f"{lab}_balanced_accuracy"] for lab in MARK]
    assert row["worst_lab_balanced_accuracy"] == pytest.approx(min(per_lab))
    assert row["mean_lab_balanced_accuracy"] == pytest.approx(np.mean(per_lab))
    assert (
        row["c_balanced_accuracy_lo"] <= row["c_balanced_accuracy"] <= row["c_balanced_accuracy_hi"]
    )
    long = pd.read_csv(out / "labs.csv")
    assert set(long["lab"]) == set(MARK)
    assert set(long["entry"]) == {"rf_hog", "cnn_tiny", "vote_all"}
    assert long[long.lab == "c"]["classes_present"].iloc[0] == "disc;square"


def test_adabn_is_its_own_column_for_adaptable_candidates_only(lab_run):
    board, out, _ = lab_run
    long = pd.read_csv(out / "labs.csv")
    cnn = long[long.entry == "cnn_tiny"]
    assert cnn["adabn_balanced_accuracy"].between(0, 1).all() and len(cnn) == 3
    assert long[long.entry == "rf_hog"]["adabn_balanced_accuracy"].isna().all()
    row = board.set_index("candidate").loc["cnn_tiny"]
    assert row["adabn_worst_lab_balanced_accuracy"] == pytest.approx(
        min(row[f"adabn_{lab}_balanced_accuracy"] for lab in MARK)
    )
    # the ranking is the out-of-lab figure without adaptation
    assert "adabn" not in board.columns[board.columns.get_loc("worst_lab")]


def test_the_predictor_carries_the_out_of_lab_figures(lab_run):
    import json

    _, out, _ = lab_run
    m = json.loads((out / "predictor" / "manifest.json").read_text())
    labs = m["leave_one_lab_out"]
    assert set(labs["labs"]) == set(MARK)
    v = labs["labs"]["c"]["balanced_accuracy"]
    assert 0 <= v["ci"][0] <= v["value"] <= v["ci"][1] <= 1
    assert "Leave-one-lab-out" in (out / "predictor" / "MODEL_CARD.md").read_text()


def test_a_second_run_resumes_to_the_same_leaderboard(lab_run, tmp_path):
    import shutil
    from bench.run.runner import run_from_args

    board, out, _ = lab_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "labs" / "units" / "rf_hog" / "fold1")  # a unit lost to a crash
    (copy / "leaderboard.csv").unlink()
    again, _ = run_from_args(
        str(out.parent / "bench.toml"), out=str(copy), workers=1, show_progress=False
    )
    cols = [
        "candidate",
        "balanced_accuracy",
        "a_balanced_accuracy",
        "b_balanced_accuracy",
        "c_balanced_accuracy",
        "worst_lab_balanced_accuracy",
    ]
    pd.testing.assert_frame_equal(
        board[cols].reset_index(drop=True), again[cols].reset_index(drop=True)
    )


def test_ranking_by_the_worst_lab_orders_the_board():
    scores = pd.DataFrame(
        [
            {
                "entry": e,
                "lab": lab,
                "n": 10,
                "n_groups": 5,
                "classes_present": "x",
                **{
                    f"{m}{s}": v
                    for m in ("accuracy", "balanced_accuracy", "macro_f1")
                    for s in ("", "_lo", "_hi")
                },
            }
            for e, vals in (("steady", {"a": 0.8, "b": 0.8}), ("peaky", {"a": 0.99, "b": 0.5}))
            for lab, v in vals.items()
        ]
    )
    board = pd.DataFrame(
        {
            "candidate": ["peaky", "steady"],
            "kind": ["cnn", "cnn"],
            "accuracy": [0.99, 0.9],
            "balanced_accuracy": [0.99, 0.9],
            "macro_f1": [0.99, 0.9],
        }
    )
    out = add_lab_columns(board, scores, "worst_lab_balanced_accuracy")
    assert list(out.candidate) == ["steady", "peaky"]
    assert list(out.worst_lab) == ["a", "b"]
    assert out.lab_gap_balanced_accuracy.tolist() == pytest.approx([0.1, 0.99 - 0.745])
    assert list(add_lab_columns(board, scores, "balanced_accuracy").candidate) == [
        "peaky",
        "steady",
    ]


def test_lab_scores_bootstrap_over_the_labs_groups():
    table = pd.DataFrame(
        {
            "domain": ["a"] * 6 + ["b"] * 4,
            "label": ["x", "y"] * 5,
            "group": [0, 0, 1, 1, 2, 2, 3, 4, 5, 6],
        }
    )
    proba = np.tile([[0.9, 0.1]], (10, 1))
    s = lab_scores(table, ["x", "y"], {"e": proba}, n_boot=200)
    a = s[s.lab == "a"].iloc[0]
    assert a["n"] == 6 and a["n_groups"] == 3
    assert a["accuracy"] == pytest.approx(0.5) and a["balanced_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "change, message",
    [
        (("", 'class_map = { round = "disc", box = "cube" }'), "maps onto 'cube'"),
        (("", 'class_map = { circle = "disc" }'), "names 'circle', which is not a class"),
        (("", 'class_map = { round = "disc", box = "" }'), "has 1 class(es)"),
    ],
)
def test_bad_source_settings_are_one_line_errors(tmp_path, capsys, change, message):
    from bench.commands.cli import main

    root = write_labs(tmp_path)
    text = CONFIG.format(root=root, run_extra="", source_extra="")
    text = text.replace('class_map = { round = "disc", box = "square" }', change[1])
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "o" / "units").exists()


def test_two_sources_with_one_lab_name_and_a_missing_path_are_refused(tmp_path, capsys):
    from bench.commands.cli import main

    root = write_labs(tmp_path)
    for old, new, message in (
        ('domain = "b"', 'domain = "a"', "used by two sources"),
        (f'path = "{root}/b.npz"', f'path = "{root}/nowhere.npz"', "(b) path not found"),
    ):
        cfg = tmp_path / "c.toml"
        cfg.write_text(CONFIG.format(root=root, run_extra="", source_extra="").replace(old, new))
        assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()


def test_lab_rankings_need_several_labs(tmp_path):
    from bench.config import resolve_config

    raw = {"run": {"metric": "worst_lab_balanced_accuracy", "profile": "p"}, "profiles": {"p": {}}}
    with pytest.raises(BenchError, match="needs a dataset of several labs"):
        resolve_config(raw)


def test_lab_balanced_rows_draw_every_lab_to_the_mean_lab_size():
    from bench.data.sources import lab_balanced_rows

    domains = np.array(["a"] * 60 + ["b"] * 30 + ["c"] * 6)
    rows = np.arange(90, 96).tolist() + np.arange(0, 60).tolist() + np.arange(60, 90).tolist()
    out = lab_balanced_rows(np.array(sorted(rows)), domains, seed=0)
    counts = pd.Series(domains[out]).value_counts().to_dict()
    assert counts == {"a": 32, "b": 32, "c": 32}
    assert len(np.unique(out[domains[out] == "a"])) == 32  # subsampled, no repeats
    assert set(out[domains[out] == "c"]) == set(range(90, 96))  # every small-lab row kept
    np.testing.assert_array_equal(out, lab_balanced_rows(np.array(sorted(rows)), domains, 0))
    one = np.arange(60)
    np.testing.assert_array_equal(lab_balanced_rows(one, domains, 0), one)


@pytest.mark.skipif(
    not (SHARED / "data" / "chula" / "cells.csv").is_file()
    or not (SHARED / "data" / "deepapl" / "cells.csv").is_file()
    or not (SHARED / "data" / "pbc" / "pbc_64.npz").is_file(),
    reason=f"shared PBC, DeepAPL and Chula data not found under {SHARED / 'data'}",
)
def test_the_shared_three_labs_load_as_wbc5_multi():
    """benchmarks.toml's wbc5_multi on the real labs (the smoke profile's 800-image sample):
    three labs, the five white-cell classes in each, patients and slides as groups."""
    from pathlib import Path

    from bench.config import load_config
    from bench.data.folds import make_folds, make_groups
    from bench.data.sources import prepare_data

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "benchmarks.toml", profile="smoke", data="wbc5_multi")
    ds, _ = prepare_data(cfg, show_progress=False)
    labs = ds.lab_summary()
    assert list(labs) == ["pbc", "deepapl", "chula"]
    assert all(abs(v["n_images"] - 800 // 3) <= 1 for v in labs.values())
    assert all(min(v["counts"].values()) >= 2 for v in labs.values())  # every class, every lab
    keys = pd.Series(ds.group_keys)
    assert keys[keys.str.startswith("chula:")].nunique() <= 20  # slides
    assert keys[keys.str.startswith("deepapl:")].nunique() <= 82  # patients
    assert any("erythroblast" in s["path"] for s in ds.skipped)  # left out, said
    groups, _ = make_groups(ds, preset=ds.group_keys)
    folds = make_folds(ds.labels, groups, 3, 0, ds.classes, ds.domains)
    table = pd.DataFrame({"lab": ds.domains, "fold": folds})
    assert table.groupby("fold")["lab"].nunique().eq(3).all()


def test_the_adaptation_curve_fits_on_the_adapted_half_and_scores_the_other():
    """Each draw fits a lab head on labelled cells of the lab's adapted half only,
    standardised on that half (a feature column holds each row's index, so the rows of
    each fit are known), scores the other half; a lab whose answers lean one way gains from
    its own labels, and one whose answers say nothing gains from the cells' features."""
    from bench.protocols import labs as labs_mod
    from core import labhead

    rng = np.random.default_rng(0)
    n = 900
    lab = np.repeat(["a", "b", "c"], n // 3)
    y = rng.integers(0, 3, n)
    logits = np.eye(3)[y] * 2.0 + rng.normal(0, 0.8, (n, 3))
    logits[lab == "b", 0] += 2.5  # lab b leans to class 0: labels can undo it
    logits[lab == "c"] = rng.normal(0, 0.8, (n // 3, 3))  # lab c: the output is lost
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    feats = rng.normal(size=(n, 6))
    feats[lab == "c", :3] += 2.5 * np.eye(3)[y[lab == "c"]]  # ... but its cells are legible
    feats[:, 5] = np.arange(n)  # the row's index
    table = pd.DataFrame(
        {
            "domain": lab,
            "label": [f"c{v}" for v in y],
            "group": [f"g{i // 3}" for i in range(n)],  # groups of 3 images
        }
    )
    fits = []
    real = labhead.fit

    class Spy:
        @staticmethod
        def fit(p, x, yy, reference=None, seed=0, groups=None):
            rows = x[:, 5].astype(int)
            assert list(groups) == list(table["group"].to_numpy()[rows])  # slides known
            fits.append((set(rows), set(reference[:, 5].astype(int))))
            return real(p, x, yy, reference=reference, seed=seed, groups=groups)

    mp = pytest.MonkeyPatch()
    mp.setattr(labs_mod, "labhead", Spy)
    try:
        curve = labs_mod.adaptation_curve(
            table,
            ["c0", "c1", "c2"],
            {"m": proba},
            [25, 100, 400],
            3,
            seed=0,
            features=feats,
            sets=("mondrian", 0.9, 0.01, 1),
            n_jobs=1,  # in this process, where the spy is
        )
    finally:
        mp.undo()
    assert len(fits) == 3 * 3 * 2  # labs x draws x the N that fit in a half (not 400)
    for drawn, used in fits:
        assert len({lab[i] for i in used}) == 1 and len(drawn) in (25, 100)
        assert drawn <= used and len(used) <= n // 6  # the adapted half, never the scored one
    by = curve.set_index("lab")
    b, c = by.loc["b"], by.loc["c"]
    assert np.isnan(b["n400_balanced_accuracy"])
    assert b["n100_balanced_accuracy"] > b["n0_balanced_accuracy"] + 0.05
    assert (
        b["n100_balanced_accuracy_lo"]
        <= b["n100_balanced_accuracy"]
        <= b["n100_balanced_accuracy_hi"]
    )
    assert c["n0_balanced_accuracy"] < 0.45 and c["n100_balanced_accuracy"] > 0.7
    assert c["n100_head_share"] == 1.0
    # sets calibrated on the head's cross-fitted outputs of the N cells cover the rest
    for row in (b, c):
        assert 0.8 <= row["n100_coverage"] <= 1.0 and 0.75 <= row["n25_coverage"] <= 1.0
    assert np.isnan(b["n400_coverage"])
    # the scored half of each draw never holds a row a fit of that draw saw, nor its group
    for d in range(3):
        rows = np.flatnonzero(lab == "a")
        used, scored = labs_mod.adaptation_rows(
            len(rows), table["group"].to_numpy()[rows], len(rows), d
        )
        groups = table["group"].to_numpy()[rows]
        assert not set(groups[used]) & set(groups[scored])
        assert fits[2 * d][0] <= fits[2 * d][1] == set(rows[used])


def test_the_curve_is_on_the_board_and_the_card(lab_run):
    board, out, _ = lab_run
    lb = pd.read_csv(out / "leaderboard.csv")
    for lab in MARK:
        assert f"{lab}_n0_balanced_accuracy" in lb and f"{lab}_n25_balanced_accuracy" in lb
    assert "worst_lab_n25_balanced_accuracy" in lb
    m = (out / "predictor" / "MODEL_CARD.md").read_text()
    assert "Adaptation curve" in m
