"""Locust scenarios for the service: one user class per endpoint and a mixed one.

The bodies are the same realistic payloads ``bench.run`` sends (MNIST test
digits as PNG, SST-2 test sentences, generate requests with ``n`` from 1 to 16),
built once per locust process from ``--data-dir`` (default ``$DATA_DIR`` or
``../shared/data``). Users send their next request as soon as the last one is
answered. Run from the repository root, against any URL:

    .venv/bin/locust -f bench/locustfile.py --host http://127.0.0.1:3000 \
        --headless -u 256 -r 64 -t 60s --csv bench-results/locust/classify ClassifyUser

Name one class (ClassifyUser, SentimentUser, GenerateUser, ClassifyBatchUser) to
load one endpoint, MixedUser for a mix; naming none runs every class at once.
Add ``--processes -1`` to use one locust process per core.
"""

from __future__ import annotations

import random
import sys
from functools import cache
from pathlib import Path

from locust import FastHttpUser, constant, events, task

# locust loads this file by path; make the repository importable for bench.payloads.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.payloads import Request, Workload, build_workloads, default_data_dir  # noqa: E402

WORKLOAD_NAMES = ("classify", "classify-64", "sentiment", "generate-mixed")
_options = {"data_dir": None}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument(
        "--data-dir",
        type=str,
        env_var="DATA_DIR",
        default="",
        help="data directory with MNIST/raw and SST-2 (default: ../shared/data)",
    )


@events.init.add_listener
def _remember_options(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is not None and options.data_dir:
        _options["data_dir"] = Path(options.data_dir)


@cache
def workloads() -> dict[str, Workload]:
    """Built on first use, once per process, so every user shares the same bodies."""
    return build_workloads(_options["data_dir"] or default_data_dir(), WORKLOAD_NAMES)


class _ServiceUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)  # closed loop: the next request follows the answer at once

    def send(self, workload_name: str) -> None:
        workload = workloads()[workload_name]
        request: Request = random.choice(workload.requests)
        self.client.request(
            request.method,
            request.path,
            data=request.body,
            headers={"Content-Type": request.content_type},
            name=workload.name,
        )


class ClassifyUser(_ServiceUser):
    """One MNIST test digit per request, as a PNG upload."""

    @task
    def classify(self) -> None:
        self.send("classify")


class ClassifyBatchUser(_ServiceUser):
    """64 MNIST test digits per request (the batch form of classify)."""

    @task
    def classify_batch(self) -> None:
        self.send("classify-64")


class SentimentUser(_ServiceUser):
    """One SST-2 test sentence per request."""

    @task
    def sentiment(self) -> None:
        self.send("sentiment")


class GenerateUser(_ServiceUser):
    """Generate 1 to 16 digits per request, returned as one PNG grid."""

    @task
    def generate(self) -> None:
        self.send("generate-mixed")


class MixedUser(_ServiceUser):
    """A mix weighted like a plausible front end: mostly classify and sentiment."""

    @task(5)
    def classify(self) -> None:
        self.send("classify")

    @task(4)
    def sentiment(self) -> None:
        self.send("sentiment")

    @task(2)
    def generate(self) -> None:
        self.send("generate-mixed")

    @task(1)
    def classify_batch(self) -> None:
        self.send("classify-64")
