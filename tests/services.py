"""The real PostgreSQL and RabbitMQ, stopped, restarted and cut under the relay by the fault tests.

A restart breaks every test beside it, so the services are guarded by a lock file, held around each
test: shared by integration tests, exclusively by fault tests (``make test`` runs those in a serial
step of their own). Every fault is undone in the fixture's ``finally``: both services are
started again and waited for until they answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import IO

import aio_pika
import asyncpg
import pytest

LOCK_PATH = pathlib.Path(tempfile.gettempdir()) / "relay-tests-services.lock"
GATE_PATH = pathlib.Path(tempfile.gettempdir()) / "relay-tests-services.gate"
# the seconds each test of this process waited for the lock (other sessions' fault tests)
WAITED = pytest.StashKey[list[float]]()
PG_ADMIN_DSN = os.environ.get("RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ANSWER_WITHIN_S = 90.0
_REPAIR_QUORUM_QUEUES = """
Sup = case whereis(rabbit_fifo_dlx_sup) of
    undefined -> supervisor:restart_child(rabbit_sup, rabbit_fifo_dlx_sup), 1;
    _ -> 0
end,
Restarted = [Q || Q <- rabbit_amqqueue:list(), amqqueue:get_type(Q) =:= rabbit_quorum_queue,
                  ra:restart_server(quorum_queues, amqqueue:get_pid(Q)) =:= ok],
Sup + length(Restarted).
"""


class Lock:
    """The services lock of one test process, held around each test: shared by ordinary
    integration tests, exclusively by a fault test. A gate beside it keeps new shared holders
    waiting while a fault test waits or runs, so a stream of ordinary tests from other sessions
    cannot starve the fault tests, and those take turns with them test by test. A fault test that
    has waited ``gate_hold_s`` (longer than a test may last) opens the gate for ``gate_open_s``
    before closing it again: a holder that keeps the lock far longer (a stuck test, a whole
    session holding it) then stops the fault tests only, not every test of every checkout."""

    def __init__(
        self,
        path: pathlib.Path = LOCK_PATH,
        gate: pathlib.Path = GATE_PATH,
        *,
        gate_hold_s: float = 150.0,
        gate_open_s: float = 20.0,
    ) -> None:
        self.kind: str | None = None  # "shared" or "fault": one kind per session
        self._held = False
        self._path = path
        self._gate = gate
        self._gate_hold_s = gate_hold_s
        self._gate_open_s = gate_open_s

    def _session(self, kind: str) -> None:
        if self.kind not in (None, kind):
            pytest.fail(
                "fault tests restart the services and must run apart from the other tests: "
                "`pytest -m fault` on its own (make test does)",
                pytrace=False,
            )
        self.kind = kind

    @contextlib.contextmanager
    def held(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the lock for the block (nothing more when this process holds it already)."""
        self._session("fault" if exclusive else "shared")
        if self._held:
            yield
            return
        with self._gate.open("a") as gate, self._path.open("a") as handle:
            fcntl.flock(gate, fcntl.LOCK_EX)
            if exclusive:  # the gate stays closed until the test ends
                while not _taken_within(handle, self._gate_hold_s):
                    fcntl.flock(gate, fcntl.LOCK_UN)
                    time.sleep(self._gate_open_s)
                    fcntl.flock(gate, fcntl.LOCK_EX)
            else:
                fcntl.flock(handle, fcntl.LOCK_SH)
                fcntl.flock(gate, fcntl.LOCK_UN)
            self._held = True
            try:
                yield
            finally:
                self._held = False
                fcntl.flock(handle, fcntl.LOCK_UN)


def _taken_within(handle: IO[str], within_s: float) -> bool:
    """Take ``handle``'s lock exclusively if it comes free within ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


async def _run(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}: {text.strip()}")
    return text


def _postgres_version() -> str | None:
    base = pathlib.Path("/etc/postgresql")
    versions = (
        sorted(
            (p.parent.name for p in base.glob("*/main")),
            key=lambda v: [int(x) for x in v.split(".") if x.isdigit()],
        )
        if base.exists()
        else []
    )
    return versions[-1] if versions else None


def missing_tools() -> list[str]:
    """What this machine lacks to restart the services (empty when it can)."""
    missing = [tool for tool in ("rabbitmqctl", "pg_ctlcluster") if shutil.which(tool) is None]
    if shutil.which("pg_ctlcluster") and _postgres_version() is None:
        missing.append("a local PostgreSQL cluster under /etc/postgresql")
    if os.geteuid() != 0:
        missing.append("root (rabbitmqctl and pg_ctlcluster act on the system's services)")
    return missing


class Services:
    """Faults on the machine's own PostgreSQL and RabbitMQ (async: in-process roles keep running)."""

    def __init__(self) -> None:
        version = _postgres_version()
        assert version is not None
        self._pg = ("pg_ctlcluster", "--skip-systemctl-redirect", version, "main")
        self.injected: dict[str, int] = {}
        self._rabbitmq_stopped = False

    def _count(self, fault: str) -> None:
        self.injected[fault] = self.injected.get(fault, 0) + 1

    # RabbitMQ ------------------------------------------------------------------------------

    async def rabbitmq_stop(self) -> None:
        """Stop the broker application (the node stays up): every connection is cut."""
        self._count("rabbitmq_stopped")
        self._rabbitmq_stopped = True
        await _run("rabbitmqctl", "-q", "stop_app")

    async def rabbitmq_start(self) -> None:
        await _run("rabbitmqctl", "-q", "start_app")
        await self.rabbitmq_answers(clean=2)

    async def rabbitmq_restart(self, down_s: float = 0.0) -> None:
        await self.rabbitmq_stop()
        await asyncio.sleep(down_s)
        await self.rabbitmq_start()

    async def rabbitmq_close_connections(self) -> None:
        """RabbitMQ closes every client connection (the broker itself stays up)."""
        self._count("rabbitmq_connections_closed")
        await _run("rabbitmqctl", "-q", "close_all_connections", "closed by a fault test")

    async def rabbitmq_answers(self, within_s: float = ANSWER_WITHIN_S, *, clean: int = 0) -> None:
        """Wait until a client can connect and declare a quorum queue with at-least-once
        dead-lettering, as the relay's topology does, and (after a restart) ``clean`` passes of
        :meth:`_quorum_queues_repaired` in a row found nothing to repair."""
        deadline = time.monotonic() + within_s
        passes = 0
        while True:
            try:
                repaired = await self._quorum_queues_repaired() if clean else 0
                connection = await aio_pika.connect(AMQP_URL, timeout=2)
                async with connection:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(
                        f"relay-tests-ready-{os.getpid()}",
                        durable=True,
                        arguments={
                            "x-queue-type": "quorum",
                            "x-dead-letter-exchange": "",
                            "x-dead-letter-strategy": "at-least-once",
                            "x-overflow": "reject-publish",
                        },
                    )
                    await queue.delete(if_unused=False, if_empty=False)
                passes = 0 if repaired else passes + 1
                if passes >= clean:
                    self._rabbitmq_stopped = False
                    return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"RabbitMQ did not answer within {within_s} s") from exc
                passes = 0
                await asyncio.sleep(0.2)

    async def _quorum_queues_repaired(self) -> int:
        """Work around RabbitMQ 3.10 coming back from start_app with quorum queues that cannot
        start: their members elect a leader before the supervisor of the dead-letter workers is
        up (``rabbit_fifo_dlx_sup`` noproc), crash until their own supervisor gives up, and that
        supervisor may stay down, so every queue with at-least-once dead-lettering is then refused
        (INTERNAL_ERROR; rabbitmq-server#16652 is the same weakness). Restart what is down; how
        many things were."""
        out = await _run("rabbitmqctl", "eval", _REPAIR_QUORUM_QUEUES)
        digits = out.strip().splitlines()[-1] if out.strip() else ""
        return int(digits) if digits.isdigit() else 0

    # PostgreSQL ----------------------------------------------------------------------------

    async def postgres_stop(self) -> None:
        """Stop the cluster (fast mode: every session is terminated)."""
        self._count("postgres_stopped")
        await _run(*self._pg, "stop", "-m", "fast")

    async def postgres_start(self) -> None:
        await _run(*self._pg, "start")
        await self.postgres_answers()

    async def postgres_restart(self, down_s: float = 0.0) -> None:
        await self.postgres_stop()
        await asyncio.sleep(down_s)
        await self.postgres_start()

    async def postgres_terminate(self, database: str) -> int:
        """Terminate every backend connected to ``database`` (the server stays up)."""
        self._count("postgres_backends_terminated")
        admin = await asyncpg.connect(f"{PG_ADMIN_DSN.rstrip('/')}/postgres", timeout=5)
        try:
            return int(
                await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database,
                )
            )
        finally:
            await admin.close()

    async def postgres_answers(self, within_s: float = ANSWER_WITHIN_S) -> None:
        deadline = time.monotonic() + within_s
        while True:
            try:
                conn = await asyncpg.connect(f"{PG_ADMIN_DSN.rstrip('/')}/postgres", timeout=2)
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    await conn.close()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"PostgreSQL did not answer within {within_s} s") from exc
                await asyncio.sleep(0.2)

    async def restore(self) -> None:
        """Both services started (whatever a test left) and answering."""
        with contextlib.suppress(RuntimeError):
            await _run("rabbitmqctl", "-q", "start_app")
        with contextlib.suppress(RuntimeError):
            await _run(*self._pg, "start")
        await self.rabbitmq_answers(clean=2 if self._rabbitmq_stopped else 0)
        await self.postgres_answers()


@contextlib.asynccontextmanager
async def faults() -> AsyncIterator[Services]:
    """Services to break, restored and answering again afterwards, whatever happened."""
    missing = missing_tools()
    if missing:
        pytest.fail(
            "the fault tests restart the real PostgreSQL and RabbitMQ, and this machine lacks "
            f"{', '.join(missing)}: they cannot run here (they fail rather than skip)",
            pytrace=False,
        )
    services = Services()
    try:
        yield services
    finally:
        await services.restore()
