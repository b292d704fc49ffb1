"""The package's layering: only the command line (which starts the workers, and the demo) imports
consumers/; the rest of relay/ never does, not even inside a function."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
RELAY = ROOT / "relay"
ALLOWED = (RELAY / "cli",)


def consumers_imports(path: pathlib.Path) -> list[int]:
    """The lines of ``path`` importing consumers (or one of its modules), wherever they are."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "consumers" or name.startswith("consumers.") for name in names):
            lines.append(node.lineno)
    return lines


def test_the_scan_sees_a_function_local_import(tmp_path: pathlib.Path) -> None:
    """The scan finds an import hidden in a function (as admin.py's flush once had)."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from consumers import flusher\n    import consumers.scheduler\n"
    )
    assert consumers_imports(module) == [2, 3]


def test_only_the_command_line_imports_consumers() -> None:
    """Nothing in relay/ outside relay/cli/ imports consumers/ (the edge asks, workers run)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted(RELAY.rglob("*.py"))
        if not any(path.is_relative_to(allowed) for allowed in ALLOWED)
        for line in consumers_imports(path)
    ]
    assert offenders == []
    assert any(consumers_imports(path) for path in (RELAY / "cli").rglob("*.py"))
