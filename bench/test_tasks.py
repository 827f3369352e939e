"""Workload 7: many tiny tasks, two at a time.

fastfork.map with chunksize=100 (one child per 100 tasks) and without (a child
per task) against multiprocessing.Pool(2).map and ProcessPoolExecutor(2).map
with and without chunksize=100. N = 500 and 5,000; the rows with a child or a
round trip per task (fastfork.map unchunked, the unchunked executor) run at
N = 500 only.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("n", [500, 5000])
@pytest.mark.parametrize("method", [m.name for m in W.TINY.methods])
def test_tiny_tasks(bench, method, n):
    bench("tiny", method, n)
