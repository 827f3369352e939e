"""Workload 7: fastfork run, the command line.

`fastfork run -j 2` (grouped and --ungroup) against xargs -P 2, GNU parallel
when installed, and spawn_many in-process: 5,000 jobs of `true` and of
`echo {}`; and the cost of grouped output when every job writes 10 MiB.
"""
import pytest

from fastfork import _workloads as W

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("method", [m.name for m in W.RUN_TRUE.methods])
def test_run_true(bench, method):
    bench("run-true", method)


@pytest.mark.parametrize("method", [m.name for m in W.RUN_ECHO.methods])
def test_run_echo(bench, method):
    bench("run-echo", method)


@pytest.mark.parametrize("method", [m.name for m in W.RUN_OUTPUT.methods])
def test_run_output(bench, method):
    bench("run-output", method)
