"""ONNX export of saved predictors: parity with the Keras predictor and speed of each.

    python benchmarks/export.py --model runs/smoke/predictor [--model runs/smoke/distilled] \\
        [--n 256] [--threads 2] [--repeats 3]

For each ``--model``: ``bench export`` to a temporary file (its own check on the same
images), then on ``--n`` images of the packaged sample (PBC, at each predictor's model size):
the largest probability difference between onnxruntime and ``Predictor.predict_proba``
(``preprocessed=True``), the share of images given the same class, and images/s of both
(best of ``--repeats``, batches of 64 for onnxruntime, the predictor's own batching for
Keras), with ``--threads`` threads for both (TensorFlow's intra-op pool and onnxruntime's).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.predictor import _best  # noqa: E402  (best of repeats, one timing helper)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="predictor directory")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ["BLOODBENCH_TF_THREADS"] = str(args.threads)

    import numpy as np
    import onnxruntime as ort

    from bench.config import package_file
    from core.io import hardware
    from ensembles.export import export_onnx
    from ensembles.predictor import load_predictor

    data = np.load(package_file("bloodbench:sample/pbc_sample_64.npz"))
    raw = data[[k for k in data.files if data[k].ndim == 4][0]][: args.n]
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        hardware()["processor"],
    )
    print(f"machine: {cpu}, {os.cpu_count()} cores; {args.threads} threads; {len(raw)} images")
    print(
        f"{'predictor':40s} {'MB':>6s} {'max |dp|':>9s} {'same':>6s} {'onnx img/s':>11s} {'keras img/s':>12s} {'ratio':>6s}"
    )
    for model in args.model:
        pred = load_predictor(model)
        images = pred.preprocessing.load(list(raw))[0]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.onnx"
            r = export_onnx(pred, out, images)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            s = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
            name = s.get_inputs()[0].name

            def run_onnx():
                return np.concatenate(
                    [s.run(None, {name: images[i : i + 64]})[0] for i in range(0, len(images), 64)]
                )

            def run_keras():
                return pred.predict_proba(images, preprocessed=True)

            got, want = run_onnx(), run_keras()
            t_onnx, t_keras = _best(run_onnx, args.repeats), _best(run_keras, args.repeats)
        diff = float(np.abs(got - want).max())
        same = float(np.mean(got.argmax(1) == want.argmax(1)))
        print(
            f"{str(model)[-40:]:40s} {r['bytes'] / 1e6:6.1f} {diff:9.1e} {same:6.0%} "
            f"{len(images) / t_onnx:11.0f} {len(images) / t_keras:12.0f} {t_keras / t_onnx:5.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
