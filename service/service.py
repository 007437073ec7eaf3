"""The BentoML service: digit classification, sentiment and digit generation.

Start it (after ``python -m training.register`` has filled the model store)::

    bentoml serve service.service:ServingService --port 3000

Endpoints (all POST; the OpenAPI page at / documents each with examples):

    /classify         one image file (multipart field ``image``) → digit, confidence, probabilities
    /classify_batch   several image files (fields ``images``)    → one result per image, in order
    /sentiment        {"text": "..."}                            → label, P(positive)
    /sentiment_batch  {"texts": ["...", ...]}                    → one result per text, in order
    /generate         {"n": 8, "digit": 7, "seed": 1}            → PNGs (base64 JSON, or one grid)

Each request goes decode → validate → prepare (the training preprocessing)
→ adaptive batcher → predictor (PyTorch or ONNX Runtime) → response. Models,
preprocessing objects and batchers are built once per worker at start-up;
``service.settings`` documents every setting.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import bentoml
import numpy as np
import torch
from PIL import Image
from starlette.responses import Response

from models.registry import get_spec
from models.tokenizer import Vocabulary
from service import compat
from service.backends import (
    Placement,
    Predictor,
    check_placement,
    load_predictor,
    resolve_device,
)
from service.batching import AdaptiveBatcher, QueueFull
from service.errors import Problem, RequestError, ServiceBusy
from service.http import IN_FLIGHT, JSON, MULTIPART, RequestGate
from service.imaging import ImageError, encode_png, grid_png, load_image
from service.inference import (
    DigitClassification,
    DigitGeneration,
    EmptyText,
    SentimentClassification,
)
from service.model_store import load_stored_artifact, resolve_tag
from service.schemas import (
    DigitPrediction,
    GeneratedDigit,
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
    current_settings,
    resolve_backend,
    resolve_precision,
)

log = logging.getLogger("service")

SETTINGS = current_settings()
TAGS = {
    key: resolve_tag(get_spec(name), SETTINGS.models[key].tag) for key, name in MODEL_KEYS.items()
}

# Which endpoint feeds which batcher, and the body each route takes.
ROUTES = {
    "/classify": MULTIPART,
    "/classify_batch": MULTIPART,
    "/sentiment": JSON,
    "/sentiment_batch": JSON,
    "/generate": JSON,
}
BATCHER_ROUTES = {
    "classify": ("/classify", "/classify_batch"),
    "sentiment": ("/sentiment", "/sentiment_batch"),
    "generate": ("/generate",),
}
# Decoding an image larger than this runs in a thread, off the event loop.
INLINE_DECODE_PIXELS = 1_000_000

# Room for the images of a batch request plus a few other form fields.
compat.apply(max_parts=SETTINGS.limits.max_items_per_request + 16)

ResultT = TypeVar("ResultT")


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
    """

    classifier_model = bentoml.models.BentoModel(TAGS["classifier"])
    sentiment_model = bentoml.models.BentoModel(TAGS["sentiment"])
    generator_model = bentoml.models.BentoModel(TAGS["generator"])

    def __init__(self) -> None:
        settings = SETTINGS
        _configure_logging(settings.log_level)
        self.device = resolve_device(settings.device)
        torch.set_num_threads(settings.threads_per_model())
        stored = {
            "classifier": self.classifier_model,
            "sentiment": self.sentiment_model,
            "generator": self.generator_model,
        }
        artifacts = {key: load_stored_artifact(model.path) for key, model in stored.items()}
        predictors = {key: self._load_predictor(key, artifacts[key]) for key in stored}

        self.classification = DigitClassification(predictors["classifier"])
        self.sentiment_task = SentimentClassification(
            predictors["sentiment"],
            Vocabulary.load(artifacts["sentiment"].path("vocab.json")),
        )
        generator_config = get_spec(MODEL_KEYS["generator"]).config_from_dict(
            artifacts["generator"].config
        )
        self.generation = DigitGeneration(
            predictors["generator"], generator_config.latent_dim, generator_config.num_classes
        )
        self.batchers = self._build_batchers(settings.resolve_batching(self.device.type))
        self._log_summary(stored, artifacts, predictors)

    @bentoml.on_deployment
    def check_configuration() -> None:
        """Before any worker starts: every model is in the store, verified, and can run
        as configured; otherwise ``bentoml serve`` stops here with the reason, instead
        of restarting workers that fail one after another."""
        device = resolve_device(SETTINGS.device)
        for key, name in MODEL_KEYS.items():
            stored = bentoml.models.get(TAGS[key])  # BentoML has resolved it already
            artifact = load_stored_artifact(stored.path)
            check_placement(get_spec(name), artifact, _placement(key, device))

    def _load_predictor(self, key: str, artifact: Any) -> Predictor:
        return load_predictor(get_spec(MODEL_KEYS[key]), artifact, _placement(key, self.device))

    def _build_batchers(self, batching: dict[str, Any]) -> dict[str, AdaptiveBatcher[Any, Any]]:
        histogram = _batch_size_histogram()
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
                isolate_requests=not (SETTINGS.batching_enabled and shareable),
                arriving_requests=lambda routes=routes: IN_FLIGHT.count(routes),
                observe_batch=histogram.labels(endpoint=endpoint).observe,
            )
        if not generator_shares and SETTINGS.batching_enabled:
            log.warning(
                "generate: the generator's outputs depend on the batch composition on this "
                "backend, so each /generate request runs alone to keep seeds reproducible"
            )
        return batchers

    def _log_summary(self, stored: dict, artifacts: dict, predictors: dict) -> None:
        """One start-up summary a production user can check the deployment against."""
        log.info(
            "device %s (%s), %d thread(s) per model, %d worker(s)",
            self.device,
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU",
            SETTINGS.threads_per_model(),
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

    @bentoml.api(route="/classify")
    async def classify(self, image: ImageUpload) -> DigitPrediction:
        """Classify one digit image.

        `curl -F image=@seven.png localhost:3000/classify` →
        `{"digit": 7, "confidence": 0.998, "probabilities": [...]}`.
        PNG, JPEG, GIF, BMP or WebP; any size and mode; dark-on-light or light-on-dark.
        """
        try:
            row = await self._prepare_image(image, ("image",))
            [probabilities] = await self._submit("classify", [row])
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return _digit_prediction(probabilities)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: ImageList) -> list[DigitPrediction]:
        """Classify several digit images sent in one request; one result per image, in order.

        `curl -F images=@seven.png -F images=@two.jpg localhost:3000/classify_batch`
        """
        try:
            rows = await self._prepare_all(
                [
                    self._prepare_image(image, ("images", index))
                    for index, image in enumerate(images)
                ]
            )
            results = await self._submit("classify", rows)
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return [_digit_prediction(probabilities) for probabilities in results]

    @bentoml.api(route="/sentiment")
    async def sentiment(self, text: Text) -> SentimentPrediction:
        """Tell whether an English text is positive or negative; the score is P(positive).

        `curl -H 'Content-Type: application/json' -d '{"text": "A gripping film."}'
        localhost:3000/sentiment` → `{"label": "positive", "score": 0.97}`
        """
        try:
            row = self._prepare_text(text, ("text",))
            [score] = await self._submit("sentiment", [row])
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return _sentiment_prediction(score)

    @bentoml.api(route="/sentiment_batch")
    async def sentiment_batch(self, texts: TextList) -> list[SentimentPrediction]:
        """Classify several texts in one request; one result per text, in order.

        `curl -H 'Content-Type: application/json' -d '{"texts": ["Great!", "Awful."]}'
        localhost:3000/sentiment_batch`
        """
        try:
            rows, problems = [], []
            for index, text in enumerate(texts):
                try:
                    rows.append(self._prepare_text(text, ("texts", index)))
                except RequestError as error:
                    problems.extend(error.problems)
            if problems:
                raise RequestError(problems)
            scores = await self._submit("sentiment", rows)
        except (RequestError, ServiceBusy) as error:
            return error.response()
        return [_sentiment_prediction(score) for score in scores]

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
        if seed is None:
            seed = secrets.randbits(63)
        rows = self.generation.prepare(n, digit, seed)
        try:
            images = await self._submit("generate", rows)
        except ServiceBusy as error:
            return error.response()
        if grid:
            return Response(grid_png(images), media_type="image/png", headers={"X-Seed": str(seed)})
        return GeneratedDigits(
            seed=seed,
            images=[
                GeneratedDigit(digit=row.label, png=base64.b64encode(encode_png(pixels)).decode())
                for row, pixels in zip(rows, images, strict=True)
            ],
        )

    async def _submit(self, endpoint: str, rows: Sequence[Any]) -> list[Any]:
        try:
            return await self.batchers[endpoint].submit(rows)
        except QueueFull as error:
            raise ServiceBusy(f"the server is busy ({error}); retry shortly") from None

    async def _prepare_image(self, image: Image.Image, loc: tuple[str | int, ...]) -> np.ndarray:
        """Decode and preprocess one upload; large images are handled off the event loop."""
        if image.width * image.height > INLINE_DECODE_PIXELS:
            return await asyncio.to_thread(_guarded_image_row, image, loc)
        return _guarded_image_row(image, loc)

    def _prepare_text(self, text: str, loc: tuple[str | int, ...]) -> list[int]:
        try:
            return self.sentiment_task.prepare(text)
        except EmptyText as error:
            raise RequestError.single("empty_text", str(error), loc) from None

    @staticmethod
    async def _prepare_all(steps: Sequence[Awaitable[ResultT]]) -> list[ResultT]:
        """Run every item's preparation and report all bad items at once."""
        rows, problems = [], []
        for step in steps:
            try:
                rows.append(await step)
            except RequestError as error:
                problems.extend(error.problems)
        if problems:
            raise RequestError(problems)
        return rows


def _placement(key: str, device: torch.device) -> Placement:
    model = SETTINGS.models[key]
    backend = resolve_backend(model, device.type)
    return Placement(
        backend=backend,
        device=device,
        precision=resolve_precision(model, backend, device.type),
        threads=SETTINGS.threads_per_model(),
    )


def _image_row(image: Image.Image) -> np.ndarray:
    return DigitClassification.prepare(load_image(image))


def _guarded_image_row(image: Image.Image, loc: tuple[str | int, ...]) -> np.ndarray:
    try:
        return _image_row(image)
    except ImageError as error:
        raise RequestError(Problem(error.type, error.message, loc)) from None
    except Exception as error:
        # Pillow can fail on exotic but well-formed files (odd modes, broken
        # palettes); that is the upload's problem, not a server fault.
        log.warning("could not process an uploaded %s image", image.format, exc_info=True)
        raise RequestError(
            Problem("unsupported_image", f"cannot process this {image.format} image ({error})", loc)
        ) from None


def _digit_prediction(probabilities: np.ndarray) -> DigitPrediction:
    values = probabilities.tolist()
    digit = int(np.argmax(probabilities))
    return DigitPrediction(digit=digit, confidence=values[digit], probabilities=values)


def _sentiment_prediction(score: float) -> SentimentPrediction:
    return SentimentPrediction(label="positive" if score >= 0.5 else "negative", score=score)


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


_HISTOGRAM: Any = None


def _batch_size_histogram() -> Any:
    """Items per model call, per endpoint, on /metrics (created once per process).

    prometheus_client is imported here, not at module level: BentoML points it
    at its multiprocess directory only after importing this module.
    """
    global _HISTOGRAM
    if _HISTOGRAM is None:
        import prometheus_client

        _HISTOGRAM = prometheus_client.Histogram(
            "serving_batch_size",
            "Items (images, texts, latent vectors) per model call",
            ["endpoint"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
    return _HISTOGRAM


ServingService.add_asgi_middleware(
    RequestGate, routes=ROUTES, max_body_bytes=SETTINGS.limits.max_body_bytes
)
