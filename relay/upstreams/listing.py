"""Qonto's list walks, bringing every item of a paged list once even while items change.

Offset pages shift under updates, so a plain walk of pages loses items. Keyset walks by
``updated_at`` (:func:`keyset`) serve where the sort is documented, settled offset passes
(:func:`settled`) where it is not; each takes a :data:`FetchPage` from :mod:`relay.upstreams.qonto`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from relay import errors, log

logger = log.get(__name__)

PER_PAGE: Final = 100
# a cursor starts this much before the newest updated_at read, in case `from` is exclusive or rounded
CURSOR_OVERLAP: Final = dt.timedelta(seconds=1)
MAX_LIST_PASSES: Final = 10  # walks of one run of pages before it counts as unavailable


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next_page: int | None  # None on the last page
    full: bool  # as many items as asked for
    total: int | None  # meta.total_count, when Qonto sends it


# One page of a list: (the query's parameters, the page number) -> the page, or None when Qonto
# answered that page is past the end. relay.upstreams.qonto makes it (the boundary where httpx and
# Qonto's errors become the relay's).
FetchPage = Callable[[dict[str, Any], int], Awaitable[Page | None]]


_MISSING: Final = object()
_MOVED: Final = object()


def _updated_at(item: dict[str, Any]) -> dt.datetime | None:
    value = item.get("updated_at")
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _ascending(items: list[dict[str, Any]]) -> bool:
    stamps = [u for u in map(_updated_at, items) if u is not None]
    return all(a <= b for a, b in itertools.pairwise(stamps))


def _next_cursor(
    items: list[dict[str, Any]], cursor: dt.datetime, seen: dict[str, dt.datetime | None]
) -> dt.datetime | None:
    """Find where the next page 1 starts, or None when the cursor should stay.

    It is the page's newest ``updated_at`` minus the overlap, when that moves the cursor and
    re-reads at most half a page of items already seen.
    """
    newest = max((u for u in map(_updated_at, items) if u is not None), default=None)
    if newest is None or newest - CURSOR_OVERLAP <= cursor:
        return None
    target = newest - CURSOR_OVERLAP
    again = sum(1 for u in seen.values() if u is not None and u >= target)
    return target if again <= PER_PAGE // 2 else None


def stamp(moment: dt.datetime, *, up: bool = False) -> str:
    """Write ``moment`` in UTC with milliseconds, as Qonto shows them.

    It is cut down for a lower bound and rounded ``up`` for an upper one, so that neither bound
    leaves out an item stamped within its millisecond.
    """
    moment = moment.astimezone(dt.UTC)
    if up and moment.microsecond % 1000:
        moment += dt.timedelta(microseconds=1000 - moment.microsecond % 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_page(body: dict[str, Any], key: str, page: int, what: str) -> Page:
    """Read page ``page`` of a list from Qonto's answer (its items under ``key``, its ``meta``)."""
    raw = body.get(key)
    if not isinstance(raw, list):
        raise errors.QontoProtocolError(f"Qonto {what}: answer without {key!r}")
    meta = body.get("meta")
    if not isinstance(meta, dict):
        meta = {}
    following: int | None = None
    if meta.get("next_page") and raw:
        try:
            following = int(meta["next_page"])
        except (TypeError, ValueError):
            following = 0
        if following <= page:
            raise errors.QontoProtocolError(
                f"Qonto {what}: next_page {meta['next_page']!r} after page {page}"
            )
    total = meta.get("total_count")
    return Page(
        items=[i for i in raw if isinstance(i, dict) and i.get("id")],
        next_page=following,
        full=len(raw) >= PER_PAGE,
        total=total if isinstance(total, int) and not isinstance(total, bool) else None,
    )


async def keyset(
    fetch: FetchPage,
    params: dict[str, Any],
    from_key: str,
    start: dt.datetime,
    what: str,
) -> AsyncIterator[dict[str, Any]]:
    """Yield each item of a list sorted by ascending ``updated_at`` once, however items change.

    Offset pages alone lose items: one updated after its page was read leaves the window (or
    moves to its end) and every later item shifts up a place, so one is never listed. Here each
    request restarts at page 1 from a cursor ``from_key = cursor``; after a full page the cursor
    moves to the page's greatest ``updated_at`` minus ``CURSOR_OVERLAP`` (``from`` may be
    exclusive or rounded). Items only move to later ``updated_at``, so none can slip behind it.

    When the cursor cannot move, or moving it would re-read more than half a page of items
    already seen (that many share timestamps within the overlap, as after a bulk import), the
    walk follows ``next_page`` for the same cursor instead. Those pages are offsets again, so
    such a run is checked: ``meta.total_count`` changing between its pages, or an item of it
    seen again with a new ``updated_at``, means something moved, and the run is walked again
    from its page 1 at once. Without ``total_count`` (only ``next_page`` is documented), and
    after a 422 that followed a full page (past the end, or the list shrank under us: a 422 is
    not taken for the end at once any more), nothing vouches for the run: it is walked again
    until a pass brings nothing new. At most ``MAX_LIST_PASSES`` re-walks of one run, then
    QontoUnavailable, so the caller keeps its watermark. A page 1 right after a move that
    brings nothing new means the filter is not narrowing the list, and a page out of
    ``updated_at`` order that the sort is ignored: either way the cursor stops moving.

    Requests: one per page, plus at most half a page re-read per cursor move; a run of pages
    costs one more walk per change seen in it or, without ``total_count``, at least one more.
    """
    walk = _Walk(what, start)
    while True:
        got = await fetch({**params, from_key: stamp(walk.cursor)}, walk.page)
        target: dt.datetime | None = None
        if got is None:
            walk.past_the_end()
        else:
            fresh = walk.take(got)
            for item in fresh:
                yield item
            walk.vouch(got)
            walk.check_cursor(got, len(fresh))
            target = walk.target(got)
            if walk.follow(got, target):
                continue
        if not walk.end_run(target):
            return


@dataclasses.dataclass
class _Run:
    """One run of pages from page 1 at one cursor, what it brought and whether it can be trusted."""

    new: int = 0  # items never seen before
    total: int | None = None  # meta.total_count of its page 1
    previous_full: bool = False  # the page before the one being read was full
    drifted: bool = False  # an item surely moved while it was read: walk it again
    unsure: bool = False  # nothing vouches for its later pages


@dataclasses.dataclass
class _Walk:
    """The state of one :func:`keyset` walk, each of its steps a method."""

    what: str
    cursor: dt.datetime
    page: int = 1
    seen: dict[str, dt.datetime | None] = dataclasses.field(default_factory=dict)
    passes: int = 0  # re-walks of the current run
    moves: bool = True  # the cursor narrows the list: it may move
    after_move: bool = False  # the page being read is the first one after a move
    run: _Run = dataclasses.field(default_factory=_Run)

    def past_the_end(self) -> None:
        """Take Qonto's 422 for this page as doubt on the run when the page before was full.

        Then the list shrank under us or ``next_page`` lied, so the run is unsure.
        """
        self.run.unsure = self.run.unsure or self.run.previous_full

    def take(self, got: Page) -> list[dict[str, Any]]:
        """Record the page's items and return those never seen before, to be listed.

        An item seen before with a new ``updated_at``, on a later page of this run, moved: the run
        drifted.
        """
        fresh = []
        for item in got.items:
            item_id, updated = str(item["id"]), _updated_at(item)
            if item_id not in self.seen:
                self.seen[item_id] = updated
                fresh.append(item)
            elif self.seen[item_id] != updated:
                before, self.seen[item_id] = self.seen[item_id], updated
                if self.page > 1 and (before is None or before >= self.cursor):
                    self.run.drifted = True
        self.run.new += len(fresh)
        return fresh

    def vouch(self, got: Page) -> None:
        """Compare the page's ``total_count`` with page 1's to judge the run.

        Changed, something left the window between two pages (drifted); missing after a full page,
        nothing vouches (unsure).
        """
        run = self.run
        if self.page == 1:
            run.total = got.total
        elif run.previous_full and (got.total is None or run.total is None):
            run.unsure = True
        elif run.previous_full and got.total != run.total:
            run.drifted = True

    def check_cursor(self, got: Page, fresh: int) -> None:
        """Stop moving the cursor when it does not narrow the list or when the sort is ignored.

        A page 1 after a move that brings nothing new shows the first; a page out of
        ``updated_at`` order, the second.
        """
        if self.after_move and fresh == 0 and got.next_page is not None:
            self.moves = False  # follow pages from now on
        self.after_move = False
        if self.moves and not _ascending(got.items):
            self.moves = False  # a cursor would skip what comes later
            logger.warning("qonto_list_unsorted", call=self.what)

    def target(self, got: Page) -> dt.datetime | None:
        """Find where the cursor moves after this page, when there is more and it may move."""
        if got.next_page is None or self.run.drifted or not self.moves:
            return None
        return _next_cursor(got.items, self.cursor, self.seen)

    def follow(self, got: Page, target: dt.datetime | None) -> bool:
        """Go on to the run's next page when there is one, nothing drifted and the cursor stays."""
        if got.next_page is None or self.run.drifted or target is not None:
            return False
        self.page, self.run.previous_full = got.next_page, got.full
        return True

    def end_run(self, target: dt.datetime | None) -> bool:
        """Close the run of pages, then walk it again, move to ``target`` or end the walk (False).

        The run is walked again when it drifted, or when it is unsure and brought something new.
        """
        if self.run.drifted or (self.run.unsure and self.run.new > 0):
            self.passes += 1
            if self.passes > MAX_LIST_PASSES:
                raise errors.QontoUnavailable(
                    f"Qonto {self.what}: the list kept changing over {MAX_LIST_PASSES} re-walks"
                )
            logger.info(
                "qonto_list_rewalked", call=self.what, passes=self.passes, drifted=self.run.drifted
            )
            target = self.cursor
        elif target is None:
            return False
        else:
            self.after_move, self.passes = True, 0
        self.cursor, self.page, self.run = target, 1, _Run()
        return True


async def settled(
    fetch: FetchPage, params: dict[str, Any], what: str
) -> AsyncIterator[dict[str, Any]]:
    """Yield each item of a list whose order is not documented once, by whole offset passes.

    Passes are repeated until one finds every item of the previous one, unchanged. Without a
    documented sort no cursor can be trusted, so this walks pages and checks instead: an item
    that changed or left during a pass may have shifted another out of it, and shows in the next
    pass as missing or with a new ``updated_at``. A pass that finds every item of the one before,
    unchanged, proves nothing shifted during that one, which was therefore complete. A list read
    whole on page 1 needs no second pass. At most ``MAX_LIST_PASSES`` passes, then
    QontoUnavailable (the caller keeps its watermark).
    """
    yielded: set[str] = set()
    previous: dict[str, object] | None = None
    for _ in range(MAX_LIST_PASSES):
        current: dict[str, object] = {}
        page, whole = 1, False
        while True:
            got = await fetch(params, page)
            if got is None:
                break
            for item in got.items:
                item_id, stamp = str(item["id"]), item.get("updated_at")
                if current.setdefault(item_id, stamp) != stamp:
                    current[item_id] = _MOVED  # changed during this very pass
                if item_id not in yielded:
                    yielded.add(item_id)
                    yield item
            if got.next_page is None:
                whole = page == 1
                break
            page = got.next_page
        if whole or (
            previous is not None
            and all(
                stamp is not _MOVED and current.get(i, _MISSING) == stamp
                for i, stamp in previous.items()
            )
        ):
            return
        if previous is not None:
            logger.info("qonto_list_rewalked", call=what, items=len(current))
        previous = current
    raise errors.QontoUnavailable(
        f"Qonto {what}: the list kept changing over {MAX_LIST_PASSES} passes"
    )
