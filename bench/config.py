"""Load ``benchmarks.toml``: profiles, named datasets, candidates and ensembles.

A *profile* is a partial config deep-merged over the base config; its key ``select``
(a list of candidate names) limits the candidates it runs. A named dataset under
``[datasets.NAME]`` is merged over ``[data]`` when ``--data NAME`` is given.

The whole resolved config is validated when it is loaded, before any work starts: every
section against a typed schema (pydantic; unknown keys refused with a did-you-mean),
names (candidates, ensembles, feature sets, profiles, datasets: letters, digits, ``_ .
-``), cross-references (candidate and ensemble types, feature sets and their extractors'
parameters, ensemble members, metric names, the predictor's entry), and each
candidate's and ensemble's parameters against the schema its class declares
(:mod:`core.params`). Every float anywhere in the file must be finite (TOML's ``inf`` and
``nan`` are refused), and a value that would make its setting meaningless is refused with
the reason (:data:`BOUND_REASONS`). A violation is one line naming the file, the key and
what was expected.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from core import registry
from core.colour import BAG_COLOUR, MAX_SMOOTH
from core.conformal import METHODS, SCHEMES
from core.errors import BenchError
from core.images import crop_side, crops
from core.io import check_name
from core.metrics import METRICS, RANKING_METRICS
from core.params import key_text, non_finite, space_names, validate_params
from core.stress import SHIFTS
from ensembles.bags import AGGREGATORS, DEFAULT_AGGREGATORS, aggregators_needing
from ensembles.tta import TTA_VIEWS
from features import check_feature_set

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = "benchmarks.toml"
# the config shipped inside the package (a link to the checkout's ``benchmarks.toml``, copied
# into the wheel): used where no ``--config`` is given and the working directory has none
PACKAGED_CONFIG = Path(__file__).resolve().parent / DEFAULT_CONFIG
KNOWN_SECTIONS = {
    "run",
    "data",
    "datasets",
    "external",
    "tuning",
    "feature_sets",
    "candidates",
    "ensembles",
    "stress",
    "predictor",
    "profiles",
    "report",
    "patients",
    "distill",
    "stats",
}


def deep_merge(base: dict, overlay: dict) -> dict:
    """Return ``base`` updated recursively with ``overlay`` (inputs are not modified)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_file(config: str | os.PathLike | None = None) -> Path:
    """The config a command reads: ``--config`` if given, else ``benchmarks.toml`` in the
    working directory if there is one, else the config shipped with the package."""
    if config:
        return Path(config).expanduser()
    local = Path(DEFAULT_CONFIG)
    if local.is_file() or not PACKAGED_CONFIG.is_file():
        return local
    return PACKAGED_CONFIG


def is_packaged(source) -> bool:
    """True for the config shipped with the package: its relative paths start at the working
    directory (the package's folder means nothing to a user)."""
    return source is not None and Path(os.path.abspath(source)) == PACKAGED_CONFIG


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"config file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"bad TOML in {path}: {exc}") from None
    except UnicodeDecodeError:
        raise BenchError(f"bad TOML in {path}: not UTF-8 text") from None
    except OSError as exc:
        raise BenchError(f"cannot read config {path}: {exc.strerror or exc}") from None


def load_config(
    path: str | os.PathLike | None = None,
    profile: str | None = None,
    data: str | None = None,
    only: list[str] | None = None,
    out: str | None = None,
) -> Config:
    """Read, merge and validate a config file.

    Parameters
    ----------
    path : config file; default :func:`config_file` (``benchmarks.toml`` in the working
        directory, else the one shipped with the package).
    profile : profile name; default ``[run] profile``.
    data : a dataset path or the name of a ``[datasets.NAME]`` entry; overrides ``[data] path``.
    only : run only these candidates (they must exist in the profile's selection).
    out : run directory; overrides ``[run] out``.
    """
    path = Path(os.path.abspath(config_file(path)))
    raw = read_toml(path)
    return resolve_config(raw, source=path, profile=profile, data=data, only=only, out=out)


def resolve_config(
    raw: dict,
    source: Path | None = None,
    profile: str | None = None,
    data: str | None = None,
    only: list[str] | None = None,
    out: str | None = None,
) -> Config:
    where = str(source) if source else "config"
    _check_raw(raw, where)
    cfg = deep_merge(
        {
            **{sec: {} for sec in SECTIONS},
            "feature_sets": {},
            "candidates": {},
            "ensembles": {},
            "external": {},
        },
        {k: v for k, v in raw.items() if k not in ("profiles", "datasets")},
    )
    profiles = raw.get("profiles", {})
    profile = profile or cfg["run"].get("profile", RunSection.model_fields["profile"].default)
    if profile not in profiles:
        raise BenchError(
            f"{where}: unknown profile '{profile}'; known: {sorted(profiles) or 'none'}"
            + did_you_mean(profile, profiles)
        )
    overlay = dict(profiles[profile])
    overlay.pop("description", None)
    select = overlay.pop("select", None)
    cfg = deep_merge(cfg, overlay)
    cfg["run"]["profile"] = profile

    if data:
        datasets = raw.get("datasets", {})
        if data in datasets:
            cfg["data"] = deep_merge(cfg["data"], datasets[data])
            cfg["data"]["name"] = data
        else:
            cfg["data"]["path"] = data
            cfg["data"]["fallback"] = {}  # an explicit path never falls back to a download
            cfg["data"]["same_as"] = _same_datasets(data, datasets, source)
    if out:
        cfg["run"]["out"] = out

    names = list(cfg["candidates"])
    if select is not None:
        _check_names(select, names, where, "profile '%s' select" % profile)
        names = [n for n in names if n in select]
    if only is not None:
        if not only:
            raise BenchError("--only names no candidate (give NAME[,NAME...])")
        _check_names(only, names, where, f"--only (profile '{profile}')")
        names = [n for n in names if n in only]
    settings = _validate_sections(cfg, where)
    candidates = {}
    for n in names:
        entry = _resolve_candidate(n, cfg["candidates"][n], cfg, where)
        _resolve_weights_path(entry, source)
        candidates[n] = validated(where, f"[candidates.{n}]", CandidateSpec, entry)
    config = Config(
        **dict(settings),
        feature_sets=cfg["feature_sets"],
        candidates=candidates,
        ensembles=_typed_ensembles(cfg, where),
        source=Path(source) if source else None,
        profile=profile,
    )
    _validate_entries(config, where)
    _check_tracking(config, where)
    config.external = _resolve_external(cfg.get("external") or {}, config.data, raw, source, where)
    return config


PACKAGE_PREFIX = "bloodbench:"


def package_file(value):
    """``bloodbench:REL`` -> the absolute path of ``REL`` inside the installed ``bench``
    package (data shipped with bloodbench, e.g. ``bloodbench:sample/pbc_sample_64.npz``),
    whichever config file names it; any other value unchanged."""
    if isinstance(value, str) and value.startswith(PACKAGE_PREFIX):
        return str(Path(__file__).resolve().parent / value[len(PACKAGE_PREFIX) :])
    return value


def _abs(path: str, source) -> Path:
    p = Path(package_file(path)).expanduser()
    if not p.is_absolute() and source is not None:
        # relative paths in a config file start at its folder (the shipped config's at the
        # working directory)
        p = (Path.cwd() if is_packaged(source) else Path(source).parent) / p
    return Path(os.path.abspath(p))


def _same_datasets(path: str, datasets: dict, source) -> list[str]:
    """Named datasets whose path is ``path`` (so external sets configured for them apply)."""
    target = Path(path).expanduser().resolve()
    return sorted(
        n
        for n, d in datasets.items()
        if isinstance(d, dict)
        and d.get("path")
        and _abs(str(d["path"]), source).resolve() == target
    )


def _resolve_external(
    entries: dict, data: "DataSection", raw: dict, source, where: str
) -> dict[str, "ExternalEntry"]:
    """``[external.NAME]`` entries that apply to this run's dataset, paths made absolute."""
    names = {data.name} | set(data.same_as)
    out = {}
    for name, entry in entries.items():
        check_name(name, f"{where}: external set name")
        e = validated(where, f"[external.{name}]", ExternalEntry, entry)
        unknown = [d for d in e.datasets if d not in raw.get("datasets", {})]
        if unknown:
            raise BenchError(
                f"{where}: [external.{name}] datasets {unknown} are not "
                f"[datasets.*] entries" + did_you_mean(unknown[0], raw.get("datasets", {}))
            )
        if not names & set(e.datasets):
            continue
        e.path = str(_abs(e.path, source))
        if e.labels:
            f, _, col = e.labels.rpartition(":")
            e.labels = f"{_abs(f, source)}:{col}"
        if e.class_map:
            e.class_map = str(_abs(e.class_map, source))
        out[name] = e
    return out


def data_argument(data, config=None) -> tuple[Path | None, str | None]:
    """``--data PATH|NAME`` -> ``(path, None)`` or ``(None, NAME)``: the one rule of ``run``,
    ``tune`` and ``evaluate``. An existing file or folder is a path, and so is anything
    that looks like one (a ``/`` or the OS separator, a leading ``~``, an ``.npz`` suffix in
    any case): it is read from the working directory (``~`` expanded, not resolved).
    Anything else must name a ``[datasets.NAME]`` of ``config`` (default
    ``benchmarks.toml``); an unknown name is a :class:`BenchError`."""
    text = str(data)
    p = Path(text).expanduser()
    if (
        p.exists()
        or "/" in text
        or os.sep in text
        or text.startswith("~")
        or text.lower().endswith(".npz")
    ):
        return p, None
    cfg_path = config_file(config)
    if not cfg_path.is_file():
        if config:
            raise BenchError(f"config file not found: {cfg_path}")
        raise BenchError(f"data not found: {p}")
    datasets = read_toml(cfg_path).get("datasets", {}) or {}
    if text not in datasets:
        raise BenchError(
            f"data not found: '{text}' is neither a file or folder nor a "
            f"[datasets.NAME] of {cfg_path} (known: {sorted(datasets) or 'none'})"
            + did_you_mean(text, datasets)
        )
    return None, text


def did_you_mean(name, known) -> str:
    """The hint ``; did you mean 'X'?`` for the closest of ``known``, or nothing."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_names(asked, known, where, what):
    if not isinstance(asked, list) or not all(isinstance(n, str) for n in asked):
        raise BenchError(f"{where}: {what} must be a list of candidate names, got {asked!r}")
    missing = [n for n in asked if n not in known]
    if missing:
        raise BenchError(
            f"{where}: unknown candidate(s) {missing} in {what}; known: {known}"
            + did_you_mean(missing[0], known)
        )


def _resolve_candidate(name: str, entry: dict, cfg: dict, where: str) -> dict:
    if not isinstance(entry, dict) or "type" not in entry:
        raise BenchError(f"{where}: candidate '{name}' needs a 'type' (see `python -m bench list`)")
    entry = copy.deepcopy(entry)
    params = entry.setdefault("params", {})
    fs = params.get("features")
    if isinstance(fs, str):
        if fs not in cfg["feature_sets"]:
            raise BenchError(
                f"{where}: candidate '{name}' uses unknown feature set '{fs}'; "
                f"known: {sorted(cfg['feature_sets'])}"
            )
        params["features"] = copy.deepcopy(cfg["feature_sets"][fs])
        entry["feature_set"] = fs
    return entry


def _resolve_weights_path(entry: dict, source) -> None:
    """A candidate's ``weights`` file (CNN backbones), if relative, starts at the config's folder."""
    w = entry.get("params", {}).get("weights")
    if not isinstance(w, str) or w.lower() in ("", "imagenet", "none") or source is None:
        return
    if not Path(w).expanduser().is_absolute():
        entry["params"]["weights"] = str(_abs(w, source))


# ----------------------------------------------------------------------------- schema
# Each setting's default lives in its field here (and nowhere else).

Metric = Literal[METRICS]
RankingMetric = Literal[RANKING_METRICS]  # [run] metric: a fold metric or worst/mean lab
Number = Union[float, int]
MAX_IMAGE_SIZE = 1024


class _Section(BaseModel):
    # inf and nan (TOML's inf, nan) refused for every float setting
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _all_optional(model: type[BaseModel], name: str, exclude=()) -> type[BaseModel]:
    """``model`` with every field (but ``exclude``) optional, default ``None``, and the
    same constraints: a partial table merged over a whole one later."""
    fields = {
        n: (Optional[Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation], None)
        for n, f in model.model_fields.items()
        if n not in exclude
    }
    return create_model(name, __base__=_Section, __doc__=f"A partial {model.__name__}.", **fields)


class RunSection(_Section):
    seed: int = Field(default=42, ge=0)
    folds: int = Field(default=5, ge=2, le=100)
    # leaderboard order and predictor choice; multi-lab data may rank by the held-out labs
    # ("worst_lab_balanced_accuracy", bench.protocols.labs)
    metric: RankingMetric = "accuracy"
    # "kfold": stratified grouped folds over all rows; "lab": one fold per lab ([data] sources)
    split: Literal["kfold", "lab"] = "kfold"
    # multi-lab data with split = "kfold": also run leave-one-lab-out (DIR/labs) and add
    # the per-lab and worst-lab columns before the predictor is chosen
    leave_one_lab_out: bool = True
    # also a transductive AdaBN figure per held-out lab (bench.protocols.labs.adabn_scores): own columns
    lab_adabn: bool = False
    # leave-one-lab-out adaptation curve (bench.protocols.labs.adaptation_curve): each
    # held-out lab's half adapted on gives N labelled cells (seeded draws, stratified),
    # a lab head is fitted on them and the entry's output as `bench adapt --n N` does
    # ([predictor] adapt_features), and the other half is scored: columns
    # <lab>_n<N>_balanced_accuracy; [] turns it off
    lab_curve: list[Annotated[int, Field(ge=5)]] = [25, 50, 100, 200]
    lab_curve_draws: int = Field(default=5, ge=1)
    workers: int = Field(default=1, ge=1, le=1024)
    profile: str = "quick"
    out: str = Field(default="runs/latest", min_length=1)
    plugins: list[str] = []
    scheduler: str | None = None
    # run tracking (bench.run.tracking): "mlflow" logs the run's params, per-fold and
    # leaderboard metrics, leaderboard, report and model card as one MLflow run; off by default
    tracking: Literal["", "mlflow"] = ""
    # where: an MLflow tracking URI; "" = a SQLite store in ./mlruns (mlruns/mlflow.db, artifacts
    # in mlruns/artifacts); MLflow 3's plain-file store ("file:./mlruns") needs
    # MLFLOW_ALLOW_FILE_STORE=true
    tracking_uri: str = ""
    tracking_experiment: str = Field(default="bloodbench", min_length=1)


class FallbackSection(_Section):
    name: str = ""
    url: str
    md5: str = Field(pattern=r"^[0-9a-fA-F]{32}$")
    filename: str = ""
    classes: list[str] = []


class SourceEntry(_Section):
    """One lab of a multi-lab dataset (``[[datasets.NAME.sources]]``, bench.data.datasets)."""

    domain: str = Field(pattern=r"^[a-z][a-z0-9_]*$")  # the lab's name (folds.csv, columns)
    path: str = Field(min_length=1)  # class folders, an .npz, or the folder `labels` lists
    labels: str = Field(default="", pattern=r"^(.+:[^:]+)?$")  # FILE.csv:COLUMN
    groups: str = ""  # FILE.csv (file,group) or FILE.csv:COLUMN: patients, slides
    pairs: str = ""  # CSV file_a,file_b kept in one fold
    # the source's class names onto [data] classes ("" leaves a class out); a class not
    # listed keeps its name when that is a shared class, else it is left out (said)
    class_map: dict[str, str] = {}
    max_images: int = Field(default=0, ge=0)  # a stratified, seeded sample of this lab


class DataSection(_Section):
    path: str = ""
    image_size: int = Field(default=64, ge=8, le=MAX_IMAGE_SIZE)
    max_images: int = Field(default=0, ge=0)
    groups: str = ""
    pairs: str = ""
    group_rule: str = Field(default="", pattern=r"^(number_block:[1-9][0-9]*)?$")
    cache_dir: str = ""
    fallback: dict = {}
    classes: list[str] = []
    name: str | None = None
    same_as: list[str] = []
    min_class_size: int = Field(default=0, ge=0)  # classes with fewer images are left out
    labels: str = Field(default="", pattern=r"^(.+:[^:]+)?$")  # FILE.csv:COLUMN
    bags: bool = False  # labels belong to the groups (patients): scored per group
    positive: str = ""  # the bag task's positive class (e.g. "APL")
    cell_types: str = Field(default="", pattern=r"^(.+:[^:]+)?$")  # composition aggregator
    # the cell types (of cell_types) that carry the disease: the patient leaderboard's
    # restricted-cell rows aggregate only these cells (e.g. blasts and promyelocytes)
    disease_cells: list[str] = []
    # Gaussian low-pass (sigma, model-input pixels) after the resize, in training and in the
    # predictor (core.colour.smooth): the same cell at another export size or JPEG quality
    # gives nearly the same input
    smooth: Number = Field(default=0.0, ge=0, le=MAX_SMOOTH)
    # per-image colour normalisation after it, in training and in the predictor, for every
    # candidate kind (core.colour.image_colour): "reinhard" (each image's L*a*b* mean and
    # spread mapped to a fixed target), "rgb" (per channel), "none"
    colour_norm: Literal["none", "reinhard", "rgb"] = "none"
    # several labs in one dataset (bench.data.datasets.load_sources): `classes` is the shared list
    sources: list[SourceEntry] = []


class TuningSection(_Section):
    trials: int = Field(default=0, ge=0)
    timeout: Number = Field(default=0, ge=0)
    storage: str = ""
    pruner: Literal["median", "hyperband", "none"] = "median"
    val_fraction: Number = Field(default=0.2, gt=0, lt=1)
    max_samples: int = Field(default=0, ge=0)
    metric: Metric = "accuracy"
    min_gain: Number = Field(default=0, ge=0)  # over the configured trial, to adopt a tuned one
    # where a tuned setting must win to replace the configured one (bench.run.tuning, "Adoption"):
    # "full": the winner of cheap trials is refitted beside the configured setting at the
    # refit's fidelity on the inner split, and kept only when it scores higher there by more
    # than adopt_gain; "trial": the cheap trial's score decides (only for a fidelity whose
    # ranking is shown to agree with full fidelity: benchmarks/fidelity.py)
    adopt: Literal["full", "trial"] = "full"
    adopt_gain: Number = Field(default=0, ge=0)


class CandidateTuning(TuningSection):
    """A candidate's tuning settings: ``[tuning]`` with its own ``tuning`` table over it."""

    fidelity: dict = {}  # parameter overrides in trials only (bench.run.tuning)
    space: list[str] | None = None  # the param_space names to search (default all)


TuningOverride = _all_optional(CandidateTuning, "TuningOverride")


class CandidateEntry(_Section):
    type: str
    params: dict = {}
    tuning: TuningOverride | None = None
    feature_set: str | None = None
    # several labs ([data] sources): each lab drawn to the mean lab size in every fit and
    # trial (bench.data.sources.lab_balanced_rows); the total of training rows is unchanged
    lab_balance: bool = False


class EnsembleEntry(BaseModel):  # its own settings beside type/members: the class's schema
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: str
    members: Literal["cnn", "all"] | list[str] = "cnn"
    stress: bool = False  # fitted on the members' rows under [stress] shifts too

    def params(self) -> dict:
        """The ensemble class's own settings (every key but type, members, stress)."""
        return dict(self.model_extra or {})


class StressSection(_Section):
    shifts: list[Literal[SHIFTS]] = []  # core.stress: simulated lab shifts of the test folds


class ExternalEntry(_Section):
    path: str = Field(min_length=1)
    labels: str = Field(default="", pattern=r"^(.+:[^:]+)?$")  # FILE.csv:COLUMN
    groups: str = ""  # a column of the labels CSV (patients): bootstrap over them
    class_map: str = ""  # TOML or CSV file; default: class names, case-insensitive
    datasets: list[str] = []  # the [datasets.NAME] runs it applies to
    max_images: int = Field(default=0, ge=0)  # a stratified, seeded sample (0: all)


class ConformalSection(_Section):
    """``[predictor] conformal``: prediction sets calibrated on out-of-fold rows
    (core.conformal) and the review flag of ``bench predict``."""

    confidence: Number = Field(default=0.95, gt=0, lt=1)
    method: Literal[METHODS] = "mondrian"
    # "split": the fold average against every out-of-fold row; "cross": each fold's ensemble
    # against its own fold's rows (measured: split within 0.2 points of nominal on PBC images
    # no fit saw, cross 1.5 points over at 0.90; benchmarks/README.md)
    scheme: Literal[SCHEMES] = "split"
    # the calibration rows: "combiner", the saved ensemble's combiner (weights or final
    # meta-learner) over the members' out-of-fold probabilities, as the predictor combines
    # them; "oof", the entry's own out-of-fold rows (per-fold combiners, which a stacked
    # entry does not ship). Measured on PBC images no fit saw: combiner 0.904 / 0.952 at
    # 0.90 / 0.95, oof 0.929 / 0.960 (benchmarks/README.md)
    rows: Literal["combiner", "oof"] = "combiner"
    raps_lambda: Number = Field(default=0.01, ge=0)
    raps_k: int = Field(default=1, ge=0)
    target_error: Number = Field(default=0.02, gt=0, lt=1)  # among the answered images
    shift_limit: Number = Field(default=1.0, gt=0, le=1)  # shift score that flags an image


class PredictorSection(_Section):
    ensemble: str = "best"  # "best", "robust" ([stress]) or an entry's name
    robust_tolerance: Number = Field(default=0.005, ge=0)
    temperature_scaling: bool = False
    tta: Literal[tuple(TTA_VIEWS)] = "none"
    conformal: ConformalSection = ConformalSection()
    # the [feature_sets.NAME] the lab head of `bench adapt --n` (and the leave-one-lab-out
    # adaptation curve) reads beside the predictor's output (core.labhead); "" (a config
    # without feature sets): recalibrate the output only. The shipped config: "all"
    adapt_features: str = ""
    # ... of the central fraction of each image's side: the cell, not its surroundings
    adapt_crop: Number = Field(default=0.5, gt=0, le=1)


class ReportSection(_Section):
    enabled: bool = True  # write DIR/report at the end of `run`
    # the level of its intervals and the bins of its ECE: [stats] confidence, ece_bins
    alpha: Number = Field(default=0.05, gt=0, lt=1)  # significance level of the tests
    gradcam: bool = True  # Grad-CAM audit of CNN candidates and CNN ensembles
    gradcam_per_class: int = Field(default=6, ge=0)  # seeded sample per class (energy, sanity)
    gallery_per_class: int = Field(default=3, ge=0)  # correct and misclassified shown per class
    # flag when Spearman rho(trained, random) >= this
    randomization_threshold: Number = Field(default=0.5, gt=-1, le=1)
    # warn when a colour-only baseline reaches this balanced accuracy
    colour_only_warning: Number = Field(default=0.6, gt=0, le=1)
    colour_extractors: list[str] = ["color", "colour", "hsv", "rgb", "lab_hist", "stain"]
    seed: int = Field(default=0, ge=0)  # sampling of audited images
    leakage_audit: bool = (
        False  # rerun on image-level folds beside the grouped (bench.protocols.leakage)
    )


class PatientsSection(_Section):
    """Bag (patient-level) tasks: a dataset with ``bags = true`` (see bench/protocols/patients.py)."""

    aggregators: list[Literal[tuple(AGGREGATORS)]] = Field(
        default=list(DEFAULT_AGGREGATORS), min_length=1
    )
    # attention MIL (aggregator "attention"): the [candidates.NAME] of the run, of type
    # transfer_frozen, whose backbone gives the cells' embeddings (cached, shared with it)
    mil_embeddings: str = "tl_mnv2_frozen"
    trim: Number = Field(default=0.1, ge=0, lt=0.5)  # trimmed mean: fraction cut at each end
    # top-k mean: mean of the highest fraction of a bag's cells
    top_fraction: Number = Field(default=0.2, gt=0, le=1)
    # feature set of the cell-type stage's model (composition, [typed cells] rows, type model)
    composition_features: str = Field(default="all", min_length=1)
    # decision threshold, chosen on the training folds' bags: "youden" (best balanced
    # accuracy), "half" (0.5) or "sensitivity:X", X in (0, 1] (the highest threshold that
    # keeps a sensitivity of at least X on them; checked by _threshold_rule)
    threshold: str = "youden"
    # per-bag colour normalisation of the cells, in training, out-of-fold scoring and the
    # predictor alike (core.colour.bag_colour): "none", "rgb" (each patient's pooled
    # per-channel mean and spread mapped to one fixed target) or "reinhard" (the same in
    # L*a*b*)
    bag_colour: Literal[BAG_COLOUR] = "none"
    # stain augmentation drawn per bag in training (core.colour.bag_jitter): every
    # training cell of a patient gets the same random per-channel gain, spread this
    # (log scale); 0: none. Training rows only, never a scored one
    bag_jitter: Number = Field(default=0.0, ge=0, le=0.5)
    # the report warns when a colour-only (shortcut) row's ROC AUC comes within this of the
    # best other row's
    shortcut_margin: Number = Field(default=0.1, ge=0, lt=1)
    n_boot: int = Field(default=2000, ge=100)  # bootstrap over bags (CIs and paired tests)
    # fewer readable cells than this: no call ("refer"); "auto": the 5th percentile of
    # the training bags' cell counts (ensembles.bags.min_cells_from_counts)
    min_cells: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # the most patients the predictor may refer: its referral band around the threshold
    # holds at most this share of the out-of-fold patients (core.conformal.refer_band;
    # the nested figure draws the band without the outer fold's patients)
    refer_rate: Number = Field(default=0.25, ge=0, le=1)
    seed: int = Field(default=0, ge=0)

    @field_validator("threshold")
    @classmethod
    def _threshold_rule(cls, rule: str) -> str:
        if rule in ("youden", "half"):
            return rule
        if not rule.startswith("sensitivity:"):
            raise ValueError('must be "youden", "half" or "sensitivity:X" (X in (0, 1])')
        try:
            x = float(rule.split(":", 1)[1])
        except ValueError:
            x = None
        if x == 0:
            raise ValueError(
                "sensitivity:0 keeps no positive patient, so the threshold would "
                "call nearly every patient negative; give X in (0, 1], e.g. "
                "sensitivity:0.95"
            )
        if x is None or not 0 < x <= 1:
            raise ValueError(
                "sensitivity:X needs X in (0, 1], the fraction of the training "
                "folds' positive patients the threshold keeps, e.g. "
                "sensitivity:0.95"
            )
        return rule


class StatsSection(_Section):
    """The statistics of every figure with an interval or an ECE: the one home of each
    value (bench.stats.scoring, the protocols external, labs and patients,
    bench.commands.evaluate and the report read them from here)."""

    # level of every interval: Student t over folds (leaderboard, report), percentile
    # bootstrap of the external sets, the held-out labs, the patients and `bench evaluate`
    confidence: Number = Field(default=0.95, gt=0, lt=1)
    ece_bins: int = Field(default=15, ge=1)  # confidence bins of ECE and reliability diagrams
    # bootstrap resamples over images or groups: held-out labs ([run] leave_one_lab_out)
    # and `bench evaluate`
    n_boot: int = Field(default=1000, ge=100)
    # the same for the external sets scored at the end of `run` (every entry on every set)
    n_boot_external: int = Field(default=200, ge=100)
    # seed of every bootstrap over images or groups (the patients' bootstrap over bags:
    # [patients] n_boot and seed)
    seed: int = Field(default=0, ge=0)
    # the verdict of `evaluate` and `calibrate` on a new set (bench.stats.scoring.verdict):
    # usable when the balanced accuracy's interval lies at or above usable_balanced_accuracy
    # and at most usable_review_share of the images would go to review; not usable when the
    # interval lies below it or more would go to review; else not yet shown either way
    usable_balanced_accuracy: Number = Field(default=0.8, gt=0, lt=1)
    usable_review_share: Number = Field(default=0.5, gt=0, le=1)


class DistillSection(_Section):
    """``bench distill`` (bench.protocols.distill): one compact CNN, the student, trained on an
    entry's out-of-fold class probabilities (its soft labels), on the run's folds."""

    teacher: str = ""  # an entry of the leaderboard; "": the run's saved predictor
    # the student: a compact scratch CNN of its own (4 blocks of 16-32 filters, 48 px on the
    # central half of the image, dropout 0.3), trained 16 epochs: soft targets carry more
    # to learn than labels. Not tied to any profile's candidate; give [distill] student to
    # change it
    student: CandidateEntry = CandidateEntry(
        type="scratch_cnn",
        params={
            "blocks": 4,
            "filters": 16,
            "convs_per_block": 2,
            "dense_units": 256,
            "dropout": 0.3,
            "augment": "flips",
            "crop": 0.5,
            "input_size": 48,
            "learning_rate": 0.002,
            "batch_size": 64,
            "epochs": 16,
            "patience": 16,
            "schedule": "cosine",
        },
    )
    # each training row's target: (1 - hard_weight) x the teacher's probabilities (at
    # temperature) + hard_weight x its label
    hard_weight: Number = Field(default=0.2, ge=0, le=1)
    temperature: Number = Field(default=1.0, gt=0, le=20)  # > 1 softens the teacher's rows
    # images/s of the student and the run's predictor, timed on this many of the run's
    # images (0: not timed)
    speed_images: int = Field(default=2048, ge=0)


SECTIONS = {
    "run": RunSection,
    "data": DataSection,
    "tuning": TuningSection,
    "predictor": PredictorSection,
    "stress": StressSection,
    "report": ReportSection,
    "patients": PatientsSection,
    "distill": DistillSection,
    "stats": StatsSection,
}


class Settings(BaseModel):
    """The typed settings sections of a resolved config (:data:`SECTIONS`)."""

    run: RunSection
    data: DataSection
    tuning: TuningSection
    predictor: PredictorSection
    stress: StressSection
    report: ReportSection
    patients: PatientsSection
    distill: DistillSection
    stats: StatsSection


class CandidateSpec(CandidateEntry):
    """A candidate of a resolved config: its entry with the named feature set filled in."""

    def spec(self) -> dict:
        """The entry as the run records and hashes it (the keys the config gave)."""
        return self.model_dump(exclude_unset=True)


class Config(Settings):
    """A resolved configuration, validated once and passed on typed: the settings sections
    (``cfg.run.seed``, ``cfg.stats.confidence``, ...; each default in its model's field),
    this run's candidates, ensembles and external sets, the feature sets, and where it came
    from (``source``, ``profile``).

    Made by :func:`load_config` / :func:`resolve_config`; a run directory's ``config.toml``
    (:meth:`to_toml`) reads back into the same model with :meth:`from_dict`; a changed copy,
    validated again, is :meth:`derive`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    feature_sets: dict[str, dict] = {}
    candidates: dict[str, CandidateSpec] = {}
    ensembles: dict[str, EnsembleEntry] = {}
    external: dict[str, ExternalEntry] = {}
    source: Optional[Path] = Field(default=None, exclude=True)
    profile: Optional[str] = Field(default=None, exclude=True)

    @classmethod
    def from_dict(cls, table: dict, source=None, profile: str | None = None) -> "Config":
        """A resolved config table (a run's ``config.toml``) as a :class:`Config`."""
        where = str(source) if source else "config"
        sections = _typed_sections(table, where)
        return cls(
            **sections,
            feature_sets=copy.deepcopy(table.get("feature_sets") or {}),
            candidates={
                n: validated(where, f"[candidates.{n}]", CandidateSpec, e)
                for n, e in (table.get("candidates") or {}).items()
            },
            ensembles=_typed_ensembles(table, where),
            external={
                n: validated(where, f"[external.{n}]", ExternalEntry, e)
                for n, e in (table.get("external") or {}).items()
            },
            source=Path(source) if source else None,
            profile=profile,
        )

    def to_dict(self) -> dict:
        """The resolved table :meth:`from_dict` reads (every settings key present)."""
        return {
            **{sec: getattr(self, sec).model_dump() for sec in SECTIONS},
            "feature_sets": copy.deepcopy(self.feature_sets),
            "candidates": {n: e.spec() for n, e in self.candidates.items()},
            "ensembles": {n: e.model_dump() for n, e in self.ensembles.items()},
            "external": {n: e.model_dump() for n, e in self.external.items()},
        }

    def derive(self, **changes) -> "Config":
        """A copy with ``changes`` (``section={key: value}`` for a settings section, merged
        over it; ``candidates={...}`` etc. replaced whole), validated again."""
        table = self.to_dict()
        for key, value in changes.items():
            table[key] = {**table[key], **value} if key in SECTIONS else value
        return Config.from_dict(table, self.source, self.profile)

    def candidate_specs(self) -> dict[str, dict]:
        """Every candidate's entry as its candidate is built from (``core.candidate``)."""
        return {n: e.spec() for n, e in self.candidates.items()}

    def fold_seed(self, fold: int) -> int:
        """The seed of everything fitted for outer fold ``fold``: the run seed + the fold."""
        return self.run.seed + int(fold)

    def override(self, section: str, **values) -> None:
        """Set ``values`` in settings ``section`` of this config (validated)."""
        where = str(self.source) if self.source else "config"
        setattr(
            self,
            section,
            validated(
                where,
                f"[{section}]",
                SECTIONS[section],
                {**getattr(self, section).model_dump(), **values},
            ),
        )

    def path(self, value: str) -> str:
        """A file named in the config: a relative path starts at the config's folder;
        ``bloodbench:REL`` is a file shipped inside the package (:func:`package_file`)."""
        value = package_file(value)
        if not value or self.source is None or Path(value).expanduser().is_absolute():
            return value
        return str(_abs(value, self.source))

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))

    def feature_extractors(self, features) -> list[str]:
        """The extractor names behind a candidate's ``params.features``: a
        ``[feature_sets.NAME]`` (its keys are the extractors), a table of extractors, or a
        list of either."""
        if isinstance(features, dict):
            return list(features)
        if isinstance(features, str):
            named = self.feature_sets.get(features)
            return list(named) if isinstance(named, dict) else [features]
        if isinstance(features, (list, tuple)):
            return [e for f in features for e in self.feature_extractors(f)]
        return []

    def colour_only_candidates(self) -> dict[str, list[str]]:
        """Candidates whose features are all colour extractors (``[report]
        colour_extractors``): name -> extractor names. Acquisition shortcuts: the report and
        the patient leaderboard mark them."""
        words = [w.lower() for w in self.report.colour_extractors]
        out = {}
        for name, entry in self.candidates.items():
            feats = entry.params.get("features")
            ex = self.feature_extractors(feats) if feats is not None else []
            if ex and all(any(w in e.lower() for w in words) for e in ex):
                out[name] = ex
        return out


_TYPE_TAGS = {"int", "float", "str", "bool", "dict", "list", "none"}


def _key_path(loc) -> str:
    """The user's key path of a pydantic error location (internal union tags dropped)."""
    parts = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", str(x)) and str(x) not in _TYPE_TAGS:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts)


# why a bound leaves out a value that would make its setting meaningless (said with it)
BOUND_REASONS = {
    "[predictor] conformal.confidence": "1 would put every class in every prediction set, 0 none",
    "[report] colour_only_warning": "at 0 every colour-only baseline would be warned about "
    "(a balanced accuracy is never below 0)",
    "[report] randomization_threshold": "at -1 every Grad-CAM map would be flagged (a rank "
    "correlation is never below -1)",
    "[patients] shortcut_margin": "at 1 every colour-only row would be warned about (ROC AUCs "
    "lie between 0 and 1)",
}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
#: keys that moved to another section: the old place names the new one
MOVED = {"[report] confidence": "[stats] confidence", "[report] ece_bins": "[stats] ece_bins"}


def _schema_error(where: str, prefix: str, model, exc: ValidationError) -> BenchError:
    err = exc.errors()[0]
    path = _key_path(err["loc"])
    if err["type"] == "extra_forbidden":
        key = path.rsplit(".", 1)[-1]
        known = list(model.model_fields) if "." not in path else []
        if f"{prefix} {path}" in MOVED:
            return BenchError(
                f"{where}: {prefix} {path} has moved to "
                f"{MOVED[prefix + ' ' + path]} (one level and one ECE binning "
                "for every interval of the run)"
            )
        return BenchError(
            f"{where}: {prefix} unknown key '{path}'"
            + (did_you_mean(key, known) or (f"; known: {sorted(known)}" if known else ""))
        )
    reason = BOUND_REASONS.get(f"{prefix} {path}") if err["type"] in _BOUNDS else None
    return BenchError(
        f"{where}: {prefix} {path} {_plain(err)}, got {err.get('input')!r}"
        + (f": {reason}" if reason else "")
    )


def _plain(err: dict) -> str:
    """A pydantic error in the words of the config's reader."""
    ctx, kind = err.get("ctx") or {}, err["type"]
    words = {
        "greater_than_equal": "must be at least {ge}",
        "greater_than": "must be above {gt}",
        "less_than_equal": "must be at most {le}",
        "less_than": "must be below {lt}",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "float_type": "must be a number",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a table",
        "missing": "is required",
        "literal_error": "must be one of {expected}",
        "string_pattern_mismatch": "must match {pattern}",
        "finite_number": "must be a finite number",
    }
    if kind == "value_error":  # a model's own check, in its own words
        return str(ctx["error"])
    if kind in words:
        try:
            return words[kind].format(**ctx)
        except KeyError:
            pass
    return err["msg"].lower()


def validated(where: str, prefix: str, model: type[BaseModel], value) -> BaseModel:
    """``value`` (a table) as ``model``, its defaults filled; a violation is one
    :class:`BenchError` line naming ``where``, ``prefix`` and the key."""
    if not isinstance(value, dict):
        raise BenchError(f"{where}: {prefix} must be a table, got {value!r}")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _schema_error(where, prefix, model, exc) from None


def _typed_sections(cfg: dict, where: str = "config") -> dict[str, BaseModel]:
    """The settings sections of the table ``cfg`` validated, each default filled."""
    typed = {}
    for sec, model in SECTIONS.items():
        typed[sec] = validated(where, f"[{sec}]", model, cfg.get(sec, {}))
    if typed["data"].fallback:
        typed["data"].fallback = validated(
            where, "[data.fallback]", FallbackSection, typed["data"].fallback
        ).model_dump()
    return typed


def _typed_ensembles(cfg: dict, where: str) -> dict[str, EnsembleEntry]:
    return {
        name: validated(where, f"[ensembles.{name}]", EnsembleEntry, entry)
        for name, entry in (cfg.get("ensembles") or {}).items()
    }


# sections of named tables ([candidates.NAME] ...): a key is named after its table
NAMED_SECTIONS = {"datasets", "external", "feature_sets", "candidates", "ensembles", "profiles"}


def _check_raw(raw: dict, where: str) -> None:
    """The file's shape: known sections, each a table; names of its tables' entries."""
    unknown = set(raw) - KNOWN_SECTIONS
    if unknown:
        name = sorted(unknown)[0]
        raise BenchError(
            f"{where}: unknown section '{name}'"
            + (did_you_mean(name, KNOWN_SECTIONS) or f"; known: {sorted(KNOWN_SECTIONS)}")
        )
    for sec, value in raw.items():
        if not isinstance(value, dict):
            raise BenchError(f"{where}: [{sec}] must be a table, got {value!r}")
    for sec, what in (
        ("candidates", "candidate"),
        ("ensembles", "ensemble"),
        ("feature_sets", "feature set"),
        ("profiles", "profile"),
        ("datasets", "dataset"),
    ):
        for name, value in raw.get(sec, {}).items():
            check_name(name, f"{where}: {what} name")
            if not isinstance(value, dict):
                raise BenchError(f"{where}: [{sec}.{name}] must be a table, got {value!r}")
    for name, prof in raw.get("profiles", {}).items():
        bad = set(prof) - (KNOWN_SECTIONS - {"profiles", "datasets"}) - {"select", "description"}
        if bad:
            key = sorted(bad)[0]
            raise BenchError(
                f"{where}: profile '{name}' has unknown key '{key}'"
                + did_you_mean(key, KNOWN_SECTIONS)
            )
        if "select" in prof:
            _check_names(
                prof["select"], list(raw.get("candidates", {})), where, f"profile '{name}' select"
            )
    for name, ds in raw.get("datasets", {}).items():
        validated(where, f"[datasets.{name}]", DatasetOverride, ds)
    bad = non_finite(raw)  # every float, typed or inside a table or list parameter
    if bad is not None:
        path, value = bad
        head = 2 if path[0] in NAMED_SECTIONS else 1
        raise BenchError(
            f"{where}: [{'.'.join(map(str, path[:head]))}] "
            f"{key_text(path[head:])} must be a finite number, got {value!r}"
        )


# a [datasets.NAME] table: any [data] key but those the resolver sets
DatasetOverride = _all_optional(
    DataSection, "DatasetOverride", exclude=("fallback", "name", "same_as")
)


def _validate_sections(cfg: dict, where: str) -> Settings:
    settings = Settings(**_typed_sections(cfg, where))
    report = settings.report
    if report.gradcam and not report.gradcam_per_class:
        raise BenchError(
            f"{where}: [report] gradcam_per_class = 0 audits no image while "
            "gradcam = true; set gradcam = false to skip the Grad-CAM audit"
        )
    if settings.data.bags:
        _check_bags(settings, cfg["feature_sets"], where)
    head = settings.predictor.adapt_features
    if head and head not in cfg["feature_sets"]:
        raise BenchError(
            f"{where}: [predictor] adapt_features '{head}' is not a [feature_sets.NAME]"
            + did_you_mean(head, cfg["feature_sets"])
        )
    _check_sources(settings, where)
    registry.import_plugins(settings.run.plugins)
    for name, entry in cfg["candidates"].items():
        if isinstance(entry, dict) and "type" not in entry:
            raise BenchError(
                f"{where}: candidate '{name}' needs a 'type' (see `python -m bench list`)"
            )
        validated(where, f"[candidates.{name}]", CandidateEntry, entry)
    return settings


def _check_bags(settings: Settings, feature_sets: dict, where: str) -> None:
    """A bag task needs groups (the bags), a positive class, and the composition's pieces."""
    data = settings.data
    if not data.groups:
        raise BenchError(
            f"{where}: [data] bags = true needs [data] groups (a CSV file,group "
            "giving each image's bag, e.g. its patient)"
        )
    if not data.positive:
        raise BenchError(
            f"{where}: [data] bags = true needs [data] positive (the class a bag "
            'is scored for, e.g. "APL")'
        )
    if data.classes and data.positive not in data.classes:
        raise BenchError(
            f"{where}: [data] positive '{data.positive}' is not one of "
            f"[data] classes {data.classes}"
        )
    pat = settings.patients
    if data.disease_cells and not data.cell_types:
        raise BenchError(
            f"{where}: [data] disease_cells needs [data] cell_types = "
            '"FILE.csv:COLUMN" (each image\'s cell type)'
        )
    typed = aggregators_needing(pat.aggregators, "needs_cell_types")
    if typed:
        if not data.cell_types:
            raise BenchError(
                f"{where}: [patients] aggregators has '{typed[0]}', which needs "
                '[data] cell_types = "FILE.csv:COLUMN" (each image\'s cell type)'
            )
        if pat.composition_features not in feature_sets:
            raise BenchError(
                f"{where}: [patients] composition_features "
                f"'{pat.composition_features}' is not a [feature_sets.NAME]"
                + did_you_mean(pat.composition_features, feature_sets)
            )


def _check_sources(settings: Settings, where: str) -> None:
    """A multi-lab dataset: a shared class list, one source per lab name, class maps onto
    that list; lab rankings and the lab split need one."""
    data, run = settings.data, settings.run
    if not data.sources:
        if run.split == "lab":
            raise BenchError(
                f'{where}: [run] split = "lab" needs a dataset of several labs ([data] sources)'
            )
        if run.metric in RANKING_METRICS and run.metric not in METRICS:
            raise BenchError(
                f"{where}: [run] metric '{run.metric}' ranks by held-out labs and "
                "needs a dataset of several labs ([data] sources)"
            )
        return
    if data.bags:
        raise BenchError(
            f"{where}: [data] sources (several labs) and bags = true cannot be combined yet"
        )
    if not data.classes:
        raise BenchError(
            f"{where}: [data] sources needs [data] classes, the class list the "
            "labs' classes are mapped onto"
        )
    seen = set()
    for i, src in enumerate(data.sources):
        if src.domain in seen:
            raise BenchError(
                f"{where}: [data] sources[{i}] domain '{src.domain}' is used by "
                "two sources; each lab needs its own name"
            )
        seen.add(src.domain)
        bad = [v for v in src.class_map.values() if v and v not in data.classes]
        if bad:
            raise BenchError(
                f"{where}: [data] sources[{i}] ({src.domain}) class_map maps onto "
                f"'{bad[0]}', which is not one of [data] classes {data.classes}"
                + did_you_mean(bad[0], data.classes)
            )
    if len(seen) < 2:
        raise BenchError(
            f"{where}: [data] sources lists one lab ('{next(iter(seen))}'); "
            "a multi-lab dataset needs at least two"
        )


def _validate_tuning(cls, tuning, where: str) -> None:
    """A candidate's ``fidelity`` (its own parameters) and ``space`` (names its
    ``param_space`` searches)."""
    if tuning is None:
        return
    if tuning.fidelity:
        validate_params(cls, tuning.fidelity, f"{where}.fidelity")
    if tuning.space is not None:
        known = space_names(cls)
        unknown = [n for n in tuning.space if n not in known]
        if unknown or not tuning.space:
            raise BenchError(
                f"{where}.space: {unknown or '[]'} "
                f"{'are not' if unknown else 'is empty, not'} parameters that "
                f"{cls.__name__}.param_space searches; it searches {known}"
            )
        fixed = [n for n in tuning.space if n in (tuning.fidelity or {})]
        if fixed:
            raise BenchError(
                f"{where}: {fixed} are both searched (space) and fixed in "
                "trials (fidelity); choose one"
            )


def _check_tracking(cfg: "Config", where: str) -> None:
    if cfg.run.tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise BenchError(
            f"{where}: [run] tracking = 'mlflow' needs MLflow: "
            'pip install "bloodbench[tracking]" (or set tracking = "")'
        )


def _validate_entries(cfg: "Config", where: str) -> None:
    """Cross-references and each class's own parameter schema (after resolution)."""
    size = cfg.data.image_size
    for name, spec in cfg.feature_sets.items():
        check_feature_set(spec, size, f"{where}: [feature_sets.{name}]")
    head = cfg.predictor.adapt_features
    if head:  # the lab head reads it on the central crop
        check_feature_set(
            cfg.feature_sets[head],
            crop_side(size, cfg.predictor.adapt_crop),
            f"{where}: [predictor] adapt_features '{head}' at adapt_crop "
            f"{cfg.predictor.adapt_crop:g}",
        )
    for name, entry in cfg.candidates.items():
        cls = _type(entry.type, where, f"[candidates.{name}]")
        validate_params(cls, entry.params, f"{where}: [candidates.{name}] params")
        _validate_tuning(cls, entry.tuning, f"{where}: [candidates.{name}] tuning")
        fs = entry.params.get("features")
        crop = entry.params.get("crop", 1.0)
        if isinstance(fs, dict) and (entry.feature_set is None or crops(crop)):
            # an inline table, or a named set on a centre crop (a smaller image)
            check_feature_set(
                fs,
                crop_side(size, crop),
                f"{where}: [candidates.{name}] params.features"
                + (f" on the {crop} centre crop" if crops(crop) else ""),
            )
    names = list(cfg.candidates)
    for name, entry in cfg.ensembles.items():
        cls = _type(entry.type, where, f"[ensembles.{name}]")
        validate_params(cls, entry.params(), f"{where}: [ensembles.{name}]")
        if entry.stress and not cfg.stress.shifts:
            raise BenchError(
                f"{where}: [ensembles.{name}] stress = true needs [stress] shifts "
                f"(any of {list(SHIFTS)})"
            )
        if isinstance(entry.members, list):
            missing = [m for m in entry.members if m not in names]
            if missing:
                raise BenchError(
                    f"{where}: [ensembles.{name}] members {missing} are not "
                    f"candidates of this run; candidates: {names}"
                )
    student = cfg.distill.student
    cls = _type(student.type, where, "[distill] student")
    if "soft_targets" not in cls.fit_accepts:
        raise BenchError(
            f"{where}: [distill] student type '{student.type}' cannot learn soft "
            "targets; types that can: "
            + str(
                sorted(
                    n
                    for n in registry.known()
                    if "soft_targets" in getattr(registry.get(n), "fit_accepts", ())
                )
            )
        )
    validate_params(cls, student.params, f"{where}: [distill] student params")
    choice = cfg.predictor.ensemble
    if choice == "robust" and not cfg.stress.shifts:
        raise BenchError(
            f"{where}: [predictor] ensemble = 'robust' needs [stress] shifts "
            f"(any of {list(SHIFTS)})"
        )
    if choice not in ("best", "robust") and choice not in names and choice not in cfg.ensembles:
        raise BenchError(
            f"{where}: [predictor] ensemble '{choice}' is neither 'best', 'robust' "
            "nor a candidate or ensemble of this run"
            + did_you_mean(choice, names + list(cfg.ensembles))
        )


def _type(name: str, where: str, prefix: str) -> type:
    try:
        return registry.get(name)
    except BenchError:
        raise BenchError(
            f"{where}: {prefix} type '{name}' is unknown; known: "
            f"{registry.known()}" + did_you_mean(name, registry.known())
        ) from None


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj
