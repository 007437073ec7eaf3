"""What a worker holds now, on ``/metrics``: sampled once a second on its event loop,
so that nothing on the request path pays for it.

* ``serving_queued_items{endpoint}``: items waiting in the model's batchers (every
  version's), summed over the workers;
* ``serving_open_connections``: open HTTP connections, summed;
* ``serving_workers_ready``: workers whose models are loaded (a worker counts from
  its first sample until it exits; a killed worker's gauges are dropped within
  ``FORGET_EVERY`` samples by the workers still running);
* ``serving_worker_resident_memory_bytes{pid}``: each worker's resident memory;
* ``serving_model_version_share{endpoint, version}``: the share of the model's
  requests each version gets (``publish_versions``, on every change).

The dashboards and alerts in ``deploy/observability`` read these.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from service.connections import OPEN
from service.heap_snapshots import resident_bytes
from service.metrics import forget_dead_workers, worker_gauges

log = logging.getLogger(__name__)

SAMPLE_S = 1.0
# Every this many samples, the gauges of workers that died are dropped.
FORGET_EVERY = 5


def publish_versions(models: Mapping[str, Any], retired: Mapping[str, set[str]]) -> None:
    """Each model's versions and their shares (``models``: endpoint → ``ModelSlot``);
    the ``retired`` versions (endpoint → versions) go to 0."""
    share = worker_gauges().version_share
    for endpoint, versions in retired.items():
        for version in versions:
            share.labels(endpoint, version).set(0.0)
    for endpoint, slot in models.items():
        canary = slot.canary_percent / 100 if slot.canary is not None else 0.0
        share.labels(endpoint, slot.serving.version).set(1.0 - canary)
        if slot.canary is not None:
            share.labels(endpoint, slot.canary.version).set(canary)


class WorkerSampler:
    """Sets the worker's gauges every ``SAMPLE_S`` while it runs."""

    def __init__(self, models: Mapping[str, Any]) -> None:
        """``models``: endpoint → ``ModelSlot`` (the live mapping: versions change)."""
        self.models = models
        self.gauges = worker_gauges()
        self.queued = {key: self.gauges.queued_items.labels(key) for key in models}
        self._task: asyncio.Task[None] | None = None
        self._samples = 0

    def start(self) -> None:
        self.gauges.ready.set(1)
        publish_versions(self.models, {})
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def sample(self) -> None:
        self._samples += 1
        if self._samples % FORGET_EVERY == 0:
            forget_dead_workers(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        for key, slot in self.models.items():
            tasks = (slot.serving, slot.canary) if slot.canary is not None else (slot.serving,)
            self.queued[key].set(sum(task.batcher.queued_items for task in tasks))
        self.gauges.open_connections.set(OPEN.count())
        self.gauges.memory.set(resident_bytes())

    async def _run(self) -> None:
        failed = False
        while True:
            try:
                self.sample()
            except Exception:  # a sample lost is no reason to stop; said once
                if not failed:
                    log.exception("sampling the worker's gauges failed")
                failed = True
            await asyncio.sleep(SAMPLE_S)
