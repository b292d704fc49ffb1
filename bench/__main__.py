"""`make bench`: every figure beside its ceiling measured in the same run; writes bench/results.json.

python -m bench [intake] [consumer] [flush] [memory] [client] [console]    (all when none is named)
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from bench import client, common, console, consumer, flush, intake

RESULTS = pathlib.Path(__file__).resolve().parent / "results.json"
# held shared, as the integration tests hold it: the fault tests, which restart PostgreSQL and
# RabbitMQ, take it exclusive and so never run in the middle of a benchmark
SERVICES_LOCK = pathlib.Path(tempfile.gettempdir()) / "relay-tests-services.lock"


async def main(selected: list[str]) -> int:
    names = selected or ["intake", "consumer", "flush", "memory", "client", "console"]
    with SERVICES_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        return await _measure(names)


async def _measure(names: list[str]) -> int:
    figures: list[common.Figure] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmpdir:
        for name in names:
            print(f"-- {name}", flush=True)
            if name == "intake":
                batch = await intake.run(tmpdir)
            elif name == "consumer":
                batch = await consumer.run()
            elif name == "flush":
                batch = await flush.run_throughput()
            elif name == "memory":
                batch = await flush.run_memory()
            elif name == "client":
                batch = await client.run()
            elif name == "console":
                batch = await console.run()
            else:
                print(f"unknown benchmark {name!r}", file=sys.stderr)
                return 2
            for figure in batch:
                print(figure.line(), flush=True)
            figures.extend(batch)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "seconds": round(time.perf_counter() - started, 1),
                "figures": [f.to_json() for f in figures],
            },
            indent=2,
        )
        + "\n"
    )
    print(
        f"wrote {RESULTS.relative_to(RESULTS.parent.parent)} ({time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
