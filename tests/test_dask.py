"""Tests for fastfork.dask: Dask tasks each in a forked process, on a real LocalCluster.

One cluster serves the whole module: LocalCluster(n_workers=2,
threads_per_worker=2, processes=True) started in a process of its own (its
nannies, worker restarts and connections stay out of this process, whose
children and fds the leak guard checks). Two plugins are registered on it:
"fastfork" forks tasks from the worker, "fastfork-server" from each worker's
fork server; tests that hold for both run once per mode. After every test
no task process may be left on any worker.

The task functions live at module level: the workers import this module
(its directory is on their PYTHONPATH), as they would a user's.
"""
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

import pytest

import fastfork
import procutil

try:
    import dask
    import dask.bag
    import distributed
    import fastfork.dask as ffd
except ImportError:
    dask = distributed = ffd = None

NO_DASK = "fastfork.dask needs dask and distributed (pip install 'fastfork[dask]')"
needs_dask = pytest.mark.skipif(ffd is None, reason=NO_DASK)

MODES = {"fork": "fastfork", "server": "fastfork-server"}

# The cluster's process: prints the scheduler's address, runs until its stdin closes.
# LocalCluster closes the nanny of a worker that is gone for lost-worker-timeout
# (15 s) -- also when a later restart of that worker is under way then: the tests
# restart and kill workers in quick succession.
CLUSTER_HOST = """
import sys
import dask
from distributed import LocalCluster
dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})
cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                       host="127.0.0.1", dashboard_address=None)
print(cluster.scheduler_address, flush=True)
sys.stdin.read()
cluster.close()
"""


# ---------------------------------------------------------------- tasks (run on the workers)

def task_pid(x):
    return os.getpid()


def square(x):
    return x * x


def segfault(x):
    ctypes.string_at(0)


def exit_with(code):
    os._exit(code)


def segfault_once(marker):
    """Segfault the first time (leaving ``marker``), return "ok" the next."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        ctypes.string_at(0)
    return "ok"


def report_pid_then_block(fifo):
    """Write this process's pid to ``fifo``, then wait forever."""
    with open(fifo, "w") as f:
        f.write(f"{os.getpid()}\n")
    threading.Event().wait()


_kept = []


def leak(mib):
    """Allocate ``mib`` MiB (every page written) and keep it for the rest of the process."""
    _kept.append(bytearray(b"\x5a") * (mib << 20))
    return os.getpid()


def allocate(mib):
    return len(bytearray(mib << 20))


def return_lock(x):
    return threading.Lock()


def inverse(x):
    return 1 / x


def partition_pids(partition):
    return [os.getpid() for _ in partition]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def executor_names(dask_worker):
    return sorted(dask_worker.executors)


async def preload_on_worker(dask_worker):
    await ffd.dask_setup(dask_worker)
    return sorted(dask_worker.executors)


async def preload_on_scheduler(dask_scheduler):
    await ffd.dask_setup(dask_scheduler)
    return sorted(dask_scheduler.worker_plugins)


def task_processes(dask_worker):
    """The processes a worker's fastfork executors still have (their fork servers aside)."""
    servers = {ex._server.pid for ex in dask_worker.executors.values()
               if getattr(ex, "_server", None) is not None and ex._server.pid is not None}
    left = set(procutil.children()) - servers
    for server in servers:
        left |= procutil.children(server)
    return sorted(left)


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def cluster_address(tmp_path_factory):
    """Start the cluster's process; yield the scheduler's address; stop it at the end."""
    if distributed is None:
        pytest.skip(NO_DASK)
    log_path = tmp_path_factory.mktemp("dask") / "cluster.log"
    with open(log_path, "w") as log:
        host = subprocess.Popen([sys.executable, "-c", CLUSTER_HOST], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True,
                                env=procutil.child_env())
    try:
        poller = select.poll()
        poller.register(host.stdout, select.POLLIN)
        if not poller.poll(180_000):
            pytest.fail(f"the cluster did not start: {log_path.read_text()[-3000:]}")
        address = host.stdout.readline().strip()
        if not address:
            pytest.fail(f"the cluster failed to start: {log_path.read_text()[-3000:]}")
        yield address
    finally:
        host.stdin.close()
        try:
            host.wait(timeout=120)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
        host.stdout.close()


@pytest.fixture(scope="module")
def dask_client(cluster_address):
    """A Client of the module's cluster with both plugins registered."""
    with distributed.Client(cluster_address, set_as_default=False) as client:
        client.wait_for_workers(2)
        client.register_plugin(ffd.ForkIsolation(name=MODES["fork"]))
        client.register_plugin(ffd.ForkIsolation(server=True, name=MODES["server"]))
        yield client


@pytest.fixture
def client(dask_client):
    """The module's Client; after the test, no worker may have a task process left."""
    yield dask_client
    deadline = time.monotonic() + 30
    while True:
        left = {w: pids for w, pids in dask_client.run(task_processes).items() if pids}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"task processes left on the workers: {left}"


@pytest.fixture(params=sorted(MODES))
def executor(request):
    """The name of the executor to route tasks to, once per mode."""
    return MODES[request.param]


def worker_pids(client):
    return client.run(os.getpid)


NEWLINE = b"\n"


class PidPipe:
    """A FIFO tasks write their pid to; ``read(futures)`` waits for one pid per future."""

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)
        self._read = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own write end: no end of file between two writers.
        self._write = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        self._buffer = b""

    def read(self, futures, timeout=120):
        """The pids of the tasks of ``futures``; a task that fails first raises its error."""
        n = len(futures)
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        deadline = time.monotonic() + timeout
        while self._buffer.count(NEWLINE) < n:
            for future in futures:
                if future.status == "error":
                    future.result()
            left = deadline - time.monotonic()
            assert left > 0, f"only {self._buffer.count(NEWLINE)} of {n} tasks reported"
            if poller.poll(min(left, 0.5) * 1000):
                self._buffer += os.read(self._read, 4096)
        lines = self._buffer.split(NEWLINE)
        self._buffer = NEWLINE.join(lines[n:])
        return [int(line) for line in lines[:n]]

    def close(self):
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def pid_pipe(tmp_path):
    pipe = PidPipe(tmp_path / "pids")
    yield pipe
    pipe.close()


def wait_for_replacement(client, old_address, timeout=180):
    """Wait until the nanny has replaced the worker at ``old_address`` (two workers again).

    The new worker listens on a new port. Until the scheduler has dropped
    the old one, asking every worker something could wait on the dead one.
    """
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if len(workers) == 2 and old_address not in workers:
            worker_pids(client)  # every worker answers
            return
        assert time.monotonic() < deadline, f"the worker was not replaced: {sorted(workers)}"
        time.sleep(0.1)


# ---------------------------------------------------------------- import and arguments

def test_import_fastfork_does_not_import_dask():
    result = procutil.run_python(
        "import sys, fastfork\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))",
        check=True)
    assert result.stdout.strip() == "[]"


def test_missing_dask_is_a_clear_import_error():
    result = procutil.run_python(
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'distributed'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Missing())\n"
        "try:\n"
        "    import fastfork.dask\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    assert "pip install 'fastfork[dask]'" in result.stdout, result.stderr


@needs_dask
@pytest.mark.parametrize("kwargs, error", [
    ({"jobs": 0}, ValueError),
    ({"jobs": "2"}, TypeError),
    ({"timeout": -1}, ValueError),
    ({"timeout": 0}, ValueError),
    ({"timeout": "1"}, TypeError),
    ({"grace": -1}, ValueError),
    ({"memory_limit": 0}, ValueError),
    ({"memory_limit": "lots"}, ValueError),
    ({"memory_limit": True}, TypeError),
    ({"memory_limit": 1.5}, TypeError),
    ({"server": "yes"}, TypeError),
    ({"preload": "numpy"}, TypeError),
    ({"preload": [1]}, TypeError),
    ({"name": "default"}, ValueError),
    ({"name": ""}, ValueError),
    ({"name": 3}, TypeError),
])
def test_bad_plugin_arguments(kwargs, error):
    with pytest.raises(error):
        ffd.ForkIsolation(**kwargs)


@needs_dask
def test_bad_arguments_fail_before_anything_runs():
    with pytest.raises(ValueError):
        ffd.isolated(timeout=0)
    with pytest.raises(ValueError):
        ffd.isolated(memory_limit="-1 GiB")
    with pytest.raises(ValueError):
        ffd.isolated("offload")
    with pytest.raises(TypeError):
        ffd.map(3, [1])
    with pytest.raises(TypeError):
        ffd.map(square, [1], client="tcp://127.0.0.1:1")
    with pytest.raises(ValueError):
        ffd.map(square, [1], timeout=-1)
    assert ffd.ForkIsolation(memory_limit="1 KiB").memory_limit == 1024


# ---------------------------------------------------------------- routing

def test_every_task_has_its_own_process(client, executor):
    workers = set(worker_pids(client).values())
    with ffd.isolated(executor):
        futures = client.map(task_pid, range(8), pure=False)
    pids = client.gather(futures)
    assert not workers & set(pids)
    assert len(set(pids)) == 8


def test_plain_annotation_routes_too(client):
    workers = set(worker_pids(client).values())
    with dask.annotate(executor="fastfork"):
        future = client.submit(task_pid, 1, pure=False)
    assert future.result() not in workers
    assert client.submit(task_pid, 2, pure=False).result() in workers


def test_delayed_graph(client, executor):
    workers = set(worker_pids(client).values())
    with ffd.isolated(executor):
        total = dask.delayed(sum)([dask.delayed(square)(i) for i in range(4)])
        pid = dask.delayed(task_pid)(total)
    assert client.compute(pid).result() not in workers
    assert client.compute(total).result() == 14


def test_bag_map_partitions(client, executor):
    """Fusion drops a layer's annotations: compute unfused, or annotate the compute."""
    workers = set(worker_pids(client).values())
    bag = dask.bag.from_sequence(range(8), npartitions=4)
    with ffd.isolated(executor):
        pids = bag.map_partitions(partition_pids)
    assert not workers & set(client.compute(pids, optimize_graph=False).result())
    with ffd.isolated(executor):
        pids = client.compute(bag.map(task_pid)).result()
    assert not workers & set(pids)


def test_preload_installs_the_plugin(client):
    """``--preload fastfork.dask`` on a worker or on the scheduler (here called directly)."""
    assert all("fastfork" in names for names in client.run(preload_on_worker).values())
    assert "fastfork" in client.run_on_scheduler(preload_on_scheduler)
    workers = set(worker_pids(client).values())
    with ffd.isolated():
        futures = client.map(task_pid, range(4), pure=False)
    assert not workers & set(client.gather(futures))


def test_bad_annotation_fails_the_task(client):
    with dask.annotate(executor="fastfork", fastfork_timeout="soon"):
        future = client.submit(square, 3, pure=False)
    with pytest.raises(TypeError, match="fastfork_timeout"):
        future.result()


# ---------------------------------------------------------------- failures stay per task

def test_segfault_is_the_tasks_error(client, executor):
    before = worker_pids(client)
    address = sorted(before)[0]
    kept = client.submit(square, 7, workers=[address], pure=False)
    assert kept.result() == 49
    with ffd.isolated(executor):
        crash = client.submit(segfault, 1, workers=[address], pure=False)
    with pytest.raises(fastfork.ChildError) as info:
        crash.result()
    err = info.value
    assert err.signal == signal.SIGSEGV
    assert err.pid not in before.values()
    assert f"task {crash.key!r}; worker {address}, host " in str(err)
    assert "killed by SIGSEGV" in str(err)
    assert worker_pids(client) == before
    assert address in client.who_has([kept])[kept.key]
    assert kept.result() == 49


def test_exit_is_the_tasks_error(client, executor):
    with ffd.isolated(executor):
        future = client.submit(exit_with, 3, pure=False)
    with pytest.raises(fastfork.ChildError) as info:
        future.result()
    assert info.value.returncode == 3
    assert info.value.signal is None


def test_tasks_own_exception_is_raised_as_usual(client, executor):
    with ffd.isolated(executor):
        future = client.submit(inverse, 0, pure=False)
    with pytest.raises(ZeroDivisionError):
        future.result()
    assert "in inverse" in "".join(traceback.format_tb(future.traceback()))


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable(x):
    raise Unpicklable()


def test_exception_that_cannot_travel_is_reported_as_text(client, executor):
    with ffd.isolated(executor):
        future = client.submit(raise_unpicklable, 0, pure=False)
    with pytest.raises(Exception, match="Unpicklable: holds a lock") as info:
        future.result()
    assert "in raise_unpicklable" in str(info.value)


def test_unpicklable_result_is_the_tasks_error(client, executor):
    with ffd.isolated(executor):
        future = client.submit(return_lock, 0, pure=False)
    with pytest.raises(TypeError, match="cannot be sent back from its process"):
        future.result()


def test_retries_run_a_crashed_task_again(client, executor, tmp_path):
    with ffd.isolated(executor):
        future = client.submit(segfault_once, str(tmp_path / "crashed"), retries=1,
                               pure=False)
    assert future.result() == "ok"


def test_timeout_stops_the_child(client, executor, pid_pipe):
    with ffd.isolated(executor, timeout=1):
        future = client.submit(report_pid_then_block, pid_pipe.path, pure=False)
    [pid] = pid_pipe.read([future])
    with pytest.raises(fastfork.ChildTimeout) as info:
        future.result()
    assert info.value.timed_out and info.value.pid == pid
    assert procutil.wait_ended([pid]) == []


def test_memory_limit_is_the_tasks_memory_error(client, executor):
    before = worker_pids(client)
    with ffd.isolated(executor, memory_limit="64 MiB"):
        too_big = client.submit(allocate, 256, pure=False)
        small = client.submit(allocate, 8, pure=False)
    with pytest.raises(MemoryError):
        too_big.result()
    assert small.result() == 8 << 20
    assert worker_pids(client) == before


def test_worker_memory_stays_flat_after_leaking_tasks(client, executor):
    address = sorted(worker_pids(client))[0]
    before = client.run(rss_bytes, workers=[address])[address]
    with ffd.isolated(executor):
        futures = client.map(leak, [100] * 4, workers=[address], pure=False)
    assert len(set(client.gather(futures))) == 4
    growth = client.run(rss_bytes, workers=[address])[address] - before
    # The tasks held 400 MiB in all; the worker may vary by a few MiB of its own.
    assert growth < 64 << 20, f"the worker grew by {growth >> 20} MiB"


# ---------------------------------------------------------------- worker shutdown

# A worker's restart takes an interpreter start and Dask's import: long on a busy
# machine. One restart (and one kill) covers both modes: a task of each is running.

def block_in_both_modes(client, address, pid_pipe):
    """One blocking task per mode on ``address``; return their pids once both run."""
    futures = []
    for name in MODES.values():
        with ffd.isolated(name):
            futures.append(client.submit(report_pid_then_block, pid_pipe.path,
                                         workers=[address], pure=False))
    pids = pid_pipe.read(futures)
    client.cancel(futures)  # not to run again elsewhere; they keep running here
    assert all(procutil.state(pid) not in (None, "Z") for pid in pids)
    return pids


@pytest.mark.timeout(600)
def test_restarted_worker_leaves_no_task_process(client, pid_pipe):
    """A worker closed mid-task stops its task processes; its replacement gets the plugins."""
    address = sorted(worker_pids(client))[0]
    pids = block_in_both_modes(client, address, pid_pipe)
    client.restart_workers([address])
    assert procutil.wait_ended(pids) == []
    wait_for_replacement(client, address)
    workers = set(worker_pids(client).values())
    for name in MODES.values():
        with ffd.isolated(name):
            new = client.map(task_pid, range(4), pure=False)
        assert not workers & set(client.gather(new))


@pytest.mark.timeout(600)
def test_killed_worker_takes_its_task_processes_along(client, pid_pipe):
    before = worker_pids(client)
    address = sorted(before)[0]
    pids = block_in_both_modes(client, address, pid_pipe)
    os.kill(before[address], signal.SIGKILL)
    assert procutil.wait_ended(pids) == []
    wait_for_replacement(client, address)


# ---------------------------------------------------------------- many tasks

@pytest.mark.timeout(1800)
@pytest.mark.parametrize("n", [100, pytest.param(10_000, marks=pytest.mark.soak)])
def test_many_tiny_tasks(client, executor, n):
    with ffd.isolated(executor):
        futures = client.map(square, range(n), pure=False)
    assert client.gather(futures) == [i * i for i in range(n)]


# ---------------------------------------------------------------- fastfork.dask.map

def test_map_returns_results_in_input_order(client):
    assert ffd.map(square, range(20), client=client) == [i * i for i in range(20)]
    assert ffd.map(square, [], client=client) == []


def test_map_installs_its_plugin(client):
    name = "fastfork-map-test"
    try:
        assert ffd.map(task_pid, range(2), client=client, name=name)
        assert all(name in names for names in client.run(executor_names).values())
    finally:
        client.unregister_worker_plugin(name)
    assert not any(name in names for names in client.run(executor_names).values())


def test_map_error_names_item_pid_worker_and_traceback(client):
    with pytest.raises(fastfork.ChildError) as info:
        ffd.map(inverse, [1, 0, 2], client=client)
    err = info.value
    assert err.index == 1 and err.item == "0"
    assert err.exc_type == "ZeroDivisionError"
    assert "in inverse" in err.remote_traceback
    assert err.message.startswith(f"child {err.pid} (item 1: 0; worker tcp://")
    assert ", host " in err.message and "raised: ZeroDivisionError" in err.message
    assert err.pid not in worker_pids(client).values()


def test_map_return_exceptions_keeps_each_error_in_place(client):
    results = ffd.map(segfault_or_square, [2, -1, 3], client=client, return_exceptions=True)
    assert results[0] == 4 and results[2] == 9
    err = results[1]
    assert isinstance(err, fastfork.ChildError)
    assert err.index == 1 and err.item == "-1" and err.signal == signal.SIGSEGV
    assert err.message.startswith(f"child {err.pid} (item 1: -1; worker tcp://")


def segfault_or_square(x):
    if x < 0:
        ctypes.string_at(0)
    return x * x


def test_map_timeout_applies_to_each_item(client, pid_pipe):
    results = ffd.map(report_pid_then_block, [pid_pipe.path], client=client, timeout=1,
                      return_exceptions=True)
    [err] = results
    assert isinstance(err, fastfork.ChildTimeout) and err.index == 0
    assert procutil.wait_ended([err.pid]) == []
