"""The service under abuse: clients that leave early, and more load than it can serve.

Two measurements against a freshly started service (or ``--revision`` of it):

* **Departures.** ``--leavers`` clients each send ``/generate`` n=64 and close
  the connection ``--leave-after-ms`` later, again and again, for
  ``--storm-s`` seconds. Reported: the requests sent, the generator rows the
  server computed meanwhile and after (``serving_batch_size`` for generate),
  that is work done for nobody, and how a real request right after is answered.
* **Goodput.** The capacity is measured first (a few well-behaved clients,
  closed loop). Then requests are *offered* at 1×, 2× and 4× that rate, open
  loop: each is sent on schedule whatever happened to the others, and a 503
  is not retried later but counts as refused (clients that ignore
  ``Retry-After``). Reported per rate: answered (2xx) per second, refused,
  failed, and the latency of the answered ones.

    python -m bench.overload                       # the service in this checkout
    python -m bench.overload --revision 991d6f7    # the same, at a commit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np

from bench.server import ServiceProcess, batch_stats, http_get

log = logging.getLogger("bench.overload")

GENERATE_BODY = json.dumps({"n": 64, "seed": 7}).encode()
GENERATE_ROWS = "serving_batch_size:generate"


def generated_rows(url: str) -> float:
    _, text = http_get(f"{url}/metrics")
    return batch_stats(text).sums.get(GENERATE_ROWS, 0.0)


def settled_rows(url: str, quiet_s: float = 1.0, limit_s: float = 120.0) -> float:
    """Generator rows once the count has stood still for ``quiet_s``."""
    deadline = time.monotonic() + limit_s
    rows = generated_rows(url)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = generated_rows(url)
        if now == rows:
            return now
        rows = now
    return rows


async def _leave_early(host: str, port: int, leave_after_s: float, until: float) -> int:
    """Send /generate and hang up ``leave_after_s`` later, until ``until``; requests sent."""
    request = (
        f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(GENERATE_BODY)}\r\n\r\n"
    ).encode() + GENERATE_BODY
    sent = 0
    while time.monotonic() < until:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.write(request)
        await writer.drain()
        sent += 1
        await asyncio.sleep(leave_after_s)
        writer.close()
    return sent


def departures(url: str, leavers: int, leave_after_ms: float, storm_s: float) -> dict:
    parsed = urlparse(url)
    before = settled_rows(url)

    async def storm() -> int:
        until = time.monotonic() + storm_s
        counts = await asyncio.gather(
            *(_leave_early(parsed.hostname, parsed.port, leave_after_ms / 1000, until)
              for _ in range(leavers))
        )  # fmt: skip
        return sum(counts)

    sent = asyncio.run(storm())
    at_end = generated_rows(url)
    started = time.monotonic()
    status, _ = http_get(f"{url}/livez")
    after_status, after_s = asyncio.run(_one_generate(url))
    settled = settled_rows(url)
    computed = settled - before
    return {
        "leavers": leavers,
        "leave_after_ms": leave_after_ms,
        "storm_s": storm_s,
        "requests_sent": sent,
        "rows_requested": sent * 64,
        "rows_computed": computed,
        "share_computed": round(computed / max(1, sent * 64), 4),
        # Queued work left when the storm ended (the real request's own 64 rows aside).
        "rows_computed_after_storm": settled - at_end - (64 if after_status == 200 else 0),
        "livez_after": status,
        "next_request_status": after_status,
        "next_request_s": round(after_s, 3),
        "settled_s": round(time.monotonic() - started, 1),
    }


async def _one_generate(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/generate", data=GENERATE_BODY, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        await response.read()
        return response.status, time.perf_counter() - started


async def _closed_loop(url: str, clients: int, duration_s: float) -> float:
    """Answered requests per second from ``clients`` well-behaved clients."""
    answered = 0
    until = time.monotonic() + duration_s
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            nonlocal answered
            while time.monotonic() < until:
                async with session.post(f"{url}/generate", data=GENERATE_BODY,
                                        headers=headers) as response:  # fmt: skip
                    await response.read()
                    answered += response.status == 200

        await asyncio.gather(*(client() for _ in range(clients)))
    return answered / duration_s


async def _open_loop(url: str, rate: float, duration_s: float) -> dict:
    """Offer ``rate`` requests per second for ``duration_s``; none is retried."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/generate", data=GENERATE_BODY,
                                        headers=headers) as response:  # fmt: skip
                    await response.read()
                    statuses[str(response.status)] += 1
                    if response.status == 200:
                        latencies.append(time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] += 1

        tasks = []
        start = time.monotonic()
        count = int(rate * duration_s)
        for index in range(count):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    answered = statuses.get("200", 0)
    return {
        "offered_per_s": round(rate, 1),
        "sent": count,
        # Per second of the whole exchange: requests queued during the offering window
        # may be answered after it.
        "answered_per_s": round(answered / elapsed, 1),
        "refused_503": statuses.get("503", 0),
        "other": {k: v for k, v in statuses.items() if k not in ("200", "503")},
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None,
        "elapsed_s": round(elapsed, 1),
    }


def goodput(url: str, clients: int, duration_s: float, factors: list[float]) -> dict:
    capacity = asyncio.run(_closed_loop(url, clients, duration_s))
    points = []
    for factor in factors:
        settled_rows(url)  # start every point with an empty queue
        point = asyncio.run(_open_loop(url, factor * capacity, duration_s))
        point["factor"] = factor
        point["goodput_share"] = round(point["answered_per_s"] / capacity, 3)
        points.append(point)
        log.info("goodput at %.0f×: %s", factor, point)
    return {"capacity_per_s": round(capacity, 1), "clients": clients, "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", help="serve the service at this git commit")
    parser.add_argument("--leavers", type=int, default=200)
    parser.add_argument("--leave-after-ms", type=float, default=10.0)
    parser.add_argument("--storm-s", type=float, default=15.0)
    parser.add_argument("--capacity-clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per goodput point")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--output", type=Path, default=Path("bench-results/overload"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    name = args.revision or "service"
    env = {"SERVING_DEVICE": "cpu", "SERVING_WORKERS": "1"}
    with ServiceProcess(env, args.output / f"{name}.server.log", revision=args.revision) as server:
        result = {
            "revision": args.revision,
            "departures": departures(server.url, args.leavers, args.leave_after_ms, args.storm_s),
        }
        log.info("departures: %s", result["departures"])
        result["goodput"] = goodput(server.url, args.capacity_clients, args.duration, args.factors)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
