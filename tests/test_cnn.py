"""CNN candidates: learning, augmentation, pruning, transfer weights, embedding cache."""

from __future__ import annotations

import re

import numpy as np
import optuna
import pytest

import cnn  # noqa: F401  (the package declares its candidate types)
from core import registry
from core.errors import BenchError
from tests.conftest import SHARED, toy_arrays

WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_imagenet_notop.weights.h5"
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"shared ImageNet weights not found: {WEIGHTS}"
)


def tiny_scratch(**kw):
    from cnn.candidate import ScratchCNN

    params = dict(
        blocks=2,
        filters=8,
        dense_units=16,
        dropout=0.1,
        epochs=10,
        patience=10,
        batch_size=16,
        learning_rate=0.005,
        augment="none",
        seed=0,
    )
    return ScratchCNN(**{**params, **kw})


def test_scratch_cnn_learns_above_chance_and_reloads(tmp_path):
    from core.candidate import load_candidate

    X, y = toy_arrays(20, 32, seed=0)
    Xt, yt = toy_arrays(10, 32, seed=1)
    cand = tiny_scratch(augment="flips").fit(X, y, workdir=tmp_path / "unit")
    acc = (cand.predict(Xt) == yt).mean()
    assert acc >= 0.7, acc  # chance is 1/3
    log = (tmp_path / "unit" / "epochs.csv").read_text().splitlines()
    assert len(log) == cand.epochs_run_ + 1 and log[0].startswith("epoch")
    assert (tmp_path / "unit" / "checkpoint.keras").is_file()
    cand.save(tmp_path / "model")
    again = load_candidate(tmp_path / "model")
    np.testing.assert_allclose(again.predict_proba(Xt), cand.predict_proba(Xt), atol=1e-6)


def test_augmentation_active_in_training_only():
    from cnn.augment import build_augmentation
    from cnn.models import build_scratch_cnn

    aug = build_augmentation("strong", seed=1)
    assert [lyr.name for lyr in aug.layers][:2] == ["aug_flip", "aug_rot90"]
    model = build_scratch_cnn(32, 3, blocks=2, filters=4, augmentation=aug)
    X, _ = toy_arrays(4, 32, seed=2)
    x = X.astype("float32")
    a, b = np.asarray(model(x, training=False)), np.asarray(model(x, training=False))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)  # a no-op
    changed = np.asarray(aug(x, training=True))
    assert changed.shape == x.shape and np.abs(changed - x).mean() > 1.0


def test_rot90_layer_draws_square_symmetries():
    from cnn.augment import RandomTranspose

    x = np.arange(2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3).repeat(16, axis=0)
    out = np.asarray(RandomTranspose(seed=0)(x, training=True))
    swapped = [np.array_equal(o, xi.transpose(1, 0, 2)) for o, xi in zip(out, x)]
    same = [np.array_equal(o, xi) for o, xi in zip(out, x)]
    assert all(s or t for s, t in zip(same, swapped)) and 0 < sum(swapped) < len(x)


@pytest.mark.parametrize(
    "spec,match",
    [("wild", "unknown preset"), ({"spin": 1}, "unknown key"), ({"zoom": 2.0}, "'zoom' must be")],
)
def test_bad_augmentation_spec_is_one_clear_error(spec, match):
    from cnn.augment import build_augmentation

    with pytest.raises(BenchError, match=match):
        build_augmentation(spec)


def test_pruning_stops_a_hopeless_trial():
    X, y = toy_arrays(12, 24, seed=3)
    Xv, yv = toy_arrays(6, 24, seed=4)
    epochs = 8
    seen: dict[int, int] = {}

    def objective(trial):
        # trial 0 learns; trial 1 has a learning rate far too small to learn anything
        lr = 0.01 if trial.number == 0 else 1e-7
        cand = tiny_scratch(
            learning_rate=lr,
            optimizer="sgd" if trial.number else "adam",
            epochs=epochs,
            patience=epochs,
        )

        def report(epoch, logs):
            seen[trial.number] = epoch + 1
            trial.report(logs["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}")

        cand.fit(X, y, Xv, yv, epoch_callbacks=[report])
        return max(cand.history_["val_accuracy"])

    study = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.optimize(objective, n_trials=2)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and first.value > 0.6
    assert second.state == optuna.trial.TrialState.PRUNED
    assert seen[1] < epochs


def test_param_spaces_sample_valid_candidates():
    for name in ("scratch_cnn", "transfer_frozen", "transfer_finetune"):
        cls = registry.get(name)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
        params = cls.param_space(trial)
        assert params and "learning_rate" in params
        cand = cls(**params)  # every sampled key is a constructor parameter
        assert cand.get_params()["learning_rate"] == params["learning_rate"]


def test_block_names_of_known_architectures():
    from cnn.transfer import block_key

    assert block_key("block_13_expand_relu") == "block_13"  # MobileNetV2
    assert block_key("block6a_expand_conv") == "block6a"  # EfficientNet
    assert block_key("conv5_block3_2_conv") == "conv5_block3"  # ResNet, DenseNet
    assert block_key("conv_pw_13_bn") == "13"  # MobileNet v1
    assert block_key("mixed10") == "mixed10"  # Inception
    assert block_key("Conv_1") is None


def test_preprocess_layer_is_the_backbones_own():
    import keras

    from cnn.backbones import BackbonePreprocess

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    for name, mod in [
        ("MobileNetV2", keras.applications.mobilenet_v2),
        ("ResNet50", keras.applications.resnet50),
        ("DenseNet121", keras.applications.densenet),
    ]:
        ref = np.asarray(mod.preprocess_input(x.copy()))
        np.testing.assert_allclose(
            np.asarray(BackbonePreprocess(name)(x)), ref, rtol=1e-5, atol=1e-4
        )
    np.testing.assert_array_equal(np.asarray(BackbonePreprocess("EfficientNetLite0")(x)), x)
    with pytest.raises(BenchError, match="unknown backbone 'NoSuchNet'"):
        BackbonePreprocess("NoSuchNet")


def test_missing_weights_file_names_the_file(tmp_path):
    from cnn.transfer import FrozenTransferCNN

    missing = tmp_path / "mobilenet_v2_missing.weights.h5"
    X, y = toy_arrays(3, 32)
    with pytest.raises(
        BenchError, match=r"weights file not found: .*mobilenet_v2_missing\.weights\.h5"
    ):
        FrozenTransferCNN(weights=str(missing), alpha=0.35).fit(X, y)


def test_imagenet_download_failure_names_the_file(monkeypatch):
    from keras.src.utils import file_utils

    from cnn.backbones import build_backbone

    def offline(fname, origin=None, **kw):
        raise Exception(
            f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known"
        )

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(
        BenchError, match=r"put mobilenet_v2_weights_\S+_0\.35_224_no_top\.h5 into"
    ) as err:
        build_backbone("MobileNetV2", 32, "imagenet", alpha=0.35)
    with pytest.raises(BenchError, match="no ImageNet weights.*efficientnet_lite0"):
        build_backbone("EfficientNetLite0", 32, "imagenet")
    named = re.findall(r"[\w.]+_imagenet_notop\.weights\.h5", str(err.value))
    assert "mobilenet_v2_0.35_imagenet_notop.weights.h5" in named
    if (SHARED / "weights").is_dir():  # the hint names only files that are there
        assert [f for f in named if not (SHARED / "weights" / f).is_file()] == []


def test_config_resolves_weights_relative_to_its_folder(tmp_path):
    from bench.config import load_config

    (tmp_path / "w").mkdir()
    cfg = tmp_path / "sub" / "bench.toml"
    cfg.parent.mkdir()
    cfg.write_text(
        '[candidates.t]\ntype = "transfer_frozen"\n'
        'params = { weights = "../w/x.weights.h5" }\n'
        '[candidates.i]\ntype = "transfer_frozen"\nparams = { weights = "imagenet" }\n'
        '[profiles.p]\ndescription = ""\n'
    )
    c = load_config(cfg, profile="p")
    assert c.candidates["t"].params["weights"] == str(tmp_path / "w" / "x.weights.h5")
    assert c.candidates["i"].params["weights"] == "imagenet"


@needs_weights
def test_backbone_weights_from_a_path_are_loaded():
    import keras

    from cnn.backbones import build_backbone

    base = build_backbone("MobileNetV2", 32, str(WEIGHTS), alpha=0.35)
    ref = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    random_w = [w.copy() for w in ref.get_weights()]
    ref.load_weights(str(WEIGHTS))
    for a, b in zip(base.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(base.get_weights(), random_w))
    assert base.name == "backbone"


@needs_weights
def test_frozen_transfer_learns_caches_embeddings_and_saves_raw_image_model(tmp_path, monkeypatch):
    from core.candidate import load_candidate
    from cnn import embeddings
    from cnn.transfer import FrozenTransferCNN

    X, y = toy_arrays(15, 32, seed=5)
    Xt, yt = toy_arrays(8, 32, seed=6)
    cand = FrozenTransferCNN(
        weights=str(WEIGHTS),
        alpha=0.35,
        input_size=48,
        dense_units=32,
        dropout=0.1,
        epochs=25,
        patience=8,
        batch_size=16,
        learning_rate=0.01,
        seed=0,
    )
    cand.prepare(np.concatenate([X, Xt]))
    assert list(embeddings.store_dir().glob("*.npz"))

    def fail(*a, **k):
        raise AssertionError("embeddings were recomputed instead of read from the cache")

    fresh = FrozenTransferCNN(**cand.get_params())
    monkeypatch.setattr(fresh, "_ensure_backbone", fail)
    assert fresh.embed(Xt).shape == (len(Xt), 1280)  # all from the store, no backbone
    cand.fit(X, y)
    assert (cand.predict(Xt) == yt).mean() >= 0.7
    cand.save(tmp_path / "m")
    again = load_candidate(tmp_path / "m")  # full model: raw uint8 images in
    assert again.model_.input_shape == (None, 32, 32, 3)
    np.testing.assert_allclose(again.predict_proba(Xt), cand.predict_proba(Xt), atol=1e-4)


@needs_weights
def test_finetune_trains_head_then_top_blocks_only(tmp_path):
    from cnn.transfer import FineTuneTransferCNN

    X, y = toy_arrays(8, 32, seed=7)
    cand = FineTuneTransferCNN(
        weights=str(WEIGHTS),
        alpha=0.35,
        input_size=32,
        dense_units=16,
        head_epochs=1,
        epochs=1,
        unfreeze_blocks=1,
        batch_size=12,
        augment="flips",
        seed=0,
    )
    from cnn.backbones import build_backbone

    before = {
        lyr.name: [w.copy() for w in lyr.get_weights()]
        for lyr in build_backbone("MobileNetV2", 32, str(WEIGHTS), alpha=0.35).layers
    }
    cand.fit(X, y, workdir=tmp_path)
    assert cand.unfrozen_blocks_ == ["block_16"] and cand.epochs_run_ == 2
    base = cand.model_.get_layer("backbone")
    moved = {
        lyr.name
        for lyr in base.layers
        if any(
            not np.array_equal(a, b) for a, b in zip(lyr.get_weights(), before.get(lyr.name, []))
        )
    }
    assert "block_16_project" in moved and "Conv_1" in moved  # top block trained
    assert not any(n.startswith(("block_15", "block_1_", "Conv1")) for n in moved)
    assert not any("_bn" in n or n.endswith("BN") for n in moved)  # BN kept frozen
    rows = (tmp_path / "epochs.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("1,")  # both phases logged


EFFL0 = SHARED / "weights" / "efficientnet_lite0_imagenet_notop.weights.h5"


@pytest.mark.skipif(not EFFL0.is_file(), reason=f"shared ImageNet weights not found: {EFFL0}")
def test_finetune_of_efficientnet_lite0_trains_its_top_block_only(tmp_path):
    """[candidates.tl_effl0_finetune]: EfficientNet-Lite0's own blocks (block1a .. block7a)
    are what `unfreeze_blocks` counts; the top one trains, batch norm and the rest do not."""
    from keras import layers

    from cnn.backbones import build_backbone
    from cnn.transfer import FineTuneTransferCNN

    X, y = toy_arrays(8, 32, seed=7)
    before = {
        lyr.name: [w.copy() for w in lyr.get_weights()]
        for lyr in build_backbone("EfficientNetLite0", 32, str(EFFL0)).layers
    }
    cand = FineTuneTransferCNN(
        backbone="EfficientNetLite0",
        weights=str(EFFL0),
        input_size=32,
        dense_units=16,
        head_epochs=1,
        epochs=1,
        unfreeze_blocks=1,
        batch_size=12,
        seed=0,
    )
    cand.fit(X, y, workdir=tmp_path)
    assert cand.unfrozen_blocks_ == ["block7a"] and cand.epochs_run_ == 2
    base = cand.model_.get_layer("backbone")
    moved = {
        lyr.name
        for lyr in base.layers
        if any(
            not np.array_equal(a, b) for a, b in zip(lyr.get_weights(), before.get(lyr.name, []))
        )
    }
    assert any(n.startswith("block7a") for n in moved)
    assert not any(n.startswith(("block6", "block1a", "stem")) for n in moved)
    assert not any(isinstance(base.get_layer(n), layers.BatchNormalization) for n in moved)
    assert cand.predict_proba(X).shape == (len(X), len(np.unique(y)))


@needs_weights
def test_runner_prepares_embeddings_in_a_child_process(tmp_path, monkeypatch):
    """The runner computes frozen-backbone embeddings in a spawned child (TensorFlow's memory
    goes with it); the parent then reads every embedding from the shared cache."""
    from bench.run.prepare import prepare_candidates
    from cnn import embeddings
    from cnn.transfer import FrozenTransferCNN

    monkeypatch.setenv("BLOODBENCH_CACHE", str(tmp_path / "cache"))
    X, _ = toy_arrays(3, 32, seed=8)
    np.save(tmp_path / "images.npy", X)
    images = np.load(tmp_path / "images.npy", mmap_mode="r")  # as the dataset cache holds them
    params = {"backbone": "MobileNetV2", "alpha": 0.35, "weights": str(WEIGHTS), "input_size": 32}
    seconds = prepare_candidates({"tf": {"type": "transfer_frozen", "params": params}}, images)
    assert list(seconds) == ["tf"] and seconds["tf"] > 0
    assert list(embeddings.store_dir().glob("*.npz"))

    def fail(*a, **k):
        raise AssertionError("embeddings were recomputed instead of read from the cache")

    cand = FrozenTransferCNN(**params)
    monkeypatch.setattr(cand, "_ensure_backbone", fail)
    assert cand.embed(np.asarray(X)).shape == (len(X), 1280)


def test_release_memory_frees_the_graphs_of_trained_models():
    """Each Keras train step registers a TensorFlow custom gradient whose closure holds the
    traced graph (TensorFlow issue 97697); release_memory must drop them, or every model a
    worker trains stays in its memory."""
    import gc

    from tensorflow.python.framework import func_graph, ops

    from core.candidate import release_memory

    def train_graphs():
        gc.collect()
        return sum(
            isinstance(o, func_graph.FuncGraph) and o.name.startswith("one_step")
            for o in gc.get_objects()
        )

    def custom_gradients():
        return sum(str(n).startswith("CustomGradient-") for n in ops._gradient_registry._registry)

    X, y = toy_arrays(8, 16, seed=0)
    release_memory()
    before = train_graphs()
    for _ in range(2):
        cand = tiny_scratch(epochs=1, patience=1).fit(X, y)
        assert cand.predict_proba(X).shape == (len(X), 3)
        del cand
    assert custom_gradients() > 0 and train_graphs() > before  # what leaked before the fix
    release_memory()
    assert custom_gradients() == 0
    assert train_graphs() == before
    # a model trained after the purge still learns its gradients
    cand = tiny_scratch(epochs=3, patience=3).fit(X, y)
    assert np.isfinite(cand.predict_proba(X)).all()
