"""Workload 5: per-task start-up cost of a short Python task.

A fork per task (os.fork, fastfork.map, fastfork.ForkServer.map) against a
fresh interpreter per task (subprocess.run of ``python -c``) and the
multiprocessing spawn and forkserver contexts.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.STARTUP.methods])
def test_startup(bench, method):
    bench("startup", method)
