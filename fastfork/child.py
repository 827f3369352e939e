"""Child: a handle on one process fastfork created, and the loop that waits on many.

A Child waits and signals through a pidfd where the kernel has them (Linux
5.4+), so a recycled pid is never signalled; elsewhere it polls with WNOHANG
and a capped exponential back-off on the monotonic clock. ``wait()`` without
a timeout, for a child with no pipes to drain, is one blocking waitid. Its pid and fds
live in C (fastfork._core.ChildHandle), which closes them when the handle is
dropped. Subclasses attach pipes that must be drained while the child runs
(results, captured output).
"""
from __future__ import annotations

import os
import select
import signal
import time

from fastfork import _core
from fastfork._checks import check_timeout, poll_ms
from fastfork.errors import TimeoutExpired

TYPE_CHECKING = False
if TYPE_CHECKING:
    import resource
    from collections.abc import Iterable
    from typing import TypeVar

    from typing_extensions import Self

    ChildT = TypeVar("ChildT", bound="Child")
    ChildrenT = TypeVar("ChildrenT", bound="Iterable[Child]")

__all__ = ["Child", "Watcher", "wait_all", "stop_all"]

# The core keeps the fds fastfork owns (each forked child closes them first),
# the lock that code making fds no child may inherit holds, and the children
# whose handles were dropped while they ran.
own_fd = _core.own_fd
close_owned = _core.close_owned
disown_fd = _core.disown_fd
close_inherited_fds = _core.close_inherited_fds
reap_dropped = _core.reap_dropped
_fd_lock = _core.fd_lock

_POLL_MIN, _POLL_MAX = 0.0005, 0.05


class Child(_core.ChildHandle):
    """A child process created by fastfork.

    Attributes: ``pid``; ``returncode`` -- None while running, the exit code,
    or -N if killed by signal N (as in subprocess.Popen); ``rusage`` -- the
    resource.struct_rusage of the finished child; ``lost`` -- True if the
    child was reaped by someone else (SIGCHLD ignored, a foreign waitpid),
    so its exit status is unknown.
    """

    # Class defaults until the child is reaped: no per-handle work to set them.
    returncode: int | None = None
    rusage: resource.struct_rusage | None = None
    lost: bool = False

    def __init__(self, pid: int | None, pidfd: int | None = None) -> None:
        """Take charge of child ``pid``; ``pidfd``, if given, is a pidfd for it
        that this handle now owns (e.g. received from a fork server; -1: none).
        A subclass may pass pid None for a handle whose process is made later.
        Raises TypeError for a non-integer pid, ValueError for a pid <= 0."""
        super().__init__(pid, pidfd)

    def __repr__(self) -> str:
        state = "running" if not self._finished else f"returncode={self.returncode}"
        return f"<{type(self).__name__} pid={self.pid} {state}>"

    # ------------------------------------------------------------ hooks

    def _readers(self):
        """Return {fd: callback(data)} of pipes to drain while waiting.

        The callback gets b"" at end of file and must then stop reading that fd.
        """
        return {}

    def _read(self, fd, callback):
        """Drain ``fd`` (non-blocking) into ``callback``; True at end of file."""
        while True:
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                return False
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            callback(data)
            if not data:
                return True

    def _drain(self):
        """Read whatever the child's pipes hold now, without blocking."""
        for fd, callback in list(self._readers().items()):
            self._read(fd, callback)

    def _finish(self):
        """Called once the process is reaped: drain and close its pipes."""
        self._drain()

    # ------------------------------------------------------------ state

    def _check_owner(self):
        if os.getpid() != self._owner:
            raise RuntimeError(
                f"this handle on child {self.pid} belongs to process {self._owner}; "
                "it cannot be used from another process")

    def _try_reap(self):
        """Reap the child if it has exited, without blocking; True once finished."""
        return self._reap(self._poll_status)

    def _reap(self, wait_call):
        """Reap the child with ``wait_call`` (``_poll_status``, or the blocking
        ``_wait_status``), then close its fds; True once finished."""
        if self._finished:
            return True
        if not self._reaped:
            try:
                pid, status, rusage = wait_call()
            except ChildProcessError:
                # Reaped elsewhere (SIGCHLD ignored, or a foreign waitpid): the exit
                # status is gone for good. Report it as unknown rather than hang.
                self.lost = True
                pid = self.pid
                status = rusage = None
            if pid == 0:
                return False
            if status is not None:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = rusage
            self._reaped = True
        # Finished only once its fds are closed: if a signal handler raises
        # in between, the next call (or stop_all) completes the job.
        self._close_pidfd()
        self._finish()
        self._finished = True
        return True

    @property
    def finished(self) -> bool:
        """True once the child has exited and been reaped (or found lost)."""
        return self._finished

    # ------------------------------------------------------------ public

    def poll(self) -> int | None:
        """Reap the child if it has exited; return ``returncode`` (None while running)."""
        self._check_owner()
        if not self._finished:
            self._drain()
            self._try_reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit and reap it.

        Returns ``returncode`` (None if the child was lost, see ``lost``).
        Raises fastfork.TimeoutExpired if it is still running after
        ``timeout`` seconds; ValueError/TypeError for a bad timeout.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        self._check_owner()
        if timeout is None and self._reaps_own_pid and not self._readers():
            # Nothing to drain while it runs: one blocking wait system call
            # instead of polling the pidfd and then reaping.
            self._reap(self._wait_status)
        else:
            wait_all([self], timeout)
        if not self._finished:
            raise TimeoutExpired(self.pid, timeout, cmd=getattr(self, "args", None))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child; does nothing once it has been reaped.

        Goes through the pidfd where there is one, so a recycled pid is never hit.
        """
        self._check_owner()
        if self._reaped or self._finished:
            return
        self._signal(sig)  # False if it has exited, not yet reaped

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate the child, wait ``timeout`` seconds, then SIGKILL; reap it.

        Returns ``returncode``.
        """
        stop_all([self], timeout)
        return self.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if os.getpid() == self._owner:
            self.stop()


class Watcher:
    """Polls the pidfds and pipes of a changing set of children.

    One poll set lives across calls, so a fan-out registers a child's fds once
    instead of on every wait. Children without a pidfd are polled with
    WNOHANG and a capped exponential back-off.
    """

    def __init__(self, children=()):
        self._poller = select.poll()
        self._owners = {}    # fd -> (child, reader callback, or None for the pidfd)
        self._polling = []   # children without a pidfd
        self._backoff = _POLL_MIN
        for child in children:
            self.add(child)

    def add(self, child):
        """Watch ``child`` until it finishes."""
        if child.finished:
            return
        if child._pidfd >= 0:
            self._register(child._pidfd, child, None)
        else:
            self._polling.append(child)
        for fd, callback in child._readers().items():
            self._register(fd, child, callback)

    def _register(self, fd, child, callback):
        self._owners[fd] = (child, callback)
        self._poller.register(fd, select.POLLIN)

    def _forget_fd(self, fd):
        del self._owners[fd]
        self._poller.unregister(fd)

    def forget(self, child):
        """Stop watching ``child`` (before its fds are closed elsewhere)."""
        for fd in [fd for fd, (owner, _) in self._owners.items() if owner is child]:
            self._forget_fd(fd)
        if child in self._polling:
            self._polling.remove(child)

    def step(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: no limit) for pipe data or an exit.

        Drains the pipes that have data and reaps the children that exited.
        Returns the children that finished in this step.
        """
        if self._polling:
            timeout = self._backoff if timeout is None else min(timeout, self._backoff)
            self._backoff = min(self._backoff * 2, _POLL_MAX)
        touched = []
        for fd, _ in self._poller.poll(poll_ms(timeout)):
            child, callback = self._owners[fd]
            if callback is None:
                # The pidfd is readable: the child has exited. Unregister first:
                # reaping closes the pidfd and its number may be reused.
                self._forget_fd(fd)
                touched.append(child)
            elif child._read(fd, callback):
                self._forget_fd(fd)
        finished = []
        for child in dict.fromkeys(touched + self._polling):
            if child._try_reap():
                self.forget(child)
                finished.append(child)
            elif child not in self._polling:
                self._polling.append(child)  # pidfd said exited, wait4 disagreed: poll it
        return finished

    def close(self):
        """Stop watching every child."""
        for fd in list(self._owners):
            self._forget_fd(fd)
        self._polling.clear()


def wait_all(children: Iterable[ChildT], timeout: float | None = None, *,
             until_any: bool = False) -> list[ChildT]:
    """Wait until every child (or, with ``until_any``, one) has finished.

    Drains each child's pipes meanwhile. At least one step is taken, even
    with a timeout of 0, so a child that has exited is reaped (as
    subprocess.Popen.wait(0) does). Returns the list of children that
    finished during this call or before it. Never raises on timeout: the
    caller checks ``finished``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    done = [c for c in children if c.finished]
    pending = [c for c in children if not c.finished]
    if not pending or (until_any and done):
        return done
    watcher = Watcher(pending)
    try:
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if watcher.step(remaining):
                done.extend(c for c in pending if c.finished)
                pending = [c for c in pending if not c.finished]
                if until_any:
                    break
            if remaining == 0:
                break
    finally:
        watcher.close()
    return done


def stop_all(children: ChildrenT, grace: float = 5.0, sig: int = signal.SIGTERM) -> ChildrenT:
    """Stop children: ``sig`` (SIGTERM), up to ``grace`` seconds, SIGKILL; reap all.

    Returns the children (all finished).
    """
    running = [c for c in children if not c.finished]
    for child in running:
        child._try_reap()
    running = [c for c in running if not c.finished]
    for child in running:
        child.send_signal(sig)
        # A stopped child cannot act on the signal until it is continued.
        child.send_signal(signal.SIGCONT)
    if running and grace:
        wait_all(running, grace)
    running = [c for c in running if not c.finished]
    for child in running:
        child.kill()
    while running:
        # SIGKILL cannot be caught; only a child stuck in the kernel (D state) waits here.
        wait_all(running, 1.0)
        running = [c for c in running if not c.finished]
    return children
