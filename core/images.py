"""Images in, model input out: decoding, colour conversion, resizing, and the record of it.

One module turns any image into what a model was trained on, for training (the dataset
loaders) and for prediction (the saved predictor) alike. What it does is described by a
:class:`Preprocessing` record, which the predictor stores in its manifest and reads back
with :func:`resolve_preprocessing` (as timm stores a model's data config with it)::

    prep = Preprocessing(image_size=64)
    prep.to_dict()   # {"image_size": 64, "resize": "bicubic", "color": "rgb8", "alpha": "white"}
    x = prep.apply_batch(["a.jpg", array_of_any_size])   # (2, 64, 64, 3) uint8

Steps, in order: decode (PIL) -> 8-bit RGB (grayscale repeated; palette, CMYK converted;
16-bit and float scaled to 0-255; alpha composited on white by :func:`composite_on_white`)
-> the whole image resized to ``image_size`` x ``image_size`` (PIL bicubic, antialiased;
no crop; images already at that size are passed through untouched) -> optionally a Gaussian
low-pass of ``smooth`` pixels (:func:`core.colour.smooth`: the same cell exported at another
size or JPEG quality gives nearly the same input).

An image file of more than :func:`max_pixels` pixels (``MAX_PIXELS``, or the environment
variable ``BLOODBENCH_MAX_PIXELS``) is refused from its header, before any pixel is decoded:
it is skipped and listed like any unreadable file.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from core.colour import COLOUR_NORM, MAX_SMOOTH, image_colour, smooth
from core.errors import BenchError

ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
RESIZE_FILTERS = {"bicubic": Image.BICUBIC}
# Threads that decode and resize image files (PIL releases the GIL while doing both).
READ_THREADS = int(os.environ.get("BLOODBENCH_READ_THREADS", 0)) or min(4, os.cpu_count() or 1)
# The most pixels (width x height) an image file may have; larger files are refused from
# their header, before decoding, and skipped. Blood-cell crops are about 0.1 megapixel (PBC:
# 360 x 363) and whole smear fields from a microscope camera at most about 20 (e.g. 5472 x
# 3648): 40 leaves twice that room. A 40-megapixel PNG peaks at about 0.5 GB of memory while
# read (measured; an 11000 x 11000 one at 1.3 GB). Raise it with the environment variable
# (pixels), e.g. BLOODBENCH_MAX_PIXELS=200000000.
MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "BLOODBENCH_MAX_PIXELS"
# the limit has one home (above): Pillow's own decompression-bomb check, a hidden warning over
# 89 megapixels and an error over 179 while opening, would refuse what the variable allows
Image.MAX_IMAGE_PIXELS = None


# ----------------------------------------------------------------------------- pixels


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(..., 4) ``uint8`` RGBA -> (..., 3) ``uint8`` RGB, alpha composited on white."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.round(rgb).astype(np.uint8)


def scale_to_uint8(arr: np.ndarray, top: float | None = None) -> np.ndarray:
    """Integer or float pixels scaled to 0-255 ``uint8``: 16-bit by 65535, floats in
    [0, 1] by 1, anything else up to 255 kept (values outside the range are clipped)."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if top is None:
        peak = float(arr.max(initial=0))
        top = 65535.0 if peak > 255 else 255.0
        if arr.dtype.kind == "f" and peak <= 1.0:
            top = 1.0
    return np.clip(np.round(arr.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        top = 65535.0 if mode.startswith("I;16") else None
        return Image.fromarray(scale_to_uint8(arr, top), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return Image.fromarray(composite_on_white(np.asarray(img.convert("RGBA"))), "RGB")
    return img.convert("RGB")


def array_to_rgb(a: np.ndarray) -> np.ndarray:
    """One (H, W), (H, W, 1|3|4) ``uint8`` array as (H, W, 3) ``uint8`` (alpha on white)."""
    if a.dtype != np.uint8:
        raise BenchError(f"image arrays must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise BenchError(
            f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}"
        )
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        a = composite_on_white(a)
    return a


def crops(crop: float | None) -> bool:
    """Whether a ``crop`` setting keeps less than the whole image (``None`` and 1 do not)."""
    return crop is not None and float(crop) < 1.0


def crop_side(image_size: int, crop: float) -> int:
    """Side in pixels of the centre crop that keeps the fraction ``crop`` of an image side
    (at least 8 px, at most the side)."""
    return max(8, min(int(image_size), int(round(float(crop) * int(image_size)))))


def center_crop(images: np.ndarray, crop: float | None) -> np.ndarray:
    """The central ``crop`` fraction of each side of images ``(N, H, W, C)`` (a view), or
    ``images`` unchanged for ``crop`` of ``None`` or 1. The same window as the Keras
    models' ``center_crop`` layer (:func:`cnn.models.center_crop`)."""
    if not crops(crop):
        return images
    h, w = images.shape[1:3]
    ch, cw = crop_side(h, crop), crop_side(w, crop)
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[:, top : top + ch, left : left + cw]


def max_pixels() -> int:
    """The most pixels an image file may have (:data:`MAX_PIXELS`, or the environment
    variable ``BLOODBENCH_MAX_PIXELS``); a bad value of the variable is a
    :class:`BenchError`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return MAX_PIXELS
    if not raw.isdigit() or int(raw) < 1:
        raise BenchError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r}: give the most "
            f"pixels (width x height) an image may have, a positive whole number, "
            f"e.g. {MAX_PIXELS_ENV}=200000000"
        )
    return int(raw)


def check_pixels(width: int, height: int, limit: int | None = None) -> None:
    """A :class:`BenchError` (the size, the limit, how to raise it) for an image of more
    than ``limit`` (default :func:`max_pixels`) pixels."""
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        raise BenchError(
            f"too large: {width}x{height} pixels ({width * height / 1e6:.1f} "
            f"megapixels) is over the limit of {limit / 1e6:g} megapixels, "
            f"checked before decoding; set {MAX_PIXELS_ENV} (pixels, now "
            f"{limit}) higher to read it"
        )


def read_rgb(path) -> tuple[Image.Image, str, str]:
    """Decode one image file as 8-bit RGB. Returns (image, original mode, "WxH").

    Raises :class:`BenchError` with the reason when the file is not a readable image, or
    has more pixels than :func:`max_pixels` (read from its header, before decoding).
    """
    path = Path(path)
    limit = max_pixels()
    if path.stat().st_size == 0:
        raise BenchError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:  # lazy: the header only, so far
                check_pixels(img.width, img.height, limit)
                img.load()
                return to_rgb(img), img.mode, f"{img.width}x{img.height}"
    except UnidentifiedImageError:
        raise BenchError("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BenchError(f"corrupt image ({exc})") from None


def pixel_hash(arr: np.ndarray) -> str:
    """Digest of an array's shape and pixels (exact duplicates have equal digests)."""
    h = hashlib.sha1(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def find_images(path) -> list[Path]:
    """One image path, or every image file under a folder (recursive, sorted)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"image path not found: {path}")
    if path.is_file():
        return [path]
    found = []  # os.walk: symbolic links to folders are not followed (no loops)
    for folder, _, files in os.walk(path, onerror=lambda exc: None):
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


# ----------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input (see the module docstring); stored as data.

    Attributes
    ----------
    image_size : side of the square model input.
    resize : PIL filter of the whole-image resize (``"bicubic"``, antialiased).
    color : ``"rgb8"``: 8-bit RGB.
    alpha : ``"white"``: transparent pixels composited on white.
    smooth : sigma in pixels of a Gaussian low-pass after the resize (0: none).
    colour_norm : per-image colour normalisation after it (:func:`core.colour.image_colour`:
        ``"reinhard"``, ``"rgb"`` or ``"none"``).
    """

    image_size: int
    resize: str = "bicubic"
    color: str = "rgb8"
    alpha: str = "white"
    smooth: float = 0.0
    colour_norm: str = "none"

    def __post_init__(self):
        if (
            not isinstance(self.image_size, int)
            or isinstance(self.image_size, bool)
            or self.image_size < 1
        ):
            raise BenchError(
                f"preprocessing: image_size must be a positive integer, got {self.image_size!r}"
            )
        for name, allowed in (
            ("resize", RESIZE_FILTERS),
            ("color", {"rgb8"}),
            ("alpha", {"white"}),
            ("colour_norm", set(COLOUR_NORM)),
        ):
            if getattr(self, name) not in allowed:
                raise BenchError(
                    f"preprocessing: {name} must be one of {sorted(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        if (
            isinstance(self.smooth, bool)
            or not isinstance(self.smooth, (int, float))
            or not 0 <= self.smooth <= MAX_SMOOTH
        ):
            raise BenchError(
                f"preprocessing: smooth must be a number in [0, {MAX_SMOOTH:g}], "
                f"got {self.smooth!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.smooth:  # records written before the step existed read the same
            d.pop("smooth")
        if self.colour_norm == "none":
            d.pop("colour_norm")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        if not isinstance(d, dict):
            raise BenchError(f"preprocessing record must be a table, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BenchError(
                f"preprocessing record has unknown step(s) {unknown}; this "
                f"bloodbench knows {sorted(known)}"
            )
        return cls(**d)

    # -- one image ----------------------------------------------------------------
    def resize_pil(self, img: Image.Image) -> tuple[np.ndarray, str]:
        """A whole RGB PIL image resized; returns (array, hash of the full-size pixels)."""
        full = np.asarray(img, dtype=np.uint8)
        digest = pixel_hash(full)
        s = self.image_size
        if img.size != (s, s):
            img = img.resize((s, s), RESIZE_FILTERS[self.resize])
        return np.asarray(img, dtype=np.uint8).copy(), digest

    def resize_array(self, a: np.ndarray) -> np.ndarray:
        """An (H, W, 3) ``uint8`` array resized whole (smoothed, colour-normalised), as in
        training."""
        s = self.image_size
        if a.shape[:2] != (s, s):
            a = np.asarray(
                Image.fromarray(a).resize((s, s), RESIZE_FILTERS[self.resize]), dtype=np.uint8
            )
        return image_colour(smooth(a, self.smooth), self.colour_norm)

    def apply(self, item) -> np.ndarray:
        """One image path or array -> (S, S, 3) ``uint8`` model input."""
        return self.resize_array(read_image(item))

    # -- batches ------------------------------------------------------------------
    def load(
        self, items, keep_full: bool = False, skip_errors: bool = False, threads: int | None = None
    ):
        """Read and preprocess a list of images (paths or arrays), files in parallel threads.

        Returns ``(X, full, ok, errors)``: ``X`` (n, S, S, 3) ``uint8`` for the readable
        items, ``full`` their full-resolution arrays (``None`` entries unless
        ``keep_full``), ``ok`` their positions in ``items`` and ``errors`` ``(position,
        BenchError)`` pairs. Without ``skip_errors`` the first unreadable item raises.
        """
        threads = threads or READ_THREADS
        max_pixels()  # a bad BLOODBENCH_MAX_PIXELS stops here, not as a reason per file

        def one(item):
            try:
                full = read_image(item)
            except BenchError as exc:
                return None, None, exc
            return self.resize_array(full), (full if keep_full else None), None

        if threads > 1 and len(items) > 1 and not all(isinstance(i, np.ndarray) for i in items):
            with ThreadPoolExecutor(min(threads, len(items))) as pool:
                results = list(pool.map(one, items))
        else:
            results = [one(i) for i in items]
        small, full, ok, errors = [], [], [], []
        for i, (s, f, err) in enumerate(results):
            if err is not None:
                if not skip_errors:
                    raise err
                errors.append((i, err))
                continue
            small.append(s)
            full.append(f)
            ok.append(i)
        s = self.image_size
        X = np.stack(small) if small else np.zeros((0, s, s, 3), np.uint8)
        return X, full, ok, errors

    def batches(self, items, batch_size: int, keep_full: bool = False):
        """Yield ``(start, X, full, ok, errors)`` for each batch of ``items`` (as
        :meth:`load` with ``skip_errors``; ``ok`` and ``errors`` positions within the
        batch). The next batch is read in a thread while the caller works on this one."""

        def read(s):
            return self.load(items[s : s + batch_size], keep_full=keep_full, skip_errors=True)

        reader = ThreadPoolExecutor(1)
        try:
            pending = reader.submit(read, 0) if len(items) else None
            for s in range(0, len(items), batch_size):
                X, full, ok, errors = pending.result()
                if s + batch_size < len(items):
                    pending = reader.submit(read, s + batch_size)
                yield s, X, full, ok, errors
        finally:
            reader.shutdown(cancel_futures=True)

    def apply_batch(self, x, preprocessed: bool = False) -> np.ndarray:
        """Paths, one path, or ``uint8`` arrays of any size -> (N, S, S, 3) ``uint8``, every
        image through every step (an array already at the size too: ``smooth`` still
        applies). ``preprocessed``: ``x`` is model input (what :meth:`load` returns),
        checked and returned as it is."""
        return self.model_input(x) if preprocessed else self.load(as_items(x))[0]

    def batch_items(self, x, preprocessed: bool = False):
        """``x`` as a sequence to slice into batches for :meth:`apply_batch` with the same
        ``preprocessed``: model input, checked (:meth:`model_input`), or single images
        (:func:`as_items`)."""
        return self.model_input(x) if preprocessed else as_items(x)

    def model_input(self, x) -> np.ndarray:
        """``x`` when it is model input, an (N, S, S, 3) ``uint8`` array at this size; else
        a :class:`BenchError`."""
        s = self.image_size
        if not (isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[1:] == (s, s, 3)):
            shape = x.shape if isinstance(x, np.ndarray) else type(x).__name__
            raise BenchError(f"preprocessed images must be an (N, {s}, {s}, 3) array, got {shape}")
        if x.dtype != np.uint8:
            raise BenchError(f"image arrays must be uint8, got {x.dtype}")
        return x


def resolve_preprocessing(manifest: dict) -> Preprocessing:
    """The :class:`Preprocessing` of a saved predictor's manifest. Predictors written
    before the record existed described it in prose beside ``image_size``; their steps
    were the defaults."""
    rec = manifest.get("preprocessing")
    if isinstance(rec, dict) and "image_size" in rec:
        return Preprocessing.from_dict(rec)
    return Preprocessing(image_size=int(manifest["image_size"]))


def read_image(item) -> np.ndarray:
    """One image path or array as a full-resolution (H, W, 3) ``uint8`` array."""
    if isinstance(item, np.ndarray):
        return array_to_rgb(item)
    try:
        img, _, _ = read_rgb(item)
    except (BenchError, OSError) as exc:
        raise BenchError(f"cannot read image {item}: {exc}") from None
    return np.asarray(img, dtype=np.uint8)


def as_items(x) -> list:
    """Paths, one path, arrays, one array -> a list of single images (paths or arrays)."""
    if isinstance(x, (str, Path)):
        return [x]
    if isinstance(x, np.ndarray):
        if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4)):
            return [x]
        if x.ndim in (3, 4):  # (N, H, W) grayscale or (N, H, W, C)
            return list(x)
        raise BenchError(f"images must be (N, H, W, 3) arrays, got shape {x.shape}")
    return list(x)
