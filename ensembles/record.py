"""The saved predictor's record: ``manifest.json`` as typed models, and its verification.

:func:`verify_predictor` checks a predictor folder (the manifest's own digest, its fields,
every file's sha256, the fold models' ``candidate.json``) and returns the manifest as a
:class:`PredictorRecord`; its parts (:class:`BagTask`, :class:`ConformalRecord` with its
:class:`Review`, :class:`ShiftRecord`, ...) are read as typed fields, each default here.
A field's ``description`` says what its value must be, and is the one error line when it
is not. Every model keeps the keys it does not declare (``extra="allow"``): the manifest
JSON, kept as read in :attr:`PredictorRecord.raw`, is what digests and copies are made of.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.candidate import CANDIDATE_FILE
from core.colour import BAG_COLOUR
from core.conformal import RAPS_K, RAPS_LAMBDA, SCHEMES, SHIFT_LIMIT, ConformalSets
from core.errors import BenchError
from core.images import Preprocessing, resolve_preprocessing
from core.io import file_sha256, is_inside
from core.shift import ShiftReference
from ensembles.bags import CARRIED_AGGREGATORS
from ensembles.celltypes import TYPED_CUT, LinearModel
from ensembles.tta import TTA_VIEWS

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: the per-bag colour normalisation of a bag task saved without ``[patients] bag_colour``
#: (and of a predictor without a bag task)
NO_BAG_COLOUR = "none"


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception as one short line (Keras and skops messages span several)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, BenchError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) and abs(v) < 2**63) or (isinstance(v, float) and math.isfinite(v))


def _number_check(v):
    if not _is_number(v):
        raise ValueError("not a finite number")
    return v


def _problem(text: str) -> PydanticCustomError:
    return PydanticCustomError("manifest", "{problem}", {"problem": text})


_Number = Annotated[Union[StrictInt, StrictFloat], AfterValidator(_number_check)]
_Name = Annotated[StrictStr, Field(min_length=1)]


class _Record(BaseModel):
    """A part of the manifest; a field's ``description`` says what its value must be, and
    is the error when it is not."""

    model_config = ConfigDict(strict=True, extra="allow")


class MemberRecord(_Record):
    name: _Name = Field(description="'name' must be a non-empty string")
    models: list[_Name] = Field(
        min_length=1, description="'models' must be a non-empty list of folders"
    )
    type: Optional[StrictStr] = Field(None, description="'type' must be a string")
    kind: Optional[StrictStr] = Field(None, description="'kind' must be a string")
    weight: Optional[_Number] = Field(None, description="'weight' must be a number")


class EnsembleRecord(_Record):
    name: StrictStr = Field(description="'name' must be a string")
    type: StrictStr = Field(description="'type' must be a string")
    params: dict = Field(description="'params' must be an object")
    state: dict = Field(description="'state' must be an object")


class Band(_Record):
    """The scores where out-of-fold patients were misclassified (:func:`core.conformal.refer_band`)."""

    lo: _Number = Field(description="'refer_band' needs a number 'lo'")
    hi: _Number = Field(description="'refer_band' needs a number 'hi'")
    n_wrong: Optional[StrictInt] = Field(None, description="'n_wrong' must be an integer")
    n: Optional[StrictInt] = Field(None, description="'n' must be an integer")

    @model_validator(mode="after")
    def _ordered(self):
        if self.lo > self.hi:
            raise _problem("'refer_band' has 'lo' above 'hi'")
        return self


class _BagColour(_Record):
    bag_colour: Literal[BAG_COLOUR] = Field(
        description=f"'bag_colour' must be one of {list(BAG_COLOUR)}"
    )


class CellTypeRecord(_Record):
    """A bag task's cell-type stage (:mod:`ensembles.celltypes`): the cell-type model's
    folder (a saved candidate), its feature set and types, the diagnostic types and the cut of a typed
    cell, and the type model's file when the task's aggregator is ``type_model``."""

    types: list[StrictStr] = Field(min_length=1, description="'types' must be a list of names")
    disease: list[StrictStr] = Field([], description="'disease' must be a list of names")
    cut: _Number = Field(TYPED_CUT, description="'cut' must be a number")
    features: dict = Field(description="'features' must be an object (a feature set)")
    model: _Name = Field(description="'model' must be the cell-type model's file")
    type_model: Optional[StrictStr] = Field(None, description="'type_model' must be a file")
    accuracy: Optional[_Number] = Field(None, description="'accuracy' must be a number")
    _loaded: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _known(self):
        unknown = sorted(set(self.disease) - set(self.types))
        if unknown:
            raise _problem(f"'cell_types' has disease types {unknown} not among its 'types'")
        return self

    def load(self, folder: Path) -> "CellTypeRecord":
        """Read the type model from the predictor ``folder`` (checksummed already; the
        cell-type model is a saved candidate, loaded by the predictor)."""
        if self.type_model:
            self._loaded["type_model"] = LinearModel.from_file(_inside(folder, self.type_model))
        return self

    @property
    def type_model_(self) -> LinearModel:
        return self._loaded["type_model"]


class BagTask(_Record):
    """A bag task's call per patient (``[data] bags = true``; :func:`ensembles.bags.call_bag`)."""

    positive: StrictStr = Field(description="'positive' must be one of 'classes'")
    aggregator: Literal[CARRIED_AGGREGATORS] = Field(
        description=f"'aggregator' must be one of {list(CARRIED_AGGREGATORS)}"
    )
    cells: Literal["all", "typed"] = Field(  # saved before it: all
        "all", description="'cells' must be 'all' or 'typed'"
    )
    cell_types: Optional[CellTypeRecord] = Field(  # saved before it: none
        None, description="'cell_types' must be an object"
    )
    params: dict = Field({}, description="'params' must be an object")
    threshold: _Number = Field(description="'threshold' must be a number")
    min_cells: Annotated[StrictInt, Field(ge=1)] = Field(
        1, description="'min_cells' must be an integer of at least 1"
    )  # saved before it: none
    min_cells_rule: Optional[StrictStr] = Field(
        None, description="'min_cells_rule' must be a string"
    )
    refer_band: Optional[Band] = Field(  # saved before it: none
        None, description="'refer_band' must be an object with numbers 'lo' <= 'hi'"
    )
    colour: Optional[_BagColour] = Field(  # [patients] bag_colour; saved before it: none
        None, description="'colour' must be an object with 'bag_colour'"
    )
    patient_leaderboard: Optional[dict] = Field(
        None, description="'patient_leaderboard' must be an object"
    )

    @model_validator(mode="after")
    def _types_given(self):
        if (self.cells == "typed" or self.aggregator == "type_model") and self.cell_types is None:
            raise _problem("a bag task over typed cells or a type model needs 'cell_types'")
        if self.aggregator == "type_model" and not self.cell_types.type_model:
            raise _problem("a bag task with aggregator 'type_model' needs 'cell_types.type_model'")
        return self

    @property
    def bag_colour(self) -> str:
        """The per-bag colour normalisation the task was trained with."""
        return self.colour.bag_colour if self.colour is not None else NO_BAG_COLOUR


class Calibration(_Record):
    temperature: Optional[Annotated[_Number, Field(ge=0)]] = Field(
        None, description="'temperature' must be a non-negative number"
    )


class Review(_Record):
    """When an image goes to review (:func:`core.conformal.review_of`)."""

    target_error: Optional[_Number] = Field(None, description="'target_error' must be a number")
    confidence_threshold: Optional[_Number] = Field(
        None, description="'confidence_threshold' must be a number"
    )
    shift_limit: _Number = Field(SHIFT_LIMIT, description="'shift_limit' must be a number")


class Recalibration(_Record):
    """What ``bench calibrate`` drew, and the calibration it replaced."""

    data: StrictStr = Field(description="'data' must be a string")
    n: StrictInt = Field(description="'n' must be an integer")
    seed: StrictInt = Field(description="'seed' must be an integer")
    rows: list[StrictStr] = Field(description="'rows' must be a list of strings")
    excluded_rows: list[StrictStr] = Field(
        [], description="'excluded_rows' must be a list of strings"
    )  # saved before it: none
    from_predictor: StrictStr = Field(description="'from_predictor' must be a string")
    before: ConformalRecord = Field(description="'before' must be an object")


class ConformalRecord(_Record):
    """The stored prediction sets (:class:`core.conformal.ConformalSets`, which checks their
    state) and the review rule."""

    method: StrictStr = Field(description="'method' must be a string")
    confidence: _Number = Field(description="'confidence' must be a number")
    scores: list = Field(description="'scores' must be a list")
    labels: list = Field(description="'labels' must be a list")
    folds: Optional[list] = Field(None, description="'folds' must be a list")
    raps_lambda: _Number = Field(RAPS_LAMBDA, description="'raps_lambda' must be a number")
    raps_k: StrictInt = Field(RAPS_K, description="'raps_k' must be an integer")
    fitted_on: StrictStr = Field("", description="'fitted_on' must be a string")
    n_calibration: Optional[StrictInt] = Field(
        None, description="'n_calibration' must be an integer"
    )
    scheme: Literal[SCHEMES] = Field("split", description=f"'scheme' must be one of {SCHEMES}")
    scheme_rule: Optional[StrictStr] = Field(None, description="'scheme_rule' must be a string")
    review: Review = Field(Review(), description="'review' must be an object")
    in_lab: Optional[dict] = Field(None, description="'in_lab' must be an object")
    recalibration: Optional[Recalibration] = Field(
        None, description="'recalibration' must be an object"
    )

    @model_validator(mode="after")
    def _state(self):
        try:
            self.sets(None)  # the classes' count: checked when loading
        except BenchError as exc:
            raise _problem(str(exc)) from None
        return self

    def sets(self, n_classes: int | None) -> ConformalSets:
        """The fitted sets, checked (``n_classes`` None: the labels' upper bound left to a
        later check)."""
        return ConformalSets.from_dict(
            self.model_dump(
                include={
                    "method",
                    "confidence",
                    "scores",
                    "labels",
                    "folds",
                    "raps_lambda",
                    "raps_k",
                    "fitted_on",
                },
                exclude_none=True,
            ),
            n_classes,
        )


class ShiftRecord(_Record):
    """The training images' description behind the shift scores (:mod:`core.shift`), read
    whole by :class:`core.shift.ShiftReference`."""

    _reference: ShiftReference = PrivateAttr()

    @model_validator(mode="after")
    def _readable(self):
        try:
            ref = ShiftReference.from_dict(self.model_extra)
            ok = (
                ref.precision.shape == (len(ref.mean),) * 2
                and len(ref.reference) > 1
                and np.isfinite(ref.precision).all()
            )
        except (TypeError, ValueError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise _problem(PredictorRecord.model_fields["shift"].description)
        self._reference = ref
        return self

    @property
    def reference(self) -> ShiftReference:
        return self._reference


class PredictorRecord(_Record):
    """The fields a predictor needs from ``manifest.json`` (a manifest whose digest was
    recomputed after an edit is refused here with one line, not a traceback later)."""

    format: Optional[StrictInt] = Field(None, description="'format' must be an integer")
    files: dict[_Name, StrictStr] = Field(
        description="'files' must be an object of path: sha256 strings"
    )
    classes: list[StrictStr] = Field(
        min_length=1, description="'classes' must be a non-empty list of class names"
    )
    members: list[MemberRecord] = Field(
        min_length=1, description="'members' must be a non-empty list"
    )
    ensemble: EnsembleRecord = Field(description="'ensemble' must be an object")
    image_size: Optional[Annotated[StrictInt, Field(gt=0)]] = Field(
        None, description="'image_size' must be a positive integer"
    )
    preprocessing: Any = None  # resolved (and checked) into ``prep``
    bags: Optional[BagTask] = Field(None, description="'bags' must be an object")
    created: Optional[StrictStr] = Field(None, description="'created' must be a string")
    chosen_by: Optional[StrictStr] = Field(None, description="'chosen_by' must be a string")
    member_models: Optional[StrictStr] = Field(None, description="'member_models' must be a string")
    training_data: Optional[dict] = Field(None, description="'training_data' must be an object")
    versions: Optional[dict] = Field(None, description="'versions' must be an object")
    leaderboard: Optional[dict[str, _Number]] = Field(
        None, description="'leaderboard' must be an object of numbers"
    )
    calibration: Optional[Calibration] = Field(None, description="'calibration' must be an object")
    tta: Literal[tuple(TTA_VIEWS)] = Field(
        "none", description=f"'tta' must be one of {sorted(TTA_VIEWS)}"
    )
    shift: Optional[ShiftRecord] = Field(
        None, description="'shift' is not a valid description of the training images"
    )
    conformal: Optional[ConformalRecord] = Field(None, description="'conformal' must be an object")
    external: Optional[dict] = Field(None, description="'external' must be an object")
    leave_one_lab_out: Optional[dict] = Field(
        None, description="'leave_one_lab_out' must be an object"
    )
    distilled: Optional[dict] = Field(None, description="'distilled' must be an object")
    manifest_sha256: Optional[StrictStr] = Field(
        None, description="'manifest_sha256' must be a string"
    )
    _prep: Preprocessing = PrivateAttr()
    _raw: dict = PrivateAttr()

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, classes):
        if len(set(classes)) != len(classes):
            raise _problem("'classes' lists a class twice")
        return classes

    @field_validator("members")
    @classmethod
    def _distinct_members(cls, members):
        names = set()
        for m in members:
            if m.name in names:
                raise _problem(f"member '{m.name}' is listed twice")
            names.add(m.name)
        return members

    @model_validator(mode="after")
    def _consistent(self):
        if self.bags is not None and self.bags.positive not in self.classes:
            raise _problem("bags 'positive' must be one of 'classes'")
        if self.image_size is None and not isinstance(self.preprocessing, dict):
            raise _problem("'image_size' is missing")
        try:
            self._prep = resolve_preprocessing(
                {"image_size": self.image_size, "preprocessing": self.preprocessing}
            )
        except Exception as exc:  # noqa: BLE001 - any failure is a bad record
            raise _problem(one_line(exc)) from None
        size = self._prep.image_size
        if self.image_size is not None and size != self.image_size:
            raise _problem(
                f"'image_size' {self.image_size} differs from the preprocessing's {size}"
            )
        return self

    @classmethod
    def read(cls, manifest: dict, where) -> "PredictorRecord":
        """``manifest`` (the JSON object) as a record; a defect is one :class:`BenchError`
        line naming ``where`` (the manifest file) and the field."""
        try:
            record = cls.model_validate(manifest)
        except ValidationError as exc:
            raise BenchError(
                f"bad predictor manifest {where}: {_manifest_problem(exc.errors()[0], manifest)}"
            ) from None
        record._raw = manifest
        return record

    @classmethod
    def unverified(cls, manifest: dict) -> "PredictorRecord":
        """A record of fold models never saved as a predictor, unchecked: its ``classes``,
        ``members`` (``name``, ``kind``) and ``preprocessing`` only (``bench.protocols.external``
        runs a run's candidates through :meth:`Predictor.member_probas`)."""
        record = cls.model_construct(
            classes=list(manifest["classes"]),
            members=[
                MemberRecord.model_construct(name=m["name"], kind=m.get("kind"), models=[])
                for m in manifest["members"]
            ],
            ensemble=None,
            files={},
            preprocessing=manifest.get("preprocessing"),
            image_size=manifest.get("image_size"),
        )
        record._prep = resolve_preprocessing(manifest)
        record._raw = manifest
        return record

    @property
    def raw(self) -> dict:
        """The manifest JSON as read (digests and copies are made of it)."""
        return self._raw

    @property
    def prep(self) -> Preprocessing:
        """How an image becomes model input (:func:`core.images.resolve_preprocessing`)."""
        return self._prep

    @property
    def temperature(self) -> float | None:
        """The temperature of ``[predictor] temperature_scaling`` (``None``: none)."""
        return self.calibration.temperature if self.calibration is not None else None

    @property
    def bag_colour(self) -> str:
        """The per-bag colour normalisation of its bag task."""
        return self.bags.bag_colour if self.bags is not None else NO_BAG_COLOUR


Recalibration.model_rebuild()


def _submodel(annotation):
    """The :class:`_Record` a field's annotation holds (alone, in a list, or optional)."""
    if isinstance(annotation, type) and issubclass(annotation, _Record):
        return annotation
    return next(filter(None, map(_submodel, get_args(annotation))), None)


def _manifest_problem(err: dict, manifest: dict) -> str:
    """The first pydantic error of a manifest in the words of the field's description,
    named by the member, ``ensemble``, ``bags`` or ``calibration`` it belongs to."""
    if err["type"] == "manifest":
        return err["ctx"]["problem"]
    model, prefix, what, loc = PredictorRecord, "", err["msg"], list(err["loc"])
    while loc:
        key = loc.pop(0)
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:  # a union's tag or a table's key
            continue
        what, model = prefix + field.description, _submodel(field.annotation)
        if model is None:
            break
        prefix = f"{key} "
        if key == "members":
            if not (loc and isinstance(loc[0], int)):
                break
            i = loc.pop(0)
            m = manifest["members"][i]
            name = m.get("name") if isinstance(m, dict) else None
            what = f"member {i} must be an object"
            prefix = f"member '{name}': " if isinstance(name, str) and name else f"member {i}: "
    return what


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own ``manifest_sha256`` left out: an
    edited manifest (weights, classes, checksums) no longer matches it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _inside(root: Path, rel: str) -> Path:
    f = (root / rel).resolve()
    if not is_inside(f, root):
        raise BenchError(f"predictor manifest points outside its folder {root}: {rel}")
    return f


def _check_candidate_files(path: Path, record: PredictorRecord) -> None:
    """Each fold model's ``candidate.json`` (JSON, checksummed above) names a type and
    has one class per class of the manifest. Loads no model."""
    k = len(record.classes)
    for m in record.members:
        for j, rel in enumerate(m.models):
            where = f"predictor {path}: member {m.name} model {j}"
            meta_path = path / rel / CANDIDATE_FILE
            if not meta_path.is_file():
                raise BenchError(f"{where}: not a saved candidate (no {CANDIDATE_FILE})")
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError, RecursionError) as exc:
                raise BenchError(
                    f"{where}: unreadable {CANDIDATE_FILE} ({one_line(exc)})"
                ) from None
            if not (
                isinstance(meta, dict)
                and isinstance(meta.get("type"), str)
                and isinstance(meta.get("params"), dict)
                and isinstance(meta.get("classes"), list)
            ):
                raise BenchError(
                    f"{where}: {CANDIDATE_FILE} must be an object with 'type', "
                    "'params' and a 'classes' list"
                )
            if len(meta["classes"]) != k:
                raise BenchError(
                    f"{where}: the model has {len(meta['classes'])} classes, the "
                    f"manifest lists {k} ({', '.join(record.classes)})"
                )


def verify_predictor(path) -> PredictorRecord:
    """Check the manifest's own digest, its fields, and every file against its sha256 (a
    missing, altered or unlisted file is refused); return the manifest's record. Loads no
    model."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BenchError(f"not a predictor directory (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BenchError(f"corrupt predictor manifest {mpath}: {one_line(exc)}") from None
    if not isinstance(manifest, dict):
        raise BenchError(
            f"corrupt predictor manifest {mpath}: a JSON object was expected, "
            f"got {type(manifest).__name__}"
        )
    fmt = manifest.get("format")
    if not _is_int(fmt) or fmt != FORMAT_VERSION:
        raise BenchError(f"{mpath}: unsupported predictor format {fmt!r}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BenchError(f"predictor manifest altered (its digest does not match): {mpath}")
    record = PredictorRecord.read(manifest, mpath)
    for m in record.members:
        for rel in m.models:
            _inside(path, rel)
    for rel, digest in record.files.items():
        f = _inside(path, rel)
        if not f.is_file():
            raise BenchError(f"predictor file missing: {f}")
        if file_sha256(f) != digest:
            raise BenchError(f"predictor file altered (checksum mismatch): {f}")
    listed = set(record.files)
    for f in path.rglob("*"):
        if f.is_dir() and not f.is_symlink():
            continue
        rel = f.relative_to(path).as_posix()
        if rel == MANIFEST:  # only the top-level manifest is not in its own list
            continue
        if rel not in listed or f.is_symlink() or not f.is_file():
            raise BenchError(f"unexpected file in predictor (not in manifest): {f}")
    _check_candidate_files(path, record)
    return record


__all__ = [
    "MANIFEST",
    "FORMAT_VERSION",
    "NO_BAG_COLOUR",
    "one_line",
    "PredictorRecord",
    "MemberRecord",
    "EnsembleRecord",
    "BagTask",
    "CellTypeRecord",
    "Band",
    "Calibration",
    "ConformalRecord",
    "Review",
    "Recalibration",
    "ShiftRecord",
    "manifest_digest",
    "verify_predictor",
]
