"""List walks that items change under (relay/upstreams/listing.py), against a fake list at the HTTP level.

The fake recomputes its list for every page, as offset pagination over a live table does: an item
updated after its page was read leaves the window (or moves to its end) and every later item shifts
up one place. The old offset walk lost one item each time; these walks must list every item once.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay import config, errors
from relay.domain import credentials
from relay.upstreams import listing, qonto
from tests.unit import clients

API_KEY = credentials.QontoApiKey(login="org-login", secret=config.Secret("org-secret-key"))
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
LATER = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)  # an update during the walk: past the window


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


class FakeList:
    """One Qonto list endpoint: filtered by the update window, sorted by ``updated_at``, paged by
    offset, recomputed for every request; ``hooks[n]`` runs after the n-th list request."""

    def __init__(self, key: str, from_key: str, to_key: str | None, *, totals: bool = True) -> None:
        self.key, self.from_key, self.to_key, self.totals = key, from_key, to_key, totals
        self.items: dict[str, dict[str, Any]] = {}
        self.asked: list[dict[str, str]] = []
        self.hooks: dict[int, Callable[[], object]] = {}
        self.lie_about_next_page = False  # answer next_page = page + 1 even on the last page
        self.newest_first = False  # ignore sort_by=updated_at:asc

    def add(
        self, count: int, *, start: dt.datetime, step: dt.timedelta, **fields: Any
    ) -> list[str]:
        ids = []
        for n in range(count):
            item_id = f"item-{len(self.items):04d}"
            self.items[item_id] = {"id": item_id, "updated_at": _iso(start + n * step), **fields}
            ids.append(item_id)
        return ids

    def touch(self, item_id: str, at: dt.datetime = LATER) -> None:
        self.items[item_id]["updated_at"] = _iso(at)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        params = {k: v[0] for k, v in urllib.parse.parse_qs(request.url.query.decode()).items()}
        self.asked.append(params)
        low = _parse(params.get(self.from_key))
        high = _parse(params.get(self.to_key)) if self.to_key else None
        found = sorted(
            (
                i
                for i in self.items.values()
                if (low is None or _parse(i["updated_at"]) >= low)  # type: ignore[operator]
                and (high is None or _parse(i["updated_at"]) <= high)  # type: ignore[operator]
                and params.get("filter[status]", i.get("status")) == i.get("status")
            ),
            key=lambda i: str(i["updated_at"]),
            reverse=self.newest_first,
        )
        page, per_page = int(params["page"]), int(params["per_page"])
        pages = max(1, -(-len(found) // per_page))
        if page > pages:
            response = httpx.Response(422, json={"errors": [{"code": "invalid_parameter"}]})
        else:
            last = page == pages and not self.lie_about_next_page
            meta: dict[str, Any] = {"current_page": page, "next_page": None if last else page + 1}
            if self.totals:
                meta |= {"total_pages": pages, "total_count": len(found), "per_page": per_page}
            response = httpx.Response(
                200, json={self.key: found[(page - 1) * per_page : page * per_page], "meta": meta}
            )
        hook = self.hooks.pop(len(self.asked), None)
        if hook is not None:
            hook()
        return response


def _client(settings: config.Settings, fake: FakeList) -> qonto.QontoClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/organization":
            accounts = [{"id": "acc-1"}]
            return httpx.Response(200, json={"organization": {"bank_accounts": accounts}})
        return fake(request)

    return clients.qonto_client(settings, handler, creds=API_KEY)


def _supplier_invoices(**kwargs: Any) -> FakeList:
    return FakeList(
        "supplier_invoices", "filter[updated_at_from]", "filter[updated_at_to]", **kwargs
    )


def _pages(count: int) -> int:
    return -(-count // listing.PER_PAGE)


async def _walk(client: qonto.QontoClient, source: str) -> list[str]:
    found = [str(i["id"]) async for i in getattr(client, source)(T0, T1)]
    assert len(found) == len(set(found)), "an item was yielded twice"
    return found


# ------------------------------------------------------------------------------------ keyset


async def test_an_invoice_updated_mid_walk_does_not_hide_another(
    unit_settings: config.Settings,
) -> None:
    """150 invoices 3 s apart, one of page 1 updated after page 1 was read: all 150 listed, in
    pages + 1 requests, each from page 1 of a cursor one second before the last page's newest."""
    fake = _supplier_invoices()
    ids = fake.add(150, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=3))
    fake.hooks[1] = lambda: fake.touch(ids[10])
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert len(fake.asked) <= _pages(150) + 1
    assert all(asked["page"] == "1" for asked in fake.asked)
    newest_on_page_1 = T0 + dt.timedelta(hours=1, seconds=3 * 99)
    assert fake.asked[1]["filter[updated_at_from]"] == listing.stamp(
        newest_on_page_1 - listing.CURSOR_OVERLAP
    )
    assert fake.asked[1]["filter[updated_at_to]"] == "2026-11-02T00:00:00.000Z"


async def test_a_transaction_updated_mid_walk_does_not_hide_another(
    unit_settings: config.Settings,
) -> None:
    """The same for transactions: updated_at_from is the cursor, every one of 250 is listed once."""
    fake = FakeList("transactions", "updated_at_from", "updated_at_to")
    ids = fake.add(250, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=2))
    fake.hooks[1] = lambda: fake.touch(ids[0])
    fake.hooks[2] = lambda: fake.touch(ids[150])
    assert sorted(await _walk(_client(unit_settings, fake), "transactions")) == ids
    assert len(fake.asked) <= _pages(250) + 1
    assert {asked["bank_account_id"] for asked in fake.asked} == {"acc-1"}


async def test_many_invoices_sharing_one_updated_at_are_walked_by_page_number(
    unit_settings: config.Settings,
) -> None:
    """250 invoices with one updated_at (the cursor cannot move): pages 1, 2, 3 of one cursor."""
    fake = _supplier_invoices()
    ids = fake.add(250, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(0))
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert [a["page"] for a in fake.asked] == ["1", "2", "3"]
    assert len({a["filter[updated_at_from]"] for a in fake.asked}) == 1


async def test_an_update_among_invoices_sharing_one_updated_at_is_caught(
    unit_settings: config.Settings,
) -> None:
    """250 invoices with one updated_at, one of page 1 updated after it was read: total_count
    drops on page 2, the run is walked again at once, none is lost; pages + 2 requests."""
    fake = _supplier_invoices()
    ids = fake.add(250, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(0))
    fake.hooks[1] = lambda: fake.touch(ids[3])
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert [a["page"] for a in fake.asked] == ["1", "2", "1", "2", "3"]
    assert len(fake.asked) <= _pages(250) + 2


async def test_without_total_count_a_run_of_pages_is_walked_until_it_brings_nothing_new(
    unit_settings: config.Settings,
) -> None:
    """No total_count to vouch for offset pages: the run is walked again while a pass brings new
    items (pass 2 lists the shifted one, pass 3 nothing); with nothing updated, once more only."""
    fake = _supplier_invoices(totals=False)
    ids = fake.add(250, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(0))
    fake.hooks[1] = lambda: fake.touch(ids[3])
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert [a["page"] for a in fake.asked] == ["1", "2", "3"] * 3

    quiet = _supplier_invoices(totals=False)
    ids = quiet.add(250, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(0))
    assert sorted(await _walk(_client(unit_settings, quiet), "supplier_invoices")) == ids
    assert len(quiet.asked) == 2 * _pages(250)


@pytest.mark.parametrize("totals", [True, False], ids=["total_count", "no_total_count"])
async def test_many_bulks_cost_a_bounded_number_of_requests(
    unit_settings: config.Settings, totals: bool
) -> None:
    """Twelve bulks of 150 sharing an instant each: all 1,800 listed; with total_count, pages
    plus one per bulk (half a page re-read when the cursor moves past it); without, every bulk's
    run is walked twice (nothing vouches for it) and the re-walk budget is per run, not per list."""
    fake = _supplier_invoices(totals=totals)
    ids: list[str] = []
    for hour in range(12):
        ids += fake.add(150, start=T0 + dt.timedelta(hours=hour + 1), step=dt.timedelta(0))
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    bound = _pages(1800) + 12
    assert len(fake.asked) <= (bound if totals else 2 * bound)


async def test_a_bulk_update_in_the_middle_of_spread_invoices_is_walked_through(
    unit_settings: config.Settings,
) -> None:
    """Spread invoices around a bulk of 180 sharing one instant, updates on the way: all listed;
    each update inside the bulk costs one more walk of the bulk's pages (three), no more."""
    fake = _supplier_invoices()
    ids = fake.add(120, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=5))
    ids += fake.add(180, start=T0 + dt.timedelta(hours=2), step=dt.timedelta(0))
    ids += fake.add(120, start=T0 + dt.timedelta(hours=3), step=dt.timedelta(seconds=5))
    for n, victim in ((1, 5), (3, 130), (4, 200), (6, 310)):
        fake.hooks[n] = lambda victim=victim: fake.touch(ids[victim])
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert len(fake.asked) <= _pages(420) + 2 + 2 * 3


async def test_a_422_after_a_full_page_is_not_taken_for_the_end_at_once(
    unit_settings: config.Settings,
) -> None:
    """next_page never null and a 422 past the end, after an update shrank the list: the run is
    walked again before the 422 counts as its end, so the item shifted onto page 1 is listed
    (pass 2), and the 422 ends the walk once a pass brings nothing new (pass 3)."""
    fake = _supplier_invoices(totals=False)
    fake.lie_about_next_page = True
    ids = fake.add(200, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(0))
    fake.hooks[1] = lambda: fake.touch(ids[0])
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert [a["page"] for a in fake.asked] == ["1", "2", "3"] * 3


async def test_a_list_that_never_settles_is_unavailable_not_truncated(
    unit_settings: config.Settings,
) -> None:
    """An update after every page of a shared-instant bulk: QontoUnavailable (the scan keeps its
    watermark and retries next run) after MAX_LIST_PASSES re-walks, never a quiet end."""
    fake = _supplier_invoices()
    ids = fake.add(300, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(0))
    for n in range(1, 200):
        fake.hooks[n] = lambda n=n: fake.touch(ids[n % 100], at=LATER + dt.timedelta(seconds=n))
    with pytest.raises(errors.QontoUnavailable, match="kept changing"):
        await _walk(_client(unit_settings, fake), "supplier_invoices")
    assert len(fake.asked) < 200


async def test_a_server_ignoring_the_cursor_costs_no_more_than_its_pages(
    unit_settings: config.Settings,
) -> None:
    """updated_at_from ignored: the first move brings nothing new, the walk then follows pages."""
    fake = FakeList("supplier_invoices", "not-a-filter", "filter[updated_at_to]")
    ids = fake.add(500, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=3))
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert len(fake.asked) <= _pages(500) + 2


async def test_a_server_ignoring_the_sort_is_walked_by_page_number(
    unit_settings: config.Settings,
) -> None:
    """Newest first despite sort_by: page 1 is out of order, so the cursor never moves past the
    older invoices still to come; pages are followed and all 250 are listed."""
    fake = _supplier_invoices()
    fake.newest_first = True
    ids = fake.add(250, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=3))
    assert sorted(await _walk(_client(unit_settings, fake), "supplier_invoices")) == ids
    assert [a["page"] for a in fake.asked] == ["1", "2", "3"]


# ------------------------------------------------------------------------------------ settled


async def test_a_client_invoice_updated_mid_walk_does_not_hide_another(
    unit_settings: config.Settings,
) -> None:
    """No sort is documented: offset passes until one confirms the previous. 150 unpaid invoices,
    one moved to the end after page 1: all listed once; filter[updated_at_to] is never sent."""
    fake = FakeList("client_invoices", "filter[updated_at_from]", None)
    ids = fake.add(
        150, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=1), status="unpaid"
    )
    fake.hooks[1] = lambda: fake.touch(ids[10])
    assert sorted(await _walk(_client(unit_settings, fake), "client_invoices")) == ids
    assert all("filter[updated_at_to]" not in a for a in fake.asked)
    unpaid = [a for a in fake.asked if a["filter[status]"] == "unpaid"]
    assert len(unpaid) == 3 * _pages(150)  # the moved one is seen changed by pass 2: pass 3 settles


async def test_a_client_invoice_leaving_its_status_mid_walk_does_not_hide_another(
    unit_settings: config.Settings,
) -> None:
    """An unpaid invoice paid after page 1 leaves the unpaid list: the next pass lists the one
    that shifted onto page 1; the paid one is listed by the paid walk."""
    fake = FakeList("client_invoices", "filter[updated_at_from]", None)
    ids = fake.add(
        130, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=1), status="unpaid"
    )

    def pay() -> None:
        fake.items[ids[0]]["status"] = "paid"
        fake.touch(ids[0])

    fake.hooks[1] = pay
    client = _client(unit_settings, fake)
    found = [(str(i["id"]), i["status"]) async for i in client.client_invoices(T0, T1)]
    assert sorted(i for i, status in found if status == "unpaid") == ids
    assert [i for i, status in found if status == "paid"] == [ids[0]]


async def test_client_invoices_read_whole_on_page_1_take_one_request_per_status(
    unit_settings: config.Settings,
) -> None:
    """A list that fits on one page was read at once: nothing could shift, no second pass."""
    fake = FakeList("client_invoices", "filter[updated_at_from]", None)
    fake.add(40, start=T0 + dt.timedelta(hours=1), step=dt.timedelta(seconds=1), status="paid")
    assert len(await _walk(_client(unit_settings, fake), "client_invoices")) == 40
    assert [a["filter[status]"] for a in fake.asked] == ["unpaid", "paid"]
