"""The least a batched classify server can be: Starlette, python-multipart, Pillow,
the project's ONNX model and a small asyncio micro-batcher, one uvicorn worker.

It is the yardstick for the service's own request path: what one process on this
machine does for a single-image ``/classify`` when nothing else is in the way (no
limits, no metrics, no cancellation, no decode budget, no error shape).

    uvicorn bench.peers.minimal_batched:app --port 8000   # POST /classify, GET /readyz
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.peers.minimal import MAX_BATCH_SIZE, MAX_LATENCY_MS, Classifier, decode


class MicroBatcher:
    """Rows from concurrent requests share one model call: the first row waits at most
    ``max_latency_s`` for others, a batch holds at most ``max_batch_size`` rows, and the
    model runs on one thread beside the event loop."""

    def __init__(self, model, max_batch_size: int, max_latency_s: float) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.consumer: asyncio.Task | None = None

    async def predict(self, row: np.ndarray) -> dict:
        if self.consumer is None:
            self.consumer = asyncio.create_task(self._consume())
        answer = asyncio.get_running_loop().create_future()
        await self.queue.put((row, answer))
        return await answer

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_latency_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            rows = np.stack([row for row, _ in batch])
            results = await loop.run_in_executor(self.thread, self.model, rows)
            for (_, answer), result in zip(batch, results, strict=True):
                answer.set_result(result)


batcher = MicroBatcher(Classifier(), MAX_BATCH_SIZE, MAX_LATENCY_MS / 1000)


async def classify(request: Request) -> JSONResponse:
    async with request.form() as form:
        upload = form["image"]
        row = decode(await upload.read())
    return JSONResponse(await batcher.predict(row))


async def ready(_request: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", ready)])
