"""HTTP client: the CPU one request costs the relay on httpx's own transport, as the Qonto and Cegid
clients build it.

The server is a separate process answering every request at once (a minimal HTTP/1.1 keep-alive
loop), so the figure is the client's own CPU (``time.process_time``) per 20 KB POST, the shape of a
deposit. Measured with 1 and with 32 requests in flight, in rounds; the lowest round is the figure
(this shared machine's noise only adds CPU).

python -m bench.client serve PORT    (the server; the benchmark starts it itself)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import httpx

from bench import common

ROUND = 1000  # POSTs per round
ROUNDS = 6  # the least disturbed (lowest) round is the figure
BODY = b"%PDF-1.7\n" + b"x" * (20 * 1024 - 9)
LIMITS = httpx.Limits(max_connections=36, max_keepalive_connections=36)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(b"Content-Length: 2\r\n\r\n{}")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _serve(port: int) -> None:
    server = await asyncio.start_server(_answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def _listening(port: int, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def _round(client: httpx.AsyncClient, in_flight: int, requests: int) -> float:
    """Microseconds of this process's CPU per POST over ``requests`` POSTs."""

    async def worker() -> None:
        for _ in range(requests // in_flight):
            response = await client.post("/storeDocument", content=BODY)
            if response.status_code != 200:
                raise RuntimeError(f"client benchmark: HTTP {response.status_code}")

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return (time.process_time() - started) / (requests // in_flight * in_flight) * 1e6


async def run() -> list[common.Figure]:
    port = common.free_port()
    server = common.start(
        [sys.executable, "-m", "bench.client", "serve", str(port)], dict(os.environ)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _listening(port)
        figures = []
        for in_flight in (1, 32):
            transport = httpx.AsyncHTTPTransport(limits=LIMITS, retries=0)
            async with httpx.AsyncClient(base_url=url, transport=transport) as client:
                await _round(client, in_flight, ROUND // 2)  # connections opened, code paths warm
                rounds = [await _round(client, in_flight, ROUND) for _ in range(ROUNDS)]
            figures.append(
                common.Figure(
                    f"http client: CPU per 20 KB POST, {in_flight} in flight",
                    min(rounds),
                    "us",
                    detail={"rounds_us": [round(v) for v in rounds]},
                )
            )
        return figures
    finally:
        common.stop(server)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(int(sys.argv[2])))
