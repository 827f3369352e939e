"""Workload 7: asyncio -- fastfork.aio beside asyncio's own subprocess support.

aio-exec: spawn_many (and spawn under a semaphore) against
asyncio.create_subprocess_exec, 2 commands at a time. aio-latency: the same
from the big parent beside a 1 ms periodic callback; ``extra_info`` carries
``max_loop_delay_ms`` and ``p99_loop_delay_ms``, how long the loop stalled at
worst and at the 99th percentile. aio-map: aio.map against fastfork.map.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.AIO_EXEC.methods])
def test_aio_exec(bench, method):
    bench("aio-exec", method)


@pytest.mark.parametrize("method", [m.name for m in W.AIO_LATENCY.methods])
def test_aio_loop_latency(bench, benchmark, method):
    W.LOOP_DELAYS.pop(method, None)
    bench("aio-latency", method)
    delays = W.LOOP_DELAYS[method]
    benchmark.extra_info["max_loop_delay_ms"] = round(delays["max"] * 1000, 3)
    benchmark.extra_info["p99_loop_delay_ms"] = round(delays["p99"] * 1000, 3)


@pytest.mark.parametrize("method", [m.name for m in W.AIO_MAP.methods])
def test_aio_map(bench, method):
    bench("aio-map", method)
