"""The ceiling of this machine's HTTP stack: the load generator against a bare
Starlette endpoint under uvicorn (the server stack BentoML runs on), with no
model and no framework work. It tells how fast the load generator can go and
what the service's own per-request work costs in comparison.

    python -m bench.ceiling --workers 1 --concurrency 64 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.loadgen import default_client_processes, run_closed_loop
from bench.payloads import build_workloads, default_data_dir
from bench.server import REPO_ROOT, free_port, http_get


async def answer(request: HttpRequest) -> JSONResponse:
    await request.body()  # read the upload, as a real endpoint must
    return JSONResponse({"label": "7", "probabilities": [0.1] * 10})


async def ready(_request: HttpRequest) -> JSONResponse:
    return JSONResponse({"ready": True})


app = Starlette(
    routes=[Route("/readyz", ready), Route("/{endpoint:path}", answer, methods=["POST"])]
)


def start_server(port: int, workers: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "bench.ceiling:app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers), "--log-level", "warning",
               "--no-access-log"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http_get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)[0] == 200:
                return process
        except OSError:
            time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    raise TimeoutError("the bare Starlette server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--workload", default="classify", help="which bodies to send")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-processes", type=int, default=default_client_processes())
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    workload = build_workloads(args.data_dir or default_data_dir(), [args.workload])[args.workload]
    port = free_port()
    server = start_server(port, args.workers)
    results = []
    try:
        for concurrency in args.concurrency:
            point = run_closed_loop(
                f"http://127.0.0.1:{port}",
                workload,
                concurrency,
                args.duration,
                warmup_s=args.warmup,
                processes=args.client_processes,
            )
            results.append({"server_workers": args.workers, **point.to_dict()})
            print(
                f"c={concurrency:<4d} {point.requests_per_s:9.1f} req/s  "
                f"p50 {point.latency_ms.get('p50', float('nan')):6.2f} ms  "
                f"p99 {point.latency_ms.get('p99', float('nan')):6.2f} ms  "
                f"errors {point.errors}  client CPU {point.client_cpu_core_percent:.0f}% of a core "
                f"({1e6 * point.client_cpu_s / max(point.requests, 1):.0f} µs per request)"
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
