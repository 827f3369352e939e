"""The open-file limit as fan-outs meet it, for the scheduler and the C engine alike.

A fan-out with many children at once holds fds for each (a pidfd, pipes).
When they would not fit, the soft ``RLIMIT_NOFILE`` is raised only as far as
the children need (a process whose fds stay below 1024 can still use
select() elsewhere), never past the hard limit; what still does not fit
waits for running children to finish, and the fan-out says so once.
"""
import errno
import os
import resource

__all__ = ["fd_limit", "fds_in_use", "make_room", "wait_message", "no_room_error"]


def fd_limit():
    """(soft, hard) RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fds_in_use(soft):
    """How many fds this process has open (all below ``soft``, the soft limit)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:  # no /proc
        count = 0
        for fd in range(soft):
            try:
                os.fstat(fd)
            except OSError:
                continue
            count += 1
        return count


def make_room(more_fds):
    """Raise the soft limit, if need be, so that ``more_fds`` more fds fit.

    Only as far as needed, and at most to the hard limit. Returns
    (fds in use, soft limit, hard limit) after.
    """
    soft, hard = fd_limit()
    in_use = fds_in_use(soft)
    needed = in_use + more_fds
    if needed > soft and soft < hard:  # RLIM_INFINITY is the largest value
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
        except (OSError, ValueError):
            pass  # past what the kernel allows (fs.nr_open): keep the limit
        soft = fd_limit()[0]
    return in_use, soft, hard


def wait_message(running, jobs, fds_per_child):
    """The warning given once when the fd limit holds children back."""
    soft, hard = fd_limit()
    return (f"only {running} children fit at once in the open-file limit "
            f"(RLIMIT_NOFILE {soft}, hard limit {hard}; each running child holds "
            f"{fds_per_child}), not jobs={jobs}: the others start as running ones finish. "
            f"Raise the hard limit (ulimit -Hn) to run them all at once")


def no_room_error(in_use, running, hard, fds_per_child, fds_to_start):
    """The OSError(EMFILE) for a child that cannot start while none could free fds."""
    return OSError(errno.EMFILE, (
        f"too many open files to start a child: {in_use} files open, {running} "
        f"children running, and the hard limit RLIMIT_NOFILE is {hard}; a running child "
        f"holds {fds_per_child} and starting one needs {fds_to_start} free: close files "
        f"or raise the hard limit"))
