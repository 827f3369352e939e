# The exec path: turn prepared Python arguments into an ff_spawn_plan, create
# the child with the GIL released (src/spawn.c), and read its error report.
# Included at the end of _core.pyx, so it shares that module's helpers
# (_raise_errno, the waitpid declaration, close/malloc/free).

from libc.errno cimport ENOENT
from libc.signal cimport SIGKILL
from libc.string cimport strlen
from posix.signal cimport kill as c_kill
from posix.unistd cimport read as c_read, sysconf, _SC_OPEN_MAX

import os as _os

# fcntl, F_DUPFD_CLOEXEC, O_CLOEXEC and pipe2 are declared in _core.pyx.

cdef extern from "spawn.h" nogil:
    ctypedef struct ff_spawn_plan:
        char **paths
        char **argv
        char **envp
        const char *cwd
        int stdio[3]
        const int *keep_fds
        int n_keep_fds
        int close_fds
        int max_fd
        int new_session
        int pdeathsig
        pid_t parent
        int errpipe
        int use_fork
    pid_t ff_spawn(const ff_spawn_plan *plan)
    int ff_spawn_uses_vfork()
    enum:
        FF_STEP_FDS
        FF_STEP_CWD
        FF_STEP_SETSID
        FF_STEP_PDEATHSIG
        FF_STEP_EXEC


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


cdef int _read_report(int fd, int *msg, pid_t pid) except -1:
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
                PyErr_CheckSignals_or_raise()
            except BaseException:
                c_kill(pid, SIGKILL)
                _reap_quietly(pid)
                raise
        else:
            _raise_errno(errno)
    return got


cdef void _reap_quietly(pid_t pid) noexcept nogil:
    """waitpid() a child known to be exiting, retrying EINTR without Python."""
    cdef int status
    while c_waitpid(pid, &status, 0) < 0 and errno == EINTR:
        pass


def _spawn_uses_vfork():
    """True if _spawn creates children vfork-style here (Linux), False if by fork()."""
    return bool(ff_spawn_uses_vfork())


def _spawn(list paths, list argv, list envp, bytes cwd, stdio, keep_fds,
           bint close_fds, bint new_session, int pdeathsig, list registry,
           exec_name=None, cwd_name=None, bint use_fork=False):
    """Create a child that applies a prepared plan and execs; return its pid.

    ``paths``: candidate executables (bytes), tried in order. ``argv``: bytes.
    ``envp``: b"KEY=value" entries, or None to pass this process's environ.
    ``cwd``: bytes or None. ``stdio``: three fds to place at 0, 1, 2 (-1 to
    inherit). ``keep_fds``: sorted fds kept open and made inheritable.
    ``pdeathsig`` > 0: the signal the child gets when this thread's process
    dies (Linux). The pid is appended to ``registry`` before anything else can
    run. Arguments are expected validated by fastfork.spawn; only their C
    conversion is checked here.

    Raises OSError from errno if no process could be created (nothing is left
    open then); if the child could not exec, it is reaped and OSError(errno,
    strerror, filename) is raised like subprocess does -- ``exec_name`` as the
    filename for an exec failure, ``cwd_name`` for a chdir failure, none for
    the other steps.
    """
    cdef ff_spawn_plan plan
    cdef int pipefd[2]
    cdef int msg[2]
    cdef int fd, i, err
    cdef Py_ssize_t n_keep = len(keep_fds)
    cdef pid_t pid
    cdef Py_ssize_t got
    cdef char **c_paths = NULL
    cdef char **c_argv = NULL
    cdef char **c_envp = NULL
    cdef int *c_keep = NULL

    memset(&plan, 0, sizeof(plan))
    if len(stdio) != 3:
        raise ValueError("stdio must hold three fds")
    pipefd[0] = pipefd[1] = -1
    try:
        c_paths = _c_strings(paths, "the executable path")
        c_argv = _c_strings(argv, "an argument")
        if envp is not None:
            c_envp = _c_strings(envp, "the environment")
        plan.paths = c_paths
        plan.argv = c_argv
        plan.envp = c_envp
        if cwd is not None:
            plan.cwd = cwd
            if <Py_ssize_t>strlen(plan.cwd) != len(cwd):
                raise ValueError("embedded null byte in cwd")
        for i in range(3):
            plan.stdio[i] = stdio[i]
        if n_keep:
            c_keep = <int *>malloc(n_keep * sizeof(int))
            if c_keep == NULL:
                raise MemoryError()
            for i in range(n_keep):
                c_keep[i] = keep_fds[i]
        plan.keep_fds = c_keep
        plan.n_keep_fds = <int>n_keep
        plan.close_fds = close_fds
        plan.max_fd = <int>sysconf(_SC_OPEN_MAX)
        plan.new_session = new_session
        plan.pdeathsig = pdeathsig
        plan.parent = getpid()
        plan.use_fork = use_fork

        if pipe2(pipefd, O_CLOEXEC) < 0:
            _raise_errno(errno)
        if pipefd[1] < 3:
            # The child's dup2() onto 0-2 must not overwrite its error pipe.
            fd = fcntl(pipefd[1], F_DUPFD_CLOEXEC, 3)
            if fd < 0:
                _raise_errno(errno)
            close(pipefd[1])
            pipefd[1] = fd
        plan.errpipe = pipefd[1]

        with nogil:
            pid = ff_spawn(&plan)
            err = errno
            close(pipefd[1])
            pipefd[1] = -1
        if pid < 0:
            _raise_errno(err)

        got = _read_report(pipefd[0], msg, pid)
        if got == 0:
            registry.append(pid)
            return pid
        with nogil:
            _reap_quietly(pid)
        if got != sizeof(msg):
            raise RuntimeError(f"truncated error report from child {pid}")
        err = msg[1]
        if msg[0] == FF_STEP_EXEC:
            raise OSError(err, _os.strerror(err), exec_name)
        if msg[0] == FF_STEP_CWD:
            raise OSError(err, _os.strerror(err), cwd_name)
        raise OSError(err, _os.strerror(err))
    finally:
        for i in range(2):
            if pipefd[i] >= 0:
                close(pipefd[i])
        free(c_paths)
        free(c_argv)
        free(c_envp)
        free(c_keep)


def _c_spawn_loop(Py_ssize_t n, bytes path=b"/bin/true"):
    """The exec path's physical limit: n times ff_spawn(path) + waitpid, all in C.

    Each round makes its error pipe as ``_spawn`` does, inherits stdio and
    the environment, and closes other fds. Returns how many children exited
    0. For benchmarks only. Raises OSError if a process cannot be created.
    """
    cdef ff_spawn_plan plan
    cdef char *argv[2]
    cdef int pipefd[2]
    cdef Py_ssize_t i, ok = 0
    cdef pid_t pid = 0
    cdef int status = 0, err = 0
    cdef bint failed = False
    argv[0] = path
    argv[1] = NULL
    memset(&plan, 0, sizeof(plan))
    plan.paths = argv
    plan.argv = argv
    plan.stdio[0] = plan.stdio[1] = plan.stdio[2] = -1
    plan.close_fds = 1
    plan.max_fd = <int>sysconf(_SC_OPEN_MAX)
    plan.parent = getpid()
    with nogil:
        for i in range(n):
            if pipe2(pipefd, O_CLOEXEC) < 0:
                err = errno
                failed = True
                break
            plan.errpipe = pipefd[1]
            pid = ff_spawn(&plan)
            err = errno
            close(pipefd[0])
            close(pipefd[1])
            if pid < 0:
                failed = True
                break
            _reap_status(pid, &status)
            if status == 0:
                ok += 1
    if failed:
        _raise_errno(err)
    return ok


cdef void _reap_status(pid_t pid, int *status) noexcept nogil:
    while c_waitpid(pid, status, 0) < 0 and errno == EINTR:
        pass
