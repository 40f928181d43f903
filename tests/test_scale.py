"""Scale-out with real components: shared Optuna studies (PostgreSQL, journal file), a
``dask.distributed.LocalCluster`` running the work units, and crash-safe resume.

Leaderboards are compared exactly. Most runs use only random-forest candidates on HOG
features: both are deterministic for a fixed seed whatever the process, thread count or
machine, so any difference between two backends is a real bug. A small CNN is compared
exactly too: a CNN unit fixes its own TensorFlow thread layout, op determinism and seeds
(``cnn.runtime``), so on one machine it is bit-identical whichever backend runs it.

The PostgreSQL tests need ``BLOODBENCH_TEST_PG`` (``postgresql://user:pass@127.0.0.1/db``;
``.ci/run`` starts Debian's server and sets it); without a reachable server they skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from bench.config import load_config
from core.errors import BenchError
from bench.run.rundir import RunDir
from bench.commands.tune import tune_from_args
from bench.run.runner import prepare_run, run_benchmark
from bench.run.units import tune_unit
from bench.run.scheduling import DaskExecutor, LocalExecutor, init_worker
from bench.run.storage import FINISHED, make_storage
from cnn.runtime import DEFAULT_TF_THREADS, THREADS_ENV, tf_threads
from tests.conftest import write_toy_folder
from tests.scale_units import bad_setting, die_once, fail_once, square

REPO = Path(__file__).resolve().parents[1]
RF_ONLY = ["rf_a", "rf_b"]
CONFIG = """
[run]
seed = 3
folds = 3
profile = "t"

[data]
path = "{data}"
image_size = 32

[feature_sets.hog]
hog = {{ orientations = 8, pixels_per_cell = 8, cells_per_block = 2 }}

[tuning]
trials = {trials}
storage = "{storage}"
metric = "log_loss"

[candidates.rf_a]
type = "feature_forest"
params = {{ features = "hog", n_estimators = 30 }}

[candidates.rf_b]
type = "feature_forest"
params = {{ features = "hog", n_estimators = 40, max_features = "log2" }}

[ensembles.vote]
type = "soft_voting"
members = "all"

[report]
enabled = false

[profiles.t]
description = "scale tests"
"""
# A CNN small enough for seconds per unit: 42 images of 32 px, 3 folds, 3 epochs.
CNN_CONFIG = """
[run]
seed = 5
folds = 3
profile = "t"

[data]
path = "{data}"
image_size = 32

[candidates.cnn_tiny]
type = "scratch_cnn"
params = {{ blocks = 2, filters = 8, dense_units = 16, dropout = 0.1, epochs = 3, patience = 3, batch_size = 16, learning_rate = 0.005 }}

[report]
enabled = false

[profiles.t]
description = "scale tests, CNN"
"""
# Columns that are results (not timings): they must match across backends.
RESULT_COLS = [
    "candidate",
    "kind",
    "accuracy",
    "accuracy_std",
    "balanced_accuracy",
    "macro_f1",
    "roc_auc",
    "log_loss",
    "model_size",
    "n_folds",
]


# ----------------------------------------------------------------------------- helpers


def write_config(
    path: Path, data: Path, trials: int = 0, storage: str = "", rename: dict | None = None
) -> Path:
    text = CONFIG.format(data=data, trials=trials, storage=storage)
    for old, new in (rename or {}).items():
        text = text.replace(f"[candidates.{old}]", f"[candidates.{new}]")
    path.write_text(text)
    return path


def bench_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "bench", *map(str, args)]


def child_env() -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="3",
        BLOODBENCH_JOBS="1",
        OMP_NUM_THREADS="1",
    )
    return env


def board_results(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "leaderboard.csv")
    return df[[c for c in RESULT_COLS if c in df]].sort_values("candidate").reset_index(drop=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Same leaderboard results and bit-identical out-of-fold probabilities."""
    pd.testing.assert_frame_equal(board_results(a), board_results(b))
    for f in sorted((a / "oof").glob("*.npy")):
        np.testing.assert_array_equal(np.load(f), np.load(b / "oof" / f.name), err_msg=f.name)


def results(run_dir: Path) -> dict[Path, tuple[int, str]]:
    return {
        f: (f.stat().st_mtime_ns, f.read_text())
        for f in sorted(Path(run_dir).glob("units/*/fold*/result.json"))
    }


def wait_for(predicate, timeout: float, what: str, poll: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_toy_folder(tmp_path_factory.mktemp("scale") / "data", n_per_class=14)


@pytest.fixture(scope="module")
def config_file(data_dir) -> Path:
    return write_config(data_dir.parent / "rf.toml", data_dir)


@pytest.fixture(scope="module")
def reference_run(config_file, tmp_path_factory) -> Path:
    """An uninterrupted run in this process, one unit after another."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_benchmark(load_config(config_file, out=str(out)), workers=1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def cnn_config_file(data_dir) -> Path:
    path = data_dir.parent / "cnn.toml"
    path.write_text(CNN_CONFIG.format(data=data_dir))
    return path


@pytest.fixture(scope="module")
def cnn_reference_run(cnn_config_file, tmp_path_factory) -> Path:
    """The CNN run in this process, one unit after another."""
    import tensorflow as tf

    out = tmp_path_factory.mktemp("cnn-reference") / "run"
    run_benchmark(load_config(cnn_config_file, out=str(out)), workers=1, show_progress=False)
    # this process really ran with the layout every other backend gets
    assert tf.config.threading.get_intra_op_parallelism_threads() == tf_threads()
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real ``dask.distributed`` cluster: a scheduler and 2 worker processes (nannies)."""
    import distributed

    cache = tmp_path_factory.getbasetemp() / "bloodbench-cache"  # as conftest's fixture
    env = {
        "BLOODBENCH_CACHE": str(cache),
        "BLOODBENCH_JOBS": "1",
        "OMP_NUM_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
    }
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env=env,
        silence_logs=50,
    ) as c:
        yield c


# ----------------------------------------------------------------------------- executor


def test_local_executor_retries_failures_and_dead_workers(tmp_path):
    seq = LocalExecutor(1, retries=1)
    assert [r for _, r in seq.map_unordered(fail_once, [(tmp_path / "m1", 7)])] == [7]
    pool = LocalExecutor(2, retries=1)
    out = dict(pool.map_unordered(die_once, [(str(tmp_path / "m2"), 1), (str(tmp_path / "m3"), 2)]))
    assert sorted(out.values()) == [101, 102]  # both units lost their process once
    assert sorted(r for _, r in pool.map_unordered(square, [(i,) for i in range(5)])) == [
        0,
        1,
        4,
        9,
        16,
    ]
    with pytest.raises(BenchError, match="bad setting"):  # never retried
        list(LocalExecutor(1, retries=3).map_unordered(bad_setting, [(tmp_path / "log",)]))
    assert (tmp_path / "log").read_text() == "ran\n"
    with pytest.raises(RuntimeError, match="transient"):
        list(LocalExecutor(1, retries=0).map_unordered(fail_once, [(tmp_path / "m4", 1)]))


# ----------------------------------------------------------------------------- Dask


def test_dask_cluster_gives_the_local_leaderboard(cluster, config_file, reference_run, tmp_path):
    out = tmp_path / "dask"
    run_benchmark(
        load_config(config_file, out=str(out)),
        scheduler=cluster.scheduler_address,
        show_progress=False,
    )
    assert_same_run(reference_run, out)
    workers = {json.loads(f.read_text())["worker"] for f in out.glob("units/*/fold*/result.json")}
    assert str(os.getpid()) not in {w.rsplit(":", 1)[1] for w in workers}  # ran on the cluster
    # The executor itself: retries, and a setting error that is not retried.
    ex = DaskExecutor(cluster.scheduler_address, retries=1)
    assert [r for _, r in ex.map_unordered(fail_once, [(str(tmp_path / "m"), 5)])] == [5]
    with pytest.raises(BenchError, match="bad setting"):
        list(ex.map_unordered(bad_setting, [(str(tmp_path / "log"),)]))
    assert (tmp_path / "log").read_text() == "ran\n"


def test_cnn_is_bit_identical_in_process_on_two_workers_and_on_dask(
    cluster, cnn_config_file, cnn_reference_run, tmp_path
):
    """The bound promised for CNNs across backends: bit-identical. Out-of-fold probabilities
    and leaderboard results are the same bits in this process (``workers=1``), in 2 spawned
    processes and on a Dask ``LocalCluster`` (2 worker processes, 1 thread each), given
    one machine, one software stack and one ``BLOODBENCH_TF_THREADS``.

    Before the units fixed their own layout and seeds, this run differed by 5e-7
    (``workers=2``: another TF thread count) and by 0.14 (Dask: the worker's event loop
    drew from the Python ``random`` that Keras takes layer seeds from) in a probability;
    TF thread counts 1 vs 2 alone still differ by ~1e-3 after a few epochs."""
    import distributed

    with distributed.Client(cluster.scheduler_address) as client:  # same thread setting
        seen = set(client.run(lambda: os.environ.get(THREADS_ENV)).values())
    assert seen == {os.environ.get(THREADS_ENV)}
    two = tmp_path / "workers2"
    run_benchmark(load_config(cnn_config_file, out=str(two)), workers=2, show_progress=False)
    assert_same_run(cnn_reference_run, two)
    dask = tmp_path / "dask"
    run_benchmark(
        load_config(cnn_config_file, out=str(dask)),
        scheduler=cluster.scheduler_address,
        show_progress=False,
    )
    assert_same_run(cnn_reference_run, dask)
    for run, n in ((two, 2), (dask, 1)):  # in other processes (2 of them for the pool)
        pids = {
            json.loads(f.read_text())["worker"].rsplit(":", 1)[1]
            for f in run.glob("units/*/fold*/result.json")
        }
        assert len(pids) >= n and str(os.getpid()) not in pids, (run.name, pids)
    assert len(list((dask / "oof").glob("*.npy"))) == 1


def test_the_tf_thread_layout_is_the_units_not_the_backends(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert tf_threads() == DEFAULT_TF_THREADS == 1
    monkeypatch.setenv(THREADS_ENV, "6")
    assert tf_threads() == 6 and tf_threads(3) == 3
    for key in ("BLOODBENCH_JOBS", "OMP_NUM_THREADS"):  # restored after the test
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    init_worker(1)  # a spawned worker keeps the inherited TF setting, whatever its share
    assert os.environ[THREADS_ENV] == "6"
    for bad in ("two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(BenchError, match=THREADS_ENV):
            tf_threads()


def test_dask_worker_killed_mid_unit_is_retried(cluster, config_file, reference_run, tmp_path):
    out = tmp_path / "run"
    errors = []

    def run():
        try:
            run_benchmark(
                load_config(config_file, out=str(out)),
                scheduler=cluster.scheduler_address,
                show_progress=False,
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        while True:
            tmp = wait_for(
                lambda: next(iter(out.glob("units/*/.fold*.tmp-*")), None),
                120,
                "a work unit to start on a Dask worker",
            )
            pid = int(tmp.name.rsplit("-", 1)[1])
            assert pid != os.getpid()
            os.kill(pid, signal.SIGSTOP)  # freeze it: is the unit still running?
            if tmp.is_dir():
                os.kill(pid, signal.SIGKILL)  # the worker process, mid-unit
                break
            os.kill(pid, signal.SIGCONT)  # it had just finished that unit; try again
    finally:
        runner.join(180)
    assert not runner.is_alive() and not errors, errors
    assert tmp.is_dir()  # the killed attempt never finished...
    final = tmp.parent / tmp.name.split(".")[1]
    redo = json.loads((final / "result.json").read_text())
    assert redo["worker"].rsplit(":", 1)[1] != str(pid)  # ...its retry did, elsewhere
    assert_same_run(reference_run, out)


# ----------------------------------------------------------------------------- crash


def test_resume_after_kill_9_gives_the_uninterrupted_leaderboard(
    config_file, reference_run, tmp_path
):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        bench_cmd("run", "--config", config_file, "--out", out, "--workers", "1"),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: results(out), 120, "the first finished work unit")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = results(out)
    n_units = len(RF_ONLY) * 3
    assert 0 < len(before) < n_units, "the kill came after the run had finished"
    assert not (out / "leaderboard.csv").exists()

    run_benchmark(load_config(config_file, out=str(out)), workers=1, show_progress=False)
    after = results(out)
    assert len(after) == n_units
    for f, stamp in before.items():  # finished units were not recomputed
        assert after[f] == stamp, f"{f} was recomputed"
    assert_same_run(reference_run, out)


# ----------------------------------------------------------------------------- Optuna


def _pg_url() -> str:
    url = os.environ.get("BLOODBENCH_TEST_PG", "")
    if not url:
        pytest.skip("BLOODBENCH_TEST_PG is not set (.ci/run starts PostgreSQL and sets it)")
    try:
        make_storage(url)  # connects and creates the tables
    except BenchError as exc:
        pytest.skip(f"no PostgreSQL server reachable at BLOODBENCH_TEST_PG: {exc}")
    return url


@pytest.fixture(params=["postgresql", "journal"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return _pg_url()
    return f"journal://{tmp_path / 'optuna-journal.log'}"


def test_two_processes_tune_one_study_exactly(storage_url, data_dir, tmp_path):
    """Two `bench tune` processes share one study: exactly N finished trials, no two with
    the same parameters, and the best value is what one process finds with those trials."""
    n = 4
    name = f"rf_{uuid.uuid4().hex[:8]}"  # a fresh study name in a long-lived database
    cfg_file = write_config(
        tmp_path / "tune.toml", data_dir, trials=n, storage=storage_url, rename={"rf_a": name}
    )
    out = tmp_path / "run"
    prepare_run(load_config(cfg_file, out=str(out)), show_progress=False)
    with pytest.raises(BenchError, match="no candidate 'nope'"):
        list(tune_from_args(out=str(out), candidate="nope"))
    with pytest.raises(BenchError, match="--fold must be in 0..2"):
        list(tune_from_args(out=str(out), candidate=name, fold=3))
    cmd = bench_cmd("tune", "--out", out, "--candidate", name, "--fold", 0)
    procs = [
        subprocess.Popen(
            cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs

    storage = make_storage(storage_url, out)
    study = optuna.load_study(study_name=f"{name}-fold0", storage=storage)
    try:
        counted = [
            t for t in study.trials if t.state in FINISHED and not t.user_attrs.get("surplus")
        ]
        assert len(counted) == n
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
        assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
        params = [json.dumps(t.params, sort_keys=True) for t in counted]
        assert len(set(params)) == n, "two processes ran the same parameters"
        assert sum(t.user_attrs.get("default", False) for t in counted) == 1

        # One process, the same trials (queued in order), a fresh storage.
        solo_url = f"sqlite:///{tmp_path / 'solo.db'}"
        solo = optuna.create_study(
            study_name=f"{name}-fold0", storage=make_storage(solo_url), direction=study.direction
        )
        for t in sorted(counted, key=lambda t: t.number):
            solo.enqueue_trial(t.params, user_attrs=t.user_attrs)
        best, info = tune_unit(RunDir(out), name, 0, trials=n, storage=solo_url)
        assert info["best_value"] == study.best_value
        assert info["n_complete"] == n
    finally:
        if storage_url.startswith("postgresql"):
            optuna.delete_study(study_name=f"{name}-fold0", storage=storage)


def _open_sqlite(args):
    url, start = args
    time.sleep(max(0.0, start - time.time()))  # all processes open at the same moment
    make_storage(url)
    return True


def test_processes_that_open_a_new_sqlite_storage_together_all_get_it(tmp_path):
    """Two work units that start together on a new run's SQLite file both create Optuna's
    tables; the one that loses the race opens the storage again instead of failing."""
    import multiprocessing as mp

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with mp.get_context("spawn").Pool(4) as pool:
        start = time.time() + 6  # after the spawned processes have imported Optuna
        assert pool.map(_open_sqlite, [(url, start)] * 4) == [True] * 4
    optuna.create_study(study_name="s", storage=make_storage(url)).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2
    )
    assert len(optuna.load_study(study_name="s", storage=make_storage(url)).trials) == 2


def test_storage_open_retries_a_lost_schema_race_only(monkeypatch, tmp_path):
    import sqlalchemy.exc

    from bench.run import storage as storage_mod

    calls = []

    def flaky(url, **kw):
        calls.append(url)
        if len(calls) < 3:
            raise sqlalchemy.exc.IntegrityError(
                "INSERT INTO alembic_version",
                {},
                Exception("UNIQUE constraint failed: alembic_version.version_num"),
            )
        return "opened"

    monkeypatch.setattr(storage_mod, "RDBStorage", flaky)
    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)
    assert storage_mod.make_storage(f"sqlite:///{tmp_path / 'a.db'}") == "opened"
    assert len(calls) == 3

    def broken(url, **kw):
        calls.append(url)
        raise ValueError("no such driver\nsecond line")

    calls.clear()
    monkeypatch.setattr(storage_mod, "RDBStorage", broken)
    with pytest.raises(BenchError, match=r"^cannot open Optuna storage .*: no such driver$"):
        storage_mod.make_storage("nosuchdb://x")
    assert len(calls) == 1  # not a race: no retry


def test_a_storage_that_cannot_be_opened_stops_the_run_before_any_unit(data_dir, tmp_path):
    bad = f"sqlite:///{tmp_path / 'a_file'}/optuna.db"  # its folder is a file
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "run"
    cfg = load_config(
        write_config(tmp_path / "c.toml", data_dir, trials=2, storage=bad), out=str(out)
    )
    with pytest.raises(BenchError, match="a_file"):
        run_benchmark(cfg, show_progress=False)
    assert not list((out / "units").glob("*/fold*"))  # no unit ran
