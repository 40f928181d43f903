"""The registry of candidate and ensemble types.

The runner never names a model: a config entry says ``type = "NAME"`` and the registry
returns the class. The kernel names no type: types are declared where they are packaged,
as entry points of the group ``bloodbench.types`` (``NAME = "module:Class"``; the built-in
ones in ``pyproject.toml``), and their modules are imported on first use (so TensorFlow
loads only when a CNN is used, and a saved predictor loads its members' types whatever
imported it). Each class also registers itself under its name with the decorator. An
installed plugin package declares its types the same way; a module of your own can
instead use the decorator and be listed in ``[run] plugins``::

    from core.registry import register
    from core.candidate import Candidate

    @register("my_model")
    class MyModel(Candidate):
        ...
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from core.errors import BenchError

GROUP = "bloodbench.types"  # the entry-point group that declares types
_LAZY: dict[str, str] = {}  # type name -> "module:Class", imported on first use
_REGISTERED: dict[str, type] = {}
_DISCOVERED = False


def declared() -> dict[str, str]:
    """Types declared as entry points (read once) and by :func:`register_lazy`."""
    global _DISCOVERED
    if not _DISCOVERED:
        for ep in entry_points(group=GROUP):
            _LAZY.setdefault(ep.name, ep.value)
        _DISCOVERED = True
    return _LAZY


def register(name: str):
    """Class decorator: make ``name`` usable as ``type = "name"`` in the config."""

    def deco(cls):
        _REGISTERED[name] = cls
        cls.type_name = name
        return cls

    return deco


def register_lazy(name: str, target: str) -> None:
    """Make ``name`` usable as ``type = "name"`` without importing its module yet:
    ``target`` is ``"module:Class"`` (a class that registers itself under ``name``)."""
    _LAZY[name] = target


def get(name: str) -> type:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in declared():
        raise BenchError(f"unknown type '{name}'; known: {known()}")
    module, cls_name = _LAZY[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    _REGISTERED.setdefault(name, cls)
    cls.type_name = name
    return cls


def known() -> list[str]:
    return sorted(set(declared()) | set(_REGISTERED))


def import_plugins(modules: list[str]) -> None:
    for mod in modules or []:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise BenchError(f"[run] plugins: cannot import '{mod}': {exc}") from None
