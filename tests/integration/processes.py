"""The relay's roles as real subprocesses (`relay serve`, `consume`, `scheduler`, `run`, `flush`),
with their JSON log lines, their readiness and their exit code."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any

import httpx
import orjson

from relay import config
from tests.integration import factories


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Role:
    """A `relay <command>` subprocess; its standard error (JSON log lines) goes to ``log_path``, its
    standard output to ``stdout_path`` when given."""

    def __init__(
        self,
        settings: config.Settings,
        *command: str,
        log_path: pathlib.Path,
        env: dict[str, str] | None = None,
        stdout_path: pathlib.Path | None = None,
    ) -> None:
        self.command = command
        self._settings = settings
        self._env = env
        self.port = free_port()
        self.log_path = log_path
        environment = {
            **os.environ,
            **factories.environment(settings),
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(self.port),
            **(env or {}),
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        with contextlib.ExitStack() as stack:
            stdout = (
                stack.enter_context(stdout_path.open("wb"))
                if stdout_path is not None
                else subprocess.DEVNULL
            )
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", *command],
                env=environment,
                stdout=stdout,
                stderr=self._log,
            )

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                found.append(value)
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def _running(self) -> None:
        assert self.process.poll() is None, f"relay {self.command[0]} exited: {self.log()}"

    async def ready(self, within_s: float = 30) -> None:
        """Poll /readyz until it answers 200 (roles with an HTTP edge: serve, run)."""
        async with httpx.AsyncClient(base_url=self.url) as client:

            async def ready() -> bool:
                self._running()
                try:
                    return (await client.get("/readyz", timeout=2)).status_code == 200
                except httpx.TransportError:
                    return False

            await factories.until(
                ready,
                within_s=within_s,
                what=lambda: f"relay {self.command[0]} ready: {self.log()}",
                every_s=0.05,
            )

    async def logged(self, name: str, within_s: float = 30) -> dict[str, Any]:
        """Wait for the first log line with this event name."""

        def found() -> bool:
            self._running()
            return bool(self.events(name))

        await factories.until(
            found, within_s=within_s, what=lambda: f"{name!r} logged: {self.log()}", every_s=0.05
        )
        return self.events(name)[0]

    async def exited(self, within_s: float) -> int | None:
        """The exit code once the process ends, or None if it still runs after ``within_s``."""
        with contextlib.suppress(AssertionError):
            await factories.until(lambda: self.process.poll() is not None, within_s=within_s)
        return self.process.poll()

    async def exit_code(self, within_s: float) -> int:
        """The exit code once the process ends; fail if it still runs after ``within_s``."""
        code = await self.exited(within_s)
        assert code is not None, (
            f"relay {self.command[0]} still running after {within_s} s: {self.log()}"
        )
        return code

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, whatever it was doing."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)

    def again(self, log_path: pathlib.Path) -> Role:
        """The same command started anew (as a supervisor restarts a role), this one closed."""
        self.close()
        return Role(self._settings, *self.command, log_path=log_path, env=self._env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._log.close()
