"""The registry of candidate and ensemble types.

The runner never names a model: a config entry says ``type = "NAME"`` and the registry
returns the class. The kernel names no type: each plugin package declares its own when
it is imported, by the decorator or, for a class whose module is heavy, as a lazy
``"module:Class"`` (``register_lazy``; e.g. ``cnn`` so that TensorFlow loads only when a
CNN is used). The orchestrator ``bench`` imports the built-in plugin packages. Add your
own type with the decorator, and list its module in ``[run] plugins``::

    from core.registry import register
    from core.candidate import Candidate

    @register("my_model")
    class MyModel(Candidate):
        ...
"""

from __future__ import annotations

import importlib

from core.errors import BenchError

_LAZY: dict[str, str] = {}   # type name -> "module:Class", imported on first use
_REGISTERED: dict[str, type] = {}


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
    if name not in _LAZY:
        raise BenchError(f"unknown type '{name}'; known: {known()}")
    module, cls_name = _LAZY[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    _REGISTERED.setdefault(name, cls)
    cls.type_name = name
    return cls


def known() -> list[str]:
    return sorted(set(_LAZY) | set(_REGISTERED))


def import_plugins(modules: list[str]) -> None:
    for mod in modules or []:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise BenchError(f"[run] plugins: cannot import '{mod}': {exc}") from None
