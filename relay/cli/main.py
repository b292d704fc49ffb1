"""The ``relay`` command line, with every command and flag of the product's outside, and main.

See the README and ``relay --help``. The commands are in :mod:`relay.cli.commands` (the relay's
roles and one-off runs) and :mod:`relay.cli.management` (connections, documents, the dead-letter
queue); exit codes, ``--json`` and what they share in :mod:`relay.cli.console`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from relay import config, errors, log
from relay.cli import commands, console, management
from relay.domain import inputs


class _UsageExit(SystemExit):
    """argparse's usage error (exit 2), with its message kept for ``--json``."""

    def __init__(self, message: str) -> None:
        super().__init__(console.EXIT_USAGE)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise _UsageExit(message)


# ------------------------------------------------------------------------------------------ parser


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


BIGINT_MAX = 2**63 - 1  # PostgreSQL's bigint: ids and limits beyond it are usage errors


def _positive(value: str) -> int:
    """Read a whole number from 1 to 2**63-1 (what PostgreSQL's bigint holds)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("expected a number of at least 1")
    if number > BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"expected a number of at most {BIGINT_MAX}")
    return number


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

    command("keygen", "print a new RELAY_SECRET_KEY", commands.cmd_keygen, json=True)
    command(
        "migrate",
        "create or upgrade the schema (idempotent, safe concurrently)",
        commands.cmd_migrate,
        json=True,
    )
    command(
        "serve", "the HTTP edge: webhook intake, health, metrics, admin API", commands.cmd_serve
    )
    command("consume", "the consumer: RabbitMQ -> PostgreSQL buffer", commands.cmd_consume)
    command(
        "scheduler",
        "run the Qonto scan and the flush every day at RELAY_FLUSH_AT UTC",
        commands.cmd_scheduler,
    )
    command("run", "serve, consume and schedule in one process", commands.cmd_run)

    flush = command(
        "flush",
        "one scan + flush immediately, then exit; prints the run report",
        commands.cmd_flush,
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
        management.cmd_connections_add,
        json=True,
        parent=conns_sub,
    )
    add.add_argument("--client-name", required=True, help='shown in Loop as "NAME x Qonto"')
    add.add_argument("--qonto-organization-id", required=True)
    stdin_or_env = (
        "; '-' reads it from standard input (one flag only), and {flag}-env VAR from the "
        "environment variable VAR, out of `ps` and shell history"
    )
    add.add_argument(
        "--qonto-api-key",
        metavar="LOGIN:SECRET",
        help="Qonto API key authentication" + stdin_or_env.format(flag="--qonto-api-key"),
    )
    add.add_argument("--qonto-api-key-env", metavar="VAR", help=argparse.SUPPRESS)
    add.add_argument(
        "--qonto-refresh-token",
        metavar="TOKEN",
        help="Qonto OAuth refresh token" + stdin_or_env.format(flag="--qonto-refresh-token"),
    )
    add.add_argument("--qonto-refresh-token-env", metavar="VAR", help=argparse.SUPPRESS)
    add.add_argument(
        "--webhook-secret",
        action="append",
        metavar="SECRET",
        help="a webhook subscription's secret (repeatable; '-' reads one per line from standard "
        "input, --webhook-secret-env VAR (repeatable) from the environment)",
    )
    add.add_argument("--webhook-secret-env", action="append", metavar="VAR", help=argparse.SUPPRESS)
    add.add_argument(
        "--subscribe",
        action="store_true",
        help="register the webhook subscriptions in Qonto and store their secrets",
    )
    add.add_argument("--cegid-api-key", required=True)
    add.add_argument(
        "--cegid-api-secret",
        metavar="SECRET",
        help="the firm's Loop API secret (this or --cegid-api-secret-env is required)"
        + stdin_or_env.format(flag="--cegid-api-secret"),
    )
    add.add_argument("--cegid-api-secret-env", metavar="VAR", help=argparse.SUPPRESS)
    add.add_argument(
        "--cegid-dossier", required=True, metavar="CODE", help="the client's code dossier"
    )
    add.add_argument(
        "--cegid-domain", required=True, metavar="DOMAIN", help="the firm's Loop domain"
    )
    add.add_argument("--since", type=_date, help="backfill: scan Qonto from this date (YYYY-MM-DD)")
    invite = command(
        "invite",
        "a one-time setup link for the client (valid 7 days): the Qonto member and the accountant "
        "set up the connection in a browser",
        management.cmd_connections_invite,
        json=True,
        parent=conns_sub,
    )
    invite.add_argument("--client-name", required=True, help='shown in Loop as "NAME x Qonto"')
    command(
        "list", "list connections", management.cmd_connections_list, json=True, parent=conns_sub
    )
    for name, help_, func in (
        ("show", "one connection, its documents and warnings", management.cmd_connections_show),
        ("check", "re-check Qonto and Cegid access now", management.cmd_connections_check),
        ("disconnect", "stop syncing this connection", management.cmd_connections_disconnect),
        (
            "reconnect",
            "resume a disconnected connection after checking it",
            management.cmd_connections_reconnect,
        ),
    ):
        command(name, help_, func, json=True, parent=conns_sub).add_argument("id", type=_uuid)

    docs = command("documents", "documents and their states", lambda a: None)
    docs_sub = docs.add_subparsers(dest="documents_command", required=True, parser_class=_Parser)
    dlist = command(
        "list",
        "every document's state and reason",
        management.cmd_documents_list,
        json=True,
        parent=docs_sub,
    )
    dlist.add_argument("--connection", type=_uuid)
    dlist.add_argument(
        "--state", choices=["pending", "uploading", "uploaded", "skipped", "failed", "in_doubt"]
    )
    dlist.add_argument("--limit", type=_positive)
    resolve = command(
        "resolve",
        "decide on a document whose upload outcome is unknown (in_doubt)",
        management.cmd_documents_resolve,
        json=True,
        parent=docs_sub,
    )
    resolve.add_argument("id", type=_positive)
    decision = resolve.add_mutually_exclusive_group(required=True)
    decision.add_argument("--uploaded", action="store_true", help="it is in Loop: mark uploaded")
    decision.add_argument("--resend", action="store_true", help="it is not in Loop: send it again")
    retry = command(
        "retry",
        "send a failed document again at the next flush (after its cause was fixed)",
        management.cmd_documents_retry,
        json=True,
        parent=docs_sub,
    )
    retry.add_argument("id", type=_positive)

    dlq = command("dlq", "the dead-letter queue", lambda a: None)
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    command("list", "dead-lettered messages and why", management.cmd_dlq, json=True, parent=dlq_sub)
    command(
        "show",
        "one dead-lettered message with its body",
        management.cmd_dlq,
        json=True,
        parent=dlq_sub,
    ).add_argument("id")
    replay = command(
        "replay",
        "send messages back to the events queue",
        management.cmd_dlq,
        json=True,
        parent=dlq_sub,
    )
    replay.add_argument("ids", nargs="*")
    replay.add_argument("--all", action="store_true")
    command(
        "purge", "drop dead-lettered messages", management.cmd_dlq, json=True, parent=dlq_sub
    ).add_argument("ids", nargs="+")

    status = command(
        "status",
        "every running role (heartbeat, last work), the queues' depths and oldest message; "
        "exit 1 when something is stalled",
        management.cmd_status,
        json=True,
    )
    status.add_argument(
        "--role",
        choices=["serve", "consume", "scheduler", "flush"],
        help="only this role: exit 0 only when a live one runs and none of them is stalled",
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "--this-host", action="store_true", help="only the roles of this host (a health check)"
    )
    where.add_argument("--host", help="only the roles of this host name")
    secrets = command("secrets", "the stored secrets", lambda a: None)
    secrets_sub = secrets.add_subparsers(
        dest="secrets_command", required=True, parser_class=_Parser
    )
    command(
        "rotate",
        "re-seal every stored secret under the first key of RELAY_SECRET_KEY",
        management.cmd_secrets_rotate,
        json=True,
        parent=secrets_sub,
    )

    demo = command(
        "demo",
        "a complete run on built-in Qonto and Cegid Loop sandboxes",
        commands.cmd_demo,
        json=True,
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo database and queues")
    demo.add_argument(
        "--web",
        action="store_true",
        help="keep the sandboxes and the relay running and print a setup link to walk the client's "
        "setup in a browser (until interrupted)",
    )
    return parser


def _fail(message: str, code: int, *, as_json: bool) -> int:
    """Report a failed command on stderr and, with ``--json``, as one JSON document on stdout."""
    print(f"relay: {message}", file=sys.stderr)
    if as_json:
        console.emit_json({"error": message, "exit_code": code})
    return code


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
    except _UsageExit as exc:
        if "--json" in arguments:
            console.emit_json({"error": exc.message, "exit_code": console.EXIT_USAGE})
        raise
    log.configure("warning")  # on standard error: stdout is for results (and JSON) only
    as_json = bool(getattr(args, "json", False))
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (
        console.UsageError,
        inputs.InvalidInput,
        errors.ConfigurationError,
        errors.NotFound,
    ) as exc:
        return _fail(str(exc), console.EXIT_USAGE, as_json=as_json)
    except errors.RelayError as exc:
        return _fail(str(exc), console.EXIT_FAILED, as_json=as_json)
    except KeyboardInterrupt:
        if as_json:
            console.emit_json({"error": "interrupted", "exit_code": console.EXIT_FAILED})
        return console.EXIT_FAILED
    except Exception as exc:
        # The last resort: one line, never a traceback unless asked for (it may show values).
        if config.debug_requested():
            traceback.print_exc(file=sys.stderr)
        detail = " ".join(log.redact_text(str(exc)).split()) or "no detail"
        return _fail(
            f"unexpected error ({type(exc).__name__}: {detail}); RELAY_LOG_LEVEL=debug shows the "
            "traceback",
            console.EXIT_FAILED,
            as_json=as_json,
        )
