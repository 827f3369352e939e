# The C declarations fastfork's core needs that Cython does not ship.
#
# What Cython bundles (libc.*, posix.*, cpython.*) is cimported from there where
# it is used; this file holds only the rest: CPython's fork hooks, Linux's
# pidfd and prctl calls, poll(2), epoll(7), pipe2(2), and the project's own C helpers
# (spawn.h: the exec path's plan; sighold.h: signals held during at-fork hooks).
# Each function states its exception contract: none of these raise (they
# report through their return value and errno), except PySys_Audit.

from cpython.object cimport PyObject
from posix.types cimport pid_t, sigset_t


cdef extern from "Python.h":
    void PyOS_BeforeFork()
    void PyOS_AfterFork_Parent()
    void PyOS_AfterFork_Child()
    int PySys_Audit(const char *event, const char *format, ...) except -1
    # A borrowed reference, or NULL.
    PyObject *PySys_GetObject(const char *name) noexcept
    ctypedef void (*PyOS_sighandler_t)(int) noexcept nogil
    # The C-level disposition of a signal (sigaction), as a handler address.
    PyOS_sighandler_t PyOS_getsig(int sig) noexcept
    unsigned long PyThread_get_thread_ident() noexcept
    # A new reference, or NULL at the end (or on error, with the error set).
    PyObject *PyIter_Next_raw "PyIter_Next"(PyObject *iterator) noexcept

    ctypedef struct PyInterpreterState:
        pass
    ctypedef struct PyThreadState:
        pass
    PyInterpreterState *PyInterpreterState_Get() noexcept
    PyThreadState *PyInterpreterState_ThreadHead(PyInterpreterState *interp) noexcept
    PyThreadState *PyThreadState_Next(PyThreadState *tstate) noexcept


cdef extern from "Python.h" nogil:
    # Trip the Python-level handler of a signal as if it had just arrived
    # (async-signal-safe, callable without the GIL).
    int PyErr_SetInterruptEx(int signum) noexcept


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
    #include <sys/wait.h>
    #ifndef P_PIDFD
    #define P_PIDFD 3  /* Linux 5.4+, uapi value; older glibc headers lack it */
    #endif
    #include <sys/syscall.h>
    #ifndef SYS_close_range
    #define SYS_close_range 436  /* Linux 5.9+, the same number on every architecture */
    #endif
    """
    bint ff_is_finalizing() noexcept
    int P_PIDFD
    long SYS_close_range


cdef extern from "<signal.h>" nogil:
    int pthread_sigmask(int how, const sigset_t *new_mask, sigset_t *old_mask) noexcept
    int NSIG
    int CLD_EXITED
    int CLD_KILLED
    int CLD_DUMPED


cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5) noexcept
    int PR_SET_PDEATHSIG


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd *fds, nfds_t nfds, int timeout) noexcept
    short POLLIN


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        unsigned int u32
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags) noexcept
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event) noexcept
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout) noexcept
    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int EPOLL_CTL_MOD
    unsigned int EPOLLIN


cdef extern from "<sys/syscall.h>" nogil:
    long syscall(long number, ...) noexcept
    long SYS_pidfd_open
    long SYS_pidfd_send_signal
    long SYS_waitid


cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags) noexcept


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
    pid_t ff_spawn(const ff_spawn_plan *plan, int report[2], int *pidfd) noexcept
    int ff_spawn_uses_vfork() noexcept
    enum:
        FF_STEP_FDS
        FF_STEP_CWD
        FF_STEP_SETSID
        FF_STEP_PDEATHSIG
        FF_STEP_EXEC
        FF_STEP_DEVNULL
        FF_STDIO_DEVNULL


cdef extern from "mainthread.h":
    void ff_adopt_main_thread() noexcept


cdef extern from "sighold.h" nogil:
    void ff_hold_signals(void (*python_handler)(int) noexcept nogil) noexcept
    void ff_release_signals(int (*deliver)(int) noexcept) noexcept
