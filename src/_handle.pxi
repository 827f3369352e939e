# ChildHandle: the C half of fastfork.Child, whose Python subclasses
# (Child, FunctionChild, ServerChild, Process) add the waiting and reading.
# Included by _core.pyx.


cdef class ChildHandle:
    """A child's pid and the fds its handle owns, in C fields.

    The fds -- a pidfd, the result pipe's read and write ends, up to two
    pipes capturing output -- are each closed and forgotten in one C step
    (_close_fd), so a signal handler raising never leaves one open or closes
    one twice. When the handle is garbage-collected, its fds are closed and
    a child still running is queued for reap_dropped in C, where no signal
    handler can interrupt (a ResourceWarning follows). A copy of the handle
    in another process (after a fork) touches nothing.
    """

    cdef pid_t _c_pid                   # 0 until the process exists
    cdef pid_t _c_owner                 # the process the handle belongs to
    cdef int _c_pidfd
    cdef int _c_result_fd
    cdef int _c_write_fd
    cdef int _c_capture_fds[2]
    cdef public bint _reaped            # the exit status has been collected
    cdef public bint _finished          # ... and every fd of the handle closed
    cdef public bint _reaps_own_pid     # False where another process reaps it

    def __cinit__(self, *args, **kwargs):
        self._c_owner = getpid()
        self._c_pidfd = self._c_result_fd = self._c_write_fd = -1
        self._c_capture_fds[0] = self._c_capture_fds[1] = -1
        self._reaps_own_pid = True

    def __init__(self, pid=None, pidfd=None):
        """Take charge of child ``pid`` (None: one that fork_with_pipe makes later).

        ``pidfd``: a pidfd for it that the handle now owns, or -1 for none;
        by default one is opened where pidfds are used.
        Raises TypeError for a non-integer, ValueError for a pid <= 0.
        """
        cdef pid_t c_pid
        cdef int fd
        if pid is None:
            return
        c_pid = PyNumber_Index(pid)
        if c_pid <= 0:
            raise ValueError(f"pid must be > 0, not {pid!r}")
        self._c_pid = c_pid
        fd = _open_pidfd(c_pid) if pidfd is None else PyNumber_Index(pidfd)
        if fd >= 0:
            self._c_pidfd = fd
            _own(fd)

    def __dealloc__(self):
        cdef int status
        cdef pid_t rc = -1
        if self._c_owner != getpid():
            return  # a copy in a forked process: neither the fds nor the child are its
        if self._c_pid > 0 and self._reaps_own_pid and not self._reaped:
            # An exited child is reaped here; a running one (or one the wait
            # was interrupted for) is queued, and its pidfd goes along, so the
            # later reap can never take a reused pid.
            rc = _wait_child(self._c_pid, self._c_pidfd, WNOHANG, &status, NULL)
            if rc == 0 or (rc < 0 and errno == EINTR):
                _drop_child(self._c_pid, self._c_pidfd)
                self._c_pidfd = -1
        self._close_all()
        if rc == 0:
            try:
                PyErr_WarnEx(ResourceWarning,
                             f"child {self._c_pid} is still running".encode(), 1)
            except BaseException:
                pass  # a finalizer has nowhere to raise it

    cdef void _close_all(self) noexcept:
        _close_fd(&self._c_pidfd)
        _close_fd(&self._c_result_fd)
        _close_fd(&self._c_write_fd)
        _close_fd(&self._c_capture_fds[0])
        _close_fd(&self._c_capture_fds[1])

    # ------------------------------------------------------------ fds

    @property
    def pid(self):
        """The child's pid (None until its process exists)."""
        return self._c_pid if self._c_pid > 0 else None

    @property
    def _owner(self):
        """The pid of the process this handle belongs to."""
        return self._c_owner

    @property
    def _pidfd(self):
        """The child's pidfd, or -1."""
        return self._c_pidfd

    @property
    def _result_fd(self):
        """The read end of the child's result pipe (non-blocking), or -1."""
        return self._c_result_fd

    @property
    def _write_fd(self):
        """The write end of the result pipe, held only between its creation and the fork."""
        return self._c_write_fd

    @property
    def _capture_fds(self):
        """The two capture pipes' read ends (-1: none, or closed)."""
        return self._c_capture_fds[0], self._c_capture_fds[1]

    def _adopt_result_fd(self, fd):
        """Own ``fd``, the read end of the child's result pipe (from now on)."""
        self._c_result_fd = PyNumber_Index(fd)
        if self._c_result_fd >= 0:
            _own(self._c_result_fd)

    def _adopt_capture_fds(self, fds):
        """Own ``fds`` (at most two), read ends of pipes capturing the child's output.

        Raises ValueError for more than two (before taking any).
        """
        fds = [PyNumber_Index(fd) for fd in fds]
        if len(fds) > 2:
            raise ValueError(f"at most two capture fds, not {len(fds)}")
        for i, fd in enumerate(fds):
            self._c_capture_fds[i] = fd
            if fd >= 0:
                _own(fd)

    def _close_pidfd(self):
        _close_fd(&self._c_pidfd)

    def _close_result_fd(self):
        _close_fd(&self._c_result_fd)

    def _close_capture_fd(self, int index):
        if not 0 <= index < 2:
            raise IndexError(f"capture fd index {index} out of range")
        _close_fd(&self._c_capture_fds[index])

    def _close_capture_fds(self):
        _close_fd(&self._c_capture_fds[0])
        _close_fd(&self._c_capture_fds[1])

    def _close_fds(self):
        """Close every fd this handle holds (those already closed are skipped)."""
        self._close_all()

    # ------------------------------------------------------------ the child

    cdef int _check_started(self) except -1:
        # pid 0 would mean "the process group" to wait4() and kill().
        if self._c_pid <= 0:
            raise ChildProcessError(ECHILD, "this handle's process has not been started")
        return 0

    def _poll_status(self):
        """wait4(pid, WNOHANG) for the child: (pid, status, rusage), pid 0 while it runs.

        Goes through the child's pidfd where it has one, so a pid that
        someone else reaped and the kernel reused is never taken for it.
        Raises ChildProcessError if the child was reaped elsewhere (or its
        process was never started).
        """
        self._check_started()
        return _wait_with_rusage(_wait_child, self._c_pid, self._c_pidfd, WNOHANG)

    def _wait_status(self):
        """Block until the child exits and reap it: (pid, status, rusage) as os.wait4.

        One waitid(P_PIDFD, WEXITED) through the child's pidfd where it has one
        (wait4 by pid elsewhere), with the GIL released. On EINTR the signal
        handlers run and the wait goes on; what they raise propagates and
        the child stays unreaped. Raises ChildProcessError if the child was
        reaped elsewhere (or its process was never started).
        """
        self._check_started()
        return _wait_with_rusage(_wait_child, self._c_pid, self._c_pidfd, 0)

    def _signal(self, int sig):
        """Send ``sig`` to the (unreaped) child, through its pidfd where it has one.

        Returns False if it has already exited. Raises OSError otherwise
        (ChildProcessError if its process was never started).
        """
        self._check_started()
        if _signal_child(self._c_pid, self._c_pidfd, sig) == 0:
            return True
        if errno == ESRCH:
            return False
        _raise_errno(errno)
