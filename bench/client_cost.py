"""CPU per OneSignal request in the bridge's process, three ways side by side: the bridge's client
through httpx (its path for clients built around another transport), the bridge's client as `run`
builds it (straight through aiohttp's pool), and bare aiohttp. Not a target figure; prints only.

    .venv/bin/python bench/client_cost.py              # 2,000 requests x 5 runs per way
    .venv/bin/python bench/client_cost.py --quick      # 500 requests x 2 runs

Each run: a fresh client, 50 requests to warm its pool, then `--requests` Create user calls (new
users, one tag) at 32 in flight against the simulator process (the app limit raised out of the
way); the figure is this process's CPU time (user + system) per request. The ways take turns
within each round, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
from collections.abc import Awaitable, Callable

import _common  # noqa: F401  (puts the repository and tests/ on sys.path)
import aiohttp
import httpx
import orjson
from bridgeproc import API_KEY, APP_ID
from bridgeproc import Simulator as TestSimulator

from bridge.onesignal.client import DEFAULT_HEADERS, OneSignalClient, build_http_client, requests
from bridge.onesignal.transport import AiohttpTransport

IN_FLIGHT = 32
WAYS = ("client through httpx", "client, direct (run)", "bare aiohttp")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def one_run(base_url: str, way: str, n: int) -> float:
    """CPU µs per request for `n` requests made `way`."""
    sem = asyncio.Semaphore(IN_FLIGHT)
    close: Callable[[], Awaitable[None]]
    call: Callable[[int], Awaitable[None]]
    if way == "bare aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        close = session.close
        url = f"{base_url}/apps/{APP_ID}/users"
        headers = {**DEFAULT_HEADERS, "authorization": f"Key {API_KEY}", "content-type": "application/json"}

        async def call(i: int) -> None:
            body = orjson.dumps({"identity": {"external_id": f"bare-{i}"}, "properties": {"tags": {"a": "b"}}})
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise RuntimeError(f"simulator answered {resp.status}")
    else:
        if way == "client, direct (run)":
            http = build_http_client(base_url, 10.0)
        else:
            http = httpx.AsyncClient(base_url=base_url, transport=AiohttpTransport(), headers=DEFAULT_HEADERS,
                                     timeout=httpx.Timeout(10.0, connect=5.0))
        close = http.aclose
        client = OneSignalClient(http, APP_ID, API_KEY)
        tag = "direct" if way == "client, direct (run)" else "httpx"

        async def call(i: int) -> None:
            await client.send(requests.create_user({"external_id": f"{tag}-{i}"}, {"tags": {"a": "b"}}))

    async def limited(i: int) -> None:
        async with sem:
            await call(i)

    try:
        await asyncio.gather(*(limited(i) for i in range(50)))
        start = cpu_s()
        await asyncio.gather(*(limited(i) for i in range(50, 50 + n)))
        return 1e6 * (cpu_s() - start) / n
    finally:
        await close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.runs = 500, 2
    sim = TestSimulator(API_KEY, ["--app-rate-per-s", "1000000"])
    results: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for _ in range(args.runs):
            for way in WAYS:
                sim.reset()
                results[way].append(asyncio.run(one_run(sim.base_url, way, args.requests)))
    finally:
        sim.close()
    print(f"CPU µs per request, {args.requests:,} Create user calls at {IN_FLIGHT} in flight, {args.runs} runs:")
    for way, xs in results.items():
        print(f"  {way:<22} median {statistics.median(xs):5.0f}  (range {min(xs):.0f}-{max(xs):.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
