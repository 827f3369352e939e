"""Safe fan-out of Python callables over forked children.

``start`` forks one child running a function; ``map`` and ``as_completed`` fan
a function out over many items, at most ``jobs`` at a time; ``background``
ties a helper process to a ``with`` block.

Every child ends in ``_exit`` by construction (``fastfork._core.fork_with_pipe``):
whatever the function does, it never runs on into the parent's code, the
parent's atexit handlers or a test runner's teardown. Return values and
tracebacks travel back pickled over a close-on-exec pipe that the parent drains
while it waits, so large results never deadlock.
"""
import contextlib
import errno
import itertools
import pickle
import signal
import time
import traceback

from fastfork import _core
from fastfork._result import ERROR, OK, FrameReader, error_payload, write_frame
from fastfork._checks import check_callable, check_jobs, check_timeout
from fastfork.child import (Child, Watcher, _owned_fds, close_inherited_fds,
                            reap_dropped, stop_all)
from fastfork.errors import ChildError, ForkError, describe_status

__all__ = ["FunctionChild", "start", "start_child", "map", "as_completed", "background",
           "fan_out", "in_input_order"]

_RETRYABLE = (errno.EAGAIN, errno.ENOMEM)


class FunctionChild(Child):
    """A child running a Python function; ``result()`` gives what it returned.

    Extra attributes: ``index`` and ``item`` (its place in a fan-out, or None)
    and ``timed_out`` (True if a fan-out's timeout stopped it).
    """

    _fd_attrs = ("_pidfd", "_result_fd", "_write_fd")

    def __init__(self, pid=None, result_fd=-1, *, index=None, item=None, pidfd=None):
        # pid None: an unstarted handle that _core.fork_with_pipe fills in.
        self._result_fd = result_fd
        self._write_fd = -1
        self._frame = FrameReader()
        self._outcome = None
        self.index = index
        self.item = item
        self.timed_out = False
        super().__init__(pid, pidfd)

    def _readers(self):
        if self._result_fd < 0:
            return {}
        return {self._result_fd: self._feed}

    def _feed(self, data):
        self._frame.feed(data)
        if not data:
            self._close_result_fd()

    def _close_result_fd(self):
        _core.close_fd_attr(self, "_result_fd")

    def _finish(self):
        # The child has exited, so everything it wrote is in the pipe now; a
        # grandchild that still holds the write end is not waited for.
        self._drain()
        self._close_result_fd()

    def _abandon(self):
        """Undo a start that an exception cut short: kill, reap, close everything."""
        if self.pid is not None and not self.finished:
            stop_all([self], 0)  # no grace: straight to SIGKILL
        self._close_fds()

    def result(self, timeout=None):
        """Wait for the child and return its function's return value.

        Raises ChildError if the function raised (with the child's traceback),
        the child died or exited without a result, or the result could not be
        pickled; fastfork.TimeoutExpired if still running after ``timeout``.
        """
        if not self.finished:
            self.wait(timeout)
        if self._outcome is None:
            self._outcome = self._decode()
        ok, value = self._outcome
        if ok:
            return value
        raise value

    def _describe(self):
        where = f"child {self.pid}"
        if self.index is not None:
            where += f" (item {self.index}: {_short_repr(self.item)})"
        return where

    def _error(self, message, **fields):
        return ChildError(f"{self._describe()} {message}", pid=self.pid,
                          returncode=self.returncode, index=self.index,
                          item=_short_repr(self.item) if self.index is not None else None,
                          **fields)

    def _decode(self):
        """Turn what the child sent (or failed to send) into (ok, value_or_error)."""
        frame = self._frame.frame()
        self._frame = FrameReader()  # free the bytes once decoded
        if frame is None:
            if self.timed_out:
                return False, self._error(
                    f"timed out and was stopped ({describe_status(self.returncode)})")
            if self.lost:
                return False, self._error("was reaped by someone else (ECHILD): its outcome is unknown")
            return False, self._error(f"{describe_status(self.returncode)} without a result")
        kind, payload = frame
        try:
            data = pickle.loads(payload)
        except Exception as exc:  # not BaseException: a Ctrl-C here must propagate
            return False, self._error(f"sent a result that could not be unpickled: {exc!r}")
        if kind == OK:
            return True, data
        cause = None
        if data["exception"] is not None:
            with contextlib.suppress(Exception):
                cause = pickle.loads(data["exception"])
        err = self._error(f"{data['stage']}: {data['exc_type']}: {data['message']}",
                          exc_type=data["exc_type"], remote_traceback=data["traceback"])
        err.__cause__ = cause
        return False, err


def _short_repr(item, limit=80):
    try:
        text = repr(item)
    except Exception:
        text = f"<{type(item).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _exit_code_of(exc):
    """The exit status Python would use for an uncaught SystemExit ``exc``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    return 1


def _run_in_child(fn, args, kwargs, result_fd, print_traceback):
    """The child's whole life after fork: call, send the outcome, return the exit code.

    (fork_call flushes stdio and ``_exit``s with the code.)
    """
    code = 0
    try:
        value = fn(*args, **kwargs)
    except SystemExit as exc:
        code = _exit_code_of(exc)
        kind, payload = ERROR, error_payload(exc, "exited")
    except BaseException as exc:
        code = 1
        if print_traceback:
            traceback.print_exc()
        kind, payload = ERROR, error_payload(exc, "raised")
    else:
        try:
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            kind = OK
        except BaseException as exc:
            code = 1
            kind, payload = ERROR, error_payload(exc, "returned a result that could not be pickled")
    write_frame(result_fd, kind, payload)
    return code


def start_child(fn, args=(), kwargs=None, *, die_with_parent=False,
                print_traceback=False, index=None, item=None, launched=None):
    """Fork a child that runs ``fn(*args, **kwargs)``; return its FunctionChild.

    ``die_with_parent`` (Linux) has the kernel SIGKILL the child when this
    process dies. ``print_traceback`` also prints a failing child's traceback
    to its own stderr (it always travels to the parent inside ChildError).
    ``launched``, a list, gets the handle appended as soon as the process
    exists (before any signal handler can run), for callers that must stop
    every child they started whatever interrupts them.
    Raises TypeError for a non-callable; OSError if the pipe or fork fails
    (nothing is left open or running then).
    """
    check_callable(fn)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    reap_dropped()
    child = FunctionChild(index=index, item=item)

    def child_main():
        close_inherited_fds(keep={child._write_fd})
        return _run_in_child(fn, args, kwargs, child._write_fd, print_traceback)

    try:
        # Pipe, fork and bookkeeping happen in one C call that records each
        # step on ``child``: a signal handler raising anywhere (Ctrl-C) can
        # neither leak the pipe nor lose the process.
        _core.fork_with_pipe(child_main, child, _owned_fds, [] if launched is None else launched,
                             signal.SIGKILL if die_with_parent else 0)
        return child
    except BaseException:
        child._abandon()
        raise


def start(fn, /, *args, **kwargs):
    """Fork a child that runs ``fn(*args, **kwargs)``; return its FunctionChild.

    For options (die_with_parent, print_traceback) use ``start_child``.
    Raises TypeError for a non-callable; OSError if fork fails.
    """
    return start_child(fn, args, kwargs)


def as_completed(fn, iterable, *, jobs=None, timeout=None, return_exceptions=False,
                 fork_retries=8, grace=1.0, die_with_parent=False, print_traceback=False):
    """Run ``fn(item)`` in a forked child per item; yield (index, result) as they finish.

    At most ``jobs`` children run at once (default: CPU count). ``timeout``
    limits each child's run time (time spent forking does not count); a child
    over it is stopped (SIGTERM, ``grace`` seconds, SIGKILL) and reported.
    fork failing with EAGAIN/ENOMEM is retried up to ``fork_retries`` times
    with back-off while running children finish.

    With ``return_exceptions`` a failed item yields its ChildError (or
    ForkError) as its result. Otherwise the first failure stops new launches,
    the running children finish, their results are yielded, and then the
    error is raised. On any exception in the parent (Ctrl-C included) or when
    the generator is closed, every running child is stopped and reaped.

    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    return fan_out(start_child, fn, iterable, jobs=jobs, timeout=timeout,
                   return_exceptions=return_exceptions, fork_retries=fork_retries,
                   grace=grace, die_with_parent=die_with_parent,
                   print_traceback=print_traceback)


def fan_out(starter, fn, iterable, *, jobs=None, timeout=None, return_exceptions=False,
            fork_retries=8, grace=1.0, die_with_parent=False, print_traceback=False):
    """``as_completed`` with the function that starts one child as a parameter.

    ``starter`` takes the arguments of ``start_child`` (``launched``
    included) and returns a FunctionChild; a fork server passes its own.
    Validates like as_completed.
    """
    check_callable(fn)
    jobs = check_jobs(jobs)
    timeout = check_timeout(timeout, allow_zero=False)
    grace = check_timeout(grace, "grace")
    if isinstance(fork_retries, bool) or not isinstance(fork_retries, int) or fork_retries < 0:
        raise ValueError(f"fork_retries must be an int >= 0, not {fork_retries!r}")
    items = enumerate(iter(iterable))
    return _as_completed(starter, fn, items, jobs, timeout, return_exceptions, fork_retries,
                         grace, die_with_parent, print_traceback)


def _as_completed(starter, fn, items, jobs, timeout, return_exceptions, fork_retries, grace,
                  die_with_parent, print_traceback):
    launched = []         # every child started: stopped in the end, whatever happens
    running = {}          # FunctionChild -> deadline (or None)
    first_error = None
    next_item = None      # an (index, item) whose fork is being retried
    fork_failures = 0
    backoff_until = 0.0
    started = 0
    watcher = Watcher()
    try:
        while True:
            # Launch while there is room, no failure stopped us, and no back-off.
            while first_error is None and len(running) < jobs and time.monotonic() >= backoff_until:
                if next_item is None:
                    next_item = next(items, None)
                    if next_item is None:
                        break
                index, item = next_item
                try:
                    child = starter(fn, (item,), None, die_with_parent=die_with_parent,
                                    print_traceback=print_traceback, index=index, item=item,
                                    launched=launched)
                except OSError as exc:
                    if exc.errno not in _RETRYABLE:
                        raise
                    fork_failures += 1
                    if fork_failures <= fork_retries:
                        backoff_until = time.monotonic() + min(0.005 * 2 ** fork_failures, 0.5)
                        continue
                    err = ForkError(exc.errno, exc.strerror, started=started)
                    if not return_exceptions:
                        first_error = err
                        break
                    # Per-item mode: every item that could not be started reports it.
                    for index, _ in itertools.chain([next_item], items):
                        yield index, err
                    next_item = None
                    break
                next_item = None
                fork_failures = 0
                started += 1
                running[child] = None if timeout is None else time.monotonic() + timeout
                watcher.add(child)
            if not running:
                if next_item is not None and first_error is None:
                    time.sleep(max(0.0, backoff_until - time.monotonic()))
                    continue
                break
            wait_for = None
            deadlines = [d for d in running.values() if d is not None]
            if deadlines:
                wait_for = max(0.0, min(deadlines) - time.monotonic())
            if next_item is not None and first_error is None:
                pause = max(0.0, backoff_until - time.monotonic())
                wait_for = pause if wait_for is None else min(wait_for, pause)
            watcher.step(wait_for)
            now = time.monotonic()
            for child in list(running):
                if not child.finished:
                    deadline = running[child]
                    if deadline is None or now < deadline:
                        continue
                    child.timed_out = True
                    watcher.forget(child)  # stopping it closes its fds
                    stop_all([child], grace)
                del running[child]
                launched.remove(child)
                try:
                    value = child.result()
                except ChildError as err:
                    if return_exceptions:
                        yield child.index, err
                    elif first_error is None:
                        first_error = err
                    continue
                yield child.index, value
        if first_error is not None:
            raise first_error
    finally:
        watcher.close()
        stop_all(launched, grace)
        for child in launched:
            child._close_fds()  # closed already, unless a signal cut that short


def map(fn, iterable, *, jobs=None, timeout=None, return_exceptions=False, fork_retries=8,
        grace=1.0, die_with_parent=False, print_traceback=False):
    """Run ``fn(item)`` in one forked child per item; return the results in input order.

    At most ``jobs`` children run at once (default: CPU count); see
    ``as_completed`` for ``timeout``, ``grace``, ``fork_retries`` and the rest.
    On failure every other child finishes or is stopped, everything is reaped,
    then the first ChildError (or ForkError) is raised -- or, with
    ``return_exceptions``, each failed item's error is returned in its place.
    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    return in_input_order(as_completed(
        fn, iterable, jobs=jobs, timeout=timeout, return_exceptions=return_exceptions,
        fork_retries=fork_retries, grace=grace, die_with_parent=die_with_parent,
        print_traceback=print_traceback))


def in_input_order(completed):
    """Return the results of an ``as_completed``-style iterator as a list in input order."""
    results = dict(completed)
    return [results[i] for i in range(len(results))]


@contextlib.contextmanager
def background(fn, /, *args, kwargs=None, stop_signal=signal.SIGTERM, grace=5.0,
               die_with_parent=True):
    """Run ``fn(*args, **kwargs)`` in a child for the length of a ``with`` block.

    Yields the FunctionChild. On leaving the block, normally or by exception,
    the child is sent ``stop_signal`` (SIGINT suits servers that want
    KeyboardInterrupt), given ``grace`` seconds, then SIGKILLed, and reaped.
    ``die_with_parent`` (default True, Linux) kills it if this process dies.
    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    check_callable(fn)
    grace = check_timeout(grace, "grace")
    stop_signal = signal.Signals(stop_signal)
    child = start_child(fn, args, kwargs, die_with_parent=die_with_parent)
    try:
        yield child
    finally:
        stop_all([child], grace, sig=stop_signal)
