"""ForkServer: lifecycle, the start/map/background behaviours through the server,
preloading, shared buffers, and nothing left behind.

Task functions live in this module, which every server here preloads: the
server's children find them by reference (``test_server.<name>``).
"""
import os
import pickle
import signal
import struct
import sys
import textwrap
import time

import pytest

import fastfork
import procutil
from fastfork import ChildError, ForkServer, ServerError, SharedBuffer

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- task functions

def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def boom(x):
    raise ValueError(f"bad item {x}")


def exit_with(code):
    sys.exit(code)


def hard_exit(code):
    os._exit(code)


def die_by(sig):
    os.kill(os.getpid(), sig)
    time.sleep(10)


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def ignore_term_and_sleep(seconds, ready_path=None):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ready_path:
        procutil.signal_ready(ready_path)
    time.sleep(seconds)


def ready_then_sleep(ready_path, seconds):
    procutil.signal_ready(ready_path)
    time.sleep(seconds)


def kill_my_server_or_sleep(kill):
    """The server's children are its own children: os.getppid() is the server."""
    if kill:
        os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(30)




def square_or_exit(x):
    if x < 0:
        sys.exit(-x)
    return x * x


def identity(value):
    return value


def whoami(_=None):
    return os.getpid(), os.getppid()


def my_fds(_=None):
    """The targets of this process's fds other than stdio."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def fill_chunk(buf, i, n):
    with buf.chunk(i, n, itemsize=8) as mine:
        for k in range(0, mine.nbytes, 8):
            struct.pack_into("<q", mine, k, 1000 * i + os.getpid() % 1000)
    return os.getpid()


def raise_keyboard_interrupt(_):
    raise KeyboardInterrupt


class Unloadable:
    """Pickles fine, fails to unpickle (in the server's child)."""

    def __reduce__(self):
        return (boom, ("while unpickling",))


def module_is_loaded(name):
    return name in sys.modules


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def server():
    with ForkServer(preload=["test_server"]) as srv:
        yield srv


def gone(pid, timeout=10.0):
    """Wait until ``pid`` (not our child) no longer exists (or is a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procutil.state(pid) in (None, "Z"):
            return True
        time.sleep(0.01)
    return False


# ---------------------------------------------------------------- lifecycle

def test_lazy_start_and_close():
    srv = ForkServer(preload=["test_server"])
    assert srv.pid is None and "not running" in repr(srv)
    try:
        assert srv.start(square, 3).result() == 9
        pid = srv.pid
        assert pid in procutil.children()
    finally:
        srv.close()
    assert srv.pid is None and "closed" in repr(srv)
    assert pid not in procutil.children()
    srv.close()  # twice is harmless
    with pytest.raises(ValueError, match="closed"):
        srv.start(square, 1)
    with pytest.raises(ValueError, match="closed"):
        srv.map(square, [1])


def test_open_is_explicit_and_idempotent():
    srv = ForkServer()
    try:
        assert srv.open() is srv
        pid = srv.pid
        assert srv.open().pid == pid
    finally:
        srv.close()


def test_close_stops_running_children():
    with procutil.Ready() as ready, ForkServer(preload=["test_server"]) as srv:
        children = [srv.start(sleepy, 60), srv.start(ignore_term_and_sleep, 60, ready.path)]
        ready.wait()  # the second one has installed its handler
        grandchildren = procutil.children(srv.pid)
        assert {c.pid for c in children} <= grandchildren
    assert [c.returncode for c in children] == [-signal.SIGTERM, -signal.SIGKILL]
    assert all(gone(c.pid) for c in children)


def test_bad_arguments_start_nothing():
    with pytest.raises(TypeError):
        ForkServer(preload="numpy")
    with pytest.raises(TypeError):
        ForkServer(preload=[1])
    with pytest.raises(ValueError):
        ForkServer(start_timeout=-1)
    srv = ForkServer(pickler="pickle")  # a lambda is refused without cloudpickle
    try:
        with pytest.raises(TypeError):
            srv.start(42)
        with pytest.raises(TypeError, match="pickled by reference"):
            srv.start(lambda: 1)
        with pytest.raises(TypeError, match="fork server"):
            srv.start(square, __import__("threading").Lock())
        with pytest.raises(ValueError):
            srv.map(square, [1], jobs=0)
        with pytest.raises(ValueError):
            srv.map(square, [1], timeout=float("nan"))
        assert srv.pid is None  # nothing was started
    finally:
        srv.close()


def test_preload_failure_is_a_server_error(tmp_path, monkeypatch):
    (tmp_path / "ff_broken_mod.py").write_text("raise RuntimeError('no import for you')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    srv = ForkServer(preload=["ff_broken_mod"])
    with pytest.raises(ServerError, match="no import for you"):
        srv.open()
    srv.close()


def test_preloaded_module_imported_once(tmp_path, monkeypatch):
    log = tmp_path / "imports.log"
    (tmp_path / "ff_preload_mod.py").write_text(textwrap.dedent(f"""
        import os
        with open({str(log)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        def loaded_by(_):
            import ff_preload_mod
            return os.getppid(), ff_preload_mod.__name__
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with ForkServer(preload=["ff_preload_mod", "json"]) as srv:
        import ff_preload_mod
        results = srv.map(ff_preload_mod.loaded_by, range(6))
        assert srv.map(module_is_loaded, ["json", "ff_preload_mod"]) == [True, True]
        assert all(r == (srv.pid, "ff_preload_mod") for r in results)
        assert srv.start(module_is_loaded, "json").result() is True
        assert sorted(log.read_text().split()) == sorted([str(os.getpid()), str(srv.pid)])


def test_server_killed_fails_calls_then_restarts():
    srv = ForkServer(preload=["test_server"])
    try:
        child = srv.start(sleepy, 60)
        old = srv.pid
        os.kill(old, signal.SIGKILL)
        with pytest.raises(ServerError, match="died"):
            child.result(timeout=30)
        assert child.server_died and child.returncode is None
        assert gone(child.pid)
        # The next use starts a new server.
        assert srv.map(square, [2, 3]) == [4, 9]
        assert srv.pid not in (None, old)
    finally:
        srv.close()


def test_server_killed_during_map_raises_server_error():
    srv = ForkServer(preload=["test_server"])
    try:
        srv.open()
        # The first child kills the server while the map runs.
        with pytest.raises(ServerError):
            srv.map(kill_my_server_or_sleep, [False, True, False, False], jobs=2)
    finally:
        srv.close()


CALLER_KILLED = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
import fastfork
srv = fastfork.ForkServer(preload=["test_server"])
import test_server
kids = [srv.start(test_server.sleepy, 60) for _ in range(3)]
print(srv.pid, *[k.pid for k in kids], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_caller_killed_takes_server_and_children_down():
    proc = procutil.run_python(CALLER_KILLED.format(here=HERE))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 4
    assert all(gone(p) for p in pids), [procutil.state(p) for p in pids]


CTRL_C = """
import functools, os, signal, sys, threading, time
sys.path.insert(0, {here!r})
import fastfork, procutil
import test_server
from fastfork.server import _wait_readable
# SIGINT raises KeyboardInterrupt, even if this test run was started with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
main = threading.get_ident()
ready = procutil.Ready()

def ctrl_c_once_the_map_waits():
    ready.wait(3)   # three children run
    while sys._current_frames()[main].f_code is not _wait_readable.__code__:
        time.sleep(0.001)   # the map has not sent its step to the server yet
    os.kill(os.getpid(), signal.SIGINT)

with ready, fastfork.ForkServer(preload=["test_server"]) as srv:
    threading.Thread(target=ctrl_c_once_the_map_waits).start()
    try:
        srv.map(functools.partial(test_server.ready_then_sleep, ready.path), [30] * 6, jobs=3)
    except KeyboardInterrupt:
        print("interrupted", len(procutil.children(srv.pid)), flush=True)
print("left", len(procutil.descendants()), flush=True)
"""


def test_ctrl_c_stops_and_reaps_every_child():
    proc = procutil.run_python(CTRL_C.format(here=HERE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["interrupted", "0", "left", "0"]
    assert "Traceback" not in proc.stderr


FDS_ABOVE_1024 = """
import os, resource, sys
import fastfork
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and hard < 1200:
    print("skip: the hard RLIMIT_NOFILE is", hard)
    sys.exit(0)
if soft != resource.RLIM_INFINITY and soft < 1200:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
try:
    with fastfork.ForkServer() as srv:
        print(srv.map(abs, [-1, -2]), max(held) > 1024)
finally:
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
"""


def test_works_with_fds_numbered_past_1024():
    # The caller's socket gets an fd number above 1024, which select() cannot watch.
    proc = procutil.run_python(FDS_ABOVE_1024)
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.startswith("skip:"):
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.split() == ["[1,", "2]", "True"], proc.stdout


def test_used_from_another_process_is_refused(server, reaper):
    pid = fastfork.fork()
    if pid == 0:
        code = 1
        try:
            try:
                server.start(square, 2)
            except RuntimeError:
                code = 0
        finally:
            os._exit(code)
    reaper.append(pid)
    assert os.waitstatus_to_exitcode(fastfork.waitpid(pid, 0)[1]) == 0


# ---------------------------------------------------------------- start / Child

def test_start_result_and_outcome(server):
    child = server.start(add, 1, 2, c=3)
    assert isinstance(child, fastfork.ServerChild)
    assert isinstance(child, fastfork.FunctionChild)
    assert child.result() == 6
    assert child.returncode == 0 and child.finished and not child.lost
    assert child.rusage is not None and child.rusage.ru_maxrss > 0
    assert child.poll() == 0
    assert child.pid not in procutil.children()  # the server's child, not ours


def test_children_are_forked_by_the_server(server):
    pid, ppid = server.start(whoami).result()
    assert ppid == server.pid and pid != server.pid


def test_exception_becomes_child_error_with_traceback(server):
    with pytest.raises(ChildError) as info:
        server.start(boom, 7).result()
    err = info.value
    assert err.exc_type == "ValueError"
    assert "bad item 7" in err.remote_traceback and "boom" in err.remote_traceback
    assert err.returncode == 1
    assert isinstance(err.__cause__, ValueError)


@pytest.mark.parametrize("fn,arg,code", [(exit_with, 3, 3), (hard_exit, 5, 5),
                                         (raise_keyboard_interrupt, None, 1)])
def test_exits_are_reported(server, fn, arg, code):
    child = server.start(fn, arg)
    with pytest.raises(ChildError):
        child.result()
    assert child.returncode == code


def test_killed_by_signal(server):
    child = server.start(die_by, signal.SIGSEGV)
    with pytest.raises(ChildError, match="SIGSEGV") as info:
        child.result()
    assert info.value.signal == signal.SIGSEGV and child.returncode == -signal.SIGSEGV


def test_unpickling_failure_in_the_server_is_a_child_error(server):
    with pytest.raises(ChildError, match="unpickle"):
        server.start(identity, Unloadable()).result()


def test_wait_timeout_and_kill(server):
    child = server.start(sleepy, 60)
    with pytest.raises(fastfork.TimeoutExpired) as info:
        child.wait(timeout=0.1)
    assert info.value.pid == child.pid
    assert child.poll() is None
    child.kill()
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.kill()  # after reaping: does nothing


def test_terminate_stop_and_context_manager(server):
    child = server.start(sleepy, 60)
    child.terminate()
    assert child.wait(30) == -signal.SIGTERM
    with procutil.Ready() as ready:
        stubborn = server.start(ignore_term_and_sleep, 60, ready.path)
        ready.wait()  # it has installed its handler
    assert stubborn.stop(timeout=0.2) == -signal.SIGKILL
    with server.start(sleepy, 60) as child:
        pass
    assert child.returncode == -signal.SIGTERM
    stopped = server.start(sleepy, 60)
    stopped.send_signal(signal.SIGSTOP)
    assert stopped.stop(timeout=5) == -signal.SIGTERM


def test_large_arguments_and_results(server):
    big = bytes(range(256)) * 8192  # 2 MiB: travels in a memfd, not inline
    assert server.start(identity, big).result() == big
    assert len(server.start(identity, b"x" * (20 << 20)).result()) == 20 << 20


def test_child_holds_no_server_fds(server):
    targets = server.start(my_fds).result()
    assert not [t for t in targets if t.startswith("socket:") or "pidfd" in t], targets


def test_fan_out_child_holds_no_server_fds(server):
    # The engine in the server forks these: no socket, pidfd or board of the server's.
    for targets in server.map(my_fds, range(3), jobs=2):
        assert not [t for t in targets if t.startswith("socket:") or "pidfd" in t
                    or "fastfork-board" in t], targets


def test_map_with_large_items_and_results(server):
    # Items and results larger than a packet travel in a memfd.
    big = bytes(range(256)) * 1024
    assert server.map(identity, [big, b"small", big * 3], jobs=2) == [big, b"small", big * 3]
    got = dict(server.as_completed(identity, [big] * 5, jobs=2))
    assert got == {i: big for i in range(5)}


def test_map_over_many_items_in_order(server):
    # More items than the first steps send: the rest follow as the server asks.
    assert server.map(square, range(600), jobs=2) == [x * x for x in range(600)]
    assert server.map(square, (x for x in range(50)), jobs=4) == [x * x for x in range(50)]


def test_map_unpickling_failure_is_the_items_child_error(server):
    out = server.map(identity, [1, Unloadable(), 3], return_exceptions=True)
    assert out[0] == 1 and out[2] == 3
    assert isinstance(out[1], ChildError) and out[1].index == 1
    assert "could not unpickle" in str(out[1]) and "while unpickling" in str(out[1])


def test_an_interrupt_for_another_fan_out_is_ignored(server):
    # A late interrupt signal (its fan-out's step had ended) stops nothing else.
    conn = server._connection()
    with conn.lock:
        assert conn.board.post(10**9)
    try:
        conn.interrupt()
        assert server.map(square, range(8), jobs=2) == [x * x for x in range(8)]
        assert dict(server.as_completed(square, range(3))) == {0: 0, 1: 1, 2: 4}
    finally:
        with conn.lock:
            conn.board.clear(10**9)


def test_map_item_that_cannot_be_pickled_raises_type_error(server):
    with pytest.raises(TypeError, match="cannot send"):
        server.map(identity, [1, __import__("threading").Lock()])
    assert procutil.children(server.pid) == set()
    assert server.map(square, [2]) == [4]  # the server goes on


# ---------------------------------------------------------------- map / as_completed / background

def test_map_results_in_order(server):
    assert server.map(square, range(20), jobs=3) == [x * x for x in range(20)]
    assert server.map(square, []) == []


def test_map_raises_first_error_after_reaping(server):
    with pytest.raises(ChildError) as info:
        server.map(boom, [1, 2, 3], jobs=1)
    assert info.value.index == 0 and info.value.exc_type == "ValueError"


def test_map_return_exceptions(server):
    out = server.map(square_or_exit, [3, -4], return_exceptions=True)
    assert out[0] == 9
    assert isinstance(out[1], ChildError) and out[1].returncode == 4


def test_map_timeout_stops_the_slow_item(server):
    out = server.map(sleepy, [0.01, 60], timeout=2, return_exceptions=True)
    assert out[0] == 0.01
    assert isinstance(out[1], ChildError) and "timed out" in str(out[1])


def test_as_completed_yields_everything(server):
    got = dict(server.as_completed(square, range(6), jobs=2))
    assert got == {i: i * i for i in range(6)}


def test_closing_chunked_as_completed_stops_running_children(server):
    gen = server.as_completed(sleepy, [0, 0, 30, 30], jobs=2, chunksize=2)
    assert next(gen) == (0, 0)
    gen.close()
    assert procutil.children(server.pid) == set()


def test_background_stops_the_child(server):
    with server.background(sleepy, 60, grace=5) as child:
        assert child.poll() is None
    assert child.returncode == -signal.SIGTERM
    with procutil.Ready() as ready:
        with server.background(ready_then_sleep, ready.path, 60,
                               stop_signal=signal.SIGINT, grace=60) as child:
            ready.wait()  # it runs, with the SIGINT handler of a child forked here
    assert child.returncode == 1  # KeyboardInterrupt raised in the child


# ---------------------------------------------------------------- shared buffers

def test_results_into_a_shared_buffer(server):
    n = 4
    with SharedBuffer(8 * 4000) as buf:
        children = [server.start(fill_chunk, buf, i, n) for i in range(n)]
        pids = [child.result() for child in children]
        for i, pid in enumerate(pids):
            a, b = buf.bounds(i, n, itemsize=8)
            assert {v for (v,) in struct.iter_unpack("<q", buf[a:b])} == {1000 * i + pid % 1000}


def test_shared_buffer_through_map(server):
    with SharedBuffer(8 * 100) as buf:
        server.map(fill_chunk_item, [(buf, i) for i in range(4)], jobs=2)
        for i in range(4):
            a, b = buf.bounds(i, 4, itemsize=8)
            assert struct.unpack_from("<q", buf, a)[0] // 1000 == i


def fill_chunk_item(pair):
    buf, i = pair
    return fill_chunk(buf, i, 4)


def test_shared_buffer_pickles_only_to_the_server():
    with SharedBuffer(8) as buf, pytest.raises(TypeError):
        pickle.dumps(buf)
