"""Hostile datasets, one table (in the style of scikit-learn's ``test_common``).

A module fixture writes every awkward input once (one-class sets, string/object/float/
negative/NaN labels, out-of-range pixels, too few images for the folds, symbolic links that
dangle, loop or point back into the dataset); each row of ``CASES`` says what must happen
when the runner prepares it: a one-line :class:`BenchError` carrying a message fragment, or
a dataset with the expected classes and skipped files (each also printed as a warning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.config import load_config
from bench.data.datasets import Dataset, check_classes, load_dataset, prepare_dataset
from core.errors import BenchError
from tests.conftest import toy_arrays, write_tiny_config, write_toy_folder

TOY = ["disc", "square", "stripes"]
ABC = np.array(["a", "b", "c"])
HAS_SYMLINKS = hasattr(os, "symlink") and os.name != "nt"
needs_symlinks = pytest.mark.skipif(not HAS_SYMLINKS, reason="symbolic links need POSIX")


@dataclass
class Refused:
    """prepare_dataset raises a one-line BenchError containing every fragment."""

    fragments: tuple[str, ...]

    def __init__(self, *fragments: str):
        self.fragments = fragments


@dataclass
class Loads:
    """prepare_dataset returns these classes (with these counts) and skipped reasons."""

    classes: list[str] = field(default_factory=lambda: list(TOY))
    counts: list[int] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # source -> reason


# ----------------------------------------------------------------------------- inputs


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _images(n_per_class=6, size=16, n_classes=3):
    return toy_arrays(n_per_class, size, n_classes=n_classes)


def _one_class_folder(d: Path) -> Path:
    images, _ = _images()
    (d / "only").mkdir(parents=True)
    for i, im in enumerate(images[:6]):
        Image.fromarray(im).save(d / "only" / f"{i}.png")
    return d


def _object_array(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _folder_with(d: Path, n_per_class=6) -> Path:
    return write_toy_folder(d, n_per_class=n_per_class, size=16)


def _symlink(target, link: Path) -> None:
    os.symlink(target, link)


def _dangling(d):
    root = _folder_with(d)
    _symlink("/nonexistent/bloodbench/gone.png", root / "disc" / "gone.png")
    return root


def _self_loop(d):
    root = _folder_with(d)
    _symlink("self.png", root / "disc" / "self.png")
    return root


def _two_link_loop(d):
    root = _folder_with(d)
    _symlink("pong.png", root / "square" / "ping.png")
    _symlink("ping.png", root / "square" / "pong.png")
    return root


def _zloop(d):
    root = _folder_with(d)
    _symlink(".", root / "zloop")
    return root


def _links_back_inside(d):
    root = _folder_with(d)
    _symlink("..", root / "disc" / "up")  # the dataset root
    _symlink("../square", root / "disc" / "sq")  # another class folder
    _symlink("../..", root / "disc" / "above")  # a folder holding the dataset
    return root


def _external_folder(d):
    root = _folder_with(d / "data")
    ext = d / "elsewhere"
    ext.mkdir()
    images, _ = _images(2)
    for i in range(2):
        Image.fromarray(images[i]).save(ext / f"more_{i}.png")
    _symlink(ext, ext / "again")  # loops back into itself
    _symlink(ext, root / "disc" / "more")  # followed: outside the dataset
    return root


def _external_class_folder(d):
    root = _folder_with(d / "data")
    ext = d / "elsewhere" / "blast"
    ext.mkdir(parents=True)
    images, _ = _images(3)
    for i in range(3):
        Image.fromarray(images[i]).save(ext / f"b_{i}.png")
    _symlink(ext, root / "blast")  # a class kept elsewhere: followed
    return root


def _top_level_strays(d):
    root = _folder_with(d)
    _symlink("/nonexistent/bloodbench/class", root / "ghost")
    (root / "README.txt").write_text("notes")
    return root


def _class_of_broken_links(d):
    root = _folder_with(d)
    (root / "empty_links").mkdir()
    _symlink("/nonexistent/x.png", root / "empty_links" / "x.png")
    return root


def _npz_case(**arrays):
    return lambda d: _npz(d.with_suffix(".npz"), **arrays)


def _labels():
    return _images()[1]


def _pixels(dtype, scale=1.0, corner=None):
    """The toy images as ``dtype`` times ``scale``, with pixel [0, 0, 0, 0] set to ``corner``."""
    images = (_images()[0].astype(np.float64) * scale).astype(dtype)
    if corner is not None:
        images[0, 0, 0, 0] = corner
    return images


CASES = {
    # -- too few classes or images ------------------------------------------------------
    "one_class_folder": (
        _one_class_folder,
        Refused("one class ('only', 6 image(s))", "at least two classes"),
    ),
    "one_class_npz": (
        _npz_case(images=_images()[0][:6], labels=np.zeros(6, int), classes=np.array(["a"])),
        Refused("one class ('a', 6 image(s))", "at least two classes"),
    ),
    "too_few_for_5_folds": (
        lambda d: _folder_with(d, n_per_class=3),
        Refused("class 'disc' has 3 image(s), fewer than [run] folds = 5"),
    ),
    "npz_class_without_images": (
        _npz_case(images=_images()[0], labels=_labels(), classes=np.array(["a", "b", "c", "d"])),
        Refused("class 'd' has 0 image(s)", "[run] folds = 3"),
    ),
    # -- labels ---------------------------------------------------------------------------
    "string_labels": (
        _npz_case(images=_images()[0], labels=ABC[_labels()], classes=ABC),
        Loads(["a", "b", "c"], [6, 6, 6]),
    ),
    "bytes_labels": (
        _npz_case(images=_images()[0], labels=ABC[_labels()].astype("S"), classes=ABC.astype("S")),
        Loads(["a", "b", "c"], [6, 6, 6]),
    ),
    "string_labels_unknown": (
        _npz_case(images=_images()[0], labels=np.array(["a", "b", "zz"])[_labels()], classes=ABC),
        Refused("1 label name(s) not in 'classes'", "'zz'"),
    ),
    "string_labels_no_classes": (
        _npz_case(images=_images()[0], labels=ABC[_labels()]),
        Refused("labels are names", "no 'classes' array"),
    ),
    "object_labels": (
        _npz_case(images=_images()[0], labels=_object_array(_labels())),
        Refused("'labels' is an array of Python objects (dtype=object)"),
    ),
    "object_classes": (
        _npz_case(images=_images()[0], labels=_labels(), classes=_object_array(["a", "b", "c"])),
        Refused("'classes' is an array of Python objects"),
    ),
    "object_images": (
        _npz_case(images=_object_array(list(_images()[0])), labels=_labels()),
        Refused("'images' is an array of Python objects"),
    ),
    "float_labels": (
        _npz_case(images=_images()[0], labels=_labels() + 0.7),
        Refused("whole class numbers", "0.7 at row 0"),
    ),
    "integral_float_labels": (
        _npz_case(images=_images()[0], labels=_labels().astype(float)),
        Loads(["class_0", "class_1", "class_2"], [6, 6, 6]),
    ),
    "negative_labels": (
        _npz_case(images=_images()[0], labels=_labels() - 1, classes=ABC),
        Refused("6 label(s) are negative", "-1 at row 0"),
    ),
    "nan_labels": (
        _npz_case(images=_images()[0], labels=np.where(_labels() == 2, np.nan, 1.0), classes=ABC),
        Refused("6 label(s) are NaN"),
    ),
    "labels_out_of_range": (
        _npz_case(images=_images()[0], labels=_labels() + 1, classes=ABC),
        Refused("label 3 (row 12) is out of range of the 3 class names", "0..2"),
    ),
    "one_hot_labels": (
        _npz_case(images=_images()[0], labels=np.eye(3, dtype=int)[_labels()]),
        Refused("'labels' has shape (18, 3)", "one class per image"),
    ),
    "labels_count_mismatch": (
        _npz_case(images=_images()[0], labels=_labels()[:-1]),
        Refused("18 images but 17 labels"),
    ),
    "medmnist_multilabel": (
        _npz_case(train_images=_images()[0], train_labels=np.eye(3, dtype=int)[_labels()]),
        Refused("'train_labels' has shape (18, 3)"),
    ),
    # -- pixels ---------------------------------------------------------------------------
    "negative_int16_pixels": (
        _npz_case(images=_pixels(np.int16, corner=-7), labels=_labels()),
        Refused("'images' (int16) has pixel values from -7 to", "0..255 or 0..65535"),
    ),
    "float_pixels_over_255": (
        _npz_case(images=_pixels(np.float32, corner=300.5), labels=_labels()),
        Refused("to 300.5;", "float images must be in 0..1", "or 0..255"),
    ),
    "negative_float_pixels": (
        _npz_case(images=_pixels(np.float32, 1 / 255, corner=-0.25), labels=_labels()),
        Refused("(float32) has pixel values from -0.25 to"),
    ),
    "nan_pixels": (
        _npz_case(images=_pixels(np.float32, 1 / 255, corner=np.nan), labels=_labels()),
        Refused("1 NaN or infinite pixel value(s)"),
    ),
    "uint32_over_16_bit": (
        _npz_case(images=_pixels(np.uint32, corner=70000), labels=_labels()),
        Refused("(uint32) has pixel values from", "to 70000;", "0..65535"),
    ),
    "bool_images": (
        _npz_case(images=_images()[0] > 128, labels=_labels()),
        Refused("'images' has dtype bool"),
    ),
    "uint16_pixels": (
        _npz_case(images=_images()[0].astype(np.uint16) * 257, labels=_labels()),
        Loads(["class_0", "class_1", "class_2"], [6, 6, 6]),
    ),
    "float_0_1_pixels": (
        _npz_case(images=_images()[0].astype(np.float32) / 255, labels=_labels()),
        Loads(["class_0", "class_1", "class_2"], [6, 6, 6]),
    ),
    "float_0_255_pixels": (
        _npz_case(images=_images()[0].astype(np.float64), labels=_labels()),
        Loads(["class_0", "class_1", "class_2"], [6, 6, 6]),
    ),
    # -- symbolic links and stray files -------------------------------------------------
    "dangling_symlink": (
        _dangling,
        Loads(counts=[6, 6, 6], skipped={"disc/gone.png": "broken symbolic link"}),
    ),
    "self_loop_symlink": (
        _self_loop,
        Loads(counts=[6, 6, 6], skipped={"disc/self.png": "symbolic link loop"}),
    ),
    "two_link_loop": (
        _two_link_loop,
        Loads(
            counts=[6, 6, 6],
            skipped={
                "square/ping.png": "symbolic link loop",
                "square/pong.png": "symbolic link loop",
            },
        ),
    ),
    "zloop_to_root": (
        _zloop,
        Loads(counts=[6, 6, 6], skipped={"zloop": "symbolic link to a folder inside the dataset"}),
    ),
    "links_back_inside": (
        _links_back_inside,
        Loads(
            counts=[6, 6, 6],
            skipped={
                "disc/up": "symbolic link to a folder inside the dataset",
                "disc/sq": "symbolic link to a folder inside the dataset",
                "disc/above": "symbolic link loop",
            },
        ),
    ),
    "external_folder_link": (
        _external_folder,
        Loads(counts=[8, 6, 6], skipped={"disc/more/again": "symbolic link loop"}),
    ),
    "external_class_folder": (_external_class_folder, Loads(["blast", *TOY], [3, 6, 6, 6])),
    "top_level_strays": (
        _top_level_strays,
        Loads(
            counts=[6, 6, 6],
            skipped={"ghost": "broken symbolic link", "README.txt": "not in a class folder"},
        ),
    ),
    "class_of_broken_links": (
        _class_of_broken_links,
        Refused("class 'empty_links'", "no readable images", "1 skipped", "broken symbolic link"),
    ),
}
SYMLINK_CASES = {
    "dangling_symlink",
    "self_loop_symlink",
    "two_link_loop",
    "zloop_to_root",
    "links_back_inside",
    "external_folder_link",
    "external_class_folder",
    "top_level_strays",
    "class_of_broken_links",
}
FOLDS = {"too_few_for_5_folds": 5}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """Every input of ``CASES``, written once: name -> path."""
    base = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (make, _) in CASES.items():
        if name in SYMLINK_CASES and not HAS_SYMLINKS:
            continue
        (base / name).mkdir()
        paths[name] = Path(make(base / name / "data"))
    return paths


def _config(tmp_path: Path, data: Path, folds: int = 3, extra: str = ""):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[run]\nfolds = {folds}\n[data]\npath = "{data}"\nimage_size = 16\n{extra}[profiles.p]\n'
    )
    return load_config(cfg, profile="p")


def _case_params():
    for name in CASES:
        marks = [needs_symlinks] if name in SYMLINK_CASES else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", _case_params())
def test_hostile_input(name, hostile, tmp_path, capsys):
    _, expected = CASES[name]
    cfg = _config(tmp_path, hostile[name], folds=FOLDS.get(name, 3))
    if isinstance(expected, Refused):
        with pytest.raises(BenchError) as err:
            prepare_dataset(cfg, show_progress=False)
        msg = str(err.value)
        assert "\n" not in msg
        for fragment in expected.fragments:
            assert fragment in msg, f"{fragment!r} not in {msg!r}"
        return
    ds, _ = prepare_dataset(cfg, show_progress=False)
    assert ds.classes == expected.classes
    if expected.counts is not None:
        assert np.bincount(ds.labels, minlength=len(ds.classes)).tolist() == expected.counts
    assert {s["path"]: s["reason"] for s in ds.skipped} == expected.skipped
    shown = capsys.readouterr()
    for src, reason in expected.skipped.items():  # every skipped file is shown to the user
        assert f"skipped {src}: {reason}" in shown.err + shown.out
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (16, 16, 3)


@needs_symlinks
@pytest.mark.parametrize("name", ["dangling_symlink", "zloop_to_root", "external_folder_link"])
def test_skipped_links_survive_the_cache(name, hostile, tmp_path):
    """A second load (from the cache) lists the same skipped files."""
    first = load_dataset(hostile[name], image_size=16, cache_dir=tmp_path, show_progress=False)
    second = load_dataset(hostile[name], image_size=16, cache_dir=tmp_path, show_progress=False)
    assert isinstance(second.images, np.memmap)
    assert second.skipped == first.skipped and second.sources == first.sources


@needs_symlinks
def test_new_broken_link_is_listed_after_a_cached_load(tmp_path):
    root = _folder_with(tmp_path / "data", n_per_class=3)
    load_dataset(root, image_size=16, cache_dir=tmp_path / "c", show_progress=False)
    _symlink("/nonexistent/new.png", root / "disc" / "new.png")
    ds = load_dataset(root, image_size=16, cache_dir=tmp_path / "c", show_progress=False)
    assert ds.skipped == [{"path": "disc/new.png", "reason": "broken symbolic link"}]


def test_max_images_keeps_enough_per_class(hostile, tmp_path):
    ds, _ = prepare_dataset(
        _config(tmp_path, hostile["uint16_pixels"], folds=3, extra="max_images = 9\n"),
        show_progress=False,
    )
    assert np.bincount(ds.labels).min() >= 3


def test_check_classes_names_the_subsampling():
    ds = Dataset(
        np.zeros((4, 2, 2, 3), np.uint8), np.array([0, 0, 0, 1]), ["a", "b"], [], [], "x", "k"
    )
    with pytest.raises(
        BenchError,
        match=r"class 'b' has 1 image\(s\) after \[data\] "
        r"max_images = 4, fewer than \[run\] folds = 2",
    ):
        check_classes(ds, 2, after=" after [data] max_images = 4")
    check_classes(ds, 1)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["one_class_folder", "object_labels"])
def test_cli_refuses_before_training(name, hostile, tmp_path, capsys):
    from bench.commands.cli import main

    cfg = write_tiny_config(tmp_path / "tiny.toml", hostile[name])
    out = tmp_path / "out"
    code = main(["run", "--config", str(cfg), "--data", str(hostile[name]), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (out / "units").exists()
