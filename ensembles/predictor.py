"""The saved ensemble predictor: what users keep after a benchmark.

A predictor directory is self-describing and verified on load::

    predictor/
      manifest.json                 members, weights, classes, input size, preprocessing,
                                    training data summary, package versions, sha256 of files
      members/<name>/fold<k>/...    each member's fitted fold models (candidate.json + model)

Members are the **fold models** of the cross-validation (each member's probability is
the mean over its fold models): the exact models whose out-of-fold scores are on the
leaderboard, bagged, with no extra training. Nothing is unpickled: Keras models load
with ``safe_mode=True``, scikit-learn pipelines with skops and an allow-list, the
ensemble's state is JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

import numpy as np

from bench import registry
from bench.candidate import load_candidate
from bench.datasets import read_rgb, resize_rgb
from bench.errors import BenchError
from bench.io import atomic_write_json, file_sha256, package_versions, publish_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def to_images(x, image_size: int) -> np.ndarray:
    """Turn paths, one path, or ``uint8`` arrays of any size into (N, S, S, 3) ``uint8``."""
    from PIL import Image
    if isinstance(x, (str, Path)):
        x = [x]
    if isinstance(x, np.ndarray):
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
            raise BenchError(f"images must be (N, H, W, 3) arrays, got shape {x.shape}")
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        if x.shape[-1] == 4:   # composite on white, like files
            a = x[..., 3:4].astype(np.float32) / 255.0
            x = np.round(x[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
        if x.dtype != np.uint8:
            raise BenchError(f"image arrays must be uint8, got {x.dtype}")
        if x.shape[1:3] == (image_size, image_size):
            return x
        return np.stack([resize_rgb(Image.fromarray(im), image_size)[0] for im in x])
    out = []
    for p in x:
        try:
            img, _, _ = read_rgb(p)
        except (BenchError, OSError) as exc:
            raise BenchError(f"cannot read image {p}: {exc}") from None
        out.append(resize_rgb(img, image_size)[0])
    if not out:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.stack(out)


class Predictor:
    """A loaded ensemble predictor. Use :func:`load_predictor`."""

    def __init__(self, manifest: dict, members: dict[str, list], ensemble, path: Path):
        self.manifest = manifest
        self.members_ = members
        self.ensemble_ = ensemble
        self.path = path
        self.classes_ = np.array(manifest["classes"])
        self.image_size = int(manifest["image_size"])
        self.member_names_ = [m["name"] for m in manifest["members"]]

    def member_probas(self, images: np.ndarray) -> list[np.ndarray]:
        return [np.mean([m.predict_proba(images) for m in self.members_[n]], axis=0)
                for n in self.member_names_]

    def predict_proba(self, x, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, n_classes) for image paths or ``uint8`` arrays."""
        paths = [x] if isinstance(x, (str, Path)) else x
        chunks = []
        for i in range(0, len(paths), batch_size):
            images = to_images(paths[i:i + batch_size], self.image_size)
            chunks.append(self.ensemble_.combine(self.member_probas(images)))
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(x, batch_size), axis=1)]

    def __repr__(self):
        return (f"Predictor({self.manifest['ensemble']['name']}: {', '.join(self.member_names_)}; "
                f"classes={list(self.classes_)})")


def save_predictor(path, *, ensemble_name: str, ensemble, members: dict[str, list[Path]],
                   member_info: dict[str, dict], classes: list[str], image_size: int,
                   training_data: dict, extra: dict | None = None) -> Path:
    """Write a predictor directory (atomically: a temp dir moved into place).

    ``members`` maps a member name to its saved fold-model folders.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "members").mkdir(parents=True)
    entries = []
    for name, folders in members.items():
        rel = []
        for k, folder in enumerate(folders):
            dest = tmp / "members" / name / f"model{k}"
            shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("checkpoint.keras"))
            rel.append(dest.relative_to(tmp).as_posix())
        entries.append({"name": name, "models": rel, **member_info.get(name, {})})
    files = {p.relative_to(tmp).as_posix(): file_sha256(p)
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(classes),
        "image_size": int(image_size),
        "preprocessing": {"resize": "whole image to image_size x image_size, PIL bicubic "
                                    "(antialiased)", "color": "RGB uint8; alpha on white; "
                                    "16-bit and grayscale converted"},
        "ensemble": {"name": ensemble_name, "type": ensemble.type_name,
                     "params": ensemble.get_params(), "state": ensemble.get_state()},
        "members": entries,
        "training_data": training_data,
        "versions": package_versions(),
        "files": files,
        **(extra or {}),
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    publish_dir(tmp, path)
    return path


def verify_predictor(path) -> dict:
    """Check every file against the manifest's sha256; return the manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BenchError(f"not a predictor directory (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"corrupt predictor manifest {mpath}: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise BenchError(f"{mpath}: unsupported predictor format {manifest.get('format')}")
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise BenchError(f"predictor file missing: {f}")
        if file_sha256(f) != digest:
            raise BenchError(f"predictor file altered (checksum mismatch): {f}")
    listed = set(manifest["files"])
    for f in path.rglob("*"):
        if f.is_file() and f.name != MANIFEST and f.relative_to(path).as_posix() not in listed:
            raise BenchError(f"unexpected file in predictor (not in manifest): {f}")
    return manifest


def load_predictor(path) -> Predictor:
    """Load and verify a saved predictor (see the module docstring)."""
    path = Path(path)
    manifest = verify_predictor(path)
    members = {m["name"]: [load_candidate(path / rel) for rel in m["models"]]
               for m in manifest["members"]}
    ens_info = manifest["ensemble"]
    ensemble = registry.get(ens_info["type"])(**ens_info["params"]).set_state(ens_info["state"])
    return Predictor(manifest, members, ensemble, path)


def find_images(path) -> list[Path]:
    """One image path, or every image file under a folder (recursive, sorted)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"image path not found: {path}")
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
