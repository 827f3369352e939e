"""Memory that forks for free: ``SharedBuffer`` and ``PrivateBuffer``.

A fork costs in proportion to the parent's private memory, because the kernel
copies the page tables of every private mapping (about 40 us per MB here).

``SharedBuffer``
    A ``MAP_SHARED`` mapping. Its page tables are not copied at fork, so a
    child is as cheap to fork as if the buffer did not exist, and every write,
    by the parent or any child, is seen by all of them. Use it for large
    inputs that children only read, and for outputs that children write in
    place into their own slice (no pickling of big results). On Linux it is
    backed by a ``memfd`` so that it can also be handed to a ``ForkServer``,
    whose children are not descendants of the caller.

``PrivateBuffer``
    A ``MAP_PRIVATE`` anonymous mapping, advised ``MADV_HUGEPAGE`` by default.
    Children get a copy-on-write snapshot (their writes stay their own), and
    with transparent huge pages one page-table entry maps 2 MiB instead of
    4 KiB, so fork copies ~512 times fewer entries. Use it for large working
    memory of the parent that children must not modify or share.

Both are ``mmap.mmap`` objects: they support the buffer protocol
(``memoryview``, ``numpy.frombuffer``, ``struct.pack_into``), slicing and
``with``. ``close()`` unmaps them; it raises BufferError while a memoryview
or array still refers to the memory.
"""
from __future__ import annotations

import mmap
import operator
import os
import sys

__all__ = ["SharedBuffer", "PrivateBuffer"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import Self


def _check_size(size):
    """Return ``size`` as an int > 0; raise TypeError/ValueError otherwise."""
    if isinstance(size, bool):
        raise TypeError("size must be an int, not bool")
    try:
        size = operator.index(size)
    except TypeError:
        raise TypeError(f"size must be an int, not {type(size).__name__}") from None
    if size <= 0:
        raise ValueError(f"size must be > 0, not {size}")
    return size


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")


def _advise_hugepages(buf):
    """Advise MADV_HUGEPAGE on ``buf``; return whether the kernel took the advice."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:  # not Linux, or a kernel without THP
        return False
    try:
        buf.madvise(advice)
    except OSError:  # EINVAL: THP not built into this kernel
        return False
    return True


class _MappedBuffer(mmap.mmap):
    """Base of the buffer types: an mmap with chunking and a clear closed error."""

    hugepages: bool
    _fd: int

    def __init__(self, *args, **kwargs):
        # mmap.mmap does all its work in __new__.
        pass

    def __reduce__(self):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: forked children inherit "
            "it; a ForkServer call sends a SharedBuffer's memfd along")

    def _check_open(self):
        if self.closed:
            raise ValueError(f"operation on a closed {type(self).__name__}")

    def bounds(self, i: int, n: int, *, itemsize: int = 1) -> tuple[int, int]:
        """Return the (start, stop) byte offsets of part ``i`` of ``n`` equal parts.

        Parts hold whole items of ``itemsize`` bytes; the first
        ``items % n`` parts get one item more. Trailing bytes that do not
        make a whole item belong to no part.
        Raises TypeError/ValueError for bad arguments, ValueError if closed.
        """
        self._check_open()
        for name, value in (("i", i), ("n", n), ("itemsize", itemsize)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, not {n}")
        if not 0 <= i < n:
            raise ValueError(f"i must be in range({n}), not {i}")
        if itemsize < 1:
            raise ValueError(f"itemsize must be >= 1, not {itemsize}")
        items = len(self) // itemsize
        q, r = divmod(items, n)
        start = i * q + min(i, r)
        stop = start + q + (1 if i < r else 0)
        return start * itemsize, stop * itemsize

    def chunk(self, i: int, n: int, *, itemsize: int = 1) -> memoryview:
        """Return a writable memoryview of part ``i`` of ``n`` (see ``bounds``).

        Release the view (``view.release()`` or ``with``) before closing the
        buffer in the process that made it.
        Raises TypeError/ValueError for bad arguments, ValueError if closed.
        """
        start, stop = self.bounds(i, n, itemsize=itemsize)
        with memoryview(self) as whole:
            return whole[start:stop]

    def chunks(self, n: int, *, itemsize: int = 1) -> list[memoryview]:
        """Return a list of ``n`` writable memoryviews that tile the buffer."""
        return [self.chunk(i, n, itemsize=itemsize) for i in range(n)]

    def view(self) -> memoryview:
        """Return a writable memoryview of the whole buffer.

        Raises ValueError if the buffer is closed.
        """
        self._check_open()
        return memoryview(self)

    def __repr__(self):
        state = "closed" if self.closed else f"size={len(self)}"
        return f"<fastfork.{type(self).__name__} {state} hugepages={self.hugepages}>"


class SharedBuffer(_MappedBuffer):
    """A shared, writable block of memory that children see and write in place.

    ``SharedBuffer(size, *, hugepages=False)``: ``size`` bytes, zero-filled,
    mapped MAP_SHARED (Linux: a close-on-exec memfd; elsewhere MAP_ANONYMOUS).
    Allocate it before forking; the parent and every child then share the
    same memory, and forking costs nothing extra for its size.
    ``hugepages=True`` advises MADV_HUGEPAGE (used only when the kernel's
    shmem THP mode allows it: /sys/kernel/mm/transparent_hugepage/shmem_enabled).
    ``hugepages`` tells whether the advice was given.

    Raises TypeError/ValueError for a bad size, OSError if the kernel refuses.
    """

    __module__ = "fastfork"

    def __new__(cls, size: int, *, hugepages: bool = False) -> Self:
        size = _check_size(size)
        _check_bool("hugepages", hugepages)
        memfd = getattr(os, "memfd_create", None)
        if memfd is None:
            self = super().__new__(cls, -1, size,
                                   flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            self._fd = -1
        else:
            fd = memfd("fastfork-shared", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                self = cls._map_fd(fd, size)
            except BaseException:
                os.close(fd)
                raise
        self.hugepages = _advise_hugepages(self) if hugepages else False
        return self

    @classmethod
    def _map_fd(cls, fd, size):
        """Map ``size`` bytes of the memfd ``fd``; the buffer owns ``fd`` from now on."""
        # Before 3.13 mmap keeps a private dup of fd (no way to see it);
        # trackfd=False (3.13+) spares that second descriptor.
        extra = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        self = mmap.mmap.__new__(cls, fd, size, flags=mmap.MAP_SHARED, **extra)
        self._fd = fd
        self.hugepages = False
        return self

    def fileno(self) -> int:
        """Return the memfd behind the buffer, or -1 if it is anonymous.

        Raises ValueError if the buffer is closed.
        """
        self._check_open()
        return self._fd

    def close(self) -> None:
        """Unmap the buffer and close its memfd; closing twice is harmless.

        Raises BufferError (and stays open) while a memoryview or array
        still refers to the memory.
        """
        super().close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __exit__(self, *exc_info: object) -> None:
        # mmap.__exit__ would skip the memfd.
        self.close()

    def __del__(self, _close=os.close):
        # A buffer dropped without close(): mmap unmaps itself, the memfd is ours.
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            _close(fd)


class PrivateBuffer(_MappedBuffer):
    """Private, copy-on-write memory that forks cheaply thanks to huge pages.

    ``PrivateBuffer(size, *, hugepages=True)``: ``size`` bytes, zero-filled,
    mapped MAP_PRIVATE | MAP_ANONYMOUS and advised MADV_HUGEPAGE. Children
    see a snapshot taken at fork; their writes are their own. With huge
    pages a fork copies one page-table entry per 2 MiB instead of per 4 KiB.
    ``hugepages`` tells whether the advice was given (THP must be in
    ``madvise`` or ``always`` mode to use it).

    Raises TypeError/ValueError for a bad size, OSError if the kernel refuses.
    """

    __module__ = "fastfork"

    def __new__(cls, size: int, *, hugepages: bool = True) -> Self:
        size = _check_size(size)
        _check_bool("hugepages", hugepages)
        self = super().__new__(cls, -1, size,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.hugepages = _advise_hugepages(self) if hugepages else False
        return self
