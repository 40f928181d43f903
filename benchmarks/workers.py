"""Speed-up of ``run --workers N`` over ``--workers 1`` (local processes), same seeds.

Each setting runs the whole ``python -m bench run`` command into a fresh run directory,
after one warm-up run that fills the shared cache (decoded images, HOG features), so no
timed run decodes or extracts what another one did not. Prints the wall time of each
command, the time of its work-unit stage (from ``manifest.json``), the speed-ups, and
whether the leaderboards agree (results, not timings; CNNs on CPU TensorFlow may differ
in the last digits between thread layouts).

    python benchmarks/workers.py --profile smoke --data ../shared/data/pbc/images

Other engineers' jobs on a shared machine inflate and scatter the numbers: the script
prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from bench.run.rundir import RunDir  # noqa: E402

RESULT_COLS = ["candidate", "accuracy", "balanced_accuracy", "macro_f1", "log_loss"]


def bench_run(args, out: Path, workers: int | None, only: str | None = None) -> float:
    cmd = [sys.executable, "-m", "bench", "run", "--profile", args.profile, "--out", str(out)]
    cmd += ["--data", args.data] if args.data else []
    cmd += ["--config", args.config] if args.config else []
    cmd += ["--workers", str(workers)] if workers else []
    cmd += ["--only", only] if only else []
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc" / "images"))
    ap.add_argument("--config", default=None)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument(
        "--warm-only", default="rf_hog", help="candidates of the warm-up run ('' for all)"
    )
    ap.add_argument("--out", default=None, help="folder for the run directories (default: temp)")
    args = ap.parse_args(argv)
    base = Path(args.out or tempfile.mkdtemp(prefix="bloodbench-workers-"))
    base.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    print(
        f"profile {args.profile}, data {args.data}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} before"
    )
    warm = bench_run(args, base / "warm", None, args.warm_only or None)
    print(f"warm-up (cache fill) {warm:.1f} s")
    rows = []
    for w in counts:
        out = base / f"w{w}"
        wall = bench_run(args, out, w)
        stages = RunDir(out).read_manifest().get("stage_seconds", {})
        rows.append(
            {"workers": w, "wall_s": wall, "units_s": stages.get("units", float("nan")), "out": out}
        )
    first = min(rows, key=lambda r: r["workers"])  # speed-ups over the fewest workers
    print(
        f"{'workers':>7} {'wall s':>8} {'units s':>8} {'speed-up wall':>14} {'speed-up units':>15}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['wall_s']:>8.1f} {r['units_s']:>8.1f} "
            f"{first['wall_s'] / r['wall_s']:>14.2f} {first['units_s'] / r['units_s']:>15.2f}"
        )
    ref = RunDir(first["out"]).read_leaderboard()[RESULT_COLS].sort_values("candidate")
    for r in [r for r in rows if r is not first]:
        other = RunDir(r["out"]).read_leaderboard()[RESULT_COLS].sort_values("candidate")
        diff = (ref.set_index("candidate") - other.set_index("candidate")).abs().max().max()
        print(
            f"leaderboard --workers {r['workers']} vs {first['workers']}: "
            f"max |difference| {diff:.2e}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} after; run directories under {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
