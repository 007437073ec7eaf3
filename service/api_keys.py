"""API keys: who may call what, read from a file that can change while the service runs.

    SERVING_API_KEYS_FILE=/etc/serving/api-keys  bentoml serve service.service:ServingService

The file has one key per line, ``name scopes key``; ``#`` starts a comment::

    # name   scopes               key
    ci-bot   infer                sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e88626
    ops      infer,admin,metrics  sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fb

(each hash is 64 hex digits; shortened here).

A key is written as ``sha256:<hex>`` of the key, so that the file (and a
Kubernetes Secret made from it) holds nothing a client could send: keys are
random 256-bit tokens (``python -m service.api_keys new NAME SCOPES`` makes one
and prints its line), so a fast hash is as safe as a slow one and costs a
request about a microsecond. A plain key is accepted too, for tests.

Scopes: ``infer`` (every prediction route, in every protocol), ``admin`` (the
management routes) and ``metrics`` (``/metrics``). Clients send
``Authorization: Bearer <key>``. A missing or unknown key is a 401 with
``WWW-Authenticate``; a key without the route's scope a 403. Each presented key
is hashed and compared with every entry by ``hmac.compare_digest``, so the time
taken does not tell how much of a key was right. No key or hash is logged or
returned: only its name.

Each worker looks at the file's size, change time and inode at most once per
``RELOAD_S`` (on a request), and reads it again when they change: an edit takes
effect in every worker within ``RELOAD_S`` of its first request after the edit.
Each worker reports the change time of the file it read on ``/metrics``
(``serving_api_keys_file_time_seconds``, one per worker process). A file that
cannot be read or parsed keeps the keys in force and is logged.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service.errors import error_body
from service.http import Reply
from service.metrics import key_file_read, key_requests
from service.routes import RouteTable

log = logging.getLogger("service.api_keys")

SCOPES = ("infer", "admin", "metrics")
RELOAD_S = 1.0
HASH_PREFIX = "sha256:"


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the line."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes  # SHA-256 of the key


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(text: str, source: str = "the key file") -> list[ApiKey]:
    keys: list[ApiKey] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise KeyFileError(f"{source}, line {number}: expected 'name scopes key'")
        name, scopes, key = fields
        wanted = frozenset(scopes.split(","))
        if not wanted <= set(SCOPES):
            unknown = ", ".join(sorted(wanted - set(SCOPES)))
            raise KeyFileError(f"{source}, line {number}: unknown scope {unknown}")
        if key.startswith(HASH_PREFIX):
            try:
                value = bytes.fromhex(key.removeprefix(HASH_PREFIX))
            except ValueError:
                value = b""
            if len(value) != 32:
                raise KeyFileError(f"{source}, line {number}: a sha256 needs 64 hex digits")
        else:
            value = digest(key)
        if any(existing.name == name for existing in keys):
            raise KeyFileError(f"{source}, line {number}: the name {name} is used twice")
        keys.append(ApiKey(name, wanted, value))
    return keys


@dataclass(frozen=True)
class Verdict:
    """What a request's credentials allow: ``status`` None (go on), 401 or 403."""

    status: int | None
    message: str = ""
    key_name: str | None = None


class ApiKeys:
    """The keys in force in this worker, read again from their file when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._keys: list[ApiKey] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        self._unreported = False  # keys read and not yet on /metrics
        self._reload(strict=True)

    @property
    def keys(self) -> list[ApiKey]:
        return self._keys

    def has_scope(self, scope: str) -> bool:
        return any(scope in key.scopes for key in self._keys)

    def name_of(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The name of the key a request presents, if it is one in force (for the record
        of who changed what; the gate has already checked the key's scope)."""
        found = self._match(_bearer_token(_authorization(headers)))
        return found.name if found is not None else None

    def _match(self, presented: str | None) -> ApiKey | None:
        if presented is None:
            return None
        presented_digest = digest(presented)
        found = None
        for key in self._keys:  # every entry, so that the time does not depend on a match
            if hmac.compare_digest(presented_digest, key.digest):
                found = key
        return found

    def verdict(self, authorization: bytes | None, scope: str) -> Verdict:
        """Whether a request with this ``Authorization`` header may use a ``scope`` route."""
        now = self._clock()
        if now - self._checked_at >= RELOAD_S:
            self._checked_at = now
            self._reload(strict=False)
        if self._unreported:  # on a request: in a worker, where /metrics is set up
            self._unreported = False
            key_file_read().set(self._stamp[2] / 1e9 if self._stamp else 0.0)
        presented = _bearer_token(authorization)
        if presented is None:
            return Verdict(401, "this route needs an API key: send Authorization: Bearer <key>")
        found = self._match(presented)
        if found is None:
            return Verdict(401, "the API key is not valid")
        if scope not in found.scopes:
            return Verdict(403, f"the key {found.name} may not use {scope} routes",
                           found.name)  # fmt: skip
        return Verdict(None, key_name=found.name)

    def _reload(self, strict: bool) -> None:
        try:
            status = self.path.stat()
            stamp = (status.st_ino, status.st_size, status.st_mtime_ns)
            if stamp == self._stamp:
                return
            keys = parse_keys(self.path.read_text(), str(self.path))
        except (OSError, UnicodeDecodeError, KeyFileError) as error:
            if strict:
                raise KeyFileError(f"cannot read the API keys: {error}") from None
            log.error("API keys not reloaded, the previous ones stay in force: %s", error)
            return
        self._keys, self._stamp = keys, stamp
        self._unreported = True
        log.info("API keys: %d in force (%s)", len(keys), ", ".join(k.name for k in keys))


# Paths any caller may use with keys on: the probes (BentoML's, and the Open Inference
# Protocol's, whose routes declare no scope). The documents and the web page are open
# too: they are not in the guard.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"


class RouteGuard:
    """The gate's check with keys on: the scope each path needs (the route table's, and
    ``metrics`` for ``/metrics``), and the answer to a request without it; an admitted
    request is counted by its key's name."""

    def __init__(self, keys: ApiKeys, table: RouteTable) -> None:
        self.keys = keys
        self.scopes = {**table.scopes(), METRICS_PATH: "metrics"}
        self.key_of = table.key_of
        self._counts: dict[tuple[str, str], Any] = {}

    def __call__(self, path: str, headers: Iterable[tuple[bytes, bytes]]) -> Reply | None:
        scope = self.scopes.get(path)
        if scope is None:
            key = self.key_of(path)  # a path naming a model version
            if key is None or (scope := self.scopes.get(key)) is None:
                return None
        verdict = self.keys.verdict(_authorization(headers), scope)
        if verdict.status is None:
            self._count(verdict.key_name or "", scope)
            return None
        kind = "unauthorized" if verdict.status == 401 else "forbidden"
        body = orjson.dumps(error_body(kind, verdict.message, ("header", "authorization")))
        extra = {"WWW-Authenticate": 'Bearer realm="serving"'} if verdict.status == 401 else None
        return Reply(verdict.status, body, headers=extra)

    def _count(self, name: str, scope: str) -> None:
        child = self._counts.get((name, scope))
        if child is None:
            child = self._counts[(name, scope)] = key_requests().labels(name, scope)
        child.inc()


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    return next((value for name, value in headers if name == b"authorization"), None)


def _bearer_token(authorization: bytes | None) -> str | None:
    if not authorization:
        return None
    kind, _, token = authorization.decode("latin-1").strip().partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def new_key_line(name: str, scopes: Iterable[str]) -> tuple[str, str]:
    """A fresh random key and the key file line that admits it (its hash only)."""
    key = secrets.token_urlsafe(32)
    line = f"{name} {','.join(scopes)} {HASH_PREFIX}{digest(key).hex()}"
    return key, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make an API key.")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="print a new key, then its line for the key file")
    new.add_argument("name")
    new.add_argument("scopes", help=f"comma-separated: {', '.join(SCOPES)}")
    args = parser.parse_args(argv)
    scopes = args.scopes.split(",")
    parse_keys(f"{args.name} {args.scopes} x", "the arguments")  # checks name and scopes
    key, line = new_key_line(args.name, scopes)
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"line for {os.environ.get('SERVING_API_KEYS_FILE', 'the key file')}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
