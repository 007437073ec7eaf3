"""The kinds of model the service serves: each turns a spec into routes, and a loaded
model into the object that answers them.

A model's spec names its kind (``ModelSpec.task``). A kind is a class with

* ``routes(spec, limits)``: the model's routes (``service.routes.Route``), named
  after the spec's ``endpoint``, with their schemas and documentation;
* a constructor that takes the model's predictor and artifact in a worker;
* ``run_batch(items)``: what the model's batcher calls, in its thread;
* the ``answer`` of each route: decoded request → ``Reply``, through the batcher.

``digit-classification`` (image → one of ten digits), ``text-classification``
(text → one of two labels) and ``digit-generation`` (digit, seed → images) are
the kinds; a new model of one of these kinds is a spec, not a change here.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import orjson
from PIL import Image
from pydantic import BaseModel, RootModel

from models.artifacts import Artifact
from models.preprocessing import pixels_from_normalized
from models.registry import ModelSpec
from models.tokenizer import Vocabulary
from service import tracing
from service.batching import AdaptiveBatcher, QueueFull
from service.errors import Location, Problem, RequestError, ServiceBusy
from service.http import PNG, Reply
from service.imaging import SUPPORTED_TEXT, ImageError, decoded_pixels, encode_png, grid_png
from service.inference import (
    DigitClassification,
    DigitGeneration,
    EmptyText,
    SentimentClassification,
    TimedPredictor,
)
from service.memory import PixelBudget, RequestPixels
from service.requests import identify_images
from service.routes import FileField, Route
from service.schemas import (
    MAX_SEED,
    DigitPrediction,
    GeneratedDigits,
    generate_input,
    text_inputs,
    text_prediction,
)
from service.settings import Limits
from service.v2 import BYTES, InferRequest, Tensor, TensorSpec, bad_request

log = logging.getLogger(__name__)

# An image larger than this is decoded on a worker thread rather than in the
# batcher's, so that it does not hold up the other requests' batches.
INLINE_DECODE_PIXELS = 1_000_000
# /<endpoint>_input (the web page's preview) decodes outside the batcher, on worker
# threads: beyond this many waiting at once a new one gets a 503, so that a flood
# of previews cannot pile up bodies and decodes without bound.
MAX_PREVIEWS_WAITING = 32


class Task:
    """A loaded model, its batcher and the answers of its routes."""

    kind: ClassVar[str]
    model: Any  # the model's logic (``service.inference``); ``model.predictor`` runs it
    version: str = ""  # its model store version
    platform: str = ""  # its backend, as the Open Inference Protocol names it
    # Work on a batch before the model (decoding images): done on its own thread while
    # the model runs the batch before (``AdaptiveBatcher``); None where there is none.
    prepare_batch: Callable[[list[Any]], list[Any]] | None = None

    def __init__(self, spec: ModelSpec, limits: Limits) -> None:
        self.spec = spec
        self.limits = limits
        self.batcher: AdaptiveBatcher[Any, Any]  # set by the service once it is built
        # Requests this version has admitted and not yet answered: a version taken out of
        # service stops only when none is left (``service.rollouts``).
        self.requests_in_progress = 0

    def run_batch(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    # The model's tensors in the Open Inference Protocol (``service.v2_routes``): the
    # request carries one of the inputs; the answer has every output.
    def v2_inputs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def v2_outputs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    async def infer_v2(self, request: InferRequest) -> tuple[list[Tensor], dict[str, Any]]:
        """The outputs for a v2 request, and the answer's parameters."""
        raise NotImplementedError

    def v2_input(self, request: InferRequest) -> Tensor:
        """The request's one input, checked against the model's metadata."""
        known = {spec.name: spec for spec in self.v2_inputs()}
        names = [tensor.name for tensor in request.inputs]
        if len(names) != 1 or names[0] not in known:
            raise bad_request(f"{self.spec.name} takes one input, one of {', '.join(known)}; "
                              f"got {', '.join(names)}")  # fmt: skip
        [tensor] = request.inputs
        known[tensor.name].check(tensor)
        if tensor.shape[0] > self.limits.max_items_per_request:
            raise bad_request(
                f"input {tensor.name!r}: {tensor.shape[0]} items, more than the "
                f"{self.limits.max_items_per_request} one request may carry"
            )
        if tensor.shape[0] == 0:
            raise bad_request(f"input {tensor.name!r} has no items")
        return tensor

    def shares_batches(self, device_type: str, max_batch_size: int) -> bool:
        """Whether rows of different requests may share a model call."""
        return True

    async def submit(self, rows: Sequence[Any]) -> list[Any]:
        try:
            return await self.batcher.submit(rows)
        except QueueFull as error:
            raise ServiceBusy(f"the server is busy ({error}); retry shortly") from None


class DigitClassifier(Task):
    """Images → the digit each shows: ``/<endpoint>``, ``/<endpoint>_batch`` and the
    preview ``/<endpoint>_input``."""

    kind = "digit-classification"

    @staticmethod
    def routes(spec: ModelSpec, limits: Limits) -> list[Route]:
        e = spec.endpoint
        one_image = FileField(
            "image", f"A digit image: {SUPPORTED_TEXT}, any size and mode, either polarity."
        )
        many = limits.max_items_per_request
        return [
            Route(
                f"/{e}", e, e,
                summary=f"Classify one digit image ({spec.name})",
                description=(
                    f"`curl -F image=@seven.png localhost:3000/{e}` → "
                    '`{"digit": 7, "confidence": 0.998, "probabilities": [...]}`. '
                    f"{SUPPORTED_TEXT}; any size and mode; dark-on-light or light-on-dark. "
                    f"The image may also be the whole body: `curl --data-binary @seven.png "
                    f"-H 'Content-Type: image/png' localhost:3000/{e}`. "
                    "Or draw a digit on **[the web page at /ui](/ui/)**."
                ),
                answer=DigitClassifier.classify_one,
                files=(one_image,),
                raw_image=True,
                response=DigitPrediction,
            ),
            Route(
                f"/{e}_batch", f"{e}_batch", e,
                summary="Classify several digit images; one result per image, in order",
                description=f"`curl -F images=@seven.png -F images=@two.jpg "
                f"localhost:3000/{e}_batch`",
                answer=DigitClassifier.classify_many,
                files=(FileField("images", f"1–{many} digit images, one file part each.",
                                 max_items=many),),
                response=_list_of(DigitPrediction),
            ),
            Route(
                f"/{e}_input", f"{e}_input", e,
                summary="The 28×28 image the classifier is given, as a PNG",
                description="The image after the service's preprocessing (ink stretched, "
                "centred by mass, scaled to 20×20 in a 28×28 frame), as the web page shows it.",
                answer=DigitClassifier.preview,
                files=(one_image,),
                raw_image=True,
                png=True,
                queued=False,
            ),
        ]  # fmt: skip

    def __init__(
        self, spec: ModelSpec, limits: Limits, predictor: TimedPredictor, artifact: Artifact
    ) -> None:
        super().__init__(spec, limits)
        self.model = DigitClassification(predictor, PixelBudget(limits.max_decode_pixels))
        self.prepare_batch = self.model.decode_and_prepare
        self.previews_waiting = 0  # previews being prepared (event loop only)

    def run_batch(self, items: list[Any]) -> list[Any]:
        return self.model.predict_prepared(items)

    async def classify_one(self, files: dict[str, list]) -> Reply:
        [result] = await self._classify(files["image"])
        return Reply.json({**result, "model_version": self.version})

    async def classify_many(self, files: dict[str, list]) -> Reply:
        return Reply.json(await self._classify(files["images"]))

    async def _classify(self, files: Sequence[tuple[bytes, Location]]) -> list[dict]:
        max_pixels = self.limits.max_image_pixels
        if len(files) > self.batcher.max_batch_size:
            # Reading the headers of a thousand uploads takes tens of milliseconds:
            # off the event loop. All of them before any pixel is decoded, so that
            # the request's decoded size is known first (service.memory).
            images = await asyncio.to_thread(identify_images, files, max_pixels=max_pixels)
        else:
            images = identify_images(files, max_pixels=max_pixels)
        return await self.classify_images(images, [loc for _, loc in files])

    async def classify_images(
        self, images: Sequence[Image.Image], locations: Sequence[Location]
    ) -> list[dict]:
        return [_digit_prediction(row) for row in await self.probabilities(images, locations)]

    async def probabilities(
        self, images: Sequence[Image.Image], locations: Sequence[Location]
    ) -> list[np.ndarray]:
        """Identified images → the probabilities of each; every corrupt image is reported
        at once.

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
        batch = self.batcher.max_batch_size
        if len(images) <= batch and not any(_is_large(image) for image in images):
            results = await self.submit(images)
        else:
            results = await self._classify_in_chunks(images, batch)
        problems = [
            Problem(result.type, result.message, loc)
            for result, loc in zip(results, locations, strict=True)
            if isinstance(result, ImageError)
        ]
        if problems:
            raise RequestError(problems)
        return results

    async def _classify_in_chunks(self, images: Sequence[Image.Image], size: int) -> list[Any]:
        """Decode and prepare each chunk of ``images`` on a worker thread while the model
        runs the chunks before it; any ``ImageError`` stops further model work."""
        pending: list[tuple[int, asyncio.Future[list[Any]]]] = []
        results: list[Any] = [None] * len(images)
        prepare = self.model.decode_and_prepare
        try:
            for start in range(0, len(images), size):
                chunk = images[start : start + size]
                rows = await asyncio.to_thread(prepare, chunk)
                results[start : start + len(rows)] = rows
                if not any(isinstance(row, ImageError) for row in results):
                    pending.append((start, asyncio.ensure_future(self.submit(rows))))
            if any(isinstance(row, ImageError) for row in results):
                return results  # the request fails; no model work for it
            for start, future in pending:
                chunk_results = await future
                results[start : start + len(chunk_results)] = chunk_results
            return results
        finally:
            for _, future in pending:
                future.cancel()

    def v2_inputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("images", "FP32", (-1, 1, 28, 28), "normalised pixels, the model's input"),
            TensorSpec("pixels", "UINT8", (-1, 28, 28), "raw pixels, either polarity, "
                       "through the service's preprocessing"),
            TensorSpec("image_files", BYTES, (-1,), f"encoded images ({SUPPORTED_TEXT})"),
        )  # fmt: skip

    def v2_outputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("probabilities", "FP32", (-1, len(self.spec.labels)), "of each digit"),
            TensorSpec("digit", "INT64", (-1,), "the most probable digit"),
        )

    async def infer_v2(self, request: InferRequest) -> tuple[list[Tensor], dict[str, Any]]:
        tensor = self.v2_input(request)
        if tensor.name == "images":
            rows = list(np.ascontiguousarray(tensor.data, dtype=np.float32))
            results = await self.submit(rows)
        elif tensor.name == "pixels":
            images = [Image.fromarray(np.ascontiguousarray(p)) for p in tensor.data]
            results = await self.probabilities(images, _tensor_locations(tensor))
        else:
            files = [(bytes(data), loc) for data, loc in
                     zip(tensor.data, _tensor_locations(tensor), strict=True)]  # fmt: skip
            images = identify_images(files, max_pixels=self.limits.max_image_pixels)
            results = await self.probabilities(images, [loc for _, loc in files])
        probabilities = np.stack(results).astype(np.float32)
        digits = probabilities.argmax(axis=1).astype(np.int64)
        outputs = [
            Tensor("probabilities", "FP32", probabilities.shape, probabilities),
            Tensor("digit", "INT64", digits.shape, digits),
        ]
        return outputs, {}

    async def preview(self, files: dict[str, list]) -> Reply:
        """The 28×28 grayscale PNG the classifier is given for one image (the web page
        shows it, so that preprocessing is visible); decoded as classification decodes."""
        if self.previews_waiting >= MAX_PREVIEWS_WAITING:
            raise ServiceBusy(
                f"the server is busy ({self.previews_waiting} previews are being prepared); "
                "retry shortly"
            )
        uploads = files["image"]
        [image] = identify_images(uploads, max_pixels=self.limits.max_image_pixels)
        self.previews_waiting += 1
        try:
            [row] = await asyncio.to_thread(self.model.decode_and_prepare, [image])
        finally:
            self.previews_waiting -= 1
        if isinstance(row, ImageError):
            raise RequestError([Problem(row.type, row.message, uploads[0][1])])
        return Reply(200, encode_png(pixels_from_normalized(row[0])), PNG)


class TextClassifier(Task):
    """Texts → one of the spec's two labels each: ``/<endpoint>`` and ``/<endpoint>_batch``."""

    kind = "text-classification"

    @staticmethod
    def routes(spec: ModelSpec, limits: Limits) -> list[Route]:
        e = spec.endpoint
        single, batch = text_inputs(e, limits)
        prediction = text_prediction(e, spec.labels)
        labels = " or ".join(spec.labels)
        return [
            Route(
                f"/{e}", e, e,
                summary=f"Tell whether an English text is {labels} ({spec.name})",
                description=f"The score is P({spec.labels[-1]}). `curl -H 'Content-Type: "
                "application/json' -d '{\"text\": \"A gripping film.\"}' "
                f"localhost:3000/{e}` → `{{\"label\": \"{spec.labels[-1]}\", \"score\": 0.97}}`",
                answer=TextClassifier.classify_one,
                json_body=single,
                response=prediction,
            ),
            Route(
                f"/{e}_batch", f"{e}_batch", e,
                summary="Classify several texts; one result per text, in order",
                description="`curl -H 'Content-Type: application/json' -d "
                f"'{{\"texts\": [\"Great!\", \"Awful.\"]}}' localhost:3000/{e}_batch`",
                answer=TextClassifier.classify_many,
                json_body=batch,
                response=_list_of(prediction),
            ),
        ]  # fmt: skip

    def __init__(
        self, spec: ModelSpec, limits: Limits, predictor: TimedPredictor, artifact: Artifact
    ) -> None:
        super().__init__(spec, limits)
        self.model = SentimentClassification(
            predictor, Vocabulary.load(artifact.path("vocab.json"))
        )

    def run_batch(self, items: list[Any]) -> list[Any]:
        return self.model.run_batch(items)

    async def classify_one(self, request: Any) -> Reply:
        [result] = await self.score([request.text], [("text",)])
        return Reply.json({**result, "model_version": self.version})

    async def classify_many(self, request: Any) -> Reply:
        texts = request.texts
        return Reply.json(await self.score(texts, [("texts", i) for i in range(len(texts))]))

    def v2_inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("texts", BYTES, (-1,), "UTF-8 texts"),)

    def v2_outputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("score", "FP32", (-1,), f"P({self.spec.labels[-1]})"),
            TensorSpec("label", BYTES, (-1,), " or ".join(self.spec.labels)),
        )

    async def infer_v2(self, request: InferRequest) -> tuple[list[Tensor], dict[str, Any]]:
        tensor = self.v2_input(request)
        texts = []
        for index, data in enumerate(tensor.data):
            try:
                texts.append(bytes(data).decode("utf-8"))
            except UnicodeDecodeError:
                raise bad_request(f"input 'texts': element {index} is not UTF-8") from None
            if len(texts[-1]) > self.limits.max_text_chars:
                raise bad_request(f"input 'texts': element {index} is longer than "
                                  f"{self.limits.max_text_chars} characters")  # fmt: skip
        results = await self.score(texts, _tensor_locations(tensor))
        scores = np.array([result["score"] for result in results], dtype=np.float32)
        labels = np.empty(len(results), dtype=object)
        labels[:] = [result["label"].encode() for result in results]
        outputs = [
            Tensor("score", "FP32", scores.shape, scores),
            Tensor("label", BYTES, labels.shape, labels),
        ]
        return outputs, {}

    async def score(self, texts: Sequence[str], locations: Sequence[Location]) -> list[dict]:
        rows, problems = [], []
        for text, loc in zip(texts, locations, strict=True):
            try:
                rows.append(self.model.prepare(text))
            except EmptyText as error:
                problems.append(Problem("empty_text", str(error), loc))
        if problems:
            raise RequestError(problems)
        negative, positive = self.spec.labels
        return [
            {"label": positive if score >= 0.5 else negative, "score": score}
            for score in await self.submit(rows)
        ]


class DigitGenerator(Task):
    """(n, digit, seed) → generated digit images: ``/<endpoint>``."""

    kind = "digit-generation"

    @staticmethod
    def routes(spec: ModelSpec, limits: Limits) -> list[Route]:
        e = spec.endpoint
        return [
            Route(
                f"/{e}", e, e,
                summary=f"Generate n 28×28 digit images, white on black ({spec.name})",
                description="Base64 PNGs in JSON, or one PNG grid. `curl -H 'Content-Type: "
                "application/json' -d '{\"n\": 8, \"digit\": 3, \"seed\": 42}' "
                f"localhost:3000/{e}` → "
                "`{\"seed\": 42, \"images\": [{\"digit\": 3, \"png\": \"iVBOR...\"}]}`. "
                "The same seed, n and digit always give byte-identical images; without a "
                "seed one is drawn and returned. With `\"grid\": true` the answer is a single "
                "PNG (Content-Type image/png) and the seed is in the `X-Seed` header.",
                answer=DigitGenerator.generate,
                json_body=generate_input(e, limits, len(spec.labels)),
                response=GeneratedDigits,
                png=True,
            ),
        ]  # fmt: skip

    def __init__(
        self, spec: ModelSpec, limits: Limits, predictor: TimedPredictor, artifact: Artifact
    ) -> None:
        super().__init__(spec, limits)
        # Read from the artifact's config.json as plain values: the config dataclass
        # lives beside the torch module, which an ONNX-only worker never imports.
        config = artifact.config
        self.model = DigitGeneration(predictor, config["latent_dim"], config["num_classes"])

    def run_batch(self, items: list[Any]) -> list[Any]:
        return self.model.run_batch(items)

    def shares_batches(self, device_type: str, max_batch_size: int) -> bool:
        """Only if sharing cannot change a single output bit ("same seed, same bytes").
        On a GPU, padding every call to one batch shape is tried before giving up."""
        sizes = sorted({1, 2, 3, 5, 8, 13, max_batch_size})
        if self.model.rows_independent_of_batch(sizes):
            return True
        if device_type == "cuda":
            self.model.pad_to = max_batch_size
            if self.model.rows_independent_of_batch(sizes):
                log.info("%s: padding every generator call to %d rows", self.spec.endpoint,
                         max_batch_size)  # fmt: skip
                return True
            self.model.pad_to = None
        log.warning(
            "%s: the generator's outputs depend on the batch composition on this backend, "
            "so each request runs alone to keep seeds reproducible",
            self.spec.endpoint,
        )
        return False

    def v2_inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("digits", "INT64", (-1,), "the digit of each image; the request's "
                           "parameter seed (an integer) fixes the images"),)  # fmt: skip

    def v2_outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("images", "UINT8", (-1, 28, 28), "white on black"),)

    async def infer_v2(self, request: InferRequest) -> tuple[list[Tensor], dict[str, Any]]:
        tensor = self.v2_input(request)
        digits = tensor.data.reshape(-1).tolist()
        if len(digits) > self.limits.max_generate_n:
            raise bad_request(f"input 'digits': at most {self.limits.max_generate_n} images "
                              "in one request")  # fmt: skip
        classes = self.model.num_classes
        if any(not 0 <= digit < classes for digit in digits):
            raise bad_request(f"input 'digits': each digit must be 0–{classes - 1}")
        seed = request.parameters.get("seed")
        if seed is None:
            seed = secrets.randbits(63)
        elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise bad_request(f"parameter 'seed' must be an integer from 0 to {MAX_SEED}")
        images = np.stack(await self.submit(self.model.prepare_digits(digits, seed)))
        return [Tensor("images", "UINT8", images.shape, images)], {"seed": seed}

    async def generate(self, request: Any) -> Reply:
        seed = secrets.randbits(63) if request.seed is None else request.seed
        rows = self.model.prepare(request.n, request.digit, seed)
        images = await self.submit(rows)
        with tracing.span("encode"):
            if request.grid:
                return Reply(200, grid_png(images), PNG, {"X-Seed": str(seed)})
            answer = {
                "seed": seed,
                "images": [
                    {"digit": row.label, "png": base64.b64encode(encode_png(pixels)).decode()}
                    for row, pixels in zip(rows, images, strict=True)
                ],
                "model_version": self.version,
            }
            return Reply(200, orjson.dumps(answer))


KINDS: dict[str, type[Task]] = {
    kind.kind: kind for kind in (DigitClassifier, TextClassifier, DigitGenerator)
}


def task_kind(spec: ModelSpec) -> type[Task]:
    try:
        return KINDS[spec.task]
    except KeyError:
        raise ValueError(
            f"{spec.name}: the service serves no task {spec.task!r}; known: {', '.join(KINDS)}"
        ) from None


def _list_of(model: type[BaseModel]) -> type[BaseModel]:
    """The schema of a JSON list of ``model``, named after it (``DigitPredictionList``)."""
    return type(f"{model.__name__}List", (RootModel[list[model]],), {})  # type: ignore[valid-type]


def _tensor_locations(tensor: Tensor) -> list[Location]:
    return [("inputs", tensor.name, index) for index in range(tensor.shape[0])]


def _digit_prediction(probabilities: np.ndarray) -> dict:
    values = probabilities.tolist()
    digit = int(np.argmax(probabilities))
    return {"digit": digit, "confidence": values[digit], "probabilities": values}


def _is_large(image: Image.Image) -> bool:
    return image.width * image.height > INLINE_DECODE_PIXELS
