"""What every HTML page of bloodbench is built on: the templates, the sort script and its
Content-Security-Policy, file-safe names, and :class:`Out` (figures and CSVs beside the
page). Used by the run report, the cross-dataset report and ``bench evaluate``'s page."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pandas as pd

from bench.run.leaderboard import fmt, fmt_p
from bench.report import plots

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var head = table.tHead.rows[0];
  Array.prototype.forEach.call(head.cells, function (th, col) {
    if (!th.classList.contains('sort')) { return; }
    th.tabIndex = 0;
    th.title = 'sort by this column';
    var go = function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      Array.prototype.forEach.call(head.cells, function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-sort'), y = b.cells[col].getAttribute('data-sort');
        var fx = parseFloat(x), fy = parseFloat(y);
        var bothNum = !isNaN(fx) && !isNaN(fy);
        if (x === '' || x === null) { return 1; }
        if (y === '' || y === null) { return -1; }
        var d = bothNum ? fx - fy : String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    };
    th.addEventListener('click', go);
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') { go(); } });
  });
});
""".strip()


def slug(name: str) -> str:
    """A file-name-safe version of ``name`` (plus a short hash when characters were dropped)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "x"
    if s != name:
        s += "-" + hashlib.sha1(str(name).encode("utf-8", "surrogateescape")).hexdigest()[:6]
    return s[:80]


def env():
    """The Jinja environment of the report's templates (autoescaped, strict)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    jenv = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    jenv.filters["fmt"] = fmt
    jenv.filters["fmt_p"] = fmt_p
    return jenv


def csp() -> str:
    """The page's Content-Security-Policy: no network, the sort script by its hash."""
    digest = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()
    return (
        f"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'"
    )


class Out:
    """Where report files go: images and CSVs beside index.html."""

    def __init__(self, root: Path):
        self.root = root
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "csv").mkdir(parents=True, exist_ok=True)
        self.csvs: list[str] = []

    def csv(self, df: pd.DataFrame, name: str) -> str:
        rel = f"csv/{name}.csv"
        df.to_csv(self.root / rel, index=False)
        self.csvs.append(rel)
        return rel

    def fig(self, fig, name: str, alt: str, caption: str, csv: str | None = None) -> dict:
        rel = f"img/{name}.png"
        plots.save(fig, self.root / rel)
        return {"src": rel, "alt": alt, "caption": caption, "csv": csv}


__all__ = ["TEMPLATES", "SORT_SCRIPT", "slug", "env", "csp", "Out"]
