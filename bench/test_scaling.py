"""Scaling: N children alive at once (jobs=N), each sleeping, N = 100, 1,000 and 5,000.

fastfork.map against an os.fork loop that forks all N then waits for each.
The figure is what a run takes beyond the children's sleep, per child:
fastfork's aim is the same per-child cost at N=5,000 as at N=100, and
within 1.3x of the bare loop at every N.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("n", [100, 1000, 5000])
@pytest.mark.parametrize("method", [m.name for m in W.SCALING.methods])
def test_scaling(bench, method, n):
    bench("scaling", method, n)
