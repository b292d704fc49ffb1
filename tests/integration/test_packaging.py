"""The wheel: what `pip install` gives a deployment carries the SQL, the templates and the styles."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_an_installed_wheel_finds_every_migration_query_and_page(tmp_path: pathlib.Path) -> None:
    """Built and unpacked outside the repository, the package loads its SQL and templates."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    migrations = sorted(p.name for p in (ROOT / "sql" / "migrations").glob("*.sql"))
    assert migrations
    assert all(f"relay/store/sql/migrations/{m}" in names for m in migrations)
    assert "relay/store/sql/queries.sql" in names
    assert any(n.startswith("relay/edge/pages/templates/") for n in names)
    assert any(n.startswith("relay/edge/pages/static/") for n in names)
    probe = (
        "import relay.store.queries as q, relay.edge.pages.templates as t;"
        "print(len(q.migrations()), len(q.all_queries()), q.SQL_DIR)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    ).stdout.split()
    assert out[0] == str(len(migrations))
    assert int(out[1]) > 50
    assert out[2].startswith(str(site))  # the unpacked wheel's files, not the repository's
