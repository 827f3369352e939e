# The exec path: turn prepared Python arguments into an ff_spawn_plan, create
# the child with the GIL released (src/spawn.c), and read its error report.
# Included by _core.pyx.

from libc.string cimport strlen
from posix.unistd cimport sysconf, _SC_OPEN_MAX

from _decls cimport (
    FF_STDIO_DEVNULL, FF_STEP_CWD, FF_STEP_DEVNULL, FF_STEP_EXEC, ff_spawn, ff_spawn_plan,
    ff_spawn_uses_vfork,
)

# A stdio entry for _spawn: the child opens os.devnull there itself.
SPAWN_DEVNULL = FF_STDIO_DEVNULL


cdef char **_c_strings(list items, str what) except NULL:
    """Return a malloc'ed NULL-terminated array pointing into ``items`` (bytes).

    The bytes objects must outlive the array. Raises TypeError for a non-bytes
    item, ValueError for an embedded NUL (C would silently cut the string).
    """
    cdef Py_ssize_t i, n = len(items)
    cdef char **arr = <char **>malloc((n + 1) * sizeof(char *))
    cdef bytes b
    if arr == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            b = items[i]
            arr[i] = b
            if <Py_ssize_t>strlen(arr[i]) != len(b):
                raise ValueError(f"embedded null byte in {what}")
        arr[n] = NULL
    except BaseException:
        free(arr)
        raise
    return arr


cdef class _Plan:
    """An ff_spawn_plan and the C arrays it points into, freed with it.

    The arrays point into the bytes objects given to _make_plan, kept alive here.
    """

    cdef ff_spawn_plan plan
    cdef tuple sources
    cdef char **paths
    cdef char **argv
    cdef char **envp
    cdef int *keep_fds

    def __dealloc__(self):
        free(self.paths)
        free(self.argv)
        free(self.envp)
        free(self.keep_fds)


cdef _Plan _make_plan(list paths, list argv, list envp, bytes cwd, stdio, keep_fds,
                      bint close_fds, bint new_session, int pdeathsig, bint use_fork):
    """The plan a spawned child applies (see _spawn); TypeError/ValueError if
    an argument cannot be converted."""
    cdef _Plan p = _Plan()
    cdef Py_ssize_t i, n_keep = len(keep_fds)
    if len(stdio) != 3:
        raise ValueError("stdio must hold three fds")
    memset(&p.plan, 0, sizeof(p.plan))
    p.sources = (paths, argv, envp, cwd)
    p.paths = _c_strings(paths, "the executable path")
    p.argv = _c_strings(argv, "an argument")
    if envp is not None:
        p.envp = _c_strings(envp, "the environment")
    p.plan.paths = p.paths
    p.plan.argv = p.argv
    p.plan.envp = p.envp
    if cwd is not None:
        p.plan.cwd = cwd
        if <Py_ssize_t>strlen(p.plan.cwd) != len(cwd):
            raise ValueError("embedded null byte in cwd")
    for i in range(3):
        p.plan.stdio[i] = stdio[i]
    if n_keep:
        p.keep_fds = <int *>malloc(n_keep * sizeof(int))
        if p.keep_fds == NULL:
            raise MemoryError()
        for i in range(n_keep):
            p.keep_fds[i] = keep_fds[i]
    p.plan.keep_fds = p.keep_fds
    p.plan.n_keep_fds = <int>n_keep
    p.plan.close_fds = close_fds
    p.plan.max_fd = <int>sysconf(_SC_OPEN_MAX)
    p.plan.new_session = new_session
    p.plan.pdeathsig = pdeathsig
    p.plan.parent = getpid() if pdeathsig > 0 else 0  # only its re-check uses it
    p.plan.use_fork = use_fork
    return p


cdef int _error_pipe(int *fds) except -1:
    """A close-on-exec pipe for the child's error report, its write end >= 3.

    The child's dup2() onto 0-2 must not overwrite its error pipe. Raises
    OSError (nothing is left open then).
    """
    cdef int fd
    if pipe2(fds, O_CLOEXEC) < 0:
        _raise_errno(errno)
    if fds[1] < 3:
        fd = fcntl(fds[1], F_DUPFD_CLOEXEC, 3)
        if fd < 0:
            fd = errno
            close(fds[0])
            close(fds[1])
            _raise_errno(fd)
        close(fds[1])
        fds[1] = fd
    return 0


cdef Py_ssize_t _read_report(int fd, int *msg, pid_t pid) except -1:
    """Read the child's (step, errno) report; return the bytes read (0: exec'd).

    Blocks only until the child execs or exits. On a signal whose handler
    raises (Ctrl-C) the child is killed and reaped before the error propagates.
    """
    cdef Py_ssize_t got = 0, n
    cdef char *buf = <char *>msg
    while got < 2 * <Py_ssize_t>sizeof(int):
        with nogil:
            n = c_read(fd, buf + got, 2 * sizeof(int) - got)
        if n > 0:
            got += n
        elif n == 0:
            break
        elif errno == EINTR:
            try:
                PyErr_CheckSignals()
            except BaseException:
                c_kill(pid, SIGKILL)
                with nogil:
                    _reap_quietly(pid, -1)
                raise
        else:
            _raise_errno(errno)
    return got


cdef int _raise_exec_failure(int *msg, Py_ssize_t got, pid_t pid, exec_name, cwd_name) except -1:
    """Raise what a child that could not exec reported, as subprocess does."""
    if got != 2 * <Py_ssize_t>sizeof(int):
        raise RuntimeError(f"truncated error report from child {pid}")
    err = msg[1]
    if msg[0] == FF_STEP_EXEC:
        raise OSError(err, os.strerror(err), exec_name)
    if msg[0] == FF_STEP_CWD:
        raise OSError(err, os.strerror(err), cwd_name)
    if msg[0] == FF_STEP_DEVNULL:
        raise OSError(err, os.strerror(err), os.devnull)
    raise OSError(err, os.strerror(err))


cdef Py_ssize_t _spawn_forked(_Plan p, int *msg, pid_t *pid) except -1:
    """ff_spawn a child made by fork(), whose report comes over an error pipe.

    Sets ``*pid``; returns the bytes of the report read into ``msg`` (0: it
    exec'd). Raises OSError if no process could be created.
    """
    cdef int errpipe[2]
    cdef int err
    cdef Py_ssize_t got
    _error_pipe(errpipe)
    try:
        p.plan.errpipe = errpipe[1]
        with nogil:
            pid[0] = ff_spawn(&p.plan, msg, NULL)
            err = errno
            close(errpipe[1])
            errpipe[1] = -1
        if pid[0] < 0:
            _raise_errno(err)
        got = _read_report(errpipe[0], msg, pid[0])
    finally:
        close(errpipe[0])
        if errpipe[1] >= 0:
            close(errpipe[1])
    return got


def _spawn_uses_vfork():
    """True if _spawn creates children vfork-style here (Linux), False if by fork()."""
    return bool(ff_spawn_uses_vfork())


def _spawn(list paths, list argv, list envp, bytes cwd, stdio, keep_fds,
           bint close_fds, bint new_session, int pdeathsig, ChildHandle handle not None,
           exec_name=None, cwd_name=None, bint use_fork=False):
    """Create a child that applies a prepared plan and execs, for ``handle``.

    ``paths``: candidate executables (bytes), tried in order. ``argv``: bytes.
    ``envp``: b"KEY=value" entries, or None to pass this process's environ.
    ``cwd``: bytes or None. ``stdio``: three fds to place at 0, 1, 2 (-1 to
    inherit, SPAWN_DEVNULL for os.devnull opened by the child).
    ``keep_fds``: sorted fds kept open and made inheritable.
    ``pdeathsig`` > 0: the signal the child gets when this thread's process
    dies (Linux). ``handle``, an unstarted ChildHandle, gets the pid and a
    pidfd (where pidfds are used) before any Python code can run. Arguments
    are expected validated by fastfork.spawn; only their C conversion is
    checked here. Returns the pid.

    Raises OSError from errno if no process could be created (nothing is left
    open then); if the child could not exec, it is reaped and OSError(errno,
    strerror, filename) is raised like subprocess does -- ``exec_name`` as the
    filename for an exec failure, ``cwd_name`` for a chdir failure, none for
    the other steps. ``handle`` is left unstarted then.
    """
    cdef _Plan p
    cdef int msg[2]
    cdef int err
    cdef int pidfd = -1
    cdef pid_t pid
    cdef Py_ssize_t got
    if handle._c_pid != 0:
        raise ValueError("the handle's process has already been started")
    p = _make_plan(paths, argv, envp, cwd, stdio, keep_fds, close_fds, new_session,
                   pdeathsig, use_fork)
    if use_fork or not ff_spawn_uses_vfork():
        got = _spawn_forked(p, msg, &pid)
    else:
        # The child shares our memory: its report is in msg when clone returns.
        p.plan.errpipe = -1
        with nogil:
            pid = ff_spawn(&p.plan, msg, &pidfd if _use_pidfd else NULL)
            err = errno
        if pid < 0:
            _raise_errno(err)
        got = 2 * sizeof(int) if msg[0] != 0 else 0
    if got == 0:
        handle._c_pid = pid
        if pidfd < 0:
            pidfd = _open_pidfd(pid)
        if pidfd >= 0:
            handle._c_pidfd = pidfd
            _own(pidfd)
        return pid
    with nogil:
        _reap_quietly(pid, pidfd)
    if pidfd >= 0:
        close(pidfd)
    _raise_exec_failure(msg, got, pid, exec_name, cwd_name)
