"""Load ``benchmarks.toml``: profiles, named datasets, candidates and ensembles.

A *profile* is a partial config deep-merged over the base config; its key ``select``
(a list of candidate names) limits the candidates it runs. A named dataset under
``[datasets.NAME]`` is merged over ``[data]`` when ``--data NAME`` is given.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from core.errors import BenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = "benchmarks.toml"
KNOWN_SECTIONS = {"run", "data", "datasets", "tuning", "feature_sets", "candidates", "ensembles",
                  "predictor", "profiles", "report"}
RUN_DEFAULTS = {"seed": 42, "folds": 5, "metric": "accuracy", "workers": 1, "profile": "quick",
                "out": "runs/latest"}
DATA_DEFAULTS = {"path": "", "image_size": 64, "max_images": 0, "groups": "", "pairs": "",
                 "group_rule": "", "cache_dir": "", "fallback": {}, "classes": []}
TUNING_DEFAULTS = {"trials": 0, "timeout": 0, "storage": ""}


@dataclass
class Config:
    """A resolved configuration: plain nested dicts plus where they came from."""

    data: dict
    source: Path | None = None
    profile: str | None = None

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def candidates(self) -> dict:
        return self.data["candidates"]

    @property
    def ensembles(self) -> dict:
        return self.data.get("ensembles", {})

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.data))


def deep_merge(base: dict, overlay: dict) -> dict:
    """Return ``base`` updated recursively with ``overlay`` (inputs are not modified)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"config file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"bad TOML in {path}: {exc}") from None


def load_config(path: str | os.PathLike | None = None, profile: str | None = None,
                data: str | None = None, only: list[str] | None = None,
                out: str | None = None) -> Config:
    """Read, merge and validate a config file.

    Parameters
    ----------
    path : config file; default ``benchmarks.toml`` in the working directory.
    profile : profile name; default ``[run] profile``.
    data : a dataset path or the name of a ``[datasets.NAME]`` entry; overrides ``[data] path``.
    only : run only these candidates (they must exist in the profile's selection).
    out : run directory; overrides ``[run] out``.
    """
    path = Path(path or DEFAULT_CONFIG)
    raw = read_toml(path)
    return resolve_config(raw, source=path, profile=profile, data=data, only=only, out=out)


def resolve_config(raw: dict, source: Path | None = None, profile: str | None = None,
                   data: str | None = None, only: list[str] | None = None,
                   out: str | None = None) -> Config:
    where = str(source) if source else "config"
    unknown = set(raw) - KNOWN_SECTIONS
    if unknown:
        raise BenchError(f"{where}: unknown section(s) {sorted(unknown)}; "
                         f"known: {sorted(KNOWN_SECTIONS)}")
    cfg = deep_merge({"run": RUN_DEFAULTS, "data": DATA_DEFAULTS, "tuning": TUNING_DEFAULTS,
                      "feature_sets": {}, "candidates": {}, "ensembles": {}, "predictor": {},
                      "report": {}}, {k: v for k, v in raw.items() if k not in ("profiles", "datasets")})
    profiles = raw.get("profiles", {})
    profile = profile or cfg["run"]["profile"]
    if profile not in profiles:
        raise BenchError(f"{where}: unknown profile '{profile}'; known: {sorted(profiles) or 'none'}")
    overlay = dict(profiles[profile])
    overlay.pop("description", None)
    select = overlay.pop("select", None)
    bad = set(overlay) - (KNOWN_SECTIONS - {"profiles", "datasets"})
    if bad:
        raise BenchError(f"{where}: profile '{profile}' has unknown key(s) {sorted(bad)}")
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
    if out:
        cfg["run"]["out"] = out

    names = list(cfg["candidates"])
    if select is not None:
        _check_names(select, names, where, "profile '%s' select" % profile)
        names = [n for n in names if n in select]
    if only:
        _check_names(only, names, where, f"--only (profile '{profile}')")
        names = [n for n in names if n in only]
    cfg["candidates"] = {n: _resolve_candidate(n, cfg["candidates"][n], cfg, where) for n in names}
    for entry in cfg["candidates"].values():
        _resolve_weights_path(entry, source)
    for name, ens in cfg["ensembles"].items():
        if "type" not in ens:
            raise BenchError(f"{where}: ensemble '{name}' has no 'type'")
    _check_run(cfg, where)
    return Config(cfg, source=Path(source) if source else None, profile=profile)


def _check_names(asked, known, where, what):
    missing = [n for n in asked if n not in known]
    if missing:
        raise BenchError(f"{where}: unknown candidate(s) {missing} in {what}; known: {known}")


def _resolve_candidate(name: str, entry: dict, cfg: dict, where: str) -> dict:
    if not isinstance(entry, dict) or "type" not in entry:
        raise BenchError(f"{where}: candidate '{name}' needs a 'type' (see `python -m bench list`)")
    entry = copy.deepcopy(entry)
    params = entry.setdefault("params", {})
    fs = params.get("features")
    if isinstance(fs, str):
        if fs not in cfg["feature_sets"]:
            raise BenchError(f"{where}: candidate '{name}' uses unknown feature set '{fs}'; "
                             f"known: {sorted(cfg['feature_sets'])}")
        params["features"] = copy.deepcopy(cfg["feature_sets"][fs])
        entry["feature_set"] = fs
    return entry


def _resolve_weights_path(entry: dict, source) -> None:
    """A candidate's ``weights`` file (CNN backbones), if relative, starts at the config's folder."""
    w = entry.get("params", {}).get("weights")
    if not isinstance(w, str) or w.lower() in ("", "imagenet", "none") or source is None:
        return
    p = Path(w).expanduser()
    if not p.is_absolute():
        entry["params"]["weights"] = os.path.abspath(Path(source).parent / p)


def _check_run(cfg: dict, where: str) -> None:
    run = cfg["run"]
    for key in ("seed", "folds", "workers"):
        if not isinstance(run[key], int) or isinstance(run[key], bool):
            raise BenchError(f"{where}: [run] {key} must be an integer, got {run[key]!r}")
    if run["folds"] < 2:
        raise BenchError(f"{where}: [run] folds must be at least 2, got {run['folds']}")
    size = cfg["data"]["image_size"]
    if not isinstance(size, int) or size < 8:
        raise BenchError(f"{where}: [data] image_size must be an integer >= 8, got {size!r}")


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj
