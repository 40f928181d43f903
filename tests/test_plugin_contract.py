"""The plugin contract is the one README documents: its example, copied verbatim, runs in
this process, in spawned workers and on a Dask cluster, with the same results."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.config import load_config
from bench.run.runner import run_benchmark
from tests.conftest import write_toy_folder

REPO = Path(__file__).resolve().parents[1]
MODULE = "readme_plugin_example"

CONFIG = """
[run]
seed = 0
folds = 3
profile = "t"
plugins = ["{module}"]

[data]
path = "{data}"
image_size = 24

[tuning]
trials = 2
storage = "{storage}"

[candidates.mine]
type = "mean_colour"
params = {{ temperature = 10.0 }}

[ensembles.vote]
type = "soft_voting"
members = "all"

[profiles.t]
description = "plugin contract"
"""


def readme_plugin_code() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its plugin example (marker <!-- plugin-example -->)"
    return m.group(1)


@pytest.fixture(scope="module")
def plugin_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "pkg").mkdir()
    (root / "pkg" / f"{MODULE}.py").write_text(readme_plugin_code())
    data = write_toy_folder(root / "data", n_per_class=12, size=24)
    return root, data


@pytest.fixture
def plugin_path(plugin_setup, monkeypatch):
    root, data = plugin_setup
    pkg = str(root / "pkg")
    monkeypatch.syspath_prepend(pkg)  # this process and spawned workers (sys.path)
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{REPO}")  # Dask nannies' processes
    return root, data


def _config(root: Path, data: Path, out: Path):
    f = out.parent / f"{out.name}.toml"
    f.write_text(CONFIG.format(module=MODULE, data=data, storage=out.parent / f"{out.name}.log"))
    return load_config(f, out=str(out))


def _board(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / "leaderboard.csv")
    return (
        df[["candidate", "accuracy", "macro_f1", "log_loss"]]
        .sort_values("candidate")
        .reset_index(drop=True)
    )


def test_readme_plugin_runs_in_one_and_two_workers_with_equal_results(plugin_path, tmp_path):
    root, data = plugin_path
    boards = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_benchmark(_config(root, data, out), workers=workers, show_progress=False)
        boards.append(_board(out))
        assert (out / "predictor" / "manifest.json").is_file()
        tuned = list((out / "tuning").glob("mine-fold*.json"))
        assert len(tuned) == 3  # declared tunable: one study per fold
    pd.testing.assert_frame_equal(boards[0], boards[1])
    acc = boards[0].set_index("candidate").loc["mine", "accuracy"]
    assert acc > 0.8  # colour separates the toy classes: it learned (chance is 1/3)
    from ensembles import load_predictor
    from tests.conftest import toy_arrays

    X, y = toy_arrays(5, 24, seed=3)
    pred = load_predictor(tmp_path / "w2" / "predictor")
    assert (pred.predict(X) == np.array(pred.classes_)[y]).mean() > 0.8


def test_readme_plugin_runs_on_dask(plugin_path, tmp_path):
    import distributed

    root, data = plugin_path
    ref = tmp_path / "local"
    run_benchmark(_config(root, data, ref), workers=1, show_progress=False)
    env = {"PYTHONPATH": f"{root / 'pkg'}:{REPO}", "BLOODBENCH_JOBS": "1", "OMP_NUM_THREADS": "1"}
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env=env,
        silence_logs=50,
    ) as c:
        out = tmp_path / "dask"
        run_benchmark(_config(root, data, out), scheduler=c.scheduler_address, show_progress=False)
    pd.testing.assert_frame_equal(_board(ref), _board(out))


def test_a_plugin_without_extra_fit_keywords_gets_none(plugin_path):
    """The kernel passes only the keywords a candidate declares (README's contract)."""
    from core import registry
    from core.candidate import fit_candidate
    from tests.conftest import toy_arrays

    registry.import_plugins([MODULE])
    cls = registry.get("mean_colour")
    assert cls.fit_accepts == frozenset()
    X, y = toy_arrays(4, 24)
    cand = fit_candidate(
        cls(),
        X,
        y,
        classes=np.arange(3),
        workdir="/nonexistent",
        epoch_callbacks=[lambda e, logs: None],
    )
    assert cand.predict_proba(X).shape == (12, 3)
