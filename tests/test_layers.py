"""Layers that import downward only (issue 12, item 4).

The model (``remotemedia/``: node, pipeline, manifest, frames, errors, run options) never
imports the runtime (``supervisor/``); the runtime imports the model. The package facade,
``remotemedia/__init__.py``, is the one sanctioned exception, and only inside its late-import
function ``_runtime()``. The static check reads every module's imports (top-level and deferred
alike) with ast; the dynamic checks import modules in a fresh interpreter and look at
``sys.modules``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "remotemedia"
FACADE = MODEL / "__init__.py"
LATE_IMPORT_FUNCTION = "_runtime"
RUNTIME = "supervisor"


def _imported_modules(node: ast.AST) -> List[str]:
    """The absolute module names an import statement names (relative imports stay inside
    the package, so they never reach the runtime)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def _runtime_imports(path: Path) -> Iterator[Tuple[int, str, Optional[str]]]:
    """(line, module, enclosing function or None) of every import of the runtime in ``path``,
    at any depth: module level, functions, methods, ``if TYPE_CHECKING`` blocks; also
    ``importlib.import_module("supervisor...")`` and ``__import__`` with a literal name."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(node: ast.AST, func: Optional[str]) -> Iterator[Tuple[int, str, Optional[str]]]:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            names = _imported_modules(child)
            if isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant):
                f = child.func
                fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if fname in ("import_module", "__import__") and isinstance(child.args[0].value, str):
                    names = [child.args[0].value]
            for name in names:
                if name == RUNTIME or name.startswith(RUNTIME + "."):
                    yield child.lineno, name, func
            yield from walk(child, inner)

    yield from walk(tree, None)


def _model_modules() -> List[Path]:
    return sorted(p for p in MODEL.rglob("*.py"))


def test_the_static_check_sees_deferred_and_type_checking_imports(tmp_path: Path) -> None:
    # the check itself: it must catch every form the circle used to take
    sample = tmp_path / "m.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "import supervisor\n"
        "if TYPE_CHECKING:\n"
        "    from supervisor.arbiter import Supervisor\n"
        "def f():\n"
        "    from supervisor import arbiter\n"
        "class C:\n"
        "    def run(self):\n"
        "        import supervisor.inline as i\n"
        "        import importlib; importlib.import_module('supervisor.api')\n"
        "from . import supervisor_like\n"
    )
    found = [(line, func) for line, _, func in _runtime_imports(sample)]
    assert found == [(2, None), (4, None), (6, "f"), (9, "run"), (10, "run")]


def test_the_model_never_imports_the_runtime() -> None:
    offenders = []
    for path in _model_modules():
        for line, name, func in _runtime_imports(path):
            if path == FACADE and func == LATE_IMPORT_FUNCTION:
                continue  # the one sanctioned late import
            where = f"in {func}()" if func else "at module level"
            offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name} {where}")
    assert not offenders, (
        "the model (remotemedia/) must not import the runtime (supervisor/); reach it through "
        "the facade's remotemedia._runtime() instead:\n  " + "\n  ".join(offenders)
    )


def test_the_facade_has_exactly_one_late_import_of_the_runtime() -> None:
    found = list(_runtime_imports(FACADE))
    assert [(name, func) for _, name, func in found] == [("supervisor", LATE_IMPORT_FUNCTION)]


def _fresh_modules(code: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr


def test_importing_the_model_loads_no_runtime_module() -> None:
    _fresh_modules(
        "import remotemedia, remotemedia.pipeline, remotemedia.node, remotemedia.manifest, remotemedia.frames, "
        "remotemedia.errors, remotemedia.runs, remotemedia.group, remotemedia.nodes, remotemedia.serialization, "
        "remotemedia.registry, remotemedia.core.node_serialization; import sys; "
        "bad = sorted(m for m in sys.modules if m == 'supervisor' or m.startswith('supervisor.')); "
        "assert not bad, bad"
    )


def test_importing_the_worker_loads_neither_the_arbiter_nor_the_cli() -> None:
    # every worker process imports supervisor.worker: the arbiter's and the CLI's imports
    # (click, psutil, the control socket, ...) would add to each worker's start-up
    _fresh_modules(
        "import supervisor.worker, sys; "
        "bad = sorted(m for m in sys.modules if m in ('supervisor.arbiter', 'supervisor.core', 'supervisor.gateway', 'supervisor.cli', 'supervisor.api', "
        "'supervisor.inline', 'supervisor.control', 'click')); assert not bad, bad"
    )


def test_the_facade_and_the_seed_module_name_still_give_the_runtime_api() -> None:
    import remotemedia
    import remotemedia.runtime as seed_name
    from supervisor import api, core as arbiter

    assert remotemedia.Supervisor is arbiter.Supervisor and remotemedia.RunReport is arbiter.RunReport
    assert remotemedia.execute_pipeline is api.execute_pipeline is seed_name.execute_pipeline
    assert remotemedia.execute_pipeline_with_input is api.execute_pipeline_with_input
    assert seed_name.supervisor_options is api.supervisor_options and seed_name.Outputs is remotemedia.runs.Outputs
    with pytest.raises(AttributeError):
        remotemedia.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        seed_name.no_such_name  # noqa: B018


def test_pipeline_run_goes_through_the_facade() -> None:
    from remotemedia import Pipeline
    from remotemedia.nodes import MapNode

    assert Pipeline([MapNode(lambda x: x + 1)]).run([1, 2], executor="inline") == [2, 3]
