"""The BentoML service: digit classification, sentiment and digit generation.

Start it (after ``python -m training.register`` has filled the model store)::

    bentoml serve service.service:ServingService --port 3000

Endpoints (all POST; the OpenAPI page at / documents each with examples):

    /classify         one image file (multipart field ``image``) → digit, confidence, probabilities
    /classify_batch   several image files (fields ``images``)    → one result per image, in order
    /sentiment        {"text": "..."}                            → label, P(positive)
    /sentiment_batch  {"texts": ["...", ...]}                    → one result per text, in order
    /generate         {"n": 8, "digit": 7, "seed": 1}            → PNGs (base64 JSON, or one grid)
    /classify_input   one image, as /classify                    → the 28×28 PNG the classifier sees

The web page at /ui (``service.webpage``) is built on these routes.

``/classify`` also takes the image as the whole body (``Content-Type: image/png``,
``image/jpeg``, ...).

Over HTTP these routes are answered by ``service.http.ApiGate`` through
``ServingService.handle``: parse and validate the body (``service.requests``)
→ prepare (the training preprocessing) → adaptive batcher → predictor
(PyTorch or ONNX Runtime) → JSON. The ``@bentoml.api`` methods run the same
code and are what the OpenAPI page, BentoML's clients and in-process callers
see. Models, preprocessing objects and batchers are built once per worker at
start-up; ``service.settings`` documents every setting.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL import Image
from starlette.responses import Response

from models.preprocessing import pixels_from_normalized
from models.registry import get_spec
from models.tokenizer import Vocabulary
from service import framework_hooks
from service.backends import (
    Device,
    Placement,
    check_placement,
    device_name,
    load_predictor,
    resolve_device,
    torch_installed,
    use_torch_threads,
)
from service.batching import AdaptiveBatcher, QueueFull
from service.errors import Location, Problem, RequestError, ServiceBusy
from service.heap_snapshots import HeapSnapshots
from service.http import IMAGE_TYPES, IN_FLIGHT, JSON, MULTIPART, PNG, ApiGate, Reply
from service.imaging import ImageError, decoded_pixels, encode_png, grid_png
from service.inference import (
    DigitClassification,
    DigitGeneration,
    EmptyText,
    SentimentClassification,
    TimedPredictor,
)
from service.memory import PixelBudget, RequestPixels, return_freed_memory_promptly
from service.metrics import endpoint_metrics
from service.model_store import check_store_entries, load_stored_artifact, served_model_tags
from service.requests import (
    GenerateInput,
    SentimentBatchInput,
    SentimentInput,
    form_files,
    identify_images,
    parse_form,
    parse_json,
)
from service.schemas import (
    DigitPrediction,
    GeneratedDigits,
    GridFlag,
    ImageCount,
    ImageList,
    ImageUpload,
    OptionalDigit,
    OptionalSeed,
    SentimentPrediction,
    Text,
    TextList,
)
from service.settings import (
    MODEL_KEYS,
    RENAMED_MODEL_SETTINGS,
    current_settings,
    resolve_backend,
    resolve_precision,
)
from service.webpage import PAGE_PATH, page_app

log = logging.getLogger("service")

SETTINGS = current_settings()
# Before `bentoml serve` prepares its metrics folder and a worker builds its app and
# HTTP server: the pieces of BentoML and uvicorn the service replaces.
framework_hooks.install(SETTINGS)
TAGS = served_model_tags({key: SETTINGS.models[key].tag for key in MODEL_KEYS})
check_store_entries(TAGS.values())

# The media types each API route takes, and which endpoint's batcher each route feeds.
ROUTES = {
    "/classify": (MULTIPART, *IMAGE_TYPES),
    "/classify_batch": (MULTIPART,),
    "/sentiment": (JSON,),
    "/sentiment_batch": (JSON,),
    "/generate": (JSON,),
    # For the web page: the image the classifier is given, after preprocessing.
    "/classify_input": (MULTIPART, *IMAGE_TYPES),
}
BATCHER_ROUTES = {
    "classify": ("/classify", "/classify_batch"),
    "sentiment": ("/sentiment", "/sentiment_batch"),
    "generate": ("/generate",),
}
ROUTE_ENDPOINTS = {route: name for name, routes in BATCHER_ROUTES.items() for route in routes}
# An image larger than this is decoded on a worker thread rather than in the
# batcher's, so that it does not hold up the other requests' batches.
INLINE_DECODE_PIXELS = 1_000_000
# Form parts one request may carry: the images of a batch request plus a few other fields.
EXTRA_FORM_PARTS = 16
# /classify_input (the web page's preview) decodes outside the batcher, on worker
# threads: beyond this many waiting at once a new one gets a 503, so that a flood
# of previews cannot pile up bodies and decodes without bound.
MAX_PREVIEWS_WAITING = 32


@bentoml.asgi_app(page_app(), path=PAGE_PATH)
@bentoml.service(
    name="digit-sentiment-serving",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": SETTINGS.access_log}},
    **({} if SETTINGS.tracing else {"tracing": {"excluded_urls": list(ROUTES)}}),
)
class ServingService:
    """Classify handwritten digits, tell the sentiment of English text and generate digits.

    Three PyTorch models (an MNIST CNN, an SST-2 BiLSTM and a conditional DCGAN),
    served with adaptive batching on the GPU or the CPU. Bad input gets a 4xx
    with a JSON body ``{"error": "...", "detail": [{"type", "loc", "msg"}]}``.

    **[Try the models in your browser at /ui](/ui/)**: draw a digit, type a review,
    generate digits.
    """

    classify_model = bentoml.models.BentoModel(TAGS["classify"])
    sentiment_model = bentoml.models.BentoModel(TAGS["sentiment"])
    generate_model = bentoml.models.BentoModel(TAGS["generate"])

    def __init__(self) -> None:
        settings = SETTINGS
        _configure_logging(settings.log_level)
        framework_hooks.check()
        for old in settings.renamed_in_use:
            log.warning("%s is deprecated: use %s", old, RENAMED_MODEL_SETTINGS[old])
        self.device = resolve_device(settings.device)
        if any(_placement(key, self.device).backend == "torch" for key in MODEL_KEYS):
            use_torch_threads(settings.threads_per_model())
        stored = {
            "classify": self.classify_model,
            "sentiment": self.sentiment_model,
            "generate": self.generate_model,
        }
        self.limits = settings.limits
        self.max_form_parts = settings.limits.max_items_per_request + EXTRA_FORM_PARTS
        self.previews_waiting = 0  # /classify_input requests being prepared (event loop only)
        self.metrics = endpoint_metrics(BATCHER_ROUTES)
        artifacts = {key: load_stored_artifact(model.path) for key, model in stored.items()}
        predictors = {
            key: TimedPredictor(
                self._load_predictor(key, artifacts[key]),
                self.metrics[key].observe_model_seconds,
            )
            for key in stored
        }

        return_freed_memory_promptly()
        self.classification = DigitClassification(
            predictors["classify"], PixelBudget(settings.limits.max_decode_pixels)
        )
        self.sentiment_task = SentimentClassification(
            predictors["sentiment"],
            Vocabulary.load(artifacts["sentiment"].path("vocab.json")),
        )
        # Read from the artifact's config.json as plain values: the config dataclass
        # lives beside the torch module, which an ONNX-only worker never imports.
        generator_config = artifacts["generate"].config
        self.generation = DigitGeneration(
            predictors["generate"], generator_config["latent_dim"], generator_config["num_classes"]
        )
        self.batchers = self._build_batchers(settings.resolve_batching(self.device.type))
        self._log_summary(stored, artifacts, predictors)
        # Everything loaded so far (torch, BentoML, the models) lives as long as the
        # worker: move it out of the collector's reach, so that a full collection
        # under load walks only what requests allocate instead of pausing every
        # request for the whole heap.
        gc.freeze()
        if settings.heap_snapshot_dir:
            HeapSnapshots(
                Path(settings.heap_snapshot_dir), settings.heap_snapshot_interval_s
            ).start()

    @bentoml.on_deployment
    def check_configuration() -> None:
        """Before any worker starts: the framework hooks are in effect, and every model
        is in the store, verified, and can run as configured; otherwise ``bentoml
        serve`` stops here with the reason, instead of restarting workers that fail
        one after another."""
        framework_hooks.check()
        device = resolve_device(SETTINGS.device)
        for key, name in MODEL_KEYS.items():
            stored = bentoml.models.get(TAGS[key])  # BentoML has resolved it already
            artifact = load_stored_artifact(stored.path)
            check_placement(get_spec(name), artifact, _placement(key, device))

    def _load_predictor(self, key: str, artifact: Any) -> Any:
        return load_predictor(get_spec(MODEL_KEYS[key]), artifact, _placement(key, self.device))

    def _build_batchers(self, batching: dict[str, Any]) -> dict[str, AdaptiveBatcher[Any, Any]]:
        generator_shares = self._make_generation_batch_invariant(
            batching["generate"].max_batch_size
        )
        batchers: dict[str, AdaptiveBatcher[Any, Any]] = {}
        for endpoint, run_batch, shareable in (
            ("classify", self.classification.run_batch, True),
            ("sentiment", self.sentiment_task.run_batch, True),
            ("generate", self.generation.run_batch, generator_shares),
        ):
            routes = BATCHER_ROUTES[endpoint]
            batchers[endpoint] = AdaptiveBatcher(
                endpoint,
                run_batch,
                max_batch_size=batching[endpoint].max_batch_size,
                max_latency_ms=batching[endpoint].max_latency_ms,
                max_queue_items=SETTINGS.max_queue_items,
                isolate_requests=not (SETTINGS.batching and shareable),
                arriving_requests=lambda routes=routes: IN_FLIGHT.count(routes),
                observe_batch=self.metrics[endpoint].observe_batch_size,
            )
        if not generator_shares and SETTINGS.batching:
            log.warning(
                "generate: the generator's outputs depend on the batch composition on this "
                "backend, so each /generate request runs alone to keep seeds reproducible"
            )
        return batchers

    def _log_summary(self, stored: dict, artifacts: dict, predictors: dict) -> None:
        """One start-up summary a production user can check the deployment against."""
        log.info(
            "device %s (%s), %d worker(s)",
            self.device,
            device_name(self.device),
            SETTINGS.workers,
        )
        for key, model in stored.items():
            metadata = artifacts[key].metadata
            metrics = {
                name: round(value, 4)
                for name, value in metadata.get("metrics", {}).items()
                if isinstance(value, float)
            }
            log.info("model %s: %s; %s; %s", key, model.tag, predictors[key].describe(), metrics)
            if metadata.get("smoke"):
                log.warning("model %s is a smoke-test artifact, not a trained release", key)
        for endpoint, batcher in self.batchers.items():
            log.info(
                "batching %s: max_batch_size=%d max_latency_ms=%g, %s",
                endpoint,
                batcher.max_batch_size,
                batcher.max_latency_s * 1000,
                "per request" if batcher.isolate_requests else "across requests",
            )
        log.info("limits: %s", SETTINGS.limits)

    def _make_generation_batch_invariant(self, max_batch_size: int) -> bool:
        """Whether rows of different /generate requests may share a model call.

        Only if that cannot change a single output bit ("same seed, same bytes").
        On a GPU, padding every call to one batch shape is tried before giving up;
        without either, each request runs alone.
        """
        sizes = sorted({1, 2, 3, 5, 8, 13, max_batch_size})
        if self.generation.rows_independent_of_batch(sizes):
            return True
        if self.device.type == "cuda":
            self.generation.pad_to = max_batch_size
            if self.generation.rows_independent_of_batch(sizes):
                log.info("generate: padding every generator call to %d rows", max_batch_size)
                return True
            self.generation.pad_to = None
        return False

        # --- the HTTP path (service.http.ApiGate calls this for every API request) ---------

    def refusal(self, path: str) -> Reply | None:
        """A 503 for ``path`` while its queue has no room, before anything is read."""
        endpoint = ROUTE_ENDPOINTS.get(path)
        if endpoint is None:  # /classify_input: no queue
            return None
        batcher = self.batchers[endpoint]
        if not batcher.is_full:
            return None
        return Reply.error(
            ServiceBusy(f"the server is busy ({batcher.name}: the queue is full); retry shortly")
        )

    async def handle(self, path: str, media_type: str, content_type: str, body: bytes) -> Reply:
        """Answer one request to an API route; the gate has checked method, type and size."""
        try:
            if path in ("/classify", "/classify_input"):
                if media_type == MULTIPART:
                    parts = parse_form(body, content_type, max_parts=self.max_form_parts)
                    files = form_files(parts, "image")
                else:  # a raw image body
                    files = [(body, ("image",))]
                if path == "/classify_input":
                    return await self._classifier_input(files)
                [result] = await self._classify(files)
                return Reply.json(result)
            if path == "/classify_batch":
                parts = parse_form(body, content_type, max_parts=self.max_form_parts)
                files = form_files(parts, "images", max_items=self.limits.max_items_per_request)
                return Reply.json(await self._classify(files))
            if path == "/sentiment":
                text = parse_json(SentimentInput, body).text
                [result] = await self._score([text], [("text",)])
                return Reply.json(result)
            if path == "/sentiment_batch":
                texts = parse_json(SentimentBatchInput, body).texts
                return Reply.json(
                    await self._score(texts, [("texts", i) for i in range(len(texts))])
                )
            if path == "/generate":
                request = parse_json(GenerateInput, body)
                return await self._generate(request.n, request.digit, request.seed, request.grid)
        except (RequestError, ServiceBusy) as error:
            return Reply.error(error)
        raise LookupError(f"no handler for {path}")

    # --- the API methods: the OpenAPI schema, BentoML's clients and in-process calls ---
    # Over HTTP the gate answers these routes with the same code (``handle``); these
    # methods are what BentoML documents and what a composing service calls directly.

    @bentoml.api(route="/classify")
    async def classify(self, image: ImageUpload) -> DigitPrediction:
        """Classify one digit image.

        `curl -F image=@seven.png localhost:3000/classify` →
        `{"digit": 7, "confidence": 0.998, "probabilities": [...]}`.
        PNG, JPEG, GIF, BMP or WebP; any size and mode; dark-on-light or light-on-dark.
        The image may also be the whole body: `curl --data-binary @seven.png
        -H 'Content-Type: image/png' localhost:3000/classify`.
        Or draw a digit on **[the web page at /ui](/ui/)**.
        """
        try:
            [result] = await self._classify_images([image], [("image",)])
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return DigitPrediction(**result)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: ImageList) -> list[DigitPrediction]:
        """Classify several digit images sent in one request; one result per image, in order.

        `curl -F images=@seven.png -F images=@two.jpg localhost:3000/classify_batch`
        """
        try:
            results = await self._classify_images(
                images, [("images", index) for index in range(len(images))]
            )
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return [DigitPrediction(**result) for result in results]

    @bentoml.api(route="/sentiment")
    async def sentiment(self, text: Text) -> SentimentPrediction:
        """Tell whether an English text is positive or negative; the score is P(positive).

        `curl -H 'Content-Type: application/json' -d '{"text": "A gripping film."}'
        localhost:3000/sentiment` → `{"label": "positive", "score": 0.97}`
        """
        try:
            [result] = await self._score([text], [("text",)])
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return SentimentPrediction(**result)

    @bentoml.api(route="/sentiment_batch")
    async def sentiment_batch(self, texts: TextList) -> list[SentimentPrediction]:
        """Classify several texts in one request; one result per text, in order.

        `curl -H 'Content-Type: application/json' -d '{"texts": ["Great!", "Awful."]}'
        localhost:3000/sentiment_batch`
        """
        try:
            results = await self._score(texts, [("texts", i) for i in range(len(texts))])
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return [SentimentPrediction(**result) for result in results]

    @bentoml.api(route="/generate")
    async def generate(
        self,
        n: ImageCount = 1,
        digit: OptionalDigit = None,
        seed: OptionalSeed = None,
        grid: GridFlag = False,
    ) -> GeneratedDigits:
        """Generate n 28×28 digit images (white on black) as base64 PNGs, or one PNG grid.

        `curl -H 'Content-Type: application/json' -d '{"n": 8, "digit": 3, "seed": 42}'
        localhost:3000/generate` → `{"seed": 42, "images": [{"digit": 3, "png": "iVBOR..."}]}`.
        The same seed, n and digit always give byte-identical images; without a seed
        one is drawn and returned. With `"grid": true` the answer is a single PNG
        (Content-Type image/png) and the seed is in the `X-Seed` header.
        """
        try:
            reply = await self._generate(n, digit, seed, grid)
        except ServiceBusy as error:
            return error.response()
        if reply.media_type == PNG:
            return Response(reply.body, media_type=PNG, headers=reply.headers)
        return GeneratedDigits.model_validate_json(reply.body)

    # --- the work behind both --------------------------------------------------------

    async def _classify(self, files: Sequence[tuple[bytes, Location]]) -> list[dict]:
        locations = [loc for _, loc in files]
        max_pixels = self.limits.max_image_pixels
        if len(files) > self.batchers["classify"].max_batch_size:
            # Reading the headers of a thousand uploads takes tens of milliseconds:
            # off the event loop. All of them before any pixel is decoded, so that
            # the request's decoded size is known first (service.memory).
            images = await asyncio.to_thread(identify_images, files, max_pixels=max_pixels)
        else:
            images = identify_images(files, max_pixels=max_pixels)
        return await self._classify_images(images, locations)

    async def _classify_images(
        self, images: Sequence[Image.Image], locations: Sequence[Location]
    ) -> list[dict]:
        """Identified images → one prediction each; every corrupt image is reported at once.

        Small images are decoded and preprocessed in the batcher's thread, a whole
        batch at a time. Large uploads, and requests of more images than one batch,
        are prepared on a worker thread instead, chunk by chunk, so that the model
        already runs the first chunks while the next are decoded.
        """
        request_pixels = RequestPixels(self.limits.max_request_pixels)
        problems = []
        for image, loc in zip(images, locations, strict=True):
            try:
                request_pixels.charge(decoded_pixels(image))
            except ImageError as error:
                problems.append(Problem(error.type, error.message, loc))
        if problems:
            raise RequestError(problems)  # before any pixel is decoded
        batch = self.batchers["classify"].max_batch_size
        if len(images) <= batch and not any(_is_large(image) for image in images):
            results = await self._submit("classify", images)
        else:
            results = await self._classify_in_chunks(images, batch)
        return _digit_predictions(results, locations)

    async def _classify_in_chunks(self, images: Sequence[Image.Image], size: int) -> list[Any]:
        """Decode and prepare each chunk of ``images`` on a worker thread while the model
        runs the chunks before it; any ``ImageError`` stops further model work."""
        pending: list[tuple[int, asyncio.Future[list[Any]]]] = []
        results: list[Any] = [None] * len(images)
        prepare = self.classification.decode_and_prepare
        try:
            for start in range(0, len(images), size):
                chunk = images[start : start + size]
                rows = await asyncio.to_thread(prepare, chunk)
                results[start : start + len(rows)] = rows
                if not any(isinstance(row, ImageError) for row in results):
                    pending.append((start, asyncio.ensure_future(self._submit("classify", rows))))
            if any(isinstance(row, ImageError) for row in results):
                return results  # the request fails; no model work for it
            for start, future in pending:
                chunk_results = await future
                results[start : start + len(chunk_results)] = chunk_results
            return results
        finally:
            for _, future in pending:
                future.cancel()

    async def _classifier_input(self, files: Sequence[tuple[bytes, Location]]) -> Reply:
        """The 28×28 grayscale PNG the classifier is given for one image (the web page
        shows it, so that preprocessing is visible); decoded as /classify decodes."""
        if self.previews_waiting >= MAX_PREVIEWS_WAITING:
            raise ServiceBusy(
                f"the server is busy ({self.previews_waiting} previews are being prepared); "
                "retry shortly"
            )
        [image] = identify_images(files, max_pixels=self.limits.max_image_pixels)
        self.previews_waiting += 1
        try:
            [row] = await asyncio.to_thread(self.classification.decode_and_prepare, [image])
        finally:
            self.previews_waiting -= 1
        if isinstance(row, ImageError):
            raise RequestError([Problem(row.type, row.message, files[0][1])])
        return Reply(200, encode_png(pixels_from_normalized(row[0])), PNG)

    async def _score(self, texts: Sequence[str], locations: Sequence[Location]) -> list[dict]:
        rows, problems = [], []
        for text, loc in zip(texts, locations, strict=True):
            try:
                rows.append(self.sentiment_task.prepare(text))
            except EmptyText as error:
                problems.append(Problem("empty_text", str(error), loc))
        if problems:
            raise RequestError(problems)
        return [_sentiment_prediction(score) for score in await self._submit("sentiment", rows)]

    async def _generate(self, n: int, digit: int | None, seed: int | None, grid: bool) -> Reply:
        if seed is None:
            seed = secrets.randbits(63)
        rows = self.generation.prepare(n, digit, seed)
        images = await self._submit("generate", rows)
        if grid:
            return Reply(200, grid_png(images), PNG, {"X-Seed": str(seed)})
        return Reply.json(
            {
                "seed": seed,
                "images": [
                    {"digit": row.label, "png": base64.b64encode(encode_png(pixels)).decode()}
                    for row, pixels in zip(rows, images, strict=True)
                ],
            }
        )

    async def _submit(self, endpoint: str, rows: Sequence[Any]) -> list[Any]:
        try:
            return await self.batchers[endpoint].submit(rows)
        except QueueFull as error:
            raise ServiceBusy(f"the server is busy ({error}); retry shortly") from None


def _placement(key: str, device: Device) -> Placement:
    model = SETTINGS.models[key]
    backend = resolve_backend(model, device.type, torch_installed())
    return Placement(
        backend=backend,
        device=device,
        precision=resolve_precision(model, backend, device.type),
        threads=SETTINGS.threads_per_model(key),
    )


def _digit_predictions(results: Sequence[Any], locations: Sequence[Location]) -> list[dict]:
    """Probabilities per item → predictions; every failed item is reported at once."""
    problems = [
        Problem(result.type, result.message, loc)
        for result, loc in zip(results, locations, strict=True)
        if isinstance(result, ImageError)
    ]
    if problems:
        raise RequestError(problems)
    return [_digit_prediction(probabilities) for probabilities in results]


def _is_large(image: Image.Image) -> bool:
    return image.width * image.height > INLINE_DECODE_PIXELS


def _digit_prediction(probabilities: np.ndarray) -> dict:
    values = probabilities.tolist()
    digit = int(np.argmax(probabilities))
    return {"digit": digit, "confidence": values[digit], "probabilities": values}


def _sentiment_prediction(score: float) -> dict:
    return {"label": "positive" if score >= 0.5 else "negative", "score": score}


def _configure_logging(level: str) -> None:
    """Show this package's log in the server output.

    BentoML's logging setup leaves the root logger at WARNING and disables
    loggers that existed before it ran, which would hide the start-up summary.
    """
    logging.getLogger("service").setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():
        if (name == "service" or name.startswith("service.")) and isinstance(
            logger, logging.Logger
        ):
            logger.disabled = False


ServingService.add_asgi_middleware(
    ApiGate,
    routes=ROUTES,
    max_body_bytes=SETTINGS.limits.max_body_bytes,
    handler=bentoml.get_current_service,
)
