"""Forking from small: the fork cost of a parent holding data, by kind of memory.

Run:    pytest bench/test_forkserver.py --benchmark-only
Smoke:  pytest bench/test_forkserver.py --benchmark-disable

Fork + exit + reap with ``--bench-parent-mib`` (1 GiB) of data in a bytearray,
a SharedBuffer or a PrivateBuffer (huge pages): the ``memory`` workload that
``fastfork bench`` runs, measured in this process and in a fresh interpreter
that holds nothing but the buffer (without the test runner's own memory, whose
page tables every fork here also copies). The per-task start-up of short
Python tasks through a ForkServer, from a small and a 1 GiB parent, is
measured in test_startup.py.
"""
import os
import subprocess
import sys

import pytest

import fastfork
from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(1800)

METHODS = [m.name for m in W.MEMORY.methods]


@pytest.mark.parametrize("method", METHODS)
def test_fork_holding_data(bench, method):
    bench("memory", method)


# A fresh interpreter holding only the buffer of one memory method: it forks
# N children on each line "N" and answers "done".
_FRESH_PARENT = """
import sys
from fastfork import _workloads as W
method = W.memory_workload(int(sys.argv[2])).method(sys.argv[1])
state = method.prepare(0)
print("ready", flush=True)
for line in sys.stdin:
    method.run(int(line), *state)
    print("done", flush=True)
method.cleanup(*state)
"""


@pytest.mark.parametrize("method", METHODS)
def test_fork_holding_data_fresh_parent(benchmark, request, method):
    mib = request.config.getoption("bench_parent_mib")
    n = W.MEMORY.sizes["default"][-1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastfork.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", _FRESH_PARENT, method, str(mib)], env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"

        def forks():
            proc.stdin.write(f"{n}\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"
        benchmark.group = f"memory N={n}, fresh parent holding {mib} MiB"
        benchmark.extra_info.update(workload="memory", method=method, n=n, parent="fresh")
        benchmark.pedantic(forks, rounds=1 if benchmark.disabled else 3, iterations=1)
        if not benchmark.disabled:
            benchmark.extra_info["children_per_s"] = round(n / benchmark.stats.stats.median, 1)
    finally:
        proc.stdin.close()
        proc.wait(60)
