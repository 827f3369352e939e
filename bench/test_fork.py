"""Workload 1: fork + immediate exit + reap of one child, repeated.

fastfork.fork against os.fork (parity is the expected result: both are bound
by the kernel's fork) and the C limit, the same loop done in C. Also the fork
cost of a parent holding 1 GiB of data in a bytearray, a SharedBuffer or a
huge-page PrivateBuffer.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.FORK.methods])
def test_fork_exit_reap(bench, method):
    bench("fork", method)


@pytest.mark.parametrize("method", [m.name for m in W.MEMORY.methods])
def test_fork_with_data(bench, method):
    bench("memory", method)
