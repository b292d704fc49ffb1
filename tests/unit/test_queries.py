"""The SQL catalogue: every name the code asks for exists, and every statement is used."""

from __future__ import annotations

import pathlib
import re

import pytest

from relay.store import queries

ROOT = pathlib.Path(__file__).resolve().parents[2]
USE = re.compile(r"""queries\.get\(\s*["']([a-z_][a-z0-9_]*)["']""")


def _used_names() -> set[str]:
    names: set[str] = set()
    for folder in ("relay", "consumers", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "relay" / "store" / "queries.py":
                continue  # its docstring shows a made-up name
            names.update(USE.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_query_the_code_uses_exists() -> None:
    """A typo in a query name fails here, not in production."""
    missing = _used_names() - set(queries.all_queries())
    assert not missing, f"queries used in code but absent from sql/queries.sql: {sorted(missing)}"


def test_every_query_in_the_catalogue_is_used() -> None:
    """Dead statements do not accumulate in sql/queries.sql."""
    unused = set(queries.all_queries()) - _used_names()
    assert not unused, f"queries never used: {sorted(unused)}"


def test_a_name_defined_twice_is_refused() -> None:
    """Two statements under one name would make one of them silently unreachable."""
    text = "-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n"
    with pytest.raises(ValueError, match="defined twice"):
        queries.parse(text)


def test_unknown_name_says_which() -> None:
    """Asking for a missing statement names it."""
    with pytest.raises(KeyError, match="no_such_query"):
        queries.get("no_such_query")


def test_migrations_are_numbered_in_order() -> None:
    """Migrations apply in their numbered order."""
    versions = [version for version, _ in queries.migrations()]
    assert versions == sorted(versions)
    assert versions[0].startswith("0001_")
