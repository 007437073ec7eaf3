"""A soak: hold the service under steady load for a long time and watch its memory.

For each phase (by default the mixed workload, then each endpoint alone), a
fresh ``bentoml serve`` is started, its idle memory read, and a closed-loop
load of ``--concurrency`` clients sent for ``--minutes``. Every
``--interval`` seconds the soak records the resident memory (RSS) of the
worker and of the parent (BentoML's supervisor) and the requests the server
has answered so far, by status, from its ``/metrics``. The report gives, per
phase, the RSS after the warm-up and at the end, the growth between them, the
growth per request, and whether it is within the target; the plot shows RSS
against requests served.

    python -m bench.soak                               # make bench-soak: 4 × 30 min
    python -m bench.soak --phase classify --minutes 5  # a quick look at one endpoint
    python -m bench.soak --phase mixed --env MALLOC_ARENA_MAX=2   # an allocator experiment
    python -m bench.soak --phase classify --heap-snapshots 60     # and tracemalloc snapshots

Results go to ``bench-results/soak/`` (``--output-dir`` to change):
``soak.json``, ``soak.md`` and ``rss_vs_requests.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import default_client_processes, run_closed_loop
from bench.payloads import build_workloads, default_data_dir
from bench.report import machine_info
from bench.server import REPO_ROOT, ServiceProcess, http_get

log = logging.getLogger("bench.soak")

PHASES = ("mixed", "classify", "sentiment", "generate-4")
# The target of a soak: after the warm-up, the worker grows by at most this much.
MAX_GROWTH_MIB = 8.0
MIB = 1024 * 1024


@dataclass
class Sample:
    """One reading, ``elapsed_s`` after the load started."""

    elapsed_s: float
    worker_rss_mib: float
    parent_rss_mib: float
    requests: int  # answered so far, every status
    errors: int  # answered with a status other than 2xx


@dataclass
class PhaseResult:
    workload: str
    concurrency: int
    minutes: float
    warmup_minutes: float
    idle_worker_rss_mib: float
    samples: list[Sample] = field(default_factory=list)
    load: dict = field(default_factory=dict)  # the load generator's summary
    heap_snapshots: str | None = None
    label: str = ""  # the plot's legend; the workload when empty

    def at(self, elapsed_s: float) -> Sample:
        """The first sample at or after ``elapsed_s`` (the last one if none is)."""
        return next((s for s in self.samples if s.elapsed_s >= elapsed_s), self.samples[-1])

    def summary(self) -> dict:
        start = self.at(self.warmup_minutes * 60)
        end = self.samples[-1]
        growth = end.worker_rss_mib - start.worker_rss_mib
        requests = end.requests - start.requests
        return {
            "workload": self.workload,
            "idle_worker_rss_mib": round(self.idle_worker_rss_mib, 1),
            "after_warmup_worker_rss_mib": round(start.worker_rss_mib, 1),
            "end_worker_rss_mib": round(end.worker_rss_mib, 1),
            "peak_worker_rss_mib": round(max(s.worker_rss_mib for s in self.samples), 1),
            "worker_growth_mib": round(growth, 2),
            "parent_growth_mib": round(end.parent_rss_mib - start.parent_rss_mib, 2),
            "requests_after_warmup": requests,
            "bytes_per_request": round(growth * MIB / requests, 2) if requests else None,
            "requests_per_s": round(requests / max(end.elapsed_s - start.elapsed_s, 1e-9), 1),
            "errors": end.errors,
            "meets_target": growth <= MAX_GROWTH_MIB and end.errors == 0,
        }


def answered(metrics_text: str) -> tuple[int, int]:
    """(requests answered, of which not 2xx) on the API routes, from BentoML's counter."""
    total = errors = 0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "bentoml_service_request":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            total += int(sample.value)
            if not sample.labels.get("http_response_code", "").startswith("2"):
                errors += int(sample.value)
    return total, errors


def rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.NoSuchProcess:
        return float("nan")


class Sampler:
    """Reads one server's memory and request counters."""

    def __init__(self, server: ServiceProcess) -> None:
        self.server = server
        [self.worker] = server.worker_pids()  # one worker: that is what is measured
        self.parent = server.processes()[0].pid

    def read(self, elapsed_s: float) -> Sample:
        status, text = http_get(f"{self.server.url}/metrics", timeout=30.0)
        requests, errors = answered(text) if status == 200 else (-1, -1)
        return Sample(
            round(elapsed_s, 1),
            round(rss_mib(self.worker), 2),
            round(rss_mib(self.parent), 2),
            requests,
            errors,
        )


def run_phase(workload_name: str, args: argparse.Namespace, output_dir: Path) -> PhaseResult:
    workload = build_workloads(args.data_dir, [workload_name])[workload_name]
    env = dict(args.env)
    snapshots = None
    if args.heap_snapshots:
        snapshots = output_dir / f"{workload_name}.heap"
        env["SERVING_HEAP_SNAPSHOT_DIR"] = str(snapshots)
        env["SERVING_HEAP_SNAPSHOT_INTERVAL_S"] = str(args.heap_snapshots)
    log_path = output_dir / f"{workload_name}.server.log"
    with ServiceProcess(env, log_path, revision=args.revision) as server:
        sampler = Sampler(server)
        time.sleep(2.0)  # let the worker settle after its start-up
        result = PhaseResult(
            workload_name,
            args.concurrency,
            args.minutes,
            args.warmup_minutes,
            idle_worker_rss_mib=sampler.read(0.0).worker_rss_mib,
            heap_snapshots=str(snapshots) if snapshots else None,
        )
        duration_s = args.minutes * 60
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(
                run_closed_loop,
                server.url,
                workload,
                args.concurrency,
                duration_s,
                warmup_s=0.0,
                processes=args.client_processes,
            )
            started = time.monotonic()
            while not load.done():
                elapsed = time.monotonic() - started
                if elapsed <= duration_s + 1:
                    sample = sampler.read(elapsed)
                    result.samples.append(sample)
                    log.info(
                        "%-10s %6.0f s  worker %7.1f MiB  parent %6.1f MiB  %9d requests  "
                        "%d errors",
                        workload_name, sample.elapsed_s, sample.worker_rss_mib,
                        sample.parent_rss_mib, sample.requests, sample.errors,
                    )  # fmt: skip
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    load.result(timeout=args.interval)
            result.load = load.result().to_dict()
        result.samples.append(sampler.read(time.monotonic() - started))
    return result


def plot(results: list[PhaseResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    for result in results:
        requests = [s.requests / 1e6 for s in result.samples]
        line = axis.plot(requests, [s.worker_rss_mib for s in result.samples],
                         label=result.label or result.workload)[0]  # fmt: skip
        warm = result.at(result.warmup_minutes * 60)
        axis.plot([warm.requests / 1e6], [warm.worker_rss_mib], "o", color=line.get_color())
    axis.set_xlabel("requests served (millions)")
    axis.set_ylabel("worker RSS (MiB)")
    axis.set_title("Worker memory under steady load (dot: end of the warm-up)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_phases(report: Path) -> list[PhaseResult]:
    """The phases of a ``soak.json``, labelled with the revision that served them."""
    data = json.loads(report.read_text())
    phases = []
    for phase in data["phases"]:
        fields = {k: v for k, v in phase.items() if k not in ("summary", "samples")}
        result = PhaseResult(**fields, samples=[Sample(**s) for s in phase["samples"]])
        result.label = f"{result.workload} at {data['revision']}"
        phases.append(result)
    return phases


def write_markdown(results: list[PhaseResult], meta: dict, path: Path) -> None:
    lines = [
        f"# Soak, {meta['date']}",
        "",
        f"`{meta['command']}` at `{meta['revision']}`; {meta['machine']}.",
        f"{meta['concurrency']} closed-loop clients per phase, {meta['minutes']:g} min each; "
        f"growth is counted from the end of a {meta['warmup_minutes']:g}-min warm-up; "
        f"target: at most {MAX_GROWTH_MIB:g} MiB and 0 errors.",
        "",
        "| phase | idle | after warm-up | end | peak | growth | per request | parent growth "
        "| requests/s | errors | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        s = result.summary()
        per_request = "–" if s["bytes_per_request"] is None else f"{s['bytes_per_request']:.1f} B"
        lines.append(
            f"| {s['workload']} | {s['idle_worker_rss_mib']} MiB "
            f"| {s['after_warmup_worker_rss_mib']} MiB | {s['end_worker_rss_mib']} MiB "
            f"| {s['peak_worker_rss_mib']} MiB | {s['worker_growth_mib']:+.1f} MiB "
            f"| {per_request} | {s['parent_growth_mib']:+.1f} MiB | {s['requests_per_s']} "
            f"| {s['errors']} | {'met' if s['meets_target'] else 'MISSED'} |"
        )
    lines += ["", "![worker RSS against requests served](rss_vs_requests.png)", ""]
    path.write_text("\n".join(lines))


def machine_summary() -> str:
    info = machine_info()
    return (
        f"{info['cpu']}, {info['cpu_count']} cores, {info['memory_gb']} GB, no GPU"
        if not info["gpu"]
        else f"{info['cpu']}, {info['cpu_count']} cores, {info['gpu']}"
    )


def git_revision() -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def parse_env(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, setting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", action="append", choices=PHASES,
                        help="workload of one phase (repeatable; default: all four)")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=30.0, help="load per phase")
    parser.add_argument("--warmup-minutes", type=float, default=2.0,
                        help="growth is counted from this point of each phase")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--env", type=parse_env, action="append", default=[],
                        help="NAME=VALUE for the server's environment (repeatable)")  # fmt: skip
    parser.add_argument("--revision", help="serve the project as it was at this git revision")
    parser.add_argument("--heap-snapshots", type=float, metavar="SECONDS",
                        help="tracemalloc snapshots in the worker at this interval")  # fmt: skip
    parser.add_argument("--client-processes", type=int, default=default_client_processes())
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench-results" / "soak")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="SOAK_JSON",
                        help="only draw these reports' phases in one plot, e.g. before "
                        "and after a change")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    output_dir = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot([p for report in args.replot for p in load_phases(report)],
             output_dir / "rss_vs_requests.png")  # fmt: skip
        return 0
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.soak " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "revision": args.revision or git_revision(),
        "machine": machine_summary(),
        "concurrency": args.concurrency,
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "env": dict(args.env),
    }
    results = []
    for phase in args.phase or PHASES:
        results.append(run_phase(phase, args, output_dir))
        report = {
            **meta,
            "phases": [{**asdict(r), "summary": r.summary()} for r in results],
        }
        (output_dir / "soak.json").write_text(json.dumps(report, indent=2))
        plot(results, output_dir / "rss_vs_requests.png")
        write_markdown(results, meta, output_dir / "soak.md")
        log.info("%s", json.dumps(results[-1].summary()))
    return 0 if all(r.summary()["meets_target"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
