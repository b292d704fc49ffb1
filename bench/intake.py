"""Intake: `relay serve` against a bare endpoint served the same way, closed loop (wrk) and open loop.

wrk (Debian's package, C, one Lua state per thread) generates the closed-loop load: a Python
generator would need most of a core to reach the bare endpoint's rate on this two-core machine and
would then measure itself. The open-loop figure (p99 at a fixed 1,000 requests/s) comes from
bench/openloop.py, which is cheap at that rate. Every request is a distinct, correctly signed event;
afterwards the events queue is counted so the figure is for durable acceptance.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx

from bench import common
from relay.sandbox import signing

WRK_THREADS = 2
WRK_CONNECTIONS = 64


def write_webhooks(path: str, count: int, secret: str) -> None:
    now = int(time.time())
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            body = common.event_body(i)
            out.write(f"{signing.sign(body, secret, t=now)}\t{body.decode()}\n")


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> float:
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited: {process.stderr.read().decode() if process.stderr else ''}"
            )
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready within {timeout} s")


def wrk(url: str, file: str, seconds: int) -> dict[str, float]:
    env = dict(os.environ, WEBHOOKS_FILE=file, WRK_THREADS=str(WRK_THREADS))
    script = os.path.join(os.path.dirname(__file__), "wrk_webhooks.lua")
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(WRK_THREADS),
            "-c",
            str(WRK_CONNECTIONS),
            "-d",
            f"{seconds}s",
            "--timeout",
            "5s",
            "-s",
            script,
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    seconds_run = result["duration_us"] / 1e6
    return {
        "requests_per_s": result["requests"] / seconds_run,
        "accepted_per_s": result["accepted"] / seconds_run,
        "accepted": result["accepted"],
        "requests": result["requests"],
        "non_2xx": result["non_2xx"],
        "socket_errors": result["socket_errors"],
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
    }


def openloop(port: int, path: str, file: str, rate: int, seconds: int) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.openloop",
            "127.0.0.1",
            str(port),
            path,
            file,
            str(rate),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


async def run(tmpdir: str, seconds: int = 10) -> list[common.Figure]:
    tag = uuid.uuid4().hex[:8]
    port = common.free_port()
    settings = common.settings_for(tag, port=port, workers=2)
    figures: list[common.Figure] = []
    async with common.environment_ready(settings) as pool:
        connection_id = await common.insert_connection(pool, settings)
        path = settings.webhook_path(str(connection_id))
        file = os.path.join(tmpdir, "webhooks.tsv")
        write_webhooks(file, 90_000, common.WEBHOOK_SECRET)
        open_file = os.path.join(tmpdir, "webhooks-open.tsv")
        write_webhooks(open_file, 12_000, common.WEBHOOK_SECRET)

        # (a) the bare endpoint, served the same way
        bare_port = common.free_port()
        bare = common.start(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.bare:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(bare_port),
                "--workers",
                str(settings.workers),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            os.environ,
        )
        try:
            _wait_port(bare_port, bare)
            bare_closed = wrk(f"http://127.0.0.1:{bare_port}{path}", file, seconds)
        finally:
            common.stop(bare)

        # (b) relay serve with a real connection
        serve = common.start(common.relay_command("serve"), common.environment(settings))
        try:
            startup_s = wait_ready(f"http://127.0.0.1:{port}/readyz", serve)
            relay_closed = wrk(f"http://127.0.0.1:{port}{path}", file, seconds)
            queued_closed = await common.count_and_drain(settings, settings.events_queue)
            relay_open = openloop(port, path, open_file, 1000, seconds)
            queued_open = await common.count_and_drain(settings, settings.events_queue)
        finally:
            common.stop(serve)

    figures.append(
        common.Figure(
            "intake: durable webhooks/s (relay serve)",
            relay_closed["accepted_per_s"],
            "req/s",
            ceiling=bare_closed["requests_per_s"],
            ceiling_name="bare endpoint",
            target=">= 1500/s",
            met=relay_closed["accepted_per_s"] >= 1500,
            detail={
                "relay": relay_closed,
                "bare": bare_closed,
                "workers": settings.workers,
                "queued_after_run": queued_closed,
                "every_202_queued": queued_closed >= relay_closed["accepted"],
            },
        )
    )
    figures.append(
        common.Figure(
            "intake: p50 latency closed loop (relay)",
            relay_closed["p50_ms"],
            "ms",
            ceiling=bare_closed["p50_ms"],
            ceiling_name="bare p50",
        )
    )
    figures.append(
        common.Figure(
            "intake: p99 latency closed loop (relay)",
            relay_closed["p99_ms"],
            "ms",
            ceiling=bare_closed["p99_ms"],
            ceiling_name="bare p99",
        )
    )
    accepted_open = int(relay_open["statuses"].get("202", 0))  # type: ignore[union-attr]
    figures.append(
        common.Figure(
            "intake: p99 at offered 1,000 req/s (open loop)",
            float(relay_open["p99_ms"]),
            "ms",
            target="< 50 ms",
            met=float(relay_open["p99_ms"]) < 50,
            detail={
                **relay_open,
                "queued_after_run": queued_open,
                "every_202_queued": queued_open >= accepted_open,
            },
        )
    )
    figures.append(
        common.Figure(
            "start-up: relay serve launch to /readyz 200",
            startup_s,
            "s",
            target="< 2 s",
            met=startup_s < 2,
        )
    )
    return figures


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("bare server exited")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError("bare server did not listen")
