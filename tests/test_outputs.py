"""Nothing of a user's is lost (bench.commands.outputs): a user's file planted in every place a
command writes — top level, subfolders, side files, inside the predictor or run the
command reads — is unchanged afterwards and the predictor still verifies; read-only and
full file systems give one ``error:`` line each; a second writer of a run is refused."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.commands import outputs
from bench.commands.cli import main
from bench.commands.outputs import MARKER, OutputFolder, check_writable, run_lock
from core.errors import BenchError
from core.io import atomic_write_text, file_sha256
from ensembles.predictor import verify_predictor
from tests.conftest import toy_arrays, write_tiny_config, write_toy_folder

EXTRA = """
[ensembles.both]
type = "soft_voting"
members = "all"

[predictor]
ensemble = "both"

[profiles.tiny.candidates.cnn_tiny.params]
epochs = 2
patience = 2

[profiles.tiny.candidates.rf_hog.params]
n_estimators = 10
"""

USER = b"a user's own file: never to be touched\n"


def _one_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- the folder rule


def _write(folder: OutputFolder, files: dict[str, str]) -> None:
    with folder.staged() as tmp:
        for rel, text in files.items():
            atomic_write_text(tmp / rel, text)


def test_a_folder_is_rewritten_without_touching_anything_of_the_users(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(out, "bench test").check()
    _write(
        first,
        {"index.html": "v1", "img/a.png": "a1", "img/old.png": "gone next time", "csv/t.csv": "t1"},
    )
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "bench test" and set(marker["files"]) == {
        "index.html",
        "img/a.png",
        "img/old.png",
        "csv/t.csv",
    }
    # the user adds files everywhere, edits one of ours, and takes a name we will write
    for rel in ("notes.txt", "img/mine.png", "csv/mine.csv", "deep/er/x.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(USER)
    (out / "csv" / "t.csv").write_bytes(USER)  # edited by the user: now theirs
    (out / "img" / "b.png").write_bytes(USER)  # a name the next output uses
    second = OutputFolder(out, "bench test").check()
    _write(second, {"index.html": "v2", "img/a.png": "a2", "img/b.png": "b2", "csv/t.csv": "t2"})
    for rel in (
        "notes.txt",
        "img/mine.png",
        "csv/mine.csv",
        "deep/er/x.txt",
        "csv/t.csv",
        "img/b.png",
    ):
        assert (out / rel).read_bytes() == USER, rel
    assert (out / "index.html").read_text() == "v2" and (out / "img/a.png").read_text() == "a2"
    assert not (out / "img/old.png").exists()  # ours, unchanged, no longer produced
    assert (out / "img/b.bloodbench-1.png").read_text() == "b2"
    assert (out / "csv/t.bloodbench-1.csv").read_text() == "t2"
    assert sorted(second.renamed) == [
        ("csv/t.csv", "csv/t.bloodbench-1.csv"),
        ("img/b.png", "img/b.bloodbench-1.png"),
    ]
    files = json.loads((out / MARKER).read_text())["files"]
    assert "notes.txt" not in files and "img/b.bloodbench-1.png" in files


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: (d / "notes.txt").write_bytes(USER), "was not written by bench test"),
        (
            lambda d: (d / MARKER).write_text(json.dumps({"command": "bench other", "files": {}})),
            "holds the output of bench other",
        ),
    ],
)
def test_a_folder_the_command_did_not_write_is_refused(tmp_path, setup, message):
    out = tmp_path / "out"
    out.mkdir()
    setup(out)
    before = _tree(out)
    with pytest.raises(BenchError, match=message):
        OutputFolder(out, "bench test").check()
    assert _tree(out) == before


def test_a_failure_while_writing_leaves_the_earlier_output_as_it_was(tmp_path):
    out = tmp_path / "out"
    _write(OutputFolder(out, "bench test").check(), {"index.html": "v1"})
    before = _tree(out)
    with pytest.raises(OSError):
        with OutputFolder(out, "bench test").check().staged() as tmp:
            (tmp / "index.html").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_outputs_inside_a_predictor_or_a_read_run_are_refused(tmp_path):
    pred = tmp_path / "run" / "predictor"
    pred.mkdir(parents=True)
    (pred / "manifest.json").write_text('{"manifest_sha256": "x", "members": []}')
    with pytest.raises(BenchError, match="inside the predictor"):
        OutputFolder(pred / "eval", "bench test").check()
    with pytest.raises(BenchError, match="inside the run directory"):
        outputs.check_not_inside(tmp_path / "run" / "x.csv", "--out", reads=(tmp_path / "run",))
    outputs.check_not_inside(
        tmp_path / "run" / "report",
        "--out",
        reads=(tmp_path / "run",),
        allowed=(tmp_path / "run" / "report",),
    )


# ----------------------------------------------------------------------------- file systems


def test_no_free_space_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(
        outputs.shutil,
        "disk_usage",
        lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1 << 20),
    )
    with pytest.raises(BenchError, match=r"only 1 MiB free .* 100 MiB needed"):
        check_writable(tmp_path / "x", "--out")
    monkeypatch.setenv("BLOODBENCH_MIN_FREE_MB", "0.5")
    check_writable(tmp_path / "x", "--out")


def test_a_write_fault_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("core.io.os.fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "a.csv", "x")
    assert info.value.filename == str(tmp_path / "a.csv")
    assert outputs.os_error_line(info.value).startswith(
        f"No space left on device: {tmp_path / 'a.csv'}; free some space"
    )
    assert list(tmp_path.iterdir()) == []  # no half-written file


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (root in CI); skipped where it cannot be mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_of_a_run_is_refused(tmp_path, toy_folder, capsys):
    cfg = write_tiny_config(tmp_path / "c.toml", toy_folder)
    out = tmp_path / "run"
    with run_lock(out, "bench run"):
        with pytest.raises(BenchError, match="being written by another bloodbench command"):
            with run_lock(out, "bench run"):
                pass
        assert main(["run", "--config", str(cfg), "--out", str(out)]) == 2
        assert "being written by another" in _one_error(capsys.readouterr().err)
    with run_lock(out, "bench run"):  # released with the first
        pass
    assert list(out.iterdir()) == []  # the lock leaves no file


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished tiny run (rf_hog + cnn_tiny, soft voting of both) and images to predict."""
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("outputs_run")
    data = write_toy_folder(root / "data", n_per_class=12)
    cfg = write_tiny_config(root / "cfg.toml", data, EXTRA)
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        _, run = run_from_args(str(cfg), out=str(root / "run"), show_progress=False)
    imgs = root / "imgs"
    imgs.mkdir()
    for i, im in enumerate(toy_arrays(3, 32, seed=9)[0]):
        Image.fromarray(im).save(imgs / f"cell{i}.png")
    return run, imgs, data


@pytest.fixture
def pristine(built):
    """Checks, after a test, that the run's predictor still verifies unchanged."""
    run, _, _ = built
    before = _tree(run / "predictor")
    yield built
    verify_predictor(run / "predictor")
    assert _tree(run / "predictor") == before


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--model", "{pred}", "--img_path", "{imgs}", "--out", "{pred}/x.csv"],
        ["predict", "--model", "{pred}", "--img_path", "{imgs}", "--out", "{pred}/MODEL_CARD.md"],
        ["predict", "--model", "{pred}", "--img_path", "{imgs}", "--gradcam", "{pred}/cams"],
        [
            "predict",
            "--model",
            "{pred}",
            "--img_path",
            "{imgs}",
            "--bags",
            "--out",
            "{pred}/patients.csv",
        ],
        ["predict", "--model", "{pred}", "--img_path", "{imgs}", "--out", "{run}/x.csv"],
        ["evaluate", "--model", "{pred}", "--data", "{data}", "--out", "{pred}/eval"],
        ["evaluate", "--model", "{pred}", "--data", "{data}", "--out", "{run}/eval"],
        ["evaluate", "--model", "{pred}", "--data", "{data}", "--out", "{run}"],
        ["calibrate", "--model", "{pred}", "--data", "{data}", "--n", "30", "--out", "{run}/cal"],
        [
            "calibrate",
            "--model",
            "{pred}",
            "--data",
            "{data}",
            "--n",
            "30",
            "--out",
            "{pred}/members/cal",
        ],
        ["distill", "--run", "{run}", "--out", "{pred}/student"],
        ["distill", "--run", "{run}", "--out", "{run}/units/student"],
        ["report", "{run}", "--out", "{run}/other_report"],
        ["report", "{run}", "{run}", "--out", "{pred}/cross"],
    ],
)
def test_no_command_writes_into_what_it_reads(pristine, argv, capsys, tmp_path):
    run, imgs, data = pristine
    before = _tree(run)
    args = [a.format(pred=run / "predictor", run=run, imgs=imgs, data=data) for a in argv]
    assert main(args) == 2
    line = _one_error(capsys.readouterr().err)
    assert "inside the" in line or "holds the" in line, line
    assert _tree(run) == before


def test_predict_never_overwrites_a_users_file_and_replaces_its_own(pristine, tmp_path, capsys):
    run, imgs, _ = pristine
    mine = tmp_path / "results.csv"
    mine.write_bytes(USER)
    base = ["predict", "--model", str(run / "predictor"), "--img_path", str(imgs)]
    assert main(base + ["--out", str(mine)]) == 2
    assert "was not written by bench predict" in _one_error(capsys.readouterr().err)
    assert mine.read_bytes() == USER
    # --bags: the side file OUT_cells.csv of the user's is refused too, before any loading
    (tmp_path / "p_cells.csv").write_bytes(USER)
    assert main(base + ["--bags", "--out", str(tmp_path / "p.csv")]) == 2
    assert "p_cells.csv" in _one_error(capsys.readouterr().err)
    assert (tmp_path / "p_cells.csv").read_bytes() == USER and not (tmp_path / "p.csv").exists()
    # its own earlier output is replaced; batch size never changes a probability
    ours = tmp_path / "preds.csv"
    assert main(base + ["--out", str(ours), "--batch-size", "128"]) == 0
    first = ours.read_text()
    assert main(base + ["--out", str(ours), "--batch-size", "1"]) == 0
    assert ours.read_text() == first and len(first.splitlines()) == 1 + 3 * 3


def test_predict_gradcam_folder_keeps_the_users_files(pristine, tmp_path, capsys):
    run, imgs, _ = pristine
    cams = tmp_path / "cams"
    base = [
        "predict",
        "--model",
        str(run / "predictor"),
        "--img_path",
        str(imgs),
        "--gradcam",
        str(cams),
    ]
    cams.mkdir()
    (cams / "mine.png").write_bytes(USER)
    assert main(base) == 2  # not bloodbench's folder
    assert "was not written by bench predict --gradcam" in _one_error(capsys.readouterr().err)
    (cams / "mine.png").unlink()
    assert main(base) == 0
    capsys.readouterr()
    pngs = sorted(p.name for p in cams.glob("*.png"))
    assert len(pngs) == 9
    (cams / "mine.png").write_bytes(USER)
    (cams / pngs[0]).write_bytes(USER)  # the user replaced one of ours
    assert main(base) == 0
    assert (cams / "mine.png").read_bytes() == USER and (cams / pngs[0]).read_bytes() == USER
    assert (cams / (Path(pngs[0]).stem + ".bloodbench-1.png")).is_file()


def test_evaluate_twice_keeps_files_planted_in_its_subfolders(pristine, tmp_path, capsys):
    run, _, data = pristine
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--model",
        str(run / "predictor"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-gradcam",
    ]
    assert main(argv) == 0
    assert (out / "predictions.csv").is_file() and (out / MARKER).is_file()
    planted = [out / "notes.txt", out / "img" / "mine.png", out / "csv" / "mine.csv"]
    for f in planted:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(USER)
    assert main(argv) == 0
    for f in planted:
        assert f.read_bytes() == USER, f
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.docx").write_bytes(USER)
    assert main(argv[:-3] + ["--out", str(other)]) == 2
    assert "was not written by bench evaluate" in _one_error(capsys.readouterr().err)
    assert _tree(other) == {"thesis.docx": file_sha256(other / "thesis.docx")}


def test_report_into_a_users_folder_is_refused_and_its_own_rewritten(pristine, tmp_path, capsys):
    run, _, _ = pristine
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "letter.txt").write_bytes(USER)
    assert main(["report", str(run), str(run), "--out", str(docs), "--no-gradcam"]) == 2
    assert "was not written by bench report" in _one_error(capsys.readouterr().err)
    assert (docs / "letter.txt").read_bytes() == USER
    # the run's own report: a user's file in it survives the next report
    assert main(["report", str(run), "--no-gradcam"]) == 0
    capsys.readouterr()
    (run / "report" / "img" / "mine.png").write_bytes(USER)
    (run / "report" / "notes.txt").write_bytes(USER)
    assert main(["report", str(run), "--no-gradcam"]) == 0
    assert (run / "report" / "img" / "mine.png").read_bytes() == USER
    assert (run / "report" / "notes.txt").read_bytes() == USER
    # one run's report elsewhere
    assert main(["report", str(run), "--no-gradcam", "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "index.html").is_file()


def test_non_utf8_file_names_are_kept_escaped(pristine, tmp_path, capsys):
    run, imgs, _ = pristine
    folder = tmp_path / "share"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9 cell.png")  # Latin-1 bytes from another system
    shutil.copy(imgs / "cell0.png", folder / name)
    shutil.copy(imgs / "cell1.png", folder / "plain.png")
    out = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run / "predictor"),
                "--img_path",
                str(folder),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(Path(r["path"]).name for r in rows) == ["caf\\xe9 cell.png", "plain.png"]
    assert main(["predict", "--model", str(run / "predictor"), "--img_path", str(folder)]) == 0
    assert "caf\\xe9 cell.png" in capsys.readouterr().out


def test_read_only_and_full_file_systems_are_one_line(
    pristine, small_fs, tmp_path, capsys, monkeypatch
):
    run, imgs, data = pristine
    pred = str(run / "predictor")
    # full: the free-space check refuses before any work
    assert (
        main(
            ["predict", "--model", pred, "--img_path", str(imgs), "--out", str(small_fs / "p.csv")]
        )
        == 2
    )
    assert "MiB needed" in _one_error(capsys.readouterr().err)
    # full while writing (the check lowered): the error names the file, nothing half-written
    monkeypatch.setenv("BLOODBENCH_MIN_FREE_MB", "0")
    fd = os.open(small_fs / "ballast", os.O_WRONLY | os.O_CREAT)  # fill it to the last block
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    assert (
        main(
            [
                "evaluate",
                "--model",
                pred,
                "--data",
                str(data),
                "--out",
                str(small_fs / "eval"),
                "--no-gradcam",
            ]
        )
        == 2
    )
    line = _one_error(capsys.readouterr().err)
    assert "No space left on device" in line and str(small_fs) in line, line
    assert sorted(p.name for p in small_fs.iterdir()) == ["ballast"]
    # read-only
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for argv in (
        ["predict", "--model", pred, "--img_path", str(imgs), "--out", str(small_fs / "p.csv")],
        ["evaluate", "--model", pred, "--data", str(data), "--out", str(small_fs / "eval")],
        [
            "calibrate",
            "--model",
            pred,
            "--data",
            str(data),
            "--n",
            "30",
            "--out",
            str(small_fs / "cal"),
        ],
        ["distill", "--run", str(run), "--out", str(small_fs / "student")],
    ):
        assert main(argv) == 2
        assert "cannot write in" in _one_error(capsys.readouterr().err), argv


def test_a_full_disk_during_a_run_is_one_line_and_the_run_resumes(
    tmp_path, toy_folder, capsys, monkeypatch
):
    cfg = write_tiny_config(
        tmp_path / "c.toml",
        toy_folder,
        "\n[profiles.tiny.candidates.cnn_tiny.params]\nepochs = 1\n",
    )
    out = tmp_path / "run"
    argv = ["run", "--config", str(cfg), "--out", str(out), "--only", "rf_hog", "--workers", "1"]
    real = np.save
    calls = {"n": 0}

    def full_after_two(file, arr, *a, **k):  # the third .npy written meets a full disk
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, arr, *a, **k)

    monkeypatch.setattr("core.io.np.save", full_after_two)
    assert main(argv) == 2
    line = _one_error(capsys.readouterr().err)
    assert line.startswith("error: No space left on device: ") and str(out) in line, line
    monkeypatch.setattr("core.io.np.save", real)
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "leaderboard.csv").is_file()
    verify_predictor(out / "predictor")


def test_a_dataset_with_a_non_utf8_file_name_runs_and_resumes(tmp_path, capsys):
    data = write_toy_folder(tmp_path / "data", n_per_class=8)
    os.rename(
        data / "disc" / "disc_0000.png", os.path.join(os.fsencode(data / "disc"), b"caf\xe9.png")
    )
    cfg = write_tiny_config(tmp_path / "c.toml", data, "\n[report]\nenabled = false\n")
    argv = ["run", "--config", str(cfg), "--out", str(tmp_path / "run"), "--only", "rf_hog"]
    assert main(argv) == 0
    folds = (tmp_path / "run" / "folds.csv").read_text(encoding="utf-8")
    assert "disc/caf\\xe9.png" in folds
    capsys.readouterr()
    assert main(argv) == 0  # resumes: same data, same folds
    assert "resuming: 3 of 3 work units already done" in capsys.readouterr().err


def test_outputs_are_readable_as_the_umask_allows(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp; what they publish has the mode open() and
    mkdir() would give (a lab's other users can read its results), not 0o600/0o700."""
    import numpy as np

    from core.io import atomic_save_npy

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.csv", "x")
        atomic_save_npy(tmp_path / "a.npy", np.zeros(2))
        folder = outputs.OutputFolder(tmp_path / "out", "bench test", "--out", ()).check()
        with folder.staged() as d:
            (d / "f.txt").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
