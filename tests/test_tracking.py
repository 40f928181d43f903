"""``[run] tracking = "mlflow"``: a finished run appears in an MLflow store with its
leaderboard metrics, per-fold metrics, params and artifacts (SQLite, the default, and
MLflow's plain-file store)."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("mlflow", reason="run tracking needs mlflow (bloodbench[tracking])")

from bench.commands.cli import main  # noqa: E402
from bench.config import load_config  # noqa: E402
from bench.run.rundir import RunDir  # noqa: E402
from bench.run.tracking import log_run  # noqa: E402
from core.io import read_json  # noqa: E402
from tests.conftest import write_tiny_config  # noqa: E402


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bloodbench")
    return client, client.search_runs([exp.experiment_id])


def test_a_run_is_logged_to_mlflow(tmp_path, toy_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        f'[report]\nenabled = false\n[profiles.tiny.run]\ntracking = "mlflow"\n'
        f'tracking_uri = "{uri}"\n',
    )
    assert main(["run", "--config", str(cfg), "--only", "rf_hog", "--out", "r"]) == 0
    assert "tracked: MLflow run" in capsys.readouterr().err
    run = RunDir(tmp_path / "r")
    client, found = _runs(uri)
    assert len(found) == 1
    mr = found[0]
    assert read_json(run.file("manifest.json"))["tracking"] == {
        "uri": uri,
        "run_id": mr.info.run_id,
    }
    board = pd.read_csv(run.file("leaderboard.csv")).set_index("candidate")
    for name in board.index:
        assert mr.data.metrics[f"{name}/accuracy"] == pytest.approx(board.loc[name, "accuracy"])
    # per-fold metrics with the fold as the step
    hist = client.get_metric_history(mr.info.run_id, "rf_hog/fold/accuracy")
    folds = {m.step: m.value for m in hist}
    assert sorted(folds) == [0, 1, 2]
    for k, v in folds.items():
        assert v == pytest.approx(run.unit_result("rf_hog", k)["metrics"]["accuracy"])
    assert mr.data.params["rf_hog.type"] == "feature_forest"
    assert mr.data.params["rf_hog.n_estimators"] == "60"
    assert mr.data.params["predictor"] == run.read_state()["predictor"]
    arts = {a.path for a in client.list_artifacts(mr.info.run_id)}
    assert {"leaderboard.csv", "config.toml", "manifest.json", "predictor"} <= arts
    # MLflow's plain-file store, where a user opts in to it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    file_uri = (tmp_path / "mlruns").as_uri()
    cfg_obj = load_config(str(cfg), only=["rf_hog"], out=str(tmp_path / "r"))
    rid = log_run(run, cfg_obj, pd.read_csv(run.file("leaderboard.csv")), "x", file_uri)
    _, again = _runs(file_uri)
    assert [r.info.run_id for r in again] == [rid]
    assert again[0].data.metrics["rf_hog/accuracy"] == pytest.approx(
        board.loc["rf_hog", "accuracy"]
    )


def test_tracking_is_off_by_default_and_checked_at_load(tmp_path, toy_folder, monkeypatch):
    cfg = write_tiny_config(tmp_path / "c.toml", toy_folder)
    assert load_config(str(cfg)).run.tracking == ""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a)
    )
    bad = write_tiny_config(
        tmp_path / "b.toml", toy_folder, '[profiles.tiny.run]\ntracking = "mlflow"\n'
    )
    from core.errors import BenchError

    with pytest.raises(BenchError, match="tracking = 'mlflow' needs MLflow"):
        load_config(str(bad))
