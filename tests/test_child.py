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


@pytest.fixture(params=["pidfd", "polling"])
def mode(request, monkeypatch):
    """Run a test with pidfds (where the kernel has them) and with WNOHANG polling."""
    if request.param == "pidfd" and not child_module._HAVE_PIDFD:
        pytest.skip("no pidfd here")
    if request.param == "polling":
        monkeypatch.setattr(child_module, "_HAVE_PIDFD", False)
    return request.param


def test_wait_returns_exit_code_and_rusage(mode):
    child = fastfork.Child(raw_child(0.01, code=5))
    assert (child._pidfd >= 0) == (mode == "pidfd")
    assert child.wait() == 5
    assert child.returncode == 5 and child.rusage is not None and child.finished


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
    ready = procutil.Ready()
    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready.signal()
        time.sleep(30)
    with ready:
        kids = [fastfork.start(stubborn) for _ in range(2)] + [fastfork.Child(raw_child())]
        ready.wait(2)  # the stubborn ones have installed their handler
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
