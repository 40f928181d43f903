"""The leaderboard: one flat row per candidate and ensemble (CSV + Markdown)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.io import atomic_write_text
from bench.metrics import METRICS, metric_sort_ascending

COLUMNS = ["candidate", "kind"] + [c for m in METRICS for c in (m, f"{m}_std")] + [
    "fit_seconds", "predict_ms_per_image", "model_size", "n_folds"]


def make_table(rows: list[dict], metric: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df:
            df[c] = float("nan")
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + extra]
    return df.sort_values(metric, ascending=metric_sort_ascending(metric),
                          kind="stable").reset_index(drop=True)


def _fmt(v, digits=4):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def to_markdown(df: pd.DataFrame, metric: str, title: str = "Leaderboard") -> str:
    head = ["rank", "candidate", "kind"] + [m for m in METRICS] + ["fit s", "ms/img"]
    lines = [f"# {title}", "", f"Sorted by **{metric}**; mean ± std over folds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in df.iterrows():
        cells = [str(i + 1), str(r["candidate"]), str(r["kind"])]
        cells += [f"{_fmt(r[m])} ± {_fmt(r[f'{m}_std'])}" for m in METRICS]
        cells += [_fmt(r["fit_seconds"], 1), _fmt(r["predict_ms_per_image"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_leaderboard(rows: list[dict], run_dir: Path, metric: str) -> pd.DataFrame:
    df = make_table(rows, metric)
    atomic_write_text(Path(run_dir) / "leaderboard.csv", df.to_csv(index=False))
    atomic_write_text(Path(run_dir) / "leaderboard.md", to_markdown(df, metric))
    return df
