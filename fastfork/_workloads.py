"""The benchmark workloads, shared by ``fastfork bench`` and ``bench/`` (pytest-benchmark).

Each ``Method`` creates ``n`` children one way; ``measure(method, n)`` runs it
once and returns the elapsed seconds of the timed part only (setup such as
making the zombies of the reap workload is not timed). Both front ends call
these same functions, so they measure the same thing.

Every fan-out method (``fanout``, ``startup``, the ``jobs=2`` exec methods)
keeps at most ``jobs`` children alive at once, waiting for the oldest before
starting the next, so they are compared like for like.
"""
import collections
import concurrent.futures
import dataclasses
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import time

import fastfork
from fastfork import _core

JOBS = os.cpu_count() or 1
TRUE = "/bin/true"
# Python source of the short task of the start-up workload (also run by `python -c`).
TASK_SOURCE = "sum(range(1000))"
MODES = ("quick", "default", "full")


def _noop(i):
    """The child's work in the fan-out workload: nothing."""
    return None


def _task(i):
    """The child's work in the start-up workload: a short piece of Python."""
    return sum(range(1000))


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of creating the children of a workload.

    ``run(n, *state)`` is the timed part; ``prepare(n) -> state`` (a tuple)
    and ``cleanup(*state)`` run untimed around it. ``requires`` names the
    attributes (``"fastfork.map"``, ``"_core._c_fork_exit_loop"``) the method
    needs; it is skipped when one is missing.
    """

    name: str
    kind: str  # "fastfork", "stdlib" or "limit" (the same loop done in C)
    run: object
    prepare: object = None
    cleanup: object = None
    requires: tuple = ()
    min_python: tuple = ()
    slow: bool = False  # outside "full" mode, run only at the workload's smallest N


@dataclasses.dataclass(frozen=True)
class Workload:
    """A workload: what is measured, its stdlib baseline and the sizes per mode.

    ``sizes[mode]`` are the numbers of children for the small parent,
    ``big_sizes[mode]`` those for the big parent (smaller where every child
    pays the big parent's fork cost).
    """

    key: str
    title: str
    baseline: str
    methods: tuple
    sizes: dict
    big_sizes: dict

    def method(self, name):
        """Return the method called ``name``; KeyError if there is none."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)


# ---------------------------------------------------------------- helpers

def _window(n, jobs, start, finish):
    """Start ``n`` children with ``start(i)``, at most ``jobs`` alive, ``finish`` each."""
    alive = collections.deque()
    try:
        for i in range(n):
            if len(alive) >= jobs:
                finish(alive.popleft())
            alive.append(start(i))
    finally:
        while alive:
            finish(alive.popleft())


def _fork_run(fn, i):
    """os.fork a child that runs ``fn(i)`` and always ``os._exit``s; return its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(i)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    return pid


def _os_wait(pid):
    os.waitpid(pid, 0)


def _forkserver_ready(n):
    # The forkserver is started once and then reused, like a fork server: not timed.
    multiprocessing.forkserver.ensure_running()
    return ()


def _reap_quietly(pids):
    """Reap whatever of ``pids`` is still a child of ours (after a failed round)."""
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def resolve(path):
    """Return the object named by ``path`` ("fastfork.map", "_core.x"), or None."""
    head, _, rest = path.partition(".")
    obj = {"fastfork": fastfork, "_core": _core}[head]
    for part in rest.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def unavailable(method):
    """Return why ``method`` cannot run here (a short reason), or None if it can."""
    for need in method.requires:
        if resolve(need) is None:
            return f"{need} not available yet"
    if method.min_python and sys.version_info < method.min_python:
        return "needs Python " + ".".join(map(str, method.min_python)) + "+"
    return None


def measure(method, n):
    """Run ``method`` once with ``n`` children; return the seconds of its timed part.

    Raises whatever the method raises (after cleaning up its children).
    """
    state = method.prepare(n) if method.prepare else ()
    try:
        t0 = time.perf_counter()
        method.run(n, *state)
        return time.perf_counter() - t0
    finally:
        if method.cleanup:
            method.cleanup(*state)


def allocate_parent(mib):
    """Return a bytearray of ``mib`` MiB with every page written (private, resident)."""
    # bytearray * n of a 1-byte bytearray is one memset: every page is touched.
    return bytearray(b"\x5a") * (mib << 20)


def rss_mib():
    """Resident set size of this process in MiB (from /proc/self/statm; 0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- 1. fork + exit + reap

def _fork_os(n):
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def _fork_fastfork(n):
    fork, waitpid, _exit = fastfork.fork, fastfork.waitpid, fastfork._exit
    for _ in range(n):
        pid = fork()
        if pid == 0:
            _exit(0)
        waitpid(pid, 0)


def _fork_c(n):
    _core._c_fork_exit_loop(n)


FORK = Workload(
    key="fork", title="fork + exit + reap, one child at a time", baseline="os.fork",
    methods=(
        Method("os.fork", "stdlib", _fork_os),
        Method("fastfork.fork", "fastfork", _fork_fastfork, requires=("fastfork.fork",)),
        Method("C limit", "limit", _fork_c, requires=("_core._c_fork_exit_loop",)),
    ),
    sizes={"quick": (50,), "default": (300,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (30,), "full": (50,)},
)


# ---------------------------------------------------------------- 2. reap exited children

def _make_zombies(n):
    """Fork ``n`` children that exit at once; return (pids,) once all have exited."""
    pids = []
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            # WNOWAIT: wait until it has exited, but leave it to be reaped (waitid(2)).
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except BaseException:
        _reap_quietly(pids)
        raise
    return (pids,)


def _reap_os(n, pids):
    for pid in pids:
        os.waitpid(pid, 0)


def _reap_fastfork(n, pids):
    fastfork.reap(pids)


def _reap_c(n, pids):
    _core._c_waitpid_loop(pids)


REAP = Workload(
    key="reap", title="reap N already-exited children", baseline="os.waitpid loop",
    methods=(
        Method("os.waitpid loop", "stdlib", _reap_os, _make_zombies, _reap_quietly),
        Method("fastfork.reap", "fastfork", _reap_fastfork, _make_zombies, _reap_quietly,
               requires=("fastfork.reap",)),
        Method("C limit", "limit", _reap_c, _make_zombies, _reap_quietly,
               requires=("_core._c_waitpid_loop",)),
    ),
    sizes={"quick": (100,), "default": (500,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (30,), "full": (50,)},
)


# ---------------------------------------------------------------- 3. fan-out of Python no-ops

def _fanout_fastfork(n):
    fastfork.map(_noop, range(n), jobs=JOBS)


def _fanout_os(n):
    _window(n, JOBS, lambda i: _fork_run(_noop, i), _os_wait)


def _mp_process_window(ctx, fn, n):
    def start(i):
        p = ctx.Process(target=fn, args=(i,))
        p.start()
        return p
    _window(n, JOBS, start, lambda p: p.join())


def _fanout_mp(n):
    _mp_process_window(multiprocessing.get_context("fork"), _noop, n)


def _fanout_c(n):
    _core._c_fork_exit_loop(n, JOBS)


def _fanout_pool(n):
    # max_tasks_per_child refuses the fork context (its worker threads would be
    # forked); forkserver is the fastest context it accepts.
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=JOBS, mp_context=multiprocessing.get_context("forkserver"),
            max_tasks_per_child=1) as pool:
        for _ in pool.map(_noop, range(n)):
            pass


FANOUT = Workload(
    key="fanout", title=f"fan-out of N Python no-op children (jobs={JOBS})",
    baseline="os.fork loop",
    methods=(
        Method("os.fork loop", "stdlib", _fanout_os),
        Method("fastfork.map", "fastfork", _fanout_fastfork, requires=("fastfork.map",)),
        Method("multiprocessing.Process", "stdlib", _fanout_mp),
        # The children run no Python at all: what is left is the kernel's fork and exit.
        Method("C limit", "limit", _fanout_c, requires=("_core._c_fork_exit_loop",)),
        Method("ProcessPoolExecutor(max_tasks_per_child=1)", "stdlib", _fanout_pool,
               _forkserver_ready, min_python=(3, 11), slow=True),
    ),
    sizes={"quick": (100,), "default": (100, 1000), "full": (100, 1000)},
    big_sizes={"quick": (5,), "default": (30,), "full": (100,)},
)


# ---------------------------------------------------------------- 4. exec fan-out of /bin/true

def _popen(i):
    return subprocess.Popen([TRUE])


def _exec_popen(n):
    for _ in range(n):
        subprocess.Popen([TRUE]).wait()


def _exec_popen2(n):
    _window(n, 2, _popen, lambda p: p.wait())


def _exec_run(n):
    for _ in range(n):
        subprocess.run([TRUE])


def _exec_posix_spawn(n):
    env = os.environ
    for _ in range(n):
        os.waitpid(os.posix_spawn(TRUE, [TRUE], env), 0)


def _exec_fork_execv(n):
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(TRUE, [TRUE])
            finally:
                os._exit(127)
        os.waitpid(pid, 0)


def _exec_spawn(n):
    spawn = fastfork.spawn
    for _ in range(n):
        spawn([TRUE]).wait()


def _exec_spawn_many(n):
    fastfork.spawn_many([[TRUE]] * n, jobs=1)


def _exec_spawn_many2(n):
    fastfork.spawn_many([[TRUE]] * n, jobs=2)


def _exec_c(n):
    _core._c_spawn_loop(n)


EXEC = Workload(
    key="exec", title=f"exec fan-out: spawn and reap {TRUE}", baseline="subprocess.Popen+wait",
    methods=(
        Method("subprocess.Popen+wait", "stdlib", _exec_popen),
        Method("fastfork.spawn", "fastfork", _exec_spawn, requires=("fastfork.spawn",)),
        Method("fastfork.spawn_many", "fastfork", _exec_spawn_many,
               requires=("fastfork.spawn_many",)),
        Method("subprocess.run", "stdlib", _exec_run),
        Method("os.posix_spawn+waitpid", "stdlib", _exec_posix_spawn),
        Method("os.fork+execv+waitpid", "stdlib", _exec_fork_execv),
        Method("C limit", "limit", _exec_c, requires=("_core._c_spawn_loop",)),
        Method("subprocess.Popen jobs=2", "stdlib", _exec_popen2),
        Method("fastfork.spawn_many jobs=2", "fastfork", _exec_spawn_many2,
               requires=("fastfork.spawn_many",)),
    ),
    sizes={"quick": (50,), "default": (300,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (50,), "full": (100,)},
)


# ---------------------------------------------------------------- 5. per-task start-up

def _startup_fork(n):
    _window(n, JOBS, lambda i: _fork_run(_task, i), _os_wait)


def _startup_map(n):
    fastfork.map(_task, range(n), jobs=JOBS)


def _startup_python(n):
    cmd = [sys.executable, "-c", TASK_SOURCE]
    _window(n, JOBS, lambda i: subprocess.Popen(cmd), lambda p: p.wait())


def _startup_spawn(n):
    _mp_process_window(multiprocessing.get_context("spawn"), _task, n)


def _startup_forkserver(n):
    _mp_process_window(multiprocessing.get_context("forkserver"), _task, n)


def _server_prepare(n):
    server = fastfork.ForkServer(preload=("fastfork._workloads",))
    try:
        server.map(_noop, range(1), jobs=1)  # make sure it has started: not timed
    except BaseException:
        server.close()
        raise
    return (server,)


def _startup_server(n, server):
    server.map(_task, range(n), jobs=JOBS)


def _server_close(server):
    server.close()


STARTUP = Workload(
    key="startup", title=f"per-task start-up of a short Python task (jobs={JOBS})",
    baseline="python -c (subprocess)",
    methods=(
        Method("python -c (subprocess)", "stdlib", _startup_python),
        Method("os.fork per task", "stdlib", _startup_fork),
        Method("fastfork.map", "fastfork", _startup_map, requires=("fastfork.map",)),
        Method("fastfork.ForkServer.map", "fastfork", _startup_server, _server_prepare,
               _server_close, requires=("fastfork.ForkServer",)),
        Method("multiprocessing forkserver", "stdlib", _startup_forkserver, _forkserver_ready),
        Method("multiprocessing spawn", "stdlib", _startup_spawn),
    ),
    sizes={"quick": (4,), "default": (20,), "full": (50,)},
    big_sizes={"quick": (4,), "default": (20,), "full": (50,)},
)


# ---------------------------------------------------------------- 6. data held in shared memory

def _touch(buf):
    """Write every page of ``buf`` so that it is resident; return ``buf``."""
    chunk = b"\x5a" * (1 << 20)
    with memoryview(buf) as view:
        for off in range(0, len(view), len(chunk)):
            view[off:off + len(chunk)] = chunk[:len(view) - off]
    return buf


def _close_buffer(buf):
    if hasattr(buf, "close"):
        buf.close()


def memory_workload(mib):
    """The fork cost of a parent holding ``mib`` MiB of data, by kind of memory.

    Each method allocates and touches its buffer untimed, then forks, exits
    and reaps ``n`` children one at a time with fastfork.fork.
    """
    size = mib << 20

    def holding(make):
        return lambda n: (make(),)

    def run(n, buf):
        _fork_fastfork(n)

    return Workload(
        key="memory", title=f"fork + exit + reap with {mib} MiB of data in the parent",
        baseline="bytearray",
        methods=(
            Method("bytearray", "stdlib", run, holding(lambda: allocate_parent(mib)),
                   _close_buffer),
            Method("fastfork.SharedBuffer", "fastfork", run,
                   holding(lambda: _touch(fastfork.SharedBuffer(size))), _close_buffer,
                   requires=("fastfork.SharedBuffer",)),
            Method("fastfork.PrivateBuffer (huge pages)", "fastfork", run,
                   holding(lambda: _touch(fastfork.PrivateBuffer(size))), _close_buffer,
                   requires=("fastfork.PrivateBuffer",)),
        ),
        # Run from the small parent only: the buffer is the big memory.
        sizes={"quick": (), "default": (10,), "full": (30,)},
        big_sizes={"quick": (), "default": (), "full": ()},
    )


# ---------------------------------------------------------------- 7. many tiny tasks

TASK_WORKERS = 2
CHUNK = 100


def _tiny(i):
    """The work of one task in the tiny-tasks workload: next to nothing."""
    return i * i


def _tiny_map(n):
    fastfork.map(_tiny, range(n), jobs=TASK_WORKERS)


def _tiny_map_chunked(n):
    fastfork.map(_tiny, range(n), jobs=TASK_WORKERS, chunksize=CHUNK)


def _tiny_pool(n):
    with multiprocessing.Pool(TASK_WORKERS) as pool:
        pool.map(_tiny, range(n))


def _tiny_executor(chunksize):
    def run(n):
        with concurrent.futures.ProcessPoolExecutor(TASK_WORKERS) as pool:
            for _ in pool.map(_tiny, range(n), chunksize=chunksize):
                pass
    return run


TINY = Workload(
    key="tiny", title=f"N tiny tasks, {TASK_WORKERS} at a time (rate: tasks/s; "
                      "pool and executor start-up timed)",
    baseline=f"multiprocessing.Pool({TASK_WORKERS}).map",
    methods=(
        Method(f"multiprocessing.Pool({TASK_WORKERS}).map", "stdlib", _tiny_pool),
        Method(f"fastfork.map chunksize={CHUNK}", "fastfork", _tiny_map_chunked,
               requires=("fastfork.map",)),
        Method(f"ProcessPoolExecutor({TASK_WORKERS}).map chunksize={CHUNK}", "stdlib",
               _tiny_executor(CHUNK)),
        # A child (or a pickled round trip) per task: measured at the smallest N
        # outside --full.
        Method("fastfork.map", "fastfork", _tiny_map, requires=("fastfork.map",), slow=True),
        Method(f"ProcessPoolExecutor({TASK_WORKERS}).map", "stdlib", _tiny_executor(1),
               slow=True),
    ),
    sizes={"quick": (500,), "default": (500, 5000), "full": (500, 5000)},
    # From the big parent every child (fastfork.map: one per task) pays its fork.
    big_sizes={"quick": (), "default": (), "full": (500,)},
)


MEMORY = memory_workload(1024)
WORKLOADS = {w.key: w for w in (FORK, REAP, FANOUT, EXEC, STARTUP, TINY, MEMORY)}


# ---------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from the issues: ``method`` / ``versus`` throughput must reach ``goal``.

    Each side is (workload, method, parent) with parent "small" or "big";
    ``versus`` None means ``method`` itself from the other parent size.
    """

    name: str
    workload: str
    method: str
    parent: str
    versus: str
    versus_parent: str
    goal: float
    goal_text: str


TARGETS = (
    Target("reap vs os.waitpid loop", "reap", "fastfork.reap", "small",
           "os.waitpid loop", "small", 2.0, ">= 2x"),
    Target("fork vs os.fork (parity)", "fork", "fastfork.fork", "small",
           "os.fork", "small", 0.9, ">= 0.9x"),
    Target("map vs os.fork loop", "fanout", "fastfork.map", "small",
           "os.fork loop", "small", 0.9, ">= 0.9x"),
    Target("map vs multiprocessing.Process", "fanout", "fastfork.map", "small",
           "multiprocessing.Process", "small", 2.0, ">= 2x"),
    Target("spawn vs subprocess.Popen", "exec", "fastfork.spawn", "small",
           "subprocess.Popen+wait", "small", 1.1, ">= 1.1x"),
    Target("spawn vs C limit", "exec", "fastfork.spawn", "small",
           "C limit", "small", 0.9, ">= 0.9x"),
    Target("spawn: big parent vs small parent", "exec", "fastfork.spawn", "big",
           "fastfork.spawn", "small", 0.9, ">= 0.9x"),
    Target("spawn vs os.fork+execv, big parent", "exec", "fastfork.spawn", "big",
           "os.fork+execv+waitpid", "big", 30.0, ">= 30x"),
    Target("ForkServer.map vs fastfork.map, big parent", "startup",
           "fastfork.ForkServer.map", "big", "fastfork.map", "big", 20.0, ">= 20x"),
    Target("ForkServer.map vs mp forkserver, big parent", "startup",
           "fastfork.ForkServer.map", "big", "multiprocessing forkserver", "big", 3.0, ">= 3x"),
    Target("ForkServer.map vs python -c, big parent", "startup",
           "fastfork.ForkServer.map", "big", "python -c (subprocess)", "big", 20.0, ">= 20x"),
    Target("fork with data in SharedBuffer vs bytearray", "memory",
           "fastfork.SharedBuffer", "small", "bytearray", "small", 30.0, ">= 30x"),
)


# ---------------------------------------------------------------- 7. a fresh process per task, via an executor

def _executor_prepare(make):
    """prepare(n) -> (executor, server or None): made and warmed up (one task), untimed."""
    def prepare(n):
        executor, server = make()
        try:
            executor.submit(_noop, 0).result()
        except BaseException:
            _executor_cleanup(executor, server)
            raise
        return executor, server
    return prepare


def _executor_map(n, executor, server):
    for _ in executor.map(_noop, range(n)):
        pass


def _executor_cleanup(executor, server):
    executor.shutdown()
    if server is not None:
        server.close()


def _fork_executor():
    return fastfork.ForkExecutor(JOBS), None


def _fork_executor_server():
    server = fastfork.ForkServer(preload=("fastfork._workloads",)).open()
    return server.executor(JOBS), server


def _pool_per_task():
    # max_tasks_per_child refuses the fork context; forkserver is its fastest.
    return concurrent.futures.ProcessPoolExecutor(
        JOBS, mp_context=multiprocessing.get_context("forkserver"), max_tasks_per_child=1), None


def _pool_reused():
    return concurrent.futures.ProcessPoolExecutor(JOBS), None


def _executor_fastfork_map(n):
    fastfork.map(_noop, range(n), jobs=JOBS)


EXECUTOR = Workload(
    key="executor", title=f"fresh process per task, N tiny tasks via an executor (workers={JOBS})",
    baseline="ProcessPoolExecutor(max_tasks_per_child=1)",
    methods=(
        Method("ProcessPoolExecutor(max_tasks_per_child=1)", "stdlib", _executor_map,
               _executor_prepare(_pool_per_task), _executor_cleanup, min_python=(3, 11),
               slow=True),
        Method("fastfork.ForkExecutor", "fastfork", _executor_map,
               _executor_prepare(_fork_executor), _executor_cleanup,
               requires=("fastfork.ForkExecutor",)),
        Method("fastfork.ForkExecutor (server)", "fastfork", _executor_map,
               _executor_prepare(_fork_executor_server), _executor_cleanup,
               requires=("fastfork.ForkExecutor",)),
        Method("fastfork.map", "fastfork", _executor_fastfork_map, requires=("fastfork.map",)),
        # Not a process per task: the same workers run every task.
        Method("ProcessPoolExecutor() reused", "stdlib", _executor_map,
               _executor_prepare(_pool_reused), _executor_cleanup),
    ),
    sizes={"quick": (20,), "default": (200,), "full": (500,)},
    big_sizes={"quick": (4,), "default": (20,), "full": (50,)},
)
WORKLOADS[EXECUTOR.key] = EXECUTOR

TARGETS += (
    Target("ForkExecutor vs PPE(max_tasks_per_child=1)", "executor", "fastfork.ForkExecutor",
           "small", "ProcessPoolExecutor(max_tasks_per_child=1)", "small", 10.0, ">= 10x"),
    Target("ForkExecutor vs fastfork.map (per task <= 1.3x)", "executor",
           "fastfork.ForkExecutor", "small", "fastfork.map", "small", 1 / 1.3, ">= 0.77x"),
    Target("ForkExecutor vs fastfork.map, big parent", "executor", "fastfork.ForkExecutor",
           "big", "fastfork.map", "big", 1 / 1.3, ">= 0.77x"),
    Target("ForkExecutor: server vs caller, big parent", "executor",
           "fastfork.ForkExecutor (server)", "big", "fastfork.ForkExecutor", "big", 15.0,
           ">= 15x"),
)
