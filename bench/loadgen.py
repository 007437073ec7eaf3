"""A closed-loop HTTP load generator: ``C`` clients, each sending its next request
as soon as the previous one is answered, spread over several processes.

Each client process runs an asyncio event loop with ``C / P`` coroutines that
share one aiohttp connection pool (one keep-alive connection per coroutine).
All processes wait at a barrier, send load for ``warmup_s`` seconds that are
not counted, then for ``duration_s`` seconds in which every answered request
is recorded (latency, status). The processes also report the CPU time they
used in that window, so a report can show that the generator was not the
bottleneck.

    python -m bench.loadgen --url http://127.0.0.1:3000 --workload classify \
        --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.payloads import Request, Workload, build_workloads

# Time allowed for client processes to start and connect before giving up.
START_TIMEOUT_S = 120.0
PERCENTILES = (50, 95, 99)
# The status recorded for a 2xx answer that its request's check rejects.
BAD_ANSWER = "bad-answer"


@dataclass
class ClientShare:
    """What one client process measured in its window."""

    latencies_s: bytes  # array('d') of successful requests' latencies
    ok_items: int
    statuses: dict[str, int]
    cpu_s: float
    window_s: float


@dataclass
class PointResult:
    """One load point: a workload at one concurrency, summarised."""

    workload: str
    endpoint: str
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    requests_per_s: float
    items_per_s: float
    latency_ms: dict[str, float]
    statuses: dict[str, int]
    errors: int
    client_processes: int
    client_cpu_s: float
    # Client CPU as a share of one core, and of every core of the machine.
    client_cpu_core_percent: float
    client_cpu_machine_percent: float
    server: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def split_concurrency(concurrency: int, processes: int) -> list[int]:
    """Spread ``concurrency`` clients over at most ``processes`` processes, evenly."""
    processes = max(1, min(processes, concurrency))
    base, extra = divmod(concurrency, processes)
    return [base + (1 if index < extra else 0) for index in range(processes)]


def default_client_processes() -> int:
    """A quarter of the cores (at least two): the rest stay with the server."""
    return max(2, (os.cpu_count() or 1) // 4)


def _status_key(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"error:{type(exc).__name__}"


async def _drive(
    url: str,
    requests: Sequence[Request],
    clients: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    seed: int,
) -> ClientShare:
    latencies = array("d")
    statuses: Counter[str] = Counter()
    ok_items = 0
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    grpc_call = _grpc_caller(url, timeout_s) if any(r.method == "GRPC" for r in requests) else None
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s

        async def client() -> None:
            nonlocal ok_items
            while True:
                request = requests[rng.randrange(len(requests))]
                sent = time.monotonic()
                if sent >= stop_at:
                    return
                try:
                    if request.method == "GRPC":
                        assert grpc_call is not None
                        status, headers, body = await grpc_call(request)
                    else:
                        async with session.request(
                            request.method,
                            request.path,
                            data=request.body,
                            headers={"Content-Type": request.content_type, **dict(request.headers)},
                        ) as response:
                            body = await response.read()
                            status, headers = str(response.status), response.headers
                    if (
                        request.check is not None
                        and status.startswith("2")
                        and not request.check(headers, body)
                    ):
                        status = BAD_ANSWER
                except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
                    status = _status_key(exc)
                done = time.monotonic()
                if measure_from <= done <= stop_at:
                    statuses[status] += 1
                    if status.startswith("2"):
                        latencies.append(done - sent)
                        ok_items += request.items

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        # Requests still in flight end after the window and are not counted.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if grpc_call is not None:
        await grpc_call.close()
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return ClientShare(latencies.tobytes(), ok_items, dict(statuses), cpu_s, duration_s)


def _grpc_caller(url: str, timeout_s: float):
    """A unary gRPC call on one channel to ``url``'s host at the service's gRPC port:
    request bytes in, (status, headers, body) out, ``"200"`` for OK, as HTTP requests
    count; the messages travel serialised, so the client decodes nothing it need not."""
    from urllib.parse import urlparse

    import grpc

    from bench.payloads import GRPC_PORT

    channel = grpc.aio.insecure_channel(f"{urlparse(url).hostname}:{GRPC_PORT}")
    calls: dict[str, Any] = {}

    async def call(request: Request) -> tuple[str, dict, bytes]:
        method = calls.get(request.path) or calls.setdefault(
            request.path, channel.unary_unary(request.path)
        )
        try:
            return "200", {}, await method(request.body, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return f"grpc:{error.code().name}", {}, b""

    call.close = channel.close  # type: ignore[attr-defined]
    return call


def _client_process(
    url: str,
    requests: Sequence[Request],
    clients: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    seed: int,
    barrier,
    results,
) -> None:
    barrier.wait(timeout=START_TIMEOUT_S)
    share = _drive(url, requests, clients, warmup_s, duration_s, timeout_s, seed)
    results.put(asyncio.run(share))


def summarise(
    workload: Workload,
    concurrency: int,
    duration_s: float,
    shares: Sequence[ClientShare],
) -> PointResult:
    latencies = np.concatenate(
        [np.frombuffer(s.latencies_s, dtype=np.float64) for s in shares] or [np.empty(0)]
    )
    statuses: Counter[str] = Counter()
    for share in shares:
        statuses.update(share.statuses)
    ok = int(latencies.size)
    requests = sum(statuses.values())
    if ok:
        values = np.percentile(latencies * 1000, PERCENTILES)
        latency_ms = {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, values, strict=True)}
        latency_ms["mean"] = round(float(latencies.mean() * 1000), 3)
        latency_ms["max"] = round(float(latencies.max() * 1000), 3)
    else:
        latency_ms = {}
    cpu_s = sum(s.cpu_s for s in shares)
    return PointResult(
        workload=workload.name,
        endpoint=workload.endpoint,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=requests,
        ok=ok,
        requests_per_s=round(ok / duration_s, 2),
        items_per_s=round(sum(s.ok_items for s in shares) / duration_s, 2),
        latency_ms=latency_ms,
        statuses=dict(sorted(statuses.items())),
        errors=requests - ok,
        client_processes=len(shares),
        client_cpu_s=round(cpu_s, 3),
        client_cpu_core_percent=round(100 * cpu_s / duration_s, 1),
        client_cpu_machine_percent=round(100 * cpu_s / duration_s / (os.cpu_count() or 1), 1),
    )


def run_closed_loop(
    url: str,
    workload: Workload,
    concurrency: int,
    duration_s: float,
    *,
    warmup_s: float = 1.0,
    processes: int | None = None,
    timeout_s: float = 30.0,
    seed: int = 0,
    on_window: Callable[[str], None] | None = None,
) -> PointResult:
    """Drive ``url`` with ``concurrency`` closed-loop clients and summarise the window.

    ``on_window("start")`` and ``on_window("end")`` are called (in this process)
    when the measured window opens and closes, so a caller can read the server's
    counters over the same seconds.
    """
    counts = split_concurrency(concurrency, processes or default_client_processes())
    # "spawn": the parent may hold threads (torch, a server watcher) that fork would copy.
    context = multiprocessing.get_context("spawn")
    # This process waits at the barrier too, so it knows when the clients start.
    barrier = context.Barrier(len(counts) + 1)
    results = context.Queue()
    workers = [
        context.Process(
            target=_client_process,
            args=(
                url,
                workload.requests,
                clients,
                warmup_s,
                duration_s,
                timeout_s,
                seed * 1000 + index,
                barrier,
                results,
            ),
            daemon=True,
        )
        for index, clients in enumerate(counts)
    ]
    for worker in workers:
        worker.start()
    deadline = START_TIMEOUT_S + warmup_s + duration_s + timeout_s
    try:
        barrier.wait(timeout=START_TIMEOUT_S)
        if on_window is not None:
            started = time.monotonic()
            time.sleep(warmup_s)
            on_window("start")
            time.sleep(max(0.0, started + warmup_s + duration_s - time.monotonic()))
            on_window("end")
        shares = [results.get(timeout=deadline) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=timeout_s)
            if worker.is_alive():
                worker.terminate()
    return summarise(workload, concurrency, duration_s, shares)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the service")
    parser.add_argument("--workload", default="classify", help="see bench.payloads")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds first")
    parser.add_argument("--processes", type=int, default=default_client_processes())
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    workload = build_workloads(args.data_dir, [args.workload])[args.workload]
    result = run_closed_loop(
        args.url,
        workload,
        args.concurrency,
        args.duration,
        warmup_s=args.warmup,
        processes=args.processes,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
