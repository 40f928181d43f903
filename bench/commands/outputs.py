"""Where a command may write: the one output guard of every command (nothing is lost).

Every command that writes (``run``, ``predict``, ``evaluate``, ``calibrate``, ``distill``,
``report``) asks this module before any work:

* **Never inside what it reads.** An output never lies inside a predictor (any folder
  holding a predictor manifest: writing there breaks its checksums) nor inside the run
  directory that the command reads (the run, or the run holding the predictor), except
  at the paths that run names for that command (``report/``, ``distilled/``,
  ``cross_dataset_report/``). Nor may an output folder hold what the command reads.
* **A folder output** (:class:`OutputFolder`) is new, empty, or this command's own earlier
  output: its marker file ``.bloodbench-output.json`` names the command and every file it
  wrote with its sha256. Writing it again replaces only those files, and only while they
  are unchanged; whatever else lies in the folder (a user's notes, a file in ``img/``) is
  left as it is. A new file whose name is taken by a file bloodbench did not write is
  written beside it (``NAME.bloodbench-1.EXT``) and said. The new files are written in a
  temporary sibling folder first, so a full disk leaves the old output as it was.
* **A file output** (``predict --out`` and its side file ``OUT_cells.csv``) is new or a
  file this command wrote before (recognised by its header line); anything else is
  refused, never overwritten.
* **File-system faults**: the target's folder is checked for writability (a probe file,
  removed at once) and for free space (:data:`MIN_FREE_MB`, or the command's estimate)
  before work starts; an ``OSError`` while writing becomes one ``error:`` line naming
  the path (:func:`os_error_line`), and what was complete stays complete.
* **One writer per run directory**: :func:`run_lock` takes an exclusive lock on the run
  directory while ``run``, ``distill`` or ``report`` write to it; a second writer is
  refused in one line (the lock goes with the process, also after ``kill -9``).
  ``bench tune`` processes join a run's studies beside it by design and take no lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from bench.run.rundir import RunDir
from core.errors import BenchError
from core.io import atomic_write_json, file_sha256, is_inside, naming, new_mode
from core.progress import warn
from ensembles.record import MANIFEST as PREDICTOR_MANIFEST

#: the marker of a folder written by a bloodbench command
MARKER = ".bloodbench-output.json"
#: free space an output needs at the least (MiB); ``BLOODBENCH_MIN_FREE_MB`` overrides it
MIN_FREE_MB = 100


def min_free_bytes() -> int:
    raw = os.environ.get("BLOODBENCH_MIN_FREE_MB")
    if raw is None or not raw.strip():
        return MIN_FREE_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise BenchError(f"BLOODBENCH_MIN_FREE_MB must be a number of MiB, got {raw!r}") from None
    if not mb >= 0:
        raise BenchError(f"BLOODBENCH_MIN_FREE_MB must be 0 or more, got {raw!r}")
    return int(mb * (1 << 20))


# ----------------------------------------------------------------------------- what is read


def is_predictor_dir(path) -> bool:
    """Whether ``path`` holds a bloodbench predictor (a manifest with its own digest)."""
    f = Path(path) / PREDICTOR_MANIFEST
    if not f.is_file():
        return False
    try:
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
        return b'"manifest_sha256"' in head and b'"members"' in head
    except OSError:
        return False


def is_run_dir(path) -> bool:
    return RunDir(path).is_run()  # the run directory's one owner says what a run is


def enclosing(path, test) -> Path | None:
    """The nearest folder at or above ``path`` (links resolved) for which ``test`` holds."""
    p = Path(os.path.realpath(path))
    for d in (p, *p.parents):
        if d.is_dir() and test(d):
            return d
    return None


def run_of(predictor) -> Path | None:
    """The run directory holding ``predictor`` (``RUN/predictor``), if any."""
    return enclosing(Path(predictor).parent, is_run_dir)


def check_not_inside(out, what: str, reads=(), allowed=()) -> None:
    """Refuse an output ``out`` inside a predictor, inside one of the folders ``reads``
    (predictors and runs the command reads) other than at one of the run-owned places
    ``allowed``, or holding one of them. (``out`` itself may be a predictor that the
    command replaces: the command checks that it is its own.)"""
    out = Path(out)
    pred = enclosing(Path(os.path.abspath(out)).parent, is_predictor_dir)
    if pred is not None:
        raise BenchError(
            f"{what} {out} lies inside the predictor {pred}: writing there would "
            "break its checksums; give a path outside it"
        )
    if any(is_inside(out, a) for a in allowed):
        return
    for r in reads:
        if r is None:
            continue
        kind = "predictor" if is_predictor_dir(r) else "run directory"
        if is_inside(out, r):
            raise BenchError(
                f"{what} {out} lies inside the {kind} {r} that this command "
                "reads; give a path outside it"
            )
        if out.exists() and is_inside(r, out):
            raise BenchError(
                f"{what} {out} holds the {kind} {r} that this command reads; give another path"
            )


# ----------------------------------------------------------------------------- file system


def existing_ancestor(path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    return p


def check_writable(path, what: str, need_bytes: int | None = None) -> None:
    """Before any work: the folder that will hold ``path`` (or its nearest existing
    ancestor) takes a file, and has ``need_bytes`` free (default :func:`min_free_bytes`)."""
    where = existing_ancestor(path)
    if where == Path(os.path.abspath(path)) and not where.is_dir():  # a file to replace
        where = where.parent
    if not where.is_dir():
        raise BenchError(f"{what} {path}: {where} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".bloodbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchError(
            f"{what} {path}: cannot write in {where} ({exc.strerror or exc})"
        ) from None
    need = min_free_bytes() if need_bytes is None else max(int(need_bytes), min_free_bytes())
    free = shutil.disk_usage(where).free
    if free < need:
        raise BenchError(
            f"{what} {path}: only {free / 2**20:.0f} MiB free in {where}, "
            f"{need / 2**20:.0f} MiB needed (BLOODBENCH_MIN_FREE_MB sets the "
            "minimum)"
        )


def folder_size(path) -> int:
    """Bytes of the files under ``path`` (what copying it needs)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def os_error_line(exc: OSError) -> str:
    """One line for a file-system fault: what failed, on which path."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        first = exc.args[0][0]  # copytree's list of (source, destination, why)
        return f"{first[2]}: {first[1]}" + (
            f" (and {len(exc.args[0]) - 1} more)" if len(exc.args[0]) > 1 else ""
        )
    why = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    hint = {
        errno.ENOSPC: "; free some space and run the command again (finished work is kept)",
        errno.EROFS: "; the file system is read-only: give another --out",
        errno.EDQUOT: "; the disk quota is used up",
    }.get(exc.errno, "")
    return f"{why}: {where}{hint}" if where else f"{why}{hint}"


# ----------------------------------------------------------------------------- file outputs


def check_file_output(path, what: str, header: str, reads=(), command: str = "") -> Path:
    """Before any work: ``path`` may be written as a CSV whose first line starts with
    ``header``: it is new, or a file of that kind (written by this command before). Its
    folder must exist and be writable."""
    path = Path(path)
    check_not_inside(path, what, reads)
    if path.is_dir():
        raise BenchError(f"{what} {path} is a folder; give the path of a CSV file")
    if path.exists() or path.is_symlink():
        if not path.is_file() or path.is_symlink():
            raise BenchError(f"{what} {path} is not a regular file; give a new file name")
        if not _starts_with(path, header):
            raise BenchError(
                f"{what} {path} exists and was not written by "
                f"{command or 'this command'} (its first line is not "
                f"'{header}...'); give a new file name (nothing is overwritten)"
            )
    if not path.parent.is_dir():
        raise BenchError(f"{what} {path}: its folder {path.parent} does not exist")
    check_writable(path, what)
    return path


def _starts_with(path: Path, header: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(header.encode("utf-8")))
    except OSError:
        return False
    return head == header.encode("utf-8")


# ----------------------------------------------------------------------------- folder outputs


def read_marker(folder) -> dict | None:
    f = Path(folder) / MARKER
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


class OutputFolder:
    """A folder that one command writes (see the module docstring).

    Parameters
    ----------
    path : the folder.
    command : who writes it (``"bench evaluate"``); an existing folder is reused only when
        its marker names the same command.
    what : how the folder is named to the user (``"--out"``).
    reads : the predictors and run directories the command reads.
    allowed : run-owned places the folder may lie in (``RUN/report``).
    legacy : for a folder the command wrote before markers existed: a function of the
        folder returning where to move it aside (nothing is deleted), or ``None``.
    """

    def __init__(self, path, command: str, what: str = "--out", reads=(), allowed=(), legacy=None):
        self.path = Path(path)
        self.command = command
        self.what = what
        self.reads = tuple(reads)
        self.allowed = tuple(allowed)
        self.legacy = legacy
        self.renamed: list[tuple[str, str]] = []
        self.moved_aside: Path | None = None

    def check(self, need_bytes: int | None = None) -> "OutputFolder":
        """Before any work: refuse a folder that may not be written (one line)."""
        p = self.path
        check_not_inside(p, self.what, self.reads, self.allowed)
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise BenchError(f"{self.what} {p} is a file; give a folder")
            if any(p.iterdir()):
                marker = read_marker(p)
                if marker is None and self.legacy is not None and self.legacy(p) is not None:
                    pass  # moved aside when published
                elif marker is None:
                    raise BenchError(
                        f"{self.what} {p} is not empty and was not written by "
                        f"{self.command} (no {MARKER}); give a new or empty "
                        "folder (nothing of yours is replaced)"
                    )
                elif marker.get("command") != self.command:
                    raise BenchError(
                        f"{self.what} {p} holds the output of "
                        f"{marker.get('command')}, not of {self.command}; give "
                        "another folder"
                    )
        check_writable(p, self.what, need_bytes)
        return self

    @contextmanager
    def staged(self):
        """Write the output in a temporary sibling folder; on success publish it into
        :attr:`path` (:meth:`publish`); on an error remove the temporary folder and leave
        :attr:`path` as it was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        tmp.chmod(new_mode(folder=True))  # not mkdtemp's private 0o700
        try:
            with naming(self.path):
                yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            self.publish(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, tmp: Path) -> None:
        """Move every file of ``tmp`` into :attr:`path`: replace only files of the earlier
        output that are unchanged since, write beside any other taken name, remove the
        earlier output's unchanged files that this one no longer has; then the marker."""
        out = self.path
        marker = read_marker(out) if out.is_dir() else None
        if marker is None and out.is_dir() and any(out.iterdir()) and self.legacy:
            aside = self.legacy(out)
            if aside is not None:
                Path(aside).parent.mkdir(parents=True, exist_ok=True)
                os.replace(out, aside)
                self.moved_aside = Path(aside)
        out.mkdir(parents=True, exist_ok=True)
        old = dict((marker or {}).get("files") or {})
        old.update((marker or {}).get("pending") or {})
        new_files = {
            f.relative_to(tmp).as_posix(): f
            for f in sorted(tmp.rglob("*"))
            if f.is_file() and not f.is_symlink() and f.name != MARKER
        }
        digests = {rel: file_sha256(f) for rel, f in new_files.items()}
        # the marker first lists both the earlier files and the new ones, so a crash in
        # the middle leaves every file recognisable as bloodbench's
        pending = {**(marker or {}).get("files", {}), **digests}
        atomic_write_json(out / MARKER, {"command": self.command, "files": old, "pending": pending})
        written = {}
        for rel, f in new_files.items():
            dest_rel = rel
            dest = out / rel
            if not is_inside(dest.parent if dest.parent.exists() else out, out):
                raise BenchError(
                    f"cannot write {dest}: its folder leads outside {out} (a "
                    "link); the output is left unfinished"
                )
            if (dest.exists() or dest.is_symlink()) and not self._ours(dest, rel, old):
                dest_rel = _free_name(out, rel)
                dest = out / dest_rel
                self.renamed.append((rel, dest_rel))
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise BenchError(
                    f"cannot write {dest}: {dest.parent} is a file that "
                    "bloodbench did not write; move it"
                ) from None
            os.replace(f, dest)
            written[dest_rel] = digests[rel]
        for rel, digest in old.items():  # earlier files this output no longer has
            if rel in written:
                continue
            f = out / rel
            if (
                f.is_file()
                and not f.is_symlink()
                and is_inside(f, out)
                and file_sha256(f) == digest
            ):
                f.unlink()
                _prune_empty(f.parent, out)
        atomic_write_json(
            out / MARKER,
            {
                "command": self.command,
                "files": written,
                "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        if self.renamed:
            for rel, alt in self.renamed[:5]:
                warn(f"{out / rel} is not bloodbench's: kept it, and wrote {alt} beside it")
            if len(self.renamed) > 5:
                warn(f"{len(self.renamed) - 5} more files written beside files of yours in {out}")

    @staticmethod
    def _ours(dest: Path, rel: str, old: dict) -> bool:
        digest = old.get(rel)
        return (
            digest is not None
            and dest.is_file()
            and not dest.is_symlink()
            and file_sha256(dest) == digest
        )


def _free_name(out: Path, rel: str) -> str:
    p = Path(rel)
    for n in range(1, 10_000):
        alt = p.with_name(f"{p.stem}.bloodbench-{n}{p.suffix}").as_posix()
        if not (out / alt).exists() and not (out / alt).is_symlink():
            return alt
    raise BenchError(f"no free name beside {out / rel}")


def _prune_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    folder, root = Path(folder), Path(root)
    while folder != root and is_inside(folder, root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# ----------------------------------------------------------------------------- one writer


@contextmanager
def run_lock(run_dir, command: str):
    """Hold an exclusive lock on the run directory ``run_dir`` (created if needed) while
    ``command`` writes to it; a second writer is refused in one line. The lock is taken on
    the folder itself (no lock file is left behind) and dies with the process, also after
    ``kill -9``. Where the file system cannot lock folders, nothing is locked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(
                f"{run_dir} is being written by another bloodbench command; wait "
                f"for it to finish (then {command} resumes where it stopped), or "
                "choose another --out"
            ) from None
        except OSError:  # e.g. a network file system without folder locks
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
