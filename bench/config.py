"""Named comparison sets: which service configurations to benchmark, with which
load, and which targets they must meet. Each set is a TOML file in
``bench/configs/``; see ``bench/configs/cpu.toml`` for the format.

Service configuration is given only as environment variables, with exactly
the names ``service/settings.py`` reads; the benchmark adds none of its own.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.payloads import check_workload_name
from bench.server import SERVER_KINDS

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ServiceConfig:
    """One way of running the service: a name and the environment it runs with."""

    name: str
    env: dict[str, str]
    description: str = ""
    # Workloads this configuration skips (e.g. a GPU-only comparison of one endpoint).
    skip: tuple[str, ...] = ()
    # What serves: the project's service, or a peer (bench/peers/, bench/ceiling.py).
    server: str = "service"
    # Serve the project as it was at this git revision (a before/after comparison).
    revision: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Two configurations to put side by side in the report."""

    title: str
    baseline: str
    variant: str


@dataclass(frozen=True)
class Target:
    """A requirement on one point of the benchmark."""

    config: str
    workload: str
    concurrency: int
    min_requests_per_s: float | None = None
    max_p99_ms: float | None = None
    max_p50_ms: float | None = None
    max_errors: int | None = 0
    # Server CPU per request minus model time (needs the service's serving_model_seconds).
    max_outside_model_ms: float | None = None
    # Against another configuration's same point: at least this throughput ratio,
    # and (lower_p99) a lower p99.
    relative_to: str | None = None
    min_ratio: float | None = None
    lower_p99: bool = False
    # At most this multiple of the other configuration's p99.
    max_p99_ratio: float | None = None


@dataclass(frozen=True)
class WorkloadPlan:
    """A workload and the concurrencies it is driven at."""

    name: str
    concurrency: tuple[int, ...]


@dataclass(frozen=True)
class ComparisonSet:
    name: str
    description: str
    service: str
    duration_s: float
    warmup_s: float
    workloads: tuple[WorkloadPlan, ...]
    configs: tuple[ServiceConfig, ...]
    comparisons: tuple[Comparison, ...] = ()
    targets: tuple[Target, ...] = ()
    client_processes: int | None = None

    def config(self, name: str) -> ServiceConfig:
        for config in self.configs:
            if config.name == name:
                return config
        raise KeyError(f"no configuration {name!r} in set {self.name!r}")


def _as_env(values: dict) -> dict[str, str]:
    """TOML booleans and numbers → the strings an environment holds."""
    return {
        key: (str(value).lower() if isinstance(value, bool) else str(value))
        for key, value in values.items()
    }


def load_comparison_set(name_or_path: str | Path) -> ComparisonSet:
    """Load ``bench/configs/<name>.toml`` (or a TOML file at a path)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.toml"
    data = tomllib.loads(path.read_text())
    base_env = _as_env(data.get("env", {}))
    default_concurrency = tuple(data.get("concurrency", (1, 16, 64, 256)))
    workloads = []
    for entry in data["workloads"]:
        if isinstance(entry, str):
            entry = {"name": entry}
        concurrency = tuple(entry.get("concurrency", default_concurrency))
        workloads.append(WorkloadPlan(check_workload_name(entry["name"]), concurrency))
    configs = tuple(
        ServiceConfig(
            name=entry["name"],
            env={**base_env, **_as_env(entry.get("env", {}))},
            description=entry.get("description", ""),
            skip=tuple(entry.get("skip", ())),
            server=entry.get("server", "service"),
            revision=entry.get("revision"),
        )
        for entry in data["configs"]
    )
    for config in configs:
        if config.server not in SERVER_KINDS:
            raise ValueError(f"{path}: {config.name}: server must be one of {SERVER_KINDS}")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: configuration names repeat: {names}")
    comparisons = tuple(Comparison(**entry) for entry in data.get("comparisons", ()))
    targets = tuple(Target(**entry) for entry in data.get("targets", ()))
    for reference in [
        *(c.baseline for c in comparisons),
        *(c.variant for c in comparisons),
        *(t.config for t in targets),
        *(t.relative_to for t in targets if t.relative_to),
    ]:
        if reference not in names:
            raise ValueError(f"{path}: {reference!r} is not one of the configurations {names}")
    return ComparisonSet(
        name=data.get("name", path.stem),
        description=data.get("description", ""),
        service=data.get("service", "service.service:ServingService"),
        duration_s=float(data.get("duration_s", 8.0)),
        warmup_s=float(data.get("warmup_s", 2.0)),
        workloads=tuple(workloads),
        configs=configs,
        comparisons=comparisons,
        targets=targets,
        client_processes=data.get("client_processes"),
    )
