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
from __future__ import annotations

import contextlib
import functools
import itertools
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic, TypeVar, overload

from fastfork import _core
from fastfork._checks import check_callable, check_fan_out, check_timeout
from fastfork._chunks import chunked
from fastfork._result import FrameReader, decode_outcome
from fastfork.child import Child, close_inherited_fds, reap_dropped, stop_all
from fastfork.errors import ForkError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, Literal

    from typing_extensions import ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["FunctionChild", "start", "start_child", "map", "as_completed", "background",
           "in_input_order"]


class FunctionChild(Child, Generic[R]):
    """A child running a Python function; ``result()`` gives what it returned.

    Extra attributes: ``index`` and ``item`` (its place in a fan-out, or None)
    and ``timed_out`` (True if a fan-out's timeout stopped it).
    """

    index: int | None
    item: Any
    timed_out: bool

    def __init__(self, pid: int | None = None, result_fd: int = -1, *, index: int | None = None,
                 item: object = None, pidfd: int | None = None) -> None:
        # pid None: an unstarted handle that _core.fork_with_pipe fills in.
        # The result pipe's read end is the handle's from here on.
        self._adopt_result_fd(result_fd)
        self._frame = FrameReader()
        self._outcome: tuple[bool, Any] | None = None
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

    def result(self, timeout: float | None = None) -> R:
        """Wait for the child and return its function's return value.

        A function that ends in SystemExit with exit status 0 (``sys.exit()``,
        ``sys.exit(0)``) counts as returning None, as a program exiting 0 succeeds.
        Raises ChildError if the function raised (with the child's traceback;
        any other SystemExit too, with its exit code), the child died or exited
        without a result, or the result could not be pickled;
        fastfork.TimeoutExpired if still running after ``timeout``.
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


def start_child(fn: Callable[..., R], args: Iterable[Any] = (),
                kwargs: dict[str, Any] | None = None, *, die_with_parent: bool = False,
                print_traceback: bool = False, index: int | None = None, item: object = None,
                launched: list[Any] | None = None, stop_signal: int | None = None,
                keep_fds: Iterable[int] = ()) -> FunctionChild[R]:
    """Fork a child that runs ``fn(*args, **kwargs)``; return its FunctionChild.

    ``die_with_parent`` (Linux) has the kernel SIGKILL the child when this
    process dies. ``print_traceback`` also prints a failing child's traceback
    to its own stderr (it always travels to the parent inside ChildError).
    ``launched``, a list, gets the handle appended as soon as the process
    exists (before any signal handler can run), for callers that must stop
    every child they started whatever interrupts them.
    ``stop_signal``: the signal that will stop the child. It gets that
    signal's default action (KeyboardInterrupt for SIGINT) even where this
    process ignores or catches it, and one sent right after the fork is not
    lost. ``keep_fds``: fds of fastfork's own (see child.own_fd) that the
    child keeps open; it closes the others.
    Raises TypeError for a non-callable; OSError if the pipe or fork fails
    (nothing is left open or running then).
    """
    check_callable(fn)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    reap_dropped()
    child: FunctionChild[R] = FunctionChild(index=index, item=item)

    def child_main():
        close_inherited_fds(keep={child._write_fd, *keep_fds})
        if stop_signal is not None:
            _take_default_action(stop_signal)
        return _core.run_function(fn, tuple(args), kwargs, child._write_fd, print_traceback)

    try:
        # Pipe, fork and bookkeeping happen in one C call that records each
        # step on ``child``: a signal handler raising anywhere (Ctrl-C) can
        # neither leak the pipe nor lose the process.
        with _held_back(stop_signal):
            _core.fork_with_pipe(child_main, child, [] if launched is None else launched,
                                 signal.SIGKILL if die_with_parent else 0)
        return child
    except BaseException:
        child._abandon()
        raise


def start(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> FunctionChild[R]:
    """Fork a child that runs ``fn(*args, **kwargs)``; return its FunctionChild.

    For options (die_with_parent, print_traceback) use ``start_child``.
    Raises TypeError for a non-callable; OSError if fork fails.
    """
    return start_child(fn, args, kwargs)


@overload
def as_completed(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
                 timeout: float | None = None, return_exceptions: Literal[False] = False,
                 fork_retries: int = 8, grace: float = 1.0, die_with_parent: bool = True,
                 print_traceback: bool = False,
                 chunksize: int = 1) -> Iterator[tuple[int, R]]: ...


@overload
def as_completed(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
                 timeout: float | None = None, return_exceptions: Literal[True],
                 fork_retries: int = 8, grace: float = 1.0, die_with_parent: bool = True,
                 print_traceback: bool = False,
                 chunksize: int = 1) -> Iterator[tuple[int, R | BaseException]]: ...


@overload
def as_completed(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
                 timeout: float | None = None, return_exceptions: bool, fork_retries: int = 8,
                 grace: float = 1.0, die_with_parent: bool = True, print_traceback: bool = False,
                 chunksize: int = 1) -> Iterator[tuple[int, R | BaseException]]: ...


def as_completed(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
                 timeout: float | None = None, return_exceptions: bool = False,
                 fork_retries: int = 8, grace: float = 1.0, die_with_parent: bool = True,
                 print_traceback: bool = False,
                 chunksize: int = 1) -> Iterator[tuple[int, R | BaseException]]:
    """Run ``fn(item)`` in forked children; yield (index, result) per item as they finish.

    At most ``jobs`` children run at once (default: CPU count): one per item,
    or with ``chunksize`` > 1 one per chunk of that many items (results and
    errors stay per item; a chunk's child that crashes or times out fails
    every item of its chunk, each error naming its item). ``timeout`` limits
    each child's run time (time spent forking does not count); a child over
    it is stopped (SIGTERM, ``grace`` seconds, SIGKILL) without holding up
    the others, and fails with ChildTimeout however it then exits. fork
    failing with EAGAIN/ENOMEM is retried up to ``fork_retries`` times with
    back-off while running children finish.

    With ``return_exceptions`` a failed item yields its ChildError (or
    ForkError) as its result. Otherwise the first failure stops new launches,
    the running children finish, their results are yielded, and then the
    error is raised. On any exception in the parent (Ctrl-C included) or when
    the generator is closed, every running child is stopped and reaped.

    ``die_with_parent`` (default True, Linux) has the kernel SIGKILL the
    children when this process dies -- strictly, when the *thread* that
    forked them exits (PR_SET_PDEATHSIG). Children are forked by the thread
    that resumes the generator: consume it from one thread that outlives it.

    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    return _fan_out(functools.partial(_fan_out_locally, until_done=False), fn, iterable,
                    jobs=jobs, timeout=timeout, return_exceptions=return_exceptions,
                    fork_retries=fork_retries, grace=grace, die_with_parent=die_with_parent,
                    print_traceback=print_traceback, chunksize=chunksize)


@overload
def map(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
        timeout: float | None = None, return_exceptions: Literal[False] = False,
        fork_retries: int = 8, grace: float = 1.0, die_with_parent: bool = True,
        print_traceback: bool = False, chunksize: int = 1) -> list[R]: ...


@overload
def map(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
        timeout: float | None = None, return_exceptions: Literal[True], fork_retries: int = 8,
        grace: float = 1.0, die_with_parent: bool = True, print_traceback: bool = False,
        chunksize: int = 1) -> list[R | BaseException]: ...


@overload
def map(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
        timeout: float | None = None, return_exceptions: bool, fork_retries: int = 8,
        grace: float = 1.0, die_with_parent: bool = True, print_traceback: bool = False,
        chunksize: int = 1) -> list[R | BaseException]: ...


def map(fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
        timeout: float | None = None, return_exceptions: bool = False, fork_retries: int = 8,
        grace: float = 1.0, die_with_parent: bool = True, print_traceback: bool = False,
        chunksize: int = 1) -> list[R] | list[R | BaseException]:
    """Run ``fn(item)`` in forked children; return the results in input order.

    At most ``jobs`` children run at once (default: CPU count); see
    ``as_completed`` for ``chunksize``, ``timeout``, ``grace``,
    ``fork_retries`` and the rest. On failure every other child finishes or
    is stopped, everything is reaped, then the first ChildError (or
    ForkError) is raised -- or, with ``return_exceptions``, each failed
    item's error is returned in its place. A result the parent cannot
    unpickle is found once every child has run.

    ``die_with_parent`` (default True, Linux): the children are SIGKILLed if
    this process dies. They are forked by the calling thread, which stays
    inside ``map`` for their whole lifetime, so the kernel's per-thread
    death signal (PR_SET_PDEATHSIG) fires exactly when it should.

    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    return in_input_order(_fan_out(
        functools.partial(_fan_out_locally, until_done=True), fn, iterable, jobs=jobs,
        timeout=timeout, return_exceptions=return_exceptions, fork_retries=fork_retries,
        grace=grace, die_with_parent=die_with_parent, print_traceback=print_traceback,
        chunksize=chunksize))


def in_input_order(completed: Iterable[tuple[int, R]]) -> list[R]:
    """Return the results of an ``as_completed``-style iterator as a list in input order."""
    results = dict(completed)
    return [results[i] for i in range(len(results))]


def _fan_out(engine, fn, iterable, *, jobs, timeout, return_exceptions, fork_retries, grace,
             die_with_parent, print_traceback, chunksize):
    """Validate a fan-out's arguments, then run ``engine`` per item or per chunk.

    ``engine(fn, items, return_exceptions, print_traceback, *, jobs, timeout,
    fork_retries, grace, die_with_parent)`` is an as_completed-style fan-out;
    with ``chunksize`` > 1 it runs over chunks of the items (fastfork._chunks).
    """
    check_callable(fn)
    jobs, timeout, grace, fork_retries, chunksize = check_fan_out(
        jobs, timeout, grace, fork_retries, "fork_retries", chunksize)
    items = iter(iterable)
    fan = functools.partial(engine, jobs=jobs, timeout=timeout, fork_retries=fork_retries,
                            grace=grace, die_with_parent=die_with_parent)
    if chunksize == 1:
        return fan(fn, items, return_exceptions, print_traceback)
    return chunked(fan, fn, items, chunksize, return_exceptions, print_traceback)


def _fan_out_locally(fn, items, return_exceptions, print_traceback, *, jobs, timeout,
                     fork_retries, grace, die_with_parent, until_done):
    """as_completed over the iterator ``items`` with the C engine, _core.FanOut.

    ``until_done`` (map) lets the engine run every child before any result
    is decoded: then the parent's Python work happens once no child shares
    its pages, which is what makes map as fast as a bare os.fork loop.
    """
    reap_dropped()
    engine = _core.FanOut(fn, items, jobs, timeout, grace, fork_retries,
                          signal.SIGKILL if die_with_parent else 0, print_traceback,
                          not return_exceptions, _python_may_run_between_forks(items))
    yield from drive_engine(engine, items, return_exceptions, until_done, grace)


def drive_engine(engine, items, return_exceptions, until_done, grace):
    """as_completed over ``engine``: a _core.FanOut, or an object with its interface.

    ``items`` yields, after the engine's ``pending`` item, the items it never
    drew. Closes the engine (``grace``) however it ends.
    """
    reports = EngineReports(engine, items, return_exceptions)
    try:
        while not engine.done_running:
            yield from reports.take(engine.step(until_done))
        reports.finish()
    finally:
        engine.close(grace)


class EngineReports:
    """What an as_completed over ``engine`` hands out, apart from how it waits for the engine.

    ``take(outcomes)`` yields the (index, result or error) of a batch from
    ``engine.step``, and each item's ForkError once a fork has failed for
    good, keeping the first failure for the end (or, with
    ``return_exceptions``, handing out every one); ``finish()`` raises that
    failure once the engine is done. ``items`` as for ``drive_engine``.
    """

    def __init__(self, engine, items, return_exceptions):
        self._engine = engine
        self._items = items
        self._return_exceptions = return_exceptions
        self._first_error = None
        self._fork_error_seen = False

    def take(self, outcomes):
        """Yield (index, result or error) for the outcomes to hand out."""
        engine = self._engine
        for index, item, pid, returncode, kind, payload, timed_out, lost in outcomes:
            ok, value = decode_outcome(None if kind is None else (kind, payload),
                                       pid=pid, returncode=returncode, index=index,
                                       item=item, timed_out=timed_out, lost=lost)
            if ok or self._return_exceptions:
                yield index, value
            elif self._first_error is None:
                self._first_error = value
                engine.stop_launching()  # already so, unless unpickling failed here
        if engine.fork_error is not None and not self._fork_error_seen:
            self._fork_error_seen = True
            cause = engine.fork_error
            err = ForkError(cause.errno, cause.strerror, started=engine.started)
            if self._return_exceptions:
                # Per-item mode: every item that could not be started reports it.
                first_unstarted = engine.pending[0]
                rest = enumerate(self._items, first_unstarted + 1)
                for index, _ in itertools.chain([engine.pending], rest):
                    yield index, err
            elif self._first_error is None:
                self._first_error = err

    def finish(self):
        """Raise the first failure ``take`` kept, if any."""
        if self._first_error is not None:
            raise self._first_error


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


@contextlib.contextmanager
def background(fn: Callable[..., R], /, *args: Any, kwargs: dict[str, Any] | None = None,
               stop_signal: int = signal.SIGTERM, grace: float = 5.0,
               die_with_parent: bool = True) -> Iterator[FunctionChild[R]]:
    """Run ``fn(*args, **kwargs)`` in a child for the length of a ``with`` block.

    Yields the FunctionChild. On leaving the block, normally or by exception,
    the child is sent ``stop_signal`` (SIGINT suits servers that want
    KeyboardInterrupt), given ``grace`` seconds, then SIGKILLed, and reaped.
    The child always acts on ``stop_signal`` (its default action, even when
    this process ignores it, as a background job does SIGINT).
    ``die_with_parent`` (default True, Linux) kills it if this process dies.
    Raises TypeError/ValueError for bad arguments before any process is created.
    """
    check_callable(fn)
    grace = check_timeout(grace, "grace")
    stop_signal = signal.Signals(stop_signal)
    launched: list[FunctionChild[R]] = []
    try:
        yield start_child(fn, args, kwargs, die_with_parent=die_with_parent,
                          stop_signal=stop_signal, launched=launched)
    finally:
        stop_all(launched, grace, sig=stop_signal)


# Signals no process can catch, ignore or block: nothing to hand over.
_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)


@contextlib.contextmanager
def _held_back(sig):
    """Block ``sig`` in this thread for the block (None: do nothing).

    A child forked meanwhile starts with it blocked: one sent before the child
    has set its handler (``_take_default_action``) waits instead of meeting
    the parent's disposition, which may be SIG_IGN.
    """
    if sig is None or sig in _UNCATCHABLE:
        yield
        return
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _take_default_action(sig):
    """In a forked child: give ``sig`` its default action, then unblock it.

    SIGINT gets Python's KeyboardInterrupt handler; others SIG_DFL.
    """
    if sig in _UNCATCHABLE:
        return
    signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
