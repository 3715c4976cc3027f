"""The layers' import rules, read from the source (every import statement, at module level or inside a function):

- ``producer`` (the client package and the gateway) never imports ``worker``, torch or transformers, and its
  library modules never import the CLI (``producer.cli``: the command imports the library, not the other way);
- ``worker.model`` never imports ``worker.serving`` (the model knows nothing of Celery or Redis);
- ``worker.scheduling.policy`` imports neither the model nor serving, nor torch: it is pure;
- ``worker.serving`` imports no torch at module level (its torch work is the batcher's, loaded at start-up).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def breaking(paths: list[Path], forbidden: tuple[str, ...], **options) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(name for name in imports(path, **options) if any(name == f or name.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


@pytest.mark.parametrize(("package", "forbidden", "module_level_only"), [
    ("producer", ("worker", "torch", "transformers"), False),
    ("worker.model", ("worker.serving",), False),
    ("worker.scheduling.policy", ("worker.model", "worker.serving", "worker.scheduling.batcher", "torch", "transformers"), False),
    ("worker.serving", ("torch", "transformers"), True),
])
def test_a_layer_imports_only_what_it_may(package, forbidden, module_level_only):
    path = ROOT / (package.replace(".", "/") + ".py")
    paths = [path] if path.exists() else modules(package)
    assert paths, package
    assert breaking(paths, forbidden, module_level_only=module_level_only) == {}


def test_the_rules_see_imports_inside_functions():
    assert "worker.serving.run" in imports(ROOT / "worker/ops/commands.py"), "commands import the worker lazily, inside functions"
    assert "worker.serving.run" not in imports(ROOT / "worker/ops/commands.py", module_level_only=True)


def test_the_client_library_does_not_import_its_command_line():
    library = [p for p in modules("producer") if "cli" not in p.relative_to(ROOT).parts]
    assert breaking(library, ("producer.cli",)) == {}
