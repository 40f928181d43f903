"""Classical baselines: accuracy above chance, probabilities, saving without pickle, no leaks."""

from __future__ import annotations

import numpy as np
import pytest
import skops.io as sio
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from baselines.models import MODEL_FILE, FeatureForest, FeatureSVM, FeatureXGB
from core.candidate import build_candidate, load_candidate
from core.errors import BenchError
from features import extract
from tests.conftest import toy_arrays

SPEC = {"color": {"bins": 8}, "hog": {"pixels_per_cell": 8}}


@pytest.fixture(scope="module")
def data():
    X, y = toy_arrays(14, 32, seed=0)
    Xt, yt = toy_arrays(8, 32, seed=1)
    return X, y, Xt, yt


MODELS = [
    ("feature_svm", {"kernel": "rbf"}),
    ("feature_svm", {"kernel": "linear", "pca": 0.9}),
    ("feature_xgb", {"n_estimators": 40, "max_depth": 3, "n_jobs": 1}),
    ("feature_forest", {"n_estimators": 40}),
]


@pytest.mark.parametrize("type_,params", MODELS)
def test_baseline_learns_and_round_trips(type_, params, data, tmp_path):
    X, y, Xt, yt = data
    cand = build_candidate({"type": type_, "params": {"features": SPEC, **params}})
    cand.fit(X, y, classes=np.arange(4))  # class 3 never seen in training
    p = cand.predict_proba(Xt)
    assert p.shape == (len(Xt), 4)
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
    assert (p[:, 3] == 0).all()
    assert (cand.predict(Xt) == yt).mean() > 0.8  # chance is 1/3
    assert cand.model_size() > 0
    cand.save(tmp_path / "m")
    again = load_candidate(tmp_path / "m")
    assert type(again) is type(cand)
    np.testing.assert_allclose(again.predict_proba(Xt), p, atol=1e-6)


def test_xgb_saved_as_native_json(data, tmp_path):
    X, y, _, _ = data
    FeatureXGB(features=SPEC, n_estimators=5, n_jobs=1).fit(X, y).save(tmp_path)
    import json

    assert "learner" in json.loads((tmp_path / "xgb.json").read_text())


def test_xgb_reports_validation_accuracy(data):
    X, y, Xt, yt = data
    seen = []
    FeatureXGB(features=SPEC, n_estimators=20, report_every=5, n_jobs=1).fit(
        X, y, X_val=Xt, y_val=yt, epoch_callbacks=[lambda e, logs: seen.append((e, logs))]
    )
    assert [e for e, _ in seen] == [4, 9, 14, 19]
    assert all(0 <= logs["val_accuracy"] <= 1 for _, logs in seen)
    assert seen[-1][1]["val_accuracy"] > 0.8


def test_svm_pca_components_and_bad_kernel(data):
    X, y, _, _ = data
    svm = FeatureSVM(features=SPEC, pca=5).fit(X, y)
    assert svm.pipeline_["pca"].n_components_ == 5
    with pytest.raises(BenchError, match="kernel"):
        FeatureSVM(features=SPEC, kernel="poly").fit(X, y)


def test_imputer_scaler_pca_see_only_training_rows(data):
    """The no-leak rule: steps fitted in a fold never see that fold's test rows."""
    X, y, Xt, yt = data
    Xt = Xt.copy()
    Xt[:, :, :, 0] = 255  # test rows unlike any training row
    svm = FeatureSVM(features=SPEC, pca=4).fit(X, y)
    F_train = extract(X, SPEC)
    F_all = extract(np.concatenate([X, Xt]), SPEC)
    imp, scale = svm.pipeline_["impute"], svm.pipeline_["scale"]
    assert scale.n_samples_seen_ == len(X)
    np.testing.assert_allclose(scale.mean_, F_train.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(scale.mean_, F_all.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(imp.statistics_, np.nanmedian(F_train, axis=0), atol=1e-6)
    assert svm.pipeline_["pca"].n_samples_ == len(X)
    mean_before = scale.mean_.copy()
    svm.predict_proba(Xt)  # predicting does not refit anything
    np.testing.assert_array_equal(scale.mean_, mean_before)


def test_nan_features_are_imputed(data):
    X, y, Xt, _ = data
    Xb = X.copy()
    Xb[::3] = 200  # blank images: segmentation fails
    spec = {"morphology": {}, "color": {"bins": 4}}
    assert np.isnan(extract(Xb, spec)).any()
    for cand in (
        FeatureSVM(features=spec),
        FeatureForest(features=spec, n_estimators=10),
        FeatureXGB(features=spec, n_estimators=10, n_jobs=1),
    ):
        p = cand.fit(Xb, y).predict_proba(Xt)
        assert np.isfinite(p).all()


def _custom_function(a):
    return a


def test_model_with_types_outside_the_allow_list_is_refused(data, tmp_path):
    X, y, _, _ = data
    rf = FeatureForest(features=SPEC, n_estimators=3).fit(X, y)
    rf.save(tmp_path)
    evil = Pipeline(
        [("f", FunctionTransformer(_custom_function).fit(extract(X, SPEC)))] + rf.pipeline_.steps
    )
    sio.dump(evil, tmp_path / MODEL_FILE)
    with pytest.raises(BenchError, match="allow-list"):
        load_candidate(tmp_path)


def test_missing_feature_set_is_one_clear_error(data):
    X, y, _, _ = data
    with pytest.raises(BenchError, match="features"):
        FeatureSVM().fit(X, y)


def test_xgboost_takes_the_workers_share_of_the_cores(monkeypatch):
    """XGBoost's own default is every core, whatever OpenMP says: two benchmark workers
    (OMP_NUM_THREADS=1 each) would each run as many threads as the machine has cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert FeatureXGB(features=SPEC)._booster().get_params()["n_jobs"] == 1
    assert FeatureXGB(features=SPEC, n_jobs=3)._booster().get_params()["n_jobs"] == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert FeatureXGB(features=SPEC)._booster().get_params()["n_jobs"] is None


def test_feature_models_crop_to_the_centre_before_extracting(tmp_path):
    """``crop``: features of the central window only, so a repainted frame changes no
    probability; the saved model crops again when it is loaded."""
    import numpy as np
    from baselines.models import FeatureForest
    from core.candidate import load_candidate
    from core.images import center_crop, crop_side
    from tests.conftest import toy_arrays

    X, y = toy_arrays(12, 32, seed=0)
    assert center_crop(X, 0.5).shape == (len(X), 16, 16, 3) and crop_side(32, 0.5) == 16
    assert center_crop(X, 1.0) is X
    spec = {"color": {"bins": 8, "spaces": ["rgb"], "moments": True}}
    cand = FeatureForest(features=spec, n_estimators=30, crop=0.5).fit(X, y)
    framed = X.copy()
    framed[:, :8] = framed[:, -8:] = framed[:, :, :8] = framed[:, :, -8:] = (250, 120, 240)
    np.testing.assert_array_equal(cand.predict_proba(framed), cand.predict_proba(X))
    whole = FeatureForest(features=spec, n_estimators=30).fit(X, y)
    assert not np.array_equal(whole.predict_proba(framed), whole.predict_proba(X))
    cand.save(tmp_path / "m")
    np.testing.assert_array_equal(
        load_candidate(tmp_path / "m").predict_proba(framed), cand.predict_proba(X)
    )
