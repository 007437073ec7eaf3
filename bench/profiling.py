"""Where a server worker spends its time under load: sample it with py-spy and
summarise the stacks by function (inclusive and self share of the samples).

``bench.run --profile WORKLOAD:CONCURRENCY`` records one worker while that
point runs; this module can also summarise a recording made by hand:

    py-spy record --pid PID --duration 10 --format raw --output stacks.txt --nonblocking
    python -m bench.profiling stacks.txt --top 25    # several files: one section each
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# py-spy's raw (collapsed) format: "frame;frame;...;frame COUNT", a frame being
# "function (path/to/file.py:line)"; the line number is dropped to group by function.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>.*?)(?::\d+)?\)$")
SITE_PACKAGES = re.compile(r".*/(?:site|dist)-packages/")


# Where a sample's time goes: the category of the DEEPEST frame that matches a
# rule (so PIL under the PNG grid encoder counts as response encoding, PIL under
# the preprocessing as preprocessing). For one frame the first matching rule
# wins, so specific rules come before the generic framework ones.
_RULES = (
    ("image header check", r"^service/schemas\.py:_image_from|^service/imaging\.py:open_image"
     r"|^service/requests\.py:identify_images"),
    ("text tokenisation", r"^models/tokenizer|^service/inference\.py:SentimentClassification"
     r"\.prepare|^models/preprocessing\.py:encode_texts"),
    ("latent sampling", r"^models/preprocessing\.py:latent_batch"
     r"|^service/inference\.py:DigitGeneration\.prepare"),
    ("generator output to pixels (torch)", r"^models/preprocessing\.py:digits_from_generator"),
    ("image decode and preprocessing", r"^service/imaging\.py:load_image|^models/preprocessing"
     r"|^service/inference\.py:(DigitClassification\.)?(prepare_images|decode_and_prepare)"),
    ("response PNG encoding", r"^service/imaging\.py:(grid_png|encode_png)"),
    ("model inference (ONNX Runtime / PyTorch)", r"^service/backends\.py|^onnxruntime/|^torch/"),
    ("batch assembly and softmax",
     r"^service/inference\.py:(\w+\.(run_batch|predict_prepared)|softmax)"),
    ("batcher (queue, thread hand-off)", r"^service/batching\.py|^concurrent/futures/"),
    ("body parsing (multipart, JSON)", r"^_bentoml_impl/serde|^service/requests\.py"
     r"|^starlette/formparsers|^multipart/|^python_multipart/|^json/"),
    ("pydantic validation and serialisation", r"^pydantic|^_bentoml_sdk/validators"),
    ("tracing (OpenTelemetry)", r"^opentelemetry/|^asgi/__init__|^trace/|^attributes/"
     r"|^sdk/trace|^context/|^propagate/|^baggage/|^util/http"),
    ("metrics (Prometheus)", r"^prometheus_client/|instruments\.py"),
    ("request gate and dispatch (service/http.py, the route table, the tasks' answers)",
     r"^service/http\.py|^service/app\.py|^service/bento\.py|^service/routes\.py"
     r"|^service/tasks\.py"),
    ("BentoML/Starlette routing and middleware", r"^starlette/|^_bentoml_impl/|^bentoml/"
     r"|^_bentoml_sdk/|^anyio/"),
    ("HTTP protocol (uvicorn)", r"^uvicorn/protocols/|^h11/|^httptools/"),
    ("event loop and sockets", r"^asyncio/|^selectors\.py|^uvloop"),
)  # fmt: skip
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern)) for name, pattern in _RULES
)
# Leaf frames that mean "blocked, waiting for work": py-spy's non-blocking sampling
# does not always see such a thread as idle. Reported on their own line.
WAITING = re.compile(r"^concurrent/futures/thread\.py:_worker$|^threading\.py:\w*wait")
WAITING_CATEGORY = "waiting (idle thread, not CPU)"


@dataclass(frozen=True)
class ProfileSummary:
    samples: int
    categories: list[tuple[str, float]]  # (category, share of samples in %)
    inclusive: list[tuple[str, float]]  # project functions (service/, models/) only
    self_time: list[tuple[str, float]]


def category(frames: list[str]) -> str:
    if WAITING.search(frames[-1]):
        return WAITING_CATEGORY
    for frame in reversed(frames):
        for name, pattern in CATEGORIES:
            if pattern.search(frame):
                return name
    return "other"


def frame_name(frame: str) -> str:
    """``fn (/…/site-packages/pkg/mod.py:12)`` → ``pkg/mod.py:fn``."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = SITE_PACKAGES.sub("", match["file"])
    path = re.sub(r"^.*/(?=(?:service|models|bench)/)", "", path)
    path = re.sub(r"^.*/lib/python3\.\d+/", "", path)
    return f"{path}:{match['function']}"


def summarise_collapsed(text: str, top: int = 20) -> ProfileSummary:
    categories: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        # py-spy labels the root with the process or thread when asked to; not a function.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += samples
        categories[category(frames)] += samples
        self_time[frames[-1]] += samples
        for name in set(frames):
            if name.startswith(("service/", "models/")):
                inclusive[name] += samples
    if not total:
        return ProfileSummary(0, [], [], [])

    def shares(counter: Counter[str], limit: int | None = top) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]

    return ProfileSummary(total, shares(categories, None), shares(inclusive), shares(self_time))


def record(pid: int, seconds: float, output: Path) -> subprocess.Popen:
    """Start py-spy on ``pid`` for ``seconds`` without pausing it (returns at once)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(output),
        "--nonblocking",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def markdown(summary: ProfileSummary, title: str) -> str:
    lines = [f"### {title}", "", f"{summary.samples} samples of the worker's busy threads.", ""]
    lines += ["| where the time goes | % of samples |", "|---|---:|"]
    lines += [f"| {name} | {share} |" for name, share in summary.categories]
    lines += ["", "| project function (inclusive) | % |", "|---|---:|"]
    lines += [f"| `{name}` | {share} |" for name, share in summary.inclusive]
    lines += ["", "| function (self) | % |", "|---|---:|"]
    lines += [f"| `{name}` | {share} |" for name, share in summary.self_time]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path, nargs="+", help="py-spy --format raw outputs")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    for path in args.stacks:
        title = f"{path.parent.name} {path.name.removesuffix('.stacks.txt')}"
        print(markdown(summarise_collapsed(path.read_text(), args.top), title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
