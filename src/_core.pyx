# cython: language_level=3
"""fastfork._core: the compiled core.

Drop-ins for ``os.fork``, ``os.waitpid``, ``os.wait``, ``os.wait3``, ``os.wait4``
and ``os._exit``, and the primitives the Python layer builds on, in C so that
no signal handler can run between two of their steps. One topic per file:

- ``_fds.pxi``: the fds fastfork owns (closed first thing in every child it
  forks) and the lock that keeps a child from inheriting half-made ones;
- ``_wait.pxi``: one way to wait for a child (through a pidfd where the kernel
  has them, else by pid), ``reap`` (a batch waitpid with the GIL released) and
  the children whose handles were dropped while they ran;
- ``_fork.pxi``: fork between the interpreter's hooks (signals held back
  meanwhile, ``sighold.c``), the child's start-up, ``fork_call`` and
  ``fork_with_pipe``;
- ``_handle.pxi``: ``ChildHandle``, the C half of ``fastfork.Child``;
- ``_spawn.pxi``: the exec path; ``_fanout.pxi``: the fan-out engine;
- ``_limits.pxi``: the ``_c_*`` loops the benchmarks compare against.

errno passes through untouched: every failing call raises ``OSError`` built from
errno (so EAGAIN is ``BlockingIOError`` and ECHILD ``ChildProcessError``, as in
``os``). fastfork's own exceptions are raised by the Python layer.
"""

from cpython.exc cimport PyErr_CheckSignals, PyErr_WarnEx
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.errno cimport EAGAIN, ECHILD, EINTR, EINVAL, EMFILE, ENOMEM, ESRCH, errno
from libc.signal cimport SIGCONT, SIGKILL, SIGTERM
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memset, strerror
from posix.fcntl cimport F_DUPFD_CLOEXEC, F_GETFD, F_GETFL, F_SETFL, O_CLOEXEC, O_NONBLOCK, O_RDONLY
from posix.fcntl cimport fcntl, open as c_open
from posix.resource cimport rusage
from posix.signal cimport SIG_BLOCK, SIG_SETMASK, kill as c_kill, sigfillset, siginfo_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport pid_t, sigset_t
from posix.unistd cimport _exit as c_exit, close, fork as c_fork, getpid, getppid
from posix.unistd cimport read as c_read, usleep, write as c_write
from posix.wait cimport WEXITED, WNOHANG, wait as c_wait, wait3 as c_wait3, wait4 as c_wait4
from posix.wait cimport waitpid as c_waitpid

from _decls cimport (
    CLD_DUMPED, CLD_EXITED, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN, NSIG, P_PIDFD,
    POLLIN, PR_SET_PDEATHSIG, PyOS_AfterFork_Child, PyOS_AfterFork_Parent, PyOS_BeforeFork,
    PySys_Audit, PySys_GetObject, SYS_close_range, SYS_pidfd_open, SYS_pidfd_send_signal,
    SYS_waitid,
    epoll_create1, epoll_ctl, epoll_event, epoll_wait, ff_is_finalizing, pipe2, poll, pollfd,
    prctl, pthread_sigmask, syscall,
)

import os


cdef int _raise_errno(int err) except -1:
    """Raise the OSError subclass that matches ``err``, as PyErr_SetFromErrno."""
    raise OSError(err, strerror(err).decode("utf-8", "replace"))


# ---------------------------------------------------------------- drop-ins
# Integer arguments go through PyNumber_Index, as os's argument converters do:
# a float or a str is a TypeError, never silently truncated.

def fork():
    """Fork a child process, exactly like os.fork().

    Returns 0 in the child and the child's pid in the parent.
    Raises OSError (BlockingIOError for EAGAIN) if fork() fails, and
    RuntimeError during interpreter shutdown. On Python 3.12+ warns with
    DeprecationWarning when other threads are running, as os.fork does, at
    the same line. One deliberate difference: a signal arriving while the
    at-fork hooks run is handled after them -- with other threads running
    too -- so what its handler raises is not lost.
    """
    return _fork_checked(False)


def _exit(status):
    """Exit immediately with ``status``: no cleanup, no atexit, no flushing.

    Like os._exit(); never returns.
    """
    cdef int c_status = PyNumber_Index(status)
    c_exit(c_status)


def waitpid(pid, options, /):
    """Wait for a child, exactly like os.waitpid(pid, options).

    Returns (pid, status); (0, 0) with WNOHANG when nothing is ready.
    Raises ChildProcessError (ECHILD) or another OSError. The GIL is released
    while blocked; on EINTR signal handlers run and the call is retried.
    """
    cdef pid_t c_pid = PyNumber_Index(pid)
    cdef int c_options = PyNumber_Index(options)
    cdef int status = 0
    cdef pid_t res = _wait_retrying(_wait_child, c_pid, -1, c_options, &status, NULL)
    return res, status


def wait():
    """Wait for any child, exactly like os.wait().

    Returns (pid, status). Raises ChildProcessError when there is no child.
    """
    cdef int status = 0
    cdef pid_t res = _wait_retrying(_libc_wait, -1, -1, 0, &status, NULL)
    return res, status


def wait3(options):
    """Wait for any child, exactly like os.wait3(options).

    Returns (pid, status, resource.struct_rusage); with WNOHANG and nothing
    ready, (0, 0, zeroed rusage). Raises ChildProcessError when there is no child.
    """
    return _wait_with_rusage(_libc_wait3, -1, -1, PyNumber_Index(options))


def wait4(pid, options):
    """Wait for a child, exactly like os.wait4(pid, options).

    Returns (pid, status, resource.struct_rusage); with WNOHANG and nothing
    ready, (0, 0, zeroed rusage). Raises ChildProcessError (ECHILD) or OSError.
    """
    return _wait_with_rusage(_wait_child, PyNumber_Index(pid), -1, PyNumber_Index(options))


include "_fds.pxi"
include "_wait.pxi"
include "_fork.pxi"
include "_handle.pxi"
include "_spawn.pxi"
include "_fanout.pxi"
include "_limits.pxi"
