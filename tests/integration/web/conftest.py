"""Fixtures of the web pages' tests: both sandboxes ready for the setup, the relay's HTTP edge on a
real socket (in this process, or as `relay serve`), and a headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``.ci/services
--install``), never one Playwright downloads. Playwright's sync API runs in one thread of its own;
tests hand it functions to run (:meth:`Browser.run`). Screenshots of every page go to
``test-artifacts/screenshots/`` (or ``$RELAY_TEST_ARTIFACTS/screenshots``); the run prints where.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import uvicorn

from relay import config
from relay.domain import invitations
from relay.edge import app
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories, processes

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ROOT = pathlib.Path(__file__).resolve().parents[3]
ARTIFACTS = pathlib.Path(os.environ.get("RELAY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SCREENSHOTS = ARTIFACTS / "screenshots"
# Screenshots newer than this were taken by this run.
_STARTED = time.time()
OAUTH_ID, OAUTH_SECRET = "relay-test-app", "relay-test-oauth-client-secret-0123"
API_KEY, API_SECRET = factories.FIRM_KEY, factories.FIRM_SECRET
T = TypeVar("T")


# ------------------------------------------------------------------------------------ the relay


@pytest.fixture
def web_settings(
    upstream_settings: config.Settings,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> config.Settings:
    """Settings for the setup: the sandboxes, an OAuth app registered in Qonto's sandbox, the
    Email prestataire's local part, and a port of its own (the public URL names it)."""
    qonto.add_oauth_client(OAUTH_ID, OAUTH_SECRET)
    qonto.callback_schemes = ("https", "http")  # the relay under test listens on plain HTTP
    loop.add_dossier("LONELY01")  # exists in Loop, associated with no key
    port = processes.free_port()
    return dataclasses.replace(
        upstream_settings,
        qonto_client_id=OAUTH_ID,
        qonto_client_secret=config.Secret(OAUTH_SECRET),
        public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1",
        port=port,
        workers=1,
        loop_provider_email_local_part="relay",
    )


@contextlib.asynccontextmanager
async def serving(settings: config.Settings) -> AsyncIterator[str]:
    """The relay's application (the one `relay serve` runs) on its port, in this process."""
    server = uvicorn.Server(
        uvicorn.Config(
            app.create_app(settings),
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="on",
        )
    )

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's way of saying the lifespan failed
            raise RuntimeError(f"the relay's application did not start ({exc.code})") from None

    task = asyncio.create_task(serve())
    try:

        def started() -> bool:
            if task.done():
                task.result()  # raises what stopped it
            return bool(server.started)

        await factories.until(started, within_s=15, what="the relay's application starting")
        yield settings.public_url
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def relay_url(web_settings: config.Settings) -> AsyncIterator[str]:
    async with serving(web_settings) as url:
        yield url


def environment(settings: config.Settings) -> dict[str, str]:
    """What a `relay` subprocess needs for the setup pages, besides factories.environment."""
    env = {
        **factories.environment(settings),
        "RELAY_PUBLIC_URL": settings.public_url,
        "RELAY_PORT": str(settings.port),
        "RELAY_WORKERS": "1",
        "RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART": settings.loop_provider_email_local_part or "",
    }
    if settings.qonto_client_id and settings.qonto_client_secret is not None:
        env["RELAY_QONTO_CLIENT_ID"] = settings.qonto_client_id
        env["RELAY_QONTO_CLIENT_SECRET"] = settings.qonto_client_secret.reveal()
    return env


def relay_command(settings: config.Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`relay ARGS` in a subprocess with these settings (exit code not checked)."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**environment(settings), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def invite(settings: config.Settings, pool: asyncpg.Pool, name: str = "Acme") -> str:
    """A setup link (the invitation made as `relay connections invite` makes it)."""
    return (await invitations.create(settings, pool, name)).setup_url


# ------------------------------------------------------------------------------------ HTTP helpers

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def consent(
    client: httpx.AsyncClient, setup_url: str, *, decision: str = "authorize"
) -> httpx.URL:
    """Open the link, press Connect with Qonto, answer Qonto's consent page: the callback URL
    Qonto sends the browser to (not followed)."""
    page = await client.get(setup_url, follow_redirects=False)
    assert page.status_code == 200, page.text
    connect = await client.post(
        "/setup/qonto",
        data={"csrf_token": csrf(page.text)},
        headers={"content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert connect.status_code == 303, connect.text
    authorize_url = httpx.URL(connect.headers["location"])
    async with httpx.AsyncClient() as qonto_browser:
        form = await qonto_browser.get(authorize_url)
        assert form.status_code == 200
        answer = await qonto_browser.post(
            str(authorize_url.copy_with(query=None)),
            data={**dict(authorize_url.params), "decision": decision},
        )
    assert answer.status_code == 302
    return httpx.URL(answer.headers["location"])


# ------------------------------------------------------------------------------------ the browser


class Browser:
    """Chromium through Playwright's sync API, in a thread of its own."""

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="playwright")
        self._playwright: Any = None
        self._browser: Any = None
        self._thread.submit(self._start).result(60)

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )

    async def run(self, scenario: Callable[[Any], T], **context: Any) -> T:
        """Run ``scenario(page)`` in a fresh browser context (its own cookies) in the thread."""

        def in_thread() -> T:
            browser_context = self._browser.new_context(**context)
            try:
                page = browser_context.new_page()
                page.set_default_timeout(15_000)
                return scenario(page)
            finally:
                browser_context.close()

        return await asyncio.get_running_loop().run_in_executor(self._thread, in_thread)

    def close(self) -> None:
        def stop() -> None:
            if self._browser is not None:
                self._browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        self._thread.submit(stop).result(60)
        self._thread.shutdown()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's chromium. Install it "
            "(`apt-get install -y chromium`, which `.ci/services --install` does as root).",
            pytrace=False,
        )
    value = Browser()
    yield value
    value.close()


def shoot(page: Any, name: str) -> None:
    """A full-page screenshot of what the browser shows, as ``<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Says where this run's screenshots are, when it took any (xdist workers included)."""
    if SCREENSHOTS.exists() and any(
        shot.stat().st_mtime >= _STARTED for shot in SCREENSHOTS.glob("*.png")
    ):
        terminalreporter.write_line(f"screenshots of the web pages: {SCREENSHOTS}")
