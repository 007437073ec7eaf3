"""Benchmark reports: ``report.json`` (everything measured), ``report.md`` (the
tables) and ``latency_vs_throughput.png`` (p50/p99 latency against requests/s,
one line per configuration, one panel per workload).

    python -m bench.report bench-results/cpu/report.json   # redraw the Markdown and plot
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.config import Comparison, Target

REPO_ROOT = Path(__file__).resolve().parents[1]
PLOT_NAME = "latency_vs_throughput.png"


def _command_output(command: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, GPU, software versions."""
    import psutil

    cpu_model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    gpu = _command_output(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    )
    versions = {}
    for package in ("torch", "onnxruntime", "bentoml", "aiohttp"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return {
        "cpu": cpu_model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _command_output(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]
        ),
    }


def points(report: dict, config: str | None = None, workload: str | None = None) -> list[dict]:
    return [
        point
        for entry in report["configs"]
        if config is None or entry["name"] == config
        for point in entry["points"]
        if workload is None or point["workload"] == workload
    ]


def find_point(report: dict, config: str, workload: str, concurrency: int) -> dict | None:
    for point in points(report, config, workload):
        if point["concurrency"] == concurrency:
            return point
    return None


def evaluate_targets(report: dict, targets: Iterable[Target]) -> list[dict]:
    """Each target with the measured values and whether it was met (None: not measured)."""
    results = []
    for target in targets:
        point = find_point(report, target.config, target.workload, target.concurrency)
        row = {**target.__dict__, "measured": None, "met": None}
        other = (
            find_point(report, target.relative_to, target.workload, target.concurrency)
            if target.relative_to
            else None
        )
        if point is not None and (other is not None or not target.relative_to):
            p99 = point["latency_ms"].get("p99")
            outside = _server_cpu_outside_model(point)
            checks = []
            if target.min_requests_per_s is not None:
                checks.append(point["requests_per_s"] >= target.min_requests_per_s)
            if target.max_p99_ms is not None:
                checks.append(p99 is not None and p99 <= target.max_p99_ms)
            if target.max_p50_ms is not None:
                p50 = point["latency_ms"].get("p50")
                checks.append(p50 is not None and p50 <= target.max_p50_ms)
            if target.max_errors is not None:
                checks.append(point["errors"] <= target.max_errors)
            if target.max_outside_model_ms is not None:
                checks.append(outside is not None and outside <= target.max_outside_model_ms)
            ratio = None
            if other is not None:
                ratio = point["requests_per_s"] / max(other["requests_per_s"], 1e-9)
                other_p99 = other["latency_ms"].get("p99")
                if target.min_ratio is not None:
                    checks.append(ratio >= target.min_ratio)
                if target.lower_p99:
                    checks.append(p99 is not None and other_p99 is not None and p99 < other_p99)
                if target.max_p99_ratio is not None:
                    checks.append(
                        p99 is not None
                        and other_p99 is not None
                        and p99 <= target.max_p99_ratio * other_p99
                    )
            row["measured"] = {
                "requests_per_s": point["requests_per_s"],
                "p50_ms": point["latency_ms"].get("p50"),
                "p99_ms": p99,
                "errors": point["errors"],
                "outside_model_ms": outside,
                "ratio": ratio,
            }
            row["met"] = all(checks)
        results.append(row)
    return results


def compare(report: dict, comparisons: Iterable[Comparison]) -> list[dict]:
    """Variant/baseline ratios of throughput and p99 for every point both measured."""
    results = []
    for comparison in comparisons:
        rows = []
        for base in points(report, comparison.baseline):
            other = find_point(report, comparison.variant, base["workload"], base["concurrency"])
            if other is None:
                continue
            ratio = (
                round(other["requests_per_s"] / base["requests_per_s"], 2)
                if base["requests_per_s"]
                else None
            )
            rows.append(
                {
                    "workload": base["workload"],
                    "concurrency": base["concurrency"],
                    "baseline_requests_per_s": base["requests_per_s"],
                    "variant_requests_per_s": other["requests_per_s"],
                    "throughput_ratio": ratio,
                    "baseline_p99_ms": base["latency_ms"].get("p99"),
                    "variant_p99_ms": other["latency_ms"].get("p99"),
                    "baseline_errors": base["errors"],
                    "variant_errors": other["errors"],
                }
            )
        results.append({**comparison.__dict__, "rows": rows})
    return results


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _errors(point: dict) -> str:
    failed = {k: v for k, v in point["statuses"].items() if not k.startswith("2")}
    return ", ".join(f"{v}×{k}" for k, v in failed.items()) if failed else "0"


def _batch(point: dict) -> str:
    means = point.get("server", {}).get("mean_batch_size") or {}
    # Histograms are labelled by API method or by batcher (/classify_batch feeds "classify").
    route = point["endpoint"].strip("/")
    names = (route, route.removesuffix("_batch"))
    matching = [v for k, v in means.items() if k.rsplit(":", 1)[-1] in names]
    return _fmt(matching[0], 2) if matching else "—"


def _server_cpu_per_request(point: dict) -> float | None:
    """Server CPU milliseconds per answered request (all answers, failed ones included)."""
    percent = point.get("server", {}).get("cpu_core_percent")
    if percent is None or not point["requests"]:
        return None
    return 10 * percent * point["duration_s"] / point["requests"]


def _model_per_request(point: dict) -> float | None:
    """Milliseconds inside model calls per answered request (``serving_model_seconds``)."""
    model_s = point.get("server", {}).get("model_s")
    if model_s is None or not point["requests"]:
        return None
    return 1000 * model_s / point["requests"]


def _server_cpu_outside_model(point: dict) -> float | None:
    """Server CPU per request minus the model's time: what the request path itself costs."""
    total, model = _server_cpu_per_request(point), _model_per_request(point)
    return None if total is None or model is None else total - model


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table, first column left-aligned and the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Benchmark `{report['name']}`",
        "",
        report.get("description", ""),
        "",
        f"- Machine: {machine['cpu']}, {machine['cpu_count']} cores, {machine['memory_gb']} GiB"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"),
        f"- Software: Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        f"- Commit: {machine.get('git_commit')}; run at {report['created']}",
        f"- Command: `{report['command']}`",
        f"- Load: closed loop, {report['settings']['warmup_s']} s warm-up then "
        f"{report['settings']['duration_s']} s measured per point, "
        f"{report['settings']['client_processes']} client processes",
        "",
        "Columns: good (2xx) requests/s; items/s (images or texts per second); latency "
        "percentiles of good requests in ms; failed requests by status; mean batch size "
        "the server formed; server and load-generator CPU in % of one core; server CPU time "
        "per request; time inside model calls per request (the service's "
        "`serving_model_seconds`); and server CPU per request outside the model (the two "
        "before it subtracted).",
        "",
    ]
    lines += [
        "## Configurations",
        "",
        "| config | what | environment | start-up s |",
        "|---|---|---|---:|",
    ]
    for entry in report["configs"]:
        env = " ".join(f"`{k}={v}`" for k, v in entry.get("env", {}).items()) or "—"
        lines.append(
            f"| {entry['name']} | {entry.get('description', '')} | {env} "
            f"| {_fmt(entry.get('startup_s'))} |"
        )
    lines.append("")
    for entry in report["configs"]:
        if entry.get("error"):
            lines += [f"**{entry['name']} failed:** {entry['error']}", ""]
    workloads = dict.fromkeys(p["workload"] for p in points(report))
    for workload in workloads:
        lines += [f"## {workload}", ""]
        header = [
            "config",
            "clients",
            "req/s",
            "items/s",
            "p50",
            "p95",
            "p99",
            "errors",
            "batch",
            "server CPU %",
            "server CPU ms/req",
            "model ms/req",
            "outside model ms/req",
            "client CPU %",
        ]
        rows = []
        for entry in report["configs"]:
            for point in points(report, entry["name"], workload):
                latency = point["latency_ms"]
                rows.append(
                    [
                        entry["name"],
                        str(point["concurrency"]),
                        _fmt(point["requests_per_s"]),
                        _fmt(point["items_per_s"]),
                        _fmt(latency.get("p50")),
                        _fmt(latency.get("p95")),
                        _fmt(latency.get("p99")),
                        _errors(point),
                        _batch(point),
                        _fmt(point.get("server", {}).get("cpu_core_percent")),
                        _fmt(_server_cpu_per_request(point), 2),
                        _fmt(_model_per_request(point), 3),
                        _fmt(_server_cpu_outside_model(point), 3),
                        _fmt(point["client_cpu_core_percent"]),
                    ]
                )
        lines += [*_table(header, rows), ""]
    for comparison in report.get("comparisons", []):
        lines += [
            f"## {comparison['title']}",
            "",
            f"`{comparison['variant']}` against `{comparison['baseline']}`.",
            "",
        ]
        header = [
            "workload",
            "clients",
            "baseline req/s",
            "variant req/s",
            "ratio",
            "baseline p99",
            "variant p99",
        ]
        rows = [
            [
                row["workload"],
                str(row["concurrency"]),
                _fmt(row["baseline_requests_per_s"]),
                _fmt(row["variant_requests_per_s"]),
                _fmt(row["throughput_ratio"], 2),
                _fmt(row["baseline_p99_ms"]),
                _fmt(row["variant_p99_ms"]),
            ]
            for row in comparison["rows"]
        ]
        if rows:
            lines += [*_table(header, rows), ""]
        else:
            lines += ["Not measured: the two configurations share no point in this run.", ""]
    if report.get("targets"):
        lines += ["## Targets", ""]
        header = ["config", "workload", "clients", "required", "measured", "met"]
        rows = []
        for target in report["targets"]:
            required = []
            if target["min_requests_per_s"] is not None:
                required.append(f"≥ {target['min_requests_per_s']:,.0f} req/s")
            if target["max_p99_ms"] is not None:
                required.append(f"p99 ≤ {target['max_p99_ms']:g} ms")
            if target.get("max_p50_ms") is not None:
                required.append(f"p50 ≤ {target['max_p50_ms']:g} ms")
            if target["max_errors"] is not None:
                required.append(f"≤ {target['max_errors']} errors")
            if target.get("max_outside_model_ms") is not None:
                required.append(f"≤ {target['max_outside_model_ms']:g} ms CPU outside the model")
            if target.get("min_ratio") is not None:
                required.append(f"≥ {target['min_ratio']:g}× {target['relative_to']}")
            if target.get("lower_p99"):
                required.append(f"p99 below {target['relative_to']}'s")
            if target.get("max_p99_ratio") is not None:
                required.append(f"p99 ≤ {target['max_p99_ratio']:g}× {target['relative_to']}'s")
            measured = target["measured"]
            shown = "not measured"
            if measured:
                shown = (
                    f"{measured['requests_per_s']:,.1f} req/s, p50 {_fmt(measured['p50_ms'])} ms, "
                    f"p99 {_fmt(measured['p99_ms'])} ms, "
                    f"{measured['errors']} errors"
                )
                if measured.get("outside_model_ms") is not None:
                    shown += f", {measured['outside_model_ms']:.3f} ms outside the model"
                if measured.get("ratio") is not None:
                    shown += f", {measured['ratio']:.2f}×"
            met = {True: "yes", False: "**no**", None: "—"}[target["met"]]
            rows.append(
                [
                    target["config"],
                    target["workload"],
                    str(target["concurrency"]),
                    ", ".join(required),
                    shown,
                    met,
                ]
            )
        lines += [*_table(header, rows), ""]
    lines += [f"![latency against throughput]({PLOT_NAME})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """p50 (dotted) and p99 (solid) latency against throughput, per workload panel."""
    # Imported here: client processes import this module's parents and need no plotting.
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = list(dict.fromkeys(p["workload"] for p in points(report)))
    if not workloads:
        return
    columns = min(len(workloads), 2)
    rows = -(-len(workloads) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), squeeze=False)
    for unused in axes.flat[len(workloads) :]:
        unused.set_visible(False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, workload in zip(axes.flat, workloads, strict=False):
        for index, entry in enumerate(report["configs"]):
            measured = sorted(
                (p for p in points(report, entry["name"], workload) if p["latency_ms"]),
                key=lambda p: p["concurrency"],
            )
            if not measured:
                continue
            colour = colours[index % len(colours)]
            throughput = [p["requests_per_s"] for p in measured]
            axis.plot(
                throughput,
                [p["latency_ms"]["p99"] for p in measured],
                "o-",
                color=colour,
                label=f"{entry['name']} p99",
            )
            axis.plot(
                throughput,
                [p["latency_ms"]["p50"] for p in measured],
                ".:",
                color=colour,
                label=f"{entry['name']} p50",
            )
            for p in measured:
                axis.annotate(
                    str(p["concurrency"]),
                    (p["requests_per_s"], p["latency_ms"]["p99"]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                )
        axis.set_title(workload)
        axis.set_xlabel("good requests/s")
        axis.set_ylabel("latency (ms)")
        axis.set_yscale("log")
        # 1-2-5 ticks, so that a panel spanning less than a decade still has labels.
        axis.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlim(left=0)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{report['name']}: latency against throughput (labels: concurrent clients)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(report: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(markdown(report))
    plot(report, directory / PLOT_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.json written by bench.run")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    write_report(report, args.report.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
