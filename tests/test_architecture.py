"""The package layering holds: kernel <- plugins <- orchestrator, no cycle dodged.

    core  <-  features, cnn, baselines, ensembles  <-  bench

Imports inside functions are allowed only for heavy third-party libraries and for the
project modules that import Keras when loaded (so TensorFlow starts only when a CNN is
used); never to dodge a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "features", "cnn", "baselines", "ensembles", "bench"]
ALLOWED = {   # package -> project packages it may import
    "core": {"core"},
    "features": {"core", "features"},
    "cnn": {"core", "cnn"},
    "baselines": {"core", "features", "baselines"},
    "ensembles": {"core", "ensembles"},
    "bench": set(PACKAGES),
}
# project modules that import keras (TensorFlow) at load time: lazily imported on purpose
KERAS_MODULES = {"cnn.augment", "cnn.models", "cnn.backbones", "cnn.stain", "cnn.adapt"}


def _modules():
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            yield pkg, f


def _imports(tree):
    """(module name, inside a function?) of every import statement."""
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            inner = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module in PACKAGES:   # "from core import registry"
                    out.extend((f"{child.module}.{a.name}", in_func) for a in child.names)
                else:
                    out.append((child.module, in_func))
            visit(child, inner)
    visit(tree, False)
    return out


@pytest.mark.parametrize("pkg,path", list(_modules()),
                         ids=[str(p.relative_to(REPO)) for _, p in _modules()])
def test_imports_point_down_and_none_dodges_a_cycle(pkg, path):
    tree = ast.parse(path.read_text())
    for name, in_func in _imports(tree):
        top = name.split(".")[0]
        if top not in PACKAGES:
            continue
        assert top in ALLOWED[pkg], f"{path.relative_to(REPO)} imports {name}: {pkg} may " \
                                    f"import only {sorted(ALLOWED[pkg])}"
        if in_func:
            mod = ".".join(name.split(".")[:2])
            assert mod in KERAS_MODULES, f"{path.relative_to(REPO)}: function-level import " \
                                         f"of {name} (import it at the top of the module)"


def test_the_layering_is_checked_for_every_package():
    assert {p for p, _ in _modules()} == set(PACKAGES)
    assert not (REPO / "bench" / "candidate.py").exists() or \
        "from core.candidate import" in (REPO / "bench" / "candidate.py").read_text()


def test_release_memory_runs_each_registered_hook_once(monkeypatch):
    from core import candidate

    monkeypatch.setattr(candidate, "_RELEASE_HOOKS", [])
    calls = []

    def hook():
        calls.append(1)

    assert candidate.on_release(hook) is hook
    candidate.on_release(hook)   # registering twice is harmless
    candidate.release_memory()
    assert calls == [1]
