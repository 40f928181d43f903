"""A saved predictor as one ONNX graph: every fold model of every member, the combiner, the
test-time views and the temperature, from model-size ``uint8`` images to class
probabilities.

What the graph holds and what it does not:

* input ``images``: ``uint8`` (N, S, S, 3), already through the predictor's preprocessing
  (read, alpha on white, whole-image resize to S px, the optional low-pass: what
  :meth:`core.images.Preprocessing.load` returns); the preprocessing is stored in the
  model's metadata (``bloodbench.preprocessing``) with the class names, so a caller outside
  Python does the same;
* output ``probabilities``: ``float32`` (N, K), the predictor's :meth:`predict_proba`;
* members: Keras models (CNNs, frozen and fine-tuned transfer; a distilled student).
  Members on hand-made features (HOG, texture, colour, morphology) are refused: their
  features are computed in Python, outside any graph; distil such a predictor
  (``bench distill``) and export the student;
* combiner: soft voting (its weights) or stacking with a linear meta-learner (logistic
  regression or LDA: ``softmax(x @ coef.T + intercept)``); the Gaussian naive-Bayes
  meta-learner is refused;
* not in the graph: prediction sets, the review rule, the shift score and the per-patient
  colour normalisation of bag tasks (refused).

:func:`export_onnx` converts with tf2onnx, then runs the graph with onnxruntime against the
Keras predictor on ``check`` images and refuses a difference above ``tolerance``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from core.errors import BenchError
from core.images import IMAGE_SUFFIXES
from core.io import new_mode
from core.quiet import filtered_stderr
from ensembles.predictor import fused_outputs
from ensembles.record import NO_BAG_COLOUR
from ensembles.stacking import Stacking
from ensembles.voting import SoftVoting
from ensembles.tta import TTA_VIEWS

TOLERANCE = 1e-4  # the largest probability difference ONNX may show against Keras
OPSET = 17
_EPS_STACK = 1e-6  # ensembles.stacking._EPS: log-probability inputs clipped there
_EPS_TEMPER = 1e-12  # core.calibration._EPS


def _views_tf(tf):
    """:data:`ensembles.tta.VIEWS` as TensorFlow ops on (N, H, W, C)."""

    def transpose(x):
        return tf.transpose(x, [0, 2, 1, 3])

    return {
        "identity": lambda x: x,
        "flip_h": lambda x: tf.reverse(x, [2]),
        "flip_v": lambda x: tf.reverse(x, [1]),
        "rot180": lambda x: tf.reverse(x, [1, 2]),
        "transpose": transpose,
        "rot90": lambda x: transpose(tf.reverse(x, [2])),
        "rot270": lambda x: tf.reverse(transpose(x), [2]),
        "anti_transpose": lambda x: transpose(tf.reverse(x, [1, 2])),
    }


def _combiner(pred):
    """The ensemble as numbers: ``("vote", weights)`` or ``("linear", coef, intercept,
    columns, log_inputs)``; a combiner ONNX cannot hold is a :class:`BenchError`."""
    ens = pred.ensemble_
    if isinstance(ens, SoftVoting):
        return ("vote", np.asarray(ens.weights_, dtype=np.float32))
    if isinstance(ens, Stacking) and ens.meta in ("logistic", "lda"):
        meta = ens.meta_
        coef = np.asarray(meta.coef_, dtype=np.float64)
        intercept = np.asarray(meta.intercept_, dtype=np.float64).ravel()
        if coef.shape[0] == 1:  # two classes seen: one logit for the second
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-1, 1]) * intercept / 2
        cols = np.asarray(meta.classes_, dtype=np.int64)
        return (
            "linear",
            coef.T.astype(np.float32),
            intercept.astype(np.float32),
            cols,
            ens.inputs == "log_proba",
        )
    raise BenchError(
        f"the combiner of '{pred.record.ensemble.name}' ({type(ens).__name__}"
        + (f", meta-learner {ens.meta}" if isinstance(ens, Stacking) else "")
        + ") has no ONNX form here; soft voting and linear stacking (logistic, lda) do"
    )


def check_exportable(pred) -> None:
    """Refuse, in one line, a predictor whose graph ONNX cannot hold (see the module
    docstring), before any conversion."""
    not_graph = [n for n in pred.member_names_ if n not in pred._fused_names]
    if not_graph:
        types = {m.name: m.type for m in pred.record.members}
        kinds = ", ".join(f"{n} ({types[n]})" for n in not_graph)
        raise BenchError(
            f"{pred.path}: members {kinds} compute their features in Python, outside any "
            "graph, so ONNX cannot hold them; export a predictor of CNN members, or distil "
            "this one (`bench distill`) and export the student"
        )
    if pred.bag_colour_ != NO_BAG_COLOUR:
        raise BenchError(
            f"{pred.path}: its cells are colour-normalised per patient ({pred.bag_colour_}), "
            "which needs the whole bag: not expressible as a per-image graph"
        )
    head = pred.lab_head_
    if head is not None and head.uses_features:
        raise BenchError(
            f"{pred.path}: its lab head (bench adapt --n) reads hand-crafted features of each "
            "cell, computed in Python, so ONNX cannot hold it; export the predictor it was "
            "adapted from"
        )
    _combiner(pred)


def graph_function(pred):
    """The predictor as one ``tf.function`` from (N, S, S, 3) ``uint8`` to (N, K)
    ``float32`` probabilities."""
    import tensorflow as tf

    check_exportable(pred)
    plan = pred._fused_plan()
    per_member = [len(pred.members_[n]) for n in pred._fused_names]
    order = [pred._fused_names.index(n) for n in pred.member_names_]
    views = [_views_tf(tf)[v] for v in TTA_VIEWS[pred.tta]]
    comb = _combiner(pred)
    k = len(pred.classes_)
    t = pred.record.temperature
    la = pred.label_adaptation_
    s = pred.image_size
    spec = tf.TensorSpec([None, s, s, 3], tf.uint8, name="images")

    def members_of(x):
        outs = fused_outputs(plan, x)
        means, i = [], 0
        for n in per_member:
            means.append(tf.add_n(outs[i : i + n]) / float(n))
            i += n
        return [means[j] for j in order]

    def combine(probas):
        if comb[0] == "vote":
            return tf.add_n([float(w) * p for w, p in zip(comb[1], probas)])
        _, coef, intercept, cols, log_inputs = comb
        x = tf.concat(probas, axis=1)
        if log_inputs:
            x = tf.math.log(tf.clip_by_value(x, _EPS_STACK, 1.0))
        p = tf.nn.softmax(tf.matmul(x, tf.constant(coef)) + tf.constant(intercept), axis=1)
        scatter = np.zeros((len(cols), k), dtype=np.float32)
        scatter[np.arange(len(cols)), cols] = 1.0  # unseen classes: 0
        return tf.matmul(p, tf.constant(scatter))

    @tf.function(input_signature=[spec])
    def probabilities(images):
        p = tf.add_n([combine(members_of(v(images))) for v in views]) / float(len(views))
        if t:
            p = tf.nn.softmax(tf.math.log(tf.clip_by_value(p, _EPS_TEMPER, 1.0)) / float(t))
        if la:  # bench adapt --n: the new lab's temperature and class offsets
            logp = tf.math.log(tf.clip_by_value(p, _EPS_TEMPER, 1.0))
            bias = tf.constant(np.asarray(la["bias"], dtype=np.float32))
            p = tf.nn.softmax(logp / float(la["temperature"]) + bias)
        return tf.identity(p, name="probabilities")

    return probabilities


def metadata(pred) -> dict[str, str]:
    """What a caller outside Python needs beside the graph."""
    rec = pred.record
    return {
        "bloodbench.classes": json.dumps(list(map(str, pred.classes_))),
        "bloodbench.preprocessing": json.dumps(rec.prep.to_dict()),
        "bloodbench.ensemble": rec.ensemble.name,
        "bloodbench.members": json.dumps(pred.member_names_),
        "bloodbench.tta": str(pred.tta),
        "bloodbench.manifest_sha256": str(rec.manifest_sha256 or ""),
        "bloodbench.input": "uint8 (N, S, S, 3) RGB after the preprocessing above",
    }


def check_images(pred, data=None, n: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` model-size images to compare ONNX with Keras on: the first ``n`` readable
    images under ``data`` (a folder or a file), else seeded smooth random images."""
    s = pred.image_size
    if data is not None:
        root = Path(data)
        files = (
            [root]
            if root.is_file()
            else sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        )
        if not files:
            raise BenchError(f"--check {data}: no images there")
        return pred.preprocessing.load([str(f) for f in files[:n]], skip_errors=True)[0]
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float32)
    reps = -(-s // 8)
    big = np.kron(coarse, np.ones((1, reps, reps, 1), dtype=np.float32))[:, :s, :s]
    return np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)


def export_onnx(pred, out: Path, images: np.ndarray, tolerance: float = TOLERANCE) -> dict:
    """Write the predictor's graph to ``out`` (atomically: a temporary file beside it, moved
    into place only after the check) and compare onnxruntime's probabilities with the
    Keras predictor's on ``images``; returns the check's figures."""
    import onnx
    import onnxruntime as ort
    import tf2onnx

    fn = graph_function(pred)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with filtered_stderr():  # grappler's start-up lines (core.quiet)
            model, _ = tf2onnx.convert.from_function(
                fn, input_signature=fn.input_signature, opset=OPSET, output_path=None
            )
        for key, value in metadata(pred).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        model.producer_name = "bloodbench"
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        got = np.concatenate(
            [session.run(None, {name: images[i : i + 64]})[0] for i in range(0, len(images), 64)]
        )
        want = pred.predict_proba(images, preprocessed=True)
        diff = float(np.max(np.abs(got - want))) if len(images) else 0.0
        if not diff <= tolerance:
            raise BenchError(
                f"the ONNX graph differs from the predictor by {diff:.2e} in probability "
                f"(more than {tolerance:g}) on {len(images)} images; nothing was written"
            )
        os.chmod(tmp, new_mode())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "max_abs_diff": diff,
        "n_checked": int(len(images)),
        "same_argmax": float(np.mean(got.argmax(1) == want.argmax(1))) if len(images) else 1.0,
        "opset": OPSET,
    }


__all__ = ["export_onnx", "check_exportable", "graph_function", "check_images", "TOLERANCE"]
