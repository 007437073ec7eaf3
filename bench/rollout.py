"""A model version swapped in under load: errors, which version answered each request,
the time the swap took, and the latency before and during it.

    python -m bench.rollout [--clients 256] [--duration 20] [--swap-at 10] [--data-dir ...]

It serves the committed models with 2 workers, API keys on and a private model store
and state directory, adds a second version of the MNIST classifier from a smoke
training run (``training.pipeline --quick``), drives ``--clients`` closed-loop clients
on ``/classify`` with real MNIST test digits, and at ``--swap-at`` seconds asks the
service to serve the new version (``POST /admin/models/mnist-cnn/activate``). The
figures go to standard output and ``bench-results/rollout.json``.

``drive`` and ``swap_summary`` are what the tests measure a swap with, too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

from bench.payloads import default_data_dir, png_bytes, read_mnist_test_digits
from bench.server import REPO_ROOT, ServiceProcess

MODEL = "mnist-cnn"
VERSION_HEADER = "X-Model-Version"


@dataclass(frozen=True)
class Answer:
    sent_s: float  # since the run started
    done_s: float
    status: int  # 0: no answer (a connection error)
    version: str | None
    body: bytes | None = None  # with ``keep_bodies``


async def drive(
    url: str,
    bodies: Sequence[bytes],
    headers: dict[str, str],
    clients: int,
    duration_s: float,
    events: Sequence[tuple[float, Callable[[], Awaitable[object]]]] = (),
    *,
    max_requests: int | None = None,
    keep_bodies: bool = False,
) -> tuple[list[Answer], list[tuple[float, float, object]]]:
    """``clients`` closed-loop clients POST ``bodies`` (in turn) to ``url`` for
    ``duration_s`` (or until ``max_requests`` are sent); each of ``events`` (at seconds,
    coroutine function) runs at its time.

    Returns every answer, and (started, finished, result) of each event, in seconds
    since the start."""
    answers: list[Answer] = []
    outcomes: list[tuple[float, float, object]] = []
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        sent_count = 0

        async def client(index: int) -> None:
            nonlocal sent_count
            turn = index
            while time.perf_counter() < deadline and sent_count != max_requests:
                sent_count += 1
                body = bodies[turn % len(bodies)]
                turn += clients
                sent = time.perf_counter() - start
                answer = None
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        answer = await response.read()
                        status, version = response.status, response.headers.get(VERSION_HEADER)
                except (TimeoutError, aiohttp.ClientError):
                    status, version = 0, None
                kept = answer if keep_bodies else None
                answers.append(Answer(sent, time.perf_counter() - start, status, version, kept))

        async def event(at_s: float, call: Callable[[], Awaitable[object]]) -> None:
            await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
            began = time.perf_counter() - start
            result = await call()
            outcomes.append((began, time.perf_counter() - start, result))

        await asyncio.gather(
            *(client(index) for index in range(clients)),
            *(event(at_s, call) for at_s, call in events),
        )
    return answers, outcomes


async def post_json(url: str, body: object, headers: dict[str, str]) -> tuple[int, object]:
    """One JSON POST: (status, the JSON answer)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


def swap_summary(
    answers: Sequence[Answer], swap_began_s: float, swap_done_s: float, old: str, new: str
) -> dict[str, object]:
    """The figures of one swap: errors, versions after it, and latency before and during."""

    def latencies_ms(selected: list[Answer]) -> np.ndarray:
        if not selected:
            return np.zeros(1)
        return np.array([(a.done_s - a.sent_s) * 1000 for a in selected])

    before = [a for a in answers if a.done_s < swap_began_s]
    during = [a for a in answers if a.done_s >= swap_began_s and a.sent_s <= swap_done_s]
    after = [a for a in answers if a.sent_s > swap_done_s]
    p99_before = float(np.percentile(latencies_ms(before), 99))
    p99_during = float(np.percentile(latencies_ms(during), 99))
    return {
        "requests": len(answers),
        "errors": sum(a.status != 200 for a in answers),
        "without_version": sum(a.status == 200 and not a.version for a in answers),
        "switch_s": round(swap_done_s - swap_began_s, 3),
        "answers_before": len(before),
        "answers_during": len(during),
        "answers_after": len(after),
        "old_version_after_swap": sum(a.version == old for a in after),
        "new_version_after_swap": sum(a.version == new for a in after),
        "p50_ms_before": round(float(np.percentile(latencies_ms(before), 50)), 2),
        "p99_ms_before": round(p99_before, 2),
        "p99_ms_during": round(p99_during, 2),
        "p99_ratio": round(p99_during / p99_before, 2) if p99_before else None,
    }


def smoke_version(store: str, data_dir: Path, scratch: Path) -> str:
    """Train, verify and register a smoke MNIST classifier; its model store version."""
    command = [sys.executable, "-m", "training.pipeline", "--model", MODEL, "--quick",
               "--artifacts-dir", str(scratch), "--data-dir", str(data_dir)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "BENTOML_HOME": store},
                          capture_output=True, text=True, check=True)  # fmt: skip
    marker = f"{MODEL}: registered as {MODEL}:"
    line = next(line for line in done.stderr.splitlines() if marker in line)
    return line.split(marker)[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--swap-at", type=float, default=10.0, help="seconds into the load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench-results" / "rollout.json")
    args = parser.parse_args(argv)

    admin_key, client_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    scratch = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    (scratch / "api-keys").write_text(f"ops admin {admin_key}\nclient infer {client_key}\n")
    env = {
        "SERVING_WORKERS": str(args.workers),
        "SERVING_API_KEYS_FILE": str(scratch / "api-keys"),
        "SERVING_STATE_DIR": str(scratch / "state"),
    }
    images = read_mnist_test_digits(args.data_dir, count=512)
    bodies = [png_bytes(image) for image in images]
    with ServiceProcess(env, scratch / "server.log") as server:
        assert server.store is not None
        new = smoke_version(server.store, args.data_dir, scratch / "artifacts")
        admin = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
        old = json.loads(_get(f"{server.url}/admin/models", admin))["models"][0]["serving"]

        activation = f"{server.url}/admin/models/{MODEL}/activate"

        async def activate() -> tuple[int, object]:
            return await post_json(activation, {"version": new}, admin)

        headers = {"Authorization": f"Bearer {client_key}", "Content-Type": "image/png"}
        load = drive(f"{server.url}/classify", bodies, headers, args.clients, args.duration,
                     [(args.swap_at, activate)])  # fmt: skip
        answers, [(began, done, (status, _))] = asyncio.run(load)
    summary = {"clients": args.clients, "workers": args.workers, "activate_status": status,
               "old": old, "new": new, **swap_summary(answers, began, done, old, new)}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if status == 200 and summary["errors"] == 0 else 1


def _get(url: str, headers: dict[str, str]) -> str:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
        return response.read().decode()


if __name__ == "__main__":
    raise SystemExit(main())
