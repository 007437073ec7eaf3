"""Every setting of the service, read once from environment variables.

Start the service with any of these set to change its behaviour, e.g.::

    SERVING_DEVICE=cpu SERVING_CLASSIFY_MAX_BATCH_SIZE=32 \\
        bentoml serve service.service:ServingService --port 3000

Device and inference backend
    SERVING_DEVICE              auto | cpu | cuda | cuda:N   (default auto: the first GPU the
                                NVIDIA driver reports, else the CPU)
    SERVING_BACKEND             auto | torch | onnx          default backend of every model
    SERVING_<ENDPOINT>_BACKEND  per-model override, named after the model's endpoint: CLASSIFY,
                                SENTIMENT or GENERATE (the older CLASSIFIER and GENERATOR
                                still work); auto picks the fastest measured for the device
                                (``AUTO_BACKEND``)
    SERVING_PRECISION           auto | fp32 | fp16 | int8    default precision of every model
    SERVING_<ENDPOINT>_PRECISION
                                per-model override; auto is fp16 for PyTorch on CUDA, else fp32;
                                ONNX fp16/int8 need the exported model.fp16.onnx / model.int8.onnx
    SERVING_THREADS             intra-op threads of each model (default: the worker's share of
                                the CPUs, less one for the LSTM; see ``threads_per_model``)
    SERVING_WORKERS             BentoML worker processes, each with its own models (default 1)

Models (BentoML model store tags; ``BENTOML_HOME`` chooses the store)
    SERVING_<ENDPOINT>_TAG      default: the version pinned in models/served_models.json
                                (what ``python -m training.register`` imported from
                                models/artifacts/), else ``<name>:latest``

Adaptive batching, per endpoint (<ENDPOINT> is CLASSIFY, SENTIMENT or GENERATE)
    SERVING_BATCHING                    on | off   (default on; off runs every request alone)
    SERVING_<ENDPOINT>_MAX_BATCH_SIZE   most items one model call may take (see ``_BATCHING``)
    SERVING_<ENDPOINT>_MAX_LATENCY_MS   longest the oldest queued item waits for a fuller batch
                                        while other requests are still arriving
    SERVING_MAX_QUEUE_ITEMS             items queued per endpoint before answering 503 (4096)

Request limits (every violation is a 4xx with a JSON body naming the problem)
    SERVING_MAX_BODY_BYTES          request body size (default 16 MiB)
    SERVING_MAX_IMAGE_PIXELS        width × height of one image (default 16,777,216 = 4096²)
    SERVING_MAX_REQUEST_PIXELS      decoded pixels of one request's images in all (4 × 4096²)
    SERVING_MAX_DECODE_PIXELS       decoded pixels being decoded at once per worker (2 × 4096²)
    SERVING_MAX_ITEMS_PER_REQUEST   images or texts in one batch request (default 128)
    SERVING_MAX_TEXT_CHARS          characters in one text (default 2000)
    SERVING_MAX_GENERATE_N          images in one /generate request (default 64)
    SERVING_REQUEST_TIMEOUT_S       a request still unanswered after this gets a 504 (default 60)

HTTP connections, per worker (service.connections)
    SERVING_MAX_HEADER_BYTES        request line and headers of one request (default 32 KiB; 431)
    SERVING_MAX_HEADERS             header fields of one request (default 100; 431)
    SERVING_HEADER_TIMEOUT_S        from a request's first byte to its last header (10; 408)
    SERVING_KEEPALIVE_TIMEOUT_S     an idle keep-alive connection is closed after this (5)
    SERVING_MAX_CONNECTIONS         open connections; a new one beyond gets a 503 (2048)
    SERVING_DRAIN_S                 at shutdown, connections still open after this are closed (30)
    SERVING_DRAIN_IDLE_S            at shutdown, idle connections stay open this long and
                                    answer new requests 503 + Connection: close (1)

Logging
    SERVING_LOG_LEVEL               level of the service's own log (default INFO: the start-up
                                    summary, warnings and server errors; DEBUG adds one line per
                                    rejected request)
    SERVING_ACCESS_LOG              on | off   BentoML's per-request access log (default off:
                                    it costs throughput)
    SERVING_TRACING                 on | off   OpenTelemetry spans for the API routes (default
                                    off: BentoML records a span per request and per body chunk
                                    even when no exporter is configured, about a quarter of
                                    the event loop's time; turn on with a tracing exporter)

Diagnostics (off by default; see service.heap_snapshots)
    SERVING_HEAP_SNAPSHOT_DIR       each worker traces its Python heap and writes a
                                    tracemalloc snapshot into this folder at intervals
    SERVING_HEAP_SNAPSHOT_INTERVAL_S
                                    seconds between two snapshots (default 60)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from models.devices import DEVICE_NAMES, DeviceError, valid_device_name
from models.registry import REGISTRY

PREFIX = "SERVING_"

# One name per model in settings, metrics and logs: the endpoint it serves
# (SERVING_CLASSIFY_BACKEND, SERVING_CLASSIFY_MAX_BATCH_SIZE, endpoint="classify").
# The batch routes (/classify_batch, /sentiment_batch) share their model's name.
MODEL_KEYS: dict[str, str] = {spec.endpoints[0]: spec.name for spec in REGISTRY.values()}
ENDPOINTS = tuple(MODEL_KEYS)
# The per-model settings were first named after the model; a deployment may still
# set the old names, which keep working (the new name wins) with a warning.
RENAMED_MODEL_SETTINGS = {
    f"{PREFIX}{old}_{setting}": f"{PREFIX}{new}_{setting}"
    for old, new in (("CLASSIFIER", "CLASSIFY"), ("GENERATOR", "GENERATE"))
    for setting in ("BACKEND", "PRECISION", "TAG")
}

BACKENDS = ("torch", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")

# The backend ``auto`` resolves to, per device type and model. Measured with
# ``python -m bench.measure_backends`` (1 thread, median ms per call at batch 1 / 64):
#   mnist-cnn    torch 0.64 / 27.9   onnx 0.10 / 5.1
#   sst2-bilstm  torch 0.72 / 12.7   onnx 0.31 / 11.9
#   digit-gan    torch 1.39 / 32.2   onnx 0.49 / 29.4
# so ONNX Runtime on the CPU. The kept int8 graphs are faster still (sst2-bilstm
# 0.16 / 6.1 ms) but not bit-faithful, so they are opt-in (SERVING_<ENDPOINT>_PRECISION=int8).
# On CUDA the default is PyTorch in half precision under inference mode; it is not
# measured here (no GPU): run the same command on the GPU and override where ONNX wins.
AUTO_BACKEND: dict[str, dict[str, str]] = {
    "cpu": {"classify": "onnx", "sentiment": "onnx", "generate": "onnx"},
    "cuda": {"classify": "torch", "sentiment": "torch", "generate": "torch"},
}


@dataclass(frozen=True)
class BatchingConfig:
    """How one endpoint's batcher forms batches."""

    max_batch_size: int
    max_latency_ms: float


# Defaults per endpoint, chosen from measurements on the 2-core CPU machine (ONNX Runtime,
# 1 worker, `python -m bench.run --url ... --concurrency 64|256`, requests/s for
# classify / sentiment / generate n=1):
#   64 clients:  batch  8: 1051 / 999 / 841    16: 952 / 1112 / 1010
#                batch 32: 1112 / 1285 / 1122  64: 1156 / 1280 / 910
#   256 clients: batch 32: 930 / 1072 / 909    64: 1048 / 1227 / 894   128: 938 / 1003 / 875
#   wait 0 ms: 1100 / 1326 / 819    2 ms: 1156 / 1280 / 910    5 ms: 929 / 1152 / 1015
#   batching off: 566 / 487 / 393 (64 clients)
# 64 items and 2 ms are best or within noise everywhere. The CUDA defaults are not
# measured here (no GPU): larger batches cost a GPU almost nothing; tune with bench.
_BATCHING: dict[str, dict[str, BatchingConfig]] = {
    "cpu": {
        "classify": BatchingConfig(max_batch_size=64, max_latency_ms=2.0),
        "sentiment": BatchingConfig(max_batch_size=64, max_latency_ms=2.0),
        # The generator's cost is all model (about 0.5 ms a row): bigger batches amortise
        # its per-call overhead, 1.22× requests/s for n=16 at 64 clients with 256 against 64.
        "generate": BatchingConfig(max_batch_size=256, max_latency_ms=2.0),
    },
    "cuda": {
        "classify": BatchingConfig(max_batch_size=256, max_latency_ms=2.0),
        "sentiment": BatchingConfig(max_batch_size=256, max_latency_ms=2.0),
        "generate": BatchingConfig(max_batch_size=256, max_latency_ms=2.0),
    },
}


# Models whose intra-op pool leaves one of the worker's cores to its event loop.
SPARE_CORE_MODELS = frozenset({"sentiment"})


class SettingsError(ValueError):
    """A setting has a value the service cannot use."""


@dataclass(frozen=True)
class ModelSettings:
    """How one model is loaded and run."""

    key: str
    registry_name: str
    tag: str | None  # None: derive from the artifact's content (see service.model_store)
    backend: str  # torch | onnx | auto
    precision: str  # fp32 | fp16 | auto


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # Decoded pixels: of one request's images in all, and being decoded at once in a
    # worker (see service.memory). A large JPEG counts at its reduced decoding scale.
    max_request_pixels: int = 4 * 4096 * 4096
    max_decode_pixels: int = 2 * 4096 * 4096
    max_items_per_request: int = 128
    max_text_chars: int = 2000
    max_generate_n: int = 64


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits at the HTTP layer, per worker (enforced by ``service.connections``)."""

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 2048
    drain_s: float = 30.0
    drain_idle_s: float = 1.0


@dataclass(frozen=True)
class Settings:
    device: str = "auto"
    workers: int = 1
    threads: int | None = None
    batching_enabled: bool = True
    # Only the values set in the environment; the rest come from the device's defaults.
    max_batch_size: Mapping[str, int] = field(default_factory=dict)
    max_latency_ms: Mapping[str, float] = field(default_factory=dict)
    max_queue_items: int = 4096
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    request_timeout_s: float = 60.0
    log_level: str = "INFO"
    access_log: bool = False
    tracing: bool = False
    heap_snapshot_dir: str | None = None
    heap_snapshot_interval_s: float = 60.0
    # Old variable names found in the environment (see RENAMED_MODEL_SETTINGS).
    renamed_in_use: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        env = _Env(environ)
        workers = env.integer("WORKERS", 1, minimum=1)
        models = {
            key: ModelSettings(
                key=key,
                registry_name=name,
                tag=env.text(f"{key.upper()}_TAG", None),
                backend=env.choice(
                    f"{key.upper()}_BACKEND",
                    env.choice("BACKEND", "auto", ("auto", *BACKENDS)),
                    ("auto", *BACKENDS),
                ),
                precision=env.choice(
                    f"{key.upper()}_PRECISION",
                    env.choice("PRECISION", "auto", ("auto", *PRECISIONS)),
                    ("auto", *PRECISIONS),
                ),
            )
            for key, name in MODEL_KEYS.items()
        }
        # Unset batch sizes and waits are filled in per device once the device is known.
        sizes = {e: env.integer(f"{e.upper()}_MAX_BATCH_SIZE", None, minimum=1) for e in ENDPOINTS}
        waits = {e: env.number(f"{e.upper()}_MAX_LATENCY_MS", None, minimum=0.0) for e in ENDPOINTS}
        return cls(
            device=_device(env.text("DEVICE", "auto")),
            workers=workers,
            threads=env.integer("THREADS", None, minimum=1),
            batching_enabled=env.flag("BATCHING", True),
            max_batch_size={e: size for e, size in sizes.items() if size is not None},
            max_latency_ms={e: wait for e, wait in waits.items() if wait is not None},
            max_queue_items=env.integer("MAX_QUEUE_ITEMS", 4096, minimum=1),
            models=models,
            limits=Limits(
                max_body_bytes=env.integer("MAX_BODY_BYTES", Limits.max_body_bytes, minimum=1024),
                max_image_pixels=env.integer(
                    "MAX_IMAGE_PIXELS", Limits.max_image_pixels, minimum=28 * 28
                ),
                max_request_pixels=env.integer(
                    "MAX_REQUEST_PIXELS", Limits.max_request_pixels, minimum=28 * 28
                ),
                max_decode_pixels=env.integer(
                    "MAX_DECODE_PIXELS", Limits.max_decode_pixels, minimum=28 * 28
                ),
                max_items_per_request=env.integer(
                    "MAX_ITEMS_PER_REQUEST", Limits.max_items_per_request, minimum=1
                ),
                max_text_chars=env.integer("MAX_TEXT_CHARS", Limits.max_text_chars, minimum=1),
                max_generate_n=env.integer("MAX_GENERATE_N", Limits.max_generate_n, minimum=1),
            ),
            connections=ConnectionLimits(
                max_header_bytes=env.integer(
                    "MAX_HEADER_BYTES", ConnectionLimits.max_header_bytes, minimum=1024
                ),
                max_headers=env.integer("MAX_HEADERS", ConnectionLimits.max_headers, minimum=8),
                header_timeout_s=env.number(
                    "HEADER_TIMEOUT_S", ConnectionLimits.header_timeout_s, minimum=0.1
                ),
                keepalive_timeout_s=env.number(
                    "KEEPALIVE_TIMEOUT_S", ConnectionLimits.keepalive_timeout_s, minimum=0.1
                ),
                max_connections=env.integer(
                    "MAX_CONNECTIONS", ConnectionLimits.max_connections, minimum=1
                ),
                drain_s=env.number("DRAIN_S", ConnectionLimits.drain_s, minimum=0.0),
                drain_idle_s=env.number("DRAIN_IDLE_S", ConnectionLimits.drain_idle_s, minimum=0.0),
            ),
            request_timeout_s=env.number("REQUEST_TIMEOUT_S", 60.0, minimum=0.1),
            log_level=env.choice(
                "LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ).upper(),
            access_log=env.flag("ACCESS_LOG", False),
            tracing=env.flag("TRACING", False),
            heap_snapshot_dir=env.text("HEAP_SNAPSHOT_DIR", None),
            heap_snapshot_interval_s=env.number("HEAP_SNAPSHOT_INTERVAL_S", 60.0, minimum=1.0),
            renamed_in_use=tuple(old for old in RENAMED_MODEL_SETTINGS if old in environ),
        )

    def threads_per_model(self, key: str | None = None, cpu_count: int | None = None) -> int:
        """Intra-op threads for model ``key``: the worker's share of the CPUs, less one
        for a model in ``SPARE_CORE_MODELS`` (and for PyTorch's process-wide pool, ``None``).

        With ONNX Runtime's idle threads asleep instead of spinning, a second thread
        costs the event loop nothing while it waits, and the convolutional models use
        it on every batch: on the 2-core machine 2 threads instead of 1 gave generate
        n=16 1.19× and the 1,024-image request a 0.89× p50, with classify within noise
        (1.03×). The LSTM's batches are many small sequential steps, where a second
        thread only adds hand-offs (sentiment 0.93×), so it leaves that core to HTTP.
        """
        if self.threads is not None:
            return self.threads
        share = max(1, (cpu_count or os.cpu_count() or 1) // self.workers)
        return max(1, share - 1) if key is None or key in SPARE_CORE_MODELS else share

    def resolve_batching(self, device_type: str) -> dict[str, BatchingConfig]:
        """The batching of every endpoint on this device: the measured defaults, overridden."""
        defaults = _BATCHING["cuda" if device_type == "cuda" else "cpu"]
        return {
            endpoint: BatchingConfig(
                max_batch_size=self.max_batch_size.get(endpoint, base.max_batch_size),
                max_latency_ms=self.max_latency_ms.get(endpoint, base.max_latency_ms),
            )
            for endpoint, base in defaults.items()
        }


@functools.cache
def current_settings() -> Settings:
    """The settings of this process, read from the environment once."""
    return Settings.from_env()


def resolve_backend(model: ModelSettings, device_type: str, torch_installed: bool = True) -> str:
    """``auto`` → the measured default for this device; ONNX Runtime where torch is absent."""
    if model.backend != "auto":
        return model.backend
    if not torch_installed:
        return "onnx"
    return AUTO_BACKEND["cuda" if device_type == "cuda" else "cpu"][model.key]


def resolve_precision(model: ModelSettings, backend: str, device_type: str) -> str:
    """``auto`` is half precision for PyTorch on the GPU, where it keeps parity; fp32 elsewhere."""
    if model.precision != "auto":
        return model.precision
    return "fp16" if device_type == "cuda" and backend == "torch" else "fp32"


def _device(value: str) -> str:
    try:
        return valid_device_name(value)
    except DeviceError:
        raise SettingsError(f"{PREFIX}DEVICE={value!r}: expected {DEVICE_NAMES}") from None


class _Env:
    """Typed reads of ``SERVING_*`` variables that name the variable when a value is bad."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self._old_names = {new: old for old, new in RENAMED_MODEL_SETTINGS.items()}

    def variable(self, name: str) -> str:
        """The variable that ``name`` is read from: itself, or the old name it replaced
        when only that one is set."""
        variable = PREFIX + name
        old = self._old_names.get(variable)
        if old is not None and variable not in self.environ and old in self.environ:
            return old
        return variable

    def text(self, name: str, default: str | None) -> str | None:
        value = self.environ.get(self.variable(name), "").strip()
        return value or default

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = (self.text(name, default) or default).lower()
        if value not in options:
            raise SettingsError(
                f"{self.variable(name)}={value!r}: expected one of {', '.join(options)}"
            )
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.text(name, None)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{PREFIX}{name}={value!r}: expected on or off")

    def integer(self, name: str, default: int | None, *, minimum: int) -> int | None:
        value = self.text(name, None)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{PREFIX}{name}={value!r}: expected an integer") from None
        if number < minimum:
            raise SettingsError(f"{PREFIX}{name}={number}: must be at least {minimum}")
        return number

    def number(self, name: str, default: float | None, *, minimum: float) -> float | None:
        value = self.text(name, None)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{PREFIX}{name}={value!r}: expected a number") from None
        if not number >= minimum:
            raise SettingsError(f"{PREFIX}{name}={number}: must be at least {minimum}")
        return number
