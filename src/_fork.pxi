# Forking: fork() between the interpreter's hooks as os.fork does it, the
# start-up every fastfork child goes through, and the library's two ways to
# fork a child that runs Python code (fork_call, fork_with_pipe). Included by
# _core.pyx.

from libc.signal cimport SIG_DFL, SIG_ERR, SIG_IGN

from _decls cimport (
    PyErr_SetInterruptEx, PyInterpreterState_Get, PyInterpreterState_ThreadHead,
    PyOS_getsig, PyOS_sighandler_t, PyThread_get_thread_ident, PyThreadState,
    PyThreadState_Next, ff_adopt_main_thread, ff_hold_signals, ff_release_signals,
)

import builtins
import contextlib
import signal as _signal_module
import sys
import threading

cdef bint _warn_threads = sys.version_info >= (3, 12)
# os.fork warns before PyOS_AfterFork_Parent on 3.12 and after it from 3.13
# (so that hooks run with the world started again): same order here.
cdef bint _warn_before_hooks = sys.version_info < (3, 13)
# os.fork refuses to fork once finalization has begun only from 3.12
# (gh-104690; narrowed to "after atexit" by gh-113964), and says so with
# PythonFinalizationError from 3.13.
cdef bint _refuse_at_shutdown = sys.version_info >= (3, 12)
cdef object _FinalizationError = getattr(builtins, "PythonFinalizationError", RuntimeError)

cdef enum:
    # The exit status of a child whose code raised (or returned no exit
    # code) where it should have reported: EX_SOFTWARE.
    _EXIT_ESCAPED = 70


# ---------------------------------------------------------------- threads

cdef long _kernel_thread_count() noexcept nogil:
    """Field 20 of /proc/self/stat (num_threads); 0 if it cannot be read."""
    cdef char buf[1024]
    cdef Py_ssize_t n, i, after_name = -1
    cdef int field = 2
    cdef long count = 0
    cdef int fd = c_open(b"/proc/self/stat", O_RDONLY | O_CLOEXEC)
    if fd < 0:
        return 0
    n = c_read(fd, buf, sizeof(buf))
    close(fd)
    # The command name (field 2) may hold spaces and ')': count from its last ')'.
    for i in range(n):
        if buf[i] == ord(")"):
            after_name = i + 1
    if after_name < 0:
        return 0
    i = after_name
    while i < n and field < 20:
        if buf[i] == ord(" "):
            field += 1
        i += 1
    while i < n and ord("0") <= buf[i] <= ord("9"):
        count = count * 10 + (buf[i] - ord("0"))
        i += 1
    return count


cdef long _count_threads() except -1:
    """Threads in this process, as CPython's warn_about_fork_with_threads()
    counts them: the kernel's count, else threading's view."""
    cdef long n = _kernel_thread_count()
    if n > 0:
        return n
    threading_module = sys.modules.get("threading")
    if threading_module is None:
        return 1
    return len(threading_module._active) + len(threading_module._limbo)


# Threads fastfork runs itself (a ForkExecutor's), by native id. Each blocks
# every signal, and no lock it may hold is one a forked child needs (only the
# process that made an executor may use it): the threads warning does not
# count them, and signals are not held back for them.
cdef set _library_threads = set()
os.register_at_fork(after_in_child=_library_threads.clear)


def _library_thread(bint running):
    """Count the calling thread as one of fastfork's own (``running``), or no longer.

    For threads that block every signal and hold no lock a forked child
    could need (stdio's, the import lock, a logging handler's).
    """
    if running:
        _library_threads.add(threading.get_native_id())
    else:
        _library_threads.discard(threading.get_native_id())


cdef long _count_other_threads() except -1:
    """The threads a fork must care about: all but fastfork's own."""
    return _count_threads() - len(_library_threads)


cdef bint _only_thread() noexcept:
    """True if this interpreter has no Python thread but ours."""
    cdef PyThreadState *head = PyInterpreterState_ThreadHead(PyInterpreterState_Get())
    return head == NULL or PyThreadState_Next(head) == NULL


# ---------------------------------------------------------------- the threads warning

# Warnings about the library's own forks name the user's line: the innermost
# frame outside fastfork's package and outside contextlib, which runs the
# generator of `with fastfork.background(...)`.
cdef str _library_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
cdef str _contextlib_file = contextlib.__file__


cdef int _callers_stacklevel() except -1:
    """The warnings stack level of the user's line that called into fastfork.

    Level 1 is the innermost Python frame: Cython functions have no frame.
    """
    cdef int level = 1
    frame = sys._getframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith(_library_dir) or filename == _contextlib_file):
            break
        frame = frame.f_back
        level += 1
    return level


def callers_stacklevel():
    """The ``stacklevel`` for warnings.warn, called where this is called, that
    names the user's line which called into fastfork."""
    return _callers_stacklevel()


cdef void _warn_if_threaded(bint library) noexcept:
    """Warn as os.fork does on 3.12+ when other threads are running.

    The same category, text and line as os.fork: for fastfork.fork, stack
    level 1 (its caller), as os.fork's C warning; for the library's forks
    (``library``), the user's line that called into fastfork.
    """
    try:
        if _count_other_threads() > 1:
            message = (f"This process (pid={getpid()}) is multi-threaded, use of fork() "
                       f"may lead to deadlocks in the child.").encode()
            PyErr_WarnEx(DeprecationWarning, message, _callers_stacklevel() if library else 1)
    except BaseException:
        # os.fork clears whatever the warning raised (PyErr_Clear), even an
        # exception from a signal handler: the fork happened and its pid must
        # reach the caller.
        pass


# ---------------------------------------------------------------- signals during the hooks
#
# CPython runs Python-level signal handlers in the main thread only, but any
# thread that does not block a signal may receive it, and the C-level handler
# that receives it only sets a flag. So with other threads running, blocking
# signals in the forking (main) thread does not stop a handler from running
# inside an at-fork hook, where what it raises would be printed as "Exception
# ignored" and lost. For that case the C-level handlers are held back while
# the hooks run (src/sighold.c): no Python code runs for it, so it costs a
# fork no page writes.

cdef unsigned long _main_thread_ident = threading.main_thread().ident
cdef PyOS_sighandler_t _python_handler = NULL


cdef PyOS_sighandler_t _python_signal_handler() except? NULL:
    """CPython's C-level signal handler (the one that runs Python-level handlers).

    Learned from the first signal found with a Python-level handler; NULL
    while no signal has one.
    """
    global _python_handler
    cdef PyOS_sighandler_t disposition
    if _python_handler == NULL:
        for sig in _all_signals:
            disposition = PyOS_getsig(sig)
            if (disposition != <PyOS_sighandler_t>SIG_DFL
                    and disposition != <PyOS_sighandler_t>SIG_IGN
                    and disposition != <PyOS_sighandler_t>SIG_ERR
                    and callable(_getsignal(sig))):
                _python_handler = disposition
                break
    return _python_handler


cdef bint _hold_python_signals() except -1:
    """Hold back Python-level signal handlers for the at-fork hooks, if one
    could run inside them: in the main thread, with other threads running.

    Returns True if held (ff_release_signals must follow).
    """
    cdef PyOS_sighandler_t handler
    if PyThread_get_thread_ident() != _main_thread_ident or _count_other_threads() <= 1:
        return False
    handler = _python_signal_handler()
    if handler == NULL:
        return False
    ff_hold_signals(handler)
    return True


cdef object _getsignal = _signal_module.getsignal
cdef tuple _all_signals = tuple(sorted(_signal_module.valid_signals()))


# ---------------------------------------------------------------- fork

cdef pid_t _fork_checked(bint library) except -1:
    """fork() between the interpreter's before/after hooks, as os.fork does.

    ``library``: a fork of fastfork's own (map, start, ...), whose threads
    warning names the user's line that called into fastfork.
    Returns 0 in the child and the child's pid in the parent.
    Raises RuntimeError (PythonFinalizationError on 3.13+) at interpreter
    shutdown on 3.12+, OSError from errno.
    """
    cdef pid_t pid
    cdef int saved_errno
    cdef bint holding
    cdef sigset_t all_signals, saved_mask
    # Same checks in the same order as CPython's os_fork_impl: shutdown
    # first, then the audit event.
    if _refuse_at_shutdown and ff_is_finalizing():
        raise _FinalizationError("can't fork at interpreter shutdown")
    PySys_Audit("os.fork", NULL)
    # Unlike os.fork, no Python signal handler runs inside an at-fork hook
    # (what it raised would be lost): this thread blocks every signal until
    # the hooks are done, and signals other threads receive are held back
    # meanwhile (_hold_python_signals).
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, &saved_mask)
    try:
        # A signal that arrived before the mask (while C code ran, so no
        # handler has run yet) is handled now: raising here forks nothing.
        PyErr_CheckSignals()
        holding = _hold_python_signals()
    except BaseException:
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL)
        raise
    PyOS_BeforeFork()
    pid = c_fork()
    saved_errno = errno
    if pid == 0:
        PyOS_AfterFork_Child()
        ff_adopt_main_thread()  # before any signal is unblocked
        if holding:
            ff_release_signals(NULL)  # signals sent to the parent are not the child's
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL)
        return 0
    # os.fork warns in the parent even when fork() failed.
    if _warn_threads and _warn_before_hooks:
        _warn_if_threaded(library)
    PyOS_AfterFork_Parent()
    if _warn_threads and not _warn_before_hooks:
        _warn_if_threaded(library)
    if holding:
        ff_release_signals(PyErr_SetInterruptEx)
    # Signals this thread held back are delivered now.
    pthread_sigmask(SIG_SETMASK, &saved_mask, NULL)
    if pid < 0:
        _raise_errno(saved_errno)
    return pid


# Tests set this to a callable run before each of the library's forks, which
# may raise OSError in place of fork() (an EAGAIN on the third fork, say).
cdef object _fork_fault = None


def _set_fork_fault(fault):
    """Run ``fault()`` before each of fastfork's own forks (None: stop); for tests."""
    global _fork_fault
    _fork_fault = fault


cdef pid_t _fork_holding_fd_lock(bint alone) except -1:
    """_fork_checked for the library's own children, under the fd lock.

    Code that makes fds a child must not inherit (spawn's pipe ends) holds
    that lock until they are closed or registered, so our fork waits for it.
    Only other threads can hold it: ``alone`` (_only_thread()), we skip it.
    """
    cdef pid_t pid = -1
    cdef bint locked = False
    if _fork_fault is not None:
        _fork_fault()
    if not alone:
        _fd_lock.acquire()
        locked = True
    try:
        pid = _fork_checked(True)
    finally:
        # In the child an at-fork hook has released its copy already.
        if locked and pid != 0:
            _fd_lock.release()
    return pid


def _after_fork_in_child():
    global _main_thread_ident
    # A child forked while the fd lock was held (by fastfork's own fork, or by
    # another thread when user code calls os.fork) must be able to fork too.
    # Only one thread survives a fork, so no one else can hold it here.
    if _fd_lock.locked():
        _fd_lock.release()
    _forget_dropped()
    # The forking thread is the child's main thread (as CPython makes it).
    _main_thread_ident = PyThread_get_thread_ident()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


# ---------------------------------------------------------------- the child's life

ctypedef int (*_ChildBody)(object) except -1


cdef void _child_main(int pdeathsig, pid_t parent, _ChildBody body, object arg) noexcept:
    """A forked fastfork child's whole life; it always ends in _exit.

    Asks the kernel for ``pdeathsig`` (> 0) when the parent dies, runs
    ``body(arg)`` and exits with the code it returns: _EXIT_ESCAPED if it
    raised anything, SystemExit and KeyboardInterrupt included. stdio is
    flushed before _exit, so no output is lost.
    """
    cdef int code = _EXIT_ESCAPED
    try:
        if pdeathsig > 0:
            # A parent that died before prctl() took effect sends nothing
            # (prctl(2)): then exit now.
            if prctl(PR_SET_PDEATHSIG, pdeathsig, 0, 0, 0) != 0 or getppid() != parent:
                c_exit(_EXIT_ESCAPED)
        code = body(arg)
    except BaseException:
        code = _EXIT_ESCAPED
    _flush_stdio()
    c_exit(code)


cdef int _exit_code_of_call(object fn) except -1:
    """Call ``fn()``; its result is the exit code if an int in 0..255."""
    result = fn()
    if isinstance(result, int) and 0 <= result <= 255:
        return result
    return _EXIT_ESCAPED


cdef int _checked_pdeathsig(pdeathsig) except -1:
    """``pdeathsig`` as a C int; ValueError if not 0 or a signal number."""
    cdef int sig = PyNumber_Index(pdeathsig)
    if not 0 <= sig < NSIG:
        # Checked here: prctl() would only fail in the child, unnoticed.
        raise ValueError(f"pdeathsig must be 0 or a signal number, not {pdeathsig!r}")
    return sig


cdef pid_t _fork_running(fn, int pdeathsig) except -1:
    """Fork a child that runs ``fn()`` through _child_main; the pid, in the parent only."""
    cdef pid_t parent = getpid()
    cdef pid_t pid
    if ff_is_finalizing():
        # Unlike os.fork on 3.10/3.11, the library never starts a child during
        # shutdown, on any version: the child would run a half-torn-down runtime.
        raise _FinalizationError("can't fork at interpreter shutdown")
    PyErr_CheckSignals()  # a due handler's output is flushed too
    _flush_stdio()  # or the child would print the parent's buffered output again
    pid = _fork_holding_fd_lock(_only_thread())
    if pid == 0:
        _child_main(pdeathsig, parent, _exit_code_of_call, fn)
    return pid


def fork_call(fn, registry, pdeathsig=0):
    """Fork; in the child run ``fn()`` and ``_exit`` with what it returns.

    The child never returns from this call: whatever ``fn`` does -- returns a
    non-int, raises SystemExit, KeyboardInterrupt or any BaseException -- it
    ends in ``_exit`` (70, EX_SOFTWARE, when ``fn`` raised or returned a
    non-int). sys.stdout and sys.stderr are flushed before the fork (no output
    printed twice) and in the child before ``_exit`` (none lost). No Python
    bytecode runs between fork() returning and ``fn`` being called, so no
    signal handler can raise in that gap.

    In the parent the child's pid is appended to ``registry`` (a list) before
    anything else can run, then returned. ``pdeathsig`` > 0 asks the kernel to
    send that signal to the child when the parent dies (Linux); a child whose
    parent died before that took effect exits at once.

    Raises TypeError for a non-callable ``fn``, a non-list ``registry`` or a
    non-integer ``pdeathsig``; ValueError for a ``pdeathsig`` that is not a
    signal number (or 0); OSError if fork fails; RuntimeError at interpreter
    shutdown.
    """
    cdef int c_sig
    cdef pid_t pid
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if not isinstance(registry, list):
        raise TypeError("registry must be a list")
    c_sig = _checked_pdeathsig(pdeathsig)
    pid = _fork_running(fn, c_sig)
    registry.append(pid)
    return pid


def fork_with_pipe(fn, ChildHandle handle not None, list launched not None, pdeathsig=0):
    """fork_call for a child that reports over a pipe, with every step recorded
    on ``handle`` (a ChildHandle) before any Python code can run.

    Makes a close-on-exec pipe whose ends ``handle`` owns (``_result_fd``,
    non-blocking, and ``_write_fd``), then forks. The child runs ``fn()``
    (which finds the write end on its copy of ``handle``) and ends in
    ``_exit`` exactly as with fork_call. In the parent the write end is
    closed, ``handle`` gets the pid and a pidfd (where pidfds are used) and
    is appended to ``launched``; returns the pid.

    Whatever a signal handler raises afterwards, everything this call created
    is held by ``handle``. Raises TypeError for a non-callable ``fn``,
    ValueError for a bad ``pdeathsig``, OSError if the pipe or fork fails
    (``handle`` then holds the pipe, for the caller to close).
    """
    cdef int fds[2]
    cdef int c_sig
    cdef pid_t pid
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    c_sig = _checked_pdeathsig(pdeathsig)
    if pipe2(fds, O_CLOEXEC) < 0:
        _raise_errno(errno)
    handle._c_result_fd = fds[0]
    handle._c_write_fd = fds[1]
    _own(fds[0])
    _own(fds[1])
    _set_blocking(fds[0], False)  # the child writes to its end blocking
    pid = _fork_running(fn, c_sig)
    # Parent only from here.
    handle._c_pid = pid
    _close_fd(&handle._c_write_fd)
    handle._c_pidfd = _open_pidfd(pid)
    if handle._c_pidfd >= 0:
        _own(handle._c_pidfd)
    launched.append(handle)
    return pid
