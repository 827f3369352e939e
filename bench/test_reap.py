"""Workload 3: N already-exited children reaped.

fastfork.reap (one call, GIL released) against an os.waitpid loop and the C
limit (one waitpid per child in C). Making the zombies is not timed.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.REAP.methods])
def test_reap(bench, method):
    bench("reap", method)
