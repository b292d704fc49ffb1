"""The commands that run the relay (keygen, migrate, serve, consume, scheduler, run, flush, demo).

``relay run`` supervises the HTTP edge, the consumer and the scheduler in one process. What the
commands share (exit codes, output, settings and pool) is in :mod:`relay.cli.console`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from relay import crypto, errors, log
from relay.cli import console
from relay.domain import heartbeat
from relay.store import db

logger = log.get(__name__)


def cmd_keygen(args: argparse.Namespace) -> int:
    key = crypto.generate_key()
    console.emit_json({"secret_key": key}) if args.json else print(key)
    return console.EXIT_OK


async def cmd_migrate(args: argparse.Namespace) -> int:
    settings = console.settings(require_secret_key=False)
    created = await db.create_database_if_missing(settings)
    applied = await db.migrate(settings)
    if args.json:
        console.emit_json({"database_created": created, "applied": applied})
    else:
        name = db.database_name(settings.database_url.reveal())
        print(
            f"database {name}: {'created, ' if created else ''}{len(applied)} migration(s) applied"
        )
        for version in applied:
            print(f"  {version}")
    return console.EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.edge import serve

    settings = console.settings()
    log.configure(settings.log_level)
    asyncio.run(console.check_secret_key(settings))
    serve.run(settings)  # raises when the start failed (exit 1, or 2 for configuration)
    return console.EXIT_OK


async def cmd_consume(args: argparse.Namespace) -> int:
    from consumers import consume

    settings = console.settings()
    log.configure(settings.log_level)
    await console.check_secret_key(settings)
    stop = asyncio.Event()
    console.stop_on_signals(stop)
    progress = consume.Progress()
    async with heartbeat.beating(settings, "consume", consumer=progress):
        await consume.consume(settings, stop=stop, progress=progress)
    return console.EXIT_OK


async def cmd_scheduler(args: argparse.Namespace) -> int:
    from consumers import scheduler

    settings = console.settings(require_cegid_key=True)
    log.configure(settings.log_level)
    await console.check_secret_key(settings)
    stop = asyncio.Event()
    console.stop_on_signals(stop)
    work = heartbeat.Work()
    async with (
        heartbeat.beating(settings, "scheduler", work=work),
        console.pool(settings) as pool,
    ):
        await scheduler.run_forever(settings, pool, stop=stop, progress=work)
    return console.EXIT_OK


RUN_SHUTDOWN_S = 30.0  # how long ``relay run`` waits for its roles to stop before cancelling them


async def cmd_run(args: argparse.Namespace) -> int:
    """Run the HTTP edge, the consumer and the scheduler in one process (small deployments, demos).

    Supervised: SIGTERM/SIGINT stops the three roles; a role ending on its own (an error, a lost
    dependency it cannot survive) is logged as ``run_role_failed`` with the role and the error, the
    other roles are stopped cleanly, and the process exits 1, so that whatever restarts it does,
    instead of the intake accepting events that nothing processes.
    """
    import uvicorn

    from consumers import consume, scheduler
    from relay.edge import app

    class Server(uvicorn.Server):
        """uvicorn without its own signal handlers, since ``relay run`` handles them for all roles.

        uvicorn's SIGTERM/SIGINT handlers would stop the intake alone, then re-raise the signal and
        kill the process.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    settings = console.settings(require_cegid_key=True)
    log.configure(settings.log_level)
    await console.check_secret_key(settings)
    stop = asyncio.Event()
    console.stop_on_signals(stop)
    from relay.edge import serve

    uv_options = {**serve.options(settings), "timeout_graceful_shutdown": 10}
    server = Server(uvicorn.Config(app.create_app(settings, command="run"), **uv_options))
    progress, work = consume.Progress(), heartbeat.Work()

    async def consuming() -> None:
        async with heartbeat.beating(settings, "consume", command="run", consumer=progress):
            await consume.consume(settings, stop=stop, progress=progress)

    async def scheduling(pool: Any) -> None:
        async with heartbeat.beating(settings, "scheduler", command="run", work=work):
            await scheduler.run_forever(settings, pool, stop=stop, progress=work)

    async with console.pool(settings) as pool:
        roles = {  # the intake's heartbeat is its application's (relay.app)
            asyncio.create_task(_serve(server), name="intake"): "intake",
            asyncio.create_task(consuming(), name="consume"): "consume",
            asyncio.create_task(scheduling(pool), name="scheduler"): "scheduler",
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
    return console.EXIT_FAILED if failed or late else console.EXIT_OK


class RunRoleError(errors.RelayError):
    """A role of ``relay run`` could not run."""


async def _serve(server: Any) -> None:
    """Run uvicorn's serve(), its ``sys.exit`` at a failed start turned into the role's error."""
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
        raise console.UsageError(
            "relay flush needs --now (the daily flush is run by `relay scheduler` at RELAY_FLUSH_AT)"
        )
    settings = console.settings(require_cegid_key=True)
    log.configure(settings.log_level)
    work = heartbeat.Work()
    async with heartbeat.beating(settings, "flush", work=work):
        report = await flusher.run_once(settings, connection_id=args.connection, since=args.since)
        work.add(report.totals()["uploaded"])
    if args.json:
        console.emit_json(report.to_json())
    else:
        print(report.render())
    return console.EXIT_OK if report.exit_code == 0 else console.EXIT_FAILED


async def cmd_demo(args: argparse.Namespace) -> int:
    from relay.cli import demo

    if args.web:
        return await demo.run_web(keep=args.keep)
    return await demo.run(json_output=args.json, keep=args.keep)
