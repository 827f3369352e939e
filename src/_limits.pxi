# The physical limits the benchmarks compare against: the same loops as the
# workloads, entirely in C. For benchmarks only. Included by _core.pyx.


def _c_fork_exit_loop(Py_ssize_t n, int jobs=1):
    """n times fork + _exit(0) + waitpid, entirely in C.

    At most ``jobs`` children are alive at once; the oldest is reaped before
    the next fork, as in the fan-out workloads. Returns the number of
    children that exited 0.
    Raises ValueError for jobs < 1, OSError if fork fails.
    """
    cdef Py_ssize_t started = 0, ok = 0, oldest = 0, alive = 0
    cdef pid_t pid
    cdef int fork_errno = 0
    cdef pid_t *pids
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    pids = <pid_t *>malloc(jobs * sizeof(pid_t))
    if pids == NULL:
        raise MemoryError()
    with nogil:
        while (started < n and not fork_errno) or alive > 0:
            if alive == jobs or started == n or fork_errno:
                if _reap_quietly(pids[oldest], -1) == 0:
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
    """Reap already-exited ``pids`` with one waitpid each, in C."""
    cdef pid_t p
    for p in pids:
        with nogil:
            _reap_quietly(p, -1)
    return len(pids)


def _c_spawn_loop(Py_ssize_t n, bytes path=b"/bin/true"):
    """The exec path's limit: n times ff_spawn(path) + waitpid, all in C.

    Each round inherits stdio and the environment and closes other fds, as
    ``_spawn`` does for a plain command; a child made by fork() reports over
    an error pipe made per round, as there. Returns how many children
    exited 0. Raises OSError if a process cannot be created.
    """
    cdef ff_spawn_plan plan
    cdef char *argv[2]
    cdef int pipefd[2]
    cdef int report[2]
    cdef Py_ssize_t i, ok = 0
    cdef pid_t pid = 0
    cdef int err = 0
    cdef bint failed = False
    cdef bint by_pipe = not ff_spawn_uses_vfork()
    argv[0] = path
    argv[1] = NULL
    memset(&plan, 0, sizeof(plan))
    plan.paths = argv
    plan.argv = argv
    plan.stdio[0] = plan.stdio[1] = plan.stdio[2] = -1
    plan.close_fds = 1
    plan.max_fd = <int>sysconf(_SC_OPEN_MAX)
    plan.parent = getpid()
    plan.errpipe = -1
    with nogil:
        for i in range(n):
            if by_pipe:
                if pipe2(pipefd, O_CLOEXEC) < 0:
                    err = errno
                    failed = True
                    break
                plan.errpipe = pipefd[1]
            pid = ff_spawn(&plan, report, NULL)
            err = errno
            if by_pipe:
                close(pipefd[0])
                close(pipefd[1])
            if pid < 0:
                failed = True
                break
            if _reap_quietly(pid, -1) == 0:
                ok += 1
    if failed:
        _raise_errno(err)
    return ok
