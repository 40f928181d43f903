"""The config travels with the package: commands work from any folder, ``bench init`` writes
an editable copy (never over a file), a local ``benchmarks.toml`` or ``--config`` wins, and the
wheel carries the config."""

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from bench.commands.cli import main
from bench.config import PACKAGED_CONFIG, config_file, load_config

ROOT = Path(__file__).resolve().parents[1]


def bench(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": ""}  # the installed package, not the checkout on a path
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_the_shipped_config_is_the_checkouts():
    assert PACKAGED_CONFIG.is_file()
    assert PACKAGED_CONFIG.read_bytes() == (ROOT / "benchmarks.toml").read_bytes()


def test_the_main_job_runs_from_an_empty_folder(tmp_path):
    """The README's first command from a folder with no config (one candidate, for time)."""
    res = bench(["run", "--profile", "smoke", "--only", "rf_color", "--out", "r"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    board = pd.read_csv(tmp_path / "r" / "leaderboard.csv")
    assert "rf_color" in set(board["candidate"])
    assert board["balanced_accuracy"].max() > 0.5  # 8 classes: chance is 0.125
    assert (tmp_path / "r" / "predictor" / "manifest.json").is_file()
    assert (tmp_path / "r" / "report" / "index.html").is_file()


def test_config_file_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file() == PACKAGED_CONFIG
    assert config_file("mine.toml") == Path("mine.toml")
    (tmp_path / "benchmarks.toml").write_text("x = 1\n")
    assert config_file() == Path("benchmarks.toml")


def test_relative_paths_of_the_shipped_config_start_at_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(profile="smoke")
    assert cfg.source == PACKAGED_CONFIG
    assert Path(cfg.path(cfg.data.path)).is_file()  # bloodbench:sample/... inside the package
    assert cfg.path("mydata/cells") == str(tmp_path / "mydata" / "cells")


def test_init_writes_a_copy_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "lab"]) == 0
    copy = tmp_path / "lab" / "benchmarks.toml"
    assert copy.read_bytes() == PACKAGED_CONFIG.read_bytes()
    assert f"wrote {Path('lab') / 'benchmarks.toml'}: " in capsys.readouterr().out
    copy.write_text(copy.read_text() + "\n# my edit\n")
    assert main(["init", "lab"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "never overwrites" in err and "lab/benchmarks.toml" in err
    assert copy.read_text().endswith("# my edit\n")


def test_a_local_config_wins_over_the_shipped_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["list"]) == 0
    shipped = capsys.readouterr().out
    assert "smoke" in shipped and "pbc_sample" in shipped
    (tmp_path / "benchmarks.toml").write_text(
        '[candidates.only_mine]\ntype = "feature_forest"\nparams = { features = "color" }\n'
        '[profiles.mine]\ndescription = "local"\n'
    )
    assert main(["list"]) == 0
    local = capsys.readouterr().out
    assert "only_mine" in local and "mine" in local and "smoke" not in local


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_the_wheel_carries_the_config(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert z.read("bench/benchmarks.toml") == (ROOT / "benchmarks.toml").read_bytes()
        assert "bench/sample/pbc_sample_64.npz" in z.namelist()
