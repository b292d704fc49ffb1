"""Intake: `relay serve` beside the reference endpoint (bench/reference.py: Starlette, HMAC check,
aio-pika publish with a confirm to the same quorum queue) served the same way with the same worker
count, closed loop (wrk, with the servers' and RabbitMQ's CPU per webhook read from /proc) and open
loop (both at 1,000/s); and valid webhooks' latency under a flood of unknown ids.

wrk (Debian's package, C, one Lua state per thread) generates the closed-loop load: a Python
generator would need most of a core to reach the reference endpoint's rate on this two-core machine and
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
from typing import Any

import httpx

from bench import common
from relay.sandbox import signing

WRK_THREADS = 2
WRK_CONNECTIONS = 64


FLOOD_RATE = 2000  # unknown connection ids per second
VALID_RATE = 200  # valid webhooks per second while measuring the flood's effect


def write_webhooks(path: str, count: int, secret: str, *, unknown_ids: bool = False) -> None:
    """``count`` distinct signed events, one per line; ``unknown_ids``: each to a random id."""
    now = int(time.time())
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            body = common.event_body(i)
            route = f"\t/webhooks/qonto/{uuid.uuid4()}" if unknown_ids else ""
            out.write(f"{signing.sign(body, secret, t=now)}\t{body.decode()}{route}\n")


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


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _processes() -> list[tuple[int, int, str]]:
    """Every process as (pid, parent pid, name), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                    text = stat.read()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            found.append((int(entry), int(text.rsplit(")", 1)[1].split()[1]), name))
    return found


def _tree(root: int, processes: list[tuple[int, int, str]]) -> list[int]:
    """The process and its descendants (uvicorn's workers are children of its supervisor)."""
    children: dict[int, list[int]] = {}
    for pid, parent, _ in processes:
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def measured_wrk(
    url: str, file: str, seconds: int, server: subprocess.Popen[bytes]
) -> dict[str, float]:
    """:func:`wrk`, with the server's and RabbitMQ's CPU per accepted webhook (from /proc)."""
    processes = _processes()
    workers = _tree(server.pid, processes)
    broker = [pid for pid, _, name in processes if name.startswith("beam")]  # RabbitMQ
    before = [sum(_cpu_s(p) for p in pids) for pids in (workers, broker)]
    result = wrk(url, file, seconds)
    after = [sum(_cpu_s(p) for p in pids) for pids in (workers, broker)]
    accepted = max(result["accepted"], 1)
    result["server_cpu_us_per_webhook"] = round(1e6 * (after[0] - before[0]) / accepted, 1)
    result["rabbitmq_cpu_us_per_webhook"] = round(1e6 * (after[1] - before[1]) / accepted, 1)
    return result


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


def _openloop_command(port: int, path: str, file: str, rate: int, seconds: int) -> list[str]:
    """`python -m bench.openloop` sending the webhooks of ``file`` at ``rate`` for ``seconds``."""
    arguments = ("127.0.0.1", str(port), path, file, str(rate), str(seconds))
    return [sys.executable, "-m", "bench.openloop", *arguments]


def openloop(port: int, path: str, file: str, rate: int, seconds: int) -> dict[str, object]:
    command = _openloop_command(port, path, file, rate, seconds)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def _serve_reference(settings: common.config.Settings, port: int) -> Any:
    return common.start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.reference:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
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
        {
            **os.environ,
            "REFERENCE_SECRET": common.WEBHOOK_SECRET,
            "REFERENCE_AMQP_URL": settings.amqp_url.reveal(),
            "REFERENCE_QUEUE": settings.events_queue,
        },
    )


def _start_serve(settings: common.config.Settings, log_path: str) -> tuple[Any, Any]:
    """`relay serve` as deployed: one JSON log line per webhook (info), written to a file."""
    log_file = open(log_path, "wb")  # noqa: SIM115 - the caller closes it after the process
    serve = subprocess.Popen(
        common.relay_command("serve"),
        env={**common.environment(settings), "RELAY_LOG_LEVEL": "info"},
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    return serve, log_file


def _flood(port: int, path: str, valid: str, flood: str, seconds: int) -> dict[str, object]:
    """Valid webhooks at VALID_RATE/s while another process sends FLOOD_RATE/s to unknown ids."""
    flooding = subprocess.Popen(
        _openloop_command(port, path, flood, FLOOD_RATE, seconds + 2),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        measured = openloop(port, path, valid, VALID_RATE, seconds)
    finally:
        out, _ = flooding.communicate(timeout=120)
    return {"valid": measured, "flood": json.loads(out.strip().splitlines()[-1])}


async def run(tmpdir: str, seconds: int = 10) -> list[common.Figure]:
    tag = uuid.uuid4().hex[:8]
    port = common.free_port()
    settings = common.settings_for(tag, port=port, workers=2)
    figures: list[common.Figure] = []
    async with common.environment_ready(settings) as pool:
        connection_id = await common.insert_connection(pool, settings)
        path = settings.webhook_path(str(connection_id))
        file = os.path.join(tmpdir, "webhooks.tsv")
        write_webhooks(file, 150_000, common.WEBHOOK_SECRET)
        open_file = os.path.join(tmpdir, "webhooks-open.tsv")
        write_webhooks(open_file, 12_000, common.WEBHOOK_SECRET)
        valid_file = os.path.join(tmpdir, "webhooks-valid.tsv")
        write_webhooks(valid_file, VALID_RATE * seconds, common.WEBHOOK_SECRET)
        flood_file = os.path.join(tmpdir, "webhooks-unknown.tsv")
        write_webhooks(flood_file, FLOOD_RATE * (seconds + 2), "x", unknown_ids=True)

        # (a) the reference endpoint, same server, workers and queue
        reference_port = common.free_port()
        reference = _serve_reference(settings, reference_port)
        try:
            _wait_port(reference_port, reference)
            reference_closed = measured_wrk(
                f"http://127.0.0.1:{reference_port}{path}", file, seconds, reference
            )
            queued_reference = await common.count_and_drain(settings, settings.events_queue)
            reference_open = openloop(reference_port, path, open_file, 1000, seconds)
            await common.count_and_drain(settings, settings.events_queue)
        finally:
            common.stop(reference)

        # (b) relay serve with a real connection
        serve, log_file = _start_serve(settings, os.path.join(tmpdir, "serve.log"))
        try:
            startup_s = wait_ready(f"http://127.0.0.1:{port}/readyz", serve)
            relay_closed = measured_wrk(f"http://127.0.0.1:{port}{path}", file, seconds, serve)
            queued_closed = await common.count_and_drain(settings, settings.events_queue)
            relay_open = openloop(port, path, open_file, 1000, seconds)
            queued_open = await common.count_and_drain(settings, settings.events_queue)
            quiet = openloop(port, path, valid_file, VALID_RATE, seconds)
            await common.count_and_drain(settings, settings.events_queue)
            flooded = _flood(port, path, valid_file, flood_file, seconds)
            await common.count_and_drain(settings, settings.events_queue)
        finally:
            common.stop(serve)
            log_file.close()

    ratio = relay_closed["accepted_per_s"] / max(reference_closed["accepted_per_s"], 1.0)
    figures.append(
        common.Figure(
            "intake: durable webhooks/s (relay serve)",
            relay_closed["accepted_per_s"],
            "req/s",
            ceiling=reference_closed["accepted_per_s"],
            ceiling_name="reference endpoint",
            target=">= 1.2 x reference",
            met=ratio >= 1.2,
            detail={
                "relay": relay_closed,
                "reference": reference_closed,
                "workers": settings.workers,
                "wrk_connections": WRK_CONNECTIONS,
                "queued_after_run": queued_closed,
                "every_202_queued": queued_closed >= relay_closed["accepted"],
                "reference_queued_after_run": queued_reference,
            },
        )
    )
    figures.append(
        common.Figure(
            "intake: server CPU per webhook (relay)",
            relay_closed["server_cpu_us_per_webhook"],
            "us",
            ceiling=reference_closed["server_cpu_us_per_webhook"],
            ceiling_name="reference server",
            detail={
                "rabbitmq_us_relay": relay_closed["rabbitmq_cpu_us_per_webhook"],
                "rabbitmq_us_reference": reference_closed["rabbitmq_cpu_us_per_webhook"],
            },
        )
    )
    figures.append(
        common.Figure(
            "intake: RabbitMQ CPU per webhook (relay)",
            relay_closed["rabbitmq_cpu_us_per_webhook"],
            "us",
            ceiling=reference_closed["rabbitmq_cpu_us_per_webhook"],
            ceiling_name="reference's",
        )
    )
    figures.append(
        common.Figure(
            "intake: p50 latency closed loop (relay)",
            relay_closed["p50_ms"],
            "ms",
            ceiling=reference_closed["p50_ms"],
            ceiling_name="reference p50",
        )
    )
    figures.append(
        common.Figure(
            "intake: p99 latency closed loop (relay)",
            relay_closed["p99_ms"],
            "ms",
            ceiling=reference_closed["p99_ms"],
            ceiling_name="reference p99",
        )
    )
    accepted_open = int(relay_open["statuses"].get("202", 0))  # type: ignore[union-attr]
    figures.append(
        common.Figure(
            "intake: p99 at offered 1,000 req/s (open loop)",
            float(relay_open["p99_ms"]),
            "ms",
            ceiling=float(reference_open["p99_ms"]),  # type: ignore[arg-type]
            ceiling_name="reference, same load",
            target="< 20 ms",
            met=float(relay_open["p99_ms"]) < 20,
            detail={
                **relay_open,
                "reference": reference_open,
                "queued_after_run": queued_open,
                "every_202_queued": queued_open >= accepted_open,
            },
        )
    )
    valid_flooded: dict[str, Any] = flooded["valid"]  # type: ignore[assignment]
    figures.append(
        common.Figure(
            f"intake: valid p50 under {FLOOD_RATE:,} unknown ids/s",
            float(valid_flooded["p50_ms"]),
            "ms",
            ceiling=float(quiet["p50_ms"]),  # type: ignore[arg-type]
            ceiling_name=f"p50 without flood, {VALID_RATE}/s",
            detail={"quiet": quiet, "flooded": valid_flooded, "flood": flooded["flood"]},
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
            raise RuntimeError("reference server exited")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError("reference server did not listen")
