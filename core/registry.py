"""The registry of candidate and ensemble types.

The runner never names a model: a config entry says ``type = "NAME"`` and the registry
returns the class. Built-in types are imported lazily (TensorFlow loads only when a CNN
is used). Add your own with the decorator, and list its module in ``[run] plugins``::

    from core.registry import register
    from core.candidate import Candidate

    @register("my_model")
    class MyModel(Candidate):
        ...
"""

from __future__ import annotations

import importlib

from core.errors import BenchError

BUILTIN: dict[str, str] = {
    # baselines on hand-crafted features
    "feature_forest": "baselines.models:FeatureForest",
    "feature_svm": "baselines.models:FeatureSVM",
    "feature_xgb": "baselines.models:FeatureXGB",
    # CNNs
    "scratch_cnn": "cnn.candidate:ScratchCNN",
    "transfer_frozen": "cnn.transfer:FrozenTransferCNN",
    "transfer_finetune": "cnn.transfer:FineTuneTransferCNN",
    # ensembles
    "soft_voting": "ensembles.voting:SoftVoting",
    "stacking": "ensembles.stacking:Stacking",
}
_REGISTERED: dict[str, type] = {}


def register(name: str):
    """Class decorator: make ``name`` usable as ``type = "name"`` in the config."""
    def deco(cls):
        _REGISTERED[name] = cls
        cls.type_name = name
        return cls
    return deco


def get(name: str) -> type:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise BenchError(f"unknown type '{name}'; known: {sorted(set(BUILTIN) | set(_REGISTERED))}")
    module, cls_name = BUILTIN[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    _REGISTERED.setdefault(name, cls)
    cls.type_name = name
    return cls


def known() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


def import_plugins(modules: list[str]) -> None:
    for mod in modules or []:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise BenchError(f"[run] plugins: cannot import '{mod}': {exc}") from None
