"""Loading class folders and npz files: conversions, skipped files, cache, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data.datasets import load_dataset, stratified_subset
from core.errors import BenchError
from tests.conftest import SHARED, toy_arrays, write_toy_folder


def test_folder_loads_classes_sorted_and_resized(toy_folder, tmp_path):
    ds = load_dataset(toy_folder, image_size=24, cache_dir=tmp_path)
    assert ds.classes == ["disc", "square", "stripes"]
    assert ds.images.shape == (60, 24, 24, 3) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [20, 20, 20]
    assert ds.sources[0] == "disc/disc_0000.png"
    assert ds.summary()["original_sizes"] == {"32x32": 60}


def test_split_folders_are_merged(tmp_path):
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_toy_folder(tmp_path / "data" / split, n_per_class=3, seed=seed)
    ds = load_dataset(tmp_path / "data", image_size=16, cache_dir=tmp_path / "c")
    assert len(ds) == 27 and ds.classes == ["disc", "square", "stripes"]
    assert {s.split("/")[0] for s in ds.sources} == {"train", "val", "test"}


def test_modes_are_converted_and_bad_files_skipped(tmp_path):
    root = write_toy_folder(tmp_path / "data", n_per_class=4)
    d = root / "disc"
    rgb = np.asarray(Image.open(d / "disc_0000.png"))
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")  # L
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(d / "deep16.png")  # I;16
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes((d / "disc_0001.png").read_bytes()[:60])
    ds = load_dataset(root, image_size=32, cache_dir=tmp_path / "c")
    assert len(ds) == 12 + 3
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in ds.skipped}
    assert set(skipped) == {"empty.jpg", "notes.txt", "broken.jpg"}
    assert skipped["empty.jpg"] == "empty file" and skipped["notes.txt"] == "not an image"
    modes = {c["path"].split("/")[-1]: c["mode"] for c in ds.converted}
    assert modes["gray.png"] == "L" and modes["rgba.png"] == "RGBA"
    assert modes["deep16.png"].startswith("I")
    row = ds.sources.index("disc/gray.png")
    assert np.array_equal(
        ds.images[row][..., 0], ds.images[row][..., 2]
    )  # gray -> 3 equal channels
    row16 = ds.sources.index("disc/deep16.png")
    assert abs(int(ds.images[row16][..., 0].astype(int).mean()) - int(rgb[..., 1].mean())) <= 1
    rgba = ds.images[ds.sources.index("disc/rgba.png")].astype(int)
    assert (rgba >= rgb.astype(int) - 1).all()  # half-transparent on white is lighter


def test_second_load_uses_cache_without_decoding(toy_folder, tmp_path, monkeypatch):
    first = load_dataset(toy_folder, image_size=20, cache_dir=tmp_path)
    import bench.data.datasets as mod

    monkeypatch.setattr(mod, "read_rgb", lambda *a, **k: pytest.fail("decoded again"))
    second = load_dataset(toy_folder, image_size=20, cache_dir=tmp_path)
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(first.images, second.images)
    assert first.content_hash == second.content_hash


def test_changed_file_invalidates_cache(tmp_path):
    root = write_toy_folder(tmp_path / "data", n_per_class=3)
    a = load_dataset(root, image_size=16, cache_dir=tmp_path / "c")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "disc" / "disc_0000.png")
    b = load_dataset(root, image_size=16, cache_dir=tmp_path / "c")
    assert a.content_hash != b.content_hash and b.images[0].max() == 0


def test_npz_plain_and_medmnist(tmp_path):
    images, labels = toy_arrays(5, 28)
    np.savez(
        tmp_path / "plain.npz",
        images=images,
        labels=labels,
        classes=np.array(["a", "b", "c"]),
        files=np.array([f"f{i}.png" for i in range(15)]),
    )
    ds = load_dataset(tmp_path / "plain.npz", image_size=28, cache_dir=tmp_path / "c")
    assert ds.classes == ["a", "b", "c"] and ds.sources[3] == "f3.png" and len(ds) == 15
    assert np.array_equal(ds.images, images)
    np.savez(
        tmp_path / "med.npz",
        train_images=images[:9],
        train_labels=labels[:9, None],
        val_images=images[9:12],
        val_labels=labels[9:12, None],
        test_images=images[12:],
        test_labels=labels[12:, None],
    )
    med = load_dataset(
        tmp_path / "med.npz", image_size=16, cache_dir=tmp_path / "c", classes=["x", "y", "z"]
    )
    assert med.images.shape == (15, 16, 16, 3) and med.classes == ["x", "y", "z"]
    assert med.sources[9] == "npz:val/0" and np.array_equal(med.labels, labels)


def test_npz_grayscale_is_converted(tmp_path):
    images, labels = toy_arrays(4, 16)
    np.savez(tmp_path / "g.npz", images=images[..., 0], labels=labels)
    ds = load_dataset(tmp_path / "g.npz", image_size=16, cache_dir=tmp_path / "c")
    assert ds.images.shape == (12, 16, 16, 3) and ds.classes == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "data not found"),
        (
            lambda p: (p / "x.csv").write_text("a") and p / "x.csv",
            "folder of class folders or an .npz",
        ),
        (lambda p: (p / "flat").mkdir() or p / "flat", "no class folders"),
        (lambda p: (p / "e" / "cls").mkdir(parents=True) or p / "e", "class folder is empty"),
        (lambda p: (p / "bad.npz").write_bytes(b"nonsense") and p / "bad.npz", "cannot read npz"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, make, message):
    with pytest.raises(BenchError, match=message) as err:
        load_dataset(make(tmp_path), cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)


def test_class_with_only_corrupt_files_is_an_error(tmp_path):
    root = write_toy_folder(tmp_path / "data", n_per_class=3)
    (root / "junk").mkdir()
    (root / "junk" / "a.jpg").write_bytes(b"xx")
    with pytest.raises(BenchError, match="class 'junk' .* no readable images"):
        load_dataset(root, cache_dir=tmp_path / "c")


def test_stratified_subset_keeps_proportions():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    rows = stratified_subset(labels, 100, seed=1, min_per_class=10)
    assert np.bincount(labels[rows]).tolist() == [50, 30, 20]
    assert np.array_equal(rows, stratified_subset(labels, 100, seed=1, min_per_class=10))


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found: {SHARED}")
def test_shipped_datasets_on_shared_data_name_files_and_columns_that_exist():
    """Every [datasets.*] of benchmarks.toml that reads ../shared names a path, label
    column and groups file that are there, so `--data NAME` does not fail on a stale entry."""
    import pandas as pd

    from bench.config import load_config, read_toml

    root = Path(__file__).resolve().parents[1]
    names = [
        n
        for n, e in read_toml(root / "benchmarks.toml")["datasets"].items()
        if str(e.get("path", "")).startswith("../shared/")
    ]
    assert {"pbc", "deepapl", "deepapl_pbc_classes", "deepapl_apl"} <= set(names)
    for name in names:
        data = load_config(root / "benchmarks.toml", data=name).data.model_dump()
        assert (root / data["path"]).exists(), name
        for key in ("labels", "cell_types"):
            if data.get(key):
                csv, column = data[key].rsplit(":", 1)
                assert column in pd.read_csv(root / csv, nrows=1).columns, (name, key)
        for key in ("groups", "pairs"):
            if data.get(key):
                assert (root / data[key]).is_file(), (name, key)
