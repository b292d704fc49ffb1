"""`relay demo --web`: the sandboxes and the relay keep running and a setup link is printed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx


def _start() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--web"],
        env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _link(process: subprocess.Popen[str], within_s: float = 60) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + within_s
    for line in process.stdout:
        found = re.search(r"http://127\.0\.0\.1:\d+/setup/[A-Za-z0-9_-]{43}", line)
        if found:
            return found.group(0)
        assert time.monotonic() < deadline, "no setup link printed"
    raise AssertionError(f"relay demo --web ended without a link: {process.stderr}")


async def test_demo_web_prints_a_link_that_opens_the_setup_and_stops_cleanly() -> None:
    """The link answers the Qonto step; SIGTERM stops the demo with exit 0."""
    process = await asyncio.to_thread(_start)
    try:
        link = await asyncio.to_thread(_link, process)
        async with httpx.AsyncClient() as client:
            page = await client.get(link)
        assert page.status_code == 200
        assert "Connect with Qonto" in page.text
        assert "Atelier Demo" in page.text
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        stderr = process.stderr.read() if process.stderr else ""
        if process.stdout:
            process.stdout.close()
        if process.stderr:
            process.stderr.close()
    assert code == 0, stderr
    assert "dropped the demo database and queues" in stderr
