"""SharedBuffer / PrivateBuffer: allocation, buffer protocol, chunks, fork visibility."""
import mmap
import os
import pickle
import struct

import pytest

import fastfork
from fastfork.shared import PrivateBuffer, SharedBuffer

BUFFERS = [SharedBuffer, PrivateBuffer]


def fork_and_run(fn, reaper):
    """Fork a child that runs fn() and always _exits (0 ok, 1 on exception)."""
    pid = fastfork.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    reaper.append(pid)
    return pid


def wait_ok(pid):
    _, status = fastfork.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def mapped_names():
    with open("/proc/self/maps") as f:
        return f.read()


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("cls", BUFFERS)
@pytest.mark.parametrize("size,exc", [
    (0, ValueError), (-1, ValueError), (1.5, TypeError), ("10", TypeError),
    (None, TypeError), (True, TypeError)])
def test_bad_size(cls, size, exc):
    with pytest.raises(exc):
        cls(size)


@pytest.mark.parametrize("cls", BUFFERS)
def test_bad_hugepages_flag(cls):
    with pytest.raises(TypeError):
        cls(10, hugepages=1)


def test_accepts_index_like_size():
    class N:
        def __index__(self):
            return 16
    with SharedBuffer(N()) as buf:
        assert len(buf) == 16


# ---------------------------------------------------------------- buffer protocol

@pytest.mark.parametrize("cls", BUFFERS)
def test_zero_filled_and_buffer_protocol(cls):
    with cls(4096) as buf:
        assert isinstance(buf, mmap.mmap)
        assert len(buf) == 4096
        assert buf[:] == bytes(4096)
        with memoryview(buf) as mv:
            assert mv.nbytes == 4096 and not mv.readonly
            mv[10:13] = b"abc"
        assert buf[10:13] == b"abc"
        struct.pack_into("<qd", buf, 100, -7, 2.5)
        assert struct.unpack_from("<qd", buf, 100) == (-7, 2.5)
        buf[0:2] = b"hi"
        assert bytes(buf[0:2]) == b"hi"


@pytest.mark.parametrize("cls", BUFFERS)
def test_numpy_frombuffer(cls):
    np = pytest.importorskip("numpy")
    with cls(8 * 100) as buf:
        arr = np.frombuffer(buf, dtype=np.int64)
        arr[:] = np.arange(100)
        assert struct.unpack_from("<q", buf, 8 * 42)[0] == 42
        # An array still refers to the memory: close must refuse, not unmap.
        with pytest.raises(BufferError):
            buf.close()
        assert not buf.closed
        del arr


def test_shared_memfd_is_close_on_exec():
    with SharedBuffer(100) as buf:
        fd = buf.fileno()
        if fd == -1:
            pytest.skip("no memfd_create here")
        assert not os.get_inheritable(fd)
        assert "memfd:fastfork-shared" in mapped_names()
    assert "memfd:fastfork-shared" not in mapped_names()


def test_not_picklable():
    with SharedBuffer(10) as buf, pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(buf)


@pytest.mark.parametrize("cls", BUFFERS)
def test_hugepages_attribute(cls):
    with cls(4 << 20, hugepages=True) as buf:
        assert buf.hugepages is (hasattr(mmap, "MADV_HUGEPAGE"))
        assert "hugepages=" in repr(buf)
    with cls(4096, hugepages=False) as buf:
        assert buf.hugepages is False


# ---------------------------------------------------------------- chunks

@pytest.mark.parametrize("size,n,itemsize", [
    (1000, 3, 1), (1000, 3, 8), (7, 7, 1), (5, 8, 1), (4096, 1, 4), (803, 4, 8)])
def test_chunks_tile_the_buffer(size, n, itemsize):
    with SharedBuffer(size) as buf:
        bounds = [buf.bounds(i, n, itemsize=itemsize) for i in range(n)]
        assert bounds[0][0] == 0
        for (a, b), (c, _) in zip(bounds, bounds[1:]):
            assert b == c
        assert bounds[-1][1] == (size // itemsize) * itemsize
        lengths = [b - a for a, b in bounds]
        assert all(length % itemsize == 0 for length in lengths)
        assert max(lengths) - min(lengths) <= itemsize
        views = buf.chunks(n, itemsize=itemsize)
        try:
            assert [v.nbytes for v in views] == lengths
            for i, v in enumerate(views):
                v[:] = bytes([i + 1]) * v.nbytes
            for i, (a, b) in enumerate(bounds):
                assert buf[a:b] == bytes([i + 1]) * (b - a)
        finally:
            for v in views:
                v.release()


@pytest.mark.parametrize("args,kwargs,exc", [
    ((0, 0), {}, ValueError), ((3, 3), {}, ValueError), ((-1, 3), {}, ValueError),
    ((0, 2), {"itemsize": 0}, ValueError), ((0.0, 2), {}, TypeError),
    ((0, "2"), {}, TypeError), ((True, 2), {}, TypeError)])
def test_bad_chunk_arguments(args, kwargs, exc):
    with SharedBuffer(64) as buf, pytest.raises(exc):
        buf.chunk(*args, **kwargs)


# ---------------------------------------------------------------- close

@pytest.mark.parametrize("cls", BUFFERS)
def test_use_after_close_is_a_clear_error(cls):
    buf = cls(64)
    buf.close()
    assert buf.closed
    buf.close()  # twice is harmless
    assert "closed" in repr(buf)
    for use in (lambda: buf.chunk(0, 1), lambda: buf.view(), lambda: buf.bounds(0, 1),
                lambda: buf[0], lambda: memoryview(buf)):
        with pytest.raises(ValueError, match="closed"):
            use()
    if cls is SharedBuffer:
        with pytest.raises(ValueError, match="closed"):
            buf.fileno()


def test_close_refused_while_a_chunk_is_alive():
    buf = SharedBuffer(64)
    view = buf.chunk(0, 2)
    with pytest.raises(BufferError):
        buf.close()
    view[0] = 1
    view.release()
    buf.close()
    assert buf.closed


def test_dropped_buffer_releases_its_memfd():
    fds = set(os.listdir("/proc/self/fd"))
    buf = SharedBuffer(64)
    del buf
    assert set(os.listdir("/proc/self/fd")) <= fds


# ---------------------------------------------------------------- across fork

def test_children_write_their_own_chunks(reaper):
    n = 4
    with SharedBuffer(8 * 1000) as buf:
        pids = []
        for i in range(n):
            def work(i=i):
                with buf.chunk(i, n, itemsize=8) as mine:
                    for k in range(0, mine.nbytes, 8):
                        struct.pack_into("<q", mine, k, i * 1_000_000 + os.getpid())
            pids.append(fork_and_run(work, reaper))
        for pid in pids:
            wait_ok(pid)
        for i, pid in enumerate(pids):
            a, b = buf.bounds(i, n, itemsize=8)
            values = {v for (v,) in struct.iter_unpack("<q", buf[a:b])}
            assert values == {i * 1_000_000 + pid}


def test_parent_writes_after_fork_are_seen_by_child(reaper):
    with SharedBuffer(16) as buf:
        r, w = os.pipe()
        try:
            def work():
                os.read(r, 1)  # wait until the parent has written
                assert buf[0:5] == b"later"
                buf[8:10] = b"ok"
            pid = fork_and_run(work, reaper)
            buf[0:5] = b"later"
            os.write(w, b"x")
            wait_ok(pid)
            assert buf[8:10] == b"ok"
        finally:
            os.close(r)
            os.close(w)


def test_private_buffer_is_copy_on_write(reaper):
    with PrivateBuffer(1 << 20) as buf:
        buf[0:6] = b"parent"

        def work():
            assert buf[0:6] == b"parent"
            buf[0:6] = b"child!"
            assert buf[0:6] == b"child!"
        wait_ok(fork_and_run(work, reaper))
        assert buf[0:6] == b"parent"


def test_numpy_children_fill_rows(reaper):
    np = pytest.importorskip("numpy")
    rows, cols = 4, 1000
    with SharedBuffer(rows * cols * 8) as buf:
        pids = []
        for i in range(rows):
            def work(i=i):
                with buf.chunk(i, rows, itemsize=cols * 8) as mine:
                    np.frombuffer(mine, dtype=np.float64)[:] = np.arange(cols) * i
            pids.append(fork_and_run(work, reaper))
        for pid in pids:
            wait_ok(pid)
        arr = np.frombuffer(buf, dtype=np.float64).reshape(rows, cols)
        try:
            assert (arr == np.outer(np.arange(rows), np.arange(cols))).all()
        finally:
            del arr
