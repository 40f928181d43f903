"""Grad-CAM figures for ``python -m bench predict --gradcam``.

Each figure is a PNG of fixed size (:data:`FIG_SIZE_PX`) with three panels: the input
image at full resolution, the ensemble's Grad-CAM map (upsampled to the image) laid over
it, and the top classes with their probabilities. Matplotlib draws through the Agg
backend on a bare ``Figure`` (no pyplot, no display needed).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from core.io import atomic_write_bytes

FIG_SIZE_IN = (10.0, 3.6)
DPI = 100
FIG_SIZE_PX = (int(FIG_SIZE_IN[0] * DPI), int(FIG_SIZE_IN[1] * DPI))  # (width, height)


def gradcam_names(paths, root=None) -> list[str]:
    """PNG file names for ``paths``, unique within the list.

    The name is the image's path relative to ``root`` (the folder given to ``predict``;
    for a single file, its name) with folder separators replaced by ``__`` and
    ``.png`` appended, so ``root/basophil/BA_1.jpg`` -> ``basophil__BA_1.jpg.png``:
    same-named files in different folders (or with different extensions) get different
    names. Should two paths still map to one name (``a__b/c.jpg`` and ``a/b__c.jpg``),
    the later ones get ``-<8 hex digits of the path's sha1>`` before ``.png``.
    """
    root = Path(root) if root is not None else None
    names, seen = [], set()
    for p in paths:
        p = Path(p)
        try:
            rel = p.relative_to(root) if root is not None and root.is_dir() else Path(p.name)
        except ValueError:
            rel = Path(p.name)
        stem = "__".join(part for part in rel.parts if part not in ("", "/"))
        name = f"{stem}.png"
        if name in seen:
            digest = hashlib.sha1(str(p).encode("utf-8", "surrogateescape")).hexdigest()
            name = f"{stem}-{digest[:8]}.png"
        seen.add(name)
        names.append(name)
    return names


def upsample(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) map in [0, 1] resized (bilinear) to (height, width)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))
    return np.clip(np.asarray(img.resize((width, height), Image.BILINEAR)), 0.0, 1.0)


def gradcam_figure(
    image: np.ndarray,
    cam: np.ndarray,
    top: list[tuple[str, float]],
    title: str = "",
    alpha: float = 0.45,
) -> bytes:
    """PNG bytes of the three-panel figure.

    Parameters
    ----------
    image : (H, W, 3) uint8
        The input image at its own resolution.
    cam : (h, w) float in [0, 1]
        The Grad-CAM map at the model's resolution (drawn scaled to its peak, which the
        panel title states).
    top : list of (class name, probability)
        Shown as a bar chart, most probable first.
    title : str
        Figure title (e.g. the file name).
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.15]})
    h, w = image.shape[:2]
    axes[0].imshow(image)
    axes[0].set_title(f"image ({w}x{h})", fontsize=9)
    axes[1].imshow(image)
    # The ensemble's map is a mean of maps each scaled to peak 1: its own peak is lower
    # where members look at different places. Shown scaled to its peak (stated).
    peak = float(np.max(cam)) if np.size(cam) else 0.0
    shown = upsample(np.asarray(cam) / peak if peak > 0 else cam, h, w)
    im = axes[1].imshow(shown, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
    axes[1].set_title(
        (f"Grad-CAM: {top[0][0]}" if top else "Grad-CAM") + f" (peak {peak:.2f}, shown as 1)",
        fontsize=9,
    )
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    names = [t[0] for t in top][::-1]
    probs = [float(t[1]) for t in top][::-1]
    bars = axes[2].barh(range(len(top)), probs, height=0.45, color="tab:blue")
    if len(bars):
        bars[-1].set_color("tab:red")  # the predicted class
    axes[2].set_yticks([])
    axes[2].set_xlim(0, 1.0)
    axes[2].set_ylim(-0.5, len(top) - 0.2)
    for i, (name, p) in enumerate(zip(names, probs)):  # names above their bars: any length fits
        axes[2].text(
            0.01, i + 0.26, f"{name}  {p:.3f}", va="bottom", ha="left", fontsize=9, clip_on=True
        )
    axes[2].set_title(f"top-{len(top)} classes", fontsize=9)
    axes[2].set_xlabel("probability", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.14, top=0.84, wspace=0.25)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def write_gradcam_png(path, image, cam, proba, classes, title: str = "", top_k: int = 3) -> Path:
    """Write the figure for one image; ``proba`` is its (n_classes,) probabilities."""
    order = np.argsort(-np.asarray(proba), kind="stable")[:top_k]
    top = [(str(classes[i]), float(proba[i])) for i in order]
    path = Path(path)
    atomic_write_bytes(path, gradcam_figure(image, cam, top, title=title))
    return path
