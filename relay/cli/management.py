"""The operator's commands (``relay connections``, ``documents``, ``dlq``, ``status``, ``secrets``).

What they share with every command (exit codes, output, settings and pool) is in
:mod:`relay.cli.console`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from relay import config, errors
from relay.cli import console
from relay.domain import connections, credentials, documents, inputs


class _Secrets:
    """The secret flags of ``connections add``, read from a value, ``-`` or an environment variable.

    ``-`` reads standard input (once); ``--<flag>-env VAR`` reads the variable ``VAR``. Errors name
    the flag or the variable, never a value.
    """

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        self._args = args
        self._environ = environ
        dashes = [
            name
            for name in ("qonto_api_key", "qonto_refresh_token", "cegid_api_secret")
            if getattr(args, name) == "-"
        ] + (["webhook_secret"] if "-" in (args.webhook_secret or ()) else [])
        if len(dashes) > 1:
            raise console.UsageError(
                "only one flag may read standard input ('-'): "
                + ", ".join(inputs.flag_name(n) for n in dashes)
            )
        self._stdin = sys.stdin.read() if dashes else ""

    def _env(self, variable: str, flag: str) -> str:
        value = self._environ.get(variable, "").strip()
        if not value:
            raise console.UsageError(f"{flag}-env: the environment variable {variable} is empty")
        return value

    def one(self, name: str) -> str | None:
        flag = inputs.flag_name(name)
        given, variable = getattr(self._args, name), getattr(self._args, f"{name}_env")
        if given is not None and variable is not None:
            raise console.UsageError(f"give {flag} or {flag}-env, not both")
        if variable is not None:
            return self._env(variable, flag)
        if given == "-":
            value = self._stdin.strip()
            if not value:
                raise console.UsageError(f"{flag} -: nothing on standard input")
            return value
        return str(given) if given is not None else None

    def webhook_secrets(self) -> tuple[str, ...]:
        found: list[str] = []
        for given in self._args.webhook_secret or ():
            if given == "-":
                found.extend(line.strip() for line in self._stdin.splitlines() if line.strip())
            else:
                found.append(given)
        for variable in self._args.webhook_secret_env or ():
            found.append(self._env(variable, "--webhook-secret"))
        return tuple(found)


async def cmd_connections_add(args: argparse.Namespace) -> int:
    secrets = _Secrets(args, os.environ)
    cegid_secret = secrets.one("cegid_api_secret")
    if cegid_secret is None:
        raise console.UsageError("--cegid-api-secret (or --cegid-api-secret-env VAR) is required")
    new = inputs.NewConnection(
        client_name=args.client_name,
        qonto_organization_id=args.qonto_organization_id,
        qonto=inputs.qonto_credentials(
            secrets.one("qonto_api_key"), secrets.one("qonto_refresh_token")
        ),
        cegid=credentials.CegidCredentials(
            api_key=config.Secret(args.cegid_api_key),
            api_secret=config.Secret(cegid_secret),
        ),
        cegid_dossier=args.cegid_dossier,
        cegid_domain=args.cegid_domain,
        webhook_secrets=secrets.webhook_secrets(),
        subscribe=args.subscribe,
        since=args.since,
    )
    inputs.validate(new)  # usage errors first, before the configuration and any call
    settings = console.settings(require_cegid_key=True)
    async with console.pool(settings) as pool:
        created = await connections.add(settings, pool, new)
    if args.json:
        console.emit_json(created.to_json())
    else:
        print(f"connection {created.connection.id} created for {args.client_name}")
        print(f"  Loop shows it as: {args.client_name} x Qonto (dossier {args.cegid_dossier})")
        print(f"  webhook URL: {created.webhook_url}")
        if created.subscriptions:
            print(f"  webhook subscriptions created in Qonto: {created.subscriptions}")
        for warning in created.warnings:
            print(f"warning: {warning}")
    return console.EXIT_OK


async def cmd_connections_invite(args: argparse.Namespace) -> int:
    from relay.domain import invitations

    if not args.client_name.strip():
        raise console.UsageError("--client-name must not be empty")
    # the link is useless unless the relay can run the consent and check Loop: say so now
    settings = console.settings(require_cegid_key=True)
    if not settings.qonto_client_id:
        raise errors.ConfigurationError(
            "RELAY_QONTO_CLIENT_ID and RELAY_QONTO_CLIENT_SECRET: required for the setup link "
            "(Qonto's consent uses the relay's OAuth application)"
        )
    async with console.pool(settings) as pool:
        created = await invitations.create(settings, pool, args.client_name)
    value = {
        "id": str(created.id),
        "setup_url": created.setup_url,
        "expires_at": created.expires_at.isoformat(),
    }
    if args.json:
        console.emit_json(value)
    else:
        print(f"setup link for {created.client_name} (single use, until {value['expires_at']}):")
        print(f"  {created.setup_url}")
        print("send it to a member of the client's Qonto organization (owner, admin or reporting)")
    return console.EXIT_OK


async def cmd_secrets_rotate(args: argparse.Namespace) -> int:
    from relay.domain import rotation

    settings = console.settings()
    async with console.pool(settings) as pool:
        rotated = await rotation.rotate(settings, pool)
    if args.json:
        console.emit_json(rotated.to_json())
    else:
        counts = ", ".join(f"{n} {kind}" for kind, n in rotated.resealed.items())
        print(f"re-sealed under the first key of RELAY_SECRET_KEY: {counts}")
        print(f"already under it: {rotated.unchanged} value(s)")
    return console.EXIT_OK


async def cmd_connections_list(args: argparse.Namespace) -> int:
    settings = console.settings()
    async with console.pool(settings) as pool:
        items = await connections.list_all(pool)
    if args.json:
        console.emit_json([c.to_json() for c in items])
    else:
        rows = [
            (c.id, c.client_name, c.cegid_dossier, c.state, c.state_reason or "") for c in items
        ]
        print(console.table(rows, ("id", "client", "dossier", "state", "reason")))
    return console.EXIT_OK


def _print_connection(value: dict[str, Any]) -> None:
    for key in (
        "id",
        "client_name",
        "qonto_organization_id",
        "cegid_dossier",
        "cegid_domain",
        "state",
        "state_reason",
        "scan_since",
        "connected_at",
        "first_upload_at",
        "dossier_checked_at",
    ):
        print(f"{key:24} {value.get(key) if value.get(key) is not None else '-'}")
    print(f"{'documents':24} {value.get('documents') or {}}")
    for problem in value.get("problems", []):
        print(f"problem: {problem}")
    for warning in value.get("warnings", []):
        print(f"warning: {warning}")


async def cmd_connections_show(args: argparse.Namespace) -> int:
    settings = console.settings()
    async with console.pool(settings) as pool:
        value = await connections.describe(pool, args.id)
    console.emit_json(value) if args.json else _print_connection(value)
    return console.EXIT_OK


async def cmd_connections_check(args: argparse.Namespace) -> int:
    settings = console.settings(require_cegid_key=True)
    async with console.pool(settings) as pool:
        value = await connections.check(settings, pool, args.id)
    console.emit_json(value) if args.json else _print_connection(value)
    return console.EXIT_FAILED if value["problems"] else console.EXIT_OK


async def cmd_connections_disconnect(args: argparse.Namespace) -> int:
    settings = console.settings()
    async with console.pool(settings) as pool:
        connection = await connections.disconnect(pool, args.id)
    console.emit_json(connection.to_json()) if args.json else print(
        f"connection {args.id} disconnected"
    )
    return console.EXIT_OK


async def cmd_connections_reconnect(args: argparse.Namespace) -> int:
    settings = console.settings(require_cegid_key=True)
    async with console.pool(settings) as pool:
        value = await connections.reconnect(settings, pool, args.id)
    console.emit_json(value) if args.json else _print_connection(value)
    return console.EXIT_FAILED if value["problems"] else console.EXIT_OK


async def cmd_documents_list(args: argparse.Namespace) -> int:
    settings = console.settings()
    async with console.pool(settings) as pool:
        items = await documents.list_documents(
            pool, connection_id=args.connection, state=args.state, limit=args.limit
        )
    if args.json:
        console.emit_json([d.to_json() for d in items])
    else:
        rows = [
            (d.id, d.source, d.direction, d.state, d.reason or "", d.file_name or d.qonto_file_name)
            for d in items
        ]
        print(console.table(rows, ("id", "source", "direction", "state", "reason", "file")))
    return console.EXIT_OK


async def cmd_documents_resolve(args: argparse.Namespace) -> int:
    from relay.domain import resolve

    settings = console.settings()
    async with console.pool(settings) as pool:
        document = await resolve.resolve(pool, args.id, uploaded=args.uploaded)
    if args.json:
        console.emit_json(document.to_json())
    else:
        print(f"document {document.id}: {document.state} ({document.reason})")
    return console.EXIT_OK


async def cmd_documents_retry(args: argparse.Namespace) -> int:
    from relay.domain import resolve

    settings = console.settings()
    async with console.pool(settings) as pool:
        document = await resolve.retry(pool, args.id)
    if args.json:
        console.emit_json(document.to_json())
    else:
        print(f"document {document.id}: {document.state} ({document.reason})")
    return console.EXIT_OK


async def _with_amqp(settings: config.Settings, work: Callable[[Any], Awaitable[Any]]) -> Any:
    from relay.broker import amqp

    async with amqp.connection(settings, name="relay-dlq") as conn:
        channel = await conn.channel()
        await amqp.declare(channel, settings)
        await channel.close()
        return await work(conn)


async def cmd_dlq(args: argparse.Namespace) -> int:
    from relay.broker import dlq

    settings = console.settings()
    if args.dlq_command == "list":
        items = await _with_amqp(settings, lambda c: dlq.list_messages(settings, c))
        if args.json:
            console.emit_json([m.to_json() for m in items])
        else:
            rows = [(m.id, m.topic, m.connection_id, m.reason, m.failed_at) for m in items]
            print(console.table(rows, ("id", "topic", "connection", "reason", "failed at")))
    elif args.dlq_command == "show":
        message = await _with_amqp(settings, lambda c: dlq.show(settings, c, args.id))
        value = message.to_json(with_body=True)
        console.emit_json(value) if args.json else print(
            orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
        )
    elif args.dlq_command == "replay":
        if not args.all and not args.ids:
            raise console.UsageError("give dead-letter ids to replay, or --all")
        ids = None if args.all else list(args.ids)
        count = await _with_amqp(settings, lambda c: dlq.replay(settings, c, ids))
        console.emit_json({"replayed": count}) if args.json else print(
            f"{count} message(s) replayed"
        )
    else:
        count = await _with_amqp(settings, lambda c: dlq.purge(settings, c, list(args.ids)))
        console.emit_json({"purged": count}) if args.json else print(f"{count} message(s) purged")
    return console.EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    """Show every role's heartbeat and the queues, exiting 1 when something is stalled."""
    import socket

    from relay import errors
    from relay.broker import amqp
    from relay.domain import status
    from relay.store import db

    settings = console.settings(require_secret_key=False)
    host = socket.gethostname() if args.this_host else args.host
    conn = await db.connect(settings)
    try:
        broker_error = None
        async with contextlib.AsyncExitStack() as stack:
            broker = None
            try:
                broker = await stack.enter_async_context(
                    amqp.connection(settings, name="relay-status")
                )
            except errors.BrokerUnavailable as exc:
                broker_error = str(exc)
            report = await status.check(settings, conn, broker, broker_error=broker_error)
    finally:
        await conn.close()
    if args.json:
        console.emit_json(report.to_json(args.role, host))
    else:
        print(report.render(args.role, host))
    return report.outcome(args.role, host)[1]
