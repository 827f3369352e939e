"""fastfork.start / map / as_completed / background: results, errors, the child-exit guard."""
import errno
import faulthandler
import os
import pickle
import random
import signal
import sys
import textwrap
import threading
import time

import pytest

import fastfork
import procutil


def double(x):
    return 2 * x


def boom(x):
    raise ValueError(f"bad item {x}")


def sleep_then(x):
    time.sleep(x)
    return x


# ------------------------------------------------------------------ start


def test_start_returns_result_status_and_rusage():
    child = fastfork.start(double, 21)
    assert child.result() == 42
    assert child.returncode == 0
    assert child.rusage.ru_maxrss > 0
    assert child.finished and not child.lost


def test_start_passes_args_and_kwargs():
    child = fastfork.start(lambda a, b=0: (a, b), 1, b=2)
    assert child.result() == (1, 2)


def test_exception_travels_back_with_traceback():
    child = fastfork.start(boom, 7)
    with pytest.raises(fastfork.ChildError) as info:
        child.result()
    err = info.value
    assert err.pid == child.pid and err.returncode == 1
    assert err.exc_type == "ValueError"
    assert "bad item 7" in str(err) and "in boom" in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    assert pickle.loads(pickle.dumps(err)).remote_traceback == err.remote_traceback


@pytest.mark.parametrize("exc, code", [
    (SystemExit(3), 3), (SystemExit(257), 1), (SystemExit("msg"), 1),
    (KeyboardInterrupt(), 1), (GeneratorExit(), 1),
])
def test_base_exceptions_end_in_exit(exc, code):
    def raiser():
        raise exc
    child = fastfork.start(raiser)
    with pytest.raises(fastfork.ChildError) as info:
        child.result()
    assert child.returncode == code
    assert info.value.exc_type == type(exc).__name__


@pytest.mark.parametrize("exc", [SystemExit(), SystemExit(None), SystemExit(0),
                                 SystemExit(False), SystemExit(256)])
def test_exit_status_zero_is_a_success_with_result_none(exc):
    def exits():
        raise exc
    child = fastfork.start(exits)
    assert child.result() is None and child.returncode == 0


def test_exit_status_zero_in_a_fan_out_or_a_fork_server():
    # Neither fails the map nor stops later items.
    assert fastfork.map(lambda x: sys.exit() if x == 0 else x, range(4), jobs=1) == [
        None, 1, 2, 3]
    with fastfork.ForkServer() as server:
        assert server.start(sys.exit, 0).result() is None


def test_an_exception_without_text_ends_its_message_with_its_name():
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(fastfork.ChildError) as info:
        fastfork.start(interrupted).result()
    assert info.value.message.endswith("raised: KeyboardInterrupt")
    with pytest.raises(fastfork.ChildError) as info:
        fastfork.start(sys.exit, 4).result()
    assert info.value.message.endswith("exited: SystemExit: 4")


def test_result_timeout_raises_timeout_expired_then_succeeds():
    child = fastfork.start(sleep_then, 0.3)
    with pytest.raises(fastfork.TimeoutExpired) as info:
        child.result(timeout=0.01)
    assert info.value.pid == child.pid
    assert child.result() == 0.3


def test_wait_poll_and_signals():
    child = fastfork.start(time.sleep, 30)
    assert child.poll() is None
    with pytest.raises(fastfork.TimeoutExpired):
        child.wait(0)
    child.send_signal(signal.SIGUSR1)
    assert child.wait() == -signal.SIGUSR1
    assert child.poll() == -signal.SIGUSR1
    child.kill()  # after reaping: does nothing, never hits a recycled pid


def test_stop_escalates_to_sigkill_when_sigterm_ignored():
    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, b"x")
        time.sleep(30)
    r, w = os.pipe()
    try:
        child = fastfork.start(stubborn)
        os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)
    assert child.stop(timeout=0.2) == -signal.SIGKILL


def test_stop_handles_a_stopped_child():
    child = fastfork.start(time.sleep, 30)
    child.send_signal(signal.SIGSTOP)
    assert child.stop(timeout=5) == -signal.SIGTERM


def test_context_manager_stops_and_reaps():
    with fastfork.start(time.sleep, 30) as child:
        assert child.poll() is None
    assert child.returncode == -signal.SIGTERM


def test_pidfd_used_for_signals_where_available():
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd on this platform")
    child = fastfork.start(time.sleep, 30)
    assert child._pidfd >= 0
    child.stop()
    assert child._pidfd == -1


def test_handle_refuses_use_from_another_process():
    child = fastfork.start(time.sleep, 30)
    try:
        grandchild = fastfork.start(lambda: child.poll())
        with pytest.raises(fastfork.ChildError, match="RuntimeError"):
            grandchild.result()
    finally:
        child.stop()


def test_bad_arguments_raise_before_any_fork():
    before = procutil.children()
    with pytest.raises(TypeError):
        fastfork.start(42)
    with pytest.raises(TypeError):
        fastfork.start_child(double, (1,), kwargs=[1])
    for kwargs in ({"jobs": 0}, {"jobs": -1}, {"timeout": -1}, {"timeout": float("nan")},
                   {"timeout": float("inf")}, {"timeout": 0}, {"fork_retries": -1},
                   {"grace": -1}):
        with pytest.raises(ValueError):
            fastfork.map(double, [1], **kwargs)
    for kwargs in ({"jobs": 1.5}, {"jobs": True}, {"timeout": "1"}):
        with pytest.raises(TypeError):
            fastfork.map(double, [1], **kwargs)
    with pytest.raises(TypeError):
        fastfork.map(double, 5)
    with pytest.raises(TypeError):
        fastfork.map("not callable", [1])
    with pytest.raises(ValueError):
        with fastfork.background(time.sleep, 1, stop_signal=12345):
            pass
    with pytest.raises(TypeError):
        fastfork.Child(os.getpid()).wait(timeout="soon")
    assert procutil.children() == before


# ------------------------------------------------------------------ map


def test_map_results_in_input_order():
    items = [0.05, 0.0, 0.03, 0.01]
    assert fastfork.map(sleep_then, items, jobs=4) == items
    assert fastfork.map(double, range(50), jobs=3) == [2 * i for i in range(50)]
    assert fastfork.map(double, []) == []
    assert fastfork.map(double, (i for i in range(5))) == [0, 2, 4, 6, 8]


def test_map_propagates_what_the_items_iterator_raises():
    def items():
        yield 1
        yield 2
        raise KeyError("no more items")
    before = procutil.children()
    with pytest.raises(KeyError, match="no more items"):
        fastfork.map(double, items(), jobs=1)
    assert procutil.children() == before  # the children already started were reaped


def test_map_failure_reports_item_after_others_finish():
    def some_fail(x):
        if x == 2:
            raise KeyError(x)
        return x
    with pytest.raises(fastfork.ChildError) as info:
        fastfork.map(some_fail, range(5), jobs=2)
    assert info.value.index == 2 and info.value.item == "2"
    assert info.value.exc_type == "KeyError"


def test_map_return_exceptions_gives_per_item_outcomes():
    out = fastfork.map(lambda x: 1 / x, [1, 0, 2], return_exceptions=True)
    assert out[0] == 1 and out[2] == 0.5
    assert isinstance(out[1], fastfork.ChildError) and out[1].exc_type == "ZeroDivisionError"


def test_as_completed_yields_in_completion_order():
    order = [i for i, _ in fastfork.as_completed(sleep_then, [0.4, 0.0], jobs=2)]
    assert order == [1, 0]


def test_as_completed_close_stops_running_children():
    gen = fastfork.as_completed(sleep_then, [0.0, 30, 30], jobs=3)
    assert next(gen) == (0, 0.0)
    gen.close()  # the two sleepers are stopped and reaped (checked by the autouse guard)


def test_closing_chunked_as_completed_stops_running_children():
    gen = fastfork.as_completed(sleep_then, [0.0, 0.0, 30, 30], jobs=2, chunksize=2)
    assert next(gen) == (0, 0.0)
    gen.close()  # the chunk of sleepers is stopped and reaped (checked by the autouse guard)


def test_timeout_stops_sleeper_stubborn_and_stopped_children():
    def stubborn(x):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(30)

    def stops_itself(x):
        os.kill(os.getpid(), signal.SIGSTOP)
        return x

    # Timeouts long enough for a busy machine to start the children and let the
    # quick one finish, and the stubborn one install its handler.
    out = fastfork.map(sleep_then, [30, 0.0], timeout=1.0, return_exceptions=True)
    assert isinstance(out[0], fastfork.ChildError) and out[0].returncode == -signal.SIGTERM
    assert "timed out" in str(out[0]) and out[1] == 0.0
    [err] = fastfork.map(stubborn, [1], timeout=1.0, grace=0.2, return_exceptions=True)
    assert err.returncode == -signal.SIGKILL
    [err] = fastfork.map(stops_itself, [1], timeout=0.3, return_exceptions=True)
    assert err.returncode is not None and "timed out" in str(err)


def test_timed_out_child_is_a_child_timeout_that_pickles():
    [err] = fastfork.map(sleep_then, [30], timeout=0.3, return_exceptions=True)
    assert isinstance(err, fastfork.ChildTimeout) and isinstance(err, TimeoutError)
    assert err.timed_out and err.index == 0 and err.returncode == -signal.SIGTERM
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is fastfork.ChildTimeout and copy.timed_out and str(copy) == str(err)
    with pytest.raises(TimeoutError):
        fastfork.map(sleep_then, [30], timeout=0.3)
    assert pickle.loads(pickle.dumps(fastfork.ChildError("x", pid=1))).timed_out is False


def test_large_results_do_not_deadlock():
    sizes = [100 * 2**20, 3 * 2**20, 1]
    out = fastfork.map(lambda n: b"x" * n, sizes, jobs=3)
    assert [len(b) for b in out] == sizes


def test_unpicklable_result_is_an_error_for_that_item_only():
    out = fastfork.map(lambda x: threading.Lock() if x else x, [0, 1], return_exceptions=True)
    assert out[0] == 0
    assert "could not be pickled" in str(out[1]) and out[1].exc_type == "TypeError"


class CrashOnPickle:
    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        if self.how == "segv":
            faulthandler.disable()  # pytest's handler would print a stack dump
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.how == "exit":
            sys.exit(5)
        os._exit(6)


@pytest.mark.parametrize("how, returncode", [("segv", -signal.SIGSEGV), ("exit", 1), ("_exit", 6)])
def test_pickling_that_crashes_or_exits(how, returncode):
    out = fastfork.map(CrashOnPickle, [how], return_exceptions=True)
    assert isinstance(out[0], fastfork.ChildError)
    assert out[0].returncode == returncode


def test_killed_mid_result_is_never_unpickled():
    child = fastfork.start(lambda: b"y" * (50 * 2**20))
    # Once bytes arrive the child is writing; nobody drains the pipe, so it
    # cannot get past the first 64 KiB of the 50 MiB frame.
    procutil.wait_readable(child._result_fd)
    child.kill()
    with pytest.raises(fastfork.ChildError) as info:
        child.result()
    assert info.value.signal == signal.SIGKILL and "without a result" in str(info.value)


def test_grandchild_holding_the_pipe_does_not_block_the_result():
    def leave_grandchild():
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        return pid
    grandchild = fastfork.start(leave_grandchild).result(timeout=10)
    os.kill(grandchild, signal.SIGKILL)


def test_someone_else_reaping_the_child_gives_lost_but_result_kept():
    r, w = os.pipe()
    try:
        child = fastfork.start(lambda: os.read(r, 1) and "value")
        os.write(w, b"x")
        os.waitpid(child.pid, 0)  # a foreign reaper takes the exit status
    finally:
        os.close(r)
        os.close(w)
    assert child.result() == "value"
    assert child.lost and child.returncode is None


def test_children_get_different_random_numbers():
    values = fastfork.map(lambda _: random.random(), range(4))
    assert len(set(values)) == 4


def test_forking_from_several_threads_at_once():
    results, errors = {}, []

    def worker(k):
        try:
            results[k] = fastfork.map(double, range(k * 10, k * 10 + 10), jobs=2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert results == {k: [2 * i for i in range(k * 10, k * 10 + 10)] for k in range(4)}


def test_lock_held_by_thread_at_fork_time_timeout_frees_parent():
    lock = threading.Lock()
    holding, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            holding.set()
            release.wait()
    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait()
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            [err] = fastfork.map(lambda _: lock.acquire(), [1], timeout=0.3, return_exceptions=True)
        assert "timed out" in str(err)
    finally:
        release.set()
        thread.join()


def test_fork_retry_then_fork_error(fork_fault):
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] in (2, 3) or calls["n"] >= 6:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    fork_fault(flaky)
    # Items 0..2 start (two failures before item 1 are retried); item 3 never can.
    out = fastfork.map(double, range(6), fork_retries=2, return_exceptions=True)
    assert out[:3] == [0, 2, 4]
    assert all(isinstance(e, fastfork.ForkError) and e.errno == errno.EAGAIN for e in out[3:])
    assert out[3].started == 3
    calls["n"] = 0
    with pytest.raises(fastfork.ForkError) as info:
        fastfork.map(double, range(6), fork_retries=2)
    assert info.value.started == 3 and isinstance(info.value, OSError)


def test_fork_failure_in_start_leaves_nothing_open(fork_fault):
    def enomem():
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    fork_fault(enomem)
    with pytest.raises(OSError) as info:
        fastfork.start(double, 1)
    assert info.value.errno == errno.ENOMEM


# ------------------------------------------------------------------ background


def test_background_stops_with_sigterm_on_exit():
    with fastfork.background(time.sleep, 30) as child:
        assert child.poll() is None
    assert child.returncode == -signal.SIGTERM


def test_background_sigint_lets_a_server_shut_down_cleanly():
    ready = procutil.Ready()

    def server():
        # SIGINT raises KeyboardInterrupt here even when this test run was
        # started with SIGINT ignored (nohup, a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            ready.signal()
            time.sleep(30)
        except KeyboardInterrupt:
            return "clean"
    with ready, fastfork.background(server, stop_signal=signal.SIGINT, grace=60) as child:
        ready.wait()
    assert child.result() == "clean"


def test_background_stops_even_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with fastfork.background(time.sleep, 30) as child:
            raise RuntimeError("test failed")
    assert child.returncode == -signal.SIGTERM


# --------------------------------------------- fresh interpreters (process-wide state)


GUARD_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, fastfork
    sentinel = sys.argv[1] if len(sys.argv) > 1 else {sentinel!r}
    atexit.register(lambda: open(sentinel + ".atexit", "a").write(f"{{os.getpid()}}\\n"))

    class Boom(BaseException):
        pass

    def bad(kind):
        if kind == "exit":
            raise SystemExit(3)
        if kind == "kbd":
            raise KeyboardInterrupt
        if kind == "base":
            raise Boom()
        if kind == "finally":
            try:
                raise ValueError
            finally:
                raise RuntimeError("finally raised")
        return kind

    out = fastfork.map(bad, ["exit", "kbd", "base", "finally", "ok"], return_exceptions=True)
    with open(sentinel, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    print(out[-1])
""")


def test_child_never_runs_parent_code_or_atexit(tmp_path):
    sentinel = str(tmp_path / "sentinel")
    proc = procutil.run_python(GUARD_SCRIPT.format(sentinel=sentinel))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert open(sentinel).read().split() == [str(_pid_of(proc, sentinel))]
    assert len(open(sentinel + ".atexit").read().split()) == 1
    assert "Traceback" not in proc.stderr


def _pid_of(proc, sentinel):
    return int(open(sentinel + ".atexit").read().split()[0])


def test_stdio_flushed_before_fork_and_in_child():
    code = textwrap.dedent("""
        import sys, fastfork
        print("parent before", end="")   # buffered, no newline: must not be doubled
        sys.stdout.write("\\n")
        def child(i):
            print(f"child {i}", end="")  # buffered: must not be lost at _exit
            return i
        fastfork.map(child, range(3), jobs=1)
        print("parent after")
    """)
    proc = procutil.run_python(code, unbuffered=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("parent before") == 1 and out.count("parent after") == 1
    assert all(out.count(f"child {i}") == 1 for i in range(3))


@pytest.mark.parametrize("printer", ["generator", "signal handler", "thread"])
def test_output_printed_between_forks_is_not_doubled(printer):
    # The engine skips the flush before a fork when no Python code can have
    # run since the last one; each of these runs Python code in the parent
    # while child 1 or 2 runs (jobs=1: between two forks), buffered and
    # without a newline.
    code = f"printer = {printer!r}\n" + textwrap.dedent("""
        import os, signal, threading, fastfork
        started_r, started_w = os.pipe()
        go_r, go_w = os.pipe()
        def items():
            for i in range(6):
                if printer == "generator":
                    print(f"parent {i}", end="")
                yield i
        def child(i):
            if printer == "signal handler" and i == 2:
                os.kill(os.getppid(), signal.SIGUSR1)
            if printer == "thread" and i == 1:
                os.write(started_w, b"x")
                os.read(go_r, 1)  # the parent's thread prints meanwhile
            return i
        signal.signal(signal.SIGUSR1, lambda *_: print("parent 2", end=""))
        def chatter():
            os.read(started_r, 1)
            print("parent 3", end="")
            os.write(go_w, b"x")
        if printer == "thread":
            threading.Thread(target=chatter, daemon=True).start()
        print(fastfork.map(child, items(), jobs=1))
    """)
    proc = procutil.run_python(code, unbuffered=False)
    assert proc.returncode == 0, proc.stderr
    for i in (range(6) if printer == "generator" else [2] if printer == "signal handler" else [3]):
        assert proc.stdout.count(f"parent {i}") == 1, proc.stdout
    assert proc.stdout.count("[0, 1, 2, 3, 4, 5]") == 1, proc.stdout


def test_tracebacks_printed_only_when_asked():
    code = textwrap.dedent("""
        import fastfork
        def bad(x):
            raise ValueError("loud")
        fastfork.map(bad, [1], return_exceptions=True)
        fastfork.map(bad, [2], return_exceptions=True, print_traceback=True)
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == 0
    assert proc.stderr.count("ValueError: loud") == 1


def test_ctrl_c_during_map_stops_everything_and_reraises():
    code = textwrap.dedent("""
        import os, signal, time, fastfork, procutil
        signal.setitimer(signal.ITIMER_REAL, 0.4)
        signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            fastfork.map(time.sleep, [30] * 6, jobs=3)
        except KeyboardInterrupt:
            print("interrupted", len(procutil.children()))
    """)
    proc = procutil.run_python(code)
    assert proc.stdout.split() == ["interrupted", "0"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigchld_ignored_reports_lost_with_result():
    code = textwrap.dedent("""
        import signal, fastfork
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        child = fastfork.start(lambda: "from pipe")
        print(child.result(timeout=10), child.lost, child.returncode)
        print(fastfork.map(lambda x: x, [1, 2], timeout=10))
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["from pipe True None", "[1, 2]"]


def test_child_holds_only_its_own_fds():
    code = textwrap.dedent("""
        import os, time, fastfork
        def fds(_):
            time.sleep(0.2)  # siblings are alive meanwhile
            return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        print(fastfork.map(fds, range(4), jobs=4))
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == 0, proc.stderr
    for fds in eval(proc.stdout):
        # stdin/stdout/stderr, the child's own result pipe, the fan-out's
        # doorbell (see test_a_child_holds_only_its_own_fds in test_reliability.py), listdir's own fd
        assert len(fds) == 6 and fds[:3] == [0, 1, 2], fds


def test_die_with_parent_kills_child_when_parent_is_sigkilled():
    code = textwrap.dedent("""
        import os, signal, time, fastfork
        child = fastfork.start_child(time.sleep, (60,), die_with_parent=True)
        print(child.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == -signal.SIGKILL
    pid = int(proc.stdout.split()[0])
    for _ in range(500):
        if procutil.state(pid) in (None, "Z"):
            break
        time.sleep(0.01)
    assert procutil.state(pid) in (None, "Z")


def test_emfile_before_fork_is_a_clear_error_and_nothing_half_open():
    code = textwrap.dedent("""
        import os, resource, fastfork, procutil
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(held.pop())  # one free fd: not enough for a pipe pair plus pidfd
        before = procutil.open_fds()
        try:
            fastfork.start(lambda: 1)
        except OSError as exc:
            print(type(exc).__name__, exc.errno == 24, len(procutil.children()))
        print(procutil.open_fds() == before)
    """)
    proc = procutil.run_python(code)
    assert proc.stdout.split() == ["OSError", "True", "0", "True"], proc.stderr


def test_nested_fan_out_inside_a_child():
    def inner(x):
        return sum(fastfork.map(double, range(x)))
    assert fastfork.map(inner, [3, 4], jobs=2) == [6, 12]


def test_dropped_handle_is_reaped_later_not_leaked():
    import gc
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        child = fastfork.start(time.sleep, 0.05)
        pid = child.pid
        del child
        gc.collect()
    deadline = time.monotonic() + 30
    while procutil.state(pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has exited (a zombie: nobody reaped it)
    fastfork.start(double, 1).result()  # start() reaps dropped children
    assert procutil.state(pid) is None


def test_signal_during_at_fork_hook_is_not_lost():
    # os.fork runs a Python signal handler inside the hook and loses what it raises
    # ("Exception ignored"); fastfork holds signals until the hooks are done.
    code = textwrap.dedent("""
        import os, signal, time, fastfork, procutil
        def interrupt(*args):
            raise KeyboardInterrupt
        signal.signal(signal.SIGUSR1, interrupt)
        os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGUSR1))
        try:
            fastfork.start(time.sleep, 30)
            print("lost")
        except KeyboardInterrupt:
            print("raised", len(procutil.children()))
    """)
    proc = procutil.run_python(code)
    assert proc.stdout.split() == ["raised", "0"], proc.stderr
    assert "Exception ignored" not in proc.stderr
