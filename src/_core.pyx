# cython: language_level=3
"""fastfork._core: the compiled core.

Drop-ins for ``os.fork``, ``os.waitpid``, ``os.wait``, ``os.wait3``, ``os.wait4``
and ``os._exit``; ``reap``, a batch waitpid with the GIL released; and the
primitives the Python layer builds on, in C so that no signal handler can run
between two of their steps: ``fork_call`` (fork and run a callable in the
child, ending in ``_exit`` whatever it does), ``fork_with_pipe`` (the same with
a result pipe, recording every step on a handle), ``_wait_pidfd`` (reap by
pidfd), ``close_fd_attr`` and ``finalize_child`` (a handle's fds and its
``__del__``). The exec path (``_spawn``) is in ``_spawn.pxi``; the ``_c_*``
loops are the physical limits the benchmarks compare against.

errno passes through untouched: every failing call raises ``OSError`` built from
errno (so EAGAIN is ``BlockingIOError`` and ECHILD ``ChildProcessError``, as in
``os``). fastfork's own exceptions are raised by the Python layer.
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.number cimport PyNumber_Index
from libc.string cimport strerror
from libc.errno cimport EINTR, ECHILD, EINVAL, errno
from libc.string cimport memset
from posix.resource cimport rusage
from posix.types cimport pid_t
from posix.unistd cimport _exit as c_exit, fork as c_fork, getpid, getppid, usleep
from posix.wait cimport WNOHANG, waitpid as c_waitpid

import builtins
import math
import numbers
import os
import sys
import warnings

cdef extern from "Python.h":
    void PyOS_BeforeFork()
    void PyOS_AfterFork_Parent()
    void PyOS_AfterFork_Child()
    int PySys_Audit(const char *event, const char *format, ...) except -1
    PyObject *PySys_GetObject(const char *name)  # a borrowed reference, or NULL

cdef extern from *:
    """
    /* The C spelling of sys.is_finalizing(): public only from 3.13. */
    static int ff_is_finalizing(void) {
    #if PY_VERSION_HEX >= 0x030D0000
        return Py_IsFinalizing();
    #else
        return _Py_IsFinalizing();
    #endif
    }
    """
    bint ff_is_finalizing()

cdef extern from "<sys/wait.h>" nogil:
    pid_t c_wait "wait"(int *status)
    pid_t c_wait3 "wait3"(int *status, int options, rusage *usage)
    pid_t c_wait4 "wait4"(pid_t pid, int *status, int options, rusage *usage)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *s)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    int SIG_BLOCK
    int SIG_SETMASK

cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5)
    int PR_SET_PDEATHSIG

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

cdef extern from "<sys/syscall.h>" nogil:
    long syscall(long number, ...)
    long SYS_pidfd_open

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int pipe2(int *fds, int flags)

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_GETFL
    int F_SETFL
    int F_DUPFD_CLOEXEC
    int O_CLOEXEC
    int O_NONBLOCK

cdef extern from "<stdlib.h>" nogil:
    void *malloc(size_t size)
    void *calloc(size_t n, size_t size)
    void free(void *p)

cdef extern from "<stdio.h>" nogil:
    ctypedef struct FILE
    FILE *fopen(const char *path, const char *mode)
    size_t fread(void *buf, size_t size, size_t n, FILE *f)
    int fclose(FILE *f)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC


# Resolved at import: a lazy import fails during interpreter shutdown, when a
# __del__ may still reap a child with wait3/wait4.
import resource
cdef object _struct_rusage = resource.struct_rusage
cdef bint _warn_threads = sys.version_info >= (3, 12)
# os.fork warns before PyOS_AfterFork_Parent on 3.12 and after it from 3.13
# (so that hooks run with the world started again): same order here.
cdef bint _warn_before_hooks = sys.version_info < (3, 13)
# os.fork refuses to fork once finalization has begun only from 3.12
# (gh-104690; narrowed to "after atexit" by gh-113964), and says so with
# PythonFinalizationError from 3.13.
cdef bint _refuse_at_shutdown = sys.version_info >= (3, 12)
cdef object _FinalizationError = getattr(builtins, "PythonFinalizationError", RuntimeError)


# ---------------------------------------------------------------- helpers

cdef int _raise_errno(int err) except -1:
    """Raise the OSError subclass that matches ``err``, as PyErr_SetFromErrno."""
    raise OSError(err, strerror(err).decode("utf-8", "replace"))


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


cdef long _count_threads():
    """Threads in this process: /proc/self/stat field 20, else threading's view.

    Mirrors CPython's private warn_about_fork_with_threads() (3.12+).
    """
    cdef char buf[512]
    cdef size_t n = 0
    cdef FILE *f = fopen(b"/proc/self/stat", b"r")
    if f != NULL:
        n = fread(buf, 1, sizeof(buf) - 1, f)
        fclose(f)
    if n > 0:
        text = buf[:n].decode("ascii", "replace")
        # The command name (field 2) may hold spaces: count from its closing ')'.
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 17 and fields[17].isdigit():
            return int(fields[17])
    threading = sys.modules.get("threading")
    if threading is None:
        return 1
    return len(threading._active) + len(threading._limbo)


# Warnings about the library's own forks point at the caller's code, not ours.
cdef tuple _library_dirs = (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


cdef void _warn_if_threaded():
    """Warn as os.fork does on 3.12+ when other threads are running.

    The warning names the innermost frame outside fastfork's package (3.12+
    has skip_file_prefixes): for fastfork.fork that is its caller, as for
    os.fork; for map or start, the code that called them.
    """
    try:
        if _count_threads() > 1:
            warnings.warn(
                f"This process (pid={getpid()}) is multi-threaded, use of "
                f"fork() may lead to deadlocks in the child.",
                DeprecationWarning, stacklevel=1, skip_file_prefixes=_library_dirs)
    except BaseException:
        # os.fork clears whatever the warning raised (PyErr_Clear), even an
        # exception from a signal handler: the fork happened and its pid must
        # reach the caller (fork_call records it next).
        pass


cdef pid_t _fork_checked() except -1:
    """fork() between the interpreter's before/after hooks, as os.fork does.

    Returns 0 in the child and the child's pid in the parent.
    Raises RuntimeError (PythonFinalizationError on 3.13+) at interpreter
    shutdown on 3.12+, OSError from errno.
    """
    cdef pid_t pid
    cdef int saved_errno
    cdef sigset_t all_signals, saved_mask
    # Same checks in the same order as CPython's os_fork_impl: shutdown
    # first, then the audit event.
    if _refuse_at_shutdown and ff_is_finalizing():
        raise _FinalizationError("can't fork at interpreter shutdown")
    PySys_Audit("os.fork", NULL)
    # Unlike os.fork, hold signals back while the at-fork hooks run: a Python
    # signal handler would otherwise run inside a hook, and what it raises
    # (KeyboardInterrupt) would be printed as "Exception ignored" and lost.
    # Held signals are delivered when the mask is restored, after the hooks.
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, &saved_mask)
    # A signal that arrived before the mask (while C code ran, so no handler
    # has run yet) is handled now: raising here forks nothing.
    try:
        PyErr_CheckSignals_or_raise()
    except BaseException:
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL)
        raise
    PyOS_BeforeFork()
    pid = c_fork()
    saved_errno = errno
    if pid == 0:
        PyOS_AfterFork_Child()
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL)
        return 0
    try:
        # os.fork warns in the parent even when fork() failed.
        if _warn_threads and _warn_before_hooks:
            _warn_if_threaded()
        PyOS_AfterFork_Parent()
        if _warn_threads and not _warn_before_hooks:
            _warn_if_threaded()
    finally:
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL)
    if pid < 0:
        _raise_errno(saved_errno)
    return pid


cdef extern from "Python.h":
    ctypedef struct PyInterpreterState:
        pass
    ctypedef struct PyThreadState:
        pass
    PyInterpreterState *PyInterpreterState_Get()
    PyThreadState *PyInterpreterState_ThreadHead(PyInterpreterState *interp)
    PyThreadState *PyThreadState_Next(PyThreadState *tstate)


cdef bint _only_thread() noexcept:
    """True if this interpreter has no Python thread but ours."""
    cdef PyThreadState *head = PyInterpreterState_ThreadHead(PyInterpreterState_Get())
    return head == NULL or PyThreadState_Next(head) == NULL


cdef pid_t _fork_holding_fd_lock(bint alone) except -1:
    """_fork_checked for the library's own children, under fastfork.child's fd lock.

    Code that makes fds a child must not inherit (spawn's pipe ends) holds
    that lock until they are closed or registered, so our fork waits for it.
    Only other threads can hold it: ``alone`` (_only_thread()), we skip it.
    """
    cdef pid_t pid = -1
    cdef bint locked = False
    if _fd_lock is not None and not alone:
        _fd_lock.acquire()
        locked = True
    try:
        pid = _fork_checked()
    finally:
        # In the child an at-fork hook has released its copy already.
        if locked and pid != 0:
            _fd_lock.release()
    return pid


# ---------------------------------------------------------------- drop-ins

def fork():
    """Fork a child process, exactly like os.fork().

    Returns 0 in the child and the child's pid in the parent.
    Raises OSError (BlockingIOError for EAGAIN) if fork() fails, and
    RuntimeError during interpreter shutdown. On Python 3.12+ warns with
    DeprecationWarning when other threads are running, as os.fork does.
    One deliberate difference: a signal arriving while the at-fork hooks run
    is handled after them, so what its handler raises is not lost.
    """
    return _fork_checked()


# Integer arguments go through PyNumber_Index, as os's argument converters do:
# a float or a str is a TypeError, never silently truncated.

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
    cdef pid_t res
    while True:
        with nogil:
            res = c_waitpid(c_pid, &status, c_options)
        if res >= 0:
            return res, status
        if errno != EINTR:
            _raise_errno(errno)
        PyErr_CheckSignals_or_raise()


def wait():
    """Wait for any child, exactly like os.wait().

    Returns (pid, status). Raises ChildProcessError when there is no child.
    """
    cdef int status = 0
    cdef pid_t res
    while True:
        with nogil:
            res = c_wait(&status)
        if res >= 0:
            return res, status
        if errno != EINTR:
            _raise_errno(errno)
        PyErr_CheckSignals_or_raise()


def wait3(options):
    """Wait for any child, exactly like os.wait3(options).

    Returns (pid, status, resource.struct_rusage); with WNOHANG and nothing
    ready, (0, 0, zeroed rusage). Raises ChildProcessError when there is no child.
    """
    return _wait_rusage(-1, PyNumber_Index(options), True)


def wait4(pid, options):
    """Wait for a child, exactly like os.wait4(pid, options).

    Returns (pid, status, resource.struct_rusage); with WNOHANG and nothing
    ready, (0, 0, zeroed rusage). Raises ChildProcessError (ECHILD) or OSError.
    """
    return _wait_rusage(PyNumber_Index(pid), PyNumber_Index(options), False)


cdef object _wait_rusage(pid_t pid, int options, bint any_child):
    """wait3() (``any_child``) or wait4(pid) with the GIL released, retried on
    EINTR after running signal handlers; returns (pid, status, struct_rusage).
    """
    cdef int status = 0
    cdef pid_t res
    cdef rusage ru
    while True:
        memset(&ru, 0, sizeof(ru))
        with nogil:
            if any_child:
                res = c_wait3(&status, options, &ru)
            else:
                res = c_wait4(pid, &status, options, &ru)
        if res >= 0:
            if res == 0:
                memset(&ru, 0, sizeof(ru))
            return res, status, _make_rusage(&ru)
        if errno != EINTR:
            _raise_errno(errno)
        PyErr_CheckSignals_or_raise()


cdef extern from "<signal.h>" nogil:
    ctypedef struct siginfo_t:
        int si_code
        int si_status
        pid_t si_pid
    int CLD_EXITED
    int CLD_KILLED
    int CLD_DUMPED

cdef extern from *:
    """
    #include <sys/wait.h>
    #ifndef P_PIDFD
    #define P_PIDFD 3  /* Linux 5.4+, uapi value; older glibc headers lack it */
    #endif
    """
    int P_PIDFD
    int WEXITED
    long SYS_waitid


def _wait_pidfd(int pidfd, int options):
    """Reap the child a pidfd names: waitid(P_PIDFD) with rusage (Linux 5.4+).

    Unlike wait4(pid), this can never take a different process that was
    given the same pid after the child was reaped elsewhere.
    Returns (pid, status, resource.struct_rusage) like wait4 -- status in
    waitpid's encoding; (0, 0, zeroed rusage) with WNOHANG and the child still
    running. Raises ChildProcessError if it was already reaped, OSError otherwise.
    """
    cdef siginfo_t info
    cdef rusage ru
    cdef long rc
    while True:
        memset(&info, 0, sizeof(info))
        memset(&ru, 0, sizeof(ru))
        with nogil:
            # The raw syscall: glibc's waitid() has no rusage argument.
            rc = syscall(SYS_waitid, P_PIDFD, pidfd, &info, WEXITED | options, &ru)
        if rc >= 0:
            break
        if errno != EINTR:
            _raise_errno(errno)
        PyErr_CheckSignals_or_raise()
    if info.si_pid == 0:
        memset(&ru, 0, sizeof(ru))
        return 0, 0, _make_rusage(&ru)
    return info.si_pid, _status_of(&info), _make_rusage(&ru)


cdef int _status_of(siginfo_t *info) noexcept nogil:
    """waitid()'s report of an exited child in waitpid()'s status encoding."""
    if info.si_code == CLD_EXITED:
        return (info.si_status & 0xff) << 8
    if info.si_code == CLD_DUMPED:
        return (info.si_status & 0x7f) | 0x80
    return info.si_status & 0x7f  # CLD_KILLED


cdef int PyErr_CheckSignals_or_raise() except -1:
    """Run pending signal handlers (PEP 475); propagate what they raise."""
    if PyErr_CheckSignals() < 0:
        return -1
    return 0


# ---------------------------------------------------------------- batch reap

cdef double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int _pidfd_open(pid_t pid) noexcept nogil:
    return <int>syscall(SYS_pidfd_open, pid, 0)


cdef int _reap_pending(pid_t *pids, int *status, char *state, Py_ssize_t n,
                       int options) noexcept nogil:
    """waitpid each pid still pending (state 0); returns -1 with errno on EINTR.

    state becomes 1 when reaped, 2 on ECHILD. Other errors set state 3 and
    keep errno in status.
    """
    cdef Py_ssize_t i
    cdef pid_t res
    for i in range(n):
        if state[i] != 0:
            continue
        res = c_waitpid(pids[i], &status[i], options)
        if res > 0:
            state[i] = 1
        elif res < 0:
            if errno == EINTR:
                return -1
            elif errno == ECHILD:
                state[i] = 2
            else:
                status[i] = errno
                state[i] = 3
    return 0


cdef int _wait_some(pid_t *pids, char *state, int *pidfds, Py_ssize_t n,
                    double deadline) noexcept nogil:
    """Sleep until a pending child may have exited or the deadline passes.

    Uses pidfds (opened on first need) where the kernel has them, else a short
    sleep. Returns -1 with errno EINTR when interrupted by a signal.
    """
    cdef Py_ssize_t i, k = 0
    cdef double remaining = deadline - _monotonic()
    cdef int ms
    cdef pollfd *fds
    if remaining <= 0:
        return 0
    # Cap the poll at a minute: a huge timeout would overflow int (and the
    # caller loops until the deadline anyway).
    ms = <int>(min(remaining, 60.0) * 1000.0) + 1
    fds = <pollfd *>malloc(n * sizeof(pollfd))
    if fds == NULL:
        usleep(1000)
        return 0
    for i in range(n):
        if state[i] != 0:
            continue
        if pidfds[i] == -2:
            pidfds[i] = _pidfd_open(pids[i])
        if pidfds[i] < 0:
            # No pidfd (old kernel, or the pid vanished): poll on a timer.
            k = -1
            break
        fds[k].fd = pidfds[i]
        fds[k].events = POLLIN
        fds[k].revents = 0
        k += 1
    if k < 0:
        free(fds)
        usleep(1000 if ms > 1 else 100)
        return 0
    i = poll(fds, k, ms)
    free(fds)
    return -1 if i < 0 and errno == EINTR else 0


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
    cdef Py_ssize_t n, i
    cdef pid_t *c_pids = NULL
    cdef int *c_status = NULL
    cdef int *c_pidfds = NULL
    cdef char *c_state = NULL
    cdef double deadline = 0.0, t = 0.0
    cdef bint has_timeout = timeout is not None
    cdef int rc
    cdef pid_t p

    pid_list = [PyNumber_Index(obj) for obj in pids]
    if has_timeout:
        if not isinstance(timeout, numbers.Real):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        t = timeout
        if math.isnan(t) or t < 0 or math.isinf(t):
            raise ValueError(f"timeout must be a finite number >= 0, not {timeout!r}")
    seen = set()
    for p in pid_list:
        if p <= 0:
            raise ValueError(f"reap() takes child pids > 0, not {p}")
        if p in seen:
            raise ValueError(f"pid {p} is listed twice")
        seen.add(p)
    n = len(pid_list)
    if n == 0:
        return []

    c_pids = <pid_t *>malloc(n * sizeof(pid_t))
    c_status = <int *>calloc(n, sizeof(int))
    c_pidfds = <int *>malloc(n * sizeof(int))
    c_state = <char *>calloc(n, sizeof(char))
    try:
        if not (c_pids and c_status and c_pidfds and c_state):
            raise MemoryError()
        for i in range(n):
            c_pids[i] = pid_list[i]
            c_pidfds[i] = -2  # not opened yet
        if has_timeout:
            deadline = _monotonic() + t
        while True:
            with nogil:
                if not has_timeout:
                    # Blocking waits in order: one syscall per child.
                    rc = _reap_pending(c_pids, c_status, c_state, n, 0)
                else:
                    while True:
                        rc = _reap_pending(c_pids, c_status, c_state, n, WNOHANG)
                        if rc < 0:
                            break
                        for i in range(n):
                            if c_state[i] == 0:
                                break
                        else:
                            break
                        if _monotonic() >= deadline:
                            break
                        rc = _wait_some(c_pids, c_state, c_pidfds, n, deadline)
                        if rc < 0:
                            break
            if rc == 0:
                break
            # EINTR: run the signal handlers (Ctrl-C raises here) and go on.
            try:
                PyErr_CheckSignals_or_raise()
            except BaseException as exc:
                # Those already reaped cannot be waited for again: hand them over.
                exc.reaped = [(c_pids[i], c_status[i]) for i in range(n) if c_state[i] == 1]
                raise

        reaped = [(c_pids[i], c_status[i]) for i in range(n) if c_state[i] == 1]
        for i in range(n):
            if c_state[i] == 3:
                _raise_errno(c_status[i])
        missing = [c_pids[i] for i in range(n) if c_state[i] == 2]
        if missing:
            err = ChildProcessError(ECHILD, "No child processes")
            err.reaped = reaped
            err.pids = missing
            raise err
        return reaped
    finally:
        if c_pidfds != NULL:
            for i in range(n):
                if c_pidfds[i] >= 0:
                    close(c_pidfds[i])
        free(c_pids)
        free(c_status)
        free(c_pidfds)
        free(c_state)


# ---------------------------------------------------------------- fork_call

cdef extern from "<signal.h>" nogil:
    int NSIG


def fork_call(fn, registry, pdeathsig=0):
    """Fork; in the child run ``fn()`` and ``_exit`` with what it returns.

    The child never returns from this call: whatever ``fn`` does -- returns a
    non-int, raises SystemExit, KeyboardInterrupt or any BaseException -- it
    ends in ``_exit`` (70, EX_SOFTWARE, when ``fn`` raised or returned a
    non-int). sys.stdout and sys.stderr are flushed before the fork (no output
    printed twice) and in the child before ``_exit`` (none lost). No Python bytecode runs between fork() returning and ``fn``
    being called, so no signal handler can raise in that gap.

    In the parent the child's pid is appended to ``registry`` (a list) before
    anything else can run, then returned. ``pdeathsig`` > 0 asks the kernel to
    send that signal to the child when the parent dies (Linux); a child whose
    parent died before that took effect exits at once.

    Raises TypeError for a non-callable ``fn``, a non-list ``registry`` or a
    non-integer ``pdeathsig``; ValueError for a ``pdeathsig`` that is not a
    signal number (or 0); OSError if fork fails; RuntimeError at interpreter
    shutdown.
    """
    cdef pid_t parent = getpid()
    cdef pid_t pid
    cdef int code = 70
    cdef int c_sig
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if not isinstance(registry, list):
        raise TypeError("registry must be a list")
    c_sig = PyNumber_Index(pdeathsig)
    if not 0 <= c_sig < NSIG:
        # Checked here: prctl() would only fail in the child, unnoticed.
        raise ValueError(f"pdeathsig must be 0 or a signal number, not {pdeathsig!r}")
    if ff_is_finalizing():
        # Unlike os.fork on 3.10/3.11, the library never starts a child during
        # shutdown, on any version: the child would run a half-torn-down runtime.
        raise _FinalizationError("can't fork at interpreter shutdown")
    PyErr_CheckSignals_or_raise()  # a due handler's output is flushed too
    _flush_stdio()  # or the child would print the parent's buffered output again
    pid = _fork_holding_fd_lock(_only_thread())
    if pid != 0:
        registry.append(pid)
        return pid
    try:
        if c_sig > 0:
            if prctl(PR_SET_PDEATHSIG, c_sig, 0, 0, 0) != 0 or getppid() != parent:
                c_exit(70)
        result = fn()
        if isinstance(result, int) and 0 <= result <= 255:
            code = result
    except BaseException:
        code = 70
    finally:
        _flush_stdio()
        c_exit(code)


cdef void _flush_stdio() noexcept:
    """Flush sys.stdout and sys.stderr (around a fork); never raises."""
    # PySys_GetObject, not getattr(sys, ...): run for every child, the
    # attribute lookups would write to pages the children share.
    cdef PyObject *stream
    for name in (b"stdout", b"stderr"):
        try:
            stream = PySys_GetObject(name)
            if stream != NULL and <object>stream is not None:
                (<object>stream).flush()
        except BaseException:
            pass


def fork_with_pipe(fn, handle, list launched, pdeathsig=0):
    """fork_call for a child that reports over a pipe, with every step recorded
    on ``handle`` before any Python code can run.

    Makes a close-on-exec pipe and stores its ends as ``handle._result_fd`` and
    ``handle._write_fd`` (both added to fastfork's owned fds), then forks. The
    child runs ``fn()`` (which finds its write end on its copy of ``handle``)
    and ends in ``_exit`` exactly as with fork_call. In the parent the write
    end is closed, the read end made non-blocking, ``handle.pid`` and
    ``handle._pidfd`` (a pidfd, or -1 where there is none) set, and ``handle``
    appended to ``launched``; returns the pid.

    Whatever a signal handler raises afterwards, everything this call created
    can be found on ``handle``. Raises OSError if the pipe or fork fails
    (``handle`` then holds the pipe for the caller to close).
    """
    cdef int fds[2]
    cdef int pidfd, flags
    cdef pid_t pid
    if pipe2(fds, O_CLOEXEC) < 0:
        _raise_errno(errno)
    _owned_fds_set.add(fds[0])
    _owned_fds_set.add(fds[1])
    handle._result_fd = fds[0]
    handle._write_fd = fds[1]
    pid = fork_call(fn, [], pdeathsig)
    # Parent only: fork_call never returns in the child.
    handle.pid = pid
    close(fds[1])
    _owned_fds_set.discard(fds[1])
    handle._write_fd = -1
    flags = fcntl(fds[0], F_GETFL)
    fcntl(fds[0], F_SETFL, flags | O_NONBLOCK)
    pidfd = _pidfd_open(pid)
    if pidfd >= 0:
        _owned_fds_set.add(pidfd)
    handle._pidfd = pidfd
    launched.append(handle)
    return pid


def _register_child_state(set owned_fds, list dropped_pids, fd_lock):
    """Tell the core where fastfork.child keeps its fd set, dropped pids and fd lock."""
    global _owned_fds_set, _dropped_pids, _fd_lock
    _owned_fds_set = owned_fds
    _dropped_pids = dropped_pids
    _fd_lock = fd_lock


cdef object _owned_fds_set = None
cdef object _dropped_pids = None
cdef object _fd_lock = None


def close_inherited_fds(keep=()):
    """In a freshly forked child: close every fd fastfork owns but ``keep``.

    Those in ``keep`` stay in the set of owned fds; the rest leave it.
    """
    keep = tuple(keep)
    for fd in list(_owned_fds_set):
        if fd not in keep:
            close(fd)
    _owned_fds_set.clear()
    _owned_fds_set.update(keep)


def close_fd_attr(obj, str name):
    """Close the fd held in ``obj.<name>`` and set the attribute to -1, atomically.

    No Python code runs in between, so a signal handler raising (Ctrl-C) can
    neither leave the fd open nor have it closed twice. The fd leaves the set
    of fds fastfork owns. Does nothing if the attribute is -1 or missing.
    """
    cdef int fd
    attrs = obj.__dict__
    fd = attrs.get(name, -1)
    if fd >= 0:
        attrs[name] = -1
        close(fd)
        if _owned_fds_set is not None:
            _owned_fds_set.discard(fd)


def finalize_child(self):
    """``Child.__del__``, in C: close the handle's fds; remember a running child.

    A finalizer written in Python would run signal handlers, and whatever
    they raised (Ctrl-C) would be lost as "Exception ignored"; this one runs
    no Python code (bar the ResourceWarning for a child dropped while
    running). The fds are the attributes named by ``type(self)._fd_attrs``.
    If ``type(self)._reaps_own_pid``, an exited child is reaped here and a
    running one queued, with its pidfd, in the dropped list, to be reaped by
    the next start.
    """
    cdef pid_t pid
    cdef int fd, status = 0
    cdef siginfo_t info
    cdef long rc
    cdef bint running = False
    if self.__dict__.get("_owner") != getpid() or self.__dict__.get("_finished", True):
        return
    cls = type(self)
    if cls._reaps_own_pid and self.pid is not None:
        pid = self.pid
        fd = self._pidfd
        if fd >= 0:
            memset(&info, 0, sizeof(info))
            rc = syscall(SYS_waitid, P_PIDFD, fd, &info, WEXITED | WNOHANG, NULL)
            if rc < 0 and errno == EINVAL:
                fd = -1  # Linux 5.3: pidfds but no P_PIDFD; go by pid
            else:
                running = rc == 0 and info.si_pid == 0
        if fd < 0:
            running = c_waitpid(pid, &status, WNOHANG) == 0
        if running and _dropped_pids is not None:
            # The pidfd goes along, so the later reap can never take a reused pid.
            if fd >= 0:
                self.__dict__["_pidfd"] = -1
            _dropped_pids.append((pid, fd))
    for name in cls._fd_attrs:
        close_fd_attr(self, name)
    if running:
        warnings.warn(f"child {self.pid} is still running", ResourceWarning, stacklevel=1)


# ---------------------------------------------------------------- C limits

def _c_fork_exit_loop(Py_ssize_t n, int jobs=1):
    """The physical limit: n times fork + _exit(0) + waitpid, entirely in C.

    At most ``jobs`` children are alive at once; the oldest is reaped before
    the next fork, as in the fan-out workloads. Returns the number of
    children that exited 0. For benchmarks only.
    Raises ValueError for jobs < 1, OSError if fork fails.
    """
    cdef Py_ssize_t started = 0, ok = 0, oldest = 0, alive = 0
    cdef pid_t pid
    cdef int status = 0, fork_errno = 0
    cdef pid_t *pids
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    pids = <pid_t *>malloc(jobs * sizeof(pid_t))
    if pids == NULL:
        raise MemoryError()
    with nogil:
        while (started < n and not fork_errno) or alive > 0:
            if alive == jobs or started == n or fork_errno:
                while c_waitpid(pids[oldest], &status, 0) < 0 and errno == EINTR:
                    pass
                if status == 0:
                    ok += 1
                oldest = (oldest + 1) % jobs
                alive -= 1
                continue
            pid = c_fork()
            if pid == 0:
                c_exit(0)
            if pid < 0:
                fork_errno = errno  # stop forking, reap the rest, then raise
                continue
            pids[(oldest + alive) % jobs] = pid
            alive += 1
            started += 1
    free(pids)
    if fork_errno:
        _raise_errno(fork_errno)
    return ok


def _c_waitpid_loop(pids):
    """Reap already-exited ``pids`` with one waitpid each, in C (a limit)."""
    cdef pid_t p
    cdef int status
    for p in pids:
        with nogil:
            c_waitpid(p, &status, 0)
    return len(pids)

include "_spawn.pxi"
include "_fanout.pxi"
