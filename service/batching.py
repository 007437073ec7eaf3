"""Adaptive batching: items from concurrent requests share one model call.

Each endpoint owns an ``AdaptiveBatcher``. Requests ``submit`` their items
(one image, one text, the n latent vectors of a /generate request) and await
their results; a single consumer task per batcher takes queued items in
arrival order and runs them through the model in a dedicated thread, so the
event loop keeps reading requests while the model works.

The batch size adapts to the load:

* while the model is busy, new items queue up, and the next call takes all of
  them, up to ``max_batch_size``;
* when the model is idle and the queue holds fewer than ``max_batch_size``
  items, the batcher waits for more only while other requests to the same
  endpoint are still arriving (being received or decoded), and never longer
  than ``max_latency_ms`` after the oldest queued item came in. A lone client
  therefore never waits for a batch to fill.

Nothing is dropped under load: a request waits its turn (unlike BentoML's
dispatcher, which answers 503 once its latency estimate exceeds
``max_latency_ms``). Only when more than ``max_queue_items`` items are
already waiting is a new request refused with ``QueueFull``.

A request with more items than ``max_batch_size`` is split over several model
calls, so the model never sees more than ``max_batch_size`` rows at once.

With a ``prepare_batch`` stage (images to decode before the model can run), a
batch is prepared on a second thread while the model runs the batch before it:
the two stages overlap, as an HTTP server's event loop and its model thread
do, instead of taking turns on one thread. At most one batch waits prepared.
``isolate_requests`` keeps every model call to the items of a single request
(used when batching is switched off, and for the generator when a model's
outputs are not bitwise independent of what else is in the batch).

This module is free of BentoML and of any model; ``run_batch`` is any
blocking function from a list of items to a list of results.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service import tracing
from service.request_log import CURRENT

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many items are already waiting; the caller should retry later."""


@dataclass(eq=False)
class _Job(Generic[ItemT, ResultT]):
    """One request's items and where their results go."""

    items: Sequence[ItemT]
    future: asyncio.Future[list[ResultT]]
    enqueued_at: float
    results: list[Any] = field(init=False)
    next_index: int = 0  # first item not yet taken into a batch
    remaining: int = field(init=False)  # items whose results are still missing
    batch_size: int = 0  # items in the last batch its items ran in
    # With tracing on (service.tracing): the request's span, when it was queued, and
    # (taken, model start, model end, batch size, the batch's span) of its last batch.
    trace_context: Any = None
    enqueued_ns: int = 0
    trace: tuple[int, int, int, int, Any] | None = None

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)


class AdaptiveBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        max_batch_size: int,
        max_latency_ms: float,
        max_queue_items: int = 4096,
        isolate_requests: bool = False,
        arriving_requests: Callable[[], int] = lambda: 0,
        observe_batch: Callable[[int], None] | None = None,
        prepare_batch: Callable[[list[ItemT]], list[Any]] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_latency_s = max(0.0, max_latency_ms) / 1000
        self.max_queue_items = max_queue_items
        self.isolate_requests = isolate_requests
        self._run_batch = run_batch
        # Requests to this endpoint that are in the server but have not submitted yet
        # (the caller subtracts the ones this batcher already holds).
        self._arriving_requests = arriving_requests
        self._observe_batch = observe_batch
        self._prepare_batch = prepare_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._prepare_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prepare-{name}")
            if prepare_batch is not None
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: collections.deque[_Job[ItemT, ResultT]] = collections.deque()
        self._queued_items = 0
        self._active_requests = 0  # submitted and not yet answered
        self._wakeup: asyncio.Event | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._model_call: asyncio.Task[None] | None = None  # the batch in the model

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def is_full(self) -> bool:
        """No request can be queued now (``submit`` would raise ``QueueFull``)."""
        return self._queued_items >= self.max_queue_items

    def close(self) -> None:
        """Stop for good, once no request waits (a model version taken out of service):
        its consumer ends and its threads exit, so the model it holds can be freed."""
        for task in (self._consumer, self._model_call):
            if task is not None and not task.done():
                task.cancel()
        self._executor.shutdown(wait=False)
        if self._prepare_executor is not None:
            self._prepare_executor.shutdown(wait=False)
        # The model's bound methods hold its task, which holds this batcher: without the
        # cycle, the version is freed as soon as the slot lets go of it.
        self._run_batch = self._prepare_batch = self._observe_batch = None  # type: ignore[assignment]

    async def submit(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Queue one request's items; return their results in the same order."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._start(loop)
        if self._queued_items + len(items) > self.max_queue_items and self._queued_items:
            raise QueueFull(
                f"{self.name}: {self._queued_items} items are already waiting "
                f"(limit {self.max_queue_items})"
            )
        job: _Job[ItemT, ResultT] = _Job(items, loop.create_future(), loop.time())
        if tracing.active():
            job.trace_context, job.enqueued_ns = tracing.current_context(), time.time_ns()
        self._jobs.append(job)
        self._queued_items += len(items)
        self._active_requests += 1
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            results = await job.future
            if (context := CURRENT.get()) is not None:
                context.batch_size = job.batch_size
            if job.trace is not None:
                tracing.request_batch_spans(job.enqueued_ns, *job.trace)
            return results
        finally:
            self._active_requests -= 1
            if job.future.cancelled():
                # The caller has gone: its items stop counting against the queue at once
                # and are skipped when they reach its head; none joins a later batch.
                self._queued_items -= len(job.items) - job.next_index
                job.next_index = len(job.items)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the consumer on this event loop (a new loop gets a fresh queue)."""
        for task in (self._consumer, self._model_call):
            if task is not None and not task.done():
                task.cancel()
        self._model_call = None
        self._loop = loop
        self._jobs.clear()
        self._queued_items = 0
        self._active_requests = 0  # submitted and not yet answered
        self._wakeup = asyncio.Event()
        self._consumer = loop.create_task(self._consume(), name=f"batcher-{self.name}")

    async def _consume(self) -> None:
        assert self._loop is not None and self._wakeup is not None
        while True:
            self._drop_abandoned()
            if not self._jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_fuller_batch()
            batch, parts = self._take_batch()
            if not batch:
                continue
            taken_ns = time.time_ns() if tracing.active() else 0
            if self._observe_batch is not None:
                self._observe_batch(len(batch))
            if self._prepare_executor is None:
                await self._run_model(batch, parts, taken_ns)
                continue
            try:  # while the previous batch is in the model
                prepared = await self._loop.run_in_executor(
                    self._prepare_executor, self._prepare_batch, batch
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._fail(parts, error, "preparing")
                continue
            if self._model_call is not None:
                await self._model_call
            self._model_call = self._loop.create_task(self._run_model(prepared, parts, taken_ns))

    async def _run_model(
        self,
        batch: list[Any],
        parts: list[tuple[_Job[ItemT, ResultT], int, int]],
        taken_ns: int = 0,
    ) -> None:
        """Run one batch through the model and hand each job its results (and, traced since
        ``taken_ns``, the batch's spans)."""
        assert self._loop is not None
        try:
            if taken_ns:
                started, results, ended = await self._loop.run_in_executor(
                    self._executor, self._timed_run, batch
                )
                requests = [job.trace_context for job, _, _ in parts]
                batch_context = tracing.batch_span(
                    self.name, len(batch), taken_ns, started, ended, requests
                )
                for job, _, _ in parts:
                    job.trace = (taken_ns, started, ended, len(batch), batch_context)
            else:
                results = await self._loop.run_in_executor(self._executor, self._run_batch, batch)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: the model returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._fail(parts, error, "running")
            return
        offset = 0
        for job, start, count in parts:
            job.batch_size = len(batch)
            job.results[start : start + count] = results[offset : offset + count]
            offset += count
            job.remaining -= count
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(job.results)

    def _timed_run(self, batch: list[Any]) -> tuple[int, Sequence[Any], int]:
        started = time.time_ns()
        results = self._run_batch(batch)
        return started, results, time.time_ns()

    def _fail(
        self, parts: list[tuple[_Job[ItemT, ResultT], int, int]], error: Exception, stage: str
    ) -> None:
        count = sum(count for _, _, count in parts)
        log.exception("%s: %s a batch of %d items failed", self.name, stage, count,
                      exc_info=error)  # fmt: skip
        for job, _, _ in parts:
            if not job.future.done():
                job.future.set_exception(error)

    async def _wait_for_fuller_batch(self) -> None:
        """Wait while the batch is not full and more requests are on their way."""
        if self.max_latency_s <= 0 or self.isolate_requests:
            return
        assert self._loop is not None and self._wakeup is not None
        deadline = self._jobs[0].enqueued_at + self.max_latency_s
        while (
            self._queued_items < self.max_batch_size
            and self._arriving_requests() - self._active_requests > 0
        ):
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def _take_batch(self) -> tuple[list[ItemT], list[tuple[_Job[ItemT, ResultT], int, int]]]:
        """Pop up to ``max_batch_size`` items in arrival order, splitting a large request."""
        batch: list[ItemT] = []
        parts: list[tuple[_Job[ItemT, ResultT], int, int]] = []
        while self._jobs and len(batch) < self.max_batch_size:
            job = self._jobs[0]
            if job.future.done():  # abandoned (timed out or failed) while queued
                self._jobs.popleft()
                self._queued_items -= len(job.items) - job.next_index
                continue
            if self.isolate_requests and parts:
                break
            start = job.next_index
            count = min(len(job.items) - start, self.max_batch_size - len(batch))
            batch.extend(job.items[start : start + count])
            parts.append((job, start, count))
            job.next_index += count
            self._queued_items -= count
            if job.next_index == len(job.items):
                self._jobs.popleft()
            if self.isolate_requests:
                break
        return batch, parts

    def _drop_abandoned(self) -> None:
        while self._jobs and self._jobs[0].future.done():
            job = self._jobs.popleft()
            self._queued_items -= len(job.items) - job.next_index
