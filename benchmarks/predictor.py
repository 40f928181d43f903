"""Inference throughput of a saved predictor, and its overhead over its members' models.

    python benchmarks/predictor.py --model runs/smoke/predictor \\
        [--images ../shared/data/pbc/images] [--n 512] [--batch-size 128] [--threads 2]

Prints, for ``--threads`` CPU threads (default 2, the machine this project targets):

* images/s of ``Predictor.predict_proba`` on ``uint8`` arrays already at the training
  size (the ensemble alone), best of ``--repeats``;
* images/s of the same members run **directly**: every fold model of every Keras member
  with ``keras.Model.predict``, with the ``predict_keras`` loop of the training run, and
  each in its own ``tf.function``; every other member with its ``predict_proba``; then
  averaged and combined by hand. The predictor's overhead is relative to the fastest
  direct way (repeats interleaved, best of each). It is negative when a frozen-backbone
  member is in the ensemble: the predictor runs that backbone once for all its fold
  models, the direct ways once per fold model;
* images/s from image files (decoding and resizing included), when ``--images`` is given;
* how often the predictor's compiled graph was traced over batches of several sizes
  (1 means no retracing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="predictor directory")
    ap.add_argument("--images", default=None, help="image file or folder (default: random pixels)")
    ap.add_argument("--n", type=int, default=512, help="images to classify")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    os.environ["BLOODBENCH_TF_THREADS"] = str(args.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cpus)
    import numpy as np

    from cnn.train import predict_keras
    from core.images import find_images
    from bench import load_predictor  # with the packages of every built-in type

    t = time.perf_counter()
    pred = load_predictor(args.model)
    load_s = time.perf_counter() - t
    n_models = sum(len(v) for v in pred.members_.values())
    print(
        f"predictor {args.model}: {pred.record.ensemble.name} "
        f"({pred.record.ensemble.type}), members {pred.member_names_} "
        f"({n_models} fold models), image size {pred.image_size}; loaded in {load_s:.2f} s; "
        f"{args.threads} threads"
    )

    paths = None
    if args.images:
        paths = find_images(args.images)[: args.n]
        t = time.perf_counter()
        X = pred.preprocessing.apply_batch(paths)
        read_s = time.perf_counter() - t
        print(f"read + resize {len(X)} files: {len(X) / read_s:.1f} images/s")
    else:
        X = np.random.default_rng(0).integers(
            0, 256, (args.n, pred.image_size, pred.image_size, 3), dtype=np.uint8
        )
    n, bs = len(X), args.batch_size

    pred.predict_proba(X[:bs], batch_size=bs, preprocessed=True)  # warm up (trace once)

    keras_models = [
        (name, c.model_)
        for name in pred.member_names_
        for c in pred.members_[name]
        if hasattr(c, "model_")
    ]
    others = [
        (name, c)
        for name in pred.member_names_
        for c in pred.members_[name]
        if not hasattr(c, "model_")
    ]

    def direct(run_model):
        def go():
            out = {}
            for name, m in keras_models:
                out.setdefault(name, []).append(run_model(m))
            for name, c in others:
                out.setdefault(name, []).append(c.predict_proba(X))
            return pred.ensemble_.combine([np.mean(out[nm], axis=0) for nm in pred.member_names_])

        return go

    import tensorflow as tf

    spec = tf.TensorSpec([None, pred.image_size, pred.image_size, 3], tf.uint8)
    compiled = {
        id(m): tf.function(lambda x, m=m: m(x, training=False), input_signature=[spec])
        for _, m in keras_models
    }

    def per_model_graph(m):
        return np.concatenate([compiled[id(m)](X[i : i + bs]).numpy() for i in range(0, n, bs)])

    ways = {
        "keras Model.predict": direct(lambda m: m.predict(X, batch_size=bs, verbose=0)),
        "predict_keras (run's loop)": direct(lambda m: predict_keras(m, X, bs)),
        "one tf.function per model": direct(per_model_graph),
    }
    ref = pred.predict_proba(X, batch_size=bs, preprocessed=True)
    for label, fn in ways.items():  # warm up, and check
        diff = float(np.abs(fn() - ref).max())
        print(f"direct, {label:28s}: max |diff| vs predictor {diff:.1e}")
    # interleaved repeats: every way sees the same share of a busy machine's noise
    times = {label: [] for label in ["predictor", *ways]}
    for _ in range(args.repeats):
        for label, fn in [
            ("predictor", lambda: pred.predict_proba(X, batch_size=bs, preprocessed=True)),
            *ways.items(),
        ]:
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    for label in ways:
        print(f"direct, {label:28s}: {n / best[label]:8.1f} images/s")
    fastest = min(best[k] for k in ways)
    t_pred = best["predictor"]
    print(
        f"predictor on arrays                  : {n / t_pred:8.1f} images/s; overhead vs "
        f"fastest direct {100 * (t_pred / fastest - 1):+.1f}% (target < 10%)"
    )

    if paths:
        t_files = _best(lambda: pred.predict_proba(paths, batch_size=bs), 1)
        print(f"predictor on files (read+resize)     : {n / t_files:8.1f} images/s")

    if pred._fused_names:
        fn = pred._fused_fn()
        for size in (1, 7, bs, 33):
            pred.predict_proba(X[:size], batch_size=bs, preprocessed=True)
        print(
            f"compiled graph traced {fn.experimental_get_tracing_count()} time(s) "
            f"over batch sizes 1, 7, {bs}, 33 and {n % bs or bs}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
