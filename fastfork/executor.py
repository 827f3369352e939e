"""ForkExecutor: a concurrent.futures executor that runs every task in a fresh forked process.

Code written against ``concurrent.futures.Executor`` (``loop.run_in_executor``,
``asyncio.wrap_future``, ``concurrent.futures.wait``/``as_completed``) gets
a new process per task: nothing leaks from one task to the next, a crashing
task fails only its own future, and cancelling a running task stops its
process. Children are forked from the caller (they see its memory
copy-on-write, so closures and lambdas work) or, with ``server=``, from a
ForkServer (a small process, so a big caller does not pay its own fork cost
per task).

One manager thread per executor launches the children, watches their pidfds
and result pipes, enforces timeouts, stops cancelled tasks and completes
the futures. It holds no lock of the executor while it forks and completes
futures (so runs their callbacks) outside every lock it holds.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import itertools
import os
import pickle
import reprlib
import select
import signal
import threading
import time
import weakref
from concurrent.futures._base import (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED,
                                      InvalidStateError)

from fastfork import _core
from fastfork._checks import check_callable, check_timeout, poll_ms
from fastfork._result import ERROR
from fastfork._scheduler import RETRYABLE_ERRNOS, Scheduler
from fastfork.child import _fd_lock, close_owned, own_fd
from fastfork.errors import ChildTimeout, ForkError
from fastfork.fanout import start_child
from fastfork.server import ForkServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, TypeVar

    from typing_extensions import ParamSpec

    P = ParamSpec("P")
    R = TypeVar("R")

__all__ = ["ForkExecutor"]


class _TaskFuture(concurrent.futures.Future):
    """A Future whose ``cancel()`` also stops a running task's process."""

    def __init__(self, on_cancel):
        super().__init__()
        self._on_cancel = on_cancel

    def cancel(self):
        """Cancel the task; a running one has its process stopped (SIGTERM, grace, SIGKILL).

        Returns False only if the task has already finished. Does not wait
        for the process: ``concurrent.futures.wait`` and ``as_completed``
        see the future done once the process has been reaped.
        """
        with self._condition:
            state = self._state
            if state == FINISHED:
                return False
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            self._condition.notify_all()
        self._invoke_callbacks()
        self._on_cancel(self)
        return True


def _settle(future, ok, value):
    """Complete ``future`` with a task's outcome (the manager thread's job).

    A future cancelled meanwhile keeps its cancellation, and its waiters
    (``wait``, ``as_completed``) are told now.
    """
    if future._state != CANCELLED:
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
            return
        except InvalidStateError:
            pass  # cancelled while we were completing it
    _notify_cancelled(future)


def _notify_cancelled(future):
    # Only the manager thread moves a future from CANCELLED on, so this
    # check cannot race with another notification.
    if future._state == CANCELLED:
        future.set_running_or_notify_cancel()


# Short reprs of a task's arguments, however big they are.
_arg_repr = reprlib.Repr()
_arg_repr.maxstring = _arg_repr.maxother = 40


class _Call:
    """What a task runs, for error messages: ``repr`` gives ``fn(args...)``."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __repr__(self):
        name = getattr(self.fn, "__qualname__", None) or _arg_repr.repr(self.fn)
        parts = [_arg_repr.repr(a) for a in self.args[:6]]
        parts += [f"{k}={_arg_repr.repr(v)}" for k, v in list(self.kwargs.items())[:6]]
        more = ", ..." if len(self.args) > 6 or len(self.kwargs) > 6 else ""
        return f"{name}({', '.join(parts)}{more})"


class _Task:
    """One submitted call: its future, what it runs and (server mode) its pickled form."""

    __slots__ = ("future", "index", "call", "pickled")

    def __init__(self, future, index, call, pickled):
        self.future = future
        self.index = index
        self.call = call
        self.pickled = pickled


def _run_chunk(fn, chunk):
    """Run ``fn(*args)`` for every args tuple of a map chunk, in one child; return the list."""
    return [fn(*args) for args in chunk]


def _check_max_workers(max_workers):
    if max_workers is None:
        return os.cpu_count() or 1
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return max_workers


def _check_map_options(chunksize, buffersize):
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None:
        if isinstance(buffersize, bool) or not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")


def _batched(iterable, n):
    iterator = iter(iterable)
    while batch := tuple(itertools.islice(iterator, n)):
        yield batch


def _result_or_cancel(future, timeout=None):
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break the cycle through the exception's traceback


def _chain_lists(lists):
    # Yields the items of each list without keeping references to them.
    for items in lists:
        items.reverse()
        while items:
            yield items.pop()


class ForkExecutor(concurrent.futures.Executor):
    """An Executor that runs each task in a fresh forked process.

    ``ForkExecutor(max_workers=None, *, timeout=None, grace=1.0,
    die_with_parent=True, server=None)``: at most ``max_workers`` tasks run
    at once (default: the CPU count). ``timeout`` limits each task's run
    time: a task over it is stopped (SIGTERM, ``grace`` seconds, SIGKILL) and
    its future fails with ``fastfork.ChildTimeout``, a ``ChildError`` and a
    ``TimeoutError``. What a task raises is raised again by its future, as
    concurrent.futures does, with a ``ChildError`` holding the child's
    traceback as its cause; a task that crashes, exits or returns what
    cannot be pickled fails its own future with a ``ChildError``; either way
    the executor goes on. ``cancel()`` on a running task's future stops its
    process. ``die_with_parent`` has the kernel kill the tasks if this
    process dies. ``server``: a ForkServer that forks the tasks instead of
    this process (see ``ForkServer.executor``). Leaving a ``with`` block by
    Ctrl-C stops every task (SIGTERM, grace, SIGKILL) and reaps it; at
    interpreter exit the tasks already submitted finish first, as in
    concurrent.futures (a Ctrl-C while waiting for them stops them).

    Raises TypeError/ValueError for bad arguments, before any process exists.
    """

    __module__ = "fastfork"

    def __init__(self, max_workers: int | None = None, *, timeout: float | None = None,
                 grace: float = 1.0, die_with_parent: bool = True,
                 server: ForkServer | None = None) -> None:
        self._max_workers = _check_max_workers(max_workers)
        self._timeout = check_timeout(timeout, allow_zero=False)
        self._grace = check_timeout(grace, "grace")
        if server is not None and not isinstance(server, ForkServer):
            raise TypeError(f"server must be a fastfork.ForkServer or None, "
                            f"not {type(server).__name__}")
        self._server = server
        self._die_with_parent = bool(die_with_parent)
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._shutdown = False
        self._counter = itertools.count()
        self._manager = None

    def __repr__(self):
        mode = "caller" if self._server is None else f"server={self._server!r}"
        state = "shut down" if self._shutdown else f"max_workers={self._max_workers}"
        return f"<fastfork.ForkExecutor {state} {mode}>"

    def _check_owner(self):
        if os.getpid() != self._owner:
            raise RuntimeError(f"this ForkExecutor belongs to process {self._owner}")

    def submit(self, fn: Callable[P, R], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in a fresh process; return its Future.

        Raises TypeError for a non-callable (or, with a server, a call that
        cannot be pickled) and RuntimeError after shutdown, before anything
        is forked.
        """
        return self._submit(fn, args, kwargs)

    def _submit(self, fn, args, kwargs, setup=()):
        """submit(); ``setup``: more for a fork server to prepare (see ``_pickling``)."""
        check_callable(fn)
        self._check_owner()
        pickled = None
        if self._server is not None:
            self._server._check_usable()  # ValueError if it was closed
            payload, fds, needs = self._server._pickle(fn, args, kwargs)
            pickled = payload, fds, needs + setup
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _global_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            manager = self._running_manager()
            future = _TaskFuture(manager.cancel)
            manager.add(_Task(future, next(self._counter), _Call(fn, args, kwargs), pickled))
        return future

    def _running_manager(self):
        """The manager thread, started on first use (call with the lock held)."""
        if self._manager is None:
            self._manager = _Manager(self)
            self._manager.start()
        return self._manager

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[R]:
        """Return an iterator of ``fn(*args)`` over the zipped ``iterables``, in order.

        As ``concurrent.futures.Executor.map`` (3.14): the calls are submitted
        at once (or, with ``buffersize``, at most that many results ahead of
        the consumer); the iterator raises the first failed call's exception,
        and TimeoutError if ``timeout`` seconds pass from this call before a
        result is ready. ``chunksize`` > 1 runs that many calls per child.
        Results not consumed are cancelled (their processes stopped) when the
        iterator is closed. Raises TypeError/ValueError for bad arguments.
        """
        check_callable(fn)
        _check_map_options(chunksize, buffersize)
        if chunksize > 1:
            calls = ((batch,) for batch in _batched(zip(*iterables), chunksize))
            # A fork server imports this module once, not each chunk's child.
            return _chain_lists(self._map(functools.partial(_run_chunk, fn), calls,
                                          timeout, buffersize, (("import", __name__),)))
        return self._map(fn, zip(*iterables), timeout, buffersize)

    def _map(self, fn, calls, timeout, buffersize, setup=()):
        end_time = None if timeout is None else timeout + time.monotonic()
        if buffersize is None:
            futures = collections.deque(self._submit(fn, args, {}, setup) for args in calls)
        else:
            futures = collections.deque(self._submit(fn, args, {}, setup)
                                        for args in itertools.islice(calls, buffersize))
        executor = weakref.ref(self)

        # A generator nested in map, so that the calls are submitted before
        # the first result is asked for.
        def results():
            try:
                while futures:
                    if buffersize is not None and (ex := executor()) is not None:
                        args = next(calls, None)
                        if args is not None:
                            futures.append(ex._submit(fn, args, {}, setup))
                        del ex
                    if end_time is None:
                        yield _result_or_cancel(futures.popleft())
                    else:
                        yield _result_or_cancel(futures.popleft(), end_time - time.monotonic())
            finally:
                for future in futures:
                    future.cancel()
        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop accepting tasks; with ``wait``, return once every task has ended.

        ``cancel_futures`` cancels the tasks that have not started. Running
        tasks finish (see ``terminate_workers`` to stop them). Calling it
        again is harmless.
        """
        self._stop(cancel_futures, stop_running=None)
        if wait:
            self._join()

    def terminate_workers(self):
        """Shut down, cancel every task and stop the running ones: SIGTERM, grace, SIGKILL.

        Does not wait (``shutdown()`` afterwards waits until all are reaped);
        their futures end cancelled.
        """
        self._stop(True, stop_running=self._grace)

    def kill_workers(self):
        """Like ``terminate_workers``, with SIGKILL at once."""
        self._stop(True, stop_running=0.0)

    def _stop(self, cancel_futures, stop_running):
        if os.getpid() != self._owner:
            return
        with self._lock:
            self._shutdown = True
            manager = self._manager
        if manager is not None:
            manager.stop(cancel_futures, stop_running)

    def _join(self):
        manager = self._manager
        # From a done callback, which the manager thread runs, there is nothing to wait for.
        if (manager is not None and os.getpid() == self._owner
                and manager is not threading.current_thread()):
            manager.join()

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: stop every task and reap it rather than wait for them.
            self.terminate_workers()
        self.shutdown(wait=True)
        return False


# ---------------------------------------------------------------- the manager thread

_global_shutdown = False
_managers: "weakref.WeakSet[_Manager]" = weakref.WeakSet()
_thread_names = itertools.count(1)


class _LaunchFailed(OSError):
    """A task's launch failed with an exception that is not an OSError (a ServerError,
    RuntimeError at interpreter shutdown): that task fails, the others go on."""


class _Manager(threading.Thread):
    """Drives one executor's Scheduler: launches, watches, stops and completes futures.

    Other threads only touch ``lock``-guarded state (``add``, ``cancel``,
    ``stop``) and wake it through a self-pipe. It holds no strong reference
    to the executor, so a dropped executor can be collected: it then runs
    what was submitted and exits, as a shut-down executor does.
    """

    def __init__(self, executor):
        super().__init__(name=f"fastfork.ForkExecutor-{next(_thread_names)}", daemon=True)
        self._max_workers = executor._max_workers
        self._timeout = executor._timeout
        self._grace = executor._grace
        self._die_with_parent = executor._die_with_parent
        self._server = executor._server
        # Reentrant: the dropped-executor callback may run from garbage collection
        # in a thread that holds it already.
        self.lock = threading.RLock()
        self._inbox = collections.deque()   # tasks submitted, not handed to the scheduler
        self._cancels = []                  # futures whose cancel() ran
        self._closing = False               # shutdown: exit once every task has ended
        self._stop_grace = None             # terminate/kill_workers: stop the running ones
        self._woken = False
        self._dropped = False
        self._ended = False                 # the thread has exited (or is exiting)
        self._executor = weakref.ref(executor, self._executor_dropped)
        with _fd_lock:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            own_fd(self._wake_r)
            own_fd(self._wake_w)
        _managers.add(self)

    # ------------------------------------------------------------ other threads

    def _wake(self):
        # Called with the lock held; once the thread has ended the pipe is closed.
        if not self._woken and not self._ended:
            self._woken = True
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full: it wakes the thread as well

    def add(self, task):
        """Queue a task; RuntimeError if the thread has ended (interpreter exit)."""
        with self.lock:
            if self._ended:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self._inbox.append(task)
            self._wake()

    def cancel(self, future):
        """A future's cancel() ran: drop its task or stop its process."""
        with self.lock:
            self._cancels.append(future)
            self._wake()

    def stop(self, cancel_futures, stop_running):
        """Shut down: cancel the queued tasks (``cancel_futures``), stop the running
        ones after ``stop_running`` seconds of grace (None: let them finish)."""
        with self.lock:
            self._closing = True
            queued = []
            if cancel_futures:
                queued, self._inbox = self._inbox, collections.deque()
            if stop_running is not None:  # taken (and cleared) by the thread
                self._stop_grace = (stop_running if self._stop_grace is None
                                    else min(stop_running, self._stop_grace))
            self._wake()
        # Outside the lock: cancel() runs the futures' callbacks.
        for task in queued:
            task.future.cancel()

    def _executor_dropped(self, _ref):
        # Runs from garbage collection, in any thread.
        with self.lock:
            self._dropped = True
            self._woken = False
            self._wake()

    # ------------------------------------------------------------ the thread

    def run(self):
        # Signals sent to the process must reach the main thread: one taken by
        # this thread would leave the main thread blocked in a wait (a lock,
        # Future.result) with its Ctrl-C never handled. The tasks get back the
        # mask this thread started with.
        self._task_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        # Nor does it hold a lock a forked child could need (it prints nothing;
        # the import lock is taken around every fork): forks need not warn about it.
        _core._library_thread(True)
        scheduler = Scheduler(self._launch, jobs=self._max_workers, timeout=self._timeout,
                              grace=self._grace, stop_on_failure=False)
        live = {}  # future -> Entry, for tasks handed to the scheduler
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        callbacks = {}
        failure = None
        try:
            while True:
                self._take_requests(scheduler, live)
                self._feed(scheduler, live)
                scheduler.fill()
                finished = scheduler.advance()
                for entry in finished:
                    self._complete(entry, scheduler, live)
                if finished:
                    continue
                if (self._closing or self._dropped) and not live:
                    with self.lock:
                        if not self._inbox:
                            self._ended = True
                            return
                    continue
                _apply_watch_changes(scheduler, poller, callbacks)
                deadline = scheduler.next_deadline()
                wait = None if deadline is None else max(0.0, deadline - scheduler.clock())
                for fd, _ in poller.poll(poll_ms(wait)):
                    if fd == self._wake_r:
                        _drain(fd)
                    else:
                        callbacks[fd]()
        except BaseException as exc:  # a bug: fail every future rather than hang them
            failure = exc
            raise
        finally:
            try:
                self._finish(scheduler, live, failure)
            finally:
                _core._library_thread(False)

    def _take_requests(self, scheduler, live):
        with self.lock:
            self._woken = False
            cancels, self._cancels = self._cancels, []
            # stop() emptied the inbox already (cancel_futures).
            stop_grace, self._stop_grace = self._stop_grace, None
        for future in cancels:
            entry = live.get(future)
            if entry is not None:
                scheduler.cancel(entry)
            else:
                _notify_cancelled(future)  # it never reached the scheduler
        if stop_grace is not None:
            self._stop_all(scheduler, live, stop_grace)

    def _stop_all(self, scheduler, live, grace):
        """terminate_workers / kill_workers: cancel every task handed to the scheduler."""
        if grace < scheduler.grace:
            scheduler.grace = grace
        for future, entry in list(live.items()):
            future.cancel()
            if not scheduler.cancel(entry) and grace == 0 and entry.handle is not None:
                entry.handle.kill()  # stopping already: no more grace

    def _feed(self, scheduler, live):
        """Hand the scheduler the next tasks while it has room, marking them running."""
        while len(live) < self._max_workers:
            with self.lock:
                if not self._inbox:
                    return
                task = self._inbox.popleft()
            future = task.future
            # set_running_or_notify_cancel() runs once per future; a cancelled
            # one whose waiters were told already is skipped.
            if future._state == CANCELLED_AND_NOTIFIED or not future.set_running_or_notify_cancel():
                continue
            live[future] = scheduler.add(task)

    def _launch(self, task):
        """Start the child of ``task``; the Scheduler's launch callable."""
        call = task.call
        try:
            if self._server is None:
                return start_child(_run_task, (self._task_mask, call.fn, call.args, call.kwargs),
                                   die_with_parent=self._die_with_parent,
                                   index=task.index, item=call)
            return self._server._start_pickled(task.pickled, index=task.index, item=call)
        except OSError:
            raise
        except Exception as exc:
            raise _LaunchFailed(str(exc)) from exc

    def _complete(self, entry, scheduler, live):
        """Complete the future of a finished entry.

        The entry lets go of the task (its call, its child's handle) before
        the future is completed, and the result lives only in this frame: once
        the caller has it, the executor keeps nothing of it.
        """
        future = entry.task.future
        del live[future]
        ok, value = self._outcome(entry, scheduler)
        entry.task = entry.handle = None
        _settle(future, ok, value)

    def _outcome(self, entry, scheduler):
        """(ok, value or exception) of a finished entry."""
        if entry.cancelled:
            return False, concurrent.futures.CancelledError()  # _settle keeps it cancelled
        if entry.error is not None:
            err = entry.error
            if isinstance(err, _LaunchFailed):
                return False, err.__cause__
            if err.errno in RETRYABLE_ERRNOS:
                return False, ForkError(err.errno, err.strerror, started=scheduler.started)
            return False, err
        child = entry.handle
        child.timed_out = entry.timed_out
        frame = child._frame.frame()
        # _decode, not result(): the handle must not keep the value (it is
        # still watched until the scheduler's next watch changes are applied).
        ok, value = child._decode()
        return (True, value) if ok else (False, _task_exception(value, frame))

    def _finish(self, scheduler, live, failure):
        """The thread ends: stop what still runs, fail what cannot run, close the pipe."""
        try:
            scheduler.close()
        finally:
            with self.lock:
                self._ended = self._closing = True
                left = [task.future for task in self._inbox] + list(live)
                self._inbox.clear()
                with _fd_lock:
                    close_owned(self._wake_r)
                    close_owned(self._wake_w)
            error = RuntimeError(f"the ForkExecutor's manager thread failed: {failure!r}")
            for future in left:
                _settle(future, False, error)


def _apply_watch_changes(scheduler, poller, callbacks):
    # A function of its own: a loop variable left in the thread's frame would
    # keep a finished child (and what its task referred to) alive.
    removed, added = scheduler.watch_changes()
    for fd in removed:
        poller.unregister(fd)
        del callbacks[fd]
    for fd, callback in added.items():
        poller.register(fd, select.POLLIN)
        callbacks[fd] = callback


def _run_task(mask, fn, args, kwargs):
    """In a task's child: unblock the signals the manager thread blocks, run the task."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return fn(*args, **kwargs)


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _task_exception(err, frame):
    """The exception a failed task's future holds.

    What the task raised itself (an Exception that travelled back intact) is
    raised again, as concurrent.futures does, with the ChildError (pid, the
    child's traceback) as its cause; every other failure -- a crash, an exit,
    a timeout, a result that could not be pickled -- is the ChildError.
    """
    raised = err.__cause__
    if (not isinstance(raised, Exception) or isinstance(err, ChildTimeout) or frame is None
            or frame[0] != ERROR or pickle.loads(frame[1])["stage"] != "raised"):
        return err
    err.__cause__ = None
    raised.__cause__ = err
    return raised


def _at_exit():
    """At interpreter exit: let every executor finish its tasks, as concurrent.futures does.

    A Ctrl-C while waiting stops them all instead.
    """
    global _global_shutdown
    _global_shutdown = True
    managers = list(_managers)
    for manager in managers:
        manager.stop(False, None)
    try:
        for manager in managers:
            manager.join()
    except KeyboardInterrupt:
        for manager in managers:
            manager.stop(True, 0.0)
        for manager in managers:
            manager.join()
        raise


def _after_fork_in_child():
    global _global_shutdown, _managers
    # The parent's executors and their threads do not exist in a child.
    _managers = weakref.WeakSet()
    _global_shutdown = False


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
