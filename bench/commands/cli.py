"""Command line: ``python -m bench {run,tune,predict,list,inspect}``.

Errors are one line (``error: ...``) and a non-zero exit code; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from bench.config import DEFAULT_CONFIG, PACKAGED_CONFIG, config_file, read_toml
from bench.protocols.distill import distill
from bench.commands.evaluate import evaluate, summary
from bench.report import CROSS_DIR, write_cross_report, write_report
from bench.report.build import cross_report_folder
from bench.commands.differential import (
    GALLERY_HEADER,
    SUMMARY_HEADER,
    differential,
    differential_lines,
    gallery_html,
    side_files,
)
from bench.commands.adapt import cmd_adapt
from bench.commands.export import cmd_export
from bench.commands.outputs import OutputFolder, check_file_output, os_error_line, run_lock, run_of
from bench.run.rundir import RunDir
from bench.commands.tune import tune_from_args
from bench.data.datasets import read_labelled_files
from bench.run.runner import run_from_args
from core import registry
from core.errors import BenchError
from core.images import IMAGE_SUFFIXES, find_images
from core.io import atomic_write_text, safe_text
from core import quiet
from core.progress import console, info, progress_iter, set_verbosity, warn
from ensembles.bags import NO_CALL, REFER, REFER_KINDS, negative_label
from ensembles.predictor import TABLE_COLUMNS, load_predictor, verify_predictor
from ensembles.record import NO_BAG_COLOUR
from ensembles.tta import TTA_VIEWS
from bench.commands.calibrate import (
    add_calibrate_parser,
    cmd_calibrate,
    inspect_lines,
    review_counts,
)


def _add_common(p):
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="warnings, errors and results only"
    )
    talk.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug lines too, and TensorFlow's start-up lines",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark and ensemble blood-cell classifiers.",
        epilog="The config is validated whole before any work: unknown keys, wrong types or "
        "ranges, unsafe names (letters, digits, _ . - only), unknown types, feature "
        "sets, ensemble members or metrics are one `error:` line naming the file and "
        "key. Nothing is deleted: see --force.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_run_parsers, _predict_parsers, _report_parsers, _evaluate_parser, _distill_parser):
        add(sub)
    add_calibrate_parser(sub, _add_common)
    return parser


def _run_parsers(sub) -> None:
    """``run`` and ``tune``."""
    run = sub.add_parser(
        "run", help="train every candidate on shared folds; leaderboard; predictor"
    )
    run.add_argument("--config", default=None, help="config file (default: benchmarks.toml)")
    run.add_argument("--profile", default=None, help="profile in the config (smoke, quick, full)")
    run.add_argument(
        "--data",
        default=None,
        help="class-folder tree, .npz file, or a [datasets.NAME] of the config",
    )
    run.add_argument("--out", default=None, help="run directory")
    run.add_argument("--only", default=None, help="comma-separated candidate names")
    run.add_argument("--workers", type=int, default=None, help="parallel work-unit processes")
    run.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run the work units on this Dask scheduler's workers instead",
    )
    run.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage for tuning (default: SQLite in the run directory; "
        "journal:///path.log for one machine, postgresql://... for several)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="move an existing --out aside (DIR.old-<timestamp>) when it holds "
        "another run or no run, and start again; nothing is deleted",
    )
    _add_common(run)

    tune = sub.add_parser(
        "tune",
        help="join the Optuna studies of a run: add trials from "
        "this process (any number of processes, any machine)",
    )
    tune.add_argument("--out", default=None, help="run directory (prepared here if it is new)")
    tune.add_argument("--candidate", required=True, help="candidate name")
    tune.add_argument(
        "--trials",
        type=int,
        default=None,
        help="finished trials each study should hold in all (default: [tuning] "
        "trials); processes stop together when the total is reached",
    )
    tune.add_argument("--fold", type=int, default=None, help="one outer fold (default: all)")
    tune.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage URL (default: the run's [tuning] storage)",
    )
    tune.add_argument("--config", default=None, help="config, for a new run directory")
    tune.add_argument("--profile", default=None, help="profile, for a new run directory")
    tune.add_argument("--data", default=None, help="data, for a new run directory")
    _add_common(tune)


def _predict_parsers(sub) -> None:
    """``predict``, ``list`` and ``inspect``."""
    pred = sub.add_parser("predict", help="classify images with a saved predictor")
    pred.add_argument(
        "--model", required=True, help="predictor directory, or a run directory (its predictor)"
    )
    pred.add_argument(
        "--img_path",
        "--img-path",
        dest="img_path",
        required=True,
        help="an image or a folder (searched recursively)",
    )
    pred.add_argument("--out", default=None, help="CSV file (default: print to stdout)")
    pred.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128)
    pred.add_argument(
        "--gradcam",
        default=None,
        metavar="OUTDIR",
        help="also write one Grad-CAM PNG per image into OUTDIR (named after the "
        "image's path under --img_path, '/' -> '__', plus .png)",
    )
    pred.add_argument(
        "--summary",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the differential (images and share per predicted class, flagged for "
        "review) and, with --out, write it as OUT_summary.csv and a gallery of the images "
        "per class as OUT_gallery.html (default: on when --img_path is a folder)",
    )
    pred.add_argument(
        "--bags",
        action="store_true",
        help="a bag task's predictor (e.g. APL vs AML per patient): --img_path is "
        "one patient's folder of cell images, or a folder of patient "
        "folders; one CSV row per patient (--out), and each cell's "
        "probabilities in OUT_cells.csv",
    )
    pred.add_argument(
        "--cell-types",
        default=None,
        metavar="folders|FILE.csv:COLUMN",
        help="--bags with a predictor that reads cell types: take each cell's type from "
        "the analyser instead of the predictor's cell-type model: 'folders' (each image's "
        "folder name, e.g. 'Signed slides/Blast, no lineage spec/'), or a CSV with a "
        "'file' column (paths as under --img_path, or absolute) and the type in COLUMN; "
        "a patient with a cell of no known type keeps the model's types (column "
        "cell_types)",
    )
    _add_common(pred)

    lst = sub.add_parser("list", help="show the candidates and profiles of a config")
    lst.add_argument("--config", default=None)
    _add_common(lst)

    ada = sub.add_parser(
        "adapt", help="adapt a predictor to a new lab's own images (no labels needed)"
    )
    ada.add_argument("--model", required=True, help="predictor directory (or its run)")
    ada.add_argument("--data", required=True, help="the new lab's images: folder, .npz or NAME")
    ada.add_argument("--out", required=True, help="new predictor folder")
    ada.add_argument("--labels", default=None, help="FILE.csv:COLUMN, to score the rest")
    ada.add_argument("--class-map", default=None)
    ada.add_argument("--groups", default=None, help="a --labels column: patients or slides")
    ada.add_argument(
        "--max-images", type=int, default=2000, help="images to adapt on (at most half)"
    )
    ada.add_argument(
        "--n",
        type=int,
        default=None,
        help="labelled cells to fit a lab head on (output and cell features; core.labhead)",
    )
    ada.add_argument("--seed", type=int, default=0)
    ada.add_argument("--batch-size", type=int, default=128)
    ada.add_argument(
        "--config",
        default=None,
        help="config for --data NAME and [predictor] adapt_features (the lab head's features)",
    )
    _add_common(ada)

    exp = sub.add_parser(
        "export", help="a predictor or distilled student as one ONNX graph, checked"
    )
    exp.add_argument("--model", required=True, help="predictor directory (or its run)")
    exp.add_argument("--format", default="onnx", choices=["onnx"])
    exp.add_argument("--out", required=True, help="FILE.onnx")
    exp.add_argument(
        "--check",
        default=None,
        help="images to compare ONNX with Keras on (default: seeded synthetic images)",
    )
    exp.add_argument("--n", type=int, default=256, help="how many check images (default 256)")
    _add_common(exp)

    ini = sub.add_parser(
        "init", help="write an editable copy of the shipped config: DIR/benchmarks.toml"
    )
    ini.add_argument("dir", nargs="?", default=".", help="folder (default: the working one)")
    _add_common(ini)

    ins = sub.add_parser("inspect", help="verify and describe a predictor without running it")
    ins.add_argument("model", help="predictor directory, or a run directory (its predictor)")
    _add_common(ins)


def _report_parsers(sub) -> None:
    rep = sub.add_parser(
        "report",
        help="write DIR/report (HTML, Markdown, CSVs); with several "
        "runs also a cross-dataset Friedman/CD report",
    )
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="finished run directories")
    rep.add_argument(
        "--out",
        default=None,
        help="with one DIR: the report's folder (default DIR/report); with several: "
        "the cross-dataset report's folder (default "
        "FIRST_DIR/cross_dataset_report). A folder bloodbench did not write "
        "is refused; only the report's own files are ever replaced",
    )
    rep.add_argument(
        "--no-gradcam",
        dest="gradcam",
        action="store_false",
        default=None,
        help="skip the Grad-CAM audit",
    )
    _add_common(rep)


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="score a saved predictor on a labelled external image "
        "set (another lab's images): scores with bootstrap "
        "CIs, predictions.csv, an HTML page",
    )
    ev.add_argument(
        "--model", required=True, help="predictor directory, or a run directory (its predictor)"
    )
    ev.add_argument(
        "--data",
        required=True,
        help="class-folder tree, .npz, a [datasets.NAME] of the config, or (with "
        "--labels) a folder of images",
    )
    ev.add_argument(
        "--labels",
        default=None,
        metavar="FILE.csv:COLUMN",
        help="labels from a CSV column; its 'file' column is matched to the images "
        "(relative to the CSV's folder or to --data); empty labels left out",
    )
    ev.add_argument(
        "--class-map",
        "--class_map",
        dest="class_map",
        default=None,
        metavar="FILE",
        help='external -> predictor class names: TOML (external = "predictor") or '
        "CSV (external,predictor); default: the same names, any case",
    )
    ev.add_argument(
        "--groups",
        default=None,
        metavar="COLUMN",
        help="a column of the --labels CSV (e.g. patient): bootstrap over groups",
    )
    ev.add_argument(
        "--out",
        default=None,
        help="output folder (default: ./evaluation-<dataset name>); an earlier "
        "evaluation there has its own files replaced (nothing else in it is "
        "touched); a folder bloodbench did not write is refused",
    )
    ev.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128)
    ev.add_argument(
        "--tta",
        default=None,
        choices=list(TTA_VIEWS),
        help="test-time views instead of the predictor's own [predictor] tta",
    )
    ev.add_argument(
        "--adapt",
        default=None,
        choices=["bn"],
        help="unsupervised test-time adaptation on the set's images (AdaBN: "
        "batch-norm statistics re-estimated); reported as adapted",
    )
    ev.add_argument(
        "--no-gradcam",
        dest="gradcam",
        action="store_false",
        default=True,
        help="skip the Grad-CAM gallery of errors",
    )
    ev.add_argument(
        "--config", default=None, help="config for --data NAME (default: benchmarks.toml)"
    )
    _add_common(ev)


def _distill_parser(sub) -> None:
    dis = sub.add_parser(
        "distill",
        help="train one fast CNN (a student) on a finished run's "
        "out-of-fold ensemble probabilities, cross-validated "
        "on its folds; save it as a predictor",
    )
    dis.add_argument("--run", required=True, help="finished run directory")
    dis.add_argument(
        "--out",
        default=None,
        help="predictor folder (default: RUN/distilled); an earlier distilled "
        "predictor there is replaced, anything else refused",
    )
    dis.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel student fits (default: the run's [run] workers)",
    )
    _add_common(dis)


def terminal_table(board, out: Path):
    """The leaderboard's key columns as a rich table that fits the terminal (the full
    table is in the run directory's files)."""
    from rich.table import Table

    ext = [
        c[: -len("_balanced_accuracy")]
        for c in board.columns
        if c.endswith("_balanced_accuracy") and c != "balanced_accuracy"
    ]
    t = Table(
        title=f"Leaderboard ({out.name}): mean over folds",
        title_justify="left",
        caption="external columns: balanced accuracy on that set" if ext else None,
        caption_justify="left",
        pad_edge=False,
    )
    width = max(len(str(n)) for n in board["candidate"])
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("candidate", min_width=min(width, 24), overflow="fold")
    t.add_column("kind", no_wrap=True)
    t.add_column("role", no_wrap=True)
    for col in ("accuracy", "bal.acc", *ext):
        t.add_column(col, justify="right", no_wrap=col in ("accuracy", "bal.acc"), overflow="fold")
    t.add_column("fit s", justify="right", no_wrap=True)
    short = {"ensemble": "ens", "baseline": "base"}
    roles = {"predictor": "★ predictor", "shortcut": "shortcut"}
    for i, (_, row) in enumerate(board.iterrows()):
        role = row.get("role", "")
        cells = [
            str(i + 1),
            str(row["candidate"]),
            short.get(row["kind"], str(row["kind"])),
            roles.get(role, "") if isinstance(role, str) else "",
            f"{row['accuracy']:.3f}±{row['accuracy_std']:.3f}",
            f"{row['balanced_accuracy']:.3f}",
        ]
        cells += [f"{row[f'{e}_balanced_accuracy']:.3f}" for e in ext]
        cells.append(f"{row['fit_seconds']:.0f}")
        t.add_row(*cells, style="bold" if role == "predictor" else None)
    return t


def _check_run_args(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise BenchError(f"--workers must be at least 1, got {args.workers}")
    if args.out is not None and not args.out.strip():
        raise BenchError("--out is empty: give a run directory")


def cmd_run(args) -> int:
    _check_run_args(args)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    board, out = run_from_args(
        args.config,
        profile=args.profile,
        data=args.data,
        out=args.out,
        only=only,
        force=args.force,
        workers=args.workers,
        scheduler=args.scheduler,
        storage=args.storage,
    )
    console.print(terminal_table(board, out))
    console.print(f"run directory: {out}")
    run = RunDir(out)
    if run.report_index.is_file():
        console.print(f"report: {run.report_index}  (full table: {run.leaderboard_file})")
    return 0


def cmd_tune(args) -> int:
    for fold, best, tuning in tune_from_args(
        args.config,
        profile=args.profile,
        data=args.data,
        out=args.out,
        candidate=args.candidate,
        trials=args.trials,
        fold=args.fold,
        storage=args.storage,
    ):
        info(
            f"{args.candidate} fold {fold}: {tuning.get('n_trials', '?')} trials, best "
            f"{tuning.get('best_value', float('nan')):.4f} with {best}"
        )
    return 0


#: the first line of what ``predict`` writes: an existing --out is replaced only when it
#: starts so (a file ``predict`` wrote before); anything else is refused
PREDICT_HEADER = ",".join(TABLE_COLUMNS) + ","
BAGS_HEADER = "bag,n_cells,n_skipped,"
CELLS_HEADER = "bag,path,prediction,"


def cells_file(out) -> Path:
    """``predict --bags``'s side file of each cell's probabilities, beside ``--out``."""
    out = Path(out)
    return out.with_name(out.stem + "_cells.csv")


def _check_predict_outputs(args) -> OutputFolder | None:
    """Before loading anything: where ``predict`` writes may be written (:mod:`bench.commands.outputs`);
    returns the Grad-CAM folder, if asked for."""
    model = Path(args.model)
    reads = (model, run_of(model))
    if args.out:
        check_file_output(
            args.out, "--out", BAGS_HEADER if args.bags else PREDICT_HEADER, reads, "bench predict"
        )
        if args.bags:
            check_file_output(
                cells_file(args.out),
                "--out's cell file",
                CELLS_HEADER,
                reads,
                "bench predict --bags",
            )
        if _summary_on(args):
            summary, gallery = side_files(args.out)
            check_file_output(summary, "--out's summary", SUMMARY_HEADER, reads, "bench predict")
            check_file_output(gallery, "--out's gallery", GALLERY_HEADER, reads, "bench predict")
    if args.gradcam:
        return OutputFolder(args.gradcam, "bench predict --gradcam", "--gradcam", reads).check()
    return None


def _summary_on(args) -> bool:
    """``--summary``: asked for, or by default for a folder of images (not with --bags)."""
    on = Path(args.img_path).is_dir() if args.summary is None else args.summary
    return bool(on) and not args.bags


def _write_out(path, text: str, what: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:  # checked before; if it fails anyway, keep the results
        sys.stdout.write(safe_text(text))
        raise BenchError(
            f"cannot write --out {path} ({os_error_line(exc)}); the {what} were "
            "printed to stdout instead"
        ) from None


def cmd_predict(args) -> int:

    if args.batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {args.batch_size}")
    # arguments first: loading a predictor takes seconds, a typo should not
    if not Path(args.img_path).exists():
        raise BenchError(f"--img_path not found: {args.img_path}")
    cams_out = _check_predict_outputs(args)
    if args.bags:
        return _predict_bags(args)
    record = verify_predictor(args.model)
    if record.bag_colour != NO_BAG_COLOUR:
        raise BenchError(
            f"predictor {args.model} normalises colour per patient ([patients] "
            f"bag_colour = {record.bag_colour!r}): a cell's "
            "probabilities depend on its patient's other cells; use predict "
            "--bags with one folder per patient"
        )
    paths = find_images(args.img_path)
    if not paths:  # the predictor's own errors first, without loading its models
        if args.gradcam:
            load_predictor(args.model).explain_weights()
        raise BenchError(f"no image files under {args.img_path}")
    pred = load_predictor(args.model)
    if args.gradcam:
        pred.explain_weights()  # fails early, with one line, without a CNN member
    buf = io.StringIO()
    writer = csv.writer(buf)
    shift = pred.shift_reference_  # None for predictors saved without one
    cp = pred.conformal_  # prediction sets and review flag, when stored
    writer.writerow(pred.table_header(gradcam=bool(args.gradcam)))
    flagged, done, probas = [], [], []  # per batch: review flags; readable rows; probabilities
    n_ok, n_bad, scores = 0, 0, []
    with cams_out.staged() if cams_out else nullcontext(None) as cam_dir:
        for batch in pred.predict_table(
            paths, args.batch_size, gradcam_dir=cam_dir, root=args.img_path
        ):
            for _, exc in batch.errors:
                warn(f"skipped {exc}")
            n_bad += len(batch.errors)
            writer.writerows(batch.table)  # an unreadable file: its row says why (error)
            if not batch.rows:
                continue
            if shift:
                scores.append(batch.shift)
            if cp:
                flagged.append(batch.review)
            done += batch.rows
            probas.append(batch.proba)
            n_ok += len(batch.rows)
        if not n_ok:
            raise BenchError(
                f"none of the {len(paths)} image file(s) under {args.img_path} "
                "could be read (see the warnings above)"
            )
    if shift:
        summary = shift.batch_summary(np.concatenate(scores))
        if summary["flagged"]:
            warn(
                f"these images look unlike the training images: {summary['share_out']:.0%} "
                f"of them lie further from the training colours than "
                f"{summary['image_level']:.0%} of the training images (column shift_score); "
                "expect lower accuracy than the leaderboard's"
            )
    if cp:
        print(review_counts(flagged, n_ok, cp.confidence), file=sys.stderr)
    _warn_batch(pred, probas)
    if args.out:
        _write_out(args.out, buf.getvalue(), f"{n_ok} predictions")
        unread = f" and {n_bad} unreadable file(s) (column error)" if n_bad else ""
        print(safe_text(f"wrote {n_ok} predictions{unread} to {args.out}"), file=sys.stderr)
    else:
        sys.stdout.write(safe_text(buf.getvalue()))
    if args.gradcam:
        print(safe_text(f"wrote {n_ok} Grad-CAM figures to {args.gradcam}"), file=sys.stderr)
    if _summary_on(args):
        _write_summary(args, pred, done, flagged, n_bad)
    return 0


def _warn_batch(pred, probas: list) -> None:
    """The batch-level warning (core.batch) over every readable image of the command
    (``probas``: each table batch's probabilities)."""
    check = pred.batch_check(np.concatenate(probas)) if probas else None
    if check and check["flagged"]:
        warn(check["line"])


def _write_summary(args, pred, rows: list, flagged: list, n_bad: int) -> None:
    """The differential, printed; with ``--out`` also OUT_summary.csv and OUT_gallery.html
    (:mod:`bench.commands.differential`)."""
    header = pred.table_header(gradcam=bool(args.gradcam))
    review = np.concatenate([b["review"] for b in flagged]) if flagged else None
    table = differential(pred.classes_, [r[1] for r in rows], review, n_bad)
    print(safe_text(differential_lines(table)), file=sys.stderr)
    if not args.out:
        return
    summary, gallery = side_files(args.out)
    # side files: the table is written already; a fault here is one error line naming the
    # file (main), not the page dumped to stdout as _write_out does for the table
    atomic_write_text(summary, table.to_csv(index=False, float_format="%.2f"))
    at = header.index("review_reason") if "review_reason" in header else None
    page = gallery_html(
        pred.classes_,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        None if at is None else [r[at] for r in rows],
        title=f"bench predict: {safe_text(str(args.img_path))}",
    )
    atomic_write_text(gallery, page)
    print(
        safe_text(f"wrote the differential to {summary} and the gallery to {gallery}"),
        file=sys.stderr,
    )


def list_bags(root) -> dict[str, list[Path]]:
    """``{bag: image paths}``: each sub-folder of ``root`` holding images is one bag (its
    images found recursively); a folder without such sub-folders is one bag."""
    root = Path(root)
    if root.is_file():
        raise BenchError(
            f"--bags needs --img_path to be a folder (one patient's cells, or "
            f"one folder per patient), got the file {root}"
        )
    subs = {
        d.name: find_images(d)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    if not any(subs.values()):
        own = find_images(root)
        return {root.resolve().name: own} if own else {}
    # a patient folder without any image file keeps its row (decision none), as one whose
    # images are all unreadable does
    loose = [
        p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if loose:
        warn(
            f"{len(loose)} image(s) directly in {root} belong to no patient folder; "
            f"skipped (e.g. {loose[0].name})"
        )
    return subs


#: per-file warnings of unreadable cells printed before they are only counted
MAX_SKIP_WARNINGS = 5


def _given_cell_types(args, bags: dict) -> dict[str, list[str]]:
    """``--cell-types``: the analyser's type of each cell of each bag (``""`` unknown),
    from its folder names or from a CSV (``FILE.csv:COLUMN`` with a ``file`` column)."""
    if args.cell_types == "folders":
        return {b: [Path(p).parent.name for p in paths] for b, paths in bags.items()}
    listed = read_labelled_files(Path(args.img_path), args.cell_types, "--cell-types")
    by_path = dict(zip(listed.real, listed.labels))
    out = {b: [by_path.get(os.path.realpath(p), "") for p in paths] for b, paths in bags.items()}
    if not any(t for ts in out.values() for t in ts):
        raise BenchError(
            f"--cell-types: none of the image files under {args.img_path} is listed in "
            f"{listed.csv_path}"
        )
    return out


def _predict_bags(args) -> int:
    record = verify_predictor(args.model)  # a single-image predictor fails before loading
    if record.bags is None:
        raise BenchError(
            f"--bags: predictor {args.model} was not trained on a bag task "
            "([data] bags = true); run predict without --bags"
        )
    bags = list_bags(args.img_path)
    if not bags:
        raise BenchError(f"no image files under {args.img_path}")
    given = _given_cell_types(args, bags) if args.cell_types else None
    pred = load_predictor(args.model)
    spec = pred.bag_task_
    if given is not None and spec.cell_types is None:
        warn(
            f"--cell-types: predictor {args.model} scores every cell of a patient "
            f"(aggregator {spec.aggregator}), so the given types are not used"
        )
    results = []
    for name, paths in progress_iter(
        bags.items(), total=len(bags), desc="patients", enabled=len(bags) > 1
    ):
        results.append(pred.predict_bags({name: paths}, args.batch_size, given)[0])
    if spec.cell_types is not None:
        sources = Counter(r["cell_types_from"] for r in results if r["n_cells"])
        info(
            "cell types: "
            + ", ".join(
                f"{n} patient(s) from "
                + {"given": f"the analyser ({args.cell_types})", "model": "the predictor's model"}[
                    k
                ]
                for k, n in sorted(sources.items())
            )
        )
    skipped = [why for r in results for _, why in r["skipped"]]
    for why in skipped[:MAX_SKIP_WARNINGS]:
        warn(f"skipped {why}")
    if len(skipped) > MAX_SKIP_WARNINGS:
        warn(
            f"skipped {len(skipped) - MAX_SKIP_WARNINGS} more unreadable file(s) (column n_skipped)"
        )
    if not any(r["n_cells"] for r in results):
        raise BenchError(
            f"none of the {len(skipped)} image file(s) under {args.img_path} "
            "could be read (see the warnings above)"
        )
    buf, cells = io.StringIO(), io.StringIO()
    w, wc = csv.writer(buf), csv.writer(cells)
    w.writerow(
        [
            *BAGS_HEADER.rstrip(",").split(","),
            f"probability_{spec.positive}",
            "decision",
            "reason",
            "threshold",
            "min_cells",
            "aggregator",
            "leaning",
            "cell_types",
        ]
    )
    wc.writerow([*CELLS_HEADER.rstrip(",").split(","), *pred.classes_])
    for r in results:
        prob = "" if not r["n_cells"] else f"{r['probability']:.6f}"
        leaning = (
            ""
            if not r["n_cells"]
            else (
                spec.positive
                if r["probability"] >= r["threshold"]
                else negative_label([str(c) for c in pred.classes_], spec.positive)
            )
        )
        w.writerow(
            [
                r["bag"],
                r["n_cells"],
                r["n_skipped"],
                prob,
                r["decision"],
                r["reason"],
                f"{r['threshold']:.6f}",
                r["min_cells"],
                spec.aggregator,
                leaning,
                r.get("cell_types_from", ""),
            ]
        )
        for p, row in zip(r["cell_items"], r["cells"]):
            wc.writerow(
                [r["bag"], str(p), pred.classes_[int(np.argmax(row))], *[f"{v:.6f}" for v in row]]
            )
    counts = Counter(r["decision"] for r in results)
    why = Counter(
        next((k for k in REFER_KINDS if r["reason"].startswith(k)), r["reason"])
        for r in results
        if r["decision"] == REFER
    )
    said = ", ".join(
        f"{n} {d}"
        + {
            REFER: " ("
            + ", ".join(f"{k}: {v}" if len(why) > 1 else k for k, v in sorted(why.items()))
            + ")",
            NO_CALL: " (no readable image)",
        }.get(d, "")
        for d, n in sorted(counts.items())
    )
    print(f"{len(results)} patient(s): {said}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        cells_out = cells_file(out)
        _write_out(cells_out, cells.getvalue(), "patient diagnoses")
        _write_out(out, buf.getvalue(), "patient diagnoses")
        print(
            safe_text(
                f"wrote {len(results)} patient diagnoses to {out} and the cells' "
                f"probabilities to {cells_out}"
            ),
            file=sys.stderr,
        )
    else:
        sys.stdout.write(safe_text(buf.getvalue()))
    return 0


def cmd_init(args) -> int:
    """Copy the config shipped with the package to DIR/benchmarks.toml, never over a file."""
    target = Path(args.dir).expanduser() / DEFAULT_CONFIG
    if target.exists() or target.is_symlink():
        raise BenchError(f"{target} exists: bench init never overwrites a file (remove it first)")
    if not PACKAGED_CONFIG.is_file():
        raise BenchError(f"the shipped config is missing: {PACKAGED_CONFIG} (reinstall bloodbench)")
    text = PACKAGED_CONFIG.read_text(encoding="utf-8")
    raw = read_toml(PACKAGED_CONFIG)
    atomic_write_text(target, text)
    print(
        f"wrote {target}: {len(raw.get('profiles', {}))} profiles, "
        f"{len(raw.get('candidates', {}))} candidates, {len(raw.get('datasets', {}))} datasets; "
        "bench commands run in that folder read it (relative paths in it start at its folder)"
    )
    return 0


def cmd_list(args) -> int:
    raw = read_toml(config_file(args.config))
    print("candidates:")
    for name, e in raw.get("candidates", {}).items():
        fs = e.get("params", {}).get("features", "")
        print(
            f"  {name:24s} type={e.get('type')}"
            + (f" features={fs}" if isinstance(fs, str) and fs else "")
        )
    print("ensembles:")
    for name, e in raw.get("ensembles", {}).items():
        print(f"  {name:24s} type={e.get('type')} members={e.get('members', 'cnn')}")
    print("profiles:")
    for name, p in raw.get("profiles", {}).items():
        sel = p.get("select")
        print(
            f"  {name:10s} {p.get('description', '')}"
            + (f" [candidates: {', '.join(sel)}]" if sel else " [all candidates]")
        )
    if raw.get("datasets"):
        print("datasets:")
        for name, d in raw["datasets"].items():
            labs = [src.get("domain", "?") for src in d.get("sources") or []]
            print(f"  {name:10s} " + (f"labs: {', '.join(labs)}" if labs else d.get("path", "")))
    if raw.get("external"):
        print("external sets (scored at the end of run, for these datasets):")
        for name, e in raw["external"].items():
            print(f"  {name:12s} {e.get('path', '')} -> {', '.join(e.get('datasets', []))}")
    print("registered types: " + ", ".join(registry.known()))
    return 0


def lab_lines(labs: dict | None) -> list[str]:
    """``bench inspect``'s lines on the out-of-lab figures the entry was chosen on."""
    if not labs:
        return []
    ba = "balanced_accuracy"
    out = [
        f"  leave-one-lab-out ({labs['protocol']}): balanced accuracy in-lab "
        f"{labs['in_lab'][ba]:.3f}, worst lab {labs['worst_lab'][ba]:.3f} "
        f"({labs.get('worst_lab_name', '')}), mean {labs['mean_lab'][ba]:.3f}"
    ]
    for lab, d in labs["labs"].items():
        v = d[ba]
        out.append(
            f"    {lab} held out: {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
            f"; accuracy {d['accuracy']['value']:.3f}, macro-F1 "
            f"{d['macro_f1']['value']:.3f}"
        )
    return out


def cmd_inspect(args) -> int:

    m = verify_predictor(args.model)  # also checks the fields' types printed below
    ens = m.ensemble
    print(
        f"predictor {args.model}: verified {len(m.files)} files (sha256); nothing was loaded or run"
    )
    print(
        f"  ensemble: {ens.name} ({ens.type}) params={json.dumps(ens.params)}"
        + (f"; chosen as {m.chosen_by}" if m.chosen_by else "")
    )
    if "C" in ens.state:
        print(f"  meta-learner C (fitted): {ens.state['C']}")
    if m.leaderboard:
        print(
            "  leaderboard (out-of-fold): "
            + ", ".join(f"{k}={v:.4f}" for k, v in m.leaderboard.items())
        )
    for mem in m.members:
        w = mem.weight
        print(
            f"  member {mem.name}: type={mem.type} kind={mem.kind} "
            f"fold models={len(mem.models)}" + ("" if w is None else f" weight={w:.3f}")
        )
    cnn = [mem.name for mem in m.members if mem.kind == "cnn"]
    print(f"  Grad-CAM: {'from ' + ', '.join(cnn) if cnn else 'unavailable (no CNN member)'}")
    print(f"  classes ({len(m.classes)}): {', '.join(m.classes)}")
    bags = m.bags
    if bags is not None:
        pl = bags.patient_leaderboard or {}
        print(
            f"  bag task: {bags.positive} per patient (predict --bags), aggregator "
            f"{bags.aggregator}"
            + (" over the typed cells" if bags.cells == "typed" else "")
            + f", threshold {bags.threshold:.4f}"
            + (
                f"; patient ROC AUC {pl['roc_auc']:.3f} [{pl['roc_auc_lo']:.3f}, "
                f"{pl['roc_auc_hi']:.3f}] out-of-fold"
                if pl
                else ""
            )
        )
        if pl.get("nested_roc_auc") is not None:
            print(
                f"  nested (row and threshold chosen without each fold's patients): ROC AUC "
                f"{pl['nested_roc_auc']:.3f} [{pl['nested_roc_auc_lo']:.3f}, "
                f"{pl['nested_roc_auc_hi']:.3f}], sensitivity "
                f"{pl['nested_sensitivity']:.3f}, specificity {pl['nested_specificity']:.3f}"
            )
        if bags.cell_types is not None:
            ct = bags.cell_types
            print(
                f"  cell types: {len(ct.types)}-type model (out-of-fold cell accuracy "
                f"{ct.accuracy if ct.accuracy is None else round(ct.accuracy, 3)}); "
                f"diagnostic: {', '.join(ct.disease) or 'none'}; --cell-types takes the "
                "analyser's"
            )
        rr = (bags.model_extra or {}).get("refer_rate")
        if rr is not None:
            print(f"  referral: at most {rr:.0%} of the out-of-fold patients in the band")
    for line in inspect_lines(m):
        print(line)
    extra = m.model_extra or {}
    ad, la = extra.get("adaptation"), extra.get("label_adaptation")
    if ad:
        print(
            f"  adapted to {ad.get('data_name')} (bench adapt, seed {ad['seed']}): "
            f"{ad['n_images']} images, {ad['layers']} batch-norm layers"
            + (
                f"; lab head on {la['n']} labelled cells: {la['chosen']}"
                + (f" over the {la['feature_set']} features" if la.get("feature_set") else "")
                if la and la.get("chosen")
                else ""
            )
        )
    for line in lab_lines(m.leave_one_lab_out):
        print(line)
    print(f"  image size: {m.prep.image_size}; created {m.created}")
    td = m.training_data or {}
    counts = td.get("counts")
    print(
        f"  trained on {td.get('n_images')} images from {td.get('origin')}"
        + (f"; per class: {json.dumps(counts)}" if counts else "")
    )
    v = m.versions or {}
    if v:
        print("  versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    return 0


def cmd_report(args) -> int:
    one = len(args.dirs) == 1
    cross = None if one else args.out or Path(args.dirs[0]) / CROSS_DIR
    if cross is not None:  # refused before any report is written
        cross_report_folder(args.dirs, cross)
    for d in args.dirs:
        with run_lock(d, "bench report") if Path(d).is_dir() else nullcontext():
            print(
                safe_text(str(write_report(d, gradcam=args.gradcam, out=args.out if one else None)))
            )
    if not one:
        print(safe_text(str(write_cross_report(args.dirs, cross))))
    return 0


def cmd_evaluate(args) -> int:
    if args.out is not None and not args.out.strip():
        raise BenchError("--out is empty: give a folder")
    result = evaluate(
        args.model,
        args.data,
        labels=args.labels,
        class_map=args.class_map,
        groups=args.groups,
        out=args.out,
        batch_size=args.batch_size,
        gradcam=args.gradcam,
        config=args.config,
        tta=args.tta,
        adapt=args.adapt,
    )
    print(summary(result))
    return 0


def cmd_distill(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise BenchError(f"--workers must be at least 1, got {args.workers}")
    r = distill(args.run, out=args.out, workers=args.workers)
    print(
        f"distilled '{r['teacher']}' into {r['predictor']}: {r['n_folds']}-fold accuracy "
        f"{r['accuracy']:.4f} +- {r['accuracy_std']:.4f} (teacher row in the leaderboard), "
        + (
            f"{r['images_per_s']:.0f} images/s against the run's predictor's "
            f"{r['teacher_images_per_s']:.0f} ({r['speed_images']} images at model size, "
            f"{r['cores']} cores)"
            if r["speed_images"]
            else "speed not timed"
        )
        + (f", {r['model_size']:,} parameters" if r["model_size"] else "")
    )
    return 0


COMMANDS = {
    "run": cmd_run,
    "tune": cmd_tune,
    "predict": cmd_predict,
    "init": cmd_init,
    "export": cmd_export,
    "adapt": cmd_adapt,
    "list": cmd_list,
    "inspect": cmd_inspect,
    "report": cmd_report,
    "evaluate": cmd_evaluate,
    "calibrate": cmd_calibrate,
    "distill": cmd_distill,
}


# Commands that only apply saved models use every core for TensorFlow, unless the user set
# BLOODBENCH_TF_THREADS; `run` and `tune` keep the units' fixed layout (cnn.runtime), which
# is what makes their numbers reproducible.
ALL_CORES = {"predict", "evaluate", "report", "calibrate", "export", "adapt"}


def predictor_of(path: str) -> str:
    """``--model``: a predictor directory as given; a run directory stands for its saved
    predictor (said in one line); a run without one is refused naming what is missing."""
    run = RunDir(Path(path).expanduser())
    if not run.is_run():
        return path
    if not run.predictor_manifest.is_file():
        raise BenchError(
            f"--model {path} is a run directory without a saved predictor "
            f"({run.predictor_dir} has no manifest); run it to the end, or pass a predictor"
        )
    info(f"--model {path} is a run: using its saved predictor {run.predictor_dir}")
    return str(run.predictor_dir)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    set_verbosity(-1 if args.quiet else 1 if args.verbose else 0)
    if args.verbose:
        quiet.uninstall()  # TensorFlow's own start-up lines too
    if args.command in ALL_CORES:
        os.environ.setdefault("BLOODBENCH_TF_THREADS", "0")
    try:
        if getattr(args, "model", None) is not None:
            args.model = predictor_of(args.model)
        return COMMANDS[args.command](args)
    except BenchError as exc:
        if args.debug:
            raise
        print(safe_text(f"error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system fault: one line naming the path
        if args.debug:
            raise
        print(safe_text(f"error: {os_error_line(exc)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted (finished work units are kept; run again to resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
