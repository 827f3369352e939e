"""pytest-benchmark harness for fastfork's workloads.

Run:    pytest bench/ --benchmark-only            (a few minutes on 2 cores)
Smoke:  pytest bench/ --benchmark-disable         (each benchmark once, small sizes)
        pytest bench/ --benchmark-only --bench-quick

The workloads themselves live in ``fastfork._workloads`` and are the ones
``fastfork bench`` runs. Each benchmark's group holds a fastfork method with
its stdlib baselines (and the C limit) for the same workload, N and parent
size; ``extra_info`` carries children per second, and a summary table of
children/s and ratios to the baseline is printed at the end of the run.
Every benchmark runs from a small parent and from one holding 1 GiB of
touched private memory (``--bench-parent-mib``).
"""
import sys
import time

import pytest

from fastfork import _workloads as W
from fastfork import benchmark as B

BUDGET_S = 2.0   # aim for about this much wall time per benchmark
MAX_ROUNDS = 5
RESULTS = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("fastfork bench")
    group.addoption("--bench-quick", action="store_true",
                    help="small sizes and one round per benchmark (a smoke run)")
    group.addoption("--bench-parent-mib", type=int, default=1024, metavar="N",
                    help="memory held by the big parent, in MiB (default 1024)")
    group.addoption("--bench-targets", action="store_true",
                    help="also print the ratios fastfork's developers aim for, and whether "
                         "this run reaches them")


def pytest_configure(config):
    config.stash[RESULTS] = []


def _mode(config):
    quick = config.getoption("bench_quick") or config.getoption("benchmark_disable", False)
    return "quick" if quick else "default"


@pytest.fixture(scope="session", params=["small", "1GiB"])
def parent(request):
    """The parent size: "small", or "big" while this process holds the big buffer."""
    if request.param == "small":
        yield "small"
        return
    mib = request.config.getoption("bench_parent_mib")
    buf = W.allocate_parent(mib)
    yield "big"
    del buf


@pytest.fixture
def bench(benchmark, parent, request):
    """Return ``run(workload, method, n=None)``: benchmark one method of a workload.

    ``n`` defaults to the workload's size for the mode and parent. Skips when
    the method cannot run here (e.g. it needs a newer Python), or when the row
    is not run from this parent (e.g. N=1000 no-op children from a 1 GiB parent).
    """
    mode = _mode(request.config)
    mib = request.config.getoption("bench_parent_mib")

    def run(workload, method, n=None):
        wl = W.WORKLOADS[workload]
        if workload == "memory" and mib != 1024:
            wl = W.memory_workload(mib)
        m = wl.method(method)
        reason = W.unavailable(m)
        if reason:
            pytest.skip(reason)
        sizes = (wl.sizes if parent == "small" else wl.big_sizes)[mode]
        if not sizes:
            pytest.skip(f"the {workload} workload is not run from the {parent} parent "
                        f"in {mode} mode")
        if n is None:
            n = sizes[-1]
        elif mode == "quick":
            n = min(n, sizes[-1])
        elif parent == "big" and n > max(wl.big_sizes["full"]):
            pytest.skip(f"N={n} from the big parent is not run: every child pays its fork "
                        "cost (~40 ms per child with 1 GiB)")
        if m.slow and n > min(wl.sizes[mode]):
            pytest.skip(f"{method} is slow: measured at N={min(wl.sizes[mode])} only")
        benchmark.group = f"{workload} N={n} {parent} parent"
        benchmark.extra_info.update(workload=workload, method=method, kind=m.kind,
                                    n=n, parent=parent, baseline=method == wl.baseline)
        sys.stdout.flush()
        if benchmark.disabled:
            benchmark.pedantic(W.measure, args=(m, n))  # runs it once, untimed
            return
        # One untimed round, which also sizes the number of rounds to the budget.
        started = time.perf_counter()
        W.measure(m, n)
        wall = time.perf_counter() - started
        rounds = 1 if mode == "quick" else max(1, min(MAX_ROUNDS, int(BUDGET_S / wall)))
        if m.reports_time:
            # The method reports the seconds that count (what a run took beyond
            # its children's sleep, say): the benchmark's own figures are wall
            # time, the summary and extra_info use what the method reported.
            reported = []
            benchmark.pedantic(lambda: reported.append(W.measure(m, n)), rounds=rounds,
                               iterations=1, warmup_rounds=0)
            _record(benchmark, request, B.finish_result(B.new_result(wl, m, parent, n), reported))
            return
        pending = []

        def setup():
            state = m.prepare(n) if m.prepare else ()
            pending.append(state)
            return (n, *state), {}

        def teardown(n, *state):
            pending.remove(state)
            if m.cleanup:
                m.cleanup(*state)

        try:
            benchmark.pedantic(m.run, setup=setup, teardown=teardown, rounds=rounds,
                               iterations=1, warmup_rounds=0)
        finally:
            for state in pending:
                if m.cleanup:
                    m.cleanup(*state)
        seconds = list(benchmark.stats.stats.data)
        _record(benchmark, request, B.finish_result(B.new_result(wl, m, parent, n), seconds))

    return run


def _record(benchmark, request, result):
    """Put a result's children/s in extra_info and keep it for the summary table."""
    benchmark.extra_info.update(children_per_s=round(result["children_per_s"], 1),
                                per_child_s=result["per_child_s"],
                                parent_rss_mib=result["parent_rss_mib"])
    request.config.stash[RESULTS].append(result)


def pytest_terminal_summary(terminalreporter, config):
    """Print children/s and the ratio to the stdlib baseline per benchmark group.

    With ``--bench-targets``, also the project's performance goals against this run.
    """
    results = config.stash.get(RESULTS, [])
    if not results:
        return
    order = {k: i for i, k in enumerate(W.WORKLOADS)}
    results = sorted(results, key=lambda r: (r["parent"] != "small", order[r["workload"]],
                                             r["n"], not r["baseline"]))
    B.add_ratios(results)
    tr = terminalreporter
    tr.section("fastfork: children per second (median of rounds), ratio to the baseline (*)")
    for line in B.format_rows(results, config.getoption("bench_parent_mib")):
        tr.write_line(line)
    if config.getoption("bench_targets"):
        tr.write_line("")
        for line in B.format_targets(B.evaluate_targets(results)):
            tr.write_line(line)
