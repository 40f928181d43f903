"""Feature-extraction throughput (1 vs N workers) and peak memory.

    python benchmarks/features.py [--data ../shared/data/pbc/pbc_64.npz] [--n 2000] \\
        [--feature-set all] [--workers 1,2] [--config benchmarks.toml]

For each worker count, a fresh process extracts the features of the first ``--n`` images
(a stratified sample is not needed: the cost does not depend on the class) with the disk
cache off, and prints:

* images/s of :func:`features.extract` (decoding excluded: the images are already
  ``uint8`` arrays at the dataset size), and ms per image per extractor (1 worker only);
* peak resident memory of the main process and of the largest worker process (MiB).

A feature set is a ``[feature_sets.NAME]`` of the config.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_mib(who) -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(who).ru_maxrss / 1024


def _one(args) -> dict:
    """Run in a fresh process: time one extraction, report throughput and peak memory."""
    import numpy as np

    from bench.config import load_config
    from features import EXTRACTORS, extract

    spec = load_config(args.config, profile="quick").data["feature_sets"][args.feature_set]
    with np.load(args.data, allow_pickle=False) as z:
        key = "images" if "images" in z.files else "train_images"
        images = np.ascontiguousarray(z[key][: args.n])
    base_mib = _peak_mib(resource.RUSAGE_SELF)
    t = time.perf_counter()
    F = extract(images, spec, n_jobs=args.one, use_cache=False, progress=False)
    seconds = time.perf_counter() - t
    per_extractor = {}
    if args.one == 1:
        sample = images[: min(200, len(images))]
        for name in sorted(spec):
            t0 = time.perf_counter()
            for im in sample:
                EXTRACTORS[name](im, **(spec[name] or {}))
            per_extractor[name] = 1000 * (time.perf_counter() - t0) / len(sample)
    try:  # let joblib's workers exit so that their peak memory is counted below
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    except Exception:  # noqa: BLE001 - only for the measurement
        pass
    return {
        "workers": args.one,
        "n": len(images),
        "dim": int(F.shape[1]),
        "seconds": seconds,
        "images_per_s": len(images) / seconds,
        "ms_per_image_per_extractor": per_extractor,
        "peak_main_mib": _peak_mib(resource.RUSAGE_SELF),
        "images_mib": images.nbytes / 2**20,
        "main_before_mib": base_mib,
        "peak_worker_mib": _peak_mib(resource.RUSAGE_CHILDREN) if args.one > 1 else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc" / "pbc_64.npz"))
    ap.add_argument("--n", type=int, default=2000, help="images to extract")
    ap.add_argument("--feature-set", default="all", help="a [feature_sets] name of the config")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--config", default=str(ROOT / "benchmarks.toml"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_one(args)))
        return 0
    if not Path(args.data).is_file():
        print(f"error: no data at {args.data} (pass --data)", file=sys.stderr)
        return 2
    print(
        f"feature set '{args.feature_set}', {args.n} images of {args.data}, {os.cpu_count()} CPUs"
    )
    rows = []
    for w in [int(x) for x in args.workers.split(",") if x.strip()]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(w),
            "--data",
            args.data,
            "--n",
            str(args.n),
            "--feature-set",
            args.feature_set,
            "--config",
            args.config,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(
                out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
                file=sys.stderr,
            )
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        worker = f"{r['peak_worker_mib']:.0f}" if r["peak_worker_mib"] else "-"
        print(
            f"workers={w}: {r['images_per_s']:.1f} images/s ({r['seconds']:.1f} s, "
            f"{r['dim']} features); peak RSS main {r['peak_main_mib']:.0f} MiB "
            f"(images {r['images_mib']:.0f} MiB), largest worker {worker} MiB"
        )
        if r["ms_per_image_per_extractor"]:
            print(
                "  ms/image: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_image_per_extractor"].items())
            )
    if len(rows) > 1:
        print(
            f"speed-up {rows[0]['workers']} -> {rows[-1]['workers']} workers: "
            f"{rows[-1]['images_per_s'] / rows[0]['images_per_s']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
