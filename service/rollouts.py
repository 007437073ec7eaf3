"""New model versions rolled out, split with a canary and rolled back while the service
runs, in every worker, without a restart.

The management routes (the ``admin`` scope; they exist when the service starts with
an ``admin`` key in its key file)::

    GET  /admin/models                       every model: its versions in the store, which
                                             serves, any canary, who changed it and when
    POST /admin/models/<name>/activate       {"version": "..."}: serve that version
                                             {"version": "...", "canary_percent": 10}:
                                             send it that share of the requests
    POST /admin/models/<name>/promote        the canary serves everything
    POST /admin/models/<name>/abort          the canary stops; the serving version stays
    POST /admin/models/<name>/rollback       back to the version served before
    POST /admin/models/<name>/reset          back to the configured version (the pins)

A version comes from the model store (``training.register`` puts it there). Before
it serves, the worker that takes the call loads it next to the serving version and
checks it (``ServingApp.load_version``: checksums, loading on the worker's backend,
the spec's example input against the output its artifact records, a warm-up); a
version that fails is refused with a 422 naming the check, and nothing changes.

**State.** Which version serves each model is kept in the state directory
(``SERVING_STATE_DIR``, by default ``$BENTOML_HOME/serving-state``)::

    models.json          per model: the version a rollout chose, the configured version
                         it overrides, the versions before it, any canary, who and when
    models.json.lock     taken while models.json is rewritten
    workers/<pid>.json   what each worker serves now, and the change it has applied

A rollout overrides the configured version (``SERVING_<ENDPOINT>_TAG``, else the
pins in ``models/served_models.json``) and survives a restart, until a reset, or
until the configured version itself changes (a new release deployed): the state
records the version it was made over and is ignored once that is no longer the
one configured, so a deployment of a new release is never shadowed by an older
rollout.

**Every worker.** Each worker looks at ``models.json`` every ``POLL_S`` and, when it
changed, loads and checks the versions it names that it does not have, then swaps
them in; the worker that took the call waits until every worker has reported the
change (``SWITCH_WAIT_S`` at most) and answers with what each one serves.

**Requests in flight.** A request is answered by the version chosen when it was
admitted, start to end. A version taken out of service keeps its batcher until the
last of its requests is answered (``Task.requests_in_progress``), then stops it,
so no request is dropped or answered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
import orjson
from pydantic import BaseModel, ConfigDict, Field

from models.registry import ModelSpec
from service.app import ServingApp, StoredModel, VersionRefused
from service.errors import RequestError
from service.http import JSON, Headers, Reply
from service.metrics import process_exists
from service.model_store import load_stored_artifact, version_of
from service.requests import parse_json
from service.routes import Route
from service.settings import model_spec
from service.tasks import Task
from service.worker_state import publish_versions

log = logging.getLogger(__name__)

STATE_FILE = "models.json"
WORKERS_DIR = "workers"
POLL_S = 0.2
SWITCH_WAIT_S = 60.0
# How often a version taken out of service looks whether its last request is answered.
RETIRE_POLL_S = 0.05
ADMIN_PREFIX = "/admin/models"
# A model store version as BentoML accepts them (this service's are 16 hex digits).
VERSION_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$"


class Activation(BaseModel):
    """``POST /admin/models/<name>/activate``."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN, description="A model store version")
    canary_percent: float | None = Field(
        None, gt=0, lt=100, description="Send this share of the requests to the version, "
        "as a canary; without it the version serves every request",
    )  # fmt: skip


class NoBody(BaseModel):
    """The calls that take no arguments: an empty JSON object, or no body."""

    model_config = ConfigDict(extra="forbid")


class CanaryStatus(BaseModel):
    version: str
    percent: float


class StoreVersion(BaseModel):
    version: str
    created: str
    stage: str | None = Field(description="release or smoke (training.register's label)")


class WorkerStatus(BaseModel):
    pid: int
    serving: str
    canary: str | None
    canary_percent: float | None
    error: str | None = Field(description="why the worker could not apply the last change")


class ModelStatus(BaseModel):
    """One model's versions, as ``GET /admin/models`` and every change answer them."""

    name: str
    endpoint: str
    serving: str = Field(description="The version that serves (the canary aside)")
    canary: CanaryStatus | None
    configured: str = Field(description="The version the pins or SERVING_<ENDPOINT>_TAG name")
    source: str = Field(description="rollout (the state directory decides) or configuration")
    previous: list[str] = Field(description="Versions served before, newest last (rollback)")
    changed_at: str | None
    changed_by: str | None = Field(description="The name of the API key that changed it")
    versions: list[StoreVersion] = Field(description="The model's versions in the store")
    workers: list[WorkerStatus] = Field(description="What each worker serves now")
    pending: str | None = Field(None, description="Workers yet to apply the change (202)")


class ModelsStatus(BaseModel):
    models: list[ModelStatus]


def default_state_dir() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get()) / "serving-state"


class StateStore:
    """The state directory: ``models.json`` and each worker's report."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.workers = directory / WORKERS_DIR
        try:
            self.workers.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # serve anyway; a change will say why it cannot be kept
            log.error("the state directory %s cannot be made (%s): model versions cannot be "
                      "changed while the service runs", directory, error)  # fmt: skip

    def read(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """(generation, model name → its entry); generation 0 and none without a file."""
        try:
            state = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return 0, {}
        return int(state["generation"]), dict(state["models"])

    def stamp(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns

    def update(self, change: Callable[[dict[str, dict[str, Any]]], None]) -> int:
        """Apply ``change`` to the models' entries under the lock; write the new state
        atomically, under the next generation, and return that generation."""
        try:
            with self._locked():
                generation, models = self.read()
                change(models)
                generation += 1
                _write_atomically(self.path, {"generation": generation, "models": models})
        except OSError as error:
            raise RequestError.single(
                "state_not_writable", f"the state directory cannot be written: {error}",
                status=503,
            ) from None  # fmt: skip
        return generation

    def report(self, pid: int, report: Mapping[str, Any]) -> None:
        try:
            _write_atomically(self.workers / f"{pid}.json", report)
        except OSError as error:
            log.error("cannot report this worker's models in %s: %s", self.workers, error)

    def reports(self) -> list[dict[str, Any]]:
        """The reports of the workers that are running; those of others are removed."""
        found = []
        for path in sorted(self.workers.glob("*.json")):
            if not path.stem.isdigit():
                continue
            if not process_exists(int(path.stem)):
                path.unlink(missing_ok=True)
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                found.append(orjson.loads(path.read_bytes()))
        return found

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / f"{STATE_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Wanted:
    """What a model's state asks a worker to serve."""

    version: str
    canary: str | None = None
    percent: float = 0.0


def wanted(entry: Mapping[str, Any] | None, configured: str) -> Wanted:
    """The versions to serve: the state's, if it was made over the configured version."""
    if not entry or entry.get("over") != configured:
        return Wanted(configured)
    canary = entry.get("canary")
    if canary is None:
        return Wanted(entry["version"])
    return Wanted(entry["version"], canary["version"], float(canary["percent"]))


def startup_models(
    store: StateStore, configured: Mapping[str, StoredModel], names: Mapping[str, str]
) -> dict[str, StoredModel]:
    """Model key → the store entry a starting worker serves: the state's version where
    it has one that is intact, else the configured one (``names``: key → model name)."""
    _, models = store.read()
    chosen = dict(configured)
    for key, model in configured.items():
        version = wanted(models.get(names[key]), version_of(model.tag)).version
        if version == version_of(model.tag):
            continue
        try:
            entry = bentoml.models.get(f"{names[key]}:{version}")
            load_stored_artifact(entry.path)
        except Exception as error:  # missing or damaged: serve the configured version
            log.error("model %s: the rolled-out version %s cannot be loaded (%s); serving "
                      "the configured %s", names[key], version, error, model.tag)  # fmt: skip
            continue
        chosen[key] = entry
    return chosen


class Rollouts:
    """One worker's side of the rollouts: it applies the state, and answers the management
    routes that reach it."""

    def __init__(
        self,
        app: ServingApp,
        store: StateStore,
        configured: Mapping[str, str],
        workers: int,
        key_name: Callable[[Headers], str | None] = lambda headers: None,
    ) -> None:
        """``configured``: model key → the version the settings and pins name."""
        self.app = app
        self.store = store
        self.configured = dict(configured)
        self.workers = workers
        self.key_name = key_name
        self.pid = os.getpid()
        self._lock = asyncio.Lock()
        self._stamp: tuple[int, int] | None = None
        self._generation = 0
        self._errors: dict[str, str] = {}
        self._preloaded: dict[tuple[str, str], Task] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load any canary the state names, report, and watch the state from now on."""
        async with self._lock:
            await self._apply_state()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    # The management routes' answers.

    async def status(self) -> Reply:
        _, models = self.store.read()
        reports = self.store.reports()
        statuses = [self._status(key, models, reports) for key in self.app.models]
        return Reply.json({"models": statuses})

    async def activate(self, name: str, activation: Activation, who: str | None) -> Reply:
        key = self._key(name)
        version, percent = activation.version, activation.canary_percent

        def change(entry: dict[str, Any]) -> None:
            if entry.get("canary"):
                raise _conflict(f"a canary of {name} {entry['canary']['version']} is running: "
                                "promote or abort it first")  # fmt: skip
            if percent is None:
                if version != entry["version"]:
                    entry["previous"].append(entry["version"])
                    entry["version"] = version
            elif version == entry["version"]:
                raise _conflict(f"{name} {version} is the serving version already")
            else:
                entry["canary"] = {"version": version, "percent": percent}

        return await self._change(key, change, who, load=version)

    async def promote(self, name: str, who: str | None) -> Reply:
        def change(entry: dict[str, Any]) -> None:
            canary = entry.get("canary")
            if not canary:
                raise _conflict(f"{name} has no canary to promote")
            entry["previous"].append(entry["version"])
            entry["version"], entry["canary"] = canary["version"], None

        return await self._change(self._key(name), change, who)

    async def abort(self, name: str, who: str | None) -> Reply:
        def change(entry: dict[str, Any]) -> None:
            if not entry.get("canary"):
                raise _conflict(f"{name} has no canary to abort")
            entry["canary"] = None

        return await self._change(self._key(name), change, who)

    async def rollback(self, name: str, who: str | None) -> Reply:
        key = self._key(name)
        _, models = self.store.read()
        entry = self._entry(key, models)
        if entry.get("canary"):
            raise _conflict(f"a canary of {name} is running: abort it first")
        if not entry["previous"]:
            raise _conflict(f"{name} has no previous version to roll back to")

        def change(entry: dict[str, Any]) -> None:
            if entry.get("canary") or not entry["previous"]:
                raise _conflict(f"{name} changed meanwhile; look again and retry")
            entry["version"] = entry["previous"].pop()

        return await self._change(key, change, who, load=entry["previous"][-1])

    async def reset(self, name: str, who: str | None) -> Reply:
        key = self._key(name)

        def change(entry: dict[str, Any]) -> None:
            entry.clear()  # dropped: the configured version serves

        return await self._change(key, change, who, load=self.configured[key])

    # Applying a change.

    async def _change(
        self,
        key: str,
        change: Callable[[dict[str, Any]], None],
        who: str | None,
        load: str | None = None,
    ) -> Reply:
        """Load and check ``load`` here first (a refusal changes nothing), then write the
        change, apply it here and wait for every worker to apply it."""
        name = model_spec(key).name
        async with self._lock:
            if load is not None and self.app.models[key].find(load) is None:
                try:
                    task = await asyncio.to_thread(self._load, key, load)
                except VersionRefused as error:
                    raise RequestError.single(
                        error.check, f"{name} {load} is refused: {error}", ("body", "version"),
                        status=404 if error.check == "store" else 422,
                    ) from None  # fmt: skip
                self._preloaded[(key, load)] = task
            try:
                generation = self.store.update(
                    lambda models: _change_entry(models, name, self.configured[key], change, who)
                )
            finally:
                await self._apply_state()
            reports = await self._wait_for_workers(generation)
        _, models = self.store.read()
        status = self._status(key, models, reports)
        if len(reports) < self.workers:
            status["pending"] = f"{self.workers - len(reports)} worker(s) have not applied it yet"
            return Reply.json(status, 202)
        return Reply.json(status)

    async def _apply_state(self) -> None:
        """Serve what the state asks for, loading what this worker lacks; report. Under
        ``_lock``."""
        generation, models = self.store.read()
        self._stamp = self.store.stamp()
        retired: dict[str, set[str]] = {}
        for key, slot in self.app.models.items():
            name = model_spec(key).name
            want = wanted(models.get(name), self.configured[key])
            try:
                serving = await self._task(key, want.version)
                canary = await self._task(key, want.canary) if want.canary else None
            except VersionRefused as error:
                self._errors[name] = str(error)
                log.error("model %s: keeps serving %s: %s", name, slot.serving.version, error)
                continue
            self._errors.pop(name, None)
            before = {slot.serving, slot.canary} - {None}
            slot.serving, slot.canary, slot.canary_percent = serving, canary, want.percent
            for task in before - {serving, canary}:
                log.info("model %s: %s out of service", name, task.version)
                retired.setdefault(key, set()).add(task.version)
                self._retire(task)
            if serving not in before or (canary is not None and canary not in before):
                split = f", canary {canary.version} at {want.percent:g} %" if canary else ""
                log.info("model %s: serving %s%s", name, serving.version, split)
        for task in self._preloaded.values():  # loaded for a change that was refused
            task.batcher.close()
        self._preloaded.clear()
        publish_versions(self.app.models, retired)
        self._generation = generation
        self.store.report(self.pid, self._report())

    async def _task(self, key: str, version: str) -> Task:
        task = self.app.models[key].find(version) or self._preloaded.pop((key, version), None)
        if task is None:
            task = await asyncio.to_thread(self._load, key, version)
        return task

    def _load(self, key: str, version: str) -> Task:
        name = model_spec(key).name
        try:
            entry = bentoml.models.get(f"{name}:{version}")
        except (bentoml.exceptions.BentoMLException, ValueError):  # none, or no valid tag
            raise VersionRefused("store", f"the model store has no {name}:{version}") from None
        started = time.perf_counter()
        task = self.app.load_version(key, entry, check=True)
        log.info("model %s: %s loaded and checked in %.2f s", name, version,
                 time.perf_counter() - started)  # fmt: skip
        return task

    def _retire(self, task: Task) -> None:
        """Stop the version's batcher once the requests it admitted are answered."""

        async def when_idle() -> None:
            while task.requests_in_progress:
                await asyncio.sleep(RETIRE_POLL_S)
            task.batcher.close()

        retiring = asyncio.get_running_loop().create_task(when_idle())
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if self.store.stamp() == self._stamp:
                continue
            try:
                async with self._lock:
                    await self._apply_state()
            except Exception:  # keep watching: the next change may apply
                log.exception("applying the model state failed")

    async def _wait_for_workers(self, generation: int) -> list[dict[str, Any]]:
        """The reports of the workers that have applied ``generation``, once all have or
        after ``SWITCH_WAIT_S``."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while True:
            done = [r for r in self.store.reports() if r["generation"] >= generation]
            if len(done) >= self.workers or time.monotonic() >= deadline:
                return done
            await asyncio.sleep(RETIRE_POLL_S)

    # What the state says.

    def _report(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self._generation,
            "models": {
                slot.serving.spec.name: {
                    "serving": slot.serving.version,
                    "canary": slot.canary.version if slot.canary else None,
                    "canary_percent": slot.canary_percent if slot.canary else None,
                }
                for slot in self.app.models.values()
            },
            "errors": self._errors,
        }

    def _status(
        self, key: str, models: Mapping[str, Any], reports: list[dict[str, Any]]
    ) -> dict[str, Any]:
        spec = model_spec(key)
        configured = self.configured[key]
        entry = models.get(spec.name) or {}
        want = wanted(entry, configured)
        applies = bool(entry) and entry.get("over") == configured
        return {
            "name": spec.name,
            "endpoint": spec.endpoint,
            "serving": want.version,
            "canary": {"version": want.canary, "percent": want.percent} if want.canary else None,
            "configured": configured,
            "source": "rollout" if applies else "configuration",
            "previous": entry.get("previous", []) if applies else [],
            "changed_at": entry.get("changed_at") if applies else None,
            "changed_by": entry.get("changed_by") if applies else None,
            "versions": _store_versions(spec),
            "workers": [
                {
                    "pid": report["pid"],
                    **report["models"].get(spec.name, {}),
                    "error": report.get("errors", {}).get(spec.name),
                }
                for report in reports
            ],
        }

    def _key(self, name: str) -> str:
        for key, slot in self.app.models.items():
            if slot.serving.spec.name == name:
                return key
        raise RequestError.single("not_found", f"no model {name}", ("path",), status=404)

    def _entry(self, key: str, models: Mapping[str, Any]) -> dict[str, Any]:
        return _current_entry(models, model_spec(key).name, self.configured[key])


def _current_entry(models: Mapping[str, Any], name: str, configured: str) -> dict[str, Any]:
    """The model's entry as a change starts from it: a fresh one where the state has none
    that applies to the configured version."""
    entry = models.get(name)
    if entry and entry.get("over") == configured:
        return {**entry, "previous": list(entry["previous"])}
    return {"version": configured, "over": configured, "previous": [], "canary": None}


def _change_entry(
    models: dict[str, Any],
    name: str,
    configured: str,
    change: Callable[[dict[str, Any]], None],
    who: str | None,
) -> None:
    entry = _current_entry(models, name, configured)
    change(entry)
    if not entry:
        models.pop(name, None)
        return
    entry["changed_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    entry["changed_by"] = who
    models[name] = entry


def _store_versions(spec: ModelSpec) -> list[dict[str, Any]]:
    """The versions of the model in the store, newest first."""
    entries = sorted(bentoml.models.list(spec.bento_model_name),
                     key=lambda m: m.info.creation_time, reverse=True)  # fmt: skip
    return [
        {
            "version": entry.tag.version,
            "created": entry.info.creation_time.isoformat(timespec="seconds"),
            "stage": entry.info.labels.get("stage"),
        }
        for entry in entries
    ]


def _conflict(message: str) -> RequestError:
    return RequestError.single("conflict", message, ("path",), status=409)


def _write_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2))
    os.replace(temporary, path)


# The management routes, as route table entries.


def admin_routes(specs: list[ModelSpec]) -> list[Route]:
    routes = [
        Route(ADMIN_PREFIX, "admin_models", None, "The served models and their versions",
              "For each model: the versions in the model store, which serves, any canary and "
              "its share, the configured version, who changed it and when, and what each "
              "worker serves.", answer=_answer_status, method="GET", protocol="admin",
              scope="admin", queued=False, response=ModelsStatus),
    ]  # fmt: skip
    for spec in specs:
        base = f"{ADMIN_PREFIX}/{spec.name}"
        stem = f"admin_{spec.endpoint}"
        routes += [
            _admin_post(f"{base}/activate", f"{stem}_activate", spec.name, Activation,
                        f"Serve a version of {spec.name}, or start a canary",
                        "Loads the version next to the serving one, checks it (checksums, the "
                        "example input's recorded output, a warm-up) and swaps it in, in every "
                        "worker; with `canary_percent` it gets that share of the requests."),
            _admin_post(f"{base}/promote", f"{stem}_promote", spec.name, NoBody,
                        f"Make the canary of {spec.name} serve every request", ""),
            _admin_post(f"{base}/abort", f"{stem}_abort", spec.name, NoBody,
                        f"Stop the canary of {spec.name}", "The serving version stays."),
            _admin_post(f"{base}/rollback", f"{stem}_rollback", spec.name, NoBody,
                        f"Serve the version of {spec.name} served before", ""),
            _admin_post(f"{base}/reset", f"{stem}_reset", spec.name, NoBody,
                        f"Serve the configured version of {spec.name} again",
                        "The rollout state of the model is dropped; the pins (or "
                        "SERVING_<ENDPOINT>_TAG) decide."),
        ]  # fmt: skip
    return routes


def _admin_post(
    path: str, name: str, model: str, body: type[BaseModel], summary: str, description: str
) -> Route:
    operation = path.rsplit("/", 1)[1]

    def read(data: bytes, headers: Headers) -> tuple[BaseModel, Headers]:
        return parse_json(body, data), headers

    async def answer(app: Any, request: tuple[BaseModel, Headers]) -> Reply:
        arguments, headers = request
        rollouts: Rollouts = app.rollouts
        who = rollouts.key_name(headers)
        if operation == "activate":
            return await rollouts.activate(model, arguments, who)
        return await getattr(rollouts, operation)(model, who)

    # ``json_body`` documents the body; ``reads_body`` reads it, keeping the headers (the
    # key's name is recorded with the change).
    return Route(path, name, None, summary, description, answer=answer, protocol="admin",
                 scope="admin", queued=False, reads_body=read, media=(JSON,), json_body=body,
                 response=ModelStatus)  # fmt: skip


async def _answer_status(app: Any, _: None) -> Reply:
    return await app.rollouts.status()
