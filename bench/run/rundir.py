"""The run directory: its one owner.

Every path, reader and writer of a run directory lives here, so that the runner, the
work units (in this process, in spawned workers or on Dask workers), ``bench tune``, the
report, the Grad-CAM audit and the tests agree on one layout::

    DIR/config.toml            the resolved config (profile merged)
    DIR/state.json             fingerprint (data, folds, settings, candidates), classes,
                               the saved predictor's name
    DIR/manifest.json          dataset summary, grouping, folds, seeds, versions, timings
    DIR/folds.csv              index,source,label,group,fold
    DIR/data/images.npy        the decoded images, rows aligned with folds.csv
    DIR/units/<name>/fold<k>/  result.json, proba.npy, model/, epochs.csv,
                               stress_<shift>.npy (the test fold under a simulated shift)
    DIR/tuning/<study>.json    Optuna studies' trials
    DIR/oof/<name>.npy         out-of-fold probabilities, rows aligned with folds.csv
    DIR/oof/stress/<shift>/<name>.npy   the same under a simulated shift ([stress])
    DIR/leaderboard.{csv,md}
    DIR/predictor/, DIR/report/
    DIR/leakage/               the leakage audit's image-level run (a run directory)
    DIR/leakage.csv            grouped against image-level scores (bench.protocols.leakage)
    DIR/distill/               bench distill: result.json, final/ (the saved student's fit);
                               its cross-validated folds are units/distilled/fold<k>

Folders are published whole with :meth:`RunDir.staged` (written beside, moved into
place); single files are written atomically.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from bench.config import Config, read_toml
from core.errors import BenchError
from core.io import (
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_name,
    is_inside,
    read_json,
    staged,
)
from core.metrics import METRICS
from core.splits import PredefinedFolds
from ensembles.model_card import CARD
from ensembles.record import MANIFEST as PREDICTOR_MANIFEST

RESULT_FILE = "result.json"


class RunDir:
    """A run directory (see the module docstring). Cheap to create; reads lazily.

    Parameters
    ----------
    path : the directory (it may not exist yet).
    """

    CONFIG, STATE, MANIFEST, FOLDS = "config.toml", "state.json", "manifest.json", "folds.csv"
    LEADERBOARD_CSV, LEADERBOARD_MD = "leaderboard.csv", "leaderboard.md"
    LEAKAGE_CSV = "leakage.csv"

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # -- paths ------------------------------------------------------------------------
    def _inside(self, p: Path) -> Path:
        if not is_inside(p, self.path):
            raise BenchError(f"refusing to write outside the run directory {self.path}: {p}")
        return p

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def images_file(self) -> Path:
        return self.path / "data" / "images.npy"

    @property
    def predictor_dir(self) -> Path:
        return self.path / "predictor"

    @property
    def predictor_manifest(self) -> Path:
        """The saved predictor's ``manifest.json`` (:mod:`ensembles.record`)."""
        return self.predictor_dir / PREDICTOR_MANIFEST

    @property
    def model_card(self) -> Path:
        """The saved predictor's ``MODEL_CARD.md`` (:mod:`ensembles.model_card`)."""
        return self.predictor_dir / CARD

    @property
    def config_file(self) -> Path:
        """The resolved config the run was made with (:meth:`read_config`)."""
        return self.path / self.CONFIG

    @property
    def manifest_file(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def folds_file(self) -> Path:
        return self.path / self.FOLDS

    @property
    def leaderboard_file(self) -> Path:
        return self.path / self.LEADERBOARD_CSV

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def report_index(self) -> Path:
        """The report's page (:mod:`bench.report`)."""
        return self.report_dir / "index.html"

    CROSS_REPORT = "cross_dataset_report"

    @property
    def cross_report_dir(self) -> Path:
        """The default folder of a cross-dataset report whose first run is this one."""
        return self.path / self.CROSS_REPORT

    def aside(self, folder: Path) -> Path:
        """Where a folder of the run that has to make way is kept: ``previous/<timestamp>/``
        (nothing is deleted)."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        return self.path / "previous" / stamp / Path(folder).name

    @property
    def tuning_dir(self) -> Path:
        """Each study's summary (:mod:`bench.run.tuning`): ``tuning/<study>.json``."""
        return self.path / "tuning"

    def tuning_file(self, study: str) -> Path:
        return self._inside(self.tuning_dir / f"{study}.json")

    @property
    def optuna_db(self) -> Path:
        """The default Optuna storage: SQLite in the run (:mod:`bench.run.storage`)."""
        return self.path / "optuna.db"

    @property
    def distill_dir(self) -> Path:
        """``bench distill``'s own files (:mod:`bench.protocols.distill`): ``result.json`` and
        ``final/`` (the student fitted on every row); its folds are ``units/distilled``."""
        return self.path / "distill"

    @property
    def distill_final_dir(self) -> Path:
        return self.distill_dir / "final"

    @property
    def leakage_dir(self) -> Path:
        """The leakage audit's image-level run (:mod:`bench.protocols.leakage`)."""
        return self.path / "leakage"

    def unit_dir(self, name: str, fold: int) -> Path:
        check_name(name, "candidate name")
        return self._inside(self.path / "units" / name / f"fold{int(fold)}")

    def unit_model_dir(self, name: str, fold: int) -> Path:
        return self.unit_dir(name, fold) / "model"

    def oof_file(self, name: str) -> Path:
        check_name(name, "candidate or ensemble name")
        return self._inside(self.path / "oof" / f"{name}.npy")

    # -- state and manifest -------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether the folder holds a bloodbench run (its state file)."""
        return self.file(self.STATE).is_file()

    def read_state(self) -> dict:
        return read_json(self.file(self.STATE))

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.file(self.STATE), state)

    def update_state(self, **changes) -> dict:
        state = {**self.read_state(), **changes}
        self.write_state(state)
        return state

    def read_manifest(self) -> dict:
        return read_json(self.file(self.MANIFEST))

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.file(self.MANIFEST), manifest)

    def update_manifest(self, **changes) -> dict:
        """Read, change and write ``manifest.json`` (the one place that does)."""
        manifest = {**self.read_manifest(), **changes}
        self.write_manifest(manifest)
        return manifest

    # -- run files ---------------------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.file(self.CONFIG), cfg.to_toml())

    def read_config(self) -> Config:
        return Config.from_dict(read_toml(self.file(self.CONFIG)))

    def write_folds(self, table: pd.DataFrame) -> None:
        atomic_write_text(self.file(self.FOLDS), table.to_csv(index=False))

    def read_folds_table(self) -> pd.DataFrame:
        return pd.read_csv(self.file(self.FOLDS), dtype={"bag": str, "source": str})

    def write_images(self, images: np.ndarray) -> None:
        atomic_save_npy(self.images_file, np.ascontiguousarray(images))

    # -- what a work unit, the tuner and the report read (cached) ----------------------
    @cached_property
    def config(self) -> Config:
        return self.read_config()

    @cached_property
    def state(self) -> dict:
        return self.read_state()

    @cached_property
    def classes(self) -> list[str]:
        return list(self.state["classes"])

    @cached_property
    def folds_table(self) -> pd.DataFrame:
        return self.read_folds_table()

    @cached_property
    def labels(self) -> np.ndarray:
        """Int labels of every row (indices into :attr:`classes`)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        try:
            return np.array([lookup[str(c)] for c in self.folds_table["label"]], dtype=np.int64)
        except KeyError as exc:
            raise BenchError(
                f"{self.file(self.FOLDS)}: label {exc} is not a class of the run"
            ) from None

    @cached_property
    def bags(self) -> np.ndarray | None:
        """The bag (patient) of every row in a bag task, else ``None``."""
        table = self.folds_table
        return table["bag"].astype(str).to_numpy() if "bag" in table else None

    @property
    def domains(self) -> np.ndarray | None:
        """Each row's lab (a multi-lab dataset), or ``None``."""
        table = self.folds_table
        return table["domain"].astype(str).to_numpy() if "domain" in table else None

    @cached_property
    def folds(self) -> PredefinedFolds:
        return PredefinedFolds(self.folds_table["fold"].to_numpy())

    @cached_property
    def images(self) -> np.ndarray:
        """The run's images (memory-mapped), rows aligned with folds.csv."""
        if not self.images_file.is_file():
            raise BenchError(f"missing {self.images_file} (the run's images)")
        return np.load(self.images_file, mmap_mode="r")

    # -- work units ----------------------------------------------------------------------
    def unit_result(self, name: str, fold: int) -> dict:
        f = self.unit_dir(name, fold) / RESULT_FILE
        if not f.is_file():
            raise BenchError(f"missing work unit result {f}")
        return read_json(f)

    def unit_done(self, name: str, fold: int, cand_hash: str) -> bool:
        f = self.unit_dir(name, fold) / RESULT_FILE
        if not f.is_file():
            return False
        try:
            return read_json(f).get("candidate_hash") == cand_hash
        except (OSError, ValueError):
            return False

    def unit_proba(self, name: str, fold: int) -> np.ndarray:
        return np.load(self.unit_dir(name, fold) / "proba.npy")

    @staticmethod
    def _stress_name(shift: str) -> str:
        return f"stress_{check_name(shift, 'simulated shift')}.npy"

    def unit_stress_file(self, name: str, fold: int, shift: str) -> Path:
        return self.unit_dir(name, fold) / self._stress_name(shift)

    def unit_stress_proba(self, name: str, fold: int, shift: str) -> np.ndarray:
        return np.load(self.unit_stress_file(name, fold, shift))

    def write_unit_stress(self, name: str, fold: int, shift: str, proba: np.ndarray) -> None:
        """Add a finished unit's probabilities under a simulated shift (one atomic file)."""
        atomic_save_npy(self.unit_stress_file(name, fold, shift), proba.astype(np.float32))

    @contextmanager
    def staged_unit(self, name: str, fold: int):
        """A temporary folder for one unit; on success it becomes ``units/<name>/fold<k>``."""
        with staged(self.unit_dir(name, fold)) as tmp:
            yield tmp

    @staticmethod
    def write_unit(
        tmp: Path, result: dict, proba: np.ndarray, stressed: dict[str, np.ndarray] | None = None
    ) -> None:
        np.save(tmp / "proba.npy", proba.astype(np.float32))
        for shift, p in (stressed or {}).items():
            np.save(tmp / RunDir._stress_name(shift), p.astype(np.float32))
        atomic_write_json(tmp / RESULT_FILE, result)

    # -- out-of-fold probabilities ------------------------------------------------------
    def write_oof(self, name: str, proba: np.ndarray) -> None:
        atomic_save_npy(self.oof_file(name), proba.astype(np.float32))

    def stress_oof_file(self, name: str, shift: str) -> Path:
        check_name(name, "candidate or ensemble name")
        check_name(shift, "simulated shift")
        return self._inside(self.path / "oof" / "stress" / shift / f"{name}.npy")

    def write_stress_oof(self, name: str, shift: str, proba: np.ndarray) -> None:
        atomic_save_npy(self.stress_oof_file(name, shift), proba.astype(np.float32))

    def read_stress_oof(self, name: str, shift: str) -> np.ndarray:
        f = self.stress_oof_file(name, shift)
        if not f.is_file():
            raise BenchError(f"missing out-of-fold probabilities under shift {f}")
        return np.load(f).astype(np.float64)

    def read_oof(self, name: str) -> np.ndarray:
        f = self.oof_file(name)
        if not f.is_file():
            raise BenchError(f"missing out-of-fold probabilities {f}")
        return np.load(f).astype(np.float64)

    # -- leaderboard -------------------------------------------------------------------
    def write_leaderboard(self, board: pd.DataFrame, markdown: str) -> None:
        atomic_write_text(self.file(self.LEADERBOARD_CSV), board.to_csv(index=False))
        atomic_write_text(self.file(self.LEADERBOARD_MD), markdown)

    def read_leaderboard(self) -> pd.DataFrame:
        return pd.read_csv(self.file(self.LEADERBOARD_CSV))

    OUTPUTS = (
        "leaderboard.csv",
        "leaderboard.md",
        "predictor",
        "report",
        "external",
        "leakage.csv",
        "patient_leaderboard.csv",
        "patients",
        "labs.csv",
    )

    def keep_previous_outputs(self, board: pd.DataFrame) -> Path | None:
        """Before a new leaderboard replaces a different one, move the finished run's
        outputs (leaderboard, predictor, report) to ``previous/<timestamp>/``; returns
        that folder, or ``None`` when there was nothing to keep or nothing changed."""
        old = self.file(self.LEADERBOARD_CSV)
        if not old.is_file():
            return None
        prev = pd.read_csv(old)
        if "kind" in prev:  # bench distill's row comes back after the run (bench.protocols.distill)
            prev = prev[prev["kind"] != "distilled"]
        cols = ["candidate"] + [c for m in METRICS for c in (m, f"{m}_std")]
        new = pd.read_csv(io.StringIO(board.to_csv(index=False)))  # as it will be read back
        if all(c in prev for c in cols) and prev[cols].sort_values(
            "candidate", kind="stable"
        ).reset_index(drop=True).equals(
            new[cols].sort_values("candidate", kind="stable").reset_index(drop=True)
        ):
            return None  # same entries, same scores (timings may differ)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        dest = self.path / "previous" / stamp
        dest.mkdir(parents=True)
        for name in self.OUTPUTS:
            if self.file(name).exists():
                os.replace(self.file(name), dest / name)
        return dest

    # -- leave-one-lab-out (bench.protocols.labs) -------------------------------------------------
    LABS_CSV = "labs.csv"

    @property
    def labs_dir(self) -> Path:
        """The leave-one-lab-out run of a multi-lab dataset (an ordinary run directory)."""
        return self.path / "labs"

    def write_labs(self, table: pd.DataFrame) -> None:
        atomic_write_text(self.file(self.LABS_CSV), table.to_csv(index=False))

    def read_labs(self) -> pd.DataFrame | None:
        """``labs.csv`` (entry x held-out lab), or ``None`` for a run without one."""
        return self._read_optional(self.LABS_CSV, "entry")

    def _read_optional(self, name: str, key: str) -> pd.DataFrame | None:
        """The CSV ``name`` with its column ``key`` (entry names) read as text, or ``None``
        when the run has not written it."""
        f = self.file(name)
        if not f.is_file():
            return None
        table = pd.read_csv(f)
        table[key] = table[key].astype(str)
        return table

    # -- leakage audit ---------------------------------------------------------------
    def write_leakage(self, table: pd.DataFrame) -> None:
        atomic_write_text(self.file(self.LEAKAGE_CSV), table.to_csv(index=False))

    def read_leakage(self) -> pd.DataFrame | None:
        """``leakage.csv``, or ``None`` when the run has no leakage audit."""
        return self._read_optional(self.LEAKAGE_CSV, "candidate")

    # -- bag (patient) tasks -----------------------------------------------------------
    PATIENT_LEADERBOARD = "patient_leaderboard.csv"

    @property
    def patients_dir(self) -> Path:
        return self.path / "patients"

    def patient_model_path(self, name: str) -> Path:
        """A carried patient row's model in the run (``patients/models/NAME``): the
        cell-type model's folder or the type model's file."""
        check_name(name.removesuffix(".npz"), "patient model name")
        return self._inside(self.patients_dir / "models" / name)

    def patient_model_dir(self, name: str):
        """A patient model's folder, written in a temporary sibling and moved into place
        at the end (:meth:`staged`)."""
        return self.staged(self.patient_model_path(name))

    def write_patient_model(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.patient_model_path(f"{name}.npz"), data)

    def write_patients(
        self, board: pd.DataFrame, scores: pd.DataFrame, cells: pd.DataFrame, meta: dict
    ) -> None:
        """The patient leaderboard, every row's out-of-fold bag scores and decisions
        (``patients/scores.csv``), the chosen row's cell table and the stage's facts."""
        atomic_write_text(self.file(self.PATIENT_LEADERBOARD), board.to_csv(index=False))
        atomic_write_text(self.patients_dir / "scores.csv", scores.to_csv(index=False))
        atomic_write_text(self.patients_dir / "cells.csv", cells.to_csv(index=False))
        atomic_write_json(self.patients_dir / "meta.json", meta)

    def read_patients(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict] | None:
        """What :meth:`write_patients` wrote, or ``None`` for a run without a bag task."""
        f = self.file(self.PATIENT_LEADERBOARD)
        if not f.is_file():
            return None
        d = self.patients_dir
        return (
            pd.read_csv(f),
            pd.read_csv(d / "scores.csv", dtype={"bag": str}),
            pd.read_csv(d / "cells.csv", dtype={"bag": str}),
            read_json(d / "meta.json"),
        )

    # -- external sets ---------------------------------------------------------------
    def external_dir(self, name: str) -> Path:
        check_name(name, "external set name")
        return self._inside(self.path / "external" / name)

    def write_external_proba(self, name: str, entry: str, proba: np.ndarray) -> None:
        check_name(entry, "candidate or ensemble name")
        atomic_save_npy(
            self.external_dir(name) / "proba" / f"{entry}.npy", proba.astype(np.float32)
        )

    def write_external(
        self, name: str, scores: pd.DataFrame, per_class: pd.DataFrame, meta: dict
    ) -> None:
        d = self.external_dir(name)
        atomic_write_text(d / "scores.csv", scores.to_csv(index=False))
        atomic_write_text(d / "per_class.csv", per_class.to_csv(index=False))
        atomic_write_json(d / "meta.json", meta)

    def external_sets(self) -> list[str]:
        d = self.path / "external"
        return (
            sorted(p.name for p in d.iterdir() if (p / "scores.csv").is_file())
            if d.is_dir()
            else []
        )

    def read_external(self, name: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
        d = self.external_dir(name)
        return (
            pd.read_csv(d / "scores.csv"),
            pd.read_csv(d / "per_class.csv"),
            read_json(d / "meta.json"),
        )

    # -- whole folders ------------------------------------------------------------------
    def staged(self, target: Path):
        """:func:`core.io.staged` for a folder inside the run directory."""
        return staged(self._inside(Path(target)))

    def archive(self) -> Path:
        """Move the whole directory aside to ``DIR.old-<timestamp>``; nothing is deleted."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        archive = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while archive.exists():
            archive = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
            n += 1
        os.replace(self.path, archive)
        return archive

    def check_finished(self) -> None:
        """One line saying what is missing when the folder is not a finished run."""
        for f in (self.CONFIG, self.MANIFEST, self.FOLDS, self.STATE, self.LEADERBOARD_CSV):
            if not self.file(f).is_file():
                raise BenchError(f"not a finished bloodbench run (no {f}): {self.path}")
