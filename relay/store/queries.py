"""Every SQL statement of the relay, loaded by name from ``sql/queries.sql``.

Each statement sits under a ``-- name: some_name`` header, followed by a ``-- params:`` line listing
its ``$1..$n`` parameters. Call sites stay plain asyncpg: ``await conn.fetch(queries.get("x"), ...)``.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

# The repository's sql/, inside the package (relay/store/sql is a link to it), so an installed
# wheel carries the same files.
SQL_DIR = importlib.resources.files("relay.store") / "sql"
_MIGRATION = re.compile(r"[0-9]{4}_[a-z0-9_]+\.sql")
_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a queries file into statements by name, refusing a name defined twice."""
    found: dict[str, str] = {}
    headers = list(_HEADER.finditer(text))
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        body_lines = [
            line
            for line in text[header.end() : end].splitlines()
            if line.strip() and not line.lstrip().startswith("--")
        ]
        name = header.group(1)
        if name in found:
            raise ValueError(f"query {name!r} is defined twice in queries.sql")
        found[name] = "\n".join(body_lines).strip().rstrip(";")
    return found


@functools.cache
def all_queries() -> dict[str, str]:
    return parse((SQL_DIR / "queries.sql").read_text(encoding="utf-8"))


def get(name: str) -> str:
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries.sql") from None


def migrations() -> list[tuple[str, str]]:
    """List the migrations as ``[(version, sql)]`` in order, from ``sql/migrations/NNNN_*.sql``."""
    files = sorted(
        (path for path in (SQL_DIR / "migrations").iterdir() if _MIGRATION.fullmatch(path.name)),
        key=lambda path: path.name,
    )
    return [(path.name.removesuffix(".sql"), path.read_text(encoding="utf-8")) for path in files]
