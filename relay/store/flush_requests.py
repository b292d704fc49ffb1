"""The ``flush_requests`` table, flushes asked for over HTTP and run later by a scheduler."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any, Self

import asyncpg

from relay import models
from relay.store import db, queries

Source = asyncpg.Pool | db.Conn


@dataclasses.dataclass(frozen=True, slots=True)
class FlushRequest:
    """One flush asked for, with its scope, who asked, and (once a scheduler took it) its run."""

    id: int
    connection_id: uuid.UUID | None
    since: dt.datetime | None
    requested_by: str
    requested_at: dt.datetime
    started_at: dt.datetime | None
    run_id: int | None
    finished_at: dt.datetime | None
    outcome: str | None
    error: str | None

    @classmethod
    def from_record(cls, record: models.Row) -> Self:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})

    @property
    def state(self) -> str:
        """Say where the request is (``waiting``, ``running``, ``finished`` or ``failed``)."""
        if self.finished_at is not None:
            return self.outcome or "finished"
        return "running" if self.started_at is not None else "waiting"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "connection_id": str(self.connection_id) if self.connection_id else None,
            "since": self.since.isoformat() if self.since else None,
            "requested_by": self.requested_by,
            "requested_at": self.requested_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "run_id": self.run_id,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "error": self.error,
        }


async def insert(
    source: Source,
    *,
    connection_id: uuid.UUID | None,
    since: dt.datetime | None,
    requested_by: str,
) -> FlushRequest:
    """Record a request, announced to the schedulers by a trigger (``relay_flush_requested``)."""
    with db.translate("ask for a flush"):
        record = await source.fetchrow(
            queries.get("insert_flush_request"), connection_id, since, requested_by
        )
    assert record is not None  # INSERT ... RETURNING always returns the row
    return FlushRequest.from_record(record)


async def get(source: Source, request_id: int) -> FlushRequest | None:
    with db.translate("read flush request"):
        record = await source.fetchrow(queries.get("get_flush_request"), request_id)
    return None if record is None else FlushRequest.from_record(record)


async def next_open(source: Source) -> FlushRequest | None:
    """Read the oldest request not finished (under the scheduler's lock)."""
    with db.translate("next flush request"):
        record = await source.fetchrow(queries.get("next_flush_request"))
    return None if record is None else FlushRequest.from_record(record)


async def any_open(source: Source) -> bool:
    with db.translate("look for flush requests"):
        return bool(await source.fetchval(queries.get("any_open_flush_request")))


async def start(source: Source, request_id: int, run_id: int) -> list[int]:
    """Link the request and every open one like it to ``run_id``, returning their ids."""
    with db.translate("start flush request"):
        records = await source.fetch(queries.get("start_flush_requests"), request_id, run_id)
    return [int(r["id"]) for r in records]


async def finish(source: Source, run_id: int, *, error: str | None) -> None:
    """Finish the requests served by ``run_id`` as finished, or as failed with ``error``."""
    with db.translate("finish flush requests"):
        await source.execute(
            queries.get("finish_flush_requests"),
            run_id,
            "failed" if error else "finished",
            error,
        )


async def list_open(source: Source) -> list[FlushRequest]:
    with db.translate("list flush requests"):
        records = await source.fetch(queries.get("list_open_flush_requests"))
    return [FlushRequest.from_record(r) for r in records]
