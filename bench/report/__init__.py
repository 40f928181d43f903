"""The benchmark report: ``python -m bench report DIR [DIR ...]``.

For one run directory it writes ``DIR/report/``:

* ``index.html``: self-contained (images and CSVs beside it, no network needed),
  sortable leaderboard with confidence intervals and significance markers, paired
  tests against the best entry, per-class scores, confusion matrices, ROC curves,
  calibration, the Grad-CAM audit, data card and run card;
* ``leaderboard.md``: the leaderboard in Markdown;
* ``csv/``: the numbers behind every table and figure; ``img/``: the figures.

With several run directories (one per data set) it also writes a cross-dataset report
(Friedman test, Nemenyi critical-difference diagram) to ``--out``, by default
``FIRST_DIR/cross_dataset_report/``.

Settings come from the run's ``[report]`` config section (:class:`bench.config.ReportSection`).
"""

from __future__ import annotations

from pathlib import Path

from core.progress import warn
from bench.config import Config
from bench.report.build import write_cross_report, write_report
from bench.report.rundata import RunData
from bench.run.rundir import RunDir

CROSS_DIR = RunDir.CROSS_REPORT  # the default folder of `bench report A B`, in A


def report_after_run(run_dir, config: Config | dict) -> Path | None:
    """Write the report at the end of ``run`` unless ``[report] enabled = false``
    (``config``: the run's :class:`Config`, or a config table).

    A failing report never loses the finished run: the error is printed as a warning
    with the command that retries it, and ``None`` is returned.
    """
    try:
        if not config.report.enabled:
            return None
        return write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run itself is complete and saved
        warn(
            f"the run finished but its report failed ({type(exc).__name__}: {exc}); "
            f"retry with: python -m bench report {run_dir}"
        )
        return None


__all__ = ["write_report", "write_cross_report", "report_after_run", "RunData", "CROSS_DIR"]
