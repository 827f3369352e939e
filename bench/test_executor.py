"""Workload 7: a fresh process per task, N tiny tasks through an executor.

fastfork.ForkExecutor forking from the caller and from a ForkServer, against
ProcessPoolExecutor(max_tasks_per_child=1) (the stdlib's process per task),
fastfork.map (the same children without futures) and a ProcessPoolExecutor
that reuses its workers (no fresh process per task: the speed a reusing pool
buys). Every executor is made and warmed up untimed; at most CPU-count tasks
run at once.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.EXECUTOR.methods])
def test_executor(bench, method):
    bench("executor", method)
