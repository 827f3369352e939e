"""Child: a handle on one process fastfork created, and the loop that waits on many.

A Child waits and signals through a pidfd where the kernel has one (Linux 5.3+),
so a recycled pid is never signalled; elsewhere it polls with WNOHANG and a
capped exponential back-off on the monotonic clock. Subclasses attach pipes
that must be drained while the child runs (results, captured output).
"""
import errno
import os
import select
import signal
import threading
import time

from fastfork import _core
from fastfork._checks import check_timeout, poll_ms
from fastfork.errors import TimeoutExpired

__all__ = ["Child", "Watcher", "wait_all", "stop_all"]

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
_HAVE_WAITID_PIDFD = _HAVE_PIDFD

# Fds fastfork holds open in this process (pipes, pidfds). A forked child closes
# them all first, so it never holds a sibling's pipe. Code that creates fds no
# child may inherit holds _fd_lock until they are registered or closed; the
# core's forks of fastfork children take it too (when other threads exist).
_owned_fds: set[int] = set()
_fd_lock = threading.Lock()

# (pid, pidfd or -1) of children whose handle was dropped while they ran:
# reaped later, never left.
_unreaped: list[tuple[int, int]] = []


def _after_fork_in_child():
    # A child forked while the lock was held (by fastfork's own fork, or by
    # another thread when user code calls os.fork) must be able to fork too.
    # Only one thread survives a fork, so no one else can hold it here.
    if _fd_lock.locked():
        _fd_lock.release()
    _unreaped.clear()  # the parent's children, not ours


os.register_at_fork(after_in_child=_after_fork_in_child)
_core._register_child_state(_owned_fds, _unreaped, _fd_lock)

_POLL_MIN, _POLL_MAX = 0.0005, 0.05


def own_fd(fd):
    """Record ``fd`` as fastfork's (closed in every child it forks); return it."""
    _owned_fds.add(fd)
    return fd


def close_owned(fd):
    """Close an fd recorded with own_fd()."""
    _owned_fds.discard(fd)
    os.close(fd)


# In a freshly forked child: close every fd fastfork owns but those in ``keep``.
close_inherited_fds = _core.close_inherited_fds


def reap_dropped():
    """Reap children whose handles were garbage-collected while they ran."""
    for entry in list(_unreaped):
        pid, pidfd = entry
        try:
            done = _wait_nohang(pid, pidfd)[0] != 0
        except ChildProcessError:
            done = True
        if done:
            _unreaped.remove(entry)
            if pidfd >= 0:
                close_owned(pidfd)


def _wait_nohang(pid, pidfd):
    """wait4(pid, WNOHANG), through ``pidfd`` where there is one (>= 0).

    By pidfd, a pid that was reaped elsewhere and reused can never be taken
    for the child. Returns (pid, status, rusage) as wait4 does.
    """
    global _HAVE_WAITID_PIDFD
    if pidfd >= 0 and _HAVE_WAITID_PIDFD:
        try:
            return _core._wait_pidfd(pidfd, os.WNOHANG)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _HAVE_WAITID_PIDFD = False  # Linux 5.3: pidfd_open but no P_PIDFD
    return _core.wait4(pid, os.WNOHANG)


class Child:
    """A child process created by fastfork.

    Attributes: ``pid``; ``returncode`` -- None while running, the exit code,
    or -N if killed by signal N (as in subprocess.Popen); ``rusage`` -- the
    resource.struct_rusage of the finished child; ``lost`` -- True if the
    child was reaped by someone else (SIGCHLD ignored, a foreign waitpid),
    so its exit status is unknown.
    """

    def __init__(self, pid, pidfd=None):
        """Take charge of child ``pid``; ``pidfd``, if given, is a pidfd for it
        that this handle now owns (e.g. received from a fork server). A
        subclass may pass pid None for a handle whose process is made later."""
        self.pid = pid
        self.returncode = None
        self.rusage = None
        self.lost = False
        self._reaped = False    # the exit status has been collected
        self._finished = False  # ... and every fd of the handle closed
        self._owner = os.getpid()
        self._pidfd = -1
        if pidfd is not None:
            self._pidfd = own_fd(pidfd)
        elif _HAVE_PIDFD and pid is not None:
            try:
                self._pidfd = own_fd(os.pidfd_open(pid))
            except OSError:
                # EMFILE, or the child already vanished: fall back to polling.
                self._pidfd = -1

    def __repr__(self):
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

    def _close_fds(self):
        """Close every fd this handle holds: the attributes named in ``_fd_attrs``."""
        for name in self._fd_attrs:
            _core.close_fd_attr(self, name)

    # ------------------------------------------------------------ state

    def _check_owner(self):
        if os.getpid() != self._owner:
            raise RuntimeError(
                f"this handle on child {self.pid} belongs to process {self._owner}; "
                "it cannot be used from another process")

    def _close_pidfd(self):
        _core.close_fd_attr(self, "_pidfd")

    def _try_reap(self):
        """Reap the child if it has exited, without blocking; True once finished."""
        if self._finished:
            return True
        if not self._reaped:
            try:
                pid, status, rusage = _wait_nohang(self.pid, self._pidfd)
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
    def finished(self):
        """True once the child has exited and been reaped (or found lost)."""
        return self._finished

    # ------------------------------------------------------------ public

    def poll(self):
        """Reap the child if it has exited; return ``returncode`` (None while running)."""
        self._check_owner()
        if not self._finished:
            self._drain()
            self._try_reap()
        return self.returncode

    def wait(self, timeout=None):
        """Wait for the child to exit and reap it.

        Returns ``returncode`` (None if the child was lost, see ``lost``).
        Raises fastfork.TimeoutExpired if it is still running after
        ``timeout`` seconds; ValueError/TypeError for a bad timeout.
        """
        timeout = check_timeout(timeout)
        self._check_owner()
        wait_all([self], timeout)
        if not self._finished:
            raise TimeoutExpired(self.pid, timeout, cmd=getattr(self, "args", None))
        return self.returncode

    def send_signal(self, sig):
        """Send ``sig`` to the child; does nothing once it has been reaped.

        Goes through the pidfd where there is one, so a recycled pid is never hit.
        """
        self._check_owner()
        if self._reaped or self._finished:
            return
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                # Not reaped yet, so the pid still names our child (or its zombie).
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass  # exited, not yet reaped

    def terminate(self):
        """Send SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self):
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def stop(self, timeout=5.0):
        """Terminate the child, wait ``timeout`` seconds, then SIGKILL; reap it.

        Returns ``returncode``.
        """
        stop_all([self], timeout)
        return self.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if os.getpid() == self._owner:
            self.stop()

    # The attributes holding the handle's fds (subclasses add their pipes).
    _fd_attrs: tuple[str, ...] = ("_pidfd",)
    # False where another process reaps the child (a fork server's children).
    _reaps_own_pid = True
    # In C: a Python __del__ would swallow a Ctrl-C that lands while it runs.
    __del__ = _core.finalize_child


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


def wait_all(children, timeout=None, *, until_any=False):
    """Wait until every child (or, with ``until_any``, one) has finished.

    Drains each child's pipes meanwhile. Returns the list of children that
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
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if watcher.step(remaining):
                done.extend(c for c in pending if c.finished)
                pending = [c for c in pending if not c.finished]
                if until_any:
                    break
    finally:
        watcher.close()
    return done


def stop_all(children, grace=5.0, sig=signal.SIGTERM):
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
