"""Bad configs and bad run folders cost no run and no file: each is one `error:` line,
given before any data is read or any unit trains (scikit-learn test_common style)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench.commands.cli import main
from tests.conftest import write_tiny_config

BASE = """
[run]
seed = 0
folds = 3
profile = "t"

[data]
path = "{data}"
image_size = 32

[feature_sets.hog]
hog = {{ orientations = 8, pixels_per_cell = 8, cells_per_block = 2 }}

[candidates.rf_hog]
type = "feature_forest"
params = {{ features = "hog", n_estimators = 20 }}

[ensembles.vote]
type = "soft_voting"
members = "all"

[profiles.t]
description = "validation tests"
"""

# (what is broken, text replaced -> replacement (or appended when absent), extra CLI args,
#  message fragment)
CASES = [
    ("metric", "seed = 0", 'seed = 0\nmetric = "nonsense"', [], "[run] metric"),
    ("workers", "seed = 0", "seed = 0\nworkers = -2", [], "[run] workers"),
    ("folds type", "folds = 3", 'folds = "3"', [], "[run] folds"),
    ("unknown run key", "seed = 0", "sed = 0", [], "did you mean 'seed'"),
    (
        "run not a table",
        '[run]\nseed = 0\nfolds = 3\nprofile = "t"\n',
        "run = 5\n",
        [],
        "[run] must be a table",
    ),
    (
        "unknown section",
        "[profiles.t]",
        "[runn]\nseed = 1\n[profiles.t]",
        [],
        "unknown section 'runn'",
    ),
    ("image_size huge", "image_size = 32", "image_size = 100000", [], "[data] image_size"),
    (
        "max_images words",
        "image_size = 32",
        'image_size = 32\nmax_images = "eight hundred"',
        [],
        "[data] max_images",
    ),
    (
        "group_rule",
        "image_size = 32",
        'image_size = 32\ngroup_rule = "blocks"',
        [],
        "[data] group_rule",
    ),
    ("param type", "n_estimators = 20", 'n_estimators = "ten"', [], "n_estimators: expected"),
    ("param range", "n_estimators = 20", "n_estimators = -1", [], "an integer >= 1"),
    ("param typo", "n_estimators = 20", "n_estimatrs = 20", [], "did you mean 'n_estimators'"),
    ("feature param", "orientations = 8", 'orientations = "nine"', [], "[feature_sets.hog] hog"),
    ("unknown extractor", "hog = {", "hogg = {", [], "unknown feature extractor 'hogg'"),
    (
        "unknown feature set",
        'features = "hog"',
        'features = "hgo"',
        [],
        "unknown feature set 'hgo'",
    ),
    (
        "unknown type",
        'type = "feature_forest"',
        'type = "feature_forrest"',
        [],
        "did you mean 'feature_forest'",
    ),
    (
        "candidate name",
        "[candidates.rf_hog]",
        '[candidates."../../../x"]',
        [],
        "candidate name '../../../x' is not allowed",
    ),
    (
        "ensemble setting",
        'members = "all"',
        'members = "all"\nweights = "best"',
        [],
        "[ensembles.vote]: weights",
    ),
    ("ensemble members", 'members = "all"', 'members = ["rf_hgo"]', [], "are not candidates"),
    (
        "predictor entry",
        "[profiles.t]",
        '[predictor]\nensemble = "vot"\n[profiles.t]',
        [],
        "did you mean 'vote'",
    ),
    (
        "report setting",
        "[profiles.t]",
        "[report]\nconfidence = 2\n[profiles.t]",
        [],
        "[report] confidence",
    ),
    (
        "stats setting",
        "[profiles.t]",
        "[stats]\nconfidence = 2\n[profiles.t]",
        [],
        "[stats] confidence must be below 1",
    ),
    (
        "stats bins",
        "[profiles.t]",
        "[stats]\nece_bins = 0\n[profiles.t]",
        [],
        "[stats] ece_bins must be at least 1",
    ),
    (
        "profile key",
        'description = "validation tests"',
        'description = "x"\nrunn = {}',
        [],
        "profile 't' has unknown key 'runn'",
    ),
    (
        "select",
        'description = "validation tests"',
        'description = "x"\nselect = ["rf"]',
        [],
        "unknown candidate(s) ['rf']",
    ),
    ("--only empty", None, None, ["--only", ","], "--only names no candidate"),
    ("--only unknown", None, None, ["--only", "rf"], "unknown candidate(s) ['rf']"),
    ("--profile unknown", None, None, ["--profile", "tt"], "unknown profile 'tt'"),
    ("--workers 0", None, None, ["--workers", "0"], "--workers must be at least 1"),
    ("--out empty", None, None, ["--out", ""], "--out is empty"),
    ("plugins not a list", "seed = 0", 'seed = 0\nplugins = "my_mod"', [], "[run] plugins"),
    (
        "plugin missing",
        "seed = 0",
        'seed = 0\nplugins = ["no_such_module_x"]',
        [],
        "cannot import 'no_such_module_x'",
    ),
    ("classes not a list", "image_size = 32", "image_size = 32\nclasses = 5", [], "[data] classes"),
    # every float setting finite: TOML's inf and nan are refused, naming the key
    (
        "raps_lambda inf",
        "[profiles.t]",
        "[predictor]\nconformal = { raps_lambda = inf }\n[profiles.t]",
        [],
        "[predictor] conformal.raps_lambda must be a finite number, got inf",
    ),
    (
        "raps_lambda nan",
        "[profiles.t]",
        "[predictor]\nconformal = { raps_lambda = nan }\n[profiles.t]",
        [],
        "[predictor] conformal.raps_lambda must be a finite number, got nan",
    ),
    (
        "timeout -inf",
        "[profiles.t]",
        "[tuning]\ntimeout = -inf\n[profiles.t]",
        [],
        "[tuning] timeout must be a finite number, got -inf",
    ),
    (
        "candidate param inf",
        "n_estimators = 20",
        "n_estimators = 20, max_features = inf",
        [],
        "[candidates.rf_hog] params.max_features must be a finite number, got inf",
    ),
    (
        "candidate list param nan",
        "[profiles.t]",
        "[candidates.rf_hog.tuning]\nfidelity = { n_estimators = 5, extra = [1.0, nan] }"
        "\n[profiles.t]",
        [],
        "[candidates.rf_hog] tuning.fidelity.extra[1] must be a finite number, got nan",
    ),
    (
        "ensemble setting inf",
        'members = "all"',
        'members = "all"\nweights = [1.0, inf]',
        [],
        "[ensembles.vote] weights[1] must be a finite number, got inf",
    ),
    (
        "profile setting nan",
        'description = "validation tests"',
        'description = "x"\nreport = { alpha = nan }',
        [],
        "[profiles.t] report.alpha must be a finite number, got nan",
    ),
    # degenerate values, refused with the reason
    (
        "sensitivity 0",
        "[profiles.t]",
        '[patients]\nthreshold = "sensitivity:0.0"\n[profiles.t]',
        [],
        "[patients] threshold sensitivity:0 keeps no positive patient",
    ),
    (
        "sensitivity above 1",
        "[profiles.t]",
        '[patients]\nthreshold = "sensitivity:1.5"\n[profiles.t]',
        [],
        "needs X in (0, 1]",
    ),
    (
        "threshold rule",
        "[profiles.t]",
        '[patients]\nthreshold = "youdn"\n[profiles.t]',
        [],
        '[patients] threshold must be "youden", "half" or "sensitivity:X"',
    ),
    (
        "conformal confidence 1",
        "[profiles.t]",
        "[predictor]\nconformal = { confidence = 1.0 }\n[profiles.t]",
        [],
        "1 would put every class in every prediction set",
    ),
    (
        "shortcut_margin 1",
        "[profiles.t]",
        "[patients]\nshortcut_margin = 1\n[profiles.t]",
        [],
        "[patients] shortcut_margin must be below 1, got 1: at 1 every colour-only row",
    ),
    (
        "colour_only_warning 0",
        "[profiles.t]",
        "[report]\ncolour_only_warning = 0\n[profiles.t]",
        [],
        "[report] colour_only_warning must be above 0, got 0: at 0 every colour-only baseline",
    ),
    (
        "randomization_threshold -1",
        "[profiles.t]",
        "[report]\nrandomization_threshold = -1\n[profiles.t]",
        [],
        "at -1 every Grad-CAM map would be flagged",
    ),
    (
        "gradcam_per_class 0",
        "[profiles.t]",
        "[report]\ngradcam_per_class = 0\n[profiles.t]",
        [],
        "[report] gradcam_per_class = 0 audits no image while gradcam = true",
    ),
]


def _write(tmp_path: Path, data: Path, old, new) -> Path:
    text = BASE.format(data=data)
    if old is not None:
        text = text.replace(old, new) if old in text else text + "\n" + new + "\n"
    f = tmp_path / "bad.toml"
    f.write_text(text)
    return f


@pytest.mark.parametrize("what,old,new,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_before_any_work(
    what, old, new, args, fragment, toy_folder, tmp_path, capsys, monkeypatch
):
    import bench.data.datasets

    monkeypatch.setattr(
        bench.data.datasets,
        "load_dataset",  # no data is read before the check
        lambda *a, **k: pytest.fail("the data was loaded before the check"),
    )
    cfg = _write(tmp_path, toy_folder, old, new)
    out = tmp_path / "out"
    rc = main(["run", "--config", str(cfg), "--out", str(out), *args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_inf_and_nan_are_refused_by_the_typed_settings_too(toy_folder, tmp_path):
    """Not only in a config file: a config built from a dict (a run folder's config.toml),
    a changed setting, and a class's parameters (lists included) from Python."""
    from bench.config import Config, load_config
    from baselines.models import FeatureForest
    from core.errors import BenchError
    from core.params import validate_params

    cfg = load_config(_write(tmp_path, toy_folder, None, None))
    table = cfg.to_dict()
    table["predictor"]["conformal"]["raps_lambda"] = float("inf")
    with pytest.raises(
        BenchError,
        match=r"^config: \[predictor\] conformal.raps_lambda must "
        r"be a finite number, got inf$",
    ):
        Config.from_dict(table)
    with pytest.raises(BenchError, match=r"\[tuning\] val_fraction must be a finite number"):
        cfg.override("tuning", val_fraction=float("nan"))
    assert cfg.tuning.val_fraction == 0.2  # unchanged by the refused override
    with pytest.raises(BenchError, match=r"^x: max_features: expected a finite number, got inf$"):
        validate_params(FeatureForest, {"max_features": float("inf")}, "x")
    with pytest.raises(
        BenchError,
        match=r"^x: features.color.bins: expected a finite number, "
        r"got nan$",
    ):  # inside a table parameter
        validate_params(FeatureForest, {"features": {"color": {"bins": float("nan")}}}, "x")
    assert validate_params(FeatureForest, {"features": {"color": {"bins": 8}}}, "x")


def test_gradcam_per_class_0_is_fine_without_the_audit(toy_folder, tmp_path):
    from bench.config import load_config

    cfg = load_config(
        _write(
            tmp_path,
            toy_folder,
            "[profiles.t]",
            "[report]\ngradcam = false\ngradcam_per_class = 0\n[profiles.t]",
        )
    )
    assert cfg.report.gradcam_per_class == 0


def test_a_config_that_is_not_text_is_one_line(tmp_path, capsys):
    f = tmp_path / "binary.toml"
    f.write_bytes(bytes(range(256)))
    assert main(["run", "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad TOML") and "Traceback" not in err


def test_the_shipped_config_and_every_profile_validate():
    from bench.config import load_config

    root = Path(__file__).resolve().parents[1]
    for profile in ("smoke", "quick", "full"):
        cfg = load_config(root / "benchmarks.toml", profile=profile)
        assert cfg.candidates


# ----------------------------------------------------------------------------- run folders


def _run(cfg, out, *args):
    return main(["run", "--config", str(cfg), "--out", str(out), *args])


def test_force_on_a_folder_that_is_not_a_run_moves_it_aside(toy_folder, tmp_path, capsys):
    cfg = write_tiny_config(tmp_path / "c.toml", toy_folder)
    out = tmp_path / "out"
    for sub in ("predictor", "report"):
        (out / sub).mkdir(parents=True)
        (out / sub / "important.txt").write_text(f"user data in {sub}")
    assert _run(cfg, out, "--only", "rf_hog") == 2  # refused without --force
    assert "is not a bloodbench run" in capsys.readouterr().err
    assert _run(cfg, out, "--only", "rf_hog", "--force") == 0
    old = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(old) == 1
    for sub in ("predictor", "report"):  # nothing lost
        assert (old[0] / sub / "important.txt").read_text() == f"user data in {sub}"
    assert (out / "leaderboard.csv").is_file()


def test_rerun_with_a_subset_keeps_the_finished_run(toy_folder, tmp_path, capsys):
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        extra="""
[candidates.rf_small]
type = "feature_forest"
params = { features = "hog", n_estimators = 10 }
""",
    )
    out = tmp_path / "out"
    assert _run(cfg, out, "--only", "rf_hog,rf_small") == 0
    manifest = (out / "predictor" / "manifest.json").read_text()
    board = (out / "leaderboard.csv").read_text()
    capsys.readouterr()
    assert _run(cfg, out, "--only", "rf_hog") == 2  # would replace them: refused
    err = capsys.readouterr().err
    assert "would be replaced by a subset" in err and "rf_small" in err
    assert (out / "predictor" / "manifest.json").read_text() == manifest
    assert (out / "leaderboard.csv").read_text() == board
    # the same run again: nothing changes, nothing is moved
    assert _run(cfg, out, "--only", "rf_hog,rf_small") == 0
    assert not (out / "previous").exists()
    assert set(pd.read_csv(out / "leaderboard.csv")["candidate"]) == set(
        pd.read_csv(pd.io.common.StringIO(board))["candidate"]
    )


def test_a_run_that_changes_the_leaderboard_moves_the_old_outputs_aside(toy_folder, tmp_path):
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        extra="""
[candidates.rf_small]
type = "feature_forest"
params = { features = "hog", n_estimators = 10 }
""",
    )
    out = tmp_path / "out"
    assert _run(cfg, out, "--only", "rf_hog") == 0
    board = (out / "leaderboard.csv").read_text()
    assert _run(cfg, out, "--only", "rf_hog,rf_small") == 0  # a superset: a new leaderboard
    kept = list((out / "previous").iterdir())
    assert len(kept) == 1 and (kept[0] / "leaderboard.csv").read_text() == board
    assert (kept[0] / "predictor" / "manifest.json").is_file()
    assert "rf_small" in (out / "leaderboard.csv").read_text()


def test_out_that_is_a_file_is_refused(toy_folder, tmp_path, capsys):
    cfg = write_tiny_config(tmp_path / "c.toml", toy_folder)
    f = tmp_path / "afile"
    f.write_text("mine")
    assert _run(cfg, f, "--only", "rf_hog") == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "mine"
