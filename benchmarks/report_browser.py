"""Check a run's report in headless Chromium and time the report.

    python benchmarks/report_browser.py RUN_DIR [--screenshot PATH] [--rebuild] [--no-gradcam]

Writes ``RUN_DIR/report`` first when it is missing (or with ``--rebuild``), then loads
``index.html`` in headless Chromium (system ``chromium`` + ``chromedriver``, via
Selenium; network and background services off, a fresh profile), and prints: console
messages, whether the leaderboard table and every image are visible, the page size, and
where the full-page screenshot went. Exit code 0 only when the page passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument(
        "--screenshot", default=None, help="PNG path (default: RUN_DIR/report/screenshot.png)"
    )
    ap.add_argument("--rebuild", action="store_true", help="write the report again first")
    ap.add_argument("--no-gradcam", dest="gradcam", action="store_false", default=None)
    args = ap.parse_args(argv)
    from bench.report import write_report
    from bench.report.browser import check_report, find_browser
    from bench.run.rundir import RunDir

    run_dir = Path(args.run_dir)
    index = RunDir(run_dir).report_index
    if args.rebuild or not index.is_file():
        t = time.perf_counter()
        index = write_report(run_dir, gradcam=args.gradcam)
        print(f"report written in {time.perf_counter() - t:.1f} s")
    files = [p for p in index.parent.rglob("*") if p.is_file()]
    print(
        f"report: {index} ({len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.2f} MB)"
    )
    if find_browser() is None:
        print("chromium/chromedriver not found (apt-get install chromium chromium-driver)")
        return 2
    shot = Path(args.screenshot) if args.screenshot else index.parent / "screenshot.png"
    t = time.perf_counter()
    r = check_report(index, shot)
    print(f"headless check: {time.perf_counter() - t:.1f} s")
    print(
        json.dumps(
            {
                k: r[k]
                for k in (
                    "title",
                    "table_visible",
                    "table_rows",
                    "images",
                    "broken",
                    "hidden",
                    "alert",
                    "width",
                    "height",
                    "console",
                    "screenshot",
                    "ok",
                )
            },
            indent=1,
        )
    )
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
