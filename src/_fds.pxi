# The fds fastfork owns in this process (pipes, pidfds, sockets), as module
# state in C. Every child fastfork forks closes them all first
# (close_inherited_fds), so it never holds a sibling's pipe; each is also
# close-on-exec. Code that makes fds no child may inherit holds ``fd_lock``
# until they are registered or closed; the core's forks of fastfork children
# take it too (when other threads exist). Included by _core.pyx.
#
# Only code holding the GIL touches the registry, which keeps it consistent
# across threads.

import _thread

cdef unsigned char *_owned = NULL     # _owned[fd] is 1 while fastfork owns fd
cdef int _owned_size = 0

cdef object _fd_lock = _thread.allocate_lock()
fd_lock = _fd_lock


cdef int _own(int fd) except -1:
    """Record ``fd`` as fastfork's."""
    global _owned, _owned_size
    cdef int size
    cdef unsigned char *grown
    if fd >= _owned_size:
        size = max(fd + 1, 2 * _owned_size, 256)
        grown = <unsigned char *>realloc(_owned, size)
        if grown == NULL:
            raise MemoryError()
        memset(grown + _owned_size, 0, size - _owned_size)
        _owned = grown
        _owned_size = size
    _owned[fd] = 1
    return 0


cdef void _disown(int fd) noexcept:
    """Forget ``fd`` (closed, or handed on)."""
    if 0 <= fd < _owned_size:
        _owned[fd] = 0


cdef void _close_fd(int *fd) noexcept:
    """Close ``*fd`` if it is open, forget it and set it to -1, in one C step.

    No Python code runs in between, so a signal handler raising (Ctrl-C) can
    neither leave the fd open nor have it closed twice.
    """
    if fd[0] >= 0:
        _disown(fd[0])
        close(fd[0])
        fd[0] = -1


cdef int _set_blocking(int fd, bint blocking) except -1:
    """Clear or set O_NONBLOCK on ``fd``; raises OSError from errno."""
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        _raise_errno(errno)
    flags = flags & ~O_NONBLOCK if blocking else flags | O_NONBLOCK
    if fcntl(fd, F_SETFL, flags) < 0:
        _raise_errno(errno)
    return 0


cdef int _fd_arg(fd) except -1:
    """``fd`` as a C int; TypeError for a non-integer, ValueError for a negative one."""
    cdef int c_fd = PyNumber_Index(fd)
    if c_fd < 0:
        raise ValueError(f"fd must be >= 0, not {c_fd}")
    return c_fd


def own_fd(fd):
    """Record ``fd`` as fastfork's: closed first thing in every child fastfork forks.

    Returns ``fd``. Raises TypeError for a non-integer, ValueError for a negative fd.
    """
    _own(_fd_arg(fd))
    return fd


def disown_fd(fd):
    """Forget ``fd`` (closed or handed on by its user); nothing for an fd not owned."""
    _disown(_fd_arg(fd))


def close_owned(fd):
    """Close an fd recorded with own_fd() and forget it.

    Raises OSError if close() fails (EBADF for an fd that is not open).
    """
    cdef int c_fd = _fd_arg(fd)
    _disown(c_fd)
    # Linux closes the fd even when close() reports EINTR: not an error here.
    if close(c_fd) < 0 and errno != EINTR:
        _raise_errno(errno)


def owned_fds():
    """The fds fastfork owns in this process, in ascending order."""
    cdef int fd
    return [fd for fd in range(_owned_size) if _owned[fd]]


def close_inherited_fds(keep=()):
    """In a freshly forked child: close every fd fastfork owns but those in ``keep``.

    Those in ``keep`` stay owned; the rest are forgotten.
    """
    cdef int fd, first
    for k in keep:
        fd = PyNumber_Index(k)
        if 0 <= fd < _owned_size and _owned[fd]:
            _owned[fd] = 2  # kept: ends a run below
    # One close_range(2) per run of owned fds: a fan-out's fds are mostly
    # consecutive, and a child of a wide one would otherwise make thousands
    # of close() calls.
    fd = 0
    while fd < _owned_size:
        if _owned[fd] != 1:
            if _owned[fd] == 2:
                _owned[fd] = 1
            fd += 1
            continue
        first = fd
        while fd < _owned_size and _owned[fd] == 1:
            _owned[fd] = 0
            fd += 1
        if syscall(SYS_close_range, first, fd - 1, 0) < 0:
            for first in range(first, fd):  # Linux before 5.9
                close(first)
