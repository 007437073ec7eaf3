"""Compare a worker's tracemalloc snapshots: what the Python heap kept between two of them.

The worker writes them with ``SERVING_HEAP_SNAPSHOT_DIR`` (``service.heap_snapshots``;
``python -m bench.soak --heap-snapshots 60`` sets it). This prints, for each
worker in the folder, the traced heap and the RSS of every snapshot, and the
lines of code whose live allocations grew most between the snapshot taken at
``--from`` (default: the second, after a warm-up) and the last one.

    python -m bench.heap_diff bench-results/soak/classify.heap
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from pathlib import Path

MIB = 1024 * 1024
# Allocations of the snapshot machinery itself are not the service's.
IGNORED = (tracemalloc.__file__, "<frozen importlib._bootstrap>", "<unknown>")


def figures(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def growth(first: Path, last: Path, key: str = "traceback", top: int = 15) -> list[str]:
    """The ``top`` sites whose live bytes grew most from ``first`` to ``last``."""
    filters = [tracemalloc.Filter(False, pattern) for pattern in IGNORED]
    before = tracemalloc.Snapshot.load(str(first)).filter_traces(filters)
    after = tracemalloc.Snapshot.load(str(last)).filter_traces(filters)
    lines = []
    for stat in after.compare_to(before, key)[:top]:
        lines.append(
            f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks "
            f"(now {stat.size / 1024:.1f} KiB in {stat.count})"
        )
        frames = stat.traceback.format(limit=6 if key == "traceback" else 1, most_recent_first=True)
        lines.extend(f"        {frame.strip()}" for frame in frames if frame.strip())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--from", dest="start", type=int, default=1,
                        help="index of the snapshot to compare from (default 1)")  # fmt: skip
    parser.add_argument("--by", choices=("traceback", "lineno", "filename"), default="traceback")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    for jsonl in sorted(args.folder.glob("worker-*.jsonl")):
        rows = figures(jsonl)
        print(f"== {jsonl.stem}: {len(rows)} snapshots")
        t0 = rows[0]["time"]
        for row in rows:
            print(f"  {row['time'] - t0:7.0f} s  traced {row['traced_bytes'] / MIB:8.2f} MiB  "
                  f"RSS {row['rss_bytes'] / MIB:8.1f} MiB  {row['snapshot']}")  # fmt: skip
        if len(rows) <= args.start:
            continue
        first = args.folder / rows[args.start]["snapshot"]
        last = args.folder / rows[-1]["snapshot"]
        print(f"-- grew from {first.name} to {last.name}:")
        print("\n".join(growth(first, last, args.by, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
