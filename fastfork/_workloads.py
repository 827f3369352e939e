"""The benchmark workloads, shared by ``fastfork bench`` and ``bench/`` (pytest-benchmark).

Each ``Method`` creates ``n`` children one way; ``measure(method, n)`` runs it
once and returns the elapsed seconds of the timed part only (setup such as
making the zombies of the reap workload is not timed). Both front ends call
these same functions, so they measure the same thing.

Every fan-out method (``fanout``, ``startup``, the ``jobs=2`` exec methods)
keeps at most ``jobs`` children alive at once, waiting for the oldest before
starting the next, so they are compared like for like.
"""
import asyncio
import collections
import concurrent.futures
import dataclasses
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import statistics
import subprocess
import sys
import time

import fastfork
import fastfork.aio
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
    and ``cleanup(*state)`` run untimed around it. With ``reports_time``,
    ``run`` returns the seconds to count itself (what the children measured,
    e.g. an import time) instead of being timed whole.
    """

    name: str
    kind: str  # "fastfork", "stdlib" or "limit" (the same loop done in C)
    run: object
    prepare: object = None
    cleanup: object = None
    min_python: tuple = ()
    slow: bool = False  # outside "full" mode, run only at the workload's smallest N
    reports_time: bool = False


@dataclasses.dataclass(frozen=True)
class Workload:
    """A workload: what is measured, its stdlib baseline and the sizes per mode.

    ``sizes[mode]`` are the numbers of children for the small parent,
    ``big_sizes[mode]`` those for the big parent (smaller where every child
    pays the big parent's fork cost). ``headline`` is the fastfork method
    whose ratio to the baseline sums the group up, ``expect`` what to expect
    of that ratio and why, in a few words for the reader of the table.
    """

    key: str
    title: str
    baseline: str
    methods: tuple
    sizes: dict
    big_sizes: dict
    headline: str = ""
    expect: str = ""

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


def unavailable(method):
    """Return why ``method`` cannot run here (a short reason), or None if it can."""
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
        reported = method.run(n, *state)
        elapsed = time.perf_counter() - t0
        return reported if method.reports_time else elapsed
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
        Method("fastfork.fork", "fastfork", _fork_fastfork),
        Method("C limit", "limit", _fork_c),
    ),
    sizes={"quick": (50,), "default": (300,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (30,), "full": (50,)},
    headline="fastfork.fork",
    expect="about 1x is expected: the same kernel fork() between the same interpreter hooks",
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
        Method("fastfork.reap", "fastfork", _reap_fastfork, _make_zombies, _reap_quietly),
        Method("C limit", "limit", _reap_c, _make_zombies, _reap_quietly),
    ),
    sizes={"quick": (100,), "default": (500,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (30,), "full": (50,)},
    headline="fastfork.reap",
    expect="about 1x is expected: each child is one kernel waitpid either way",
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
        Method("fastfork.map", "fastfork", _fanout_fastfork),
        Method("multiprocessing.Process", "stdlib", _fanout_mp),
        # The children run no Python at all: what is left is the kernel's fork and exit.
        Method("C limit", "limit", _fanout_c),
        Method("ProcessPoolExecutor(max_tasks_per_child=1)", "stdlib", _fanout_pool,
               _forkserver_ready, min_python=(3, 11), slow=True),
    ),
    sizes={"quick": (100,), "default": (100, 1000), "full": (100, 1000)},
    big_sizes={"quick": (5,), "default": (30,), "full": (100,)},
    headline="fastfork.map",
    expect="about 1x is expected: both pay one kernel fork per child",
)


# ---------------------------------------------------------------- 4. exec fan-out of /bin/true

def _popen(i):
    return subprocess.Popen([TRUE])


def _exec_popen(n):
    for _ in range(n):
        subprocess.Popen([TRUE]).wait()


def _exec_popen2(n):
    _window(n, 2, _popen, lambda p: p.wait())


def _popen_wait(i):
    return subprocess.Popen([TRUE]).wait()


def _exec_popen_threads(n):
    """Popen+wait from 2 threads (at most 2 commands alive, as with jobs=2)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in pool.map(_popen_wait, range(n)):
            pass


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
        Method("fastfork.spawn", "fastfork", _exec_spawn),
        Method("fastfork.spawn_many", "fastfork", _exec_spawn_many),
        Method("subprocess.run", "stdlib", _exec_run),
        Method("os.posix_spawn+waitpid", "stdlib", _exec_posix_spawn),
        Method("os.fork+execv+waitpid", "stdlib", _exec_fork_execv),
        Method("C limit", "limit", _exec_c),
        Method("subprocess.Popen jobs=2", "stdlib", _exec_popen2),
        Method("subprocess.Popen+wait, 2 threads", "stdlib", _exec_popen_threads),
        Method("fastfork.spawn_many jobs=2", "fastfork", _exec_spawn_many2),
    ),
    sizes={"quick": (50,), "default": (300,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (50,), "full": (100,)},
    headline="fastfork.spawn",
    expect="1x or a little above is expected: both create the child vfork-style, "
           "the C limit is the ceiling",
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


# A fresh interpreter as small as a fork server (it imports what the server
# preloads) that runs fastfork.map on each line "N" and answers "done": the
# fastest a fork server's children can start, whatever the caller's size.
_SMALL_MAP = """
import sys
import fastfork
from fastfork import _workloads as W
print("ready", flush=True)
for line in sys.stdin:
    fastfork.map(W._task, range(int(line)), jobs=W.JOBS)
    print("done", flush=True)
"""


def _small_map_prepare(n):
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastfork.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", _SMALL_MAP], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if proc.stdout.readline().strip() != "ready":
        _small_map_close(proc)
        raise RuntimeError("the small process running fastfork.map did not start")
    return (proc,)


def _small_map(n, proc):
    proc.stdin.write(f"{n}\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "done":
        raise RuntimeError("the small process running fastfork.map failed")


def _small_map_close(proc):
    proc.stdin.close()
    proc.stdout.close()
    proc.wait(60)


STARTUP = Workload(
    key="startup", title=f"per-task start-up of a short Python task (jobs={JOBS})",
    baseline="python -c (subprocess)",
    methods=(
        Method("python -c (subprocess)", "stdlib", _startup_python),
        Method("os.fork per task", "stdlib", _startup_fork),
        Method("fastfork.map", "fastfork", _startup_map),
        Method("fastfork.ForkServer.map", "fastfork", _startup_server, _server_prepare,
               _server_close),
        # What a fork server cannot beat: the same map run by a process of its size.
        Method("fastfork.map in a small process", "limit", _small_map, _small_map_prepare,
               _small_map_close),
        Method("multiprocessing forkserver", "stdlib", _startup_forkserver, _forkserver_ready),
        Method("multiprocessing spawn", "stdlib", _startup_spawn),
    ),
    sizes={"quick": (4,), "default": (20,), "full": (50,)},
    big_sizes={"quick": (4,), "default": (20,), "full": (50,)},
    headline="fastfork.ForkServer.map",
    expect="far above 1x is expected: its children fork from a small server, "
           "no interpreter starts",
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
                   holding(lambda: _touch(fastfork.SharedBuffer(size))), _close_buffer),
            Method("fastfork.PrivateBuffer (huge pages)", "fastfork", run,
                   holding(lambda: _touch(fastfork.PrivateBuffer(size))), _close_buffer),
        ),
        # Run from the small parent only: the buffer is the big memory.
        sizes={"quick": (), "default": (10,), "full": (30,)},
        big_sizes={"quick": (), "default": (), "full": ()},
        headline="fastfork.SharedBuffer",
        expect="far above 1x is expected: fork does not copy shared memory's page tables",
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
        Method(f"fastfork.map chunksize={CHUNK}", "fastfork", _tiny_map_chunked),
        Method(f"ProcessPoolExecutor({TASK_WORKERS}).map chunksize={CHUNK}", "stdlib",
               _tiny_executor(CHUNK)),
        # A child (or a pickled round trip) per task: measured at the smallest N
        # outside --full.
        Method("fastfork.map", "fastfork", _tiny_map, slow=True),
        Method(f"ProcessPoolExecutor({TASK_WORKERS}).map", "stdlib", _tiny_executor(1),
               slow=True),
    ),
    sizes={"quick": (500,), "default": (500, 5000), "full": (500, 5000)},
    # From the big parent every child (fastfork.map: one per task) pays its fork.
    big_sizes={"quick": (), "default": (), "full": (500,)},
)


MEMORY = memory_workload(1024)


# ---------------------------------------------------------------- 8. import time

def _import_seconds(module):
    """Import ``module`` in a fresh interpreter; return the seconds it reports taking.

    The figure is the import's cumulative time from ``python -X importtime``:
    what the import costs, without the interpreter's own start-up.
    Raises RuntimeError if the interpreter fails or reports no such import.
    """
    # The child must import the fastfork measured here, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastfork.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"python -c 'import {module}' failed: {proc.stderr.strip()}")
    for line in proc.stderr.splitlines():
        # "import time: <self us> | <cumulative us> | <indented module name>"
        fields = line.split("|")
        if len(fields) == 3 and fields[2].strip() == module:
            return int(fields[1]) / 1e6
    raise RuntimeError(f"python -X importtime reported no import of {module} "
                       "(was it imported at start-up?)")


def _import_method(module, kind):
    def run(n):
        # n times the median: one slow interpreter does not move the figure.
        return n * statistics.median(_import_seconds(module) for _ in range(n))
    return Method(f"import {module}", kind, run, reports_time=True)


IMPORT = Workload(
    key="import", title="import in a fresh interpreter (-X importtime); a child is one import",
    baseline="import subprocess",
    methods=(_import_method("subprocess", "stdlib"), _import_method("fastfork", "fastfork")),
    sizes={"quick": (5,), "default": (20,), "full": (50,)},
    big_sizes={"quick": (), "default": (), "full": ()},
    headline="import fastfork",
    expect="above 1x means faster: fastfork loads its parts on first use",
)

WORKLOADS = {w.key: w for w in (FORK, REAP, FANOUT, EXEC, STARTUP, TINY, MEMORY, IMPORT)}


# ---------------------------------------------------------------- scaling: N children at once

SCALING_SLEEP = 1.0  # seconds each child sleeps; the figure is what the run takes beyond it


def _sleep_child(i):
    time.sleep(SCALING_SLEEP)


def _scaling_os(n):
    t0 = time.perf_counter()
    pids = []
    try:
        for i in range(n):
            pids.append(_fork_run(_sleep_child, i))
    finally:
        for pid in pids:
            os.waitpid(pid, 0)
    return time.perf_counter() - t0 - SCALING_SLEEP


def _scaling_map(n):
    t0 = time.perf_counter()
    fastfork.map(_sleep_child, range(n), jobs=n)
    return time.perf_counter() - t0 - SCALING_SLEEP


SCALING = Workload(
    key="scaling",
    title=f"N children alive at once, each sleeping {SCALING_SLEEP} s (rate: N / (wall time "
          f"- {SCALING_SLEEP} s), so 1/rate is the time each child costs beyond its sleep)",
    baseline="os.fork loop + waitpid",
    methods=(
        Method("os.fork loop + waitpid", "stdlib", _scaling_os, reports_time=True),
        Method("fastfork.map", "fastfork", _scaling_map, reports_time=True),
    ),
    sizes={"quick": (100,), "default": (100, 1000), "full": (100, 1000, 5000)},
    # Every child of a 1 GiB parent pays its fork: thousands of them take minutes.
    big_sizes={"quick": (), "default": (), "full": ()},
    headline="fastfork.map",
    expect="about 1x at small N; at large N every fork also copies the parent's table of "
           "open files, where fastfork keeps 1 per running child (its result pipe)",
)
WORKLOADS[SCALING.key] = SCALING


# ---------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    """A goal the project sets itself: ``method`` / ``versus`` throughput must reach ``goal``.

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
           "subprocess.Popen+wait", "small", 1.0, ">= 1x"),
    Target("spawn vs subprocess.Popen, big parent", "exec", "fastfork.spawn", "big",
           "subprocess.Popen+wait", "big", 1.0, ">= 1x"),
    Target("spawn vs C limit", "exec", "fastfork.spawn", "small",
           "C limit", "small", 0.95, ">= 0.95x"),
    Target("spawn vs C limit, big parent", "exec", "fastfork.spawn", "big",
           "C limit", "big", 0.95, ">= 0.95x"),
    Target("spawn_many jobs=2 vs Popen+wait in 2 threads", "exec",
           "fastfork.spawn_many jobs=2", "small", "subprocess.Popen+wait, 2 threads", "small",
           1.05, ">= 1.05x"),
    Target("spawn: big parent vs small parent", "exec", "fastfork.spawn", "big",
           "fastfork.spawn", "small", 0.9, ">= 0.9x"),
    Target("spawn vs os.fork+execv, big parent", "exec", "fastfork.spawn", "big",
           "os.fork+execv+waitpid", "big", 30.0, ">= 30x"),
    Target("ForkServer.map vs fastfork.map, small parent", "startup",
           "fastfork.ForkServer.map", "small", "fastfork.map", "small", 1 / 1.2, ">= 0.83x"),
    Target("ForkServer.map vs fastfork.map, big parent", "startup",
           "fastfork.ForkServer.map", "big", "fastfork.map", "big", 20.0, ">= 20x"),
    Target("ForkServer.map vs its limit, big parent", "startup",
           "fastfork.ForkServer.map", "big", "fastfork.map in a small process", "big",
           0.8, ">= 0.8x"),
    Target("ForkServer.map vs mp forkserver, big parent", "startup",
           "fastfork.ForkServer.map", "big", "multiprocessing forkserver", "big", 3.0, ">= 3x"),
    Target("ForkServer.map vs python -c, big parent", "startup",
           "fastfork.ForkServer.map", "big", "python -c (subprocess)", "big", 20.0, ">= 20x"),
    Target("fork with data in SharedBuffer vs bytearray", "memory",
           "fastfork.SharedBuffer", "small", "bytearray", "small", 30.0, ">= 30x"),
    Target("import fastfork vs import subprocess", "import", "import fastfork", "small",
           "import subprocess", "small", 1 / 1.5, ">= 0.67x"),
    Target("map vs os.fork loop, N children at once", "scaling", "fastfork.map", "small",
           "os.fork loop + waitpid", "small", 1 / 1.3, ">= 0.77x"),
)


# ---------------------------------------------------------------- 9. fastfork run, the command line
# The runner as users start it (a fresh interpreter, input on stdin), beside xargs -P,
# GNU parallel when it is installed, and the same jobs through spawn_many in-process.
# Every method's stdout goes through a pipe to `cat > /dev/null`, as in `... | consumer`.

RUN_JOBS = 2
RUN_OUTPUT_MIB = 10
_PARALLEL = shutil.which("parallel")
_NO_PARALLEL = "" if _PARALLEL else " (GNU parallel is not installed: not measured)"


def _run_piped(argv, n):
    """Run ``argv`` with items 0..n-1 on stdin, its stdout drained by cat; raise if it fails."""
    items = "".join(f"{i}\n" for i in range(n)).encode()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fastfork.__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as cat:
        try:
            proc = subprocess.run(argv, input=items, stdout=cat.stdin, stderr=subprocess.PIPE,
                                  env=env)
        finally:
            cat.stdin.close()
    if proc.returncode:
        raise RuntimeError(f"{argv[:6]} exited with {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-300:]}")


def _fastfork_run(*options):
    return [sys.executable, "-m", "fastfork", "run", "-j", str(RUN_JOBS), "--quiet",
            "--no-bar", *options, "--"]


def _cli_methods(command, xargs):
    """The methods running ``command`` (argv with {} for the item) once per item.

    ``xargs`` is the xargs command line doing the same.
    """
    methods = [
        Method(f"xargs -P {RUN_JOBS}", "tool",
               lambda n: _run_piped(["xargs", "-P", str(RUN_JOBS), *xargs], n)),
        Method("fastfork run", "fastfork", lambda n: _run_piped(_fastfork_run() + command, n)),
        Method("fastfork run --ungroup", "fastfork",
               lambda n: _run_piped(_fastfork_run("--ungroup") + command, n)),
        Method(f"fastfork.spawn_many(jobs={RUN_JOBS}, capture=True)", "fastfork",
               lambda n: fastfork.spawn_many(
                   [[a.replace("{}", str(i)) for a in command] for i in range(n)],
                   jobs=RUN_JOBS, capture=True)),
    ]
    if _PARALLEL:
        methods.append(Method(f"GNU parallel -j {RUN_JOBS}", "tool", lambda n: _run_piped(
            [_PARALLEL, "--will-cite", "-j", str(RUN_JOBS), *command], n)))
    return tuple(methods)


RUN_TRUE = Workload(
    key="run-true", title=f"fastfork run: N jobs of `true` (-j {RUN_JOBS}){_NO_PARALLEL}",
    baseline=f"xargs -P {RUN_JOBS}",
    methods=_cli_methods([TRUE, "{}"], ["-n", "1", TRUE]),
    sizes={"quick": (200,), "default": (5000,), "full": (5000,)},
    big_sizes={"quick": (), "default": (), "full": ()},
)
RUN_ECHO = Workload(
    key="run-echo", title=f"fastfork run: N jobs of `echo {{}}` (-j {RUN_JOBS}){_NO_PARALLEL}",
    baseline=f"xargs -P {RUN_JOBS}",
    methods=_cli_methods(["echo", "{}"], ["-I", "{}", "echo", "{}"]),
    sizes={"quick": (200,), "default": (5000,), "full": (5000,)},
    big_sizes={"quick": (), "default": (), "full": ()},
)
# Each job writes RUN_OUTPUT_MIB of zeros and takes no item (-n COUNT; xargs -I without {}).
_BIG_OUTPUT = ["head", "-c", str(RUN_OUTPUT_MIB << 20), "/dev/zero"]


def _run_output(*options):
    return lambda n: _run_piped(_fastfork_run("-n", str(n), *options) + _BIG_OUTPUT, n)


RUN_OUTPUT = Workload(
    key="run-output", title=f"fastfork run: N jobs each writing {RUN_OUTPUT_MIB} MiB "
                        f"(-j {RUN_JOBS}){_NO_PARALLEL}",
    baseline="fastfork run --ungroup",
    methods=(
        Method("fastfork run --ungroup", "fastfork", _run_output("--ungroup")),
        Method("fastfork run (grouped)", "fastfork", _run_output()),
        Method("fastfork run --keep-order", "fastfork", _run_output("--keep-order")),
        Method(f"xargs -P {RUN_JOBS}", "tool", lambda n: _run_piped(
            ["xargs", "-P", str(RUN_JOBS), "-I", "{}", *_BIG_OUTPUT], n)),
    ) + ((Method(f"GNU parallel -j {RUN_JOBS}", "tool", lambda n: _run_piped(
        [_PARALLEL, "--will-cite", "-j", str(RUN_JOBS), "-N0", *_BIG_OUTPUT], n)),)
        if _PARALLEL else ()),
    sizes={"quick": (4,), "default": (40,), "full": (100,)},
    big_sizes={"quick": (), "default": (), "full": ()},
)
WORKLOADS.update({w.key: w for w in (RUN_TRUE, RUN_ECHO, RUN_OUTPUT)})
TARGETS += (
    Target("run vs xargs -P 2, `true`", "run-true", "fastfork run", "small",
           f"xargs -P {RUN_JOBS}", "small", 0.9, ">= 0.9x"),
    Target("run vs xargs -P 2, `echo {}`", "run-echo", "fastfork run", "small",
           f"xargs -P {RUN_JOBS}", "small", 0.9, ">= 0.9x"),
    Target("run grouped vs --ungroup, 10 MiB per job", "run-output", "fastfork run (grouped)",
           "small", "fastfork run --ungroup", "small", 1 / 1.2, ">= 0.83x"),
)


# ---------------------------------------------------------------- 10. a process per task, via an executor

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
               _executor_prepare(_fork_executor), _executor_cleanup),
        Method("fastfork.ForkExecutor (server)", "fastfork", _executor_map,
               _executor_prepare(_fork_executor_server), _executor_cleanup),
        Method("fastfork.map", "fastfork", _executor_fastfork_map),
        # Not a process per task: the same workers run every task.
        Method("ProcessPoolExecutor() reused", "stdlib", _executor_map,
               _executor_prepare(_pool_reused), _executor_cleanup),
    ),
    sizes={"quick": (20,), "default": (200,), "full": (500,)},
    big_sizes={"quick": (4,), "default": (20,), "full": (50,)},
    headline="fastfork.ForkExecutor",
    expect="above 1x means faster: a fork per task instead of a pool process per task",
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


# ---------------------------------------------------------------- 11. asyncio: fastfork.aio

AIO_JOBS = 2
TICK = 0.001  # the period of the loop-latency probe, seconds
# How late the 1 ms periodic callback ran in the last run of each loop-latency
# method, by method name: {"max": seconds, "p99": seconds} (read by bench/test_aio.py).
LOOP_DELAYS = {}


def _in_asyncio(make_coro):
    """A Method.run that runs ``make_coro(n)`` on a fresh event loop."""
    return lambda n: asyncio.run(make_coro(n))


async def _windowed(n, jobs, make_one):
    """Await ``make_one()`` n times, at most ``jobs`` at once (a semaphore)."""
    room = asyncio.Semaphore(jobs)

    async def one():
        async with room:
            await make_one()
    await asyncio.gather(*(one() for _ in range(n)))


async def _true_asyncio():
    proc = await asyncio.create_subprocess_exec(TRUE)
    await proc.wait()


async def _true_aio():
    proc = await fastfork.aio.spawn([TRUE])
    await proc.wait()


async def _aio_exec_asyncio(n):
    await _windowed(n, AIO_JOBS, _true_asyncio)


async def _aio_exec_spawn(n):
    await _windowed(n, AIO_JOBS, _true_aio)


async def _aio_exec_spawn_many(n):
    await fastfork.aio.spawn_many([[TRUE]] * n, jobs=AIO_JOBS)


def _ticking(name, work):
    """Run coroutine function ``work(n)`` beside a 1 ms periodic callback.

    Records in LOOP_DELAYS[name] how late the callback ran, at worst and at
    the 99th percentile: how long the loop was kept from running callbacks.
    """
    async def run(n):
        loop = asyncio.get_running_loop()
        delays = []
        handle = None

        def tick(due):
            nonlocal handle
            now = loop.time()
            delays.append(now - due)
            handle = loop.call_at(now + TICK, tick, now + TICK)
        start = loop.time() + TICK
        handle = loop.call_at(start, tick, start)
        try:
            await work(n)
        finally:
            handle.cancel()
        delays.sort()
        LOOP_DELAYS[name] = {"max": delays[-1] if delays else 0.0,
                             "p99": delays[len(delays) * 99 // 100] if delays else 0.0}
    return _in_asyncio(run)


async def _aio_map(n):
    await fastfork.aio.map(_noop, range(n), jobs=JOBS)


AIO_EXEC = Workload(
    key="aio-exec", title=f"asyncio: spawn and await {TRUE}, {AIO_JOBS} at a time",
    baseline="asyncio.create_subprocess_exec",
    methods=(
        Method("asyncio.create_subprocess_exec", "stdlib", _in_asyncio(_aio_exec_asyncio)),
        Method("fastfork.aio.spawn_many", "fastfork", _in_asyncio(_aio_exec_spawn_many)),
        Method("fastfork.aio.spawn", "fastfork", _in_asyncio(_aio_exec_spawn)),
    ),
    sizes={"quick": (50,), "default": (1000,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (50,), "full": (100,)},
)

# The same commands from the big parent, beside a 1 ms periodic callback:
# LOOP_DELAYS says how long the loop stalled (throughput is measured as usual).
AIO_LATENCY = Workload(
    key="aio-latency",
    title=f"asyncio: {TRUE} {AIO_JOBS} at a time beside a 1 ms callback (loop latency)",
    baseline="asyncio.create_subprocess_exec + tick",
    methods=(
        Method("asyncio.create_subprocess_exec + tick", "stdlib",
               _ticking("asyncio.create_subprocess_exec + tick", _aio_exec_asyncio)),
        Method("fastfork.aio.spawn_many + tick", "fastfork",
               _ticking("fastfork.aio.spawn_many + tick", _aio_exec_spawn_many)),
        Method("fastfork.aio.spawn + tick", "fastfork",
               _ticking("fastfork.aio.spawn + tick", _aio_exec_spawn)),
    ),
    sizes={"quick": (), "default": (), "full": ()},
    big_sizes={"quick": (50,), "default": (1000,), "full": (1000,)},
)

AIO_MAP = Workload(
    key="aio-map", title=f"asyncio: fan-out of N Python no-op children (jobs={JOBS})",
    baseline="fastfork.map",
    methods=(
        Method("fastfork.map", "fastfork", _fanout_fastfork),
        Method("fastfork.aio.map", "fastfork", _in_asyncio(_aio_map)),
    ),
    sizes={"quick": (100,), "default": (1000,), "full": (1000,)},
    big_sizes={"quick": (5,), "default": (30,), "full": (100,)},
)

WORKLOADS.update({w.key: w for w in (AIO_EXEC, AIO_LATENCY, AIO_MAP)})
TARGETS += (
    Target("aio.spawn_many vs create_subprocess_exec", "aio-exec", "fastfork.aio.spawn_many",
           "small", "asyncio.create_subprocess_exec", "small", 1.2, ">= 1.2x"),
    Target("aio.map vs fastfork.map (time per task <= 1.2x)", "aio-map", "fastfork.aio.map",
           "small", "fastfork.map", "small", 1 / 1.2, ">= 0.83x"),
)
