"""ForkExecutor: the concurrent.futures behaviours (submit, map, wait, as_completed,
shutdown), in both modes -- children forked from the caller and from a ForkServer --
and what a process per task adds: cancel kills, faults fail one future only, timeouts.

Task functions live at module level here, so the fork server finds them
(``test_executor.<name>``). Tasks that must block until the test lets them go
wait on a ``Gate``: a named FIFO, which works across both modes (a server's
children do not inherit the test's fds).
"""
import asyncio
import errno
import concurrent.futures as cf
import ctypes
import gc
import os
import signal
import sys
import threading
import time
import weakref

import pytest

import fastfork
import faultlib
import procutil
from fastfork import ChildError, ForkExecutor, ForkServer

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- task functions

def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def pid_of(_=None):
    return os.getpid()


_COUNTER = [0]


def bump(_=None):
    _COUNTER[0] += 1
    return _COUNTER[0]


def boom(x):
    raise ValueError(f"bad item {x}")


def exit_with(code):
    sys.exit(code)


def hard_exit(code):
    os._exit(code)


def segfault():
    import faulthandler
    import resource
    faulthandler.disable()  # pytest's handler would print this child's stack
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.string_at(0)


def unpicklable_result():
    return threading.Lock()


def big_result(n):
    return b"x" * n


class MyObject:
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


def wait_gate(path, value=None):
    """Block until the test opens the gate at ``path``; return ``value``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)
    return value


def wait_gate_and_raise(path):
    wait_gate(path)
    raise ValueError("this is an exception")


def signal_ready_then_sleep(ready, seconds, ignore_term=False):
    """Say "running" on the FIFO ``ready``, then sleep."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = os.open(ready, os.O_WRONLY)
    os.write(fd, b"%d\n" % os.getpid())
    os.close(fd)
    time.sleep(seconds)
    return seconds


def signal_ready_then_wait_gate(ready, gate, value=None):
    fd = os.open(ready, os.O_WRONLY)
    os.write(fd, b"%d\n" % os.getpid())
    os.close(fd)
    return wait_gate(gate, value)


def blocked_signals():
    return signal.pthread_sigmask(signal.SIG_BLOCK, ())


def whoami():
    return os.getpid(), os.getppid()


def sleep_and_print(seconds, msg):
    time.sleep(seconds)
    print(msg, flush=True)


# ---------------------------------------------------------------- helpers

class Gate:
    """A named FIFO: tasks block in ``wait_gate(gate.path)`` until ``open(n)`` lets n through.

    The test holds it open read-write, so neither side's open() blocks and
    bytes written before a task reads them wait in the pipe.
    """

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def open(self, n=1):
        os.write(self.fd, b"x" * n)

    def read_line(self):
        """Read one line a task wrote (its pid, from signal_ready_then_sleep)."""
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(self.fd, 1)
        return int(line)

    def close(self):
        os.close(self.fd)


@pytest.fixture
def gates(tmp_path):
    """Make Gates on demand; closed at teardown."""
    made = []

    def make():
        gate = Gate(tmp_path / f"gate{len(made)}")
        made.append(gate)
        return gate
    yield make
    for gate in made:
        gate.close()


@pytest.fixture(scope="module")
def server():
    with ForkServer(preload=["test_executor"]) as srv:
        yield srv


@pytest.fixture(scope="module", params=["caller", "server"])
def mode(request):
    """The executor options of the test's mode: forking from the caller or from a server."""
    if request.param == "server":
        return {"server": request.getfixturevalue("server")}
    return {}


@pytest.fixture
def make_executor(mode):
    """Make ForkExecutors in the test's mode; stopped and shut down at teardown."""
    made = []

    def make(max_workers=2, **options):
        executor = ForkExecutor(max_workers, **mode, **options)
        made.append(executor)
        return executor
    yield make
    for executor in made:
        executor.kill_workers()
        executor.shutdown(wait=True)


@pytest.fixture
def executor(make_executor):
    return make_executor()


def alive(pid):
    return procutil.state(pid) not in (None, "Z")


def gone(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------- bad input

def test_bad_arguments_fail_before_anything_starts():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ForkExecutor(max_workers=bad)
    for bad in ("2", 2.5, True):
        with pytest.raises(TypeError):
            ForkExecutor(max_workers=bad)
    for bad in (-1, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ForkExecutor(timeout=bad)
    with pytest.raises(TypeError):
        ForkExecutor(timeout="1")
    with pytest.raises(ValueError):
        ForkExecutor(grace=-1)
    with pytest.raises(TypeError):
        ForkExecutor(server="localhost")
    ex = ForkExecutor(2)
    try:
        with pytest.raises(TypeError):
            ex.submit(42)
        with pytest.raises(TypeError):
            ex.submit()
        with pytest.raises(TypeError):
            ex.submit(fn=capture, arg=1)
        with pytest.raises(TypeError):
            ex.map(42, [1])
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(pid_of, [1], chunksize=0)
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            ex.map(str, range(4), buffersize="foo")
        for bad in (0, -1):
            with pytest.raises(ValueError, match="buffersize must be None or > 0"):
                ex.map(str, range(4), buffersize=bad)
        assert ex._manager is None and not procutil.children()  # nothing was started
    finally:
        ex.shutdown()


def test_server_mode_refuses_what_cannot_travel_before_forking():
    with ForkServer(pickler="pickle") as srv, ForkExecutor(2, server=srv) as ex:
        with pytest.raises(TypeError, match="by reference"):
            ex.submit(lambda: 1)
        with pytest.raises(TypeError):
            ex.submit(mul, threading.Lock(), 1)
        with pytest.raises(TypeError, match="by reference"):
            ex.map(lambda x: x, [1])
        assert ex._manager is None and procutil.children() == {srv.pid}
    with pytest.raises(ValueError, match="closed"):
        ex2 = ForkExecutor(2, server=srv)
        ex2.submit(mul, 1, 2)


# ---------------------------------------------------------------- submit / map

def test_submit(executor):
    future = executor.submit(pow, 2, 8)
    assert isinstance(future, cf.Future)
    assert future.result() == 256


def test_submit_keyword(executor):
    assert executor.submit(mul, 2, y=8).result() == 16
    future = executor.submit(capture, 1, self=2, fn=3)
    assert future.result() == ((1,), {"self": 2, "fn": 3})


def test_every_task_runs_in_a_fresh_process(executor):
    pids = [f.result() for f in [executor.submit(pid_of) for _ in range(6)]]
    assert len(set(pids)) == 6 and os.getpid() not in pids
    # A task's changes to module state die with its process.
    assert [executor.submit(bump).result() for _ in range(3)] == [1, 1, 1]


def test_map(executor):
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert (list(executor.map(pow, range(10), range(10), chunksize=3))
            == list(map(pow, range(10), range(10))))


def test_map_chunk_runs_in_one_child(executor):
    pids = list(executor.map(pid_of, range(6), chunksize=3))
    assert len(set(pids[:3])) == 1 and len(set(pids[3:])) == 1 and pids[0] != pids[3]


def test_map_exception(executor):
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout_cancels_the_rest(executor, gates):
    ready = gates()
    results = executor.map(signal_ready_then_sleep, [ready.path] * 3, [0, 0, 60], timeout=5)
    pids = [ready.read_line() for _ in range(3)]  # all three have started
    got = []
    with pytest.raises(cf.TimeoutError):
        for value in results:
            got.append(value)
    assert got == [0, 0]
    assert gone(pids[2])  # the unfinished call was cancelled: its process stopped


def test_map_buffersize(executor):
    for buffersize in (1, 2, 4, 8):
        assert list(executor.map(str, range(4), buffersize=buffersize)) == ["0", "1", "2", "3"]
    assert list(executor.map(mul, range(4), range(4), buffersize=2)) == [0, 1, 4, 9]
    assert list(executor.map(str, iter([]), buffersize=10)) == []


def test_map_buffersize_limits_what_is_submitted(executor):
    import itertools
    results = executor.map(str, itertools.count(1), buffersize=2)
    assert next(results) == "1"
    assert next(results) == "2"
    results.close()


def test_map_close_cancels_pending_calls(executor):
    results = executor.map(divmod, [5, 5, 5, 5], [2, 0, 3, 5], chunksize=1)
    assert next(results) == (2, 1)
    results.close()
    with pytest.raises(StopIteration):
        next(results)


def test_shutdown_race_issue12456(executor):
    executor.map(str, [2] * 3)
    executor.shutdown()


def test_no_stale_references(executor):
    obj = MyObject()
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    executor.submit(obj.my_method).result()
    del obj
    gc.collect()
    assert collected.wait(10) and ref() is None


def test_free_reference(executor):
    for obj in executor.map(make_dummy_object, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


# ---------------------------------------------------------------- faults fail one future only

def test_task_exception_is_reraised_with_the_child_traceback(executor):
    future = executor.submit(boom, 7)
    with pytest.raises(ValueError, match="bad item 7") as info:
        future.result()
    detail = info.value.__cause__
    assert isinstance(detail, ChildError) and detail.exc_type == "ValueError"
    assert "in boom" in detail.remote_traceback and detail.returncode == 1
    assert executor.submit(mul, 6, 7).result() == 42


@pytest.mark.parametrize("fn,args,words,code", [
    (segfault, (), "SIGSEGV", -signal.SIGSEGV),
    (hard_exit, (3,), "exited with code 3", 3),
    (exit_with, (4,), "SystemExit", 4),
    (unpicklable_result, (), "could not be pickled", 1),
])
def test_a_crashing_task_fails_only_its_future(executor, fn, args, words, code):
    future = executor.submit(fn, *args)
    with pytest.raises(ChildError, match=words) as info:
        future.result()
    assert info.value.returncode == code
    # The executor is not broken.
    assert executor.submit(mul, 6, 7).result() == 42
    assert list(executor.map(mul, [1, 2], [3, 4])) == [3, 8]


def test_tasks_block_no_signal_the_caller_does_not(executor):
    # The executor's thread blocks every signal (so that the main thread gets
    # them); its tasks must not inherit that.
    assert executor.submit(blocked_signals).result() == blocked_signals() == set()


def test_100_mb_result(executor):
    assert len(executor.submit(big_result, 100 << 20).result()) == 100 << 20


def test_timeout_stops_the_task_and_names_it(make_executor, gates):
    ready = gates()
    ex = make_executor(timeout=0.5, grace=0.2)
    future = ex.submit(signal_ready_then_sleep, ready.path, 60, ignore_term=True)
    pid = ready.read_line()
    with pytest.raises(TimeoutError) as info:
        future.result()
    err = info.value
    assert isinstance(err, ChildError) and err.pid == pid
    assert "signal_ready_then_sleep" in str(err) and "timed out" in str(err)
    assert gone(pid)
    assert ex.submit(mul, 2, 3).result() == 6


# ---------------------------------------------------------------- cancel

def test_cancel_kills_a_running_task_without_waiting_for_the_grace(make_executor, gates):
    ready = gates()
    ex = make_executor(grace=60)
    future = ex.submit(signal_ready_then_sleep, ready.path, 60, ignore_term=True)
    pid = ready.read_line()
    assert future.running()
    assert future.cancel() is True
    assert future.cancelled() and future.done()
    with pytest.raises(cf.CancelledError):
        future.result()
    # It ignores SIGTERM and the grace is a minute: cancel() did not wait for it.
    assert alive(pid)
    ex.kill_workers()
    ex.shutdown(wait=True)
    assert not alive(pid)


def test_cancelled_task_is_done_for_wait_once_reaped(make_executor, gates):
    ready = gates()
    ex = make_executor(grace=5)
    future = ex.submit(signal_ready_then_sleep, ready.path, 60)
    pid = ready.read_line()
    assert future.cancel()
    done, not_done = cf.wait([future], timeout=30)
    assert done == {future} and not not_done
    assert gone(pid)


def test_cancel_pending_and_finished(make_executor, gates):
    ready, gate = gates(), gates()
    ex = make_executor(max_workers=1)
    blocker = ex.submit(signal_ready_then_wait_gate, ready.path, gate.path, "ran")
    pending = ex.submit(mul, 2, 3)
    ready.read_line()
    assert not pending.running()
    assert pending.cancel() and pending.cancelled()
    gate.open()
    assert blocker.result() == "ran"
    assert blocker.cancel() is False and not blocker.cancelled()
    assert cf.wait([pending], timeout=30).done == {pending}


def test_terminate_and_kill_workers(make_executor, gates):
    ready = gates()
    for stop in ("terminate_workers", "kill_workers"):
        ex = make_executor(max_workers=2, grace=5)
        running = [ex.submit(signal_ready_then_sleep, ready.path, 60) for _ in range(2)]
        queued = ex.submit(mul, 1, 1)
        pids = [ready.read_line() for _ in range(2)]
        getattr(ex, stop)()
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(mul, 1, 1)
        ex.shutdown(wait=True)
        assert all(f.cancelled() for f in running + [queued])
        assert not any(alive(p) for p in pids)


# ---------------------------------------------------------------- callbacks, threads, asyncio

def test_done_callbacks_run_outside_the_executor_lock(executor):
    seen = []
    done = threading.Event()

    def resubmit(future):
        # Submitting from a callback would deadlock if it ran under the executor's lock.
        seen.append(future.result())
        executor.submit(mul, 3, 3).add_done_callback(lambda f: (seen.append(f.result()),
                                                                 done.set()))
    executor.submit(mul, 2, 2).add_done_callback(resubmit)
    assert done.wait(30) and seen == [4, 9]


# The eight submitting threads run while the executor forks: 3.12+ rightly warns.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_submit_from_8_threads_at_once(make_executor):
    ex = make_executor(max_workers=4)
    barrier = threading.Barrier(8)
    results = {}

    def worker(k):
        barrier.wait()
        futures = [ex.submit(mul, k, i) for i in range(5)]
        results[k] = [f.result() for f in futures]
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [k * i for i in range(5)] for k in range(8)}


def test_run_in_executor_and_wrap_future(executor):
    async def main():
        loop = asyncio.get_running_loop()
        a = await loop.run_in_executor(executor, mul, 6, 7)
        b = await asyncio.wrap_future(executor.submit(pow, 2, 5))
        return a, b
    assert asyncio.run(main()) == (42, 32)


def test_cancelling_the_asyncio_task_kills_the_child(executor, gates):
    ready = gates()

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            loop.run_in_executor(executor, signal_ready_then_sleep, ready.path, 60))
        pid = await loop.run_in_executor(None, ready.read_line)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pid
    pid = asyncio.run(main())
    assert gone(pid)


# ---------------------------------------------------------------- wait / as_completed

def test_wait_duplicate_futures(executor):
    future = executor.submit(mul, 1, 2)
    done, not_done = cf.wait([future, future], return_when=cf.ALL_COMPLETED)
    assert done == {future} and not not_done


def test_wait_first_completed(executor, gates):
    gate = gates()
    f1 = executor.submit(mul, 21, 2)
    f2 = executor.submit(wait_gate, gate.path)
    try:
        done, not_done = cf.wait([f1, f2], return_when=cf.FIRST_COMPLETED)
        assert done == {f1} and not_done == {f2}
    finally:
        gate.open()
    f2.result()


def test_wait_first_exception(executor, gates):
    gate, gate2 = gates(), gates()
    f1 = executor.submit(mul, 2, 21)
    assert f1.result() == 42
    f2 = executor.submit(wait_gate_and_raise, gate.path)
    f3 = executor.submit(wait_gate, gate2.path)
    try:
        gate.open()
        done, not_done = cf.wait([f1, f2, f3], return_when=cf.FIRST_EXCEPTION)
        assert done == {f1, f2} and not_done == {f3}
    finally:
        gate2.open()
    f3.result()


def test_wait_all_completed_and_timeout(executor, gates):
    gate = gates()
    f1 = executor.submit(divmod, 2, 0)
    f2 = executor.submit(mul, 2, 21)
    done, not_done = cf.wait([f1, f2], return_when=cf.ALL_COMPLETED)
    assert done == {f1, f2} and not not_done
    f3 = executor.submit(wait_gate, gate.path)
    try:
        done, not_done = cf.wait([f1, f3], timeout=0.05)
        assert done == {f1} and not_done == {f3}
    finally:
        gate.open()
    f3.result()


def test_as_completed(executor, gates):
    futures = {executor.submit(mul, 2, 21), executor.submit(mul, 7, 6)}
    assert set(cf.as_completed(futures)) == futures
    gate = gates()
    slow = executor.submit(wait_gate, gate.path)
    try:
        finished = set()
        with pytest.raises(cf.TimeoutError):
            for f in cf.as_completed(futures | {slow}, timeout=0.1):
                finished.add(f)
        assert finished == futures
    finally:
        gate.open()
    assert list(cf.as_completed([slow, slow, slow])) == [slow]


# ---------------------------------------------------------------- shutdown

def test_run_after_shutdown(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 5)


def test_shutdown_waits_for_every_task(executor):
    futures = [executor.submit(mul, i, i) for i in range(20)]
    executor.shutdown()
    assert [f.result() for f in futures] == [i * i for i in range(20)]
    assert not procutil.children() - {getattr(executor._server, "pid", None)}


def test_shutdown_cancel_futures(make_executor, gates):
    ready, gate = gates(), gates()
    ex = make_executor(max_workers=1)
    running = ex.submit(signal_ready_then_wait_gate, ready.path, gate.path, "done")
    queued = [ex.submit(mul, i, 2) for i in range(10)]
    ready.read_line()
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.open()
    ex.shutdown(wait=True)
    assert running.result() == "done"
    assert all(f.cancelled() for f in queued)


def test_cancel_then_shutdown_does_not_hang_gh94440(executor):
    executor.submit(int).result()
    executor.submit(int).cancel()
    executor.shutdown(wait=True)


def test_context_manager(make_executor):
    with make_executor(max_workers=3) as ex:
        assert list(ex.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)


def test_dropped_without_shutdown_finishes_its_tasks_and_leaves_nothing(mode):
    ex = ForkExecutor(2, **mode)
    results = ex.map(abs, range(-5, 5))
    manager = ex._manager
    del ex
    gc.collect()
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    manager.join(30)
    assert not manager.is_alive()


def test_shutdown_no_wait(executor):
    results = executor.map(abs, range(-5, 5))
    manager = executor._manager
    executor.shutdown(wait=False)
    manager.join(30)
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]


def test_used_from_another_process_is_refused(executor, reaper):
    executor.submit(int).result()
    pid = fastfork.fork()
    if pid == 0:
        code = 1
        try:
            try:
                executor.submit(int)
            except RuntimeError:
                code = 0
        finally:
            os._exit(code)
    reaper.append(pid)
    assert os.waitstatus_to_exitcode(fastfork.waitpid(pid, 0)[1]) == 0


# ---------------------------------------------------------------- whole programs

INTERPRETER_EXIT = """
import sys
sys.path.insert(0, {here!r})
import fastfork, test_executor
server = fastfork.ForkServer(preload=["test_executor"]) if {server} else None
ex = fastfork.ForkExecutor(2, server=server)
ex.submit(test_executor.sleep_and_print, 0.2, "apple")
{shutdown}
"""


@pytest.mark.parametrize("server", [False, True])
@pytest.mark.parametrize("shutdown", ["", "ex.shutdown(wait=False)"])
def test_interpreter_exit_runs_submitted_tasks(server, shutdown):
    proc = procutil.run_python(INTERPRETER_EXIT.format(here=HERE, server=server,
                                                       shutdown=shutdown))
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == "apple"


SUBMIT_AT_EXIT = """
import atexit
@atexit.register
def run_last():
    try:
        ex.submit(id, None)
    except RuntimeError as err:
        print(err)
import fastfork
import faultlib
ex = fastfork.ForkExecutor(2)
ex.submit(id, 42).result()
"""


def test_submit_after_interpreter_shutdown():
    proc = procutil.run_python(SUBMIT_AT_EXIT)
    assert proc.returncode == 0, proc.stderr
    assert "cannot schedule new futures after" in proc.stdout


CTRL_C = """
import os, signal, sys
sys.path.insert(0, {here!r})
import fastfork, procutil, test_executor
signal.signal(signal.SIGINT, signal.default_int_handler)
server = fastfork.ForkServer(preload=["test_executor"]).open() if {server} else None
ready = sys.argv[1]
try:
    with fastfork.ForkExecutor(2, server=server, grace=5) as ex:
        futures = [ex.submit(test_executor.signal_ready_then_sleep, ready, 60)
                   for _ in range(5)]
        with open(ready, "w") as gate:  # all submitted: the test may interrupt the wait
            gate.write("0\\n")
        # Not cf.wait(): a KeyboardInterrupt while it takes the futures' locks
        # one by one leaves some taken, and the executor could settle none.
        futures[-1].result()
except KeyboardInterrupt:
    print("interrupted", sum(f.cancelled() for f in futures), flush=True)
tree = procutil.descendants() - ({{server.pid}} if server else set())
print("left", len(tree), flush=True)
if server:
    server.close()
"""


@pytest.mark.parametrize("server", [False, True])
def test_ctrl_c_stops_and_reaps_every_child(tmp_path, server):
    import subprocess
    ready = Gate(tmp_path / "ready")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CTRL_C.format(here=HERE, server=server), ready.path],
            env=procutil.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        # Two tasks' pids and the script's 0 once it has submitted all five, in any order.
        pids = [pid for pid in (ready.read_line() for _ in range(3)) if pid]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        ready.close()
    assert proc.returncode == 0, err
    assert out.split() == ["interrupted", "5", "left", "0"]
    assert all(gone(p) for p in pids)
    assert "Traceback" not in err


MAIN_SCRIPT = """
import os, sys
import fastfork

with open(sys.argv[2], "a") as log:  # who imports this script
    log.write(f"{os.getpid()}\\n")
import faultlib

class Point:
    def __init__(self, x):
        self.x = x

def square(x):
    return x * x

def make_point(x):
    return Point(x)

if __name__ == "__main__":
    pickler = None if sys.argv[1] == "auto" else sys.argv[1]
    with fastfork.ForkServer(pickler=pickler) as server, server.executor(2) as ex:
        print(list(ex.map(square, range(4))))
        point = ex.submit(make_point, 3).result()
        print(type(point) is Point, point.x)
        offset = 10
        try:
            print(ex.submit(lambda x: x + offset, 1).result())
        except TypeError as err:
            print("TypeError", "cloudpickle" in str(err))
"""


def run_main_script(tmp_path, pickler, prelude=""):
    """Run MAIN_SCRIPT as a program; return (its output lines, how many imported it)."""
    import subprocess
    script, log = tmp_path / "prog.py", tmp_path / "imports.log"
    script.write_text(prelude + MAIN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), pickler, str(log)],
                          env=procutil.child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines(), len(log.read_text().split())


@pytest.mark.parametrize("pickler,lambda_line,importers", [
    ("auto", "11", 2),            # the script itself, and the server once
    ("pickle", "TypeError False", 2),
    ("cloudpickle", "11", 1),     # everything travels by value
])
def test_main_script_functions_and_lambdas_through_the_server(tmp_path, pickler, lambda_line,
                                                              importers):
    pytest.importorskip("cloudpickle")
    lines, imported = run_main_script(tmp_path, pickler)
    assert lines == ["[0, 1, 4, 9]", "True 3", lambda_line]
    assert imported == importers


def test_lambda_without_cloudpickle_is_refused_before_forking(tmp_path):
    lines, imported = run_main_script(tmp_path, "auto",
                                      prelude="import sys; sys.modules['cloudpickle'] = None\n")
    assert lines == ["[0, 1, 4, 9]", "True 3", "TypeError True"]
    assert imported == 2


def test_forkserver_executor_method(server):
    with server.executor(max_workers=2, timeout=30) as ex:
        assert isinstance(ex, ForkExecutor) and ex._server is server
        pid, ppid = ex.submit(whoami).result()
        assert ppid == server.pid
    assert server.pid is not None  # the executor leaves its server running
    with pytest.raises(ValueError):
        server.executor(max_workers=0)
    with pytest.raises(TypeError):
        server.executor(2, pickler="pickle")


def test_tasks_die_with_the_parent(tmp_path):
    import subprocess
    ready = Gate(tmp_path / "ready")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import os, signal, sys, time\n"
             f"sys.path.insert(0, {HERE!r})\n"
             "import fastfork, test_executor\n"
             "ex = fastfork.ForkExecutor(3)\n"
             "fs = [ex.submit(test_executor.signal_ready_then_sleep, sys.argv[1], 60)\n"
             "      for _ in range(3)]\n"
             "time.sleep(60)\n", ready.path],
            env=procutil.child_env())
        pids = [ready.read_line() for _ in range(3)]
        proc.kill()
        proc.wait(30)
    finally:
        ready.close()
    assert all(gone(p) for p in pids), [procutil.state(p) for p in pids]


def _fork_warnings(caught):
    return [w for w in caught if issubclass(w.category, DeprecationWarning)
            and "multi-threaded" in str(w.message)]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="forking with threads warns on 3.12+")
def test_fastforks_own_threads_do_not_make_forks_warn():
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ForkExecutor(2) as ex:
            assert ex.submit(mul, 2, 3).result() == 6
            # The executor's thread is alive: the caller's own fan-out does not warn either.
            assert fastfork.map(abs, [-1, -2]) == [1, 2]
    assert not _fork_warnings(caught)
    # A thread of the caller's running at fork time is what the warning is about.
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ForkExecutor(2) as ex:
                assert ex.submit(mul, 2, 3).result() == 6
    finally:
        stop.set()
        thread.join()
    assert _fork_warnings(caught)


FORK_FAULTS = """
import errno, os, sys
import fastfork, faultlib, procutil
FDS = procutil.open_fds()
shim = faultlib.shim()
out = {}
with fastfork.ForkExecutor(2) as ex:
    # Transient EAGAIN (every 3rd fork fails, 5 times): retried, every result arrives.
    out["results"] = list(ex.map(abs, range(-20, 0)))
    out["failures"] = shim.failures("fork")
    # No fork works: the task fails with ForkError, the executor goes on.
    shim.configure("fork", errno.ENOMEM)
    err = ex.submit(abs, -1).exception()
    out["error"] = [type(err).__name__, err.errno]
    shim.arm(False)
    out["after"] = ex.submit(abs, -2).result()
faultlib.report(out, FDS)
"""


def test_fork_failures_are_retried_then_fail_one_task():
    value = faultlib.contained(FORK_FAULTS, runner=faultlib.run_with_shim, funcs="fork",
                               errno="EAGAIN", every=3, count=5)
    assert value == {"results": list(range(20, 0, -1)), "failures": 5,
                     "error": ["ForkError", errno.ENOMEM], "after": 2}
