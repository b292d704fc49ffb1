"""Open-loop load: send webhooks at a fixed rate whatever the answers, latency from the scheduled time.

A closed-loop tool (wrk) slows down when the server does, hiding latency behind back-pressure. Here
request i is due at t0 + i/rate; it goes out on the first idle keep-alive connection (a new one is
opened when none is idle) and its latency is measured from when it was due, so queueing anywhere
counts. Raw asyncio sockets and pre-built requests keep the generator cheap (it shares two cores with
the server). Run as a separate process:

    python -m bench.openloop HOST PORT PATH WEBHOOKS_FILE RATE SECONDS
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def _requests(host: str, path: str, file: str) -> list[bytes]:
    """Pre-built requests, one per line: ``signature<TAB>body[<TAB>path]`` (``path`` by default)."""
    built = []
    with open(file, encoding="utf-8") as lines:
        for line in lines:
            signature, body, *own_path = line.rstrip("\n").split("\t", 2)
            raw = body.encode()
            target = own_path[0] if own_path else path
            built.append(
                (
                    f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"X-Qonto-Signature: {signature}\r\nContent-Length: {len(raw)}\r\n\r\n"
                ).encode()
                + raw
            )
    return built


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def run(
    host: str, port: int, path: str, file: str, rate: float, seconds: float
) -> dict[str, object]:
    requests = _requests(host, path, file)
    total = min(len(requests), int(rate * seconds))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    async def send(index: int, due: float) -> None:
        nonlocal errors
        try:
            stream = idle.pop() if idle else await asyncio.open_connection(host, port)
            reader, writer = stream
            writer.write(requests[index])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - due)
            statuses[status] = statuses.get(status, 0) + 1
            idle.append(stream)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1

    tasks = []
    start = time.perf_counter() + 0.1
    for index in range(total):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(index, due)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000
            if latencies
            else 0.0
        )

    return {
        "offered_rate": rate,
        "sent": total,
        "answered": len(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
        "p50_ms": round(pct(50), 2),
        "p99_ms": round(pct(99), 2),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else 0.0,
    }


def main() -> None:
    host, port, path, file, rate, seconds = sys.argv[1:7]
    result = asyncio.run(run(host, int(port), path, file, float(rate), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
