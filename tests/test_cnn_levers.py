"""Robustness levers of the scratch CNN: stain and colour augmentation, normalisation layers."""

from __future__ import annotations

import numpy as np
from pathlib import Path
import pytest

from core.errors import BenchError
from tests.conftest import toy_arrays

NEW_SPECS = [
    {"hed": 0.1},
    {"hed_bias": 0.1},
    {"grayscale": 1.0},
    {"blur": 1.5},
    {"jpeg": 1.0},
    "stain",
    "robust",
]
NEW_LAYERS = {
    "hed": "aug_hed",
    "grayscale": "aug_grayscale",
    "blur": "aug_blur",
    "jpeg": "aug_jpeg",
}


def tiny_scratch(**kw):
    from cnn.candidate import ScratchCNN

    params = dict(
        blocks=2,
        filters=8,
        dense_units=16,
        dropout=0.1,
        epochs=4,
        patience=4,
        batch_size=16,
        learning_rate=0.005,
        augment="none",
        seed=0,
    )
    return ScratchCNN(**{**params, **kw})


@pytest.mark.parametrize("spec", NEW_SPECS, ids=str)
def test_new_augmentations_act_in_training_and_are_the_identity_at_inference(spec):
    from cnn.augment import build_augmentation
    from cnn.models import build_scratch_cnn

    X, _ = toy_arrays(4, 32, seed=2)
    x = X.astype("float32")
    aug = build_augmentation(spec, seed=1)
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    changed = np.asarray(aug(x, training=True))
    assert changed.shape == x.shape and changed.dtype == np.float32
    assert 0 <= changed.min() and changed.max() <= 255
    assert np.abs(changed - x).mean() > 1.0
    model = build_scratch_cnn(32, 3, blocks=2, filters=4, augmentation=aug)
    a, b = np.asarray(model(x, training=False)), np.asarray(model(x, training=False))
    np.testing.assert_array_equal(a, b)


def test_stain_preset_holds_the_stain_levers_and_old_presets_are_unchanged():
    from cnn.augment import PRESETS, build_augmentation

    names = [lyr.name for lyr in build_augmentation("stain", seed=0).layers]
    assert names == [
        "aug_flip",
        "aug_rot90",
        "aug_hed",
        "aug_hue",
        "aug_saturation",
        "aug_grayscale",
        "aug_blur",
        "aug_clip",
    ]
    robust = [lyr.name for lyr in build_augmentation("robust", seed=0).layers]
    assert set(names) < set(robust) and {"aug_zoom", "aug_brightness"} <= set(robust)
    assert robust[-1] == "aug_clip"
    colour = [lyr.name for lyr in build_augmentation("colour", seed=0).layers]
    assert colour == ["aug_flip", "aug_rot90", "aug_hue", "aug_saturation"]
    old = {"flip", "rot90", "zoom", "translate", "brightness", "contrast", "hue", "saturation"}
    for preset in ("none", "flips", "light", "default", "strong"):
        assert set(PRESETS[preset]) <= old
    assert PRESETS["default"] == {
        "flip": True,
        "rot90": True,
        "zoom": 0.1,
        "translate": 0.05,
        "brightness": 0.1,
        "contrast": 0.1,
        "hue": 0.02,
        "saturation": 0.1,
    }


def test_hed_jitter_of_zero_strength_returns_the_input():
    from cnn.augment import RandomHEDJitter

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 16, 16, 3)).astype("float32")
    x[0] = 0
    x[1] = 255
    x[2, ..., 0] = 0  # saturated channels next to bright ones
    out = np.asarray(RandomHEDJitter(0.0, 0.0, seed=0)(x, training=True))
    assert np.abs(out - x).max() <= 1.0


def test_hed_jitter_uses_skimage_stain_matrices_and_draws_per_image():
    from skimage.color import hed_from_rgb, rgb_from_hed

    from cnn.augment import HED_FROM_RGB, RGB_FROM_HED, RandomHEDJitter

    np.testing.assert_array_equal(RGB_FROM_HED, rgb_from_hed)
    np.testing.assert_array_equal(HED_FROM_RGB, hed_from_rgb)
    x = np.repeat(toy_arrays(1, 24, seed=3)[0][:1].astype("float32"), 4, axis=0)
    out = np.asarray(RandomHEDJitter(0.2, 0.2, seed=0)(x, training=True))
    assert len({round(float(o.mean()), 3) for o in out}) == len(out)  # one draw per image


def test_grayscale_blur_and_jpeg_do_what_they_say():
    from cnn.augment import RandomGaussianBlur, RandomGrayscale, RandomJPEG

    X, _ = toy_arrays(3, 32, seed=4)
    x = X.astype("float32")
    gray = np.asarray(RandomGrayscale(1.0, seed=0)(x, training=True))
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-4)
    np.testing.assert_allclose(gray[..., 0], x @ np.array([0.2989, 0.587, 0.114]), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(RandomGrayscale(0.0, seed=0)(x, training=True)), x)
    blur = np.asarray(RandomGaussianBlur(2.0, seed=0)(x, training=True))
    grad = lambda a: np.abs(np.diff(a, axis=2)).mean(axis=(1, 2, 3))  # noqa: E731
    assert (grad(blur) < grad(x)).all()  # smoother images
    np.testing.assert_allclose(blur.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=2.0)
    jpeg = np.asarray(RandomJPEG(1.0, seed=0)(x, training=True))
    assert 0 < np.abs(jpeg - x).mean() < 20
    np.testing.assert_array_equal(np.asarray(RandomJPEG(0.0, seed=0)(x, training=True)), x)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"blur": 5}, r"'blur' must be a number in \[0, 3\]"),
        ({"grayscale": 1.5}, "'grayscale' must be"),
        ({"hed": -0.1}, "'hed' must be"),
        ({"jpeg": "yes"}, "'jpeg' must be"),
    ],
)
def test_bad_values_of_the_new_keys_are_one_clear_error(spec, match):
    from cnn.augment import build_augmentation

    with pytest.raises(BenchError, match=match):
        build_augmentation(spec)


def test_models_with_the_new_layers_reload_with_safe_mode(tmp_path):
    import keras

    from cnn.augment import build_augmentation
    from cnn.models import build_scratch_cnn

    X, _ = toy_arrays(2, 24, seed=5)
    x = X.astype("float32")
    spec = {"flip": True, "hed": 0.1, "hed_bias": 0.05, "grayscale": 0.5, "blur": 1.0, "jpeg": 0.5}
    model = build_scratch_cnn(
        24,
        3,
        blocks=1,
        filters=4,
        dense_units=0,
        augmentation=build_augmentation(spec, seed=3),
        norm="group",
    )
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    np.testing.assert_allclose(
        np.asarray(again(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6
    )
    aug = again.get_layer("augment")
    ref = model.get_layer("augment")
    for key, name in NEW_LAYERS.items():
        a, b = aug.get_layer(name), ref.get_layer(name)
        assert type(a) is type(b) and a.get_config() == b.get_config(), key
    assert aug.get_layer("aug_hed").bias == 0.05
    assert np.abs(np.asarray(aug(x, training=True)) - x).mean() > 1.0  # still random


def test_norm_batch_is_the_default_and_builds_the_same_model():
    from keras import layers

    from cnn.models import build_scratch_cnn, group_count

    default = build_scratch_cnn(24, 3, blocks=2, filters=4)
    batch = build_scratch_cnn(24, 3, blocks=2, filters=4, norm="batch")
    assert default.get_config() == batch.get_config()
    assert [lyr.name for lyr in default.layers if isinstance(lyr, layers.BatchNormalization)] == [
        "block1_bn1",
        "block2_bn1",
    ]
    assert tiny_scratch().norm == "batch"
    assert [group_count(c) for c in (32, 12, 6, 9, 7, 1)] == [8, 6, 6, 3, 7, 1]
    group = build_scratch_cnn(24, 3, blocks=2, filters=12, norm="group")
    assert [lyr.groups for lyr in group.layers if isinstance(lyr, layers.GroupNormalization)] == [
        6,
        8,
    ]  # 12 and 24 channels
    with pytest.raises(ValueError, match="norm must be one of"):
        build_scratch_cnn(24, 3, norm="instance")


@pytest.mark.parametrize(
    "norm,layer_type", [("group", "GroupNormalization"), ("layer", "LayerNormalization")]
)
def test_group_and_layer_norm_learn_above_chance(norm, layer_type, tmp_path):
    from core.candidate import load_candidate

    X, y = toy_arrays(24, 24, seed=0)
    Xt, yt = toy_arrays(8, 24, seed=1)
    # 4 epochs: seeds 0-4 reached 0.54-1.0 (layer) and 0.67-1.0 (group); seed 0 gets 1.0
    cand = tiny_scratch(norm=norm, filters=16, batch_size=8, learning_rate=0.003).fit(X, y)
    kinds = {type(lyr).__name__ for lyr in cand.model_.layers}
    assert layer_type in kinds and "BatchNormalization" not in kinds
    acc = (cand.predict(Xt) == yt).mean()
    assert acc >= 0.6, acc  # chance is 1/3
    cand.save(tmp_path / "m")
    again = load_candidate(tmp_path / "m")
    assert again.norm == norm
    np.testing.assert_allclose(again.predict_proba(Xt), cand.predict_proba(Xt), atol=1e-6)


def test_stain_augmentation_and_jpeg_train_inside_fit():
    X, y = toy_arrays(6, 24, seed=6)
    cand = tiny_scratch(
        augment={
            "flip": True,
            "rot90": True,
            "hed": 0.1,
            "hue": 0.1,
            "saturation": 0.3,
            "grayscale": 0.2,
            "blur": 1.0,
            "jpeg": 0.5,
        },
        epochs=2,
        patience=2,
    )
    cand.fit(X, y)
    assert cand.epochs_run_ == 2 and np.isfinite(cand.history_["loss"]).all()


def test_unknown_norm_is_refused_in_one_line():
    from core.params import validate_params
    from cnn.candidate import ScratchCNN

    validate_params(ScratchCNN, {"norm": "group", "augment": "stain"}, "candidates.cnn")
    with pytest.raises(BenchError) as err:
        validate_params(ScratchCNN, {"norm": "instance"}, "candidates.cnn")
    msg = str(err.value)
    assert "\n" not in msg and "norm" in msg and "'instance'" in msg
    assert "['batch', 'group', 'layer']" in msg


def test_reinhard_stain_normalisation_learns_and_undoes_a_stain_shift(tmp_path):
    """The target comes from the training images; a saved model normalises any input, so
    a paler, pinker copy of an image gives nearly the same probabilities."""
    import keras
    from cnn.candidate import ScratchCNN
    from cnn.stain import lab_stats, rgb_to_lab
    from core.candidate import load_candidate
    from tests.conftest import toy_arrays

    X, y = toy_arrays(16, 24, seed=0)
    cand = ScratchCNN(
        blocks=2,
        filters=8,
        dense_units=16,
        epochs=6,
        batch_size=16,
        learning_rate=0.005,
        augment="none",
        stain_norm="reinhard",
        seed=0,
    )
    cand.fit(X, y)
    target = lab_stats(X, seed=0)
    assert np.allclose(cand.stain_target_["mean"], lab_stats(X, seed=0)["mean"], atol=2)
    Xt, yt = toy_arrays(8, 24, seed=1)
    assert (cand.predict(Xt) == yt).mean() > 0.6  # it learned (chance 1/3)
    x = Xt.astype(np.float64)
    pink = np.clip(0.7 * x + 0.3 * np.array([255, 215, 235]), 0, 255).astype(np.uint8)
    layer = cand.model_.get_layer("input_layers").get_layer("stain_norm")
    a = keras.ops.convert_to_numpy(rgb_to_lab(layer(Xt.astype("float32")) / 255.0))
    b = keras.ops.convert_to_numpy(rgb_to_lab(layer(pink.astype("float32")) / 255.0))
    assert np.abs(a.mean(axis=(1, 2)) - b.mean(axis=(1, 2))).max() < 1.0  # cast removed
    assert np.allclose(a.mean(axis=(0, 1, 2)), target["mean"], atol=3)
    cand.save(tmp_path / "m")
    again = load_candidate(tmp_path / "m")
    np.testing.assert_allclose(again.predict_proba(Xt), cand.predict_proba(Xt), atol=1e-6)
    np.save(tmp_path / "x.npy", Xt)  # a fresh process, where nothing imported cnn.stain yet
    import subprocess
    import sys

    code = (
        "import numpy as np; from core.candidate import load_candidate; "
        f"print(load_candidate({str(tmp_path / 'm')!r}).predict_proba("
        f"np.load({str(tmp_path / 'x.npy')!r})).argmax(1).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[1]),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(cand.predict_proba(Xt).argmax(1).tolist())


def test_stain_norm_must_be_known():
    from cnn.candidate import ScratchCNN
    from core.errors import BenchError
    from core.params import validate_params

    with pytest.raises(BenchError, match="stain_norm: expected one of"):
        validate_params(ScratchCNN, {"stain_norm": "macenko"}, "x")


def test_adabn_reestimates_batchnorm_statistics_on_new_images():
    """After adapt(), each trainable batch-norm layer's moving mean and variance are the
    statistics of its inputs on the new images (layers before it already adapted)."""
    import keras
    from cnn.adapt import batchnorm_layers
    from cnn.candidate import ScratchCNN
    from tests.conftest import toy_arrays

    X, y = toy_arrays(12, 24, seed=0)
    cand = ScratchCNN(
        blocks=2, filters=8, dense_units=16, epochs=3, batch_size=16, augment="none", seed=0
    ).fit(X, y)
    Xs = np.clip(0.6 * X.astype(np.float64) + 0.4 * np.array([255, 200, 230]), 0, 255)
    Xs = Xs.astype(np.uint8)
    before = cand.predict_proba(Xs)
    assert cand.adaptable and cand.adapt(Xs) == len(batchnorm_layers(cand.model_)) == 2
    for bn in batchnorm_layers(cand.model_):
        h = keras.ops.convert_to_numpy(keras.Model(cand.model_.inputs, bn.input)(Xs))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_mean), h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_variance),
            h.var(axis=(0, 1, 2)),
            rtol=1e-3,
            atol=1e-4,
        )
    assert not np.allclose(cand.predict_proba(Xs), before)


def _new_frame(X, side, value=(250, 120, 240)):
    """``X`` with everything outside its central ``side`` x ``side`` window repainted."""
    out = X.copy()
    n = X.shape[1]
    top = (n - side) // 2
    keep = out[:, top : top + side, top : top + side].copy()
    out[:] = np.array(value, np.uint8)
    out[:, top : top + side, top : top + side] = keep
    return out


def test_centre_crop_learns_from_the_centre_and_ignores_the_frame(tmp_path):
    """With ``crop``, the saved model sees only the centre of each image: it still learns,
    and repainting the frame around the crop window (another lab's background) changes
    no probability; without the crop the same repaint changes them."""
    from core.images import crop_side
    from core.candidate import load_candidate

    X, y = toy_arrays(16, 32, seed=0)
    Xt, yt = toy_arrays(8, 32, seed=1)
    cand = tiny_scratch(epochs=6, crop=0.6, augment="flips").fit(X, y)
    names = [lyr.name for lyr in cand.model_.layers]
    assert names.index("augment") < names.index("center_crop") < names.index("rescale")
    side = crop_side(32, 0.6)
    assert side == 19 and cand.model_.get_layer("center_crop").output.shape[1] == side
    assert (cand.predict(Xt) == yt).mean() > 0.6  # learned (chance 1/3)
    framed = _new_frame(Xt, side)
    np.testing.assert_array_equal(cand.predict_proba(framed), cand.predict_proba(Xt))
    whole = tiny_scratch(epochs=2).fit(X, y)
    assert "center_crop" not in [lyr.name for lyr in whole.model_.layers]
    assert np.abs(whole.predict_proba(framed) - whole.predict_proba(Xt)).max() > 1e-3
    cand.save(tmp_path / "m")
    again = load_candidate(tmp_path / "m")
    np.testing.assert_allclose(again.predict_proba(framed), cand.predict_proba(Xt), atol=1e-6)


def test_gradcam_of_a_cropped_model_covers_the_crop_window_only():
    from core.images import crop_side

    X, y = toy_arrays(8, 32, seed=0)
    cand = tiny_scratch(epochs=1, crop=0.5).fit(X, y)
    cam = cand.explain(X[:4])
    side, top = crop_side(32, 0.5), (32 - crop_side(32, 0.5)) // 2
    assert cam.shape == (4, 32, 32)
    inside = cam[:, top : top + side, top : top + side]
    outside = cam.copy()
    outside[:, top : top + side, top : top + side] = 0
    assert np.all(outside == 0) and inside.max() > 0


def test_transfer_crop_is_in_the_embedder_the_cache_key_and_the_saved_model(tmp_path):
    from cnn.transfer import FineTuneTransferCNN, FrozenTransferCNN
    from core.candidate import load_candidate

    X, y = toy_arrays(6, 32, seed=3)
    whole = FrozenTransferCNN(weights="none", alpha=0.35, input_size=32, crop=1.0)
    cropped = FrozenTransferCNN(weights="none", alpha=0.35, input_size=32, crop=0.5)
    assert "crop" not in whole._spec(32) and cropped._spec(32)["crop"] == 0.5
    side = 16
    framed = _new_frame(X, side)
    np.testing.assert_allclose(cropped.embed(framed), cropped.embed(X), atol=1e-5)
    cropped.set_params(epochs=1, dense_units=8, use_cache=False).fit(X, y)
    key, trunk, _ = cropped.inference_parts()
    assert trunk.get_layer("center_crop").output.shape[1] == 16
    whole_key = FrozenTransferCNN(**{**cropped.get_params(), "crop": 1.0})
    whole_key.model_, whole_key.crop = cropped.model_, 1.0  # same weights, another crop
    assert whole_key.inference_parts()[0] != key  # fused inference never shares their trunk
    tuned = FineTuneTransferCNN(
        weights="none",
        alpha=0.35,
        input_size=32,
        dense_units=8,
        head_epochs=1,
        epochs=0,
        batch_size=8,
        crop=0.5,
        seed=0,
    )
    tuned.fit(X, y)
    assert tuned.model_.get_layer("center_crop").output.shape[1] == side
    tuned.save(tmp_path / "ft")
    again = load_candidate(tmp_path / "ft")
    np.testing.assert_allclose(again.predict_proba(framed), tuned.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("crop", [0, 1.5, -0.2])
def test_crop_must_be_a_share_of_the_side(crop):
    from cnn.candidate import ScratchCNN
    from baselines.models import FeatureForest, FeatureSVM, FeatureXGB
    from cnn.transfer import FineTuneTransferCNN, FrozenTransferCNN
    from core.params import validate_params

    for cls in (
        ScratchCNN,
        FineTuneTransferCNN,
        FrozenTransferCNN,
        FeatureForest,
        FeatureSVM,
        FeatureXGB,
    ):
        with pytest.raises(BenchError) as err:
            validate_params(cls, {"crop": crop}, "candidates.x.params")
        assert "\n" not in str(err.value) and "crop" in str(err.value)


def test_cell_crop_frames_every_nucleus_the_same_whatever_its_size_and_place():
    """Two dark discs of radius 6 (off-centre) and 14 (centred): in the cell crop each
    fills the share a disc of its window predicts (pi / (2 * scale)^2), and a scale of
    1.0 frames it tighter than 2.0."""
    from cnn.models import CellCrop

    size = 64
    yy, xx = np.mgrid[:size, :size]
    X = np.full((2, size, size, 3), [235, 220, 210], np.uint8)
    for i, (cy, cx, r) in enumerate([(20, 40, 6), (32, 32, 14)]):
        X[i][np.hypot(yy - cy, xx - cx) <= r] = [90, 40, 140]
    for scale in (1.5, 2.0):
        out = np.asarray(CellCrop(scale)(X))
        share = (out[..., 1] < 130).mean(axis=(1, 2))
        np.testing.assert_allclose(share, np.pi / (2 * scale) ** 2, rtol=0.08)
    assert out.shape == X.shape


def test_cell_crop_and_weight_averaging_train_save_and_reload(tmp_path):
    """A scratch CNN with the cell crop learns the toy classes and reloads to the same
    probabilities; weight averaging keeps the averaged weights: with a momentum of 0.999
    over a few dozen steps they barely leave their start (chance), with 0.5 they learn."""
    from cnn.candidate import ScratchCNN
    from core.candidate import load_candidate

    X, y = toy_arrays(20, 32, seed=0)
    small = dict(
        blocks=2,
        filters=8,
        dense_units=16,
        epochs=6,
        patience=6,
        batch_size=16,
        learning_rate=0.005,
        seed=0,
    )
    cand = ScratchCNN(cell_crop=2.0, **small).fit(X, y)
    assert cand.model_.get_layer("cell_crop") is not None
    assert (cand.predict_proba(X).argmax(1) == y).mean() > 0.8
    cand.save(tmp_path / "m")
    np.testing.assert_allclose(
        load_candidate(tmp_path / "m").predict_proba(X), cand.predict_proba(X), atol=1e-5
    )
    # a fresh process (as the run's main process and the predictor load it): the layer is
    # registered by loading the candidate alone
    import subprocess
    import sys

    code = (
        "import sys; from core.candidate import load_candidate; "
        "m = load_candidate(sys.argv[1]); print(m.model_.get_layer('cell_crop').scale)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("2.0"), done.stderr[-500:]
    frozen = ScratchCNN(ema=0.999, **small).fit(X, y)
    moving = ScratchCNN(ema=0.5, **small).fit(X, y)
    assert (frozen.predict_proba(X).argmax(1) == y).mean() < 0.5
    assert (moving.predict_proba(X).argmax(1) == y).mean() > 0.8
