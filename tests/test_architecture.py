"""The package layering holds: kernel <- plugins <- orchestrator, and no import cycle.

    core  <-  features, cnn, baselines, ensembles  <-  bench

The checker builds the import graph of the project's modules from their source, counting
imports inside functions too (a cycle closed by a function-level import is still a
cycle; it only fails later, or in another order). Project modules may be imported inside
a function only when they load Keras when loaded (found from the graph, not listed), so
that TensorFlow starts only when a CNN is used.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "features", "cnn", "baselines", "ensembles", "bench"]
SCRIPTS = ["benchmarks"]  # scripts over the packages: checked for cycles and direction too
ALLOWED = {  # package -> project packages it may import
    "core": {"core"},
    "features": {"core", "features"},
    "cnn": {"core", "cnn"},
    "baselines": {"core", "features", "baselines"},
    "ensembles": {"core", "ensembles"},
    "bench": set(PACKAGES),
    "benchmarks": set(PACKAGES) | {"benchmarks"},  # nothing imports a benchmark script
}
HEAVY = {"keras", "tensorflow"}  # third-party modules a project module imports lazily


# ----------------------------------------------------------------------------- the checker


class Import:
    """One import statement of a project module: ``target`` (a project module or a
    third-party module), its line, and whether it sits inside a function."""

    def __init__(self, target: str, line: int, in_func: bool):
        self.target, self.line, self.in_func = target, line, in_func


def project_modules(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` of ``packages`` under ``root``
    (a package's ``__init__.py`` is the package's own name)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _absolute(module: str | None, level: int, importer: str, is_pkg: bool) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, modules) -> list[Import]:
    """Every import in ``path`` (module ``name``), resolved to the project module it loads:
    ``from pkg import sub`` is ``pkg.sub`` when that is a module, else ``pkg``."""
    out: list[Import] = []
    is_pkg = path.name == "__init__.py"

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend(Import(a.name, child.lineno, in_func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child.module, child.level, name, is_pkg)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(sub if sub in modules else base, child.lineno, in_func))
            visit(
                child,
                in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
            )

    visit(ast.parse(path.read_text()), False)
    return out


def import_graph(root: Path, packages) -> dict[str, list[Import]]:
    """Module -> its imports of project modules, at load or inside functions."""
    modules = project_modules(root, packages)
    return {
        name: [i for i in imports_of(name, path, modules) if i.target in modules]
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of a module that
    imports itself (Tarjan), each as a sorted list of module names."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {i.target for i in graph[v]}:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(i.target == v for i in graph[v]):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def upward_imports(graph, allowed) -> list[str]:
    """``"a.b:LINE imports c.d"`` for each import of a package that ``allowed`` forbids."""
    return [
        f"{m}:{i.line} imports {i.target} ({m.split('.')[0]} may import only "
        f"{sorted(allowed[m.split('.')[0]])})"
        for m, imps in sorted(graph.items())
        for i in imps
        if i.target.split(".")[0] not in allowed[m.split(".")[0]]
    ]


def loads_heavy(root: Path, packages, heavy=HEAVY) -> set[str]:
    """Project modules that import a ``heavy`` library when loaded, directly or through
    the project modules they import at load time."""
    modules = project_modules(root, packages)
    at_load = {
        n: [i.target for i in imports_of(n, p, modules) if not i.in_func]
        for n, p in modules.items()
    }
    out = {n for n, targets in at_load.items() if any(t.split(".")[0] in heavy for t in targets)}
    grew = True
    while grew:
        new = {n for n, targets in at_load.items() if n not in out and set(targets) & out}
        out |= new
        grew = bool(new)
    return out


def dodging_imports(root: Path, packages) -> list[str]:
    """Function-level imports of project modules that do not load a heavy library."""
    graph, heavy = import_graph(root, packages), loads_heavy(root, packages)
    return [
        f"{m}:{i.line} imports {i.target} inside a function (import it at the top)"
        for m, imps in sorted(graph.items())
        for i in imps
        if i.in_func and i.target not in heavy
    ]


# ----------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO, PACKAGES + SCRIPTS)


def reachable(graph, start: str) -> set[str]:
    """Every project module ``start`` loads, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for i in graph[todo.pop()]:
            if i.target not in seen:
                seen.add(i.target)
                todo.append(i.target)
    return seen


def test_benchmark_scripts_are_in_the_graph(graph):
    assert {"benchmarks.cnn", "benchmarks.patients", "benchmarks.labs"} <= set(graph)
    assert any(i.target == "bench.run.rundir" for i in graph["benchmarks.labs"])


def test_bench_is_in_wings():
    """``bench/`` holds its settings (config.py) and sub-packages by job; the protocol
    stages and the report's sections share names only across those two wings."""
    bench = REPO / "bench"
    assert {f.stem for f in bench.glob("*.py")} == {"__init__", "__main__", "config"}
    wings = {d.name for d in bench.iterdir() if (d / "__init__.py").is_file()}
    assert wings == {"data", "run", "protocols", "stats", "commands", "report"}
    seen: dict[str, str] = {}
    for w in sorted(wings - {"report"}):
        for f in (bench / w).glob("*.py"):
            if f.stem != "__init__":
                assert f.stem not in seen, f"bench/{w}/{f.name} and bench/{seen[f.stem]}"
                seen[f.stem] = w


def test_the_runner_is_a_loop_over_its_stages():
    """``run_benchmark`` walks ``STAGES``; the runner stays small (a protocol's code lives
    in its own module)."""
    from bench.run.runner import STAGES

    assert len((REPO / "bench" / "run" / "runner.py").read_text().splitlines()) <= 300
    names = [st.name for st in STAGES]
    # the report last, but for run tracking, which logs the finished run and its report
    assert names[0] == "units" and names[-2:] == ["report", "tracking"]
    assert len(set(names)) == len(names)


def test_no_run_stage_imports_the_report(graph):
    """The stages of `bench run` (bench.run.runner.STAGES, each defined in its own module)
    produce what the report reads; none of them loads the report."""
    from bench.run.runner import STAGES

    modules = {st.run.__module__ for st in STAGES} - {"bench.run.runner"}
    assert {
        "bench.protocols.labs",
        "bench.protocols.patients",
        "bench.protocols.external",
        "bench.run.saving",
    } <= modules
    for m in sorted(modules):
        assert not {t for t in reachable(graph, m) if t.startswith("bench.report")}, m


def test_no_import_cycle_among_the_project_modules(graph):
    assert find_cycles(graph) == []


def test_imports_point_down(graph):
    assert upward_imports(graph, ALLOWED) == []


def test_function_level_imports_are_only_of_modules_that_load_keras():
    assert dodging_imports(REPO, PACKAGES) == []
    heavy = loads_heavy(REPO, PACKAGES)
    assert {"cnn.backbones", "cnn.models", "cnn.augment"} <= heavy
    assert not heavy & {
        "cnn",
        "cnn.weights",
        "cnn.transfer",
        "cnn.candidate",
        "bench",
        "bench.commands.cli",
        "bench.run.runner",
        "core.registry",
    }


def test_the_orchestrator_starts_without_tensorflow_and_knows_every_builtin_type():
    code = (
        "import sys, bench.commands.cli, bench.run.runner\n"
        "from core import registry\n"
        "assert not {'keras', 'tensorflow'} & set(sys.modules), 'Keras loaded'\n"
        "print(' '.join(registry.known()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert {
        "feature_forest",
        "feature_lda",
        "feature_svm",
        "feature_xgb",
        "scratch_cnn",
        "transfer_frozen",
        "transfer_finetune",
        "soft_voting",
        "stacking",
    } <= set(out)


def test_each_declared_type_is_the_class_that_registers_itself_under_that_name():
    import importlib

    from core import registry

    declared = registry.declared()
    assert declared, "no type is declared (is bloodbench installed? pip install -e .)"
    for name, target in declared.items():
        module, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert registry.get(name) is cls and cls.type_name == name, target


def test_the_installed_types_are_those_pyproject_declares():
    """The entry points in ``pyproject.toml`` are the ones installed (reinstall after an
    edit), and they name every built-in type."""
    import tomllib
    from importlib.metadata import entry_points

    from core import registry

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["entry-points"][registry.GROUP]
    installed = {ep.name: ep.value for ep in entry_points(group=registry.GROUP)}
    assert installed == wanted
    assert {
        "feature_forest",
        "feature_lda",
        "feature_svm",
        "feature_xgb",
        "scratch_cnn",
        "transfer_frozen",
        "transfer_finetune",
        "soft_voting",
        "stacking",
    } == set(wanted)


def test_a_predictor_loads_from_the_plugin_layer_alone(tmp_path, toy_folder):
    """``ensembles.predictor.load_predictor`` knows its members' types without the
    orchestrator having been imported (a fresh process)."""
    from bench.config import load_config
    from bench.run.runner import run_benchmark
    from tests.conftest import write_tiny_config

    cfg = load_config(
        write_tiny_config(tmp_path / "c.toml", toy_folder),
        only=["rf_hog"],
        out=str(tmp_path / "run"),
    )
    run_benchmark(cfg, show_progress=False)
    code = (
        "import sys\nfrom ensembles.predictor import load_predictor\n"
        f"p = load_predictor({str(tmp_path / 'run' / 'predictor')!r})\n"
        "assert 'bench' not in sys.modules\nprint(p.member_names_)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rf_hog" in out.stdout


def test_the_kernel_names_no_module_above_it():
    """No string in ``core`` names a plugin or orchestrator module ("cnn.candidate:...")."""
    above = re.compile(rf"^({'|'.join(p for p in PACKAGES if p != 'core')})\.\w+")
    named = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}"
        for name, path in project_modules(REPO, ["core"]).items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and above.match(node.value)
    ]
    assert named == []


def test_every_package_shipped_is_checked():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {p.split(".")[0] for p in setuptools["packages"]} == set(PACKAGES)
    assert {m.split(".")[0] for m in project_modules(REPO, PACKAGES)} == set(PACKAGES)


# ----------------------------------------------------------------------------- the checker fails


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


FAKE = {
    "core/__init__.py": "",
    "core/a.py": "from core import b\n",
    "core/b.py": "X = 1\n",
    "cnn/__init__.py": "",
    "cnn/heavy.py": "import keras\n",
    "cnn/light.py": "def f():\n    from cnn import heavy\n    return heavy\n",
    "bench/__init__.py": "import cnn.light\nfrom core.a import b\n",
}
FAKE_ALLOWED = {"core": {"core"}, "cnn": {"core", "cnn"}, "bench": {"core", "cnn", "bench"}}


def test_the_checker_passes_a_clean_tree(tmp_path):
    root = _tree(tmp_path, FAKE)
    g = import_graph(root, FAKE_ALLOWED)
    assert {i.target for i in g["core.a"]} == {"core.b"}
    assert find_cycles(g) == [] and upward_imports(g, FAKE_ALLOWED) == []
    assert dodging_imports(root, FAKE_ALLOWED) == []
    assert loads_heavy(root, FAKE_ALLOWED) == {"cnn.heavy"}


def test_the_checker_fails_on_a_planted_cycle_closed_inside_a_function(tmp_path):
    root = _tree(tmp_path, {**FAKE, "core/b.py": "def f():\n    from .a import b\n"})
    assert find_cycles(import_graph(root, FAKE_ALLOWED)) == [["core.a", "core.b"]]
    assert dodging_imports(root, FAKE_ALLOWED) == [
        "core.b:2 imports core.a inside a function (import it at the top)"
    ]


def test_the_checker_fails_on_a_planted_self_import_and_a_longer_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            **FAKE,
            "core/b.py": "import core.b\nimport core.c\n",
            "core/c.py": "from core.a import b\n",
        },
    )
    assert find_cycles(import_graph(root, FAKE_ALLOWED)) == [["core.a", "core.b", "core.c"]]
    root = _tree(tmp_path / "self", {**FAKE, "core/b.py": "import core.b\n"})
    assert find_cycles(import_graph(root, FAKE_ALLOWED)) == [["core.b"]]


def test_the_checker_fails_on_a_planted_upward_import(tmp_path):
    root = _tree(tmp_path, {**FAKE, "cnn/light.py": "def f():\n    import bench\n"})
    assert upward_imports(import_graph(root, FAKE_ALLOWED), FAKE_ALLOWED) == [
        "cnn.light:2 imports bench (cnn may import only ['cnn', 'core'])"
    ]


def test_the_checker_sees_keras_loaded_through_another_module(tmp_path):
    root = _tree(
        tmp_path,
        {
            **FAKE,
            "cnn/light.py": "from cnn import heavy\n",
            "core/b.py": "def f():\n    import cnn.light\n",
        },
    )
    assert loads_heavy(root, FAKE_ALLOWED) == {"cnn.heavy", "cnn.light", "bench"}
    assert dodging_imports(root, FAKE_ALLOWED) == []


# ----------------------------------------------------------------------------- release hooks


def test_release_memory_runs_each_registered_hook_once(monkeypatch):
    from core import candidate

    monkeypatch.setattr(candidate, "_RELEASE_HOOKS", [])
    calls = []

    def hook():
        calls.append(1)

    assert candidate.on_release(hook) is hook
    candidate.on_release(hook)  # registering twice is harmless
    candidate.release_memory()
    assert calls == [1]
