"""Config loading: profiles, named datasets, selection, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import Config, load_config, read_toml
from core.errors import BenchError


def read_toml_text(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


ROOT = Path(__file__).resolve().parents[1]


def test_repo_config_resolves_every_profile():
    profiles = read_toml(ROOT / "benchmarks.toml")["profiles"]
    assert {"smoke", "quick", "full"} <= set(profiles)
    needs = {"multi": "wbc5_multi"}  # a profile made for one kind of dataset
    for profile in profiles:  # every profile of the shipped config
        cfg = load_config(ROOT / "benchmarks.toml", profile=profile, data=needs.get(profile))
        assert cfg.candidates and cfg.run.profile == profile
        # the saved config.toml reads back into the same model
        assert Config.from_dict(read_toml_text(cfg.to_toml())).to_dict() == cfg.to_dict()
    smoke = load_config(ROOT / "benchmarks.toml", profile="smoke")
    assert set(smoke.candidates) == {"rf_hog", "rf_color", "cnn_small", "tl_mnv2_finetune"}
    assert smoke.data.max_images == 800
    assert "hog" in smoke.candidates["rf_hog"].params["features"]  # feature set inlined


def test_profile_overrides_and_named_dataset(tmp_path):
    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text("""
[data]
path = "x"
[datasets.mine]
path = "elsewhere.npz"
image_size = 48
[candidates.a]
type = "feature_forest"
params = { n_estimators = 10, features = { hog = {} } }
[candidates.b]
type = "feature_forest"
params = { n_estimators = 10, features = { hog = {} } }
[profiles.p]
select = ["a", "b"]
candidates.a.params = { n_estimators = 99 }
run = { folds = 3 }
""")
    cfg = load_config(cfg_file, profile="p", data="mine", only=["a"], out=str(tmp_path / "o"))
    assert list(cfg.candidates) == ["a"]
    assert cfg.candidates["a"].params["n_estimators"] == 99
    assert cfg.run.folds == 3 and cfg.run.out == str(tmp_path / "o")
    assert cfg.data.path == "elsewhere.npz" and cfg.data.image_size == 48
    assert "fold" in load_config(cfg_file, profile="p").to_toml()


@pytest.mark.parametrize(
    "text, kw, message",
    [
        ("[run\nseed=1", {}, "bad TOML"),
        ("[profiles.p]\n", {"profile": "q"}, "unknown profile 'q'"),
        (
            "[candidates.a]\ntype='feature_forest'\n[profiles.p]\n",
            {"profile": "p", "only": ["zz"]},
            r"unknown candidate\(s\) \['zz'\]",
        ),
        (
            "[candidates.a]\nparams={}\n[profiles.p]\n",
            {"profile": "p"},
            "candidate 'a' needs a 'type'",
        ),
        (
            "[candidates.a]\ntype='x'\nparams={features='nope'}\n[profiles.p]\n",
            {"profile": "p"},
            "unknown feature set 'nope'",
        ),
        ("[bogus]\n[profiles.p]\n", {"profile": "p"}, "unknown section"),
        ("[run]\nfolds=1\n[profiles.p]\n", {"profile": "p"}, "folds must be at least 2"),
    ],
)
def test_bad_config_errors(tmp_path, text, kw, message):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(BenchError, match=message) as err:
        load_config(f, **kw)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(BenchError, match="config file not found"):
        load_config(tmp_path / "none.toml")


def test_settings_are_typed_and_every_default_has_one_home(tmp_path):
    from bench.config import (
        SECTIONS,
        Config,
        DataSection,
        RunSection,
        TuningSection,
        DatasetOverride,
    )
    from bench.run.tuning import candidate_tuning

    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text("""
[run]
seed = 7
[datasets.mine]
path = "x.npz"
[candidates.a]
type = "feature_forest"
params = { n_estimators = 10, features = { hog = {} } }
tuning = { trials = 3, pruner = "none" }
[profiles.p]
""")
    cfg = load_config(cfg_file, profile="p", data="mine")
    # the typed sections, their defaults from the models' fields, and the dict view is
    # their dump: every key present
    assert cfg.run.seed == 7 and cfg.run.folds == RunSection().folds
    assert cfg.predictor.robust_tolerance == 0.005
    for sec, model in SECTIONS.items():
        assert isinstance(getattr(cfg, sec), model)
        assert set(cfg.to_dict()[sec]) == set(model.model_fields)
    assert cfg.data.name == "mine" and cfg.data.image_size == 64
    # a candidate's tuning: [tuning] with its own table over it, every key filled
    own = candidate_tuning(cfg.tuning, cfg.candidates["a"])
    assert (own.trials, own.pruner, own.val_fraction, own.fidelity, own.space) == (
        3,
        "none",
        TuningSection().val_fraction,
        {},
        None,
    )
    # a [datasets.NAME] table takes any [data] key the user sets, none of the resolver's
    assert set(DatasetOverride.model_fields) == set(DataSection.model_fields) - {
        "name",
        "same_as",
        "fallback",
    }
    # a config read back (a run directory's config.toml) is typed the same way
    back = Config.from_dict({"run": {"seed": 3}, "candidates": {}})
    assert back.run.seed == 3 and back.report.enabled is True
    assert back.patients.trim == 0.1
    back.override("tuning", storage="sqlite:///x.db")
    assert back.tuning.storage == back.to_dict()["tuning"]["storage"] == "sqlite:///x.db"
    # a derived copy is validated again and leaves the original as it was
    other = back.derive(run={"folds": 3})
    assert other.run.folds == 3 and back.run.folds == RunSection().folds
    with pytest.raises(BenchError, match=r"\[run\] folds must be at least 2"):
        back.derive(run={"folds": 1})
    with pytest.raises(BenchError, match=r"\[tuning\] trials must be at least 0"):
        back.override("tuning", trials=-1)
