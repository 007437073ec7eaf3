"""Where each request's time went, as OpenTelemetry spans (``SERVING_TRACING``).

BentoML's tracing does the plumbing: its ASGI middleware makes each request's span
(continuing a client's W3C ``traceparent``), and its tracer provider samples
(``SERVING_TRACING_SAMPLE_RATE``) and exports over OTLP/HTTP
(``SERVING_TRACING_ENDPOINT``). Inside the request's span the service adds

    read body → decode → queue wait → batch (batch.size; a link to the batch's own
    span) → model call → encode

Requests share batches, so a batch is also a span of its own, in a trace of its
own (``batch <model>``, with the model call under it), linked to every request it
served, and each request's ``batch`` span links back to it. The batcher records
the times on its thread-free path (nanosecond stamps); the spans are made after the
fact with those times, on the event loop. With tracing off, nothing here runs
beyond one check of a module global.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

_TRACER: trace.Tracer | None = None
_OFF = contextlib.nullcontext()


def enable() -> None:
    """Trace in this worker, through BentoML's tracer provider."""
    global _TRACER
    from bentoml._internal.configuration.containers import BentoMLContainer

    _TRACER = trace.get_tracer("service", tracer_provider=BentoMLContainer.tracer_provider.get())


def disable() -> None:
    global _TRACER
    _TRACER = None


def active() -> bool:
    return _TRACER is not None


def span(name: str) -> Any:
    """A span of the current request around a block; nothing with tracing off."""
    if _TRACER is None:
        return _OFF
    return _TRACER.start_as_current_span(name)


def current_context() -> trace.SpanContext | None:
    """The current span's context, to link a batch to the requests it serves."""
    if _TRACER is None:
        return None
    return trace.get_current_span().get_span_context()


def batch_span(
    model: str,
    size: int,
    taken_ns: int,
    model_start_ns: int,
    model_end_ns: int,
    requests: Iterable[trace.SpanContext | None],
) -> trace.SpanContext | None:
    """The batch's own span (a trace of its own, linked to the requests it served), with
    its model call; returns its context for the requests to link back to."""
    if _TRACER is None:
        return None
    links = [trace.Link(context) for context in requests if context is not None]
    batch = _TRACER.start_span(f"batch {model}", context=otel_context.Context(), links=links,
                               start_time=taken_ns,
                               attributes={"batch.size": size, "model": model})  # fmt: skip
    within = trace.set_span_in_context(batch)
    call = _TRACER.start_span("model call", context=within, start_time=model_start_ns,
                              attributes={"batch.size": size})  # fmt: skip
    call.end(end_time=model_end_ns)
    batch.end(end_time=model_end_ns)
    return batch.get_span_context()


def request_batch_spans(
    enqueued_ns: int,
    taken_ns: int,
    model_start_ns: int,
    model_end_ns: int,
    size: int,
    batch: trace.SpanContext | None,
) -> None:
    """The current request's queue wait, the batch it joined and that batch's model call."""
    if _TRACER is None:
        return
    _TRACER.start_span("queue wait", start_time=enqueued_ns).end(end_time=taken_ns)
    links = [trace.Link(batch)] if batch is not None else []
    joined = _TRACER.start_span("batch", start_time=taken_ns, links=links,
                                attributes={"batch.size": size})  # fmt: skip
    within = trace.set_span_in_context(joined)
    _TRACER.start_span("model call", context=within, start_time=model_start_ns).end(
        end_time=model_end_ns
    )
    joined.end(end_time=model_end_ns)
