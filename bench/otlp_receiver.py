"""A real OTLP/HTTP trace receiver, for the tests and the tracing benchmark: it takes
what an OpenTelemetry exporter posts to ``/v1/traces`` (protobuf, gzip or not),
decodes it with the protocol's own message types and keeps every span.

    with OtlpReceiver() as receiver:
        ...  # SERVING_TRACING_ENDPOINT=receiver.endpoint
        spans = receiver.spans()
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    service: str = ""


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(Span(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), name=span.name,
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in span.attributes},
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                    service=str(resource.get("service.name", "")),
                ))  # fmt: skip
    return spans


class OtlpReceiver:
    """An OTLP/HTTP receiver on a local port, in a thread of this process."""

    def __init__(self, port: int = 0, keep: bool = True) -> None:
        """``keep``: keep the spans (else only count them, for a long benchmark)."""
        received: list[Span] = []
        counted = [0]
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if keep:
                    spans = decode(body)
                    with lock:
                        counted[0] += len(spans)
                        received.extend(spans)
                else:  # a benchmark's sink: count the exports, decode nothing
                    with lock:
                        counted[0] += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._received, self._counted, self._lock = received, counted, lock
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._received)

    @property
    def count(self) -> int:
        """Spans received (exports received, without ``keep``)."""
        return self._counted[0]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Receive OTLP/HTTP traces and count them.")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    with OtlpReceiver(args.port, keep=False) as receiver:
        print(f"receiving at {receiver.endpoint}", flush=True)
        try:
            while True:
                time.sleep(10)
                print(f"{receiver.count} exports so far", flush=True)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
