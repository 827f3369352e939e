"""Workload 2: fan-out of N children running a Python no-op, N = 100 and 1,000.

fastfork.map against an os.fork/os.waitpid loop, multiprocessing.Process
(fork context), ProcessPoolExecutor(max_tasks_per_child=1) and the C limit
(the same window of fork + _exit in C, children running no Python); every
method keeps at most CPU-count children alive.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("n", [100, 1000])
@pytest.mark.parametrize("method", [m.name for m in W.FANOUT.methods])
def test_fanout(bench, method, n):
    bench("fanout", method, n)
