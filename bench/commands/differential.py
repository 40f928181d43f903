"""What a lab looks at first after ``bench predict`` on a folder: the **differential** (how
many cells of each class, in counts and percent, and how many of them go to review) and a
**gallery** of the batch's cells per predicted class, flagged ones marked.

``predict --out OUT.csv`` writes them beside its table as ``OUT_summary.csv`` and
``OUT_gallery.html`` (one self-contained page: thumbnails embedded, no script, nothing
fetched); both are side files of ``predict`` under the output guard
(:mod:`bench.commands.outputs`): a file of the same name that ``predict`` did not write is
refused, never overwritten.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd
from PIL import Image

from core.errors import BenchError
from core.images import read_image
from core.io import safe_text

#: the first bytes of the side files (how the output guard recognises predict's own)
SUMMARY_HEADER = "class,count,percent"
GALLERY_HEADER = "<!DOCTYPE html>\n<!-- bench predict gallery -->"
#: thumbnails per class in the gallery (the first ones in file order; the page says so)
PER_CLASS = 48
THUMB_PX = 96


def side_files(out) -> tuple[Path, Path]:
    """``(OUT_summary.csv, OUT_gallery.html)`` beside ``predict --out OUT.csv``."""
    out = Path(out)
    return out.with_name(out.stem + "_summary.csv"), out.with_name(out.stem + "_gallery.html")


def differential(classes, predictions, review=None, n_unreadable: int = 0) -> pd.DataFrame:
    """Per class of the predictor (its order): ``count`` and ``percent`` of the readable
    images predicted as it, and with stored prediction sets (``review`` given: one flag
    per image) ``flagged`` and ``flagged_percent`` (of that class's images); then a row
    ``all`` and, when some files could not be read, a row ``unreadable``."""
    pred = pd.Series([str(p) for p in predictions], dtype=object)
    n = len(pred)
    rows = []
    for c in [str(c) for c in classes]:
        mine = (pred == c).to_numpy()
        row = {
            "class": c,
            "count": int(mine.sum()),
            "percent": 100.0 * mine.sum() / n if n else 0.0,
        }
        if review is not None:
            k = int(sum(bool(f) for f, m in zip(review, mine) if m))
            row |= {"flagged": k, "flagged_percent": 100.0 * k / mine.sum() if mine.sum() else 0.0}
        rows.append(row)
    total = {"class": "all", "count": n, "percent": 100.0}
    if review is not None:
        k = int(sum(bool(f) for f in review))
        total |= {"flagged": k, "flagged_percent": 100.0 * k / n if n else 0.0}
    rows.append(total)
    if n_unreadable:
        rows.append({"class": "unreadable", "count": int(n_unreadable), "percent": float("nan")})
    table = pd.DataFrame(rows)
    if "flagged" in table:  # counts stay integers beside the unreadable row's blanks
        table["flagged"] = table["flagged"].astype("Int64")
    return table


def differential_lines(table: pd.DataFrame) -> str:
    """The differential as the lines ``predict`` prints (stderr)."""
    flagged = "flagged" in table
    lines = [
        "differential (predicted class: images, share"
        + (", flagged for review)" if flagged else ")")
    ]
    for r in table.itertuples(index=False):
        if r[0] == "unreadable":
            lines.append(f"  {'unreadable':<20} {r.count:>6}  (column error)")
            continue
        line = f"  {str(r[0]):<20} {r.count:>6}  {r.percent:5.1f} %"
        if flagged:
            line += f"   {int(r.flagged):>5} flagged ({r.flagged_percent:.0f} %)"
        lines.append(line)
    return "\n".join(lines)


def _thumbnail(path) -> str | None:
    try:
        img = Image.fromarray(read_image(path))
    except BenchError:
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_html(
    classes, paths, predictions, confidences, reasons=None, title: str = "bench predict"
) -> str:
    """One self-contained page: per predicted class (the predictor's order) its images'
    thumbnails (the first :data:`PER_CLASS` in file order), each with its confidence;
    images flagged for review (a non-empty reason) outlined, with the reason."""
    esc = html.escape
    by_class: dict[str, list[int]] = {str(c): [] for c in classes}
    for i, p in enumerate(predictions):
        by_class.setdefault(str(p), []).append(i)
    parts = [
        GALLERY_HEADER,
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>"
        "body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:4px;"
        "width:" + str(THUMB_PX + 8) + "px;font-size:11px;text-align:center;vertical-align:top}"
        "img{border:3px solid #ddd}figure.flagged img{border-color:#c0392b}"
        ".reason{color:#c0392b}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(predictions)} images by predicted class; images flagged for review "
        "have a red frame and say why. Thumbnails of the first "
        f"{PER_CLASS} images of each class in file order.</p>",
    ]
    for c, idx in by_class.items():
        n_flag = sum(1 for i in idx if reasons is not None and reasons[i])
        flag_text = f", {n_flag} flagged" if reasons is not None else ""
        parts.append(f"<h2>{esc(c)} <small>({len(idx)} images{flag_text})</small></h2><div>")
        for i in idx[:PER_CLASS]:
            data = _thumbnail(paths[i])
            name = esc(safe_text(Path(str(paths[i])).name))
            reason = reasons[i] if reasons is not None else ""
            cls = ' class="flagged"' if reason else ""
            img = (
                f'<img src="data:image/png;base64,{data}" alt="{name}">'
                if data
                else "<div>(unreadable now)</div>"
            )
            caption = f"{name}<br>{float(confidences[i]):.2f}"
            if reason:
                caption += f'<br><span class="reason">{esc(reason.replace(";", ", "))}</span>'
            parts.append(
                f'<figure{cls} title="{esc(safe_text(str(paths[i])))}">{img}'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        if len(idx) > PER_CLASS:
            parts.append(f"<p>... and {len(idx) - PER_CLASS} more (see the CSV)</p>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = [
    "GALLERY_HEADER",
    "PER_CLASS",
    "SUMMARY_HEADER",
    "differential",
    "differential_lines",
    "gallery_html",
    "side_files",
]
