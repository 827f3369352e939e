"""The fan-out contract, written once, and the scheduler that keeps it.

Every fastfork fan-out keeps one contract. ``spawn_many``, ``fastfork run``
and the executors run on the ``Scheduler`` below; ``fastfork.map`` and
``fastfork.as_completed`` run on the C engine ``_core.FanOut``, the fast path
of the same contract for forks of Python functions (it keeps the parent's
page writes per child low; see src/_fanout.pxi), and so do ``ForkServer.map``
and ``ForkServer.as_completed``, whose engine runs inside the server.

1. Launch while there is room: at most ``jobs`` children run at once, and a
   new one is launched as soon as one finishes. Tasks are drawn lazily, in
   input order.
2. Resource shortages are waited out. A launch failing with EAGAIN or ENOMEM
   (a process or memory limit) is retried after ``backoff(n)`` seconds for
   the n-th failure in a row, min(5 ms * 2**n, 0.5 s), while the running
   children finish; after ``retries`` retries the task fails with that
   error, and so does every task still waiting (they would meet the same
   limit), unless the failure stops launches (rule 5). A launch failing with
   EMFILE (out of fds) first raises the soft fd limit as far as ``jobs``
   children need (never past the hard limit). Out of fds still, or ENFILE,
   it waits until a running child finishes and frees its fds, warning
   (RuntimeWarning) the first time, and fails only when nothing runs. Any
   other OSError fails that task only.
3. Children's pipes (results, captured output) are drained while waiting,
   so a child writing more than a pipe holds never blocks.
4. Per-child deadlines: ``timeout`` counts from a child's launch. Past it
   the child gets ``stop_signal`` (and SIGCONT, so a stopped child can act
   on it), and SIGKILL ``grace`` seconds later. The escalation never blocks
   the scheduler: other children go on being launched, drained and reported
   meanwhile, so children that time out together are all gone after one
   grace, not one grace each. A child stopped for its timeout is reported
   as timed out however it then exits.
5. The first failure stops new launches (``stop_on_failure``, on unless the
   front end asks to keep going); the children running then finish and are
   reported. A failed launch is a failure; for a child that ran,
   ``is_failure(entry)`` decides.
6. An exception in the caller (Ctrl-C, a callback raising, the consumer
   abandoning the results) stops everything: ``close()`` sends every running
   child the stop signal at once, waits one shared ``grace``, SIGKILLs those
   left and reaps them all before the exception propagates.
7. Outcomes are reported as children finish, each with its input
   ``index``; front ends that promise input order put them back in order.

The C engine keeps these rules too, with one difference of its own: a
launch out of fds with no child running raises that OSError from the call
instead of failing the one task.

The ``Scheduler`` is a state machine that never waits by itself (sans-IO):
a driver watches the fds it names and calls it back. ``drive()`` is the
blocking driver (poll) for the synchronous front ends. An asyncio driver
registers ``watch_changes()`` with ``loop.add_reader`` and sets
``loop.call_at`` on ``next_deadline()``; an executor calls ``add()`` and
``cancel()`` from the one thread that drives the scheduler (woken by a
self-pipe it adds to its own poll set). The scheduler is not thread-safe:
one thread drives it.
"""
import collections
import errno
import heapq
import itertools
import select
import signal
import time
import warnings

from fastfork import _fdlimit
from fastfork._checks import poll_ms
from fastfork._core import backoff  # shared with the C engine: min(5 ms * 2**n, 0.5 s)
from fastfork._core import callers_stacklevel
from fastfork.child import stop_all

__all__ = ["RETRYABLE_ERRNOS", "FD_ERRNOS", "backoff", "Entry", "Scheduler", "drive"]

# A launch failing with these may succeed once running children have exited.
RETRYABLE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM})
# A launch failing with these may succeed once a running child frees its fds.
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})

# Children without a pidfd are polled (WNOHANG) this often, doubling up to the cap.
_POLL_MIN, _POLL_MAX = 0.0005, 0.05


class Entry:
    """One task on its way through a Scheduler.

    ``index`` (its place in the input), ``task`` (as given), ``handle`` (the
    Child that ``launch`` returned; None until launched, or if the launch
    failed), ``error`` (the OSError of a failed launch), ``timed_out`` (its
    timeout stopped it), ``cancelled`` (``cancel()`` stopped or dropped it),
    ``started_at`` / ``finished_at`` (the scheduler's clock), ``data`` (free
    for the front end, e.g. the decoded outcome).
    """

    __slots__ = ("index", "task", "handle", "error", "timed_out", "cancelled",
                 "started_at", "finished_at", "data", "_deadline", "_kill_at",
                 "_stopping", "_pidfd", "_pipes")

    def __init__(self, index, task):
        self.index = index
        self.task = task
        self.handle = None
        self.error = None
        self.timed_out = False
        self.cancelled = False
        self.started_at = None
        self.finished_at = None
        self.data = None
        self._deadline = None   # when its timeout expires
        self._kill_at = None    # when SIGKILL follows the stop signal
        self._stopping = False  # the stop signal was sent
        self._pidfd = -1        # watched pidfd (-1: none, or no longer watched)
        self._pipes = set()     # watched pipe fds

    def __repr__(self):
        state = ("failed" if self.error is not None else "cancelled" if self.cancelled
                 else "queued" if self.handle is None
                 else "finished" if self.finished_at is not None else "running")
        return f"<Entry {self.index} {state} task={self.task!r}>"


class Scheduler:
    """Launches tasks' children at most ``jobs`` at a time and reports each as it ends.

    ``launch(task)`` starts one child and returns its handle (a
    ``fastfork.child.Child``: FunctionChild, ServerChild, Process), or raises
    OSError (see the module's rule 2); any other exception propagates to
    whoever called ``fill()``. It must leave nothing running when it raises.
    ``tasks``: an iterable drawn lazily (the input ends with it), or None
    for a dynamic input fed by ``add()`` until ``close_input()``.
    ``timeout`` (seconds or None), ``grace``, ``retries``, ``stop_on_failure``
    and ``stop_signal`` are the module's rules 2, 4 and 5. ``is_failure(entry)``
    says whether a finished child failed (default: it timed out or its
    returncode is not 0); it runs once per entry, as the entry finishes.
    ``clock`` (an attribute too) is the monotonic clock of every time the
    scheduler takes or returns.

    The caller drives it: ``fill()`` launches what fits, the callbacks from
    ``watch_changes()`` run when their fds are readable, ``advance()``
    enforces deadlines and returns finished entries, ``next_deadline()`` says
    when to call ``advance()`` at the latest; ``close()`` ends it. ``drive()``
    does all of that with poll().
    """

    def __init__(self, launch, tasks=None, *, jobs, timeout=None, grace=1.0, retries=8,
                 stop_on_failure=True, is_failure=None, stop_signal=signal.SIGTERM,
                 clock=time.monotonic):
        self._launch = launch
        self._source = None if tasks is None else iter(tasks)
        self._accepting = tasks is None
        self.jobs = jobs
        self.timeout = timeout
        self.grace = grace
        self.retries = retries
        self.stop_on_failure = stop_on_failure
        self._is_failure = _failed if is_failure is None else is_failure
        self.stop_signal = signal.Signals(stop_signal)
        self.clock = clock
        self.started = 0                    # children launched so far
        self._next_index = 0
        self._queue = collections.deque()   # entries drawn or added, not launched yet
        self._running = {}                  # entry -> None, in launch order
        self._exited = []                   # running entries whose child has finished
        self._finished = []                 # entries to hand out (failed launches, cancels)
        self._timers = []                   # heap of (when, seq, entry)
        self._seq = itertools.count()
        self._watch = {}                    # fd -> callback, every fd watched now
        self._added = {}                    # watch changes not yet taken
        self._removed = set()
        self._polled = []                   # running entries without a pidfd
        self._poll_every = _POLL_MIN
        self._poll_at = None
        self._launching = True
        self._failures = 0                  # EAGAIN/ENOMEM launch failures in a row
        self._backoff_until = 0.0
        self._fd_wait = False               # out of fds: wait for a child to finish
        self._fd_warned = False             # ... and that was said (once)
        self._doomed = None                 # (error, index limit): waiting tasks that fail
        self._closed = False

    def __repr__(self):
        return (f"<Scheduler running={len(self._running)}/{self.jobs} "
                f"queued={len(self._queue)} started={self.started}"
                f"{' closed' if self._closed else ''}>")

    # ------------------------------------------------------------ input

    def add(self, task):
        """Queue ``task`` (dynamic input); return its Entry.

        Raises RuntimeError once the input is closed or the scheduler is.
        """
        if not self._accepting or self._closed:
            raise RuntimeError("this scheduler takes no more tasks")
        entry = self._new_entry(task)
        self._queue.append(entry)
        return entry

    def close_input(self):
        """No more ``add()``: once the queued tasks have run, the scheduler is done."""
        self._accepting = False

    def stop_launching(self):
        """Launch nothing more; the running children go on and are reported."""
        self._launching = False

    @property
    def queued(self):
        """The entries drawn or added but not launched (nor handed out), in order."""
        return tuple(self._queue)

    @property
    def running(self):
        """The entries whose children are running, in launch order."""
        return tuple(self._running)

    @property
    def done(self):
        """True once nothing runs, nothing is left to hand out and nothing will launch."""
        if self._running or self._finished or self._exited:
            return False
        return not self._launching or not (self._queue or self._source is not None
                                           or self._accepting)

    # ------------------------------------------------------------ launching

    def fill(self):
        """Launch tasks while there is room; return the entries launched.

        Raises what ``launch`` raises other than OSError, and what drawing
        from ``tasks`` raises; the scheduler stays consistent (``close()``
        still stops everything).
        """
        launched = []
        failed = 0
        while self._may_launch(self.clock()):
            entry = self._next_entry()
            if entry is None:
                break
            if self._doomed is not None:
                error, limit = self._doomed
                if limit is None or entry.index < limit:
                    # Rule 2: it would meet the limit its predecessor gave up on.
                    entry.error = error
                    self._finished.append(entry)
                    failed += 1
                    if failed >= self.jobs:
                        break  # a batch at a time: the input may be endless
                    continue
                self._doomed = None
            handle = None
            try:
                handle = self._launch(entry.task)
                self._start(entry, handle)
            except OSError as exc:
                if handle is not None:
                    raise  # from _start, not a failed launch
                self._launch_failed(entry, exc)
                continue
            except BaseException:
                # Interrupted (Ctrl-C) before the child was recorded: stop it here.
                if handle is not None and entry not in self._running:
                    _kill_and_reap([handle])
                    handle._close_fds()
                raise
            self._failures = 0
            launched.append(entry)
        return launched

    def _may_launch(self, now):
        """True if ``fill()`` would try a launch now."""
        return (self._launching and len(self._running) < self.jobs and not self._fd_wait
                and not self._closed and now >= self._backoff_until
                and (self._queue or self._source is not None))

    def _new_entry(self, task):
        entry = Entry(self._next_index, task)
        self._next_index += 1
        return entry

    def _next_entry(self):
        if self._queue:
            return self._queue.popleft()
        if self._source is None:
            return None
        for task in self._source:
            return self._new_entry(task)
        self._source = None
        return None

    def _launch_failed(self, entry, exc):
        if exc.errno in RETRYABLE_ERRNOS and self._failures < self.retries:
            self._failures += 1
            self._backoff_until = self.clock() + backoff(self._failures)
            self._queue.appendleft(entry)
            return
        if exc.errno == errno.EMFILE and self._make_fd_room():
            self._queue.appendleft(entry)  # the soft limit was raised: retry now
            return
        if exc.errno in FD_ERRNOS and self._running:
            self._warn_fd_wait()
            self._fd_wait = True
            self._queue.appendleft(entry)
            return
        gave_up = exc.errno in RETRYABLE_ERRNOS
        self._failures = 0
        entry.error = exc
        self._report(entry)
        if gave_up and self._launching:
            # Rule 2: the tasks waiting now fail too -- the rest of ``tasks``,
            # or the entries added so far.
            self._doomed = (exc, None if self._source is not None else self._next_index)

    def _fds_per_child(self):
        """The fds a running child holds here (3 before any runs)."""
        if not self._running:
            return 3
        held = sum((e._pidfd >= 0) + len(e._pipes) for e in self._running)
        return max(1, -(-held // len(self._running)))

    def _make_fd_room(self):
        """Raise the soft fd limit as far as ``jobs`` children need; True if it rose."""
        before = _fdlimit.fd_limit()[0]
        # 3 more for the ends a launch holds while it creates the child.
        _, soft, _ = _fdlimit.make_room(
            self._fds_per_child() * (self.jobs - len(self._running)) + 3)
        return soft > before

    def _warn_fd_wait(self):
        """Warn, once per scheduler, that the fd limit holds children back."""
        if not self._fd_warned:
            self._fd_warned = True
            warnings.warn(_fdlimit.wait_message(len(self._running), self.jobs,
                                                self._fds_per_child()),
                          RuntimeWarning, stacklevel=callers_stacklevel())

    def _start(self, entry, handle):
        entry.handle = handle
        self._running[entry] = None  # from here on, close() stops it
        entry.started_at = self.clock()
        self.started += 1
        if self.timeout is not None:
            entry._deadline = entry.started_at + self.timeout
            self._set_timer(entry._deadline, entry)
        pidfd = handle._pidfd
        if pidfd >= 0:
            entry._pidfd = pidfd
            self._watch_fd(pidfd, lambda: self._on_exit(entry))
        else:
            self._poll(entry)
        for fd, callback in handle._readers().items():
            entry._pipes.add(fd)
            self._watch_fd(fd, lambda fd=fd, callback=callback: self._on_data(entry, fd, callback))

    # ------------------------------------------------------------ watching

    def watch_changes(self):
        """Return (removed, added): fds to stop watching and {fd: callback} to start.

        The changes since the last call, to apply in that order: a number
        can be closed and reused for another fd meanwhile. A callback is
        called without arguments when its fd is readable (or hung up); it
        never blocks, and one whose fd was removed meanwhile does nothing.
        """
        removed, added = self._removed, self._added
        self._removed, self._added = set(), {}
        return removed, added

    def fds(self):
        """Return {fd: callback} of every fd watched now (a copy)."""
        return dict(self._watch)

    def _watch_fd(self, fd, callback):
        self._watch[fd] = callback
        self._added[fd] = callback

    def _unwatch_fd(self, fd):
        del self._watch[fd]
        if self._added.pop(fd, None) is None:
            self._removed.add(fd)

    def _unwatch(self, entry):
        if entry._pidfd >= 0:
            self._unwatch_fd(entry._pidfd)
            entry._pidfd = -1
        for fd in entry._pipes:
            self._unwatch_fd(fd)
        entry._pipes.clear()

    def _on_exit(self, entry):
        if entry._pidfd < 0:
            return  # stale: it was handled already
        # Unwatch before reaping: reaping closes the pidfd and its number may be reused.
        self._unwatch_fd(entry._pidfd)
        entry._pidfd = -1
        if entry.handle._try_reap():
            self._exit(entry)
        else:
            self._poll(entry)  # pidfd readable, yet not reaped: poll it from now on

    def _on_data(self, entry, fd, callback):
        if fd not in entry._pipes:
            return
        if entry.handle._read(fd, callback):   # end of file: the handle closed it
            entry._pipes.discard(fd)
            self._unwatch_fd(fd)

    def _poll(self, entry):
        self._polled.append(entry)
        self._poll_every = _POLL_MIN
        self._poll_at = self.clock() + _POLL_MIN

    def _exit(self, entry):
        """The entry's child has been reaped (its fds closed): report it next."""
        self._unwatch(entry)
        entry.finished_at = self.clock()
        self._exited.append(entry)

    # ------------------------------------------------------------ time

    def _set_timer(self, when, entry):
        heapq.heappush(self._timers, (when, next(self._seq), entry))

    def next_deadline(self):
        """The clock time by which ``fill()`` and ``advance()`` must be called next.

        None: only when a watched fd becomes readable. The current time when
        there is room for a task waiting to be launched, or entries to hand
        out.
        """
        now = self.clock()
        if self._exited or self._finished or self._may_launch(now):
            return now
        while self._timers and self._timers[0][2] not in self._running:
            heapq.heappop(self._timers)  # its child finished: nothing to do
        times = []
        if self._timers:
            times.append(self._timers[0][0])
        if self._polled:
            times.append(self._poll_at)
        if (self._launching and self._backoff_until > now
                and (self._queue or self._source is not None)):
            times.append(self._backoff_until)
        return min(times) if times else None

    def advance(self):
        """Enforce deadlines and return the entries that finished, in completion order.

        Sends the stop signal to children past their timeout (SIGKILL once
        their grace is over), never waiting for them. A finished entry has
        ``handle`` finished (reaped, fds closed) or ``error`` set (its launch
        failed), or is ``cancelled`` before it launched. Raises what
        ``is_failure`` raises.
        """
        now = self.clock()
        if self._polled and now >= self._poll_at:
            for entry in list(self._polled):
                if entry.handle._try_reap():
                    self._polled.remove(entry)
                    self._exit(entry)
            self._poll_every = min(self._poll_every * 2, _POLL_MAX)
            self._poll_at = now + self._poll_every
        while self._timers and self._timers[0][0] <= now:
            _, _, entry = heapq.heappop(self._timers)
            if entry in self._running and not entry.handle.finished:
                self._expire(entry, now)
        exited, self._exited = self._exited, []
        for entry in exited:
            del self._running[entry]
            if entry in self._polled:
                self._polled.remove(entry)
        if exited:
            self._fd_wait = False
            self._poll_every = _POLL_MIN
        for entry in exited:
            self._report(entry)
        finished, self._finished = self._finished, []
        return finished

    def _expire(self, entry, now):
        if entry._kill_at is not None:
            if now >= entry._kill_at:
                entry._kill_at = None
                entry.handle.kill()
        elif not entry._stopping and entry._deadline is not None and now >= entry._deadline:
            entry.timed_out = True
            self._stop(entry, now)

    def _stop(self, entry, now):
        """Send the stop signal and set the SIGKILL deadline; never waits."""
        entry._stopping = True
        if self.grace > 0:
            entry.handle.send_signal(self.stop_signal)
            entry.handle.send_signal(signal.SIGCONT)  # a stopped child cannot act on it
            entry._kill_at = now + self.grace
            self._set_timer(entry._kill_at, entry)
        else:
            entry.handle.kill()

    def _report(self, entry):
        """Queue a finished entry for advance(); apply rule 5."""
        self._finished.append(entry)
        if entry.cancelled or not self.stop_on_failure or not self._launching:
            return
        if entry.error is not None or self._is_failure(entry):
            self._launching = False

    def set_timeout(self, entry, timeout):
        """Give a running entry a new ``timeout`` (seconds from its launch; None: none).

        For a front end whose limit is known only once children have run
        (fastfork run's percentage of the median run time). Returns False if
        the entry is not running, or is being stopped already.
        """
        if entry not in self._running or entry._stopping:
            return False
        entry._deadline = None if timeout is None else entry.started_at + timeout
        if entry._deadline is not None:
            self._set_timer(entry._deadline, entry)  # an earlier timer finds it not due
        return True

    # ------------------------------------------------------------ stopping

    def cancel(self, entry):
        """Stop ``entry``'s child without waiting, or drop it if not launched yet.

        A running child gets the stop signal, then SIGKILL after ``grace``; it
        is reported as it finishes, with ``cancelled`` True (and not counted
        as a failure). A queued entry is reported by the next ``advance()``.
        Returns False if the entry had finished or was cancelled already.
        """
        if entry.cancelled or entry.finished_at is not None or entry.error is not None:
            return False
        if entry in self._running:
            entry.cancelled = True
            if not entry._stopping:
                self._stop(entry, self.clock())
            return True
        try:
            self._queue.remove(entry)
        except ValueError:
            return False
        entry.cancelled = True
        self._finished.append(entry)
        return True

    def close(self, grace=None):
        """Stop every running child and reap it; blocks. Launches nothing more.

        Every running child gets the stop signal at once; they share one
        ``grace`` (default: the scheduler's) before SIGKILL. If an exception
        (Ctrl-C) interrupts the grace, the rest are SIGKILLed and reaped all
        the same, then it propagates. Entries not handed out are dropped.
        Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        self._launching = False
        self._accepting = False
        handles = [entry.handle for entry in self._running]
        for entry in self._running:
            self._unwatch(entry)
        self._running.clear()
        self._exited.clear()
        self._polled.clear()
        self._timers.clear()
        try:
            stop_all(handles, self.grace if grace is None else grace, self.stop_signal)
        except BaseException:
            _kill_and_reap(handles)
            raise
        finally:
            for handle in handles:
                handle._close_fds()


def _failed(entry):
    return entry.timed_out or entry.handle.returncode != 0


def _kill_and_reap(handles):
    """SIGKILL and reap ``handles``, going on through further interrupts."""
    pending = [h for h in handles if not h.finished]
    while pending:
        try:
            stop_all(pending, 0)
        except BaseException:  # a second Ctrl-C: the first one propagates
            pass
        pending = [h for h in pending if not h.finished]


def drive(scheduler, every=None):
    """Run ``scheduler`` with poll(), yielding its finished entries as they come.

    With ``every`` (seconds) it also yields None at least that often, for a
    front end with periodic work (fastfork run --line-buffer prints jobs'
    new lines). Ends when the scheduler is done. Whenever it ends -- done,
    closed by the consumer (``close()`` on this generator), or interrupted
    by an exception such as KeyboardInterrupt -- the scheduler is closed, so
    every child is stopped and reaped.
    """
    poller = select.poll()
    clock = scheduler.clock
    scheduler.watch_changes()  # start from what is watched now
    callbacks = scheduler.fds()  # fd -> callback, as registered with the poller
    for fd in callbacks:
        poller.register(fd, select.POLLIN)
    ticked = clock()
    try:
        while True:
            scheduler.fill()
            finished = scheduler.advance()
            if every is not None and clock() - ticked >= every:
                ticked = clock()
                yield None
            if finished:
                yield from finished
                continue
            if scheduler.done:
                return
            removed, added = scheduler.watch_changes()
            for fd in removed:
                if callbacks.pop(fd, None) is not None:
                    poller.unregister(fd)
            for fd, callback in added.items():
                poller.register(fd, select.POLLIN)
                callbacks[fd] = callback
            deadline = scheduler.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - clock())
            if every is not None:
                tick = max(0.0, ticked + every - clock())
                wait = tick if wait is None else min(wait, tick)
            for fd, _ in poller.poll(poll_ms(wait)):
                callbacks[fd]()  # one made stale by an earlier callback does nothing
    finally:
        scheduler.close()
