# Waiting for children. Included by _core.pyx.
#
# One wait step (_wait_child) for every caller (bar the drop-ins wait() and
# wait3(), which make their os twin's call): through the child's pidfd where
# the kernel has waitid(P_PIDFD) (Linux 5.4+), so a pid that someone else
# reaped and the kernel handed to a new process is never taken for ours; by
# pid elsewhere. Whether to use pidfds is probed once, at import, as
# psutil's can_use_pidfd_open() does; _open_pidfd then gives no pidfd where
# they are not used. Blocking waits release the GIL; on EINTR they run the
# signal handlers and retry (_wait_retrying), except on cleanup paths where
# a handler's exception would have nowhere to go (_reap_quietly).

import math
import numbers
# Resolved at import: a lazy import fails during interpreter shutdown, when a
# __del__ may still reap a child with wait3/wait4.
import resource

cdef object _struct_rusage = resource.struct_rusage


cdef bint _probe_pidfd() noexcept:
    """True if this kernel has pidfd_open and waitid(P_PIDFD) (Linux 5.4+).

    Asked of our own pid, which is not our child: a kernel that knows P_PIDFD
    answers ECHILD; one that does not (5.3), EINVAL; a seccomp filter, ENOSYS
    or EPERM.
    """
    cdef siginfo_t info
    cdef int fd = <int>syscall(SYS_pidfd_open, getpid(), 0)
    cdef bint usable
    if fd < 0:
        return False
    usable = syscall(SYS_waitid, P_PIDFD, fd, &info, WEXITED | WNOHANG, NULL) == 0 or errno == ECHILD
    close(fd)
    return usable


cdef bint _use_pidfd = _probe_pidfd()


def _set_use_pidfd(bint use):
    """Use pidfds where the kernel has them (True, the default) or wait by pid
    only; for tests. Applies to handles made afterwards. Returns whether
    pidfds are used now."""
    global _use_pidfd
    _use_pidfd = use and _probe_pidfd()
    return _use_pidfd


cdef int _open_pidfd(pid_t pid) noexcept nogil:
    """A pidfd (close-on-exec) for ``pid``; -1 where pidfds are not used, or on failure."""
    if not _use_pidfd:
        return -1
    return <int>syscall(SYS_pidfd_open, pid, 0)


cdef pid_t _wait_child(pid_t pid, int pidfd, int options, int *status, rusage *ru) noexcept nogil:
    """One wait for a child: through ``pidfd`` where it has one (>= 0), else by pid.

    By pid: waitpid(), or wait4() when ``ru`` is wanted. With a pidfd,
    ``options`` may only be 0 or WNOHANG. Returns the pid reaped (``status``
    in waitpid's encoding, ``ru`` filled if not NULL), 0 when WNOHANG finds
    nothing ready, or -1 with errno.
    """
    cdef siginfo_t info
    if pidfd < 0:
        if ru == NULL:
            return c_waitpid(pid, status, options)
        return c_wait4(pid, status, options, ru)
    memset(&info, 0, sizeof(info))
    # The raw system call: glibc's waitid() has no rusage argument.
    if syscall(SYS_waitid, P_PIDFD, pidfd, &info, WEXITED | options, ru) < 0:
        return -1
    if info.si_pid == 0:
        status[0] = 0
        return 0
    status[0] = _status_of(&info)
    return info.si_pid


# os.wait and os.wait3 make these libc calls, and so do their drop-ins: the
# same system calls, seen by the same tools (an LD_PRELOAD shim, say).
cdef pid_t _libc_wait(pid_t pid, int pidfd, int options, int *status, rusage *ru) noexcept nogil:
    return c_wait(status)


cdef pid_t _libc_wait3(pid_t pid, int pidfd, int options, int *status, rusage *ru) noexcept nogil:
    return c_wait3(status, options, ru)


ctypedef pid_t (*_WaitCall)(pid_t pid, int pidfd, int options, int *status,
                            rusage *ru) noexcept nogil


cdef pid_t _wait_retrying(_WaitCall call, pid_t pid, int pidfd, int options, int *status,
                          rusage *ru) except -1:
    """``call`` (_wait_child, or a drop-in's libc call) with the GIL released,
    retried on EINTR after running the signal handlers (what they raise
    propagates). Raises OSError from errno."""
    cdef pid_t res
    while True:
        with nogil:
            res = call(pid, pidfd, options, status, ru)
        if res >= 0:
            return res
        if errno != EINTR:
            _raise_errno(errno)
        PyErr_CheckSignals()


cdef object _wait_with_rusage(_WaitCall call, pid_t pid, int pidfd, int options):
    """_wait_retrying as os.wait4 reports it: (pid, status, resource.struct_rusage).

    With WNOHANG and nothing ready, (0, 0, zeroed rusage).
    """
    cdef int status = 0
    cdef rusage ru
    cdef pid_t res
    memset(&ru, 0, sizeof(ru))
    res = _wait_retrying(call, pid, pidfd, options, &status, &ru)
    if res == 0:
        memset(&ru, 0, sizeof(ru))
    return res, status, _make_rusage(&ru)


cdef int _reap_quietly(pid_t pid, int pidfd) noexcept nogil:
    """Block until a child known to be ending (killed, or failing its exec) is reaped.

    EINTR is retried without running Python code: for cleanup paths and
    finalizers, where what a signal handler raised would be lost. Returns
    the status, or -1 (with errno) if the child could not be reaped.
    """
    cdef int status = 0
    while _wait_child(pid, pidfd, 0, &status, NULL) < 0:
        if errno != EINTR:
            return -1
    return status


cdef int _signal_child(pid_t pid, int pidfd, int sig) noexcept nogil:
    """Send ``sig`` to a child not yet reaped, through its pidfd where it has one.

    Until we reap it, its pid names our child (or its zombie) and nothing else.
    Returns 0, or -1 with errno (ESRCH: it has exited).
    """
    if pidfd >= 0:
        return <int>syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0)
    return c_kill(pid, sig)


cdef int _status_of(siginfo_t *info) noexcept nogil:
    """waitid()'s report of an exited child in waitpid()'s status encoding."""
    if info.si_code == CLD_EXITED:
        return (info.si_status & 0xff) << 8
    if info.si_code == CLD_DUMPED:
        return (info.si_status & 0x7f) | 0x80
    return info.si_status & 0x7f  # CLD_KILLED


cdef int _exitcode_of_status(int status) noexcept nogil:
    """os.waitstatus_to_exitcode for an exited or killed child."""
    if (status & 0x7f) == 0:
        return (status >> 8) & 0xff
    return -(status & 0x7f)


cdef object _make_rusage(rusage *ru):
    """Build a resource.struct_rusage exactly as os.wait3/os.wait4 do."""
    return _struct_rusage((
        ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6,
        ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6,
        ru.ru_maxrss, ru.ru_ixrss, ru.ru_idrss, ru.ru_isrss,
        ru.ru_minflt, ru.ru_majflt, ru.ru_nswap,
        ru.ru_inblock, ru.ru_oublock, ru.ru_msgsnd, ru.ru_msgrcv,
        ru.ru_nsignals, ru.ru_nvcsw, ru.ru_nivcsw,
    ))


cdef double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# ---------------------------------------------------------------- batch reap

cdef enum:
    _PENDING = 0    # states of a pid in a _Batch
    _REAPED = 1
    _NOT_A_CHILD = 2
    _FAILED = 3     # another errno, kept in the status slot


cdef class _Batch:
    """The C arrays of one reap() call: pids, their status and state, their pidfds."""

    cdef Py_ssize_t n
    cdef pid_t *pids
    cdef int *status
    cdef int *pidfds       # -2: not opened yet; -1: none
    cdef char *state

    def __cinit__(self, list pids):
        cdef Py_ssize_t i
        self.n = len(pids)
        # The pidfds are marked before anything can raise (MemoryError, or
        # OverflowError for a pid beyond pid_t): __dealloc__ closes what they hold.
        self.pidfds = <int *>malloc(self.n * sizeof(int))
        if self.pidfds != NULL:
            for i in range(self.n):
                self.pidfds[i] = -2
        self.pids = <pid_t *>malloc(self.n * sizeof(pid_t))
        self.status = <int *>calloc(self.n, sizeof(int))
        self.state = <char *>calloc(self.n, sizeof(char))
        if not (self.pids and self.status and self.pidfds and self.state):
            raise MemoryError()
        for i in range(self.n):
            self.pids[i] = pids[i]

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.pidfds != NULL:
            for i in range(self.n):
                if self.pidfds[i] >= 0:
                    close(self.pidfds[i])
        free(self.pids)
        free(self.status)
        free(self.pidfds)
        free(self.state)

    cdef int wait(self, bint has_deadline, double deadline) noexcept nogil:
        """Reap every pid (by the deadline, if there is one); -1 with errno on EINTR."""
        if not has_deadline:
            # Blocking waits in order: one system call per child.
            return self.reap_pending(0)
        while True:
            if self.reap_pending(WNOHANG) < 0:
                return -1
            if self.done() or _monotonic() >= deadline:
                return 0
            if self.sleep(deadline) < 0:
                return -1

    cdef bint done(self) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.state[i] == _PENDING:
                return False
        return True

    cdef int reap_pending(self, int options) noexcept nogil:
        """waitpid each pending pid; -1 with errno on EINTR."""
        cdef Py_ssize_t i
        cdef pid_t res
        for i in range(self.n):
            if self.state[i] != _PENDING:
                continue
            res = _wait_child(self.pids[i], -1, options, &self.status[i], NULL)
            if res > 0:
                self.state[i] = _REAPED
            elif res < 0:
                if errno == EINTR:
                    return -1
                elif errno == ECHILD:
                    self.state[i] = _NOT_A_CHILD
                else:
                    self.status[i] = errno
                    self.state[i] = _FAILED
        return 0

    cdef int sleep(self, double deadline) noexcept nogil:
        """Sleep until a pending child may have exited or the deadline passes.

        Polls the children's pidfds (opened on first need) where they are
        used, else sleeps a moment. Returns -1 with errno EINTR when a signal
        interrupts the poll.
        """
        cdef Py_ssize_t i, k = 0
        cdef double remaining = deadline - _monotonic()
        cdef int rc, ms
        cdef pollfd *fds
        if remaining <= 0:
            return 0
        # At most a minute per poll: a huge timeout would overflow int (and the
        # caller loops until the deadline anyway).
        ms = <int>(min(remaining, 60.0) * 1000.0) + 1
        fds = <pollfd *>malloc(self.n * sizeof(pollfd))
        if fds == NULL:
            usleep(1000)
            return 0
        for i in range(self.n):
            if self.state[i] != _PENDING:
                continue
            if self.pidfds[i] == -2:
                self.pidfds[i] = _open_pidfd(self.pids[i])
            if self.pidfds[i] < 0:
                # No pidfd (not used here, or the pid vanished): poll on a timer.
                k = -1
                break
            fds[k].fd = self.pidfds[i]
            fds[k].events = POLLIN
            fds[k].revents = 0
            k += 1
        if k < 0:
            free(fds)
            usleep(1000 if ms > 1 else 100)
            return 0
        rc = poll(fds, k, ms)
        free(fds)
        return -1 if rc < 0 and errno == EINTR else 0

    cdef list reaped(self):
        """The (pid, status) pairs reaped so far, in the order given."""
        cdef Py_ssize_t i
        return [(self.pids[i], self.status[i]) for i in range(self.n) if self.state[i] == _REAPED]

    cdef list outcome(self):
        """What reap() returns, or raises (see reap)."""
        cdef Py_ssize_t i
        reaped = self.reaped()
        for i in range(self.n):
            if self.state[i] == _FAILED:
                _raise_errno(self.status[i])
        missing = [self.pids[i] for i in range(self.n) if self.state[i] == _NOT_A_CHILD]
        if missing:
            err = ChildProcessError(ECHILD, "No child processes")
            err.reaped = reaped
            err.pids = missing
            raise err
        return reaped


cdef list _checked_pids(pids, timeout):
    """reap()'s arguments checked (see reap); returns the pids as a list of ints."""
    pid_list = [PyNumber_Index(obj) for obj in pids]
    if timeout is not None:
        if not isinstance(timeout, numbers.Real):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if math.isnan(timeout) or timeout < 0 or math.isinf(timeout):
            raise ValueError(f"timeout must be a finite number >= 0, not {timeout!r}")
    seen = set()
    for p in pid_list:
        if p <= 0:
            raise ValueError(f"reap() takes child pids > 0, not {p}")
        if p in seen:
            raise ValueError(f"pid {p} is listed twice")
        seen.add(p)
    return pid_list


def reap(pids, timeout=None):
    """Wait for every child in ``pids`` in one call, with the GIL released.

    Returns a list of (pid, status) pairs in the order of ``pids``. With a
    ``timeout`` (seconds), returns only those that finished in time; the rest
    are left untouched and can be reaped later. Only the listed pids are ever
    reaped.
    Raises TypeError for a non-integer pid or a non-real timeout; ValueError
    for a pid <= 0, a duplicate pid or a negative, NaN or infinite timeout;
    ChildProcessError if some pid was not a child of this process (or was
    already reaped) -- its ``reaped`` attribute holds the pairs that were
    reaped all the same, and ``pids`` the pids that were not children. An
    exception raised by a signal handler while waiting (KeyboardInterrupt)
    also carries ``reaped``, so no exit status is lost.
    """
    cdef _Batch batch
    cdef bint has_deadline = timeout is not None
    cdef double deadline = 0.0
    cdef int rc
    pid_list = _checked_pids(pids, timeout)
    if not pid_list:
        return []
    batch = _Batch(pid_list)
    if has_deadline:
        deadline = _monotonic() + float(timeout)
    while True:
        with nogil:
            rc = batch.wait(has_deadline, deadline)
        if rc == 0:
            return batch.outcome()
        # EINTR: run the signal handlers (Ctrl-C raises here) and go on.
        try:
            PyErr_CheckSignals()
        except BaseException as exc:
            # Those already reaped cannot be waited for again: hand them over.
            exc.reaped = batch.reaped()
            raise


# ---------------------------------------------------------------- dropped handles

cdef struct _Dropped:
    pid_t pid
    int pidfd       # -1: none


# Children whose handles were garbage-collected while they ran: reaped later
# (reap_dropped), never left as zombies. A forked child forgets its parent's.
cdef _Dropped *_dropped = NULL
cdef Py_ssize_t _n_dropped = 0
cdef Py_ssize_t _dropped_cap = 0


cdef void _drop_child(pid_t pid, int pidfd) noexcept:
    """Queue a running child (and its pidfd, owned from now on) for reap_dropped.

    Without memory to queue it, the child is killed and reaped at once rather
    than left as a zombie.
    """
    global _dropped, _dropped_cap, _n_dropped
    cdef _Dropped *grown
    if _n_dropped == _dropped_cap:
        grown = <_Dropped *>realloc(_dropped, max(2 * _dropped_cap, 16) * sizeof(_Dropped))
        if grown == NULL:
            _signal_child(pid, pidfd, SIGKILL)
            _reap_quietly(pid, pidfd)
            _close_fd(&pidfd)
            return
        _dropped = grown
        _dropped_cap = max(2 * _dropped_cap, 16)
    _dropped[_n_dropped].pid = pid
    _dropped[_n_dropped].pidfd = pidfd
    _n_dropped += 1


def reap_dropped():
    """Reap children whose handles were garbage-collected while they ran."""
    global _n_dropped
    cdef Py_ssize_t i = 0
    cdef int status
    cdef pid_t res
    while i < _n_dropped:
        res = _wait_child(_dropped[i].pid, _dropped[i].pidfd, WNOHANG, &status, NULL)
        if res == 0 or (res < 0 and errno == EINTR):
            i += 1  # still running (or interrupted): next time
            continue
        # Reaped, or gone (ECHILD: someone else reaped it).
        _close_fd(&_dropped[i].pidfd)
        _n_dropped -= 1
        _dropped[i] = _dropped[_n_dropped]


cdef void _forget_dropped() noexcept:
    """In a forked child: drop the parent's dropped children and close their pidfds."""
    global _n_dropped
    cdef Py_ssize_t i
    for i in range(_n_dropped):
        _close_fd(&_dropped[i].pidfd)
    _n_dropped = 0
