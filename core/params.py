"""Hyper-parameter validation from a class's declared schema (pydantic).

A candidate's (or ensemble's) parameters are its ``__init__`` arguments, as in
scikit-learn. Their schema is read from that signature, each parameter typed by its
default (``int``, ``float``, ``str``, ``bool``, lists and tables), and refined by the
class's declared ``param_rules`` (in the spirit of scikit-learn's parameter
constraints)::

    param_rules = {
        "n_estimators": {"ge": 1},
        "max_depth": {"type": int, "ge": 1, "none": True},
        "kernel": {"choices": ["rbf", "linear"]},
        "C": {"type": float, "gt": 0, "also": ["auto"]},
    }

Keys of a rule: ``type`` (when the default does not tell it, e.g. ``None``), bounds
``ge``/``gt``/``le``/``lt``, ``choices`` (the only values allowed), ``none`` (``None``
allowed too) and ``also`` (extra literal values allowed besides the type). Plugins get
the same validation by declaring ``param_rules`` (or nothing: then the defaults' types).
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, ValidationError, create_model

from core.errors import BenchError

# inf and nan refused for every float (TOML writes them as inf and nan)
_STRICT = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)


def _type_of(default) -> Any:
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, str):
        return str
    if isinstance(default, (list, tuple)):
        return list
    if isinstance(default, dict):
        return dict
    return Any


def _field_type(default, rule: dict):
    typ = rule.get("type") or _type_of(default)
    if "choices" in rule:
        typ = Literal[tuple(rule["choices"])]
    bounds = {k: rule[k] for k in ("ge", "gt", "le", "lt") if k in rule}
    if typ is float:  # an integer where a float is expected is fine (TOML writes 1, not 1.0)
        typ = Union[float, int]
    if bounds:
        typ = Annotated[typ, Field(**bounds)]
    extras = list(rule.get("also", []))
    if extras:
        typ = Union[typ, Literal[tuple(extras)]]
    if rule.get("none") or (default is None and "type" in rule):
        typ = typ | None
    return typ


def param_names(cls) -> dict[str, Any]:
    """``{name: default}`` of the ``__init__`` parameters of ``cls``."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def schema(cls):
    """The pydantic model of ``cls``'s parameters (see the module docstring)."""
    rules = getattr(cls, "param_rules", {}) or {}
    fields = {}
    for name, default in param_names(cls).items():
        d = None if default is inspect.Parameter.empty else default
        fields[name] = (_field_type(d, rules.get(name, {})), d)
    return create_model(f"{cls.__name__}Params", __config__=_STRICT, **fields)


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}
_BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def expected(cls, name: str) -> str:
    """What parameter ``name`` of ``cls`` takes, in words."""
    rule = (getattr(cls, "param_rules", {}) or {}).get(name, {})
    default = param_names(cls).get(name)
    if "choices" in rule:
        text = f"one of {list(rule['choices'])}"
    else:
        typ = rule.get("type") or _type_of(default)
        text = _TYPE_WORDS.get(typ, "any value")
        bounds = [f"{_BOUND_WORDS[k]} {rule[k]}" for k in ("ge", "gt", "le", "lt") if k in rule]
        if bounds:
            text += " " + " and ".join(bounds)
    for extra in rule.get("also", []):
        text += f" or {extra!r}"
    if rule.get("none") or (default is None and "type" in rule):
        text += " or omitted (None)"
    return text


def _describe(cls, err: dict) -> str:
    name = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        known = list(param_names(cls))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {sorted(known)}"
        return f"unknown parameter '{name}'{hint}"
    if err["type"] == "finite_number":
        return f"{name}: expected a finite number, got {err.get('input')!r}"
    return f"{name}: expected {expected(cls, name)}, got {err.get('input')!r}"


def non_finite(value, path: tuple = ()) -> tuple | None:
    """``(key path, value)`` of the first inf or nan float in ``value`` (nested tables and
    lists; the path holds keys and list positions), or ``None`` when every float in it is
    finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else ()
    )
    for key, item in items:
        found = non_finite(item, (*path, key))
        if found is not None:
            return found
    return None


def key_text(path) -> str:
    """``("a", "b", 0)`` -> ``a.b[0]``."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def validate_params(cls, params: dict, where: str) -> dict:
    """``params`` checked against ``cls``'s schema; a one-line :class:`BenchError` naming
    ``where`` and the parameter otherwise. Returns ``params`` unchanged."""
    if not isinstance(params, dict):
        raise BenchError(f"{where}: params must be a table, got {params!r}")
    try:
        schema(cls).model_validate(params)
    except ValidationError as exc:
        raise BenchError(f"{where}: {_describe(cls, exc.errors()[0])}") from None
    bad = non_finite(params)  # inside a list or table parameter (the schema checks floats)
    if bad is not None:
        raise BenchError(f"{where}: {key_text(bad[0])}: expected a finite number, got {bad[1]!r}")
    return params


class _NameRecorder:
    """A stand-in Optuna trial that records the names ``param_space`` suggests."""

    def __init__(self):
        self.names: list[str] = []

    def _suggest(self, name, *args, **kwargs):
        self.names.append(name)
        choices = kwargs.get("choices", args[0] if args else None)
        return choices[0] if isinstance(choices, (list, tuple)) else (args[0] if args else 0)

    suggest_int = suggest_float = suggest_categorical = _suggest


def space_names(cls) -> list[str]:
    """The parameter names a candidate class's ``param_space`` searches (no Optuna)."""
    rec = _NameRecorder()
    cls.param_space(rec)
    return rec.names
