"""Python heap snapshots of a running worker, for finding what grows under load.

Off by default. With ``SERVING_HEAP_SNAPSHOT_DIR`` set, each worker starts
``tracemalloc`` once its models are loaded and, every
``SERVING_HEAP_SNAPSHOT_INTERVAL_S`` seconds, writes

* ``worker-<pid>-<n>.tracemalloc``: a ``tracemalloc.Snapshot`` (``Snapshot.load``);
* one line of ``worker-<pid>.jsonl``: the time, the snapshot's file, the Python
  heap that tracemalloc traces and the process's resident memory.

Comparing two snapshots (``python -m bench.heap_diff DIR``) names the lines of
code whose allocations stay alive; the JSON lines tell whether the Python heap
explains the growth of the resident memory at all, or whether the allocator
beneath it does. Tracing costs: every allocation records its traceback, so a
traced worker serves noticeably fewer requests per second. It is a diagnostic,
not a production setting. The folder is the operator's, set at start-up; no
request chooses a path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path

log = logging.getLogger(__name__)

# Frames kept per allocation: enough to see the caller of a library's allocation.
TRACEBACK_FRAMES = 12


def resident_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapSnapshots:
    """A daemon thread that dumps a tracemalloc snapshot every ``interval_s``."""

    def __init__(self, folder: Path, interval_s: float) -> None:
        self.folder = folder
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tracemalloc.start(TRACEBACK_FRAMES)
        self._thread = threading.Thread(target=self._run, name="heap-snapshots", daemon=True)
        self._thread.start()
        log.warning(
            "tracemalloc is on: a heap snapshot every %g s into %s (slower serving)",
            self.interval_s,
            self.folder,
        )

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self.interval_s):
            self.write(index)
            index += 1

    def write(self, index: int) -> Path:
        """Dump one snapshot and its line of figures; returns the snapshot's path."""
        snapshot = tracemalloc.take_snapshot()
        traced, peak = tracemalloc.get_traced_memory()
        path = self.folder / f"worker-{self._pid}-{index:04d}.tracemalloc"
        partial = path.with_suffix(".partial")
        snapshot.dump(str(partial))
        partial.replace(path)  # a reader never sees half a snapshot
        line = {
            "time": time.time(),
            "snapshot": path.name,
            "traced_bytes": traced,
            "traced_peak_bytes": peak,
            "rss_bytes": resident_bytes(),
        }
        with (self.folder / f"worker-{self._pid}.jsonl").open("a") as figures:
            figures.write(json.dumps(line) + "\n")
        return path
