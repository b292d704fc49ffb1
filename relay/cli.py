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
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn

import asyncpg
import orjson

from relay import config, connections, credentials, crypto, db, documents, errors, log

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

logger = log.get(__name__)


class UsageError(Exception):
    """Bad flags or arguments: exit 2 with the message."""


class _UsageExit(SystemExit):
    """argparse's usage error (exit 2), with its message kept for ``--json``."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise _UsageExit(message)


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
    *,
    require_secret_key: bool = True,
    require_admin_token: bool = False,
    require_cegid_key: bool = False,
) -> config.Settings:
    """The settings; ``require_cegid_key`` for the commands that call Cegid Loop."""
    return config.from_env(
        require_secret_key=require_secret_key,
        require_admin_token=require_admin_token,
        require_cegid_subscription_key=require_cegid_key,
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
    key = crypto.generate_key()
    _emit_json({"secret_key": key}) if args.json else print(key)
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
    serve.run(settings)  # raises when the start failed (exit 1, or 2 for configuration)
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

    settings = _settings(require_cegid_key=True)
    log.configure(settings.log_level)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with _pool(settings) as pool:
        await scheduler.run_forever(settings, pool, stop=stop)
    return EXIT_OK


RUN_SHUTDOWN_S = 30.0  # how long `relay run` waits for its roles to stop before cancelling them


async def cmd_run(args: argparse.Namespace) -> int:
    """The HTTP edge, the consumer and the scheduler in one process (small deployments, demos).

    Supervised: SIGTERM/SIGINT stops the three roles; a role ending on its own (an error, a lost
    dependency it cannot survive) is logged as ``run_role_failed`` with the role and the error, the
    other roles are stopped cleanly, and the process exits 1, so that whatever restarts it does,
    instead of the intake accepting events that nothing processes.
    """
    import uvicorn

    from consumers import buffer, scheduler
    from relay import app

    class Server(uvicorn.Server):
        """uvicorn without its own signal handlers: `relay run` handles SIGTERM/SIGINT for all roles
        (uvicorn's would stop the intake alone, then re-raise the signal and kill the process)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    settings = _settings(require_cegid_key=True)
    log.configure(settings.log_level)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    server = Server(
        uvicorn.Config(
            app.create_app(settings),
            host=settings.host,
            port=settings.port,
            access_log=False,
            log_level="warning",
            log_config=None,  # uvicorn's records go through relay.log's handler (JSON when no TTY)
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    async with _pool(settings) as pool:
        roles = {
            asyncio.create_task(_serve(server), name="intake"): "intake",
            asyncio.create_task(buffer.consume(settings, stop=stop), name="consume"): "consume",
            asyncio.create_task(
                scheduler.run_forever(settings, pool, stop=stop), name="scheduler"
            ): "scheduler",
        }
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({stopping, *roles}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        failed = [task for task in roles if task in done]  # ended before anyone asked them to
        for task in failed:
            _role_failed(roles[task], task)
        stop.set()
        server.should_exit = True
        _, late = await asyncio.wait(roles, timeout=RUN_SHUTDOWN_S)
        for task in late:
            logger.error("run_role_stop_timeout", role=roles[task], timeout_s=RUN_SHUTDOWN_S)
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in roles:
            if task not in failed and not task.cancelled() and task.exception() is not None:
                failed.append(task)
                _role_failed(roles[task], task)
    logger.info("run_stopped", failed=[roles[t] for t in failed])
    return EXIT_FAILED if failed or late else EXIT_OK


class RunRoleError(errors.RelayError):
    """A role of `relay run` could not run."""


async def _serve(server: Any) -> None:
    """uvicorn's serve(), with its ``sys.exit`` at a failed start turned into an error of the role."""
    try:
        await server.serve()
    except SystemExit as exc:
        raise RunRoleError(
            f"the HTTP server did not start (uvicorn exit code {exc.code}; see its error above)"
        ) from None


def _role_failed(role: str, task: asyncio.Task[Any]) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is None:
        logger.error("run_role_failed", role=role, error="stopped on its own")
    else:
        logger.error(
            "run_role_failed",
            role=role,
            error=f"{type(exc).__name__}: {exc}",
            exc_info=None if isinstance(exc, errors.RelayError) else exc,
        )


async def cmd_flush(args: argparse.Namespace) -> int:
    from consumers import flusher

    if not args.now:
        raise UsageError(
            "relay flush needs --now (the daily flush is run by `relay scheduler` at RELAY_FLUSH_AT)"
        )
    settings = _settings(require_cegid_key=True)
    log.configure(settings.log_level)
    report = await flusher.run_once(settings, connection_id=args.connection, since=args.since)
    if args.json:
        _emit_json(report.to_json())
    else:
        print(report.render())
    return EXIT_OK if report.exit_code == 0 else EXIT_FAILED


async def cmd_connections_add(args: argparse.Namespace) -> int:
    new = connections.NewConnection(
        client_name=args.client_name,
        qonto_organization_id=args.qonto_organization_id,
        qonto=connections.qonto_credentials(args.qonto_api_key, args.qonto_refresh_token),
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
    connections.validate(new)  # usage errors first, before the configuration and any call
    settings = _settings(require_cegid_key=True)
    async with _pool(settings) as pool:
        created = await connections.add(settings, pool, new)
    if args.json:
        _emit_json(created.to_json())
    else:
        print(f"connection {created.connection.id} created for {args.client_name}")
        print(f"  Loop shows it as: {args.client_name} x Qonto (dossier {args.cegid_dossier})")
        print(f"  webhook URL: {created.webhook_url}")
        if created.subscriptions:
            print(f"  webhook subscriptions created in Qonto: {created.subscriptions}")
        for warning in created.warnings:
            print(f"warning: {warning}")
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
    settings = _settings()
    async with _pool(settings) as pool:
        value = await connections.describe(pool, args.id)
    _emit_json(value) if args.json else _print_connection(value)
    return EXIT_OK


async def cmd_connections_check(args: argparse.Namespace) -> int:
    settings = _settings(require_cegid_key=True)
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
    settings = _settings(require_cegid_key=True)
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

    command("keygen", "print a new RELAY_SECRET_KEY", cmd_keygen, json=True)
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


def _fail(message: str, code: int, *, as_json: bool) -> int:
    """A failed command: its message on stderr and, with ``--json``, one JSON document on stdout."""
    print(f"relay: {message}", file=sys.stderr)
    if as_json:
        _emit_json({"error": message, "exit_code": code})
    return code


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
    except _UsageExit as exc:
        if "--json" in arguments:
            _emit_json({"error": exc.message, "exit_code": EXIT_USAGE})
        raise
    log.configure("warning")  # on standard error: stdout is for results (and JSON) only
    as_json = bool(getattr(args, "json", False))
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (
        UsageError,
        connections.InvalidInput,
        errors.ConfigurationError,
        errors.NotFound,
    ) as exc:
        return _fail(str(exc), EXIT_USAGE, as_json=as_json)
    except errors.RelayError as exc:
        return _fail(str(exc), EXIT_FAILED, as_json=as_json)
    except KeyboardInterrupt:
        if as_json:
            _emit_json({"error": "interrupted", "exit_code": EXIT_FAILED})
        return EXIT_FAILED
    except Exception as exc:
        # The last resort: one line, never a traceback unless asked for (it may show values).
        if config.debug_requested():
            traceback.print_exc(file=sys.stderr)
        detail = " ".join(log.redact_text(str(exc)).split()) or "no detail"
        return _fail(
            f"unexpected error ({type(exc).__name__}: {detail}); RELAY_LOG_LEVEL=debug shows the "
            "traceback",
            EXIT_FAILED,
            as_json=as_json,
        )
