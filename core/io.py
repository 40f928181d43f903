"""Small file helpers: atomic writes, staged folders, hashing, environment records."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from core.errors import BenchError

TRACKED_PACKAGES = (
    "bloodbench",
    "numpy",
    "scipy",
    "pillow",
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "scikit-learn",
    "scikit-image",
    "xgboost",
    "optuna",
    "skops",
    "pandas",
    "joblib",
    "dask",
    "distributed",
)


@contextmanager
def naming(path):
    """Give an ``OSError`` raised inside without a file name (a full disk while writing)
    the ``path`` being written, so that its one-line error says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, new_mode())  # as open() would make it, not mkstemp's private 0o600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def new_mode(folder: bool = False) -> int:
    """The mode ``open()`` or ``mkdir()`` would give a new file or folder: 0o666 or 0o777
    less the process's umask. Atomic writes go through ``mkstemp``/``mkdtemp``, whose
    private 0o600/0o700 would hide a lab's results from its other users."""
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (another thread
    creating a file meanwhile would get umask 0); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8: a file name's bytes that are not UTF-8 (which Python keeps as
    lone surrogates, PEP 383, e.g. ``caf\udce9.png``) are written as ``\\xNN``
    (``caf\\xe9.png``). The one rule for every CSV, page and line bloodbench writes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, safe_text(text).encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_save_npy(path, array: np.ndarray) -> None:
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npy")
        os.fchmod(fd, new_mode())
        os.close(fd)
        try:
            np.save(tmp, array)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` into place as ``final_dir`` (replacing an old one)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


@contextmanager
def staged(target):
    """Build the folder ``target`` in a temporary sibling and move it into place at the end.

    Readers see the old folder or the new one, never a half-written one; on an error the
    temporary folder is removed and ``target`` is left as it was::

        with staged(run_dir / "report") as tmp:
            (tmp / "index.html").write_text(html)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with naming(target):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, target)


def link_or_copy(src, dest) -> bool:
    """``dest`` as a hard link to ``src`` (no bytes copied; safe because bloodbench never
    writes into a file in place, it replaces it), or a copy where the file system cannot link
    (another device, no permission). Returns True when linked."""
    try:
        os.link(src, dest)
        return True
    except OSError:
        shutil.copy2(src, dest)
        return False


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def is_inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, symbolic links resolved in both:
    the one containment check of bloodbench (dataset links and labelled files, the run
    directory, the predictor's files)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def json_default(obj):
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj) -> str:
    """SHA-256 of a JSON-serialisable object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, default=json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def hardware() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def git_commit() -> str | None:
    """The commit of the bloodbench checkout that runs, if it is a git checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is a safe identifier for files (letters, digits, ``_ . -``; starts
    with a letter or digit; at most 64 characters), else a one-line error."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise BenchError(
            f"{what} {name!r} is not allowed: use letters, digits, '_', '.' and "
            "'-' (starting with a letter or digit, at most 64 characters)"
        )
    return name
