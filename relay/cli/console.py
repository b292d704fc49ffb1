"""What every ``relay`` command shares (exit codes, usage errors, output, settings and pool).

Exit codes: 0 success, 1 the work failed (the output says what), 2 bad usage or configuration.
Every command that reports something takes ``--json`` and then prints exactly one JSON document
(:func:`emit_json`); otherwise a readable line or a :func:`table`. No command prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson

from relay import config, crypto, errors, store
from relay.store import db

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags or arguments, for which the command exits 2 with the message."""


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) if c is not None else "-" for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def settings(
    *,
    require_secret_key: bool = True,
    require_admin_token: bool = False,
    require_cegid_key: bool = False,
) -> config.Settings:
    """Read the settings (``require_cegid_key`` for the commands that call Cegid Loop)."""
    return config.from_env(
        require_secret_key=require_secret_key,
        require_admin_token=require_admin_token,
        require_cegid_subscription_key=require_cegid_key,
    )


async def check_secret_key(settings: config.Settings) -> None:
    """Refuse to start a role whose RELAY_SECRET_KEY does not open the stored webhook secrets.

    It raises ConfigurationError (exit 2, one line), so a role started with the wrong key says so
    before it starts any work.

    A database that cannot be reached or is not migrated is left to the role's own start, which
    says what is wrong with it.
    """
    try:
        conn = await db.connect(settings)
    except errors.RelayError:
        return
    try:
        sealed = await store.webhook_secrets.intake_all(conn)
    except errors.RelayError:
        return
    finally:
        await conn.close()
    box = crypto.Box(settings.secret_key.reveal())
    for row in sealed:
        box.open(row.secret)  # ConfigurationError naming RELAY_SECRET_KEY


@contextlib.asynccontextmanager
async def pool(settings: config.Settings) -> AsyncIterator[asyncpg.Pool]:
    async with db.pool_for(settings, min_size=1, max_size=4) as pool:
        yield pool


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
