"""CNN candidates: training and inference images/s, and peak memory.

    python benchmarks/cnn.py [--data ../shared/data/pbc/pbc_64.npz] [--n 1024] [--epochs 3] \\
        [--profile quick] [--only cnn_small,tl_mnv2_frozen] [--config benchmarks.toml]

Each CNN candidate of the profile runs in a fresh process on ``--n`` images drawn at
random (seeded) from the data, with its configured parameters, except
``epochs`` (``--epochs``; early stopping off; fine-tuning: 1 head epoch, then
``--epochs``), with an empty cache (embeddings computed afresh) and no work directory.
It prints:

* **train img/s**: training rows / seconds of the last epoch (steady state: graph
  tracing happens in the first epoch of each phase; the epoch includes the pass over the
  10 % validation split);
* **embed img/s** (frozen transfer only): backbone forward passes per second, computed
  once per image by ``prepare``; the head then trains on embeddings in seconds;
* **infer img/s**: the full saved-model path on raw ``uint8`` images (what the predictor
  runs), batches of 256, after one warm-up batch;
* **fit s**: the whole ``fit`` (tracing, all epochs); **peak MiB**: peak resident memory
  of the process (TensorFlow, the images and the model).

``$BLOODBENCH_TF_THREADS`` sets TensorFlow's thread pools.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cnn_candidates(cfg) -> dict:
    from core import registry
    from cnn.candidate import KerasCandidate

    return {
        n: e for n, e in cfg.candidates.items() if issubclass(registry.get(e.type), KerasCandidate)
    }


def _one(args) -> dict:
    """In a fresh process: fit and time one candidate."""
    import tempfile

    cache = tempfile.mkdtemp(prefix="bb-cnn-bench-")
    os.environ["BLOODBENCH_CACHE"] = cache  # cold, private cache
    try:
        return _measure(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _measure(args) -> dict:
    import numpy as np

    from core.candidate import build_candidate
    from bench.config import load_config
    from cnn.train import predict_keras

    cfg = load_config(args.config, profile=args.profile)
    entry = cfg.candidates[args.one].spec()
    with np.load(args.data, allow_pickle=False) as z:
        key = "images" if "images" in z.files else "train_images"
        labels = np.asarray(z[key.replace("images", "labels")]).ravel()
        rows = np.sort(np.random.default_rng(0).permutation(len(labels))[: args.n])
        images = np.ascontiguousarray(z[key][rows])  # a random sample: every class present
        labels = labels[rows]
    params = dict(entry.get("params", {}))
    params.update(epochs=args.epochs, patience=args.epochs + 1, verbose=0)
    if entry["type"] == "transfer_finetune":
        params["head_epochs"] = 1
    cand = build_candidate({**entry, "params": params})
    res = {"candidate": args.one, "type": entry["type"], "n": len(images)}
    if hasattr(cand, "prepare"):
        t = time.perf_counter()
        cand.prepare(images)
        embed_s = time.perf_counter() - t
        res["embed_img_s"] = len(images) / embed_s
    ends = []
    t0 = time.perf_counter()
    cand.fit(images, labels, epoch_callbacks=[lambda e, logs: ends.append(time.perf_counter())])
    fit_s = time.perf_counter() - t0
    n_train = int(round(len(images) * (1 - cand.val_fraction)))
    last = ends[-1] - (ends[-2] if len(ends) > 1 else t0)
    res.update(train_img_s=n_train / last, fit_s=fit_s, epochs=len(ends))
    model = cand.model_
    predict_keras(model, images[:256])
    t = time.perf_counter()
    predict_keras(model, images)
    res["infer_img_s"] = len(images) / (time.perf_counter() - t)
    res["params"] = int(model.count_params())
    res["peak_mib"] = _peak_mib()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc" / "pbc_64.npz"))
    ap.add_argument("--n", type=int, default=1024, help="images to train and predict on")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    ap.add_argument("--config", default=str(ROOT / "benchmarks.toml"))
    ap.add_argument("--json", action="store_true", help="print one JSON line per candidate")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.one:
        print(json.dumps(_one(args)))
        return 0
    from bench.config import load_config

    names = list(_cnn_candidates(load_config(args.config, profile=args.profile)))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(
        f"{len(names)} CNN candidate(s), {args.n} images of {args.data}, "
        f"{args.epochs} epochs, TF threads {os.environ.get('BLOODBENCH_TF_THREADS', 'default')}"
    )
    header = (
        f"{'candidate':<20} {'type':<18} {'train img/s':>11} {'embed img/s':>11} "
        f"{'infer img/s':>11} {'epochs':>6} {'fit s':>7} {'params':>9} {'peak MiB':>8}"
    )
    print(header)
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--data",
            args.data,
            "--n",
            str(args.n),
            "--epochs",
            str(args.epochs),
            "--profile",
            args.profile,
            "--config",
            args.config,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{name:<20} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if args.json:
            print(json.dumps(r))
            continue
        emb = f"{r['embed_img_s']:.0f}" if "embed_img_s" in r else "-"
        print(
            f"{name:<20} {r['type']:<18} {r['train_img_s']:>11.0f} {emb:>11} "
            f"{r['infer_img_s']:>11.0f} {r['epochs']:>6} {r['fit_s']:>7.1f} "
            f"{r['params']:>9} {r['peak_mib']:>8.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
