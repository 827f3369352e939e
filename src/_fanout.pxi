# The fan-out engine behind fastfork.map and fastfork.as_completed, and the
# child's side of the result pipe. Included by _core.pyx, so it shares that
# module's fork, wait and fd helpers.
#
# Why the scheduler is in C: after every fork all of the parent's pages are
# copy-on-write, so each page the parent writes before its next fork costs a
# page fault (and a page copy while the child lives). A scheduler written in
# Python, with a handle object per child, wrote some 160 pages per child here;
# this loop writes about 36, fewer than the 40 of a bare os.fork loop.
#
# Why epoll: with thousands of children at once, building a poll set of every
# child's fds on each wake-up costs O(children) per event. Each fd is
# registered once, with its slot number as the event's data, so a wake-up
# costs only the children that are ready; free slots are a stack, finished
# ones and those polled by pid are lists, for the same reason.
#
# Why one fd per running child: every fork copies the parent's table of open
# files (a reference taken on each, dropped again by the child), so each fd
# held per running child makes every later fork dearer. So a child's exit is
# seen through its result pipe, with no pidfd beside it: the read end is
# registered with no events, and epoll reports EPOLLHUP alone, once, when the
# last write end closes -- normally at the child's exit, as the kernel closes
# a process's files first. Then the pipe is read to its end, closed, and the
# child reaped without blocking. If it cannot be reaped yet (it has closed its
# files but is not a zombie yet, or it closed the pipe itself and runs on), a
# pidfd takes the pipe's place in the epoll set; without pidfds (or fds) it is
# polled by pid on a timer with back-off.
#
# A grandchild that inherited the write end would keep the pipe open after
# the child exits. fastfork's own forks close it (it is an owned fd), and an
# at-fork hook closes it after os.fork (multiprocessing too). For a fork that
# runs no hook (a C extension's raw fork) every unreaped child is also waited
# for without blocking once a second (_SWEEP_INTERVAL): such a child is
# reaped at most about a second after its exit, at a cost of O(children) per
# second, not per event.
#
# Waiting and signalling by pid: until a child is reaped, its pid names it
# (or its zombie) -- unless someone else reaped it (SIGCHLD ignored, a
# foreign waitpid(-1)). A child whose pipe hung up, or one the sweep looks at,
# is waited for by pid, and ECHILD shows it lost. A child without a pidfd is
# signalled through one opened at that moment, before a non-blocking wait
# that must find the pid still a running child of ours (else it is reaped or
# found lost, and not signalled). So a pid someone else reaped is neither
# waited for nor signalled as ours, unless the kernel has handed it on to
# another child of this very process in between (the pid space wrapping
# around: pid_max forks, 32,768 or more, within moments or, for the sweep, a
# second): a pidfd held from fork on rules that out too, at the price of a
# second fd per child. Without pidfds, or with no fd left, the pid is
# signalled right after that wait.
#
# Why look at the epoll set while starting children: with jobs=N the parent
# forks for a long time before it first waits, and every child that exited
# meanwhile would keep its pipe open and stay a zombie until then; so every
# _LAUNCHES_PER_LOOK forks, what has finished is handled without waiting.
# With both, 5,000 one-second children at once cost map about 1.15x a bare
# os.fork loop per child here, down from 1.8x with a pidfd per child and
# nothing finished until all had started. For the same reason a pipe is read
# through one scratch buffer into a slot buffer just large enough: a 64 KiB
# buffer per slot spread the parent's memory over twice the page tables,
# which every fork copies.
#
# Why a doorbell: watching every result pipe for data would wake the parent
# twice per child, once for the data and once for the exit. Instead a child
# writes its frame without blocking; only if the pipe fills (a result larger
# than the pipe's capacity, 64 KiB by default) does it ring the fan-out's
# doorbell pipe with its slot number, and from then on the parent watches
# that pipe for data too and drains it while it waits. Every other pipe is
# read once, when it hangs up.
#
# The result frame: a 1-byte kind (b"R" result, b"E" error), an 8-byte
# big-endian payload length, then the pickled payload (see fastfork._result).

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Occurred
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.errno cimport ENFILE
from libc.math cimport ldexp
from libc.string cimport memcpy
from posix.stat cimport fstat, struct_stat
from posix.uio cimport iovec, writev

from _decls cimport EPOLL_CTL_MOD, PyIter_Next_raw

import pickle
import traceback

from fastfork import _fdlimit
from fastfork._result import error_payload as _error_payload, user_traceback as _user_traceback

cdef object _dumps = pickle.dumps
cdef char _RESULT = b"R"
cdef char _ERROR = b"E"
cdef int _PROTOCOL = pickle.HIGHEST_PROTOCOL

cdef enum:
    _HEADER = 9                 # kind byte + 8-byte length
    _SCRATCH = 1 << 16          # the buffer every pipe is read into first
    _KEEP_BUFFER = 1 << 20      # a slot's buffer grown past this is freed after use
    _ARENA_PAYLOAD = 1 << 10    # payloads up to this wait in the arena, as bytes
    _MAX_EVENTS = 256           # epoll events taken per wake-up
    _FIRST_SLOTS = 64           # slots allocated up front; more as children start
    _LAUNCHES_PER_LOOK = 32     # forks between two looks at the epoll set while starting
    _FDS_PER_CHILD = 1          # the read end of its pipe (or the pidfd that replaces it)
    _FDS_TO_SPARE = 2           # a starting child's write end, a pidfd opened to signal one
    _FD_SLACK = 1024            # a soft fd limit this far above the need is not checked

# The epoll data of the doorbell; a slot's is (slot << 1) | (1 for its pipe, 0 for its pidfd).
cdef unsigned long long _BELL_EVENT = <unsigned long long>-1
# Seconds between two non-blocking waits for every unreaped child (see the top).
cdef double _SWEEP_INTERVAL = 1.0


# ---------------------------------------------------------------- the child's side

cdef int _write_all(int fd, const char *data, Py_ssize_t size, int bell, int token) except -1:
    """Write ``size`` bytes to ``fd``; if it is non-blocking and fills, ring ``bell``.

    Ringing writes ``token`` to the doorbell and makes ``fd`` blocking again:
    from then on the parent drains the pipe while we write.
    """
    cdef Py_ssize_t n
    while size > 0:
        with nogil:  # other threads of the child may need the GIL meanwhile
            n = c_write(fd, data, size)
        if n > 0:
            data += n
            size -= n
        elif n < 0 and errno == EINTR:
            continue
        elif n < 0 and errno == EAGAIN and bell >= 0:
            with nogil:
                while c_write(bell, &token, sizeof(token)) < 0 and errno == EINTR:
                    pass
            bell = -1
            _set_blocking(fd, True)
        else:
            _raise_errno(errno)
    return 0


cdef int _write_frame(int fd, char kind, bytes payload, int bell, int token) except -1:
    """Write one result frame to ``fd``.

    With a doorbell (``bell`` >= 0), ``fd`` must be non-blocking: see _write_all.
    """
    cdef Py_ssize_t size = len(payload)
    cdef Py_ssize_t i, n
    cdef unsigned char header[_HEADER]
    cdef iovec parts[2]
    header[0] = <unsigned char>kind
    for i in range(8):
        header[1 + i] = (size >> (56 - 8 * i)) & 0xFF
    # Header and payload in one writev(2), without copying: a frame that fits
    # the pipe is written whole by this one call.
    parts[0].iov_base = header
    parts[0].iov_len = _HEADER
    parts[1].iov_base = <char *>payload
    parts[1].iov_len = size
    while True:
        with nogil:
            n = writev(fd, parts, 2)
        if n >= 0 or errno != EINTR:
            break
    if n < 0:
        if errno != EAGAIN:
            _raise_errno(errno)
        n = 0
    if n < _HEADER:
        _write_all(fd, <char *>header + n, _HEADER - n, bell, token)
        _write_all(fd, <char *>payload, size, bell, token)
    else:
        _write_all(fd, <char *>payload + (n - _HEADER), size - (n - _HEADER), bell, token)
    return 0


cdef int _exit_code_of(exc):
    """The exit status Python gives an uncaught SystemExit ``exc``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    return 1


cdef int _run_and_report(fn, tuple args, dict kwargs, int fd, bint print_traceback,
                         int bell, int token) except -1:
    """Call ``fn(*args, **kwargs)`` and write its outcome to ``fd`` as one frame.

    Returns the exit code the child should end with: 0 after a result, 1 after
    an exception or an unpicklable result, SystemExit's code after SystemExit.
    SystemExit with exit status 0 (``sys.exit()``, ``sys.exit(0)``) is a
    success whose result is None, as when a program exits 0.
    Raises only if even the report cannot be made (the caller exits 70).
    """
    cdef int code = 0
    cdef char kind = _RESULT
    try:
        value = fn(*args, **kwargs)
    except SystemExit as exc:
        code = _exit_code_of(exc)
        if code == 0:
            payload = _dumps(None, _PROTOCOL)
        else:
            kind = _ERROR
            payload = _error_payload(exc, "exited")
    except BaseException as exc:
        code = 1
        if print_traceback:
            traceback.print_exception(type(exc), exc, _user_traceback(exc))
        kind = _ERROR
        payload = _error_payload(exc, "raised")
    else:
        try:
            payload = _dumps(value, _PROTOCOL)
        except BaseException as exc:
            code = 1
            kind = _ERROR
            payload = _error_payload(exc, "returned a result that could not be pickled")
    _write_frame(fd, kind, payload, bell, token)
    return code


def run_function(fn, tuple args, dict kwargs, int fd, bint print_traceback=False):
    """In a forked child: call ``fn(*args, **kwargs)`` and report to ``fd``.

    Writes one frame (the pickled return value, or the error with its
    traceback; see fastfork._result) and returns the exit code to end with:
    0, 1 after an exception or unpicklable result, or SystemExit's code.
    ``print_traceback`` also prints a traceback to this process's stderr.
    Raises OSError if the frame cannot be written.
    """
    return _run_and_report(fn, args, kwargs, fd, print_traceback, -1, 0)


def write_frame(int fd, kind, bytes payload):
    """Write one result frame (``kind`` b"R" or b"E") to ``fd``, blocking."""
    if kind not in (b"R", b"E"):
        raise ValueError(f"kind must be b'R' or b'E', not {kind!r}")
    _write_frame(fd, (<bytes>kind)[0], payload, -1, 0)


# ---------------------------------------------------------------- the engine

cdef inline double _backoff(int failures) noexcept nogil:
    return min(ldexp(0.005, failures), 0.5)


def backoff(int failures):
    """Seconds to wait before relaunching after ``failures`` EAGAIN/ENOMEM in a row.

    Returns min(5 ms * 2**failures, 0.5 s): the one back-off of every
    fastfork fan-out (this engine and fastfork._scheduler).
    Raises TypeError for a non-integer.
    """
    return _backoff(failures)


cdef struct _Slot:
    pid_t pid               # 0: the slot is free
    int pidfd               # -1: none (a pidfd is opened only once the pipe hung up)
    int rfd                 # read end of the result pipe (-1 once it hung up and was read)
    int wfd                 # write end, held only between pipe2 and fork
    int polled_at           # its place in polled_slots, or -1 (not polled by pid)
    Py_ssize_t index
    char *buf               # what has been read from the pipe
    Py_ssize_t size
    Py_ssize_t cap
    double deadline         # when the run-time limit expires (0: no limit)
    double kill_at          # when SIGKILL follows a timeout's SIGTERM (0: not due)
    int returncode
    PyObject *item          # the item its child runs (a reference the slot owns)
    bint draining           # the child rang: its pipe is watched for data too
    bint reaped
    bint lost               # reaped by someone else: exit status unknown
    bint timed_out


cdef struct _Outcome:
    # A finished child, kept in C until step() hands it out: built as Python
    # objects one by one, outcomes would write to several pages per child.
    Py_ssize_t index
    pid_t pid
    int returncode
    char kind               # b"R", b"E", or 0 when no whole frame arrived
    bint timed_out
    bint lost
    Py_ssize_t offset       # the payload: at arena[offset], or (-1 - k) for big_payloads[k]
    Py_ssize_t length


cdef class FanOut:
    """Runs ``fn(item)`` in one forked child per item, at most ``jobs`` at once.

    The C half of fastfork.as_completed and fastfork.map: forking, waiting,
    reading results, timeouts and fork retries all happen here; the caller
    decodes the outcomes. ``items`` is an iterator; the first item is index 0.
    Every fd it makes is in fastfork's set of owned fds; every child it forks
    runs ``fn`` through run_function and ends in ``_exit``.

    ``timeout`` (seconds or None) limits each child's run time, counted from
    its fork: a child over it gets SIGTERM, ``grace`` seconds, then SIGKILL.
    fork failing with EAGAIN or ENOMEM is retried ``fork_retries`` times with
    back-off; after that ``fork_error`` holds the OSError, ``pending`` the
    (index, item) that could not start, and no more children are started
    (the rest of ``items`` is left unread). A launch that finds no free fd
    (EMFILE, ENFILE) waits until a running child has finished and freed its
    own, with a RuntimeWarning the first time; with none running, step()
    raises that OSError. The soft RLIMIT_NOFILE is raised as far as ``jobs``
    children need, up to the hard limit.
    With ``stop_on_failure`` the first failed child also stops new starts.
    sys.stdout and sys.stderr are flushed before the first fork and, with
    ``flush_each_fork`` or while other threads exist, before every fork:
    pass False only when no Python code can run between two forks (items
    from a list or range, no Python signal handlers), as it costs every
    child a dozen page faults in the parent.
    """

    cdef object fn
    cdef object items
    cdef _Outcome *outcomes     # finished, not yet handed out
    cdef Py_ssize_t n_outcomes, outcomes_cap
    cdef list outcome_items     # their items, in the same order
    cdef char *arena            # their small payloads, back to back
    cdef Py_ssize_t arena_size, arena_cap
    cdef list big_payloads      # their larger payloads, as bytes
    cdef Py_ssize_t next_index  # the index of the next item drawn from ``items``
    cdef object pending_item    # drawn but not started (its fork is being retried)
    cdef bint has_pending
    cdef _Slot *slots
    cdef int n_slots            # allocated: grown towards ``jobs`` as children start
    cdef int *free_slots        # a stack of the free slots' numbers
    cdef int n_free
    cdef int *reaped_slots      # slots whose child was reaped but not yet finished
    cdef int n_reaped
    cdef int *polled_slots      # slots whose child is polled by pid, on a timer
    cdef int n_polled
    cdef epoll_event *events
    cdef char *scratch          # _SCRATCH bytes: see _drain
    cdef int epfd
    cdef int fd_room            # children the fd limit was last found to leave room for
    cdef double next_timer      # the earliest timeout or SIGKILL that may be due (0: none)
    cdef double next_sweep      # when every unreaped child is next waited for (0: not set)
    cdef int jobs
    cdef int running
    cdef int bell_r, bell_w
    cdef int pdeathsig
    cdef int fork_retries, fork_failures
    cdef double timeout, grace
    cdef double backoff_until   # no fork before this (fork retry back-off)
    cdef bint fd_wait           # out of fds: no fork until a running child finishes
    cdef bint fd_warned
    cdef double poll_interval   # for the children polled by pid
    cdef bint print_traceback, stop_on_failure, launching, flush_each_fork
    cdef pid_t parent
    cdef readonly object fork_error
    cdef readonly Py_ssize_t started

    def __cinit__(self, fn, items, int jobs, timeout, double grace, int fork_retries,
                  int pdeathsig, bint print_traceback, bint stop_on_failure,
                  bint flush_each_fork=True):
        cdef int fds[2]
        cdef int s
        cdef epoll_event event
        self.bell_r = self.bell_w = self.epfd = -1
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if jobs < 1:
            raise ValueError("jobs must be >= 1")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be None or > 0, not {timeout!r}")
        _checked_pdeathsig(pdeathsig)
        self.fn = fn
        self.items = iter(items)
        self.jobs = jobs
        self.timeout = 0.0 if timeout is None else timeout
        self.grace = grace
        self.fork_retries = fork_retries
        self.pdeathsig = pdeathsig
        self.print_traceback = print_traceback
        self.stop_on_failure = stop_on_failure
        self.flush_each_fork = flush_each_fork
        self.launching = True
        self.poll_interval = 0.0005
        self.parent = getpid()
        self.outcome_items = []
        self.big_payloads = []
        self.events = <epoll_event *>malloc(_MAX_EVENTS * sizeof(epoll_event))
        self.scratch = <char *>malloc(_SCRATCH)
        if self.events == NULL or self.scratch == NULL:
            raise MemoryError()
        # A huge ``jobs`` (no limit) costs nothing until that many children run.
        self._grow_slots(min(jobs, _FIRST_SLOTS))
        self.fd_room = jobs if _fdlimit.fd_limit()[0] >= _FDS_PER_CHILD * jobs + _FD_SLACK else 0
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            _raise_errno(errno)
        _own(self.epfd)
        if pipe2(fds, O_CLOEXEC) < 0:
            _raise_errno(errno)
        self.bell_r, self.bell_w = fds[0], fds[1]
        _own(self.bell_r)
        _own(self.bell_w)
        # Read without blocking; children write their tokens blocking, so
        # that none is lost when the doorbell is full.
        _set_blocking(self.bell_r, False)
        if self._watch(self.bell_r, _BELL_EVENT, EPOLLIN) < 0:
            _raise_errno(errno)

    def __dealloc__(self):
        # Normally close() has run; this is the safety net (no Python code
        # here). A copy in another process (forked by someone else) must not
        # touch children that are not its own.
        if getpid() == self.parent:
            self._kill_and_reap_all()
            self._close_fds()
        free(self.free_slots)
        free(self.reaped_slots)
        free(self.polled_slots)
        free(self.events)
        free(self.scratch)
        free(self.outcomes)
        free(self.arena)

    @property
    def pending(self):
        """(index, item) of the item whose fork failed for good, or None."""
        return (self.next_index - 1, self.pending_item) if self.has_pending else None

    @property
    def done_running(self):
        """True once no child runs and none will be started."""
        return self.running == 0 and not self.launching

    def stop_launching(self):
        """Start no more children; the running ones go on."""
        self.launching = False

    def terminate(self):
        """Start no more children; send each running one SIGTERM (and SIGCONT) without waiting.

        SIGCONT: a stopped child could not act on SIGTERM. One that has
        exited is reaped instead. close() follows, to SIGKILL the rest.
        """
        self._terminate()

    cdef void _terminate(self) noexcept:
        cdef int s
        self.launching = False
        if self.slots == NULL:
            return  # closed
        for s in range(self.n_slots):
            if self.slots[s].pid and not self.slots[s].reaped:
                self._signal(s, SIGTERM, SIGCONT)

    def fileno(self):
        """The fan-out's epoll fd, readable when ``step(wait=False)`` has work; -1 once closed."""
        return self.epfd

    def wake_in(self):
        """Seconds after which ``step(wait=False)`` is due even if ``fileno()`` stays quiet.

        For a timeout, a fork retry, a child polled by pid or the sweep;
        None when only ``fileno()`` can say. Each call with children polled
        by pid backs their polling off, as a wait does.
        """
        cdef double wake
        if self.slots == NULL:
            return None
        wake = self._wake_time(False, 0.0)
        return None if wake == 0 else max(wake - _monotonic(), 0.0)

    def step(self, bint until_done=False, bint wait=True):
        """Start children while there is room, wait, and return finished outcomes.

        Returns a list of (index, item, pid, returncode, kind, payload,
        timed_out, lost) in completion order: ``kind`` and ``payload`` are the
        child's whole frame (b"R" or b"E" and the pickled bytes) or None when
        none arrived whole; ``returncode`` is None if the child was ``lost``
        (reaped by someone else). Returns after the first wait that finished
        a child, or with ``until_done`` once every child has finished; [] when
        there is nothing left to do. Raises what a signal handler raises, and
        OSError when a pipe or a fork fails for a reason not retried.

        With ``wait`` false it never sleeps, for an event loop that drives the
        fan-out (fastfork.aio): it handles what has happened, starts children
        while there is room and returns what has finished (with
        ``until_done``, [] until every child has). Call it again once
        ``fileno()`` is readable, or ``wake_in()`` seconds later.
        """
        if not wait:
            if self.slots == NULL:
                return []  # closed
            self._wait_once(False, 0.0, False)
            self._launch_while_room(until_done)
            if not until_done or (self.running == 0 and not self.launching):
                return self._hand_out()
            return []
        while True:
            self._launch_while_room(until_done)
            if (self.running == 0 and not self.launching) or (self.n_outcomes and not until_done):
                return self._hand_out()
            self._wait_once(False)

    cdef list _hand_out(self):
        """The finished outcomes as tuples (see step); forgets them."""
        cdef Py_ssize_t i
        cdef _Outcome *o
        handed = []
        for i in range(self.n_outcomes):
            o = &self.outcomes[i]
            if o.kind == 0:
                kind = payload = None
            else:
                kind = b"R" if o.kind == _RESULT else b"E"
                if o.offset >= 0:
                    payload = PyBytes_FromStringAndSize(self.arena + o.offset, o.length)
                else:
                    payload = self.big_payloads[-1 - o.offset]
            handed.append((o.index, self.outcome_items[i], o.pid,
                           None if o.lost else o.returncode, kind, payload,
                           o.timed_out, o.lost))
        self._forget_outcomes()
        return handed

    cdef void _forget_outcomes(self) noexcept:
        self.n_outcomes = 0
        self.arena_size = 0
        self.outcome_items = []
        self.big_payloads = []

    def close(self, double grace):
        """Stop every running child (SIGTERM, ``grace`` seconds, SIGKILL) and reap it.

        Closes every fd the fan-out made; outcomes not handed out are dropped.
        Safe to call twice. If a signal handler raises meanwhile, the children
        are killed at once, reaped all the same, and the exception re-raised.
        """
        cdef int s
        cdef double deadline
        error = None
        if getpid() != self.parent:
            raise RuntimeError("this fan-out belongs to another process")
        if self.slots == NULL:
            return  # closed already
        self._terminate()
        for s in range(self.n_slots):
            if self.slots[s].pid and self.slots[s].reaped:
                self._free_slot(&self.slots[s])  # or we would wait for it below
        self._forget_outcomes()
        deadline = _monotonic() + grace
        while self.running and _monotonic() < deadline:
            try:
                self._wait_once(True, deadline)
            except BaseException as exc:
                error = exc
                break
        self._kill_and_reap_all()
        self._forget_outcomes()
        self._close_fds()
        if error is not None:
            raise error

    # ------------------------------------------------------------ starting

    cdef int _launch_while_room(self, bint until_done) except -1:
        """Start children while there is room; with ``until_done`` false, stop
        at the first outcome (for step to hand out)."""
        cdef PyObject *drawn
        cdef int launched = 0
        while self.launching and self.running < self.jobs and not self.fd_wait:
            if launched and launched % _LAUNCHES_PER_LOOK == 0:
                # A wide fan-out forks for a long time before it waits: the
                # children that have exited meanwhile are finished now, or
                # their pipes and zombies would pile up and make every later
                # fork dearer.
                self._wait_once(False, 0.0, False)
                if self.n_outcomes and not until_done:
                    return 0
            if self.backoff_until:
                if _monotonic() < self.backoff_until:
                    return 0
                self.backoff_until = 0.0
            if not self.has_pending:
                drawn = PyIter_Next_raw(<PyObject *>self.items)
                if drawn == NULL:
                    if PyErr_Occurred():
                        return -1  # propagates what the iterator raised
                    self.launching = False
                    return 0
                self.pending_item = <object>drawn
                Py_DECREF(<object>drawn)  # pending_item holds it now
                self.has_pending = True
                self.next_index += 1
            try:
                self._launch(self.next_index - 1, self.pending_item)
            except OSError as exc:
                if (exc.errno == EMFILE or exc.errno == ENFILE) and self.running:
                    # Out of fds: the next launch waits until a running child
                    # has finished and freed its own (as fastfork._scheduler).
                    self.fd_wait = True
                    self.fd_room = self.running  # look at the limit again then
                    self._warn_fd_wait()
                    return 0
                if exc.errno != EAGAIN and exc.errno != ENOMEM:
                    raise
                self.fork_failures += 1
                if self.fork_failures > self.fork_retries:
                    self.fork_error = exc
                    self.launching = False
                    return 0
                # Back off while the running children finish and free resources.
                self.backoff_until = _monotonic() + _backoff(self.fork_failures)
                continue
            self.has_pending = False
            self.pending_item = None
            self.fork_failures = 0
            self.started += 1
            launched += 1
        return 0

    cdef int _grow_slots(self, int n) except -1:
        """Make ``n`` slots (more than now); the new ones go on the free stack.

        Called only with every slot in use (none free). Slots are referred
        to by number between calls, so moving the array is safe.
        """
        cdef _Slot *slots = <_Slot *>realloc(self.slots, n * sizeof(_Slot))
        if slots == NULL:
            raise MemoryError()
        self.slots = slots
        cdef int *free_slots = <int *>realloc(self.free_slots, n * sizeof(int))
        if free_slots == NULL:
            raise MemoryError()
        self.free_slots = free_slots
        cdef int *reaped_slots = <int *>realloc(self.reaped_slots, n * sizeof(int))
        if reaped_slots == NULL:
            raise MemoryError()
        self.reaped_slots = reaped_slots
        cdef int *polled_slots = <int *>realloc(self.polled_slots, n * sizeof(int))
        if polled_slots == NULL:
            raise MemoryError()
        self.polled_slots = polled_slots
        memset(&self.slots[self.n_slots], 0, (n - self.n_slots) * sizeof(_Slot))
        cdef int s
        for s in range(self.n_slots, n):
            self.slots[s].pidfd = self.slots[s].rfd = self.slots[s].wfd = -1
            self.slots[s].polled_at = -1
            self.free_slots[self.n_free] = n - 1 - (s - self.n_slots)  # lowest on top
            self.n_free += 1
        self.n_slots = n
        return 0

    cdef int _launch(self, Py_ssize_t index, item) except -1:
        """Fork the child for item number ``index`` into a free slot."""
        if self.n_free == 0:
            self._grow_slots(min(self.jobs, 2 * self.n_slots))
        cdef int s = self.free_slots[self.n_free - 1]
        cdef int fds[2]
        cdef pid_t pid
        cdef bint alone
        cdef _Slot *slot = &self.slots[s]
        if ff_is_finalizing():
            raise _FinalizationError("can't fork at interpreter shutdown")
        if self.running >= self.fd_room:
            self._make_fd_room()
        # Both ends non-blocking: the child writes its frame without blocking
        # first (see _write_all).
        if pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0:
            _raise_errno(errno)
        slot.rfd, slot.wfd = fds[0], fds[1]
        try:
            _own(fds[0])
            _own(fds[1])
            # A signal handler due now runs before the flush, not after it (in
            # _fork_checked), where what it prints would reach the child.
            PyErr_CheckSignals()
            alone = _only_thread()
            if self.flush_each_fork or self.started == 0 or not alone:
                # Or the child would print the parent's buffered output again.
                # Between two forks of ours only our C code runs, unless
                # flush_each_fork says otherwise or another thread is alive.
                _flush_stdio()
            pid = _fork_holding_fd_lock(alone)
        except BaseException:
            self._close_slot_fds(slot)
            raise
        if pid == 0:
            _child_main(self.pdeathsig, self.parent, _engine_child_body,
                        (self, slot.wfd, s, item))
        # Recorded at once (no Python code runs until close() could need it).
        slot.pid = pid
        Py_INCREF(item)
        slot.item = <PyObject *>item
        self.running += 1
        self.n_free -= 1
        slot.index = index
        slot.deadline = _monotonic() + self.timeout if self.timeout > 0 else 0.0
        slot.kill_at = 0.0
        slot.size = 0
        slot.returncode = 0
        slot.draining = slot.reaped = slot.lost = slot.timed_out = False
        _close_fd(&slot.wfd)
        # No events asked for: epoll reports the hang-up alone (see the top).
        if self._watch(slot.rfd, (<unsigned long long>s << 1) | 1, 0) < 0:
            self._poll(s)  # no event will come: polled by pid instead
        # Every deadline is later than those before it (one timeout for all).
        if slot.deadline and not self.next_timer:
            self.next_timer = slot.deadline
        return 0

    cdef int _make_fd_room(self) except -1:
        """Raise the soft fd limit, if need be, so that ``jobs`` children fit at once.

        Only as far as needed, and at most to the hard limit. Raises OSError
        (EMFILE) if not even one more child fits now.
        """
        in_use, soft, hard = _fdlimit.make_room(
            _FDS_PER_CHILD * (self.jobs - self.running) + _FDS_TO_SPARE)
        self.fd_room = self.running + max(soft - in_use - _FDS_TO_SPARE, 0) // _FDS_PER_CHILD
        if self.fd_room <= self.running:
            raise _fdlimit.no_room_error(in_use, self.running, hard, _FDS_PER_CHILD,
                                         _FDS_TO_SPARE)
        return 0

    cdef int _warn_fd_wait(self) except -1:
        """Warn, once per fan-out, that the fd limit holds children back."""
        if self.fd_warned:
            return 0
        self.fd_warned = True
        message = _fdlimit.wait_message(self.running, self.jobs, _FDS_PER_CHILD).encode()
        PyErr_WarnEx(RuntimeWarning, message, _callers_stacklevel())
        return 0

    cdef int _child_work(self, int fd, int token, item) except -1:
        """In the forked child: run ``fn(item)`` and report on ``fd``; the exit code."""
        close_inherited_fds((fd, self.bell_w))
        _close_in_later_forks(fd, self.bell_w)
        return _run_and_report(self.fn, (item,), {}, fd, self.print_traceback,
                               self.bell_w, token)

    # ------------------------------------------------------------ waiting

    cdef int _wait_once(self, bint stopping, double until=0.0, bint sleep=True) except -1:
        """Sleep until something happens, then handle it (reads, exits, timeouts).

        ``stopping`` (close): no timeouts to enforce; ``until`` caps the sleep;
        without ``sleep``, handle only what has happened already.
        """
        cdef double wake = -1.0
        cdef int n
        if self.running and not self.next_sweep:
            self.next_sweep = _monotonic() + _SWEEP_INTERVAL
        if sleep:
            wake = self._wake_time(stopping, until)
        n = self._epoll_wait(wake)
        if n < 0:
            return 0  # a signal interrupted the wait; its handlers have run
        self._handle_events(n)
        if self.n_polled:
            self._reap_polled()
        if self.running and _monotonic() >= self.next_sweep:
            self._sweep()
            self.next_sweep = _monotonic() + _SWEEP_INTERVAL
        if not stopping and self.next_timer and _monotonic() >= self.next_timer:
            self._enforce_timeouts(_monotonic())
        self._finish_reaped()
        return 0

    cdef double _wake_time(self, bint stopping, double until) noexcept:
        """When a wait must end at the latest (0: no limit), ``until`` at the latest.

        Backs off the polling of children polled by pid.
        """
        cdef double wake = until
        if self.running and not self.next_sweep:
            self.next_sweep = _monotonic() + _SWEEP_INTERVAL
        if not stopping and self.next_timer:
            wake = _earliest(wake, self.next_timer)
        if self.launching and self.backoff_until:
            wake = _earliest(wake, self.backoff_until)
        if self.n_polled:
            # Children polled by pid are waited for on a timer, with capped back-off.
            wake = _earliest(wake, _monotonic() + self.poll_interval)
            self.poll_interval = min(self.poll_interval * 2, 0.05)
        if self.running:
            wake = _earliest(wake, self.next_sweep)
        return wake

    cdef int _epoll_wait(self, double wake) except -2:
        """Wait for events until ``wake`` (0: no limit, < 0: no wait); how many arrived.

        Returns -1 if a signal interrupted the wait (its handlers have run).
        """
        cdef int rc, ms
        # A handler that became due while we were busy (during a fork, say)
        # runs now: epoll_wait() would not be interrupted for it.
        PyErr_CheckSignals()
        if wake < 0:
            ms = 0
        elif wake == 0:
            ms = -1
        else:
            ms = <int>(min(max(wake - _monotonic(), 0.0), 60.0) * 1000.0 + 0.999)
        with nogil:
            rc = epoll_wait(self.epfd, self.events, _MAX_EVENTS, ms)
        if rc >= 0:
            return rc
        if errno != EINTR:
            _raise_errno(errno)
        PyErr_CheckSignals()
        return -1

    cdef int _handle_events(self, int n) except -1:
        """Answer the doorbell, read the pipes that have data or hung up, reap
        those whose pidfd is readable."""
        cdef int k, s
        cdef unsigned long long data
        for k in range(n):
            data = self.events[k].data.u64
            if data == _BELL_EVENT:
                self._answer_bell()
                continue
            s = <int>(data >> 1)
            if not self.slots[s].pid:
                continue
            if data & 1:
                self._read_pipe(s)
            elif not self.slots[s].reaped:
                self._try_reap(s)
        return 0

    cdef int _watch(self, int fd, unsigned long long data, unsigned int events) noexcept:
        """Register ``fd`` with the epoll set for ``events``; epoll_ctl's result.

        EPOLLHUP and EPOLLERR are always reported, even with ``events`` 0.
        """
        cdef epoll_event event
        event.events = events
        event.data.u64 = data
        return epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &event)

    cdef void _unwatch_and_close(self, int *fd) noexcept:
        """Take ``*fd`` out of the epoll set, then close it (see _close_fd).

        Explicitly: a child forked a moment ago may still hold a copy, which
        would keep the registration (and its slot number) alive.
        """
        cdef epoll_event event
        if fd[0] >= 0 and self.epfd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd[0], &event)
        _close_fd(fd)

    cdef void _poll(self, int s) noexcept:
        """Wait for the slot's child by pid on the timer: no event will tell of its exit."""
        if self.slots[s].polled_at >= 0:
            return
        self.slots[s].polled_at = self.n_polled
        self.polled_slots[self.n_polled] = s
        self.n_polled += 1
        self.poll_interval = 0.0005  # it is likely to be reapable at once

    cdef void _unpoll(self, _Slot *slot) noexcept:
        """Take the slot off the list of those polled by pid (if it is on it)."""
        cdef int last
        if slot.polled_at < 0:
            return
        self.n_polled -= 1
        last = self.polled_slots[self.n_polled]
        self.polled_slots[slot.polled_at] = last
        self.slots[last].polled_at = slot.polled_at
        slot.polled_at = -1

    cdef int _reap_polled(self) except -1:
        cdef int i
        # From the end: reaping one moves the last (already tried) into its place.
        for i in range(self.n_polled - 1, -1, -1):
            if i < self.n_polled:
                self._try_reap(self.polled_slots[i])
        return 0

    cdef int _sweep(self) except -1:
        """Wait for every unreaped child without blocking: the safety net for a
        child whose pipe a grandchild holds open (see the top)."""
        cdef int s
        for s in range(self.n_slots):
            if self.slots[s].pid and not self.slots[s].reaped:
                self._try_reap(s)
        return 0

    cdef int _finish_reaped(self) except -1:
        cdef int s
        while self.n_reaped:
            # Taken off first: should _finish raise, the list stays exact.
            self.n_reaped -= 1
            s = self.reaped_slots[self.n_reaped]
            # A slot close() freed already has no pid.
            if self.slots[s].pid and self.slots[s].reaped:
                self._finish(s)
                self.poll_interval = 0.0005
        return 0

    cdef int _answer_bell(self) except -1:
        """Read the slot numbers children rang with; drain those pipes from now on."""
        cdef int tokens[64]
        cdef int s
        cdef Py_ssize_t n, i
        cdef epoll_event event
        while True:
            n = c_read(self.bell_r, tokens, sizeof(tokens))
            if n < 0 and errno == EINTR:
                continue
            if n <= 0:
                return 0
            for i in range(n // <Py_ssize_t>sizeof(int)):
                # A token can outlive its child (it exited before we read it):
                # draining the slot's next child too is harmless.
                s = tokens[i]
                if 0 <= s < self.n_slots and self.slots[s].pid and not self.slots[s].draining:
                    self.slots[s].draining = True
                    if self.slots[s].rfd < 0:
                        continue
                    event.events = EPOLLIN
                    event.data.u64 = (<unsigned long long>s << 1) | 1
                    # A pipe whose registration failed at launch is added now.
                    if (epoll_ctl(self.epfd, EPOLL_CTL_MOD, self.slots[s].rfd, &event) < 0
                            and self._watch(self.slots[s].rfd, event.data.u64, EPOLLIN) < 0):
                        _raise_errno(errno)
                    self._read_pipe(s)

    cdef int _read_pipe(self, int s) except -1:
        """Drain the slot's pipe; once it has hung up (and is closed), reap its child."""
        cdef _Slot *slot = &self.slots[s]
        if slot.rfd < 0:
            return 0
        self._drain(slot)
        if slot.rfd < 0 and not slot.reaped:
            self._on_hang_up(s)
        return 0

    cdef int _on_hang_up(self, int s) except -1:
        """The slot's pipe has hung up (read and closed): reap the child, or watch for its exit.

        It cannot be reaped yet if it has closed its files but is not a
        zombie yet, or if it closed the pipe itself and runs on: then a pidfd
        takes the pipe's place in the epoll set, or (no pidfd) it is polled.
        """
        cdef _Slot *slot = &self.slots[s]
        self._try_reap(s)
        if slot.reaped or slot.pidfd >= 0:
            return 0
        # Opened after that wait found a running child of ours with this pid:
        # it names our child unless someone else reaped ours meanwhile and
        # the pid was handed on to another child of ours (see the top).
        slot.pidfd = _open_pidfd(slot.pid)
        if slot.pidfd >= 0:
            _own(slot.pidfd)
            if self._watch(slot.pidfd, <unsigned long long>s << 1, EPOLLIN) == 0:
                return 0
            _close_fd(&slot.pidfd)
        self._poll(s)
        return 0

    cdef int _drain(self, _Slot *slot) except -1:
        """Read what the slot's pipe holds now; close it at end of file.

        Into the slot's buffer while it has room, else through the scratch
        buffer into a slot buffer grown to fit: a small frame then costs a
        few bytes of the heap, not a page of its own as a buffer sized for
        large reads would (each page the parent has in use makes every fork
        dearer).
        """
        cdef Py_ssize_t n
        cdef char *into
        while slot.rfd >= 0:
            into = slot.buf + slot.size if slot.cap > slot.size else self.scratch
            n = c_read(slot.rfd, into, slot.cap - slot.size if into != self.scratch else _SCRATCH)
            if n > 0:
                if into == self.scratch:
                    self._keep(slot, n)
                else:
                    slot.size += n
            elif n == 0:
                self._unwatch_and_close(&slot.rfd)
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return 0
            else:
                _raise_errno(errno)
        return 0

    cdef int _keep(self, _Slot *slot, Py_ssize_t n) except -1:
        """Append the first ``n`` bytes of the scratch buffer to the slot's buffer."""
        cdef Py_ssize_t cap = slot.cap
        cdef char *grown
        if slot.size + n > cap:
            # Just enough for a first read; doubling after that.
            cap = slot.size + n if slot.size == 0 else max(slot.size + n, 2 * slot.cap)
            grown = <char *>realloc(slot.buf, cap)
            if grown == NULL:
                raise MemoryError()
            slot.buf = grown
            slot.cap = cap
        memcpy(slot.buf + slot.size, self.scratch, n)
        slot.size += n
        return 0

    cdef int _reap_step(self, int s, int pidfd) noexcept:
        """One wait for the slot's child without blocking, through ``pidfd`` if >= 0.

        Returns 1 if the child is reaped now (or found reaped by someone
        else: lost), 0 if it has not exited, -1 with errno on another error.
        """
        cdef _Slot *slot = &self.slots[s]
        cdef int status = 0
        cdef pid_t rc = _wait_child(slot.pid, pidfd, WNOHANG, &status, NULL)
        if rc > 0:
            slot.returncode = _exitcode_of_status(status)
        elif rc < 0 and errno == ECHILD:
            slot.lost = True  # reaped by someone else
        elif rc == 0 or errno == EINTR:
            return 0
        else:
            return -1
        slot.reaped = True
        self._unpoll(slot)
        self.reaped_slots[self.n_reaped] = s
        self.n_reaped += 1
        return 1

    cdef int _try_reap(self, int s) except -1:
        """Reap the slot's child if it has exited (without blocking)."""
        if self._reap_step(s, self.slots[s].pidfd) < 0:
            _raise_errno(errno)
        return 0

    cdef int _finish(self, int s) except -1:
        """The slot's child is reaped: read the rest of its pipe, record its outcome."""
        cdef _Slot *slot = &self.slots[s]
        cdef unsigned long long length = 0
        cdef int i
        cdef _Outcome *o
        # It has exited, so all it wrote is in the pipe (if that is still
        # open); a grandchild that still holds the write end is not waited for.
        self._drain(slot)
        o = self._new_outcome()
        o.index = slot.index
        o.pid = slot.pid
        o.returncode = slot.returncode
        o.timed_out = slot.timed_out
        o.lost = slot.lost
        o.kind = 0
        if slot.size >= _HEADER and (slot.buf[0] == _RESULT or slot.buf[0] == _ERROR):
            for i in range(8):
                length = (length << 8) | <unsigned char>slot.buf[1 + i]
            if length <= <unsigned long long>(slot.size - _HEADER):
                o.length = length
                if length <= _ARENA_PAYLOAD:
                    o.offset = self._to_arena(slot.buf + _HEADER, length)
                else:
                    o.offset = -1 - len(self.big_payloads)
                    self.big_payloads.append(
                        PyBytes_FromStringAndSize(slot.buf + _HEADER, length))
                o.kind = slot.buf[0]  # last: the outcome is complete only now
        self.outcome_items.append(<object>slot.item)
        self.n_outcomes += 1
        # A child stopped for its timeout fails whatever it sent (ChildTimeout).
        if (o.kind != _RESULT or o.timed_out) and self.stop_on_failure:
            self.launching = False
        self._free_slot(slot)
        return 0

    cdef _Outcome *_new_outcome(self) except NULL:
        """Room for one more outcome (not yet counted in n_outcomes)."""
        cdef _Outcome *grown
        if self.n_outcomes == self.outcomes_cap:
            grown = <_Outcome *>realloc(self.outcomes,
                                        max(2 * self.outcomes_cap, 64) * sizeof(_Outcome))
            if grown == NULL:
                raise MemoryError()
            self.outcomes = grown
            self.outcomes_cap = max(2 * self.outcomes_cap, 64)
        return &self.outcomes[self.n_outcomes]

    cdef Py_ssize_t _to_arena(self, const char *data, Py_ssize_t length) except -1:
        """Copy a small payload to the arena; return its offset there."""
        cdef char *grown
        cdef Py_ssize_t offset = self.arena_size
        if self.arena_size + length > self.arena_cap:
            grown = <char *>realloc(self.arena, max(2 * self.arena_cap, 4096) + length)
            if grown == NULL:
                raise MemoryError()
            self.arena = grown
            self.arena_cap = max(2 * self.arena_cap, 4096) + length
        memcpy(self.arena + offset, data, length)
        self.arena_size += length
        return offset

    cdef void _free_slot(self, _Slot *slot) noexcept:
        """Close the slot's fds, drop its item, make it free."""
        self._close_slot_fds(slot)
        if slot.cap > _KEEP_BUFFER:
            free(slot.buf)
            slot.buf = NULL
            slot.cap = 0
        Py_XDECREF(slot.item)
        slot.item = NULL
        slot.pid = 0
        self.running -= 1
        self.fd_wait = False  # its fds are free: launches may go on
        self.free_slots[self.n_free] = slot - self.slots
        self.n_free += 1

    # ------------------------------------------------------------ stopping

    cdef int _pidfd_to_signal(self, _Slot *slot) noexcept:
        """The slot's pidfd, or one opened now (the caller closes it); -1 if none can be had."""
        if slot.pidfd >= 0:
            return slot.pidfd
        return _open_pidfd(slot.pid)

    cdef bint _signal(self, int s, int sig, int then=0) noexcept:
        """Send ``sig`` (and ``then``, if not 0) to the slot's unreaped child, if it runs.

        A child that has exited is reaped instead (or found lost) and not
        signalled. A pidfd opened for the signal is opened before that wait:
        if the wait finds a running child of ours, the pidfd names it (see
        the top). Returns True if the child was signalled.
        """
        cdef _Slot *slot = &self.slots[s]
        cdef int pidfd = self._pidfd_to_signal(slot)
        cdef bint running = self._reap_step(s, pidfd) == 0
        if running:
            _signal_child(slot.pid, pidfd, sig)
            if then:
                _signal_child(slot.pid, pidfd, then)
        if pidfd >= 0 and pidfd != slot.pidfd:
            close(pidfd)
        return running

    cdef int _enforce_timeouts(self, double now) except -1:
        """Signal the children whose time is up; find when the next one is due.

        Scans every slot, but only when ``next_timer`` is due.
        """
        cdef int s
        cdef _Slot *slot
        self.next_timer = 0.0
        for s in range(self.n_slots):
            slot = &self.slots[s]
            if not slot.pid or slot.reaped:
                continue
            if slot.deadline and not slot.timed_out and now >= slot.deadline:
                slot.timed_out = True
                if self.grace > 0:
                    if self._signal(s, SIGTERM, SIGCONT):
                        slot.kill_at = now + self.grace
                else:
                    self._signal(s, SIGKILL)
            elif slot.kill_at and now >= slot.kill_at:
                self._signal(s, SIGKILL)
                slot.kill_at = 0.0
            if slot.deadline and not slot.timed_out:
                self.next_timer = _earliest(self.next_timer, slot.deadline)
            if slot.kill_at:
                self.next_timer = _earliest(self.next_timer, slot.kill_at)
        return 0

    cdef void _kill_and_reap_all(self) noexcept:
        """SIGKILL every child still running and reap it, blocking; no Python code."""
        cdef int s, pidfd
        cdef _Slot *slot
        if self.slots == NULL:
            return
        for s in range(self.n_slots):
            slot = &self.slots[s]
            if not slot.pid or slot.reaped:
                continue
            pidfd = self._pidfd_to_signal(slot)
            if self._reap_step(s, pidfd) == 0:  # as _signal: only a running child
                _signal_child(slot.pid, pidfd, SIGKILL)
                with nogil:
                    # SIGKILL cannot be caught: only a child stuck in the kernel waits here.
                    _reap_quietly(slot.pid, pidfd)
            if pidfd >= 0 and pidfd != slot.pidfd:
                close(pidfd)
            slot.reaped = True
        for s in range(self.n_slots):
            if self.slots[s].pid:
                self._free_slot(&self.slots[s])

    # ------------------------------------------------------------ fds

    cdef void _close_slot_fds(self, _Slot *slot) noexcept:
        self._unwatch_and_close(&slot.rfd)
        _close_fd(&slot.wfd)
        self._unwatch_and_close(&slot.pidfd)
        self._unpoll(slot)

    cdef void _close_fds(self) noexcept:
        cdef int s
        if self.slots != NULL:
            for s in range(self.n_slots):
                self._close_slot_fds(&self.slots[s])
                free(self.slots[s].buf)
            free(self.slots)
            self.slots = NULL
        _close_fd(&self.bell_r)
        _close_fd(&self.bell_w)
        _close_fd(&self.epfd)


# ---------------------------------------------------------------- the child's forks

# An engine child's two fds of the fan-out (its result pipe and the doorbell)
# and their identity: an at-fork hook closes them in every process the child
# forks with os.fork (multiprocessing too), where the result pipe's write end
# would keep the pipe from hanging up when the child exits. fastfork's own
# forks close them as owned fds; see the top for forks that run no hook.
cdef int _fan_out_fds[2]
cdef struct_stat _fan_out_fd_stats[2]
_fan_out_fds[0] = _fan_out_fds[1] = -1


cdef void _close_in_later_forks(int result_fd, int bell) noexcept:
    """In an engine child: have the at-fork hook close these fds in its children."""
    cdef int i
    _fan_out_fds[0], _fan_out_fds[1] = result_fd, bell
    for i in range(2):
        if fstat(_fan_out_fds[i], &_fan_out_fd_stats[i]) < 0:
            _fan_out_fds[i] = -1


def _close_fan_out_fds_after_fork():
    """After a fork in an engine child: close its fan-out fds in the new process.

    Each only while it is still that file: user code may have closed it and
    the number may name another file now.
    """
    cdef struct_stat st
    cdef int i
    for i in range(2):
        if _fan_out_fds[i] < 0:
            continue
        if (fstat(_fan_out_fds[i], &st) == 0 and st.st_ino == _fan_out_fd_stats[i].st_ino
                and st.st_dev == _fan_out_fd_stats[i].st_dev):
            _close_fd(&_fan_out_fds[i])
        _fan_out_fds[i] = -1


os.register_at_fork(after_in_child=_close_fan_out_fds_after_fork)


cdef int _engine_child_body(object work) except -1:
    """_child_main's body for an engine child: ``work`` is (engine, fd, token, item)."""
    cdef FanOut engine = work[0]
    return engine._child_work(work[1], work[2], work[3])


cdef inline double _earliest(double a, double b) noexcept nogil:
    """The earlier of two monotonic times, where 0 means none."""
    if a == 0:
        return b
    return a if a < b else b
