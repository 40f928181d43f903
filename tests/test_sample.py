"""The blood-cell sample shipped with bloodbench, the smoke profile that reads it, and a
run that still works without ../shared: missing transfer weights, missing external sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.config import load_config, package_file
from core.errors import BenchError
from tests.conftest import toy_arrays, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "bench" / "sample" / "pbc_sample_64.npz"
SAMPLE_REF = "bloodbench:sample/pbc_sample_64.npz"
PBC_CLASSES = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]
MAX_BYTES = 5_000_000  # the sample ships in the package: a few MB at most


def test_the_packaged_sample_is_a_small_stratified_set_of_real_cells():
    assert SAMPLE.is_file() and SAMPLE.stat().st_size < MAX_BYTES
    with np.load(SAMPLE) as z:
        assert sorted(z.files) == ["classes", "files", "images", "labels"]
        images, labels, classes, files = (z[k] for k in ("images", "labels", "classes", "files"))
    assert images.dtype == np.uint8 and images.shape == (512, 64, 64, 3)
    assert list(classes) == PBC_CLASSES
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [64] * 8
    assert len(set(files)) == 512
    assert all(str(f).split("/")[0] == PBC_CLASSES[c] for f, c in zip(files, labels))
    assert "monocyte/MO_415531.jpg" not in set(files)  # never both of the near-duplicate pair
    assert images.std() > 10  # real pictures, not a constant
    source = (SAMPLE.parent / "SOURCE.md").read_text()
    assert "CC BY 4.0" in source and "10.1016/j.dib.2020.105474" in source


def test_bloodbench_prefix_names_a_file_of_the_package_from_any_config(tmp_path):
    assert package_file(SAMPLE_REF) == str(SAMPLE)
    assert package_file("data/x.npz") == "data/x.npz"
    cfg_file = tmp_path / "elsewhere" / "mine.toml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        f'[data]\npath = "{SAMPLE_REF}"\n[datasets.s]\npath = "{SAMPLE_REF}"\n'
        '[candidates.a]\ntype = "feature_forest"\n'
        "params = { n_estimators = 5, features = { hog = {} } }\n"
        "[profiles.p]\n"
    )
    cfg = load_config(cfg_file, profile="p")
    assert cfg.path(cfg.data.path) == str(SAMPLE)
    # a path on the command line that is the sample counts as that named dataset
    assert load_config(cfg_file, profile="p", data=str(SAMPLE)).data.same_as == ["s"]


def test_smoke_reads_the_sample_without_data_and_data_overrides_it(tmp_path):
    from bench.data.datasets import prepare_dataset, resolve_data_path

    # a clone with no ../shared: the config alone in a folder of its own
    shutil.copy(ROOT / "benchmarks.toml", tmp_path / "benchmarks.toml")
    cfg = load_config(tmp_path / "benchmarks.toml", profile="smoke")
    assert cfg.data.path == SAMPLE_REF
    assert resolve_data_path(cfg) == (SAMPLE, None)  # no fallback download
    ds, path = prepare_dataset(cfg, show_progress=False)
    assert path == SAMPLE and len(ds) == 512 and ds.classes == PBC_CLASSES
    assert (
        load_config(tmp_path / "benchmarks.toml", profile="smoke", data="pbc_sample").data.path
        == SAMPLE_REF
    )
    # --data replaces it: a named dataset, or a path
    named = load_config(ROOT / "benchmarks.toml", profile="smoke", data="pbc")
    assert named.data.path == "../shared/data/pbc/pbc_64.npz"
    assert named.data.max_images == 800
    other = load_config(ROOT / "benchmarks.toml", profile="smoke", data=str(tmp_path / "x"))
    assert other.data.path == str(tmp_path / "x")


def test_smoke_runs_two_cnns_a_baseline_and_multi_member_ensembles():
    from core import registry

    cfg = load_config(ROOT / "benchmarks.toml", profile="smoke")
    kinds = {n: registry.get(e.type).kind for n, e in cfg.candidates.items()}
    assert sum(k == "cnn" for k in kinds.values()) >= 2 and "baseline" in kinds.values()
    assert cfg.candidates["tl_mnv2_finetune"].params["weights_missing"] == "random"
    assert {"soft_vote", "soft_vote_opt", "stack", "stack_all"} <= set(cfg.ensembles)
    assert cfg.run.workers == 2


# ----------------------------------------------------------------------------- weights


@pytest.fixture
def no_warned(monkeypatch):
    from cnn.weights import WARNED_ENV

    monkeypatch.setenv(WARNED_ENV, "")  # undone after the test: nothing leaks


def test_missing_weights_with_random_train_and_warn_once(tmp_path, capsys, no_warned):
    from core.candidate import load_candidate
    from cnn.transfer import FineTuneTransferCNN

    missing = tmp_path / "gone" / "mnv2_missing.weights.h5"
    X, y = toy_arrays(6, 32, seed=3)
    cand = FineTuneTransferCNN(
        weights=str(missing),
        weights_missing="random",
        alpha=0.35,
        input_size=32,
        dense_units=0,
        dropout=0.0,
        head_epochs=1,
        unfreeze_blocks=0,
        epochs=0,
        batch_size=16,
        seed=0,
    )
    cand.prepare(X)  # the run's check before the work units
    cand.fit(X, y)
    assert cand.predict_proba(X).shape == (len(X), 3)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "mnv2_missing.weights.h5" in err.replace("\n", "")
    assert cand.backbone_weights_ == {
        "weights": str(missing),
        "missing_file": str(missing),
        "initialised": "random",
    }
    cand.save(tmp_path / "model")
    assert load_candidate(tmp_path / "model").backbone_weights_["initialised"] == "random"
    notes = cand.fit_notes()  # recorded with the work unit; a report warning
    assert len(notes) == 1 and "random weights" in notes[0] and str(missing) in notes[0]


def test_missing_weights_by_default_stop_the_run_before_training(
    tmp_path, toy_folder, capsys, monkeypatch, no_warned
):
    import cnn.transfer
    from bench.commands.cli import main
    from cnn.transfer import FineTuneTransferCNN

    def no_training(*a, **k):
        raise AssertionError("trained despite a missing weights file")

    monkeypatch.setattr(cnn.transfer, "fit_keras", no_training)
    missing = tmp_path / "mnv2_missing.weights.h5"
    X, y = toy_arrays(3, 32)
    with pytest.raises(BenchError, match=r"weights file not found: .*mnv2_missing\.weights\.h5"):
        FineTuneTransferCNN(weights=str(missing), alpha=0.35, input_size=32).fit(X, y)
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        extra=(
            '[candidates.tl]\ntype = "transfer_finetune"\n'
            f'params = {{ weights = "{missing}", alpha = 0.35, input_size = 32 }}\n'
        ),
    )
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--out", str(out), "--only", "tl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: backbone MobileNetV2: weights file not found:")
        and "mnv2_missing.weights.h5" in err[0]
    )
    assert not (out / "units").exists()  # stopped before any work unit


def test_weights_missing_is_checked_by_the_config(tmp_path, toy_folder):
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        extra=(
            '[candidates.tl]\ntype = "transfer_frozen"\n'
            'params = { weights = "x.h5", weights_missing = "download" }\n'
        ),
    )
    with pytest.raises(BenchError, match=r"weights_missing: expected one of \['error', 'random'\]"):
        load_config(cfg)


# ----------------------------------------------------------------------------- external


def test_a_missing_external_set_is_skipped_with_one_warning(tmp_path, capsys):
    from bench.protocols.external import score_external

    gone = tmp_path / "not_here" / "images"
    from bench.config import Config

    cfg = Config.from_dict(
        {
            "external": {"lab9": {"path": str(gone), "labels": f"{gone.parent}/cells.csv:cls"}},
            "run": {"seed": 0},
        }
    )
    board = pd.DataFrame({"candidate": ["a", "b"], "accuracy": [0.5, 0.6]})
    out = score_external(None, cfg, None, board, {}, {"a": "cnn", "b": "cnn"}, None)
    assert out.equals(board)  # no external columns, nothing else changed
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "external set 'lab9' skipped" in err
    # and the config keeps such a set (it is skipped when the run scores it)
    assert (
        "deepapl_pbc" in load_config(ROOT / "benchmarks.toml", profile="smoke", data="pbc").external
    )
