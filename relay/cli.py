"""`relay ...`: every command of the product's outside (see the README and ``relay --help``).

Exit codes: 0 success, 1 the work failed (the output says what), 2 bad usage or configuration.
Every command that reports something takes ``--json`` and then prints exactly one JSON document.
No command prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import asyncpg
import orjson

from relay import config, connections, credentials, crypto, db, documents, errors, log

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags or arguments: exit 2 with the message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------------------ output


def _emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) if c is not None else "-" for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a connection id (UUID): {value!r}") from None


def _date(value: str) -> dt.datetime:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=dt.UTC)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("expected a number of at least 1")
    return number


# ------------------------------------------------------------------------------------------ context


def _settings(
    *, require_secret_key: bool = True, require_admin_token: bool = False
) -> config.Settings:
    return config.from_env(
        require_secret_key=require_secret_key, require_admin_token=require_admin_token
    )


@contextlib.asynccontextmanager
async def _pool(settings: config.Settings) -> AsyncIterator[asyncpg.Pool]:
    async with db.pool_for(settings, min_size=1, max_size=4) as pool:
        yield pool


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


# ------------------------------------------------------------------------------------------ commands


def cmd_keygen(args: argparse.Namespace) -> int:
    print(crypto.generate_key())
    return EXIT_OK


async def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(require_secret_key=False)
    created = await db.create_database_if_missing(settings)
    applied = await db.migrate(settings)
    if args.json:
        _emit_json({"database_created": created, "applied": applied})
    else:
        name = db.database_name(settings.database_url.reveal())
        print(
            f"database {name}: {'created, ' if created else ''}{len(applied)} migration(s) applied"
        )
        for version in applied:
            print(f"  {version}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import serve

    settings = _settings()
    log.configure(settings.log_level)
    serve.run(settings)
    return EXIT_OK


async def cmd_consume(args: argparse.Namespace) -> int:
    from consumers import buffer

    settings = _settings()
    log.configure(settings.log_level)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    await buffer.consume(settings, stop=stop)
    return EXIT_OK


async def cmd_scheduler(args: argparse.Namespace) -> int:
    from consumers import scheduler

    settings = _settings()
    log.configure(settings.log_level)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with _pool(settings) as pool:
        await scheduler.run_forever(settings, pool, stop=stop)
    return EXIT_OK


async def cmd_run(args: argparse.Namespace) -> int:
    """The HTTP edge, the consumer and the scheduler in one process (small deployments, demos)."""
    import uvicorn

    from consumers import buffer, scheduler
    from relay import app

    settings = _settings()
    log.configure(settings.log_level)
    stop = asyncio.Event()
    server = uvicorn.Server(
        uvicorn.Config(
            app.create_app(settings),
            host=settings.host,
            port=settings.port,
            access_log=False,
            log_level="warning",
            lifespan="on",
        )
    )
    async with _pool(settings) as pool:
        workers = [
            asyncio.create_task(buffer.consume(settings, stop=stop), name="consume"),
            asyncio.create_task(scheduler.run_forever(settings, pool, stop=stop), name="scheduler"),
        ]
        try:
            await server.serve()  # returns on SIGTERM/SIGINT (uvicorn handles them)
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    return EXIT_OK


async def cmd_flush(args: argparse.Namespace) -> int:
    from consumers import flusher

    if not args.now:
        raise UsageError(
            "relay flush needs --now (the daily flush is run by `relay scheduler` at RELAY_FLUSH_AT)"
        )
    settings = _settings()
    log.configure(settings.log_level)
    report = await flusher.run_once(settings, connection_id=args.connection, since=args.since)
    if args.json:
        _emit_json(report.to_json())
    else:
        print(report.render())
    return EXIT_OK if report.exit_code == 0 else EXIT_FAILED


def _qonto_credentials(args: argparse.Namespace) -> credentials.QontoCredentials:
    if bool(args.qonto_api_key) == bool(args.qonto_refresh_token):
        raise UsageError(
            "give exactly one of --qonto-api-key LOGIN:SECRET or --qonto-refresh-token"
        )
    if args.qonto_api_key:
        login, sep, secret = args.qonto_api_key.partition(":")
        if not sep or not login or not secret:
            raise UsageError("--qonto-api-key must be LOGIN:SECRET")
        return credentials.QontoApiKey(login=login, secret=config.Secret(secret))
    return credentials.QontoOAuth(refresh_token=config.Secret(args.qonto_refresh_token))


async def cmd_connections_add(args: argparse.Namespace) -> int:
    settings = _settings()
    new = connections.NewConnection(
        client_name=args.client_name,
        qonto_organization_id=args.qonto_organization_id,
        qonto=_qonto_credentials(args),
        cegid=credentials.CegidCredentials(
            api_key=config.Secret(args.cegid_api_key),
            api_secret=config.Secret(args.cegid_api_secret),
        ),
        cegid_dossier=args.cegid_dossier,
        cegid_domain=args.cegid_domain,
        webhook_secrets=tuple(args.webhook_secret or ()),
        subscribe=args.subscribe,
        since=args.since,
    )
    async with _pool(settings) as pool:
        created = await connections.add(settings, pool, new)
    if args.json:
        _emit_json(created.to_json())
    else:
        print(f"connection {created.connection.id} created for {args.client_name}")
        print(f"  Loop shows it as: {args.client_name} x Qonto (dossier {args.cegid_dossier})")
        print(f"  webhook URL: {created.webhook_url}")
    return EXIT_OK


async def cmd_connections_list(args: argparse.Namespace) -> int:
    settings = _settings()
    async with _pool(settings) as pool:
        items = await connections.list_all(pool)
    if args.json:
        _emit_json([c.to_json() for c in items])
    else:
        rows = [
            (c.id, c.client_name, c.cegid_dossier, c.state, c.state_reason or "") for c in items
        ]
        print(_table(rows, ("id", "client", "dossier", "state", "reason")))
    return EXIT_OK


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
    settings = _settings()
    async with _pool(settings) as pool:
        value = await connections.describe(pool, args.id)
    _emit_json(value) if args.json else _print_connection(value)
    return EXIT_OK


async def cmd_connections_check(args: argparse.Namespace) -> int:
    settings = _settings()
    async with _pool(settings) as pool:
        value = await connections.check(settings, pool, args.id)
    _emit_json(value) if args.json else _print_connection(value)
    return EXIT_FAILED if value["problems"] else EXIT_OK


async def cmd_connections_disconnect(args: argparse.Namespace) -> int:
    settings = _settings()
    async with _pool(settings) as pool:
        connection = await connections.disconnect(pool, args.id)
    _emit_json(connection.to_json()) if args.json else print(f"connection {args.id} disconnected")
    return EXIT_OK


async def cmd_connections_reconnect(args: argparse.Namespace) -> int:
    settings = _settings()
    async with _pool(settings) as pool:
        value = await connections.reconnect(settings, pool, args.id)
    _emit_json(value) if args.json else _print_connection(value)
    return EXIT_FAILED if value["problems"] else EXIT_OK


async def cmd_documents_list(args: argparse.Namespace) -> int:
    settings = _settings()
    async with _pool(settings) as pool:
        items = await documents.list_documents(
            pool, connection_id=args.connection, state=args.state, limit=args.limit
        )
    if args.json:
        _emit_json([d.to_json() for d in items])
    else:
        rows = [
            (d.id, d.source, d.direction, d.state, d.reason or "", d.file_name or d.qonto_file_name)
            for d in items
        ]
        print(_table(rows, ("id", "source", "direction", "state", "reason", "file")))
    return EXIT_OK


async def cmd_documents_resolve(args: argparse.Namespace) -> int:
    from relay import resolve

    settings = _settings()
    async with _pool(settings) as pool:
        document = await resolve.resolve(pool, args.id, uploaded=args.uploaded)
    if args.json:
        _emit_json(document.to_json())
    else:
        print(f"document {document.id}: {document.state} ({document.reason})")
    return EXIT_OK


async def _with_amqp(settings: config.Settings, work: Callable[[Any], Awaitable[Any]]) -> Any:
    from relay import amqp

    async with amqp.connection(settings, name="relay-dlq") as conn:
        channel = await conn.channel()
        await amqp.declare(channel, settings)
        await channel.close()
        return await work(conn)


async def cmd_dlq(args: argparse.Namespace) -> int:
    from relay import dlq

    settings = _settings()
    if args.dlq_command == "list":
        items = await _with_amqp(settings, lambda c: dlq.list_messages(settings, c))
        if args.json:
            _emit_json([m.to_json() for m in items])
        else:
            rows = [(m.id, m.topic, m.connection_id, m.reason, m.failed_at) for m in items]
            print(_table(rows, ("id", "topic", "connection", "reason", "failed at")))
    elif args.dlq_command == "show":
        message = await _with_amqp(settings, lambda c: dlq.show(settings, c, args.id))
        value = message.to_json(with_body=True)
        _emit_json(value) if args.json else print(
            orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
        )
    elif args.dlq_command == "replay":
        if not args.all and not args.ids:
            raise UsageError("give dead-letter ids to replay, or --all")
        ids = None if args.all else list(args.ids)
        count = await _with_amqp(settings, lambda c: dlq.replay(settings, c, ids))
        _emit_json({"replayed": count}) if args.json else print(f"{count} message(s) replayed")
    else:
        count = await _with_amqp(settings, lambda c: dlq.purge(settings, c, list(args.ids)))
        _emit_json({"purged": count}) if args.json else print(f"{count} message(s) purged")
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace) -> int:
    from relay import demo

    return await demo.run(json_output=args.json, keep=args.keep)


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="relay",
        description="Relays every Qonto receipt and invoice to the accountant's Cegid Loop file, "
        "exactly once. Configuration comes from RELAY_* environment variables (see the README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(
        name: str, help_: str, func: Callable[..., Any], *, json: bool = False, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if json:
            p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return p

    command("keygen", "print a new RELAY_SECRET_KEY", cmd_keygen)
    command(
        "migrate",
        "create or upgrade the schema (idempotent, safe concurrently)",
        cmd_migrate,
        json=True,
    )
    command("serve", "the HTTP edge: webhook intake, health, metrics, admin API", cmd_serve)
    command("consume", "the consumer: RabbitMQ -> PostgreSQL buffer", cmd_consume)
    command(
        "scheduler",
        "run the Qonto scan and the flush every day at RELAY_FLUSH_AT UTC",
        cmd_scheduler,
    )
    command("run", "serve, consume and schedule in one process", cmd_run)

    flush = command(
        "flush",
        "one scan + flush immediately, then exit; prints the run report",
        cmd_flush,
        json=True,
    )
    flush.add_argument("--now", action="store_true", help="run now (required)")
    flush.add_argument("--connection", type=_uuid, help="only this connection")
    flush.add_argument("--since", type=_date, help="scan Qonto from this date (YYYY-MM-DD)")

    conns = command("connections", "manage connections", lambda a: None)
    conns_sub = conns.add_subparsers(
        dest="connections_command", required=True, parser_class=_Parser
    )
    add = command(
        "add",
        "create a connection (checked against Qonto and Cegid first)",
        cmd_connections_add,
        json=True,
        parent=conns_sub,
    )
    add.add_argument("--client-name", required=True, help='shown in Loop as "NAME x Qonto"')
    add.add_argument("--qonto-organization-id", required=True)
    add.add_argument("--qonto-api-key", metavar="LOGIN:SECRET", help="Qonto API key authentication")
    add.add_argument("--qonto-refresh-token", metavar="TOKEN", help="Qonto OAuth refresh token")
    add.add_argument(
        "--webhook-secret",
        action="append",
        metavar="SECRET",
        help="a webhook subscription's secret (repeatable)",
    )
    add.add_argument(
        "--subscribe",
        action="store_true",
        help="register the webhook subscriptions in Qonto and store their secrets",
    )
    add.add_argument("--cegid-api-key", required=True)
    add.add_argument("--cegid-api-secret", required=True)
    add.add_argument(
        "--cegid-dossier", required=True, metavar="CODE", help="the client's code dossier"
    )
    add.add_argument(
        "--cegid-domain", required=True, metavar="DOMAIN", help="the firm's Loop domain"
    )
    add.add_argument("--since", type=_date, help="backfill: scan Qonto from this date (YYYY-MM-DD)")
    command("list", "list connections", cmd_connections_list, json=True, parent=conns_sub)
    for name, help_, func in (
        ("show", "one connection, its documents and warnings", cmd_connections_show),
        ("check", "re-check Qonto and Cegid access now", cmd_connections_check),
        ("disconnect", "stop syncing this connection", cmd_connections_disconnect),
        (
            "reconnect",
            "resume a disconnected connection after checking it",
            cmd_connections_reconnect,
        ),
    ):
        command(name, help_, func, json=True, parent=conns_sub).add_argument("id", type=_uuid)

    docs = command("documents", "documents and their states", lambda a: None)
    docs_sub = docs.add_subparsers(dest="documents_command", required=True, parser_class=_Parser)
    dlist = command(
        "list", "every document's state and reason", cmd_documents_list, json=True, parent=docs_sub
    )
    dlist.add_argument("--connection", type=_uuid)
    dlist.add_argument(
        "--state", choices=["pending", "uploading", "uploaded", "skipped", "failed", "in_doubt"]
    )
    dlist.add_argument("--limit", type=_positive)
    resolve = command(
        "resolve",
        "decide on a document whose upload outcome is unknown (in_doubt)",
        cmd_documents_resolve,
        json=True,
        parent=docs_sub,
    )
    resolve.add_argument("id", type=_positive)
    decision = resolve.add_mutually_exclusive_group(required=True)
    decision.add_argument("--uploaded", action="store_true", help="it is in Loop: mark uploaded")
    decision.add_argument("--resend", action="store_true", help="it is not in Loop: send it again")

    dlq = command("dlq", "the dead-letter queue", lambda a: None)
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    command("list", "dead-lettered messages and why", cmd_dlq, json=True, parent=dlq_sub)
    command(
        "show", "one dead-lettered message with its body", cmd_dlq, json=True, parent=dlq_sub
    ).add_argument("id")
    replay = command(
        "replay", "send messages back to the events queue", cmd_dlq, json=True, parent=dlq_sub
    )
    replay.add_argument("ids", nargs="*")
    replay.add_argument("--all", action="store_true")
    command(
        "purge", "drop dead-lettered messages", cmd_dlq, json=True, parent=dlq_sub
    ).add_argument("ids", nargs="+")

    demo = command(
        "demo", "a complete run on built-in Qonto and Cegid Loop sandboxes", cmd_demo, json=True
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo database and queues")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure("warning")  # on standard error: stdout is for results (and JSON) only
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except UsageError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.ConfigurationError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.NotFound as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
