"""Dask: tasks through fastfork.dask.ForkIsolation against Dask's default thread executor.

One LocalCluster(n_workers=2, threads_per_worker=2, processes=True) serves the
module; the same tasks run through three executors of its workers, the rounds
of each group one after the other: Dask's default thread pool, ForkIsolation
(a process forked from the worker per task) and ForkIsolation(server=True) (a
process per task forked by each worker's fork server). Each group runs with
small workers and with workers holding 1 GiB of touched memory, which every
fork from the worker pays for.

- ``throughput``: N tasks of 1 ms (N=400) or 100 ms (N=40) submitted at once
  (4 run at a time); ``extra_info`` has tasks/s.
- ``latency``: one 1 ms task at a time (N=30); ``extra_info`` has ms per task.

The summary at the end of the module gives, per group, tasks/s or ms per task
and what isolation adds per task over the thread pool of the same run.

Run:  pytest bench/test_dask.py --benchmark-only
"""
import contextlib
import time

import pytest

distributed = pytest.importorskip(
    "distributed", reason="fastfork.dask needs dask and distributed (pip install 'fastfork[dask]')")
import fastfork.dask as ffd  # noqa: E402

pytestmark = pytest.mark.timeout(1800)

EXECUTORS = {"threads (default)": None, "fastfork.dask": "fastfork",
             "fastfork.dask server": "fastfork-server"}
WORKER_MIB = {"small": 0, "1GiB": 1024}
THROUGHPUT = {"1ms": (1, 400), "100ms": (100, 40)}
LATENCY_N = 30
ROUNDS = 3

_results = []
_held = []


def hold_memory(mib):
    """In a worker: keep ``mib`` MiB of written memory (0 lets it go)."""
    _held.clear()
    if mib:
        _held.append(bytearray(b"\x5a") * (mib << 20))
    return mib


@pytest.fixture(scope="module")
def client(request):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.register_plugin(ffd.ForkIsolation(name=EXECUTORS["fastfork.dask"]))
        client.register_plugin(ffd.ForkIsolation(server=True,
                                                 name=EXECUTORS["fastfork.dask server"]))
        yield client
    _summary(request.config)


@pytest.fixture(scope="module", params=sorted(WORKER_MIB, reverse=True))
def workers(request, client):
    """"small" or "1GiB": what each worker holds while the group runs."""
    client.run(hold_memory, WORKER_MIB[request.param])
    yield request.param
    client.run(hold_memory, 0)


def _routed(name):
    return ffd.isolated(name) if name is not None else contextlib.nullcontext()


def _throughput(client, name, ms, n):
    with _routed(name):
        # The task is a stdlib function: what a fork server imports for it is
        # Dask's task spec, not this module (which imports distributed).
        futures = client.map(time.sleep, [ms / 1000] * n, pure=False)
    distributed.wait(futures)
    assert all(f.status == "finished" for f in futures)


def _latency(client, name, n):
    for _ in range(n):
        with _routed(name):
            future = client.submit(time.sleep, 0.001, pure=False)
        future.result()


def _measure(benchmark, run, group, executor, workers, n, kind):
    benchmark.group = f"dask {group}, {workers} workers"
    if benchmark.disabled:
        benchmark.pedantic(run)  # once, untimed: a smoke run
        return
    run()  # warm-up: the executor's first tasks, the server's imports
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    seconds = sorted(benchmark.stats.stats.data)[ROUNDS // 2]
    row = dict(group=benchmark.group, executor=executor, n=n, kind=kind, seconds=seconds)
    if kind == "throughput":
        benchmark.extra_info["tasks_per_s"] = round(n / seconds, 1)
    else:
        benchmark.extra_info["ms_per_task"] = round(seconds / n * 1000, 2)
    _results.append(row)


@pytest.mark.parametrize("task", sorted(THROUGHPUT))
@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_throughput(benchmark, client, workers, task, executor):
    ms, n = THROUGHPUT[task]
    _measure(benchmark, lambda: _throughput(client, EXECUTORS[executor], ms, n),
             f"throughput {task} tasks N={n}", executor, workers, n, "throughput")


@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_latency(benchmark, client, workers, executor):
    _measure(benchmark, lambda: _latency(client, EXECUTORS[executor], LATENCY_N),
             f"latency one 1ms task at a time N={LATENCY_N}", executor, workers, LATENCY_N,
             "latency")


def _summary(config):
    """Print, per group, the rate and what isolation adds per task over the thread pool."""
    if not _results:
        return
    lines = ["", "fastfork.dask against Dask's thread pool (median of rounds, same run):"]
    groups = {}
    for row in _results:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        lines.append(f"  {group}")
        base = next((r for r in rows if EXECUTORS[r["executor"]] is None), None)
        for r in rows:
            per_task = r["seconds"] / r["n"] * 1000
            text = (f"{r['n'] / r['seconds']:9.1f} tasks/s" if r["kind"] == "throughput"
                    else f"{per_task:9.2f} ms/task")
            if base is not None and r is not base:
                added = per_task - base["seconds"] / base["n"] * 1000
                scope = ("of wall time, 4 at once" if r["kind"] == "throughput"
                         else "of latency")
                text += f"   adds {added:6.2f} ms per task {scope}"
            lines.append(f"    {r['executor']:<22}{text}")
    # A module fixture's teardown runs with output captured: print past the capture.
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines), flush=True)
