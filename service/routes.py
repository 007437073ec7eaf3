"""The route table: every API route declared once.

A ``Route`` says everything about one route: its path and name, the bodies it
takes (a JSON schema, file fields, a raw image), the answer it gives, the model
whose task answers it and whether its requests wait in that model's batcher
queue. The table is built from the models' specs (``service.tasks`` turns each
spec into its routes), and everything else is built from the table: the ASGI
gate's routing (``service.http``), request decoding (``Route.decode``), the
answer (``Route.answer``), the OpenAPI document and the schema BentoML's
clients read (``service.openapi``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from service import v2
from service.http import IMAGE_TYPES, JSON, MULTIPART, GateRoute, Headers, Reply
from service.requests import form_files, parse_form, parse_json

V2_PREFIX = "/v2/"
# The version segment of a route that serves any version of its model
# (``/v2/models/<name>/versions/{version}/infer``): the versions a worker serves change
# while it runs (``service.rollouts``), so they are matched, not declared.
VERSION = "{version}"

# Form parts one request may carry beyond its files: a few other fields.
EXTRA_FORM_PARTS = 16


@dataclass(frozen=True)
class FileField:
    """A multipart field that carries image files."""

    name: str
    description: str
    max_items: int | None = None  # None: exactly one file; else 1..max_items


@dataclass(frozen=True)
class Route:
    path: str
    name: str  # the operation's name: BentoML's clients call it as a method
    # The model (its spec's ``endpoint``) whose task answers the route; None: the
    # service itself (a protocol's server metadata and health).
    endpoint: str | None
    summary: str
    description: str
    # (the model's task, or the service, and the decoded request) → the answer
    answer: Callable[[Any, Any], Awaitable[Reply]]
    method: str = "POST"  # GET: no body
    # "native", "v2" (the Open Inference Protocol, service.v2) or "admin" (model
    # management, service.rollouts)
    protocol: str = "native"
    # With API keys on, what a key needs to call it (service.api_keys): "infer" for the
    # prediction routes in every protocol, "admin" for management; None: open.
    scope: str | None = "infer"
    json_body: type[BaseModel] | None = None  # a JSON body validated by this schema
    files: tuple[FileField, ...] = ()  # or a multipart body with these fields
    raw_image: bool = False  # the one file may also be the whole body (image/png, ...)
    response: type[BaseModel] | None = None  # the JSON answer, if it has one
    png: bool = False  # the answer may be a PNG (Content-Type image/png)
    # Its requests wait in the model's batcher queue, so a full queue refuses them
    # (503) before their body is read.
    queued: bool = True
    # A body the route reads itself: (body, headers) → its request (the v2 protocol's
    # tensors); the JSON and file forms above are for the service's own routes.
    reads_body: Callable[[bytes, Headers], Any] | None = None
    media: tuple[str, ...] = ()  # the media types such a body may have
    # The OpenAPI request and answer schemas of a route that reads its own body.
    documents: Mapping[str, Any] | None = None

    @property
    def media_types(self) -> tuple[str, ...]:
        if self.method != "POST":
            return ()
        if self.reads_body is not None:
            return self.media
        if self.json_body is not None:
            return (JSON,)
        return (MULTIPART, *IMAGE_TYPES) if self.raw_image else (MULTIPART,)

    @property
    def max_form_parts(self) -> int:
        return sum(field.max_items or 1 for field in self.files) + EXTRA_FORM_PARTS

    @property
    def queue(self) -> str | None:
        """The model whose batcher queue this route's requests wait in."""
        return self.endpoint if self.queued and self.method == "POST" else None

    def decode(self, media_type: str, content_type: str, body: bytes, headers: Headers) -> Any:
        """The body → the request the answer takes: the validated JSON model, or
        ``{field: [(file bytes, location), ...]}``; raises ``RequestError``."""
        if self.method != "POST":
            return None
        if self.reads_body is not None:
            return self.reads_body(body, headers)
        if self.json_body is not None:
            return parse_json(self.json_body, body)
        if media_type != MULTIPART:  # a raw image body (the gate checked the type)
            [field] = self.files
            return {field.name: [(body, (field.name,))]}
        parts = parse_form(body, content_type, max_parts=self.max_form_parts)
        return {
            field.name: form_files(parts, field.name, max_items=field.max_items)
            for field in self.files
        }


class RouteTable(Mapping[str, Route]):
    """The routes by path, in declaration order; two routes with one path or name are an
    error at start-up, not a route silently shadowed."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes: dict[str, Route] = {}
        names: set[str] = set()
        for route in routes:
            if route.path in self._routes or route.name in names:
                raise ValueError(f"two routes are declared as {route.path} ({route.name})")
            self._routes[route.path] = route
            names.add(route.name)

    def __getitem__(self, path: str) -> Route:
        return self._routes[path]

    def find(self, path: str) -> tuple[Route, str | None]:
        """The route that answers a request path, and the model version the path names
        (None where it names none); raises ``KeyError`` for a path that is no route."""
        route = self._routes.get(path)
        if route is not None:
            return route, None
        key, version = versioned_key(path)
        if key is None:
            raise KeyError(path)
        return self._routes[key], version

    def key_of(self, path: str) -> str | None:
        """The table's key for a request path that is not itself one (a path naming a model
        version), if any."""
        key, _ = versioned_key(path)
        return key if key in self._routes else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def gate_routes(self) -> dict[str, GateRoute]:
        """What the gate checks before reading a body: path → method and media types."""
        return {
            path: GateRoute(route.method, route.media_types) for path, route in self._routes.items()
        }

    def queued_paths(self, endpoint: str) -> tuple[str, ...]:
        """The routes whose requests wait in ``endpoint``'s batcher queue."""
        return tuple(path for path, route in self._routes.items() if route.queue == endpoint)

    def scopes(self) -> dict[str, str]:
        """Path → the API key scope it needs, for the routes that need one."""
        return {path: route.scope for path, route in self._routes.items() if route.scope}

    def unknown(self, path: str) -> Reply | None:
        """A protocol's own 404 for a path under its prefix that is no route (an unknown
        model or version); None elsewhere (BentoML answers)."""
        if path.startswith(V2_PREFIX):
            return Reply(404, v2.error_body(f"no such model, version or route: {path}"))
        return None


def versioned_key(path: str) -> tuple[str | None, str | None]:
    """``/v2/models/<name>/versions/<version>[/...]`` → (the route key with ``{version}``,
    the version); (None, None) for any other path."""
    parts = path.split("/")
    if len(parts) < 6 or parts[1:3] != ["v2", "models"] or parts[4] != "versions" or not parts[5]:
        return None, None
    return "/".join([*parts[:5], VERSION, *parts[6:]]), parts[5]
