"""Does a candidate's cheap tuning trial rank settings as its full-fidelity refit would?

For one candidate of a prepared or finished run directory and one outer fold, the fold's
training rows are split as the tuner splits them; the configured setting and ``--settings
- 1`` settings drawn at random from the candidate's searched space are each scored on the
inner validation rows twice: as a trial (the candidate's ``fidelity`` overrides and
``max_samples`` rows) and as the refit fits them (``bench.run.tuning.full_fidelity_score``).
Prints both scores per setting, the Spearman correlation, and the machine and commit. A
profile may adopt tuned settings by the trial score (``adopt = "trial"``) only where this
correlation is at least 0.6; otherwise it keeps ``adopt = "full"`` (the default).

    python -m bench run --profile quick --data ../shared/data/pbc/pbc_64.npz --out runs/quick
    python benchmarks/fidelity.py --run runs/quick --candidate tl_mnv2_finetune [--fold 0]
        [--settings 6] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run.rundir import RunDir  # noqa: E402
from bench.run.tuning import candidate_tuning, fidelity_check  # noqa: E402
from bench.run.units import seeded_entry, training_images, training_rows  # noqa: E402
from core import registry  # noqa: E402
from core.errors import BenchError  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a prepared or finished run directory")
    ap.add_argument("--candidate", required=True, help="a tuned candidate of that run")
    ap.add_argument(
        "--fold",
        type=int,
        default=0,
        help="the outer fold whose training rows are used (default 0)",
    )
    ap.add_argument(
        "--settings",
        type=int,
        default=6,
        help="settings scored: the configured one and N - 1 random draws",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    run = RunDir(args.run)
    if not run.is_run():
        print(f"error: {args.run} is not a bloodbench run directory (no state.json)")
        return 2
    cfg = run.config
    registry.import_plugins(cfg.run.plugins)
    if args.candidate not in cfg.candidates:
        print(
            f"error: no candidate '{args.candidate}' in {args.run}; known: {list(cfg.candidates)}"
        )
        return 2
    seed = cfg.fold_seed(args.fold)
    entry = seeded_entry(cfg.candidates[args.candidate].spec(), seed)
    tuning = cfg.tuning
    own = candidate_tuning(tuning, entry)
    train = training_rows(run, entry, args.fold, seed)
    print(
        f"{args.candidate} fold {args.fold}: trial fidelity {dict(own.fidelity)}, "
        f"max_samples {own.max_samples}, searched {own.space or 'all'}; "
        f"{len(train)} outer training rows; commit {_commit()}, {_cpu()}, "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    t0 = time.perf_counter()

    def show(i, row):
        print(
            f"  setting {i}{' (configured)' if row['configured'] else ''}: trial "
            f"{row['trial_score']:.4f} ({row['trial_seconds']:.0f} s), full "
            f"{row['full_score']:.4f} ({row['full_seconds']:.0f} s)  {row['params']}",
            flush=True,
        )

    try:
        out = fidelity_check(
            entry,
            training_images(run, train, args.fold),
            run.labels[train],
            np.arange(len(run.classes)),
            tuning,
            seed,
            n_settings=args.settings,
            progress=show,
        )
    except BenchError as exc:
        print(f"error: {exc}")
        return 2
    out.update(
        {
            "candidate": args.candidate,
            "fold": args.fold,
            "run": str(args.run),
            "commit": _commit(),
            "cpu": _cpu(),
            "seconds": time.perf_counter() - t0,
        }
    )
    print(
        f"Spearman rho {out['rho']:.3f} (p {out['p']:.3f}) over {len(out['rows'])} settings; "
        f"{out['n_trial_rows']} trial rows, {out['n_full_rows']} full rows, "
        f"{out['n_val']} validation rows; {out['seconds']:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
