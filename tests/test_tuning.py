"""Optuna tuning: beats a poor default, resumes without repeating trials, prunes, no leaks."""

from __future__ import annotations

import json
import time

import numpy as np
import optuna
import pytest

from core.candidate import Candidate, build_candidate
from core.errors import BenchError
from core.registry import register
from bench.run.tuning import candidate_tuning, inner_split, make_pruner, tune_candidate
from tests.conftest import toy_arrays, write_tiny_config

COLOR = {"color": {"bins": 8}}


def _fast(tmp_path, **tuning) -> dict:
    """``[tuning]`` with a journal file: much faster to create than SQLite (tested elsewhere)."""
    return {"storage": str(tmp_path / "studies.log"), **tuning}


@register("_test_epochs")
class EpochModel(Candidate):
    """A fake CNN: its validation accuracy after epoch e is quality * (e + 1) / epochs."""

    fit_accepts = frozenset({"classes", "epoch_callbacks"})  # reports epochs: prunable
    tunable = True

    def __init__(self, quality=0.5, epochs=8, seconds=0.0):
        self.quality = quality
        self.epochs = epochs
        self.seconds = seconds

    def fit(self, X, y, X_val=None, y_val=None, classes=None, epoch_callbacks=None):
        self._set_classes(y, classes)
        self._y = np.asarray(y_val if y_val is not None else y)  # scored against these
        time.sleep(self.seconds)
        for e in range(self.epochs):
            for cb in epoch_callbacks or []:
                cb(e, {"val_accuracy": self.quality * (e + 1) / self.epochs, "loss": 1.0})
        return self

    def predict_proba(self, X):
        """Right with probability ``quality`` (deterministic per row)."""
        n = len(X)
        rng = np.random.default_rng(0)
        right = rng.random(n) < self.quality
        p = np.full((n, self.n_classes_), 0.0)
        p[np.arange(n), np.where(right, self._y, (self._y + 1) % self.n_classes_)] = 1.0
        return p

    @classmethod
    def param_space(cls, trial):
        return {"quality": trial.suggest_float("quality", 0.0, 1.0)}


@register("_test_recorder")
class Recorder(Candidate):
    """Remembers which rows (ids written in pixel 0) it was fitted on and scored."""

    fitted: list = []
    scored: list = []
    fit_accepts = frozenset({"classes"})
    tunable = True

    def __init__(self, c=1.0):
        self.c = c

    def fit(self, X, y, X_val=None, y_val=None, classes=None):
        self._set_classes(y, classes)
        Recorder.fitted.append(_ids(X))
        return self

    def predict_proba(self, X):
        Recorder.scored.append(_ids(X))
        return np.full((len(X), self.n_classes_), 1.0 / self.n_classes_)

    @classmethod
    def param_space(cls, trial):
        return {"c": trial.suggest_float("c", 0.1, 1.0)}


def _ids(X):
    X = np.asarray(X)
    return set((X[:, 0, 0, 0].astype(int) * 256 + X[:, 0, 0, 1]).tolist())


def test_tuned_forest_beats_a_poor_default(tmp_path):
    X, y = toy_arrays(20, 32, seed=0)
    Xt, yt = toy_arrays(15, 32, seed=1)
    entry = {
        "type": "feature_forest",
        "params": {"features": COLOR, "n_estimators": 1, "max_depth": 1, "random_state": 0},
    }
    default = build_candidate(entry).fit(X, y)
    acc_default = (default.predict(Xt) == yt).mean()
    assert acc_default < 0.7  # one stump cannot tell three classes apart
    best, info = tune_candidate(
        entry, X, y, np.arange(3), "rf-fold0", {"trials": 3, "timeout": 0}, tmp_path, seed=0
    )
    assert info["default_value"] < info["best_value"] and best["max_depth"] != 1
    tuned = build_candidate({**entry, "params": {**entry["params"], **best}}).fit(X, y)
    assert (tuned.predict(Xt) == yt).mean() > acc_default + 0.15
    saved = json.loads((tmp_path / "tuning" / "rf-fold0.json").read_text())
    assert len(saved["trials"]) == 3 and saved["trials"][0]["default"]
    assert saved["best_params"] == best and (tmp_path / "optuna.db").is_file()


def test_resumed_study_runs_only_the_remaining_trials(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {"type": "_test_epochs", "params": {"epochs": 2}}
    tun = _fast(tmp_path, trials=3, timeout=0, pruner="none")
    _, first = tune_candidate(entry, X, y, np.arange(3), "s", tun, tmp_path, seed=1)
    before = json.loads((tmp_path / "tuning" / "s.json").read_text())["trials"]
    _, again = tune_candidate(entry, X, y, np.arange(3), "s", tun, tmp_path, seed=1)
    assert again["trials_run_now"] == 0 and again["n_trials"] == 3
    _, more = tune_candidate(entry, X, y, np.arange(3), "s", {**tun, "trials": 5}, tmp_path, seed=1)
    after = json.loads((tmp_path / "tuning" / "s.json").read_text())["trials"]
    assert first["trials_run_now"] == 3 and more["trials_run_now"] == 2
    assert after[:3] == before  # finished trials kept, not re-run
    params = [t["params"]["quality"] for t in after]
    assert len(set(params)) == 5  # no point sampled twice
    from bench.run.storage import make_storage

    st = optuna.load_study(study_name="s", storage=make_storage(tun["storage"]))
    assert len(st.trials) == 5


def test_same_seed_same_study(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {"type": "_test_epochs", "params": {"epochs": 2}}
    runs = [
        tune_candidate(
            entry,
            X,
            y,
            np.arange(3),
            "s",
            _fast(tmp_path / str(i), trials=4, pruner="none"),
            tmp_path / str(i),
            seed=7,
        )[1]
        for i in range(2)
    ]
    trials = [
        json.loads((tmp_path / str(i) / "tuning" / "s.json").read_text())["trials"]
        for i in range(2)
    ]
    assert [t["params"] for t in trials[0]] == [t["params"] for t in trials[1]]
    assert runs[0]["best_value"] == runs[1]["best_value"]


def test_epoch_callbacks_prune_poor_trials(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {"type": "_test_epochs", "params": {"epochs": 6, "quality": 0.9}}
    _, info = tune_candidate(
        entry, X, y, np.arange(3), "p", _fast(tmp_path, trials=8, pruner="median"), tmp_path, seed=0
    )
    trials = json.loads((tmp_path / "tuning" / "p.json").read_text())["trials"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert info["n_pruned"] == len(pruned) >= 1
    assert all(t["last_step"] < 5 for t in pruned)  # stopped before the last epoch
    # pruned: below the median of the completed trials at that epoch, so below the best
    top_quality = max(t["params"]["quality"] for t in trials if t["state"] == "COMPLETE")
    assert all(t["params"]["quality"] < top_quality for t in pruned)


def test_timeout_bounds_the_study(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {"type": "_test_epochs", "params": {"epochs": 1, "seconds": 0.15}}
    _, info = tune_candidate(
        entry, X, y, np.arange(3), "t", _fast(tmp_path, trials=50, timeout=0.4), tmp_path, seed=0
    )
    assert 1 <= info["n_trials"] < 10
    # the finished trials' durations count against the budget when resuming: a resume runs
    # trials only while they add up to less than the timeout (time between trials is not
    # counted, so under load one resume may still find budget left), and never after
    prev, runs = info, []
    for _ in range(6):
        _, again = tune_candidate(
            entry,
            X,
            y,
            np.arange(3),
            "t",
            _fast(tmp_path, trials=50, timeout=0.4),
            tmp_path,
            seed=0,
        )
        runs.append(again["trials_run_now"])
        if prev["trial_seconds"] >= 0.4:
            assert again["trials_run_now"] == 0 and again["n_trials"] == prev["n_trials"]
        prev = again
    assert prev["trial_seconds"] >= 0.4 and runs[-1] == 0
    assert sum(runs) <= 3  # each trial sleeps 0.15 s: at most 3 fit in 0.4 s


def test_trials_never_see_the_outer_test_fold(tmp_path):
    X, y = toy_arrays(10, 16, seed=0)
    ids = np.arange(len(X))
    X[:, 0, 0, 0], X[:, 0, 0, 1] = ids // 256, ids % 256
    test = np.arange(len(X)) % 5 == 0  # the outer test fold
    Recorder.fitted.clear(), Recorder.scored.clear()
    tune_candidate(
        {"type": "_test_recorder", "params": {}},
        X[~test],
        y[~test],
        np.arange(3),
        "r",
        _fast(tmp_path, trials=3),
        tmp_path,
        seed=0,
    )
    train_ids, test_ids = set(ids[~test].tolist()), set(ids[test].tolist())
    assert len(Recorder.fitted) == 3
    for fit_ids, score_ids in zip(Recorder.fitted, Recorder.scored):
        assert fit_ids <= train_ids and score_ids <= train_ids
        assert not fit_ids & score_ids and not (fit_ids | score_ids) & test_ids


def test_inner_split_is_stratified_and_seeded():
    y = np.repeat([0, 1, 2], [10, 20, 30])
    tr, va = inner_split(y, 0.2, seed=3)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(y)
    assert np.bincount(y[va]).tolist() == [2, 4, 6]
    np.testing.assert_array_equal(va, inner_split(y, 0.2, seed=3)[1])
    tr1, va1 = inner_split(np.array([0, 0, 0, 1]), 0.5, seed=0)  # a class of one: unstratified
    assert len(va1) == 2


def test_bad_settings_are_one_clear_error(tmp_path):
    with pytest.raises(BenchError, match="pruner"):
        make_pruner("sometimes")
    X, y = toy_arrays(4, 16, seed=0)
    with pytest.raises(BenchError, match="metric"):
        tune_candidate(
            {"type": "_test_epochs", "params": {}},
            X,
            y,
            np.arange(3),
            "b",
            _fast(tmp_path, trials=1, metric="speed"),
            tmp_path,
            seed=0,
        )


def test_run_with_three_trials_end_to_end(toy_folder, tmp_path):
    from bench.run.runner import run_from_args

    extra = """
[tuning]
trials = 3

[feature_sets.color]
color = { bins = 8 }

[candidates.svm_color]
type = "feature_svm"
params = { features = "color", kernel = "linear" }
"""
    cfg = write_tiny_config(tmp_path / "bench.toml", toy_folder, extra)
    out = tmp_path / "run"
    board, _ = run_from_args(
        str(cfg), profile="tiny", out=str(out), only=["svm_color"], show_progress=False
    )
    assert board.loc[board["candidate"] == "svm_color", "accuracy"].iloc[0] > 0.6
    for k in range(3):
        res = json.loads((out / "units" / "svm_color" / f"fold{k}" / "result.json").read_text())
        assert res["tuning"]["n_trials"] == 3 and res["tuning"]["study"] == f"svm_color-fold{k}"
        assert res["params"]["C"] == res["tuning"]["best_params"].get("C", 1.0)  # 1.0: default
        saved = json.loads((out / "tuning" / f"svm_color-fold{k}.json").read_text())
        assert len(saved["trials"]) == 3
    from bench.report.cards import unit_times
    from bench.report.rundata import RunData

    row = next(r for r in unit_times(RunData(out)) if r["candidate"] == "svm_color")
    assert row["trials"] == "3/3/3" and row["trials_total"] == 9  # the run card's columns
    assert 0 <= row["tuned_folds"] <= 3 and row["trials_failed"] == 0
    assert len(row["per_fold"]) == 3 and all(row["per_fold"])  # the decision of every fold
    html = (out / "report" / "index.html").read_text()
    assert "9 trial(s) in all, 1 of 1 candidates tuned" in html and "3/3/3" in html
    assert "kept per fold" in html and "fold 0: " in html
    column = board.loc[board["candidate"] == "svm_color", "tuning"].iloc[0]
    assert [p.split(":")[0] for p in column.split("; ")] == ["fold 0", "fold 1", "fold 2"]


def test_the_leaderboard_tuning_column_shows_both_full_fidelity_scores():
    from bench.run.tuning import fold_decision, tuning_column

    checked = {
        "n_trials": 4,
        "best_params": {},
        "confirm": {"kept": "configured", "configured": 0.9712, "tuned": 0.9650},
    }
    adopted = {
        "n_trials": 4,
        "best_params": {"lr": 0.1},
        "confirm": {"kept": "tuned", "configured": 0.95, "tuned": 0.97},
    }
    assert fold_decision(checked) == "configured 0.9712 vs tuned 0.9650 at full fidelity"
    assert fold_decision(adopted) == "tuned 0.9700 vs configured 0.9500 at full fidelity"
    assert fold_decision({"n_trials": 3, "best_params": {}}) == "configured"
    assert fold_decision({"n_trials": 3, "best_params": {"C": 2}}) == "tuned (trial score)"
    assert (
        tuning_column([{}, checked]) == "fold 1: configured 0.9712 vs tuned 0.9650 at full fidelity"
    )


def test_candidate_tuning_table_overrides_the_global_one(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {"type": "_test_epochs", "params": {"epochs": 1}, "tuning": {"trials": 0}}
    best, info = tune_candidate(
        entry, X, y, np.arange(3), "o", _fast(tmp_path, trials=5), tmp_path, seed=0
    )
    assert best == {} and info["n_trials"] == 0 and not (tmp_path / "tuning").exists()
    entry["tuning"] = {"trials": 2}
    _, info = tune_candidate(
        entry, X, y, np.arange(3), "o", _fast(tmp_path, trials=5), tmp_path, seed=0
    )
    assert info["n_trials"] == 2


@register("_test_fidelity")
class FidelityModel(Candidate):
    """Records the (epochs, width) of every fit; scores ``quality``."""

    fits: list = []
    fit_accepts = frozenset({"classes"})
    tunable = True

    def __init__(self, quality=0.5, epochs=20, width=8):
        self.quality = quality
        self.epochs = epochs
        self.width = width

    def fit(self, X, y, X_val=None, y_val=None, classes=None):
        self._set_classes(y, classes)
        FidelityModel.fits.append((self.epochs, self.width))
        self._y = np.asarray(y_val if y_val is not None else y)
        return self

    predict_proba = EpochModel.predict_proba

    @classmethod
    def param_space(cls, trial):
        return {
            "quality": trial.suggest_float("quality", 0.0, 1.0),
            "epochs": trial.suggest_int("epochs", 5, 50),
            "width": trial.suggest_categorical("width", [4, 8, 16]),
        }


def test_trials_run_at_the_fidelity_and_the_refit_keeps_the_configured_resource(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {
        "type": "_test_fidelity",
        "params": {"epochs": 30, "quality": 0.05},
        "tuning": {"trials": 6, "fidelity": {"epochs": 2}, "adopt": "trial"},
    }
    FidelityModel.fits.clear()
    best, info = tune_candidate(
        entry, X, y, np.arange(3), "f", _fast(tmp_path, pruner="none"), tmp_path, seed=0
    )
    assert len(FidelityModel.fits) == 6
    assert {e for e, _ in FidelityModel.fits} == {2}  # every trial, the default too
    assert len({w for _, w in FidelityModel.fits}) > 1  # width is searched
    assert "epochs" not in best and {"quality", "width"} <= set(best)  # the default lost
    assert info["fidelity"] == {"epochs": 2} and info["space"] == ["quality", "width"]
    saved = json.loads((tmp_path / "tuning" / "f.json").read_text())
    assert all("epochs" not in t["params"] for t in saved["trials"][1:])
    refit = build_candidate({**entry, "params": {**entry["params"], **best}})
    assert refit.epochs == 30 and refit.quality == best["quality"]


def test_space_limits_what_the_trials_search(tmp_path):
    X, y = toy_arrays(6, 16, seed=0)
    entry = {
        "type": "_test_fidelity",
        "params": {"width": 4, "quality": 0.05},
        "tuning": {"trials": 4, "space": ["quality"]},
    }
    FidelityModel.fits.clear()
    best, info = tune_candidate(
        entry, X, y, np.arange(3), "sp", _fast(tmp_path, pruner="none"), tmp_path, seed=0
    )
    assert set(FidelityModel.fits) == {(20, 4)}  # epochs and width as configured
    assert set(best) == {"quality"} and info["space"] == ["quality"]


@pytest.mark.parametrize(
    "tuning, match",
    [
        ('{ trials = 2, space = ["depth"] }', r"space: \['depth'\] are not parameters"),
        ("{ trials = 2, space = [] }", "space: .* is empty"),
        ("{ trials = 2, fidelity = { n_trees = 3 } }", "fidelity"),
        ('{ trials = 2, space = ["C"], fidelity = { C = 1.0 } }', "both searched"),
    ],
)
def test_bad_fidelity_or_space_is_one_error_at_load(tmp_path, toy_folder, tuning, match):
    from bench.config import load_config

    extra = f"""
[candidates.svm_color]
type = "feature_svm"
params = {{ features = {{ color = {{ bins = 8 }} }}, kernel = "linear" }}
tuning = {tuning}
"""
    cfg = write_tiny_config(tmp_path / "bench.toml", toy_folder, extra)
    with pytest.raises(BenchError, match=match) as err:
        load_config(str(cfg), profile="tiny")
    assert "[candidates.svm_color] tuning" in str(err.value) and "\n" not in str(err.value)


def test_quick_profile_tunes_every_candidate():
    """Issue 16: on the profile most users can afford, no candidate runs hand-picked
    settings only; the CNNs' trials are cheaper than their refit."""
    from pathlib import Path

    from bench.config import load_config
    from core import registry

    cfg = load_config(str(Path(__file__).parents[1] / "benchmarks.toml"), profile="quick")
    kinds = set()
    for name, entry in cfg.candidates.items():
        tun = candidate_tuning(cfg.tuning, entry)
        cls = registry.get(entry.type)
        kinds.add(cls.kind)
        assert cls.tunable and tun.trials >= 3, name
        if cls.kind == "cnn":
            assert tun.fidelity.get("epochs", 99) < entry.params.get("epochs", cls().epochs), name
        # issue 31: cheap trials propose, the refit's fidelity decides
        assert tun.adopt == "full" and tun.adopt_gain > 0, name
    assert kinds == {"cnn", "baseline"}


def test_min_gain_keeps_the_configured_parameters_unless_clearly_beaten(tmp_path):
    X, y = toy_arrays(10, 16, seed=0)
    entry = {
        "type": "_test_fidelity",
        "params": {"quality": 0.3},
        "tuning": {"trials": 6, "space": ["quality"]},
    }
    results = {}
    for gain in (0.0, 0.99):
        results[gain] = tune_candidate(
            {**entry, "tuning": {**entry["tuning"], "min_gain": gain}},
            X,
            y,
            np.arange(3),
            f"g{gain}",
            _fast(tmp_path, pruner="none"),
            tmp_path,
            seed=0,
        )
    (best0, info0), (best1, info1) = results[0.0], results[0.99]
    assert best0 and info0["best_value"] > info0["default_value"] and not info0["kept_configured"]
    assert best1 == {} and info1["kept_configured"] and info1["min_gain"] == 0.99
    assert info1["best_value"] == info1["default_value"] and info1["best_trial"] == 0


def test_neighbouring_folds_draw_different_points(tmp_path):
    """Fold k's study has seed s + k: its trial t must not repeat fold k+1's trial t - 1."""
    X, y = toy_arrays(6, 16, seed=0)
    entry = {"type": "_test_fidelity", "params": {}, "tuning": {"trials": 4, "space": ["quality"]}}
    drawn = []
    for fold in (0, 1):
        tune_candidate(
            entry,
            X,
            y,
            np.arange(3),
            f"n{fold}",
            _fast(tmp_path, pruner="none"),
            tmp_path,
            seed=10 + fold,
        )
        trials = json.loads((tmp_path / "tuning" / f"n{fold}.json").read_text())["trials"]
        drawn.append({round(t["params"]["quality"], 12) for t in trials[1:]})
    assert len(drawn[0]) == len(drawn[1]) == 3 and not drawn[0] & drawn[1]


def test_each_trial_releases_its_model(tmp_path, monkeypatch):
    """A worker runs dozens of trials: each one's Keras graph is let go after it."""
    import bench.run.tuning as tuning

    calls = []
    monkeypatch.setattr(tuning, "release_memory", lambda: calls.append(1))
    X, y = toy_arrays(6, 16, seed=0)
    tune_candidate(
        {"type": "_test_epochs", "params": {"epochs": 3}},
        X,
        y,
        np.arange(3),
        "m",
        _fast(tmp_path, trials=4, pruner="none"),
        tmp_path,
        seed=0,
    )
    assert len(calls) == 4


@register("_test_cheap_liar")
class CheapLiar(Candidate):
    """A nearest-centroid model whose accuracy depends on ``lr`` and on the fidelity:
    at few epochs a larger ``lr`` scores higher, at the configured 30 epochs lower (or, with
    ``honest``, higher too). It really learns: the centroids come from the fit's rows."""

    fits: list = []
    fit_accepts = frozenset({"classes"})
    tunable = True

    def __init__(self, lr=0.0, epochs=30, honest=False):
        self.lr, self.epochs, self.honest = lr, epochs, honest

    def fit(self, X, y, X_val=None, y_val=None, classes=None):
        self._set_classes(y, classes)
        CheapLiar.fits.append((self.epochs, self.lr))
        feats = np.asarray(X, dtype=float).reshape(len(X), -1, 3).mean(1)
        self._centroids = np.stack(
            [feats[np.asarray(y) == c].mean(0) for c in range(self.n_classes_)]
        )
        return self

    def predict_proba(self, X):
        feats = np.asarray(X, dtype=float).reshape(len(X), -1, 3).mean(1)
        pred = np.argmin(((feats[:, None] - self._centroids[None]) ** 2).sum(-1), axis=1)
        cheap = self.epochs < 10
        quality = 0.5 + 0.4 * self.lr if cheap or self.honest else 0.95 - 0.4 * self.lr
        u = (np.asarray(X, dtype=np.int64).reshape(len(X), -1).sum(1) * 7919 % 1000) / 1000
        pred = np.where(u < quality, pred, (pred + 1) % self.n_classes_)
        return np.eye(self.n_classes_)[pred]

    @classmethod
    def param_space(cls, trial):
        return {"lr": trial.suggest_float("lr", 0.2, 1.0)}


def _liar(trials=4, **tuning):
    return {
        "type": "_test_cheap_liar",
        "params": {"lr": 0.0},
        "tuning": {"trials": trials, "fidelity": {"epochs": 2}, **tuning},
    }


def test_a_cheap_winner_that_loses_at_full_fidelity_is_not_adopted(tmp_path):
    """Issue 31: the cheap trials prefer a larger lr, the refit's fidelity the configured
    one; the configured setting stays, and both full-fidelity scores are on record."""
    X, y = toy_arrays(40, 16, seed=0)
    CheapLiar.fits.clear()
    best, info = tune_candidate(
        _liar(), X, y, np.arange(3), "liar", _fast(tmp_path, pruner="none"), tmp_path, seed=0
    )
    assert info["best_value"] == info["default_value"]  # the configured trial is reported
    trial_values = [
        t["value"] for t in json.loads((tmp_path / "tuning" / "liar.json").read_text())["trials"]
    ]
    assert max(trial_values[1:]) > trial_values[0] + 0.05  # a challenger won the trials
    conf = info["confirm"]
    assert best == {} and info["kept_configured"] and conf["kept"] == "configured"
    assert conf["configured"] > conf["tuned"] + 0.05 and conf["fidelity"] == "full"
    assert conf["n_fit"] + conf["n_val"] == len(y) and info["adopt"] == "full"
    full = [f for f in CheapLiar.fits if f[0] == 30]  # the two full-fidelity fits
    assert len(full) == 2 and sorted(lr for _, lr in full)[0] == 0.0
    # the same study resumed: the confirmation is read back, nothing is refitted
    CheapLiar.fits.clear()
    best2, info2 = tune_candidate(
        _liar(), X, y, np.arange(3), "liar", _fast(tmp_path, pruner="none"), tmp_path, seed=0
    )
    assert best2 == {} and info2["confirm"] == conf and CheapLiar.fits == []


def test_adoption_by_the_trial_score_takes_the_cheap_winner(tmp_path):
    """The same study adopting by the cheap score (adopt = "trial") takes the setting the
    full-fidelity check refused: what the check protects against."""
    X, y = toy_arrays(40, 16, seed=0)
    best, info = tune_candidate(
        _liar(adopt="trial"),
        X,
        y,
        np.arange(3),
        "liar_t",
        _fast(tmp_path, pruner="none"),
        tmp_path,
        seed=0,
    )
    assert best["lr"] > 0.2 and not info["kept_configured"] and info["confirm"] is None


def test_a_winner_at_both_fidelities_is_adopted(tmp_path):
    X, y = toy_arrays(40, 16, seed=0)
    entry = _liar()
    entry["params"] = {"lr": 0.0, "honest": True}
    best, info = tune_candidate(
        entry, X, y, np.arange(3), "honest", _fast(tmp_path, pruner="none"), tmp_path, seed=0
    )
    conf = info["confirm"]
    assert conf["kept"] == "tuned" and conf["tuned"] > conf["configured"]
    assert best["lr"] > 0.2 and not info["kept_configured"]
    # adopt_gain above the full-fidelity gain: the configured setting stays
    entry["tuning"] = {**entry["tuning"], "adopt_gain": 0.99}
    best, info = tune_candidate(
        entry, X, y, np.arange(3), "honest_g", _fast(tmp_path, pruner="none"), tmp_path, seed=0
    )
    assert best == {} and info["confirm"]["kept"] == "configured"


def test_fidelity_check_measures_the_rank_agreement(tmp_path):
    from bench.run.tuning import fidelity_check

    X, y = toy_arrays(40, 16, seed=0)
    seen = []
    out = fidelity_check(
        _liar(),
        X,
        y,
        np.arange(3),
        {},
        seed=0,
        n_settings=5,
        progress=lambda i, row: seen.append(i),
    )
    assert seen == [0, 1, 2, 3, 4] and out["rows"][0]["configured"]
    assert out["rho"] < -0.6  # the liar ranks backwards
    entry = _liar()
    entry["params"] = {"lr": 0.0, "honest": True}
    assert fidelity_check(entry, X, y, np.arange(3), {}, seed=0, n_settings=5)["rho"] > 0.8
    with pytest.raises(BenchError, match="at least 3"):
        fidelity_check(entry, X, y, np.arange(3), {}, seed=0, n_settings=2)
