"""``bench export``: a predictor of CNN members (two CNNs, stacking on log-probabilities,
flip views, temperature) as one ONNX graph that onnxruntime runs with the Keras predictor's
probabilities; what ONNX cannot hold is refused in one line before any conversion."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tf2onnx", reason="bench export needs tf2onnx (bloodbench[export])")
ort = pytest.importorskip("onnxruntime", reason="bench export needs onnxruntime")
onnx = pytest.importorskip("onnx", reason="bench export needs onnx")

from bench.commands.cli import main  # noqa: E402
from ensembles.export import TOLERANCE, _views_tf  # noqa: E402
from ensembles.predictor import load_predictor  # noqa: E402
from ensembles.tta import VIEWS  # noqa: E402
from tests.conftest import toy_arrays, write_tiny_config  # noqa: E402

CNN_ONLY = """
[candidates.cnn_tiny2]
type = "scratch_cnn"
params = { blocks = 1, filters = 6, dense_units = 8, epochs = 6, patience = 6, batch_size = 16, learning_rate = 0.005 }

[ensembles.stack_cnn]
type = "stacking"
members = "cnn"
inputs = "log_proba"

[predictor]
ensemble = "stack_cnn"
tta = "flips"
temperature_scaling = true

[profiles.tiny.candidates.cnn_tiny.params]
epochs = 6
"""


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, toy_folder):
    root = tmp_path_factory.mktemp("export_run")
    cfg = write_tiny_config(root / "cfg.toml", toy_folder, CNN_ONLY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        argv = ["run", "--config", str(cfg), "--only", "cnn_tiny,cnn_tiny2", "--out"]
        assert main(argv + [str(root / "run")]) == 0
    return root / "run"


def test_the_tensorflow_views_are_the_numpy_views():
    import tensorflow as tf

    x = np.random.default_rng(0).integers(0, 255, (2, 5, 5, 3)).astype(np.uint8)
    for name, fn in _views_tf(tf).items():
        np.testing.assert_array_equal(fn(tf.constant(x)).numpy(), VIEWS[name](x), err_msg=name)


def test_export_runs_in_onnxruntime_with_the_predictors_probabilities(cnn_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(cnn_run), "--out", str(out), "--n", "64"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}") and "images/s" in said
    pred = load_predictor(cnn_run / "predictor")
    assert pred.tta == "flips" and pred.record.temperature  # the graph carries both
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert model.producer_name == "bloodbench"
    assert meta["bloodbench.ensemble"] == "stack_cnn"
    assert '"image_size": 32' in meta["bloodbench.preprocessing"]
    # fresh toy images, preprocessed as the metadata says
    images, _ = toy_arrays(8, 32, seed=21)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    want = pred.predict_proba(images, preprocessed=True)
    assert got.shape == want.shape == (24, 3)
    assert np.max(np.abs(got - want)) <= TOLERANCE
    assert np.allclose(got.sum(axis=1), 1, atol=1e-5)
    # a second export replaces bench export's own file; another file is never overwritten
    assert main(["export", "--model", str(cnn_run), "--out", str(out), "--n", "8"]) == 0
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"not ours")
    assert main(["export", "--model", str(cnn_run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "is not an ONNX file bench export wrote" in err and mine.read_bytes() == b"not ours"


def test_what_onnx_cannot_hold_is_refused_in_one_line(tmp_path, toy_folder, capsys):
    cfg = write_tiny_config(tmp_path / "c.toml", toy_folder, "[report]\nenabled = false\n")
    assert (
        main(["run", "--config", str(cfg), "--only", "rf_hog", "--out", str(tmp_path / "r")]) == 0
    )
    capsys.readouterr()
    out = tmp_path / "x.onnx"
    assert main(["export", "--model", str(tmp_path / "r"), "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("--model")]
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "rf_hog (feature_forest)" in err[0] and "bench distill" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".x.onnx*"))
    for bad, why in (
        (["--out", str(tmp_path / "x.txt")], "ending in .onnx"),
        (["--out", str(tmp_path / "r" / "predictor" / "x.onnx")], "inside the predictor"),
        (["--out", str(out), "--n", "0"], "--n must be at least 1"),
    ):
        assert main(["export", "--model", str(tmp_path / "r"), *bad]) == 2
        assert why in capsys.readouterr().err
