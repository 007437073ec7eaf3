"""Unit tests of the service's framework-free parts: settings, the adaptive
batcher, safe image decoding, error bodies, the ASGI gate, request parsing and
batch preparation of images."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bench.multipart import multipart_body
from service.batching import AdaptiveBatcher, QueueFull
from service.errors import Problem, RequestError, ServiceBusy
from service.http import (
    JSON,
    MULTIPART,
    PNG,
    ApiGate,
    DisconnectLog,
    GateRoute,
    InFlight,
    Reply,
)
from service.imaging import ImageError, encode_png, grid_png, load_image, open_image
from service.memory import PixelBudget, RequestPixels
from service.requests import form_files, identify_images, parse_form, parse_json
from service.schemas import generate_input, text_inputs
from service.settings import Settings, SettingsError, resolve_backend, resolve_precision

LIMITS = Settings.from_env({}).limits
SentimentInput, _ = text_inputs("sentiment", LIMITS)
GenerateInput = generate_input("generate", LIMITS, 10)

# --- settings -------------------------------------------------------------------------


def test_settings_defaults_and_overrides():
    defaults = Settings.from_env({})
    assert defaults.device == "auto" and defaults.workers == 1 and defaults.batching
    assert resolve_backend(defaults.models["classify"], "cpu") == "onnx"
    assert resolve_precision(defaults.models["generate"], "torch", "cuda") == "fp16"
    assert resolve_precision(defaults.models["generate"], "torch", "cpu") == "fp32"

    settings = Settings.from_env(
        {
            "SERVING_BACKEND": "torch",
            "SERVING_SENTIMENT_BACKEND": "onnx",
            "SERVING_CLASSIFY_MAX_BATCH_SIZE": "16",
            "SERVING_GENERATE_MAX_LATENCY_MS": "0",
            "SERVING_BATCHING": "off",
            "SERVING_WORKERS": "4",
            "SERVING_MAX_TEXT_CHARS": "100",
        }
    )
    assert settings.models["classify"].backend == "torch"
    assert settings.models["sentiment"].backend == "onnx"
    assert not settings.batching
    assert settings.limits.max_text_chars == 100
    assert settings.threads_per_model(cpu_count=16) == 3  # a core per worker is left to HTTP
    assert settings.threads_per_model(cpu_count=2) == 1
    # The convolutional models take the worker's whole share; the LSTM leaves a core.
    assert settings.threads_per_model("classify", cpu_count=16) == 4
    assert settings.threads_per_model("sentiment", cpu_count=16) == 3
    assert Settings.from_env({}).threads_per_model("generate", cpu_count=2) == 2
    assert Settings.from_env({"SERVING_THREADS": "1"}).threads_per_model("generate") == 1
    batching = settings.resolve_batching("cpu")
    assert batching["classify"].max_batch_size == 16
    assert batching["generate"].max_latency_ms == 0
    assert batching["sentiment"] == Settings.from_env({}).resolve_batching("cpu")["sentiment"]


def test_per_model_settings_are_named_after_the_endpoint_and_the_old_names_still_work():
    settings = Settings.from_env(
        {
            "SERVING_CLASSIFY_BACKEND": "torch",
            "SERVING_GENERATE_PRECISION": "fp16",
            "SERVING_SENTIMENT_TAG": "sst2-bilstm:abc",
        }
    )
    assert settings.models["classify"].backend == "torch"
    assert settings.models["generate"].precision == "fp16"
    assert settings.models["sentiment"].tag == "sst2-bilstm:abc"
    assert settings.renamed_in_use == ()

    legacy = Settings.from_env(
        {
            "SERVING_CLASSIFIER_BACKEND": "torch",
            "SERVING_GENERATOR_TAG": "digit-gan:old",
            "SERVING_GENERATE_TAG": "digit-gan:new",  # the new name wins
        }
    )
    assert legacy.models["classify"].backend == "torch"
    assert legacy.models["generate"].tag == "digit-gan:new"
    assert set(legacy.renamed_in_use) == {"SERVING_CLASSIFIER_BACKEND", "SERVING_GENERATOR_TAG"}
    with pytest.raises(SettingsError, match="SERVING_CLASSIFIER_BACKEND='gpu'"):
        Settings.from_env({"SERVING_CLASSIFIER_BACKEND": "gpu"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SERVING_DEVICE", "tpu"),
        ("SERVING_BACKEND", "tensorrt"),
        ("SERVING_CLASSIFY_MAX_BATCH_SIZE", "0"),
        ("SERVING_WORKERS", "two"),
        ("SERVING_BATCHING", "maybe"),
    ],
)
def test_a_bad_setting_names_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


# --- adaptive batcher -----------------------------------------------------------------


class RecordingModel:
    """A stand-in 'model' that doubles numbers and records each call's batch."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("boom")
        return [2 * item for item in items]


def _batcher(model: RecordingModel, **kwargs) -> AdaptiveBatcher[int, int]:
    options = {"max_batch_size": 8, "max_latency_ms": 0}
    options.update(kwargs)
    return AdaptiveBatcher("test", model, **options)


def test_concurrent_requests_share_batches_and_get_their_own_results():
    model = RecordingModel(delay_s=0.01)
    batcher = _batcher(model)

    async def main():
        return await asyncio.gather(*[batcher.submit([i]) for i in range(40)])

    results = asyncio.run(main())
    assert results == [[2 * i] for i in range(40)]
    assert max(len(b) for b in model.batches) > 1
    assert max(len(b) for b in model.batches) <= 8
    assert sorted(item for b in model.batches for item in b) == list(range(40))


def test_a_request_larger_than_the_batch_is_split_and_reassembled_in_order():
    model = RecordingModel()
    batcher = _batcher(model, max_batch_size=8)

    async def main():
        # 20 + 5 + 7 items: more than one batch in total and in the first request alone.
        return await asyncio.gather(
            batcher.submit(list(range(20))),
            batcher.submit(list(range(100, 105))),
            batcher.submit(list(range(200, 207))),
        )

    big, small, medium = asyncio.run(main())
    assert big == [2 * i for i in range(20)]
    assert small == [2 * i for i in range(100, 105)]
    assert medium == [2 * i for i in range(200, 207)]
    assert all(len(b) <= 8 for b in model.batches)
    assert sum(len(b) for b in model.batches) == 32


def test_isolated_requests_never_share_a_model_call():
    model = RecordingModel()
    batcher = _batcher(model, isolate_requests=True, max_batch_size=4)

    async def main():
        return await asyncio.gather(
            *[batcher.submit([10 * r + i for i in range(3)]) for r in range(5)]
        )

    asyncio.run(main())
    for batch in model.batches:
        assert len({item // 10 for item in batch}) == 1


def test_a_batch_is_prepared_while_the_model_runs_the_one_before():
    """With a prepare stage, batch N+1 is prepared on its own thread while batch N is in
    the model: the model of the first batch waits until the second has been prepared,
    which would never happen if the stages took turns."""
    second_prepared = threading.Event()
    stages: list[tuple[str, list[int]]] = []

    def prepare(items: list[int]) -> list[int]:
        stages.append(("prepare", list(items)))
        if len(stages) > 1:
            second_prepared.set()
        return [item + 1000 for item in items]

    def model(rows: list[int]) -> list[int]:
        stages.append(("model", list(rows)))
        if rows[0] == 1000:  # the first batch
            assert second_prepared.wait(timeout=10), "the stages did not overlap"
        return [2 * row for row in rows]

    batcher = AdaptiveBatcher("test", model, max_batch_size=1, max_latency_ms=0,
                              prepare_batch=prepare)  # fmt: skip

    async def main():
        return await asyncio.gather(*[batcher.submit([i]) for i in range(4)])

    assert asyncio.run(main()) == [[2 * (i + 1000)] for i in range(4)]
    models = [items for stage, items in stages if stage == "model"]
    assert models == [[1000 + i] for i in range(4)]  # in order, one at a time


def test_a_batch_that_fails_to_prepare_fails_only_its_requests():
    def prepare(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("cannot prepare")
        return items

    batcher = AdaptiveBatcher("test", RecordingModel(), max_batch_size=1, max_latency_ms=0,
                              prepare_batch=prepare)  # fmt: skip

    async def main():
        outcomes = await asyncio.gather(
            *[batcher.submit([i]) for i in (1, 3, 5)], return_exceptions=True
        )
        return outcomes, await batcher.submit([7])

    (one, three, five), later = asyncio.run(main())
    assert one == [2] and five == [10] and later == [14]
    assert isinstance(three, ValueError)


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_goes_on():
    model = RecordingModel(fail_on=3)
    batcher = _batcher(model, isolate_requests=True)

    async def main():
        outcomes = await asyncio.gather(
            batcher.submit([1]), batcher.submit([3]), batcher.submit([5]), return_exceptions=True
        )
        later = await batcher.submit([7])
        return outcomes, later

    outcomes, later = asyncio.run(main())
    assert outcomes[0] == [2] and outcomes[2] == [10]
    assert isinstance(outcomes[1], ValueError)
    assert later == [14]


def test_a_full_queue_refuses_new_work():
    model = RecordingModel(delay_s=0.05)
    batcher = _batcher(model, max_queue_items=10, max_batch_size=4)

    async def main():
        first = asyncio.ensure_future(batcher.submit(list(range(10))))
        await asyncio.sleep(0)  # the first request is queued
        with pytest.raises(QueueFull):
            await batcher.submit([1, 2, 3])
        return await first

    assert asyncio.run(main()) == [2 * i for i in range(10)]


def test_a_lone_request_does_not_wait_for_a_batch_to_fill():
    model = RecordingModel()
    batcher = _batcher(model, max_latency_ms=500)

    async def main():
        await batcher.submit([1])  # warm up the consumer and its thread
        start = time.perf_counter()
        await batcher.submit([2])
        return time.perf_counter() - start

    assert asyncio.run(main()) < 0.2


def test_the_batcher_waits_for_requests_still_arriving_up_to_the_latency_bound():
    model = RecordingModel()
    arriving = {"count": 0}
    batcher = _batcher(model, max_latency_ms=150, arriving_requests=lambda: arriving["count"])

    async def main():
        await batcher.submit([0])
        # Two requests are in the server; the second reaches the batcher 50 ms later.
        arriving["count"] = 2
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.gather(first, second)
        # One request announced but never submitted: the wait ends at the bound.
        arriving["count"] = 2
        start = time.perf_counter()
        await batcher.submit([3])
        return time.perf_counter() - start

    waited = asyncio.run(main())
    assert [1, 2] in model.batches
    assert 0.1 <= waited < 1.0


def test_an_abandoned_request_is_not_run():
    model = RecordingModel(delay_s=0.05)
    batcher = _batcher(model, max_batch_size=1)

    async def main():
        first = asyncio.ensure_future(batcher.submit([1]))
        abandoned = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await asyncio.sleep(0)
        assert batcher.queued_items == 0  # it stops counting against the queue at once
        assert await first == [2]
        assert await batcher.submit([3]) == [6]

    asyncio.run(main())
    assert [2] not in model.batches


def test_the_decode_budget_is_shared_by_threads_and_a_huge_image_runs_alone():
    budget = PixelBudget(limit=100)
    held, peak, lock = [0], [0], threading.Lock()

    def decode(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                held[0] += min(pixels, budget.limit)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(pixels, budget.limit)

    threads = [threading.Thread(target=decode, args=(p,)) for p in [60, 60, 40, 500, 30] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert 70 <= peak[0] <= 100  # never over the budget, yet smaller images shared it


def test_a_request_over_its_pixel_budget_fails_from_the_image_that_passes_it():
    pixels = RequestPixels(limit=100)
    pixels.charge(60)
    pixels.charge(40)
    with pytest.raises(ImageError) as over:
        pixels.charge(1)
    assert over.value.type == "images_too_large"


# --- images ---------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` pixels but carries almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_every_supported_format_opens_and_loads(fmt):
    image = Image.new("RGB", (40, 30), "white")
    opened = open_image(_encoded(image, fmt), max_pixels=10_000)
    assert opened.format == fmt and opened.size == (40, 30)
    assert load_image(opened).size == (40, 30)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty_file"),
        (b"hello, world", "invalid_image"),
        (_encoded(Image.new("L", (8, 8)), "TIFF"), "invalid_image"),
        (_png_header_only(100_000, 100_000), "image_too_large"),
        (_png_header_only(5000, 5000), "image_too_large"),
    ],
)
def test_bad_uploads_are_refused_from_the_header(data, kind):
    start = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        open_image(data, max_pixels=4096 * 4096)
    assert caught.value.type == kind
    assert time.perf_counter() - start < 0.5  # nothing was decompressed


def test_truncated_and_corrupt_data_fail_on_load():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    jpeg = _encoded(photo, "JPEG")
    with pytest.raises(ImageError) as caught:
        load_image(open_image(jpeg[: len(jpeg) // 2], max_pixels=10_000))
    assert caught.value.type == "corrupt_image"
    png = _encoded(photo, "PNG")
    corrupt = png[:60] + bytes(len(png) - 80) + png[-20:]
    with pytest.raises(ImageError):
        load_image(open_image(corrupt, max_pixels=10_000))


def test_png_encoding_is_deterministic_and_grids_lay_out_tiles():
    tile = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    assert encode_png(tile) == encode_png(tile.copy())
    grid = Image.open(io.BytesIO(grid_png([tile] * 5)))
    assert grid.size == (3 * 28 + 4 * 2, 2 * 28 + 3 * 2)


# --- errors and the request gate ------------------------------------------------------


def test_error_bodies_are_objects_naming_each_problem():
    error = RequestError(
        [Problem("invalid_image", "not an image", ("images", 1)), Problem("x", "y", ("images", 3))]
    )
    body = error.body()
    assert body["error"].startswith("images[1]: not an image")
    assert [d["loc"] for d in body["detail"]] == [["images", 1], ["images", 3]]
    assert error.response().status_code == 400


class EchoHandler:
    """Answers with what the gate handed over, and how many requests were in flight."""

    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight
        self.busy = False
        self.cancelled = 0

    def refusal(self, path: str) -> Reply | None:
        return Reply.error(ServiceBusy("the queue is full")) if self.busy else None

    async def handle(
        self, path: str, media_type: str, content_type: str, body: bytes, headers
    ) -> Reply:
        if path == "/status":
            return Reply.json({"method": "GET", "bytes": len(body)})
        if body == b"fail":
            raise RuntimeError("a server fault")
        if body == b"slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        in_flight = self.in_flight.count([path])
        return Reply.json({"type": media_type, "bytes": len(body), "in_flight": in_flight})


def test_the_gate_checks_method_content_type_and_size_then_hands_over_the_body():
    in_flight = InFlight()
    handler = EchoHandler(in_flight)

    async def other(_request) -> PlainTextResponse:
        return PlainTextResponse("BentoML's own route")

    app = Starlette(routes=[Route("/livez", other)])
    app.add_middleware(
        ApiGate,
        routes={
            "/echo": GateRoute("POST", (JSON,)),
            "/files": GateRoute("POST", (MULTIPART, PNG)),
            "/status": GateRoute("GET"),
        },
        max_body_bytes=1000,
        handler=lambda: handler,
        unknown=lambda path: Reply(404, b'{"error": "no such model"}') if "/v2/" in path else None,
        in_flight=in_flight,
    )

    async def chunks(count: int):
        for _ in range(count):
            yield b"x" * 100

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            json_type = {"Content-Type": JSON}
            ok = await client.post("/echo", content=b'{"a": 1}', headers=json_type)
            assert ok.json() == {"type": JSON, "bytes": 8, "in_flight": 1}
            assert in_flight.count(["/echo"]) == 0
            untyped = await client.post("/echo", content=b"{}")  # no Content-Type: JSON
            assert untyped.json()["type"] == JSON
            raw = await client.post("/files", content=b"png", headers={"Content-Type": "Image/PNG"})
            assert raw.json()["type"] == PNG
            assert (await client.get("/livez")).text == "BentoML's own route"
            not_post = await client.get("/echo")
            assert not_post.status_code == 405 and not_post.headers["allow"] == "POST"
            # A GET route: no body and no Content-Type checked; POST to it is refused.
            assert (await client.get("/status")).json() == {"method": "GET", "bytes": 0}
            assert (await client.post("/status", content=b"{}")).status_code == 405
            # A path that is no route: the protocol's own 404 where it has one, else the app's.
            unknown = await client.post("/v2/models/nope/infer", content=b"{}")
            assert unknown.status_code == 404 and unknown.json()["error"] == "no such model"
            # Every answer names its request: the header, and the JSON error body.
            assert unknown.json()["request_id"] == unknown.headers["x-request-id"]
            assert (await client.get("/elsewhere")).status_code == 404
            wrong = await client.post("/echo", content=b"x", headers={"Content-Type": "text/plain"})
            assert wrong.status_code == 415
            assert wrong.json()["detail"][0]["type"] == "unsupported_media_type"
            no_boundary = await client.post(
                "/files", content=b"x", headers={"Content-Type": MULTIPART}
            )
            assert no_boundary.status_code == 415
            too_big = await client.post("/echo", content=b"x" * 1001, headers=json_type)
            assert too_big.status_code == 413 and "1000 bytes" in too_big.json()["error"]
            chunked = await client.post("/echo", content=chunks(20), headers=json_type)
            assert chunked.status_code == 413
            small = await client.post("/echo", content=chunks(5), headers=json_type)
            assert small.json()["bytes"] == 500
            fault = await client.post("/echo", content=b"fail", headers=json_type)
            assert (
                fault.status_code == 500 and fault.json()["detail"][0]["type"] == "internal_error"
            )
            assert in_flight.count(["/echo", "/files"]) == 0
            handler.busy = True
            refused = await client.post("/echo", content=b"{}", headers=json_type)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["detail"][0]["type"] == "overloaded"
            handler.busy = False

    asyncio.run(main())


def test_the_gate_cancels_the_work_of_a_client_that_disconnects(caplog):
    in_flight = InFlight()
    handler = EchoHandler(in_flight)
    clock = [0.0]
    gate = ApiGate(
        None,
        routes={"/echo": GateRoute("POST", (JSON,))},
        max_body_bytes=1000,
        handler=lambda: handler,
        in_flight=in_flight,
        disconnects=DisconnectLog(interval_s=10, clock=lambda: clock[0]),
    )
    scope = {"type": "http", "path": "/echo", "method": "POST",
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip

    async def request(body: bytes, leave_after_s: float | None) -> list[dict]:
        """Send ``body``; the client disconnects after ``leave_after_s`` (None: it waits)."""
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            if leave_after_s is None:
                await asyncio.Event().wait()  # never: the answer comes first
            await asyncio.sleep(leave_after_s)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await asyncio.wait_for(gate(scope, receive, send), timeout=5)
        return sent

    async def main():
        with caplog.at_level(logging.INFO, logger="service.http"):
            for _ in range(3):
                gone = await request(b"slow", leave_after_s=0.01)
                assert gone[0]["status"] == 499  # not sent by the server; ends the request
            clock[0] = 11.0
            await request(b"slow", leave_after_s=0.01)
        assert handler.cancelled == 4 and in_flight.count(["/echo"]) == 0
        # One line per interval at most, counting every departure since the last line.
        lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
        assert len(lines) == 2 and lines[1].startswith("3 client(s) disconnected")
        answered = await request(b"{}", leave_after_s=None)
        assert answered[0]["status"] == 200

    asyncio.run(main())


# --- request parsing -------------------------------------------------------------------


def _form(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, str]:
    return multipart_body([(name, filename, data, None) for name, filename, data in parts], "XyZ")


def _kinds(error: RequestError) -> list[tuple[str, tuple]]:
    return [(problem.type, problem.loc) for problem in error.problems]


def test_form_parts_become_files_with_their_locations():
    body, content_type = _form(("note", None, b"hi"), ("images", "a.png", b"A\r\nB"),
                               ("images", "b.png", b""))  # fmt: skip
    parts = parse_form(body, content_type, max_parts=10)
    assert [(p.name, p.is_file, p.data) for p in parts] == [
        ("note", False, b"hi"),
        ("images", True, b"A\r\nB"),
        ("images", True, b""),
    ]
    assert form_files(parts, "images", max_items=2) == [
        (b"A\r\nB", ("images", 0)),
        (b"", ("images", 1)),
    ]
    assert form_files(parts, "images") == [(b"A\r\nB", ("images",))]  # the first only
    with pytest.raises(RequestError) as missing:
        form_files(parts, "image")
    assert _kinds(missing.value) == [("missing", ("image",))]
    with pytest.raises(RequestError) as too_many:
        form_files(parts, "images", max_items=1)
    assert _kinds(too_many.value) == [("too_long", ("images",))]
    with pytest.raises(RequestError) as text:
        form_files(parts, "note")
    assert _kinds(text.value) == [("not_a_file", ("note",))]


def test_bad_forms_are_request_errors():
    body, content_type = _form(*[("images", "a.png", b"x")] * 5)
    with pytest.raises(RequestError) as flood:
        parse_form(body, content_type, max_parts=4)
    assert _kinds(flood.value) == [("too_many_parts", ("body",))]
    cut = body[: body.index(b"--XyZ--") - 10]  # the last part never ends
    assert len(parse_form(cut, content_type, max_parts=10)) == 4
    with pytest.raises(RequestError) as garbage:
        parse_form(b"--XyZ\r\nno headers end", content_type, max_parts=10)
    assert garbage.value.problems[0].type in ("invalid_multipart",)
    with pytest.raises(RequestError):
        parse_form(body, "multipart/form-data", max_parts=10)


def test_forms_are_read_as_rfc_7578_allows():
    body, content_type = _form(("images", "a.png", b"A"), ("note", None, b"hi"))
    # A preamble before the first delimiter and an epilogue after the last are ignored,
    # and so is transport padding after a delimiter.
    padded = b"preamble\r\n" + body.replace(b"--XyZ\r\n", b"--XyZ \t\r\n") + b"epilogue"
    assert [(p.name, p.data) for p in parse_form(padded, content_type, max_parts=10)] == [
        ("images", b"A"),
        ("note", b"hi"),
    ]
    # Quoted names with escapes and RFC 2231 names go through python-multipart's parser.
    escaped = b'--XyZ\r\nContent-Disposition: form-data; name="a\\"b"\r\n\r\nv\r\n--XyZ--'
    assert [(p.name, p.data) for p in parse_form(escaped, content_type, max_parts=10)] == [
        ('a"b', b"v")
    ]
    quoted_boundary = 'multipart/form-data; boundary="XyZ"'
    assert len(parse_form(body, quoted_boundary, max_parts=10)) == 2
    # A part without any header line has no name and is skipped.
    assert parse_form(b"--XyZ\r\n\r\ndata\r\n--XyZ--", content_type, max_parts=10) == []
    for malformed in (
        b"no delimiter at all",
        b"--XyZ\r\nnot a header\r\n\r\nx\r\n--XyZ--",  # a header line without a colon
        b"--XyZjunk\r\n\r\nx\r\n--XyZ--",  # a delimiter not followed by a line break
    ):
        with pytest.raises(RequestError) as error:
            parse_form(malformed, content_type, max_parts=10)
        assert _kinds(error.value) == [("invalid_multipart", ("body",))], malformed


def test_images_are_identified_and_every_bad_one_reported():
    png = encode_png(np.zeros((28, 28), np.uint8))
    [image] = identify_images([(png, ("image",))], max_pixels=1000)
    assert image.size == (28, 28)
    with pytest.raises(RequestError) as bad:
        identify_images(
            [(png, ("images", 0)), (b"nope", ("images", 1)), (png, ("images", 2))], max_pixels=100
        )
    assert _kinds(bad.value) == [
        ("image_too_large", ("images", 0)),
        ("invalid_image", ("images", 1)),
        ("image_too_large", ("images", 2)),
    ]


@pytest.mark.parametrize(
    ("model", "body", "kind"),
    [
        (SentimentInput, b'{"text": ""}', "string_too_short"),
        (SentimentInput, b"{}", "missing"),
        (SentimentInput, b"", "missing"),  # an empty body is an empty object
        (SentimentInput, b'{"text": 5}', "string_type"),
        (SentimentInput, b'["a"]', "model_type"),
        (SentimentInput, b'{"text": "\xff"}', "json_invalid"),
        (GenerateInput, b'{"n": 2.5}', "int_type"),
        (GenerateInput, b'{"n": "3"}', "int_type"),
        (GenerateInput, b'{"digit": 10}', "less_than_equal"),
        (GenerateInput, b'{"grid": "yes"}', "bool_type"),
    ],
)
def test_json_bodies_are_validated_against_the_documented_schema(model, body, kind):
    with pytest.raises(RequestError) as error:
        parse_json(model, body)
    assert error.value.problems[0].type == kind


def test_json_defaults_and_values():
    assert parse_json(GenerateInput, b"").model_dump() == {
        "n": 1, "digit": None, "seed": None, "grid": False
    }  # fmt: skip
    assert parse_json(SentimentInput, '{"text": "Très bien"}'.encode()).text == "Très bien"


# --- preparing images in batches -------------------------------------------------------


def test_batch_preparation_is_exactly_the_training_preprocessing():
    from models.preprocessing import digit_pixels_from_image, digit_pixels_from_images

    rng = np.random.default_rng(1)
    seven = np.zeros((28, 28), np.uint8)
    seven[5:8, 6:22] = 255
    seven[8:24, 18:21] = 200
    images = [Image.fromarray(seven), Image.fromarray(255 - seven), Image.new("L", (28, 28))]
    images += [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(5)]
    images += [Image.fromarray(rng.integers(0, 255, (40, 33), dtype=np.uint8)) for _ in range(3)]
    images += [Image.fromarray(seven).convert("RGB"), Image.fromarray(seven).resize((600, 600))]
    expected = np.stack([digit_pixels_from_image(image) for image in images])
    assert np.array_equal(digit_pixels_from_images(images), expected)


def test_a_corrupt_image_fails_alone_in_its_batch():
    from service.inference import DigitClassification, TimedPredictor

    calls = []
    predictor = TimedPredictor(lambda rows: np.tile(np.arange(10.0), (len(rows), 1)), calls.append)
    task = DigitClassification(predictor)
    good = encode_png(np.full((28, 28), 200, np.uint8))
    truncated = encode_png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))[:60]
    items = [open_image(data, max_pixels=10**6) for data in (good, truncated, good)]
    ready = DigitClassification.prepare(load_image(open_image(good, max_pixels=10**6)))
    results = task.predict_prepared(task.decode_and_prepare([*items, ready]))
    assert isinstance(results[1], ImageError) and results[1].type == "corrupt_image"
    for index in (0, 2, 3):
        assert results[index].shape == (10,) and results[index].argmax() == 9
    assert len(calls) == 1 and calls[0] >= 0  # one timed model call for the three good rows


def test_the_classifier_input_is_exactly_the_training_preprocessing():
    from models.preprocessing import digit_tensor_from_image
    from service.inference import DigitClassification

    rng = np.random.default_rng(0)
    for shape in [(28, 28), (40, 33), (300, 120)]:
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        expected = digit_tensor_from_image(image).numpy()
        assert np.array_equal(DigitClassification.prepare(image), expected)


# --- BentoML's request metrics ----------------------------------------------------------


def test_route_traffic_metrics_look_each_child_up_once(monkeypatch):
    from bentoml._internal.server.http import instruments

    from service import framework_hooks
    from service.traffic_metrics import RouteTrafficMetrics

    monkeypatch.setattr(RouteTrafficMetrics, "api_routes", RouteTrafficMetrics.api_routes)
    framework_hooks.install(Settings.from_env({}), ["/classify"])  # as building the service does
    assert instruments.RunnerTrafficMetricsMiddleware is RouteTrafficMetrics

    async def app(scope, receive, send):
        status = 200 if scope["path"] == "/classify" else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def ignore(message):
        pass

    middleware = RouteTrafficMetrics(app, namespace="route_metrics_test")
    asyncio.run(middleware({"type": "http", "path": "/classify"}, None, ignore))
    lookups: list[dict] = []

    def counted(labels):
        def lookup(*args, **kwargs):
            lookups.append(kwargs)
            return labels(*args, **kwargs)

        return lookup

    for metric in (middleware.metrics_request_total, middleware.metrics_request_duration):
        monkeypatch.setattr(metric, "labels", counted(metric.labels))

    async def requests():
        for _ in range(20):
            await middleware({"type": "http", "path": "/classify"}, None, ignore)
        await middleware({"type": "http", "path": "/elsewhere"}, None, ignore)

    asyncio.run(requests())
    # No lookup for the API route any more; another path takes BentoML's own code.
    assert all(k["endpoint"] == "/elsewhere" for k in lookups) and lookups
    route = middleware._routes["/classify"]
    total, _ = route.by_status[200]
    assert total._value.get() == 21


def test_the_gauges_of_a_dead_worker_are_dropped_and_its_counts_kept(tmp_path):
    from service.metrics import forget_dead_workers

    dead, alive = 2**22 + 7, os.getpid()
    names = [f"gauge_livesum_{dead}.db", f"gauge_livemax_{dead}.db", f"gauge_all_{dead}.db",
             f"counter_{dead}.db", f"gauge_livesum_{alive}.db",
             f"gauge_all_{alive}.db"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"")
    forget_dead_workers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead}.db", f"gauge_livesum_{alive}.db", f"gauge_all_{alive}.db"]
    )
