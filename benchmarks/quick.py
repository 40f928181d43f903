"""A whole benchmark run, timed: wall time, peak memory and where the time goes.

    python benchmarks/quick.py --data ../shared/data/pbc/pbc_64.npz --out runs/quick_pbc \\
        [--profile quick] [--cache /tmp/cold_cache] [--workers N] [--only A,B]
    python benchmarks/quick.py --summary runs/quick_pbc     # a finished run, again

The first form runs ``python -m bench run`` in a child process and samples, every second,
the memory (PSS and RSS) summed over it and every process it started (the work-unit
workers); it writes ``OUT/benchmark.json`` (wall seconds, peak GiB, the command, date, CPU count).
``--cache`` points ``$BLOODBENCH_CACHE`` at a folder (an empty one gives a cold run: images
decoded, features and embeddings computed afresh).

Both forms print:

* the stages of the run card (data and folds, prepare, work units, ensembles and
  leaderboard, predictor, report) and the prepare time per candidate (features, embeddings);
* per candidate, summed over folds: tuning, fitting and prediction seconds, epochs run and
  training images/s (CNNs: training rows x epochs / fit seconds, a floor);
* the leaderboard's accuracy and macro-F1 (mean +- std over folds) and the saved predictor.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tree_memory(proc) -> tuple[int, int]:
    """(PSS, RSS) summed over ``proc`` and its descendants, in bytes.

    PSS (proportional set size) splits pages that processes share (the memory-mapped image
    cache, TensorFlow's libraries) between them: the sum is the RAM the run really holds.
    The RSS sum counts shared pages once per process (an upper bound).
    """
    import psutil

    pss = rss = 0
    for q in [proc, *proc.children(recursive=True)]:
        try:
            m = q.memory_full_info()
            pss, rss = pss + getattr(m, "pss", m.rss), rss + m.rss
        except psutil.Error:
            pass
    return pss, rss


def run_timed(args) -> dict:
    import psutil

    cmd = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--profile",
        args.profile,
        "--data",
        args.data,
        "--out",
        args.out,
    ]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.only:
        cmd += ["--only", args.only]
    env = dict(os.environ)
    if args.cache:
        env["BLOODBENCH_CACHE"] = str(Path(args.cache).resolve())
    t0, peak_pss, peak_rss = time.perf_counter(), 0, 0
    child = subprocess.Popen(cmd, cwd=ROOT, env=env)
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        pss, rss = _tree_memory(proc)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(1.0)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"bench run failed (exit {child.returncode}): {' '.join(cmd)}")
    info = {
        "wall_seconds": wall,
        "peak_pss_gib": peak_pss / 2**30,
        "peak_rss_sum_gib": peak_rss / 2**30,
        "command": " ".join(cmd),
        "cache": env.get("BLOODBENCH_CACHE", "default"),
        "cpus": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (Path(args.out) / "benchmark.json").write_text(json.dumps(info, indent=1))
    return info


def summary(run_dir: Path) -> None:

    from bench.report.cards import unit_times
    from bench.report.rundata import RunData

    run = RunData(run_dir)
    m = run.manifest
    bench_file = run_dir / "benchmark.json"
    if bench_file.is_file():
        b = json.loads(bench_file.read_text())
        print(
            f"wall {b['wall_seconds'] / 60:.1f} min, peak memory {b['peak_pss_gib']:.2f} GiB "
            f"(PSS summed over the run's processes; RSS sum {b['peak_rss_sum_gib']:.2f} GiB), "
            f"{b['cpus']} CPUs, {b['date']}"
        )
    n = len(run.y)
    print(
        f"\n{run_dir}: profile {m.get('profile')}, {n} images, {len(run.classes)} classes, "
        f"{len(run.fold_ids)} folds"
    )
    stages = {**(m.get("stage_seconds") or {})}
    if m.get("report_seconds") is not None:
        stages["report"] = m["report_seconds"]
    print("\nstage                         seconds")
    for k, v in stages.items():
        print(f"  {k:<28}{v:8.1f}")
    print(f"  {'total':<28}{sum(stages.values()):8.1f}")
    prep = m.get("prepare_seconds") or {}
    if prep:
        print("\nprepare (features/embeddings, once for every fold; a warm cache makes it ~0)")
        for k, v in prep.items():
            print(f"  {k:<28}{v:8.1f} s {n / max(v, 1e-9):8.0f} img/s")
    print(
        f"\n{'candidate':<20}{'tune s':>9}{'fit s':>9}{'pred s':>8}{'epochs':>8}{'train img/s':>13}"
    )
    for r in unit_times(run):
        img_s = f"{r['train_img_s']:.0f}" if r["train_img_s"] else ""
        print(
            f"{r['candidate']:<20}{r['tune_s']:9.1f}{r['fit_s']:9.1f}{r['predict_s']:8.1f}"
            f"{r['epochs']:>8}{img_s:>13}"
        )
    board = run.rundir.read_leaderboard()
    print(f"\n{'rank':<5}{'candidate':<20}{'kind':<10}{'accuracy':>18}{'macro_f1':>18}")
    for i, r in enumerate(board.itertuples(), 1):
        print(
            f"{i:<5}{r.candidate:<20}{r.kind:<10}{r.accuracy:9.4f} ± {r.accuracy_std:.4f}"
            f"{r.macro_f1:9.4f} ± {r.macro_f1_std:.4f}"
        )
    print(f"\nsaved predictor: {run.state.get('predictor')}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default=None, help="print the figures of a finished run")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc" / "pbc_64.npz"))
    ap.add_argument("--out", default="runs/quick")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--workers", type=int, default=0, help="default: the profile's")
    ap.add_argument("--only", default="", help="comma-separated candidates (bench run --only)")
    ap.add_argument("--cache", default=None, help="$BLOODBENCH_CACHE for the run")
    args = ap.parse_args(argv)
    if args.summary:
        return summary(Path(args.summary))
    run_timed(args)
    summary(Path(args.out))


if __name__ == "__main__":
    main()
