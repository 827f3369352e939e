"""fastfork.Child on its own: waiting, signalling, stopping -- with and without pidfds."""
import os
import signal
import time

import pytest

import fastfork
import procutil
from fastfork import child as child_module


def raw_child(seconds=30.0, code=0):
    """Fork a plain child that sleeps then exits with ``code``; return its pid."""
    pid = fastfork.fork()
    if pid == 0:
        try:
            time.sleep(seconds)
        finally:
            os._exit(code)
    return pid


@pytest.fixture
def mode(pidfd_mode):
    """With pidfds and with WNOHANG polling (conftest's pidfd_mode)."""
    return pidfd_mode


def test_wait_returns_exit_code_and_rusage(mode):
    child = fastfork.Child(raw_child(0.01, code=5))
    assert (child._pidfd >= 0) == (mode == "pidfd")
    assert child.wait() == 5
    assert child.returncode == 5 and child.rusage is not None and child.finished


def wait_until_exited(pid):
    """Block until ``pid`` has exited, leaving it to be reaped (waitid with WNOWAIT)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_wait_zero_reaps_a_child_that_has_exited(mode):
    # As subprocess.Popen.wait(0): an exited child is reaped, not timed out.
    child = fastfork.Child(raw_child(0.0, code=3))
    wait_until_exited(child.pid)
    assert child.wait(0) == 3
    assert child.finished and child.returncode == 3


def test_result_zero_of_a_child_that_has_exited(mode):
    child = fastfork.start(int, "7")
    wait_until_exited(child.pid)
    assert child.result(0) == 7


def test_wait_timeout_then_kill(mode):
    child = fastfork.Child(raw_child())
    with pytest.raises(fastfork.TimeoutExpired) as info:
        child.wait(timeout=0.05)
    assert info.value.pid == child.pid and info.value.timeout == 0.05
    child.kill()
    assert child.wait() == -signal.SIGKILL


def test_wait_all_until_any_returns_first_finisher(mode):
    slow, fast = fastfork.Child(raw_child()), fastfork.Child(raw_child(0.01))
    done = child_module.wait_all([slow, fast], timeout=10, until_any=True)
    assert done == [fast]
    child_module.stop_all([slow], grace=1)
    assert slow.returncode == -signal.SIGTERM


def test_stop_all_escalates_and_reaps_everything(mode):
    ready_r, ready_w = os.pipe()

    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(ready_w, b"!")
        time.sleep(30)
    try:
        kids = [fastfork.start(stubborn) for _ in range(2)] + [fastfork.Child(raw_child())]
        ready = b""
        while len(ready) < 2:  # both stubborn ones ignore SIGTERM now
            ready += os.read(ready_r, 2)
    finally:
        os.close(ready_r)
        os.close(ready_w)
    child_module.stop_all(kids, grace=0.2)
    assert [k.returncode for k in kids] == [-signal.SIGKILL, -signal.SIGKILL, -signal.SIGTERM]


def test_foreign_reap_marks_lost(mode):
    pid = raw_child(0.0)
    child = fastfork.Child(pid)
    os.waitpid(pid, 0)
    assert child.wait(timeout=5) is None
    assert child.lost and child.finished


def test_signals_after_reap_do_nothing(mode):
    child = fastfork.Child(raw_child(0.0))
    child.wait()
    child.terminate()
    child.kill()
    child.send_signal(signal.SIGUSR1)
    assert child.returncode == 0


def test_repr_and_context_manager(mode):
    with fastfork.Child(raw_child()) as child:
        assert "running" in repr(child)
    assert "returncode=-15" in repr(child)


def test_huge_timeouts_do_not_overflow(mode):
    child = fastfork.Child(raw_child(0.01))
    assert child.wait(timeout=1e12) == 0


@pytest.mark.parametrize("pid, error", [(0, ValueError), (-1, ValueError), ("1", TypeError),
                                        (1.5, TypeError)])
def test_bad_pids_are_refused(pid, error):
    with pytest.raises(error):
        fastfork.Child(pid)


def test_an_unstarted_handle_never_waits_for_or_signals_the_process_group():
    # pid 0 would mean "any child in the process group" to wait4() and kill().
    handle = fastfork.FunctionChild()
    assert handle.pid is None
    with pytest.raises(ChildProcessError):
        handle._poll_status()
    with pytest.raises(ChildProcessError):
        handle._signal(signal.SIGKILL)


def test_dropping_a_handle_closes_its_fds_and_queues_a_running_child(mode):
    import gc
    import warnings
    before = procutil.open_fds()
    ready_r, ready_w = os.pipe()  # the child exits once this is closed
    pid = fastfork.fork()
    if pid == 0:
        try:
            os.close(ready_w)
            os.read(ready_r, 1)
        finally:
            os._exit(0)
    os.close(ready_r)
    child = fastfork.Child(pid)
    assert child._owner == os.getpid()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del child
        gc.collect()
    assert [str(w.message) for w in caught] == [f"child {pid} is still running"]
    assert caught[0].category is ResourceWarning
    # Its pidfd (if any) goes with the queued child until that is reaped.
    assert len(procutil.open_fds() - before) == (2 if mode == "pidfd" else 1)
    os.close(ready_w)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    child_module.reap_dropped()
    assert procutil.state(pid) is None
    assert procutil.open_fds() == before


def test_dropping_the_handle_of_an_exited_child_reaps_it_at_once(mode):
    import gc
    import warnings
    pid = raw_child(0.0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        child = fastfork.Child(pid)
        del child
        gc.collect()
    assert caught == []
    assert procutil.state(pid) is None
