"""Writing a predictor directory (:func:`save_predictor`) and its manifest.

The manifest is checked as a :class:`ensembles.record.PredictorRecord` before anything is
moved into place (a writer never leaves a predictor :func:`verify_predictor` refuses), and
its ``MODEL_CARD.md`` is drawn from that record.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

from core.errors import BenchError
from core.images import Preprocessing
from core.io import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    json_default,
    package_versions,
    staged,
)
from core.shift import ShiftReference
from ensembles.model_card import CARD, model_card
from ensembles.record import FORMAT_VERSION, MANIFEST, PredictorRecord, manifest_digest
from ensembles.tta import TTA_VIEWS


def save_predictor(
    path,
    *,
    ensemble_name: str,
    ensemble,
    members: dict[str, list[Path]],
    member_info: dict[str, dict],
    classes: list[str],
    preprocessing: Preprocessing,
    training_data: dict,
    extra: dict | None = None,
    tta: str = PredictorRecord.model_fields["tta"].default,
    shift: ShiftReference | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write a predictor directory (atomically: a temp dir moved into place).

    ``members`` maps a member name to its saved fold-model folders; ``preprocessing`` is
    the record of how the training images were made, stored for
    :class:`ensembles.predictor.Predictor`; ``tta`` the test-time views
    (:data:`TTA_VIEWS`); ``shift`` the description of the training images behind
    :meth:`ensembles.predictor.Predictor.shift_scores`; ``files`` further files or folders
    the manifest refers to (``{path in the predictor: source}``, e.g. a bag task's models).
    """
    if tta not in TTA_VIEWS:
        raise BenchError(f"[predictor] tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
    extra = {**(extra or {}), "tta": tta, **({"shift": shift.to_dict()} if shift else {})}
    with staged(path) as tmp:
        _write_predictor(
            tmp,
            ensemble_name,
            ensemble,
            members,
            member_info,
            classes,
            preprocessing,
            training_data,
            extra,
            files or {},
        )
    return Path(path)


def _write_predictor(
    tmp: Path,
    ensemble_name,
    ensemble,
    members,
    member_info,
    classes,
    preprocessing: Preprocessing,
    training_data,
    extra,
    files: dict,
) -> None:
    (tmp / "members").mkdir(parents=True)
    for rel, src in files.items():
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
    entries = []
    for name, folders in members.items():
        rel = []
        for k, folder in enumerate(folders):
            dest = tmp / "members" / name / f"model{k}"
            shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("checkpoint.keras"))
            rel.append(dest.relative_to(tmp).as_posix())
        entries.append({"name": name, "models": rel, **member_info.get(name, {})})
    manifest = json.loads(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "classes": list(classes),
                "image_size": preprocessing.image_size,
                "preprocessing": preprocessing.to_dict(),
                "ensemble": {
                    "name": ensemble_name,
                    "type": ensemble.type_name,
                    "params": ensemble.get_params(),
                    "state": ensemble.get_state(),
                },
                "members": entries,
                "training_data": training_data,
                "versions": package_versions(),
                "files": {},  # filled below, the model card among them
                **(extra or {}),
            },
            default=json_default,
        )
    )
    write_manifest(tmp, manifest)


def write_manifest(folder: Path, manifest: dict, files: list[str] | None = None) -> None:
    """Write ``manifest`` (JSON data) into ``folder``, the predictor's other files already
    there: checked whole as a :class:`PredictorRecord`, its ``MODEL_CARD.md`` drawn from it,
    then ``files`` set to the sha256 of each of ``files`` (relative paths in the order
    listed, the card among them; default: every file of ``folder``, in path order), then
    its own digest."""
    record = PredictorRecord.read(manifest, folder / MANIFEST)
    atomic_write_text(folder / CARD, model_card(record))  # checksummed like the rest
    if files is None:
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    manifest = {**manifest, "files": {rel: file_sha256(folder / rel) for rel in files}}
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_json(folder / MANIFEST, manifest)


__all__ = ["save_predictor", "write_manifest"]
