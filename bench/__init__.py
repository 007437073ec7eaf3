"""Load testing and benchmarking of the serving service.

* ``bench.payloads``: realistic request bodies (MNIST test digits as PNG,
  SST-2 test sentences, generate requests) built from the data directory.
* ``bench.loadgen``: a closed-loop HTTP load generator (several client
  processes, each running many asyncio coroutines).
* ``bench.server``: starts and stops the service under test and reads its
  ``/metrics``.
* ``bench.config``: the named comparison sets in ``bench/configs/*.toml``.
* ``bench.report``: the JSON and Markdown reports and the latency/throughput plot.
* ``bench.profiling``: py-spy recordings of a server worker, summarised by stage.
* ``bench.ceiling``: the same load against a bare Starlette endpoint (no model).
* ``bench.run``: the command that ties them together (``python -m bench.run``).
* ``bench/locustfile.py``: the same workloads as locust users, for ad-hoc load tests.
"""
