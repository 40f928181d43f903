"""Hostile predictors are refused with one line, never a traceback.

In the style of scikit-learn's ``test_common``: one small real predictor (an RF on HOG
and a tiny CNN, soft voting) is built once; each variant of the table below edits a copy
of it and then recomputes the files' sha256 and the manifest's own digest, so that the
checksums pass and only the deeper checks (the manifest's fields, the members' classes,
the loaders, the ensemble's state) can catch it. ``bench predict`` and ``bench inspect``
must then print exactly one ``error: ...`` line (or, for ``inspect``, which loads no
model, succeed where only loading can tell).
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.commands.cli import main
from core.io import file_sha256
from ensembles.predictor import MANIFEST, manifest_digest
from tests.conftest import toy_arrays, write_tiny_config, write_toy_folder

EXTRA = """
[ensembles.both]
type = "soft_voting"
members = "all"

[predictor]
ensemble = "both"

[profiles.tiny.candidates.cnn_tiny.params]
epochs = 2
patience = 2

[profiles.tiny.candidates.rf_hog.params]
n_estimators = 10
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One real predictor (members rf_hog and cnn_tiny, 3 fold models each)."""
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("hostile_run")
    data = write_toy_folder(root / "data", n_per_class=12)
    cfg = write_tiny_config(root / "cfg.toml", data, EXTRA)
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        _, out = run_from_args(str(cfg), out=str(root / "run"), show_progress=False)
    return out / "predictor"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_images")
    Image.fromarray(toy_arrays(1, 32, seed=4)[0][0]).save(root / "cell.png")
    return root


@pytest.fixture
def hostile(built, tmp_path):
    """``make(variant)``: a copy of the predictor with ``variant(folder)`` applied."""

    def make(variant):
        d = Path(shutil.copytree(built, tmp_path / "pred"))
        variant(d)
        return d

    return make


# ----------------------------------------------------------------------------- helpers


def _read(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def _seal(d: Path, man: dict) -> None:
    """Recompute the sha256 of every listed file, then the manifest's digest."""
    if isinstance(man.get("files"), dict):
        man["files"] = {rel: file_sha256(d / rel) for rel in man["files"]}
    if isinstance(man, dict):
        man["manifest_sha256"] = manifest_digest(man)
    (d / MANIFEST).write_text(json.dumps(man))


def manifest_edit(fn):
    """A variant editing the manifest (``fn(manifest)``), digests recomputed."""

    def variant(d):
        man = _read(d)
        fn(man)
        _seal(d, man)

    return variant


def file_edit(pattern: str, write, every: bool = False):
    """A variant replacing the first (or every) file matching ``pattern`` with
    ``write(file)``, checksums and digest recomputed."""

    def variant(d):
        files = sorted(d.rglob(pattern))
        for f in files if every else files[:1]:
            write(f)
        _seal(d, _read(d))

    return variant


def candidate_edit(member: str, fn):
    """A variant editing ``candidate.json`` of every fold model of ``member``."""

    def write(f):
        meta = json.loads(f.read_text())
        fn(meta)
        f.write_text(json.dumps(meta))

    return file_edit(f"members/{member}/*/candidate.json", write, every=True)


def raw_manifest(data: bytes):
    def variant(d):
        (d / MANIFEST).write_bytes(data)

    return variant


MARKER = Path("/tmp") / f"bloodbench-pickle-ran-{__name__}"


class _Payload:
    """Unpickling this creates MARKER: proof that a pickle was loaded."""

    def __reduce__(self):
        return open, (str(MARKER), "w")


def _write_pickle(f: Path) -> None:
    f.write_bytes(pickle.dumps(_Payload()))


def _write_untrusted_skops(f: Path) -> None:
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    sio.dump(FunctionTransformer(func=os.system), f)


def _write_keras(f: Path, *, size: int = 32, width: int = 3, lam: bool = False) -> None:
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs) if lam else inputs
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(width, activation="softmax")(x)).save(f)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _stacking_state() -> dict:
    from ensembles.stacking import Stacking

    rng = np.random.default_rng(0)
    probas = [rng.dirichlet(np.ones(3), 30) for _ in range(2)]
    return Stacking(C=1.0).fit(probas, np.arange(30) % 3).get_state()


def _set(path: str, value):
    """``fn(manifest)`` setting ``manifest[a][b]...`` (``path`` "a.b", ints index lists)."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def fn(man):
        obj = man
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value

    return fn


def _delete(key):
    return lambda man: man.pop(key)


def _cut_classes(man):
    man["classes"] = man["classes"][:2]


def _nested_manifest(d: Path) -> None:
    (d / "members" / "rf_hog" / "model0" / MANIFEST).write_text("{}")


def _cut_everywhere(d: Path) -> None:
    candidate_edit("*", lambda meta: meta.update(classes=meta["classes"][:2]))(d)
    manifest_edit(_cut_classes)(d)


# ----------------------------------------------------------------------------- the table
# id, variant, exit code of predict, exit code of inspect, fragment of the error line.
# inspect verifies and loads nothing: what only loading can find passes there (0).
VARIANTS = [
    # the manifest itself
    ("manifest_a_list", raw_manifest(b"[1, 2]"), 2, 2, "a JSON object was expected"),
    ("manifest_not_utf8", raw_manifest(b"\xff\xfe{"), 2, 2, "corrupt predictor manifest"),
    ("manifest_deeply_nested", raw_manifest(b"[" * 100_000), 2, 2, "corrupt predictor manifest"),
    ("format_a_string", manifest_edit(_set("format", "1")), 2, 2, "unsupported predictor format"),
    # fields of the wrong type or missing (digest recomputed)
    ("members_missing", manifest_edit(_delete("members")), 2, 2, "'members'"),
    ("members_an_object", manifest_edit(_set("members", {"rf_hog": {}})), 2, 2, "'members'"),
    ("member_a_string", manifest_edit(_set("members.0", "rf_hog")), 2, 2, "member 0"),
    (
        "member_models_a_string",
        manifest_edit(_set("members.0.models", "members/rf_hog/model0")),
        2,
        2,
        "'models'",
    ),
    ("member_models_empty", manifest_edit(_set("members.0.models", [])), 2, 2, "'models'"),
    ("member_listed_twice", manifest_edit(_set("members.1.name", "rf_hog")), 2, 2, "listed twice"),
    ("member_weight_a_string", manifest_edit(_set("members.0.weight", "0.5")), 2, 2, "'weight'"),
    ("member_weight_too_large", manifest_edit(_set("members.0.weight", 10**400)), 2, 2, "'weight'"),
    (
        "member_model_outside",
        manifest_edit(_set("members.0.models.0", "../..")),
        2,
        2,
        "outside its folder",
    ),
    ("files_a_list", manifest_edit(lambda m: m.update(files=list(m["files"]))), 2, 2, "'files'"),
    ("files_missing", manifest_edit(_delete("files")), 2, 2, "'files'"),
    ("classes_a_string", manifest_edit(_set("classes", "disc")), 2, 2, "'classes'"),
    ("classes_missing", manifest_edit(_delete("classes")), 2, 2, "'classes'"),
    ("ensemble_a_string", manifest_edit(_set("ensemble", "soft_voting")), 2, 2, "'ensemble'"),
    (
        "ensemble_state_a_list",
        manifest_edit(_set("ensemble.state", [0.5, 0.5])),
        2,
        2,
        "ensemble 'state'",
    ),
    (
        "ensemble_params_missing",
        manifest_edit(lambda m: m["ensemble"].pop("params")),
        2,
        2,
        "ensemble 'params'",
    ),
    ("image_size_a_string", manifest_edit(_set("image_size", "32")), 2, 2, "image_size"),
    ("image_size_disagrees", manifest_edit(_set("image_size", 64)), 2, 2, "differs"),
    (
        "preprocessing_unknown_step",
        manifest_edit(_set("preprocessing.sharpen", 1)),
        2,
        2,
        "unknown step",
    ),
    (
        "leaderboard_strings",
        manifest_edit(_set("leaderboard", {"accuracy": "high"})),
        2,
        2,
        "'leaderboard'",
    ),
    ("training_data_a_list", manifest_edit(_set("training_data", [])), 2, 2, "'training_data'"),
    (
        "temperature_negative",
        manifest_edit(_set("calibration", {"temperature": -1.0})),
        2,
        2,
        "temperature",
    ),
    # files the manifest does not list
    ("nested_manifest_json", _nested_manifest, 2, 2, "unexpected file"),
    # the members' classes
    ("classes_cut_short", manifest_edit(_cut_classes), 2, 2, "the manifest lists 2"),
    (
        "candidate_classes_cut_short",
        candidate_edit("cnn_tiny", lambda m: m.update(classes=[0, 1])),
        2,
        2,
        "the manifest lists 3",
    ),
    ("classes_cut_short_everywhere", _cut_everywhere, 2, 0, "2 classes"),
    (
        "candidate_json_a_list",
        file_edit("members/rf_hog/model0/candidate.json", lambda f: f.write_text("[]")),
        2,
        2,
        "candidate.json",
    ),
    (
        "candidate_json_corrupt",
        file_edit("members/rf_hog/model0/candidate.json", lambda f: f.write_text("{")),
        2,
        2,
        "candidate.json",
    ),
    # the ensemble (JSON state; built only when loading)
    (
        "ensemble_state_broken",
        manifest_edit(_set("ensemble.state", {"weights": "half"})),
        2,
        0,
        "cannot load ensemble",
    ),
    (
        "ensemble_state_empty",
        manifest_edit(_set("ensemble.state", {})),
        2,
        0,
        "cannot load ensemble",
    ),
    (
        "ensemble_weights_one_member",
        manifest_edit(_set("ensemble.state.weights", [1.0])),
        2,
        0,
        "cannot load ensemble",
    ),
    (
        "ensemble_weight_nan",
        manifest_edit(_set("ensemble.state.weights", [float("nan"), 0.5])),
        2,
        0,
        "cannot load ensemble",
    ),
    (
        "stacking_state_under_soft_voting",
        manifest_edit(_set("ensemble.state", _stacking_state())),
        2,
        0,
        "cannot load ensemble",
    ),
    (
        "soft_voting_state_under_stacking",
        manifest_edit(_set("ensemble.type", "stacking")),
        2,
        0,
        "cannot load ensemble",
    ),
    (
        "ensemble_type_a_candidate",
        manifest_edit(_set("ensemble.type", "feature_forest")),
        2,
        0,
        "not an ensemble type",
    ),
    (
        "ensemble_type_unknown",
        manifest_edit(_set("ensemble.type", "os.system")),
        2,
        0,
        "unknown type",
    ),
    (
        "ensemble_params_unknown",
        manifest_edit(_set("ensemble.params", {"evil": 1})),
        2,
        0,
        "cannot load ensemble",
    ),
    # the member models (loaded only by predict)
    (
        "skops_replaced_by_pickle",
        file_edit("model.skops", _write_pickle),
        2,
        0,
        "cannot load member rf_hog model 0",
    ),
    (
        "skops_with_untrusted_type",
        file_edit("model.skops", _write_untrusted_skops),
        2,
        0,
        "allow-list",
    ),
    (
        "skops_truncated",
        file_edit("model.skops", _truncate),
        2,
        0,
        "cannot load member rf_hog model 0",
    ),
    (
        "keras_replaced_by_pickle",
        file_edit("model.keras", _write_pickle),
        2,
        0,
        "cannot load member cnn_tiny model 0",
    ),
    (
        "keras_with_lambda_layer",
        file_edit("model.keras", lambda f: _write_keras(f, lam=True)),
        2,
        0,
        "cannot load member cnn_tiny model 0",
    ),
    (
        "keras_output_too_narrow",
        file_edit("model.keras", lambda f: _write_keras(f, width=2)),
        2,
        0,
        "outputs 2 class probabilities",
    ),
    (
        "keras_other_input_size",
        file_edit("model.keras", lambda f: _write_keras(f, size=16)),
        2,
        0,
        "16x16",
    ),
    (
        "keras_truncated",
        file_edit("model.keras", _truncate),
        2,
        0,
        "cannot load member cnn_tiny model 0",
    ),
    (
        "candidate_type_unknown",
        candidate_edit("rf_hog", _set("type", "evil")),
        2,
        0,
        "unknown type",
    ),
    (
        "candidate_type_an_ensemble",
        candidate_edit("rf_hog", _set("type", "soft_voting")),
        2,
        0,
        "'soft_voting' is not a candidate type",
    ),
    (
        "candidate_type_swapped",
        candidate_edit("rf_hog", _set("type", "scratch_cnn")),
        2,
        0,
        "cannot load member rf_hog model 0",
    ),
    (
        "candidate_params_unknown",
        candidate_edit("cnn_tiny", _set("params", {"evil": 1})),
        2,
        0,
        "cannot load member cnn_tiny model 0",
    ),
]


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_predictor_the_variants_start_from_is_valid(built, images, capsys):
    assert main(["predict", "--model", str(built), "--img_path", str(images)]) == 0
    assert "cell.png" in capsys.readouterr().out
    assert main(["inspect", str(built)]) == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    "variant, predict_rc, inspect_rc, fragment",
    [pytest.param(*row[1:], id=row[0]) for row in VARIANTS],
)
def test_hostile_predictor_is_one_error_line(
    hostile, images, capsys, variant, predict_rc, inspect_rc, fragment
):
    MARKER.unlink(missing_ok=True)
    d = hostile(variant)
    assert main(["predict", "--model", str(d), "--img_path", str(images)]) == predict_rc
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert fragment in line and str(d) in line, line
    assert not out.strip()  # no predictions from a refused predictor
    assert main(["inspect", str(d)]) == inspect_rc
    out, err = capsys.readouterr()
    if inspect_rc:
        line = _one_error_line(err)
        assert fragment in line and str(d) in line, line
    else:
        assert "Traceback" not in err and "error:" not in err, err
        assert "verified" in out
    assert not MARKER.exists(), "a pickle was loaded"


# ----------------------------------------------------------------------------- arguments


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model (or the predictor) is loaded."""
    import bench.commands.cli
    import ensembles.predictor

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(ensembles.predictor, "load_candidate", boom)
    monkeypatch.setattr(bench.commands.cli, "load_predictor", boom)


def _unreadable(tmp_path: Path) -> Path:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "a.png").write_bytes(b"nope")
    (d / "b.jpg").write_bytes(b"")
    return d


ARGUMENT_CASES = [
    # id, argv after --model (built from tmp_path and images), fragment
    ("out_is_a_folder", lambda t, i: ["--img_path", str(i), "--out", str(t)], "is a folder"),
    (
        "out_folder_missing",
        lambda t, i: ["--img_path", str(i), "--out", str(t / "no" / "p.csv")],
        "does not exist",
    ),
    ("img_path_missing", lambda t, i: ["--img_path", str(t / "none.png")], "--img_path not found"),
    (
        "img_path_missing_and_out_a_folder",
        lambda t, i: ["--img_path", str(t / "none"), "--out", str(t)],
        "--img_path not found",
    ),
    (
        "gradcam_is_a_file",
        lambda t, i: ["--img_path", str(i), "--gradcam", str(i / "cell.png")],
        "is a file",
    ),
    ("batch_size_zero", lambda t, i: ["--img_path", str(i), "--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize(
    "argv, fragment", [pytest.param(*row[1:], id=row[0]) for row in ARGUMENT_CASES]
)
def test_predict_arguments_are_checked_before_loading(
    built, images, tmp_path, capsys, no_loading, argv, fragment
):
    assert main(["predict", "--model", str(built), *argv(tmp_path, images)]) == 2
    out, err = capsys.readouterr()
    assert fragment in _one_error_line(err)
    assert not out.strip()


def test_empty_img_folder_is_refused_without_loading_models(built, tmp_path, capsys, no_loading):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(built), "--img_path", str(tmp_path / "empty")]) == 2
    assert "no image files" in _one_error_line(capsys.readouterr().err)


def test_all_unreadable_images_is_an_error(built, tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    rc = main(
        [
            "predict",
            "--model",
            str(built),
            "--img_path",
            str(_unreadable(tmp_path)),
            "--out",
            str(csv_path),
        ]
    )
    assert rc == 2
    out, err = capsys.readouterr()
    assert "could be read" in _one_error_line(err)
    assert err.count("skipped") == 2  # one warning per file, before the error
    assert err.rstrip().splitlines()[-1].startswith("error:")
    assert not csv_path.exists() and not out.strip()


def test_some_unreadable_images_still_predict_the_others(built, images, tmp_path, capsys):
    d = _unreadable(tmp_path)
    shutil.copy(images / "cell.png", d / "cell.png")
    csv_path = tmp_path / "p.csv"
    assert (
        main(["predict", "--model", str(built), "--img_path", str(d), "--out", str(csv_path)]) == 0
    )
    err = capsys.readouterr().err
    assert "error:" not in err and err.count("skipped") == 2
    assert "1 predictions and 2 unreadable file(s) (column error)" in err
    rows = list(csv.DictReader(open(csv_path)))  # every file has a row, in file order
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg", "cell.png"]
    assert [bool(r["error"]) for r in rows] == [True, True, False]
    assert rows[0]["prediction"] == "" and "a.png" in rows[0]["error"]
    assert rows[2]["prediction"] and float(rows[2]["confidence"]) > 0
