"""The leakage audit: grouped against image-level folds on a set that leaks by patient."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.config import load_config
from bench.protocols.leakage import audit_config, compare
from bench.run.runner import run_from_args
from core.io import read_json
from tests.conftest import write_tiny_config

CLASSES = ["a", "b", "c"]
CONFIG = """
[run]
seed = 0
folds = 3
profile = "tiny"

[data]
path = "{data}"
image_size = 16
groups = "{groups}"

[feature_sets.colour]
color = {{ bins = 8 }}

[candidates.rf_colour]
type = "feature_forest"
params = {{ features = "colour", n_estimators = 40 }}

[candidates.rf_small]
type = "feature_forest"
params = {{ features = "colour", n_estimators = 10, max_depth = 4 }}

[ensembles.vote_all]
type = "soft_voting"
members = "all"

[report]
gradcam = false
leakage_audit = true

[profiles.tiny]
description = "tests"
"""
SKIP = """
[report]
enabled = false
leakage_audit = true
"""


def _patients(root, per_class: int = 5, per_patient: int = 6, size: int = 16):
    """Each patient's cells share one class and a patient-specific tint (the shortcut),
    random with respect to the class: only a model that saw the patient can use it."""
    rng = np.random.default_rng(3)
    rows = []
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for p in range(per_class):
            patient = f"{name}{p}"
            tint = rng.uniform(40, 230, 3)
            for i in range(per_patient):
                img = np.clip(tint + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
                f = f"{name}/{patient}_{i}.png"
                Image.fromarray(img).save(root / "images" / f)
                rows.append((f, patient))
    groups = root / "patients.csv"
    with open(groups, "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "patient"), *rows])
    return root / "images", groups


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    base = tmp_path_factory.mktemp("leak")
    data, groups = _patients(base)
    cfg = base / "bench.toml"
    cfg.write_text(CONFIG.format(data=data, groups=groups))
    out = base / "out"
    board, _ = run_from_args(str(cfg), out=str(out), show_progress=False)
    return cfg, out, groups


def test_audit_writes_the_comparison_and_image_level_scores_are_inflated(audited):
    _, out, _ = audited
    table = pd.read_csv(out / "leakage.csv")
    assert set(table["candidate"]) == {"rf_colour", "rf_small", "vote_all"}
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        for col in (
            f"grouped_{m}",
            f"grouped_{m}_std",
            f"image_level_{m}",
            f"image_level_{m}_std",
            f"inflation_{m}",
        ):
            assert col in table, col
        assert np.allclose(
            table[f"inflation_{m}"], table[f"image_level_{m}"] - table[f"grouped_{m}"]
        )
    assert (table["image_level_accuracy"] > table["grouped_accuracy"]).all(), table
    assert table["inflation_accuracy"].min() > 0.2, table  # the tint gives patients away
    assert list(table["grouped_accuracy"]) == sorted(table["grouped_accuracy"], reverse=True)
    board = pd.read_csv(out / "leaderboard.csv").set_index("candidate")
    assert np.allclose(
        table.set_index("candidate")["grouped_accuracy"], board.loc[table["candidate"], "accuracy"]
    )
    manifest = read_json(out / "manifest.json")
    assert "leakage_audit" in manifest["stage_seconds"]
    assert manifest["leakage_audit"]["groups"] == 15
    assert manifest["leakage_audit"]["groups_split"] > 0


def test_grouped_folds_keep_patients_together_image_level_folds_split_them(audited):
    _, out, groups = audited
    patient = dict(pd.read_csv(groups).values)
    grouped = pd.read_csv(out / "folds.csv")
    image = pd.read_csv(out / "leakage" / "folds.csv")
    assert list(grouped["source"]) == list(image["source"])
    per_grouped = grouped.assign(p=grouped["source"].map(patient)).groupby("p")["fold"].nunique()
    per_image = image.assign(p=image["source"].map(patient)).groupby("p")["fold"].nunique()
    assert (per_grouped == 1).all()
    assert (per_image > 1).sum() >= 5
    state = read_json(out / "leakage" / "state.json")
    assert state["fingerprint"]["folds"] != read_json(out / "state.json")["fingerprint"]["folds"]


def test_no_recursion_no_nested_report_and_the_report_shows_the_section(audited):
    _, out, _ = audited
    nested = out / "leakage"
    assert (nested / "leaderboard.csv").is_file()
    assert not (nested / "leakage").exists() and not (nested / "leakage.csv").exists()
    assert not (nested / "report").exists()
    html = (out / "report" / "index.html").read_text()
    assert 'id="leakage"' in html and "Leakage audit" in html and "image-level" in html
    assert "[data] groups (15 groups from patients.csv)" in html
    assert (out / "report" / "img" / "leakage.png").is_file()
    assert (out / "report" / "csv" / "leakage.csv").is_file()
    assert "## Leakage audit" in (out / "report" / "leaderboard.md").read_text()


def test_second_run_resumes_both_runs(audited, monkeypatch):
    cfg, out, _ = audited
    import bench.run.runner as runner

    monkeypatch.setattr(runner, "run_unit", lambda *a: pytest.fail(f"recomputed {a}"))
    before = pd.read_csv(out / "leakage.csv")
    run_from_args(str(cfg), out=str(out), show_progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "leakage.csv"), before)


def test_audit_is_skipped_without_groups(tmp_path, toy_folder):
    cfg = write_tiny_config(tmp_path / "bench.toml", toy_folder, SKIP)
    out = tmp_path / "out"
    run_from_args(str(cfg), out=str(out), only=["rf_hog"], show_progress=False)
    assert (out / "leaderboard.csv").is_file()
    assert not (out / "leakage").exists() and not (out / "leakage.csv").exists()
    assert "leakage_audit" not in read_json(out / "manifest.json")


def test_audit_config_removes_grouping_only(audited, tmp_path):
    cfg_file, out, _ = audited
    cfg = load_config(str(cfg_file), out=str(out))
    audit = audit_config(cfg, out / "leakage")
    assert audit.data.groups == "" and cfg.data.groups  # the original unchanged
    assert audit.run.out == str(out / "leakage")
    assert audit.report.enabled is False and audit.report.leakage_audit is False
    assert audit.external == {} and audit.tuning.storage == ""
    for key in ("candidates", "ensembles", "feature_sets"):
        assert audit.to_dict()[key] == cfg.to_dict()[key]
    assert audit.run.seed == cfg.run.seed and audit.run.folds == 3
    assert audit_config(cfg.derive(data={"groups": ""}), tmp_path) is None


def test_compare_sorts_by_the_grouped_metric():
    g = pd.DataFrame(
        {
            "candidate": ["x", "y"],
            "kind": ["baseline", "cnn"],
            "accuracy": [0.6, 0.7],
            "accuracy_std": [0.01, 0.02],
            "log_loss": [0.9, 0.8],
            "log_loss_std": [0.1, 0.1],
        }
    )
    i = pd.DataFrame(
        {
            "candidate": ["y", "x"],
            "kind": ["cnn", "baseline"],
            "accuracy": [0.75, 0.9],
            "accuracy_std": [0.0, 0.0],
            "log_loss": [0.5, 0.3],
            "log_loss_std": [0.1, 0.1],
        }
    )
    t = compare(g, i, "accuracy")
    assert list(t["candidate"]) == ["y", "x"]
    assert np.allclose(t["inflation_accuracy"], [0.05, 0.3])
    t = compare(g, i, "log_loss")  # lower is better: ascending
    assert list(t["candidate"]) == ["y", "x"] and "inflation_log_loss" in t
