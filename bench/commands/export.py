"""``bench export``: a saved predictor (or a distilled student) as one ONNX file
(:mod:`ensembles.export`), checked against the Keras predictor before it is kept."""

from __future__ import annotations

import time
from pathlib import Path

from bench.commands.outputs import check_not_inside, check_writable, run_of
from core.errors import BenchError
from core.progress import info
from ensembles.export import check_exportable, check_images, export_onnx
from ensembles.predictor import load_predictor

FORMATS = ("onnx",)


def _own_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file bench export wrote (so it may be replaced)."""
    try:
        import onnx

        return onnx.load(str(path), load_external_data=False).producer_name == "bloodbench"
    except Exception:  # noqa: BLE001 - anything unreadable as ONNX is not ours
        return False


def check_args(model: Path, out: Path, fmt: str, n: int) -> None:
    """Every refusal before a model is loaded."""
    if fmt not in FORMATS:
        raise BenchError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if n < 1:
        raise BenchError(f"--n must be at least 1, got {n}")
    if not model.is_dir():
        raise BenchError(f"--model not found: {model}")
    if out.suffix.lower() != ".onnx":
        raise BenchError(f"--out {out}: give a file name ending in .onnx")
    if out.is_dir():
        raise BenchError(f"--out {out} is a folder: give a file name ending in .onnx")
    if out.exists() and not _own_onnx(out):
        raise BenchError(
            f"--out {out} exists and is not an ONNX file bench export wrote; nothing is "
            "overwritten: give a new file"
        )
    check_not_inside(out, "--out", reads=(model, run_of(model)))
    check_writable(out, "--out")
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise BenchError(
            f"bench export needs tf2onnx and onnxruntime ({exc.name} is missing): "
            'pip install "bloodbench[export]"'
        ) from None


def export(model, out, fmt: str = "onnx", check=None, n: int = 256, seed: int = 0) -> dict:
    """Export the predictor in ``model`` to ``out``; returns the check's figures and the
    speed of both on the check images."""
    model, out = Path(model).expanduser(), Path(out).expanduser()
    check_args(model, out, fmt, int(n))
    pred = load_predictor(model)
    check_exportable(pred)
    images = check_images(pred, check, int(n), seed)
    info(f"exporting {model} ({', '.join(pred.member_names_)}) to {out} ...")
    result = export_onnx(pred, out, images)
    result |= speeds(pred, out, images)
    return result


def speeds(pred, onnx_file: Path, images) -> dict:
    """Images per second of onnxruntime and of the Keras predictor on ``images`` (one warm
    call each first)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx():
        for i in range(0, len(images), 64):
            session.run(None, {name: images[i : i + 64]})

    def run_keras():
        pred.predict_proba(images, preprocessed=True)

    out = {}
    for key, fn in (("onnx_images_per_s", run_onnx), ("keras_images_per_s", run_keras)):
        fn()
        t = time.perf_counter()
        fn()
        out[key] = len(images) / max(time.perf_counter() - t, 1e-9)
    return out


def cmd_export(args) -> int:
    r = export(args.model, args.out, args.format, args.check, args.n)
    print(
        f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB, opset {r['opset']}): the largest "
        f"probability difference from the Keras predictor is {r['max_abs_diff']:.1e} on "
        f"{r['n_checked']} images (same class for {r['same_argmax']:.0%}); onnxruntime "
        f"{r['onnx_images_per_s']:.0f} images/s, Keras {r['keras_images_per_s']:.0f} images/s"
    )
    return 0


__all__ = ["export", "cmd_export", "FORMATS"]
