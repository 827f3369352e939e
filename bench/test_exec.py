"""Workload 4: exec fan-out of /bin/true.

fastfork.spawn and spawn_many (sequential and jobs=2) against subprocess.run,
subprocess.Popen + wait (also with 2 at a time, from one thread and from two),
os.posix_spawn + waitpid, os.fork + os.execv + waitpid, and the C limit when
the extension has one.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.EXEC.methods])
def test_exec(bench, method):
    bench("exec", method)
