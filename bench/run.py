"""Benchmark the service: for each configuration of a comparison set, start the
service, drive every workload at every concurrency with the closed-loop load
generator, read the server's batch sizes and CPU use, stop it; then write
``report.json``, ``report.md`` and ``latency_vs_throughput.png``.

    python -m bench.run --set cpu                    # the CPU comparisons (make bench)
    python -m bench.run --set gpu                    # GPU comparisons, targets (make bench-gpu)
    python -m bench.run --set cpu --only torch-batched --workload classify \
        --concurrency 1 16 --duration 3              # a quick look
    python -m bench.run --url http://host:3000 --workload sentiment   # a running service
    python -m bench.run --set cpu --profile classify:64   # also py-spy one worker at that point
    python -m bench.run --set peers --against 5a13d65     # and each service config at 5a13d65

Results go to ``bench-results/<set>/`` (``--output-dir`` to change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import profiling
from bench.config import (
    Comparison,
    ComparisonSet,
    ServiceConfig,
    WorkloadPlan,
    load_comparison_set,
)
from bench.loadgen import PointResult, default_client_processes, run_closed_loop
from bench.payloads import Workload, build_workloads, default_data_dir
from bench.report import compare, evaluate_targets, machine_info, write_report
from bench.server import (
    REPO_ROOT,
    BatchStats,
    ServiceProcess,
    batch_stats,
    http_get,
    model_seconds,
)

log = logging.getLogger("bench")

# Between two points the server must finish the work the last one left queued
# (clients stop at the end of a window, the server's queue does not): wait until
# its batch counters stand still this long, but no longer than DRAIN_TIMEOUT_S.
QUIET_S = 1.0
DRAIN_TIMEOUT_S = 120.0


class ServerProbe:
    """Reads the server's CPU time and batch-size histograms at the window's edges."""

    def __init__(self, url: str, server: ServiceProcess | None) -> None:
        self.url = url
        self.server = server
        self.readings: dict[str, tuple[float, float | None, str | None]] = {}

    def metrics(self) -> str | None:
        try:
            status, text = http_get(f"{self.url}/metrics", timeout=10.0)
        except OSError:
            return None
        return text if status == 200 else None

    def batch_stats(self) -> BatchStats | None:
        text = self.metrics()
        return batch_stats(text) if text is not None else None

    def __call__(self, edge: str) -> None:
        cpu = self.server.cpu_seconds() if self.server else None
        self.readings[edge] = (time.monotonic(), cpu, self.metrics())

    def summary(self) -> dict:
        if set(self.readings) != {"start", "end"}:
            return {}
        (t0, cpu0, metrics0), (t1, cpu1, metrics1) = self.readings["start"], self.readings["end"]
        result: dict = {}
        if cpu0 is not None and cpu1 is not None:
            result["cpu_core_percent"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
            result["cpu_s"] = round(cpu1 - cpu0, 4)
        if metrics0 is not None and metrics1 is not None:
            result["mean_batch_size"] = batch_stats(metrics1).mean_since(batch_stats(metrics0))
            model0, model1 = model_seconds(metrics0), model_seconds(metrics1)
            if model0 is not None and model1 is not None:
                result["model_s"] = round(model1 - model0, 4)
        return result


def wait_until_idle(url: str) -> float:
    """Wait until the server forms no more batches; return the seconds waited."""
    started = time.monotonic()
    probe = ServerProbe(url, None)
    last = probe.batch_stats()
    if last is None:  # no /metrics to watch: a fixed pause is all that can be done
        time.sleep(QUIET_S)
        return QUIET_S
    quiet_since = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        time.sleep(0.25)
        now = probe.batch_stats()
        if now is None or now.counts != last.counts:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            break
        last = now
    else:
        log.warning("the server was still busy %.0f s after the last point", DRAIN_TIMEOUT_S)
    return time.monotonic() - started


def run_point(
    url: str,
    server: ServiceProcess | None,
    workload: Workload,
    concurrency: int,
    args: argparse.Namespace,
    profile_dir: Path | None,
) -> PointResult:
    probe = ServerProbe(url, server)
    spy = None

    def on_window(edge: str) -> None:
        nonlocal spy
        probe(edge)
        if edge == "start" and profile_dir is not None and server is not None:
            pid = server.worker_pids()[0]
            stacks = profile_dir / f"{workload.name}-c{concurrency}.stacks.txt"
            spy = profiling.record(pid, args.duration, stacks)
            log.info("profiling worker %d into %s", pid, stacks)

    result = run_closed_loop(
        url,
        workload,
        concurrency,
        args.duration,
        warmup_s=args.warmup,
        processes=args.client_processes,
        on_window=on_window,
    )
    result.server = probe.summary()
    if spy is not None:
        _, errors = spy.communicate(timeout=args.duration + 30)
        if spy.returncode != 0:
            log.warning("py-spy failed: %s", errors.strip())
    log.info(
        "%-14s c=%-4d %9.1f req/s  p50 %7.1f ms  p99 %7.1f ms  errors %d  batch %s  "
        "client CPU %.0f%%",
        workload.name,
        concurrency,
        result.requests_per_s,
        result.latency_ms.get("p50", float("nan")),
        result.latency_ms.get("p99", float("nan")),
        result.errors,
        result.server.get("mean_batch_size"),
        result.client_cpu_core_percent,
    )
    return result


def run_config(
    config: ServiceConfig,
    plans: list[WorkloadPlan],
    workloads: dict[str, Workload],
    args: argparse.Namespace,
    output_dir: Path,
    service: str,
) -> dict:
    entry: dict = {
        "name": config.name,
        "description": config.description,
        "env": config.env,
        "server": config.server,
        "revision": config.revision,
        "points": [],
        "error": None,
    }
    started = time.monotonic()
    server = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            server = ServiceProcess(
                config.env,
                output_dir / f"{config.name}.server.log",
                service=service,
                kind=config.server,
                revision=config.revision,
            )
            server.start()
            url = server.url
            entry["startup_s"] = round(time.monotonic() - started, 1)
        for plan in plans:
            if plan.name in config.skip:
                continue
            for concurrency in plan.concurrency:
                profile_dir = None
                if f"{plan.name}:{concurrency}" in (args.profile or []):
                    profile_dir = output_dir / "profiles" / config.name
                    profile_dir.mkdir(parents=True, exist_ok=True)
                point = run_point(url, server, workloads[plan.name], concurrency, args, profile_dir)
                entry["points"].append(point.to_dict())
                waited = wait_until_idle(url)
                if waited > 2 * QUIET_S:
                    log.info("the server drained its queue in %.1f s", waited)
    except Exception as error:  # a broken configuration must not lose the others' results
        log.exception("configuration %s failed", config.name)
        entry["error"] = f"{type(error).__name__}: {error}"
    finally:
        if server is not None:
            server.stop()
    return entry


def select(comparison_set: ComparisonSet, args: argparse.Namespace) -> ComparisonSet:
    """Apply the command-line narrowing (--only, --workload, --concurrency, timings)."""
    configs = comparison_set.configs
    if args.url:
        configs = (ServiceConfig("external", {}, f"the service at {args.url}"),)
    elif args.only:
        configs = tuple(comparison_set.config(name) for name in args.only)
    plans = comparison_set.workloads
    if args.workload:
        known = {plan.name: plan for plan in plans}
        plans = tuple(
            known.get(name, WorkloadPlan(name, (1, 16, 64, 256))) for name in args.workload
        )
    if args.concurrency:
        plans = tuple(replace(plan, concurrency=tuple(args.concurrency)) for plan in plans)
    selected = replace(comparison_set, configs=configs, workloads=plans)
    return against_revision(selected, args.against) if args.against else selected


def against_revision(comparison_set: ComparisonSet, revision: str) -> ComparisonSet:
    """Add, for every configuration of the service as it is, the same configuration at
    ``revision`` (named ``<name>@<revision>``) and a comparison of the two: a before and
    after measured in one run, on the same machine state."""
    current = [c for c in comparison_set.configs if c.server == "service" and not c.revision]
    earlier = [
        replace(c, name=f"{c.name}@{revision}", revision=revision,
                description=f"{c.name} at {revision}")
        for c in current
    ]  # fmt: skip
    comparisons = [
        Comparison(f"{c.name} against itself at {revision}", f"{c.name}@{revision}", c.name)
        for c in current
    ]
    return replace(
        comparison_set,
        configs=(*comparison_set.configs, *earlier),
        comparisons=(*comparison_set.comparisons, *comparisons),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--set", default="cpu", help="comparison set: a name in bench/configs/ or a TOML path"
    )
    parser.add_argument("--only", nargs="+", help="run only these configurations of the set")
    parser.add_argument("--workload", nargs="+", help="override the set's workloads")
    parser.add_argument("--concurrency", nargs="+", type=int, help="override the concurrencies")
    parser.add_argument("--duration", type=float, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, help="uncounted seconds before each point")
    parser.add_argument("--client-processes", type=int, help="load-generator processes")
    parser.add_argument("--url", help="benchmark an already running service instead")
    parser.add_argument(
        "--against",
        metavar="REVISION",
        help="also run each configuration of the service at this git revision, same run",
    )
    parser.add_argument(
        "--profile",
        nargs="+",
        metavar="WORKLOAD:CLIENTS",
        help="record one server worker with py-spy during these points",
    )
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--output-dir", type=Path, help="default: bench-results/<set>")
    parser.add_argument("--name", help="report name (default: the set's name)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    comparison_set = select(load_comparison_set(args.set), args)
    name = args.name or (f"{comparison_set.name}-external" if args.url else comparison_set.name)
    output_dir = args.output_dir or REPO_ROOT / "bench-results" / name
    output_dir.mkdir(parents=True, exist_ok=True)
    args.duration = args.duration or comparison_set.duration_s
    args.warmup = args.warmup if args.warmup is not None else comparison_set.warmup_s
    args.client_processes = (
        args.client_processes or comparison_set.client_processes or default_client_processes()
    )
    plans = list(comparison_set.workloads)
    workloads = build_workloads(args.data_dir, [plan.name for plan in plans])

    report = {
        "name": name,
        "description": comparison_set.description,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine_info(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "client_processes": args.client_processes,
            "workloads": {p.name: list(p.concurrency) for p in plans},
        },
        "configs": [],
    }
    for config in comparison_set.configs:
        log.info("configuration %s: %s", config.name, json.dumps(config.env))
        report["configs"].append(
            run_config(config, plans, workloads, args, output_dir, comparison_set.service)
        )
        # Rewrite after every configuration, so an interrupted run keeps what it measured.
        report["comparisons"] = compare(report, comparison_set.comparisons)
        report["targets"] = evaluate_targets(report, comparison_set.targets)
        write_report(report, output_dir)
    if args.profile:
        summaries = [
            profiling.markdown(
                profiling.summarise_collapsed(path.read_text()),
                f"{path.parent.name} {path.name.removesuffix('.stacks.txt')}",
            )
            for path in sorted((output_dir / "profiles").glob("*/*.stacks.txt"))
        ]
        (output_dir / "profiles.md").write_text("# Server profiles\n\n" + "\n".join(summaries))
    log.info("report written to %s", output_dir / "report.md")
    failed = [entry["name"] for entry in report["configs"] if entry["error"]]
    missed = [t for t in report["targets"] if t["met"] is False]
    return 1 if failed or missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
