"""Peers: the same classify job written the way a user of another framework would.

They exist to be benchmarked side by side with the service (``make bench-peers``,
``bench/configs/peers.toml``), on the same payloads and load generator. They use
the project's own ONNX export of the classifier (``models/artifacts/mnist-cnn/
model.onnx``) with one ONNX Runtime thread and a minimal image decode: PIL
opens the PNG, converts it to grayscale, resizes it to 28×28 and normalises it.

* ``litserve_peer``: LitServe with its dynamic batching;
* ``bentoml_peer``: BentoML's own ``@bentoml.api(batchable=True)`` dispatcher;
* ``bench.ceiling``: a bare Starlette endpoint doing no work at all.

They are benchmarks, not part of the service: dev dependencies only.
"""
