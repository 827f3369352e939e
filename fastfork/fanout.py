"""Safe fan-out of Python callables over forked children.

``start`` forks one child running a function; ``map`` and ``as_completed`` fan
a function out over many items, at most ``jobs`` at a time; ``background``
ties a helper process to a ``with`` block.

Every child ends in ``_exit`` by construction (the fork and the call sit in one
C function: ``fastfork._core.fork_with_pipe`` for ``start``, the engine
``fastfork._core.FanOut`` for ``map`` and ``as_completed``): whatever the
function does, it never runs on into the parent's code, the parent's atexit
handlers or a test runner's teardown. Return values and tracebacks travel back
pickled over a close-on-exec pipe that the parent drains while it waits, so
large results never deadlock.
"""
import contextlib
import itertools
import pickle
import signal
import time
from collections.abc import Iterable

from fastfork import _core
from fastfork._result import OK, FrameReader
from fastfork._checks import check_callable, check_jobs, check_timeout
from fastfork.child import Child, Watcher, close_inherited_fds, reap_dropped, stop_all
from fastfork.errors import RETRYABLE_FORK_ERRNOS, ChildError, ForkError, describe_status

__all__ = ["FunctionChild", "start", "start_child", "map", "as_completed", "background",
           "fan_out", "in_input_order"]


class FunctionChild(Child):
    """A child running a Python function; ``result()`` gives what it returned.

    Extra attributes: ``index`` and ``item`` (its place in a fan-out, or None)
    and ``timed_out`` (True if a fan-out's timeout stopped it).
    """

    def __init__(self, pid=None, result_fd=-1, *, index=None, item=None, pidfd=None):
        # pid None: an unstarted handle that _core.fork_with_pipe fills in.
        # The result pipe's read end is the handle's from here on.
        self._adopt_result_fd(result_fd)
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

    def _decode(self):
        """Turn what the child sent (or failed to send) into (ok, value_or_error)."""
        frame = self._frame.frame()
        self._frame = FrameReader()  # free the bytes once decoded
        return decode_outcome(frame, pid=self.pid, returncode=self.returncode,
                              index=self.index, item=self.item,
                              timed_out=self.timed_out, lost=self.lost)


def decode_outcome(frame, *, pid, returncode, index, item, timed_out, lost):
    """Turn a child's result frame into (True, value) or (False, ChildError).

    ``frame`` is (kind, payload) as it arrived whole, or None if none did.
    ``index``/``item`` place the child in a fan-out (index None: not in one);
    ``timed_out``: a fan-out's timeout stopped it; ``lost``: reaped by
    someone else, so ``returncode`` is unknown.
    """
    where = f"child {pid}"
    if index is not None:
        where += f" (item {index}: {_short_repr(item)})"

    def error(message, **fields):
        return ChildError(f"{where} {message}", pid=pid, returncode=returncode, index=index,
                          item=_short_repr(item) if index is not None else None, **fields)

    if frame is None:
        if timed_out:
            return False, error(f"timed out and was stopped ({describe_status(returncode)})")
        if lost:
            return False, error("was reaped by someone else (ECHILD): its outcome is unknown")
        return False, error(f"{describe_status(returncode)} without a result")
    kind, payload = frame
    try:
        data = pickle.loads(payload)
    except Exception as exc:  # not BaseException: a Ctrl-C here must propagate
        return False, error(f"sent a result that could not be unpickled: {exc!r}")
    if kind == OK:
        return True, data
    cause = None
    if data["exception"] is not None:
        with contextlib.suppress(Exception):
            cause = pickle.loads(data["exception"])
    err = error(f"{data['stage']}: {data['exc_type']}: {data['message']}",
                exc_type=data["exc_type"], remote_traceback=data["traceback"])
    err.__cause__ = cause
    return False, err


def _short_repr(item, limit=80):
    try:
        text = repr(item)
    except Exception:
        text = f"<{type(item).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        return _core.run_function(fn, tuple(args), kwargs, child._write_fd, print_traceback)

    try:
        # Pipe, fork and bookkeeping happen in one C call that records each
        # step on ``child``: a signal handler raising anywhere (Ctrl-C) can
        # neither leak the pipe nor lose the process.
        _core.fork_with_pipe(child_main, child, [] if launched is None else launched,
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
    jobs, timeout, grace = _check_fan_out(fn, jobs, timeout, grace, fork_retries)
    return _fan_out_locally(fn, iter(iterable), jobs, timeout, return_exceptions,
                            fork_retries, grace, die_with_parent, print_traceback,
                            until_done=False)


def _check_fan_out(fn, jobs, timeout, grace, fork_retries):
    """Validate a fan-out's options; return (jobs, timeout, grace) normalised."""
    check_callable(fn)
    jobs = check_jobs(jobs)
    timeout = check_timeout(timeout, allow_zero=False)
    grace = check_timeout(grace, "grace")
    if isinstance(fork_retries, bool) or not isinstance(fork_retries, int) or fork_retries < 0:
        raise ValueError(f"fork_retries must be an int >= 0, not {fork_retries!r}")
    return jobs, timeout, grace


def _fan_out_locally(fn, items, jobs, timeout, return_exceptions, fork_retries, grace,
                     die_with_parent, print_traceback, until_done):
    """as_completed over the iterator ``items`` with the C engine, _core.FanOut.

    ``until_done`` (map) lets the engine run every child before any result
    is decoded: then the parent's Python work happens once no child shares
    its pages, which is what makes map as fast as a bare os.fork loop.
    """
    reap_dropped()
    engine = _core.FanOut(fn, items, jobs, timeout, grace, fork_retries,
                          signal.SIGKILL if die_with_parent else 0, print_traceback,
                          not return_exceptions, _python_may_run_between_forks(items))
    first_error = None
    fork_error_seen = False
    try:
        while not engine.done_running:
            for index, item, pid, returncode, kind, payload, timed_out, lost in engine.step(until_done):
                ok, value = decode_outcome(None if kind is None else (kind, payload),
                                           pid=pid, returncode=returncode, index=index,
                                           item=item, timed_out=timed_out, lost=lost)
                if ok or return_exceptions:
                    yield index, value
                elif first_error is None:
                    first_error = value
                    engine.stop_launching()  # already so, unless unpickling failed here
            if engine.fork_error is not None and not fork_error_seen:
                fork_error_seen = True
                cause = engine.fork_error
                err = ForkError(cause.errno, cause.strerror, started=engine.started)
                if return_exceptions:
                    # Per-item mode: every item that could not be started reports it.
                    first_unstarted = engine.pending[0]
                    rest = enumerate(items, first_unstarted + 1)
                    for index, _ in itertools.chain([engine.pending], rest):
                        yield index, err
                elif first_error is None:
                    first_error = err
        if first_error is not None:
            raise first_error
    finally:
        engine.close(grace)


# Iterators whose next() runs no Python code (so cannot print).
_C_ITERABLES: tuple[Iterable[object], ...] = ([], (), range(1), range(1 << 64), "", b"")
_C_ITERATORS = frozenset(type(iter(x)) for x in _C_ITERABLES)


def _python_may_run_between_forks(items):
    """True if Python code may run in this process between two forks of a fan-out.

    Such code (a generator producing the items, a signal handler) may print,
    and what it leaves buffered in sys.stdout would be printed again by the
    next child: then stdio is flushed before every fork, not just the first.
    (Other threads are checked by the engine at each fork.)
    """
    if type(items) not in _C_ITERATORS:
        return True
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            return True
    return False


def fan_out(starter, fn, iterable, *, jobs=None, timeout=None, return_exceptions=False,
            fork_retries=8, grace=1.0, die_with_parent=False, print_traceback=False):
    """``as_completed`` with the function that starts one child as a parameter.

    ``starter`` takes the arguments of ``start_child`` (``launched``
    included) and returns a FunctionChild; a fork server passes its own.
    This is the scheduler written in Python, over child handles; fastfork's
    own forks go through the C engine instead (``_fan_out_locally``).
    Validates like as_completed.
    """
    jobs, timeout, grace = _check_fan_out(fn, jobs, timeout, grace, fork_retries)
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
                    if exc.errno not in RETRYABLE_FORK_ERRNOS:
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
    A result the parent cannot unpickle is found once every child has run.
    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    jobs, timeout, grace = _check_fan_out(fn, jobs, timeout, grace, fork_retries)
    return in_input_order(_fan_out_locally(
        fn, iter(iterable), jobs, timeout, return_exceptions, fork_retries, grace,
        die_with_parent, print_traceback, until_done=True))


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
