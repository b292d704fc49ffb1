"""The data layer's boundary: SQL runs only in relay/store, one function per named statement."""

from __future__ import annotations

import ast
import collections
import inspect
import pathlib

from relay import store
from relay.store import queries

ROOT = pathlib.Path(__file__).resolve().parents[2]
STORE = ROOT / "relay" / "store"
# the store's own helpers: the statement loader and the pool, transaction and translation helpers
HELPERS = {"__init__.py", "db.py", "queries.py"}
RAW = {"fetch", "fetchrow", "fetchval", "execute", "executemany"}
RUNNERS = {"pool", "conn", "_pool", "_conn", "connection"}  # what a statement runs on, as named


def _outside_store() -> list[pathlib.Path]:
    paths = [*(ROOT / "relay").rglob("*.py"), *(ROOT / "consumers").rglob("*.py")]
    return [
        p for p in paths if STORE not in p.parents and ROOT / "relay" / "sandbox" not in p.parents
    ]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _store_results(tree: ast.AST) -> set[str]:
    """Names bound to the result of a store call (``x = await store.documents.get(...)``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(value, ast.Await):
            call = value.value
            if isinstance(call, ast.Call) and _dotted(call.func).startswith("store."):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        if (
            isinstance(node, ast.For | ast.comprehension)
            and isinstance(node.iter, ast.Await)
            and isinstance(node.iter.value, ast.Call)
            and _dotted(node.iter.value.func).startswith("store.")
            and isinstance(node.target, ast.Name)
        ):
            names.add(node.target.id)
    return names


def _violations(where: str, text: str) -> list[str]:
    tree = ast.parse(text)
    found = []
    results = _store_results(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = _dotted(node)
            # relay/models.py names the Record type its rows are built from (from_record)
            if name in ("queries.get", "db.translate") or (
                name == "asyncpg.Record" and where != "relay/models.py"
            ):
                found.append(f"{where}:{node.lineno}: {name}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in RAW
            and _dotted(node.func.value).split(".")[-1] in RUNNERS
        ):
            found.append(f"{where}:{node.lineno}: a statement run outside relay/store")
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id in results
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            found.append(f"{where}:{node.lineno}: a store result indexed like a record")
    return found


def test_sql_runs_only_in_the_store() -> None:
    """No statement, no error translation and no asyncpg record outside relay/store."""
    found = [
        v
        for path in _outside_store()
        for v in _violations(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    ]
    assert not found, "\n".join(found)


def test_the_scan_sees_a_violation() -> None:
    """The scan above finds each kind of leak it looks for."""
    sample = (
        "async def f(pool):\n"
        "    with db.translate('x'):\n"
        "        await pool.fetch(queries.get('list_connections'))\n"
        "    row = await store.documents.get(pool, 1)\n"
        "    return row['id']\n"
    )
    assert _store_results(ast.parse(sample)) == {"row"}
    found = _violations("consumers/sample.py", sample)
    assert len(found) == 4, found


def _statements_by_function() -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for path in sorted(STORE.glob("*.py")):
        if path.name in HELPERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                used[f"{path.stem}.{node.name}"] = [
                    call.args[0].value
                    for call in ast.walk(node)
                    if isinstance(call, ast.Call)
                    and _dotted(call.func) == "queries.get"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ]
    return used


def test_every_statement_belongs_to_exactly_one_store_function() -> None:
    """No dead SQL in sql/queries.sql, no statement run from two places, one statement a function."""
    used = _statements_by_function()
    owners = collections.Counter(name for names in used.values() for name in names)
    catalogue = set(queries.all_queries())
    assert not catalogue - set(owners), (
        f"statements no store function runs: {catalogue - set(owners)}"
    )
    assert not set(owners) - catalogue, (
        f"statements missing from queries.sql: {set(owners) - catalogue}"
    )
    assert not [n for n, c in owners.items() if c > 1], "statements run by several functions"
    assert not [f for f, names in used.items() if len(names) > 1], "functions running several"


def test_store_functions_return_no_record() -> None:
    """Every store function returns dataclasses, scalars or None: never an asyncpg Record."""
    for module in (getattr(store, name) for name in store.__all__):
        for name, function in inspect.getmembers(module, inspect.iscoroutinefunction):
            if function.__module__ != module.__name__:
                continue
            returned = str(inspect.signature(function).return_annotation)
            assert "Record" not in returned, f"{module.__name__}.{name} returns {returned}"
            assert returned != "inspect._empty", f"{module.__name__}.{name} has no return type"
