"""The classify job on BentoML's own adaptive batching, as its documentation shows it:
a ``batchable=True`` API taking a list of uploads, ``max_batch_size`` and
``max_latency_ms`` from the benchmark configuration. Under load its dispatcher
answers 503 once its estimate of the queueing time passes ``max_latency_ms``.

    PEER_MAX_LATENCY_MS=20 bentoml serve bench.peers.bentoml_peer:BatchableClassifier
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np

from bench.peers.minimal import MAX_BATCH_SIZE, MAX_LATENCY_MS, Classifier, decode


@bentoml.service(name="peer-batchable-classifier", workers=1)
class BatchableClassifier:
    def __init__(self) -> None:
        self.classifier = Classifier()

    @bentoml.api(
        route="/classify",
        batchable=True,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def classify(self, image: list[Path]) -> list[dict]:
        rows = np.stack([decode(path.read_bytes()) for path in image])
        return self.classifier(rows)
