"""Process and fd accounting shared by the tests: children, zombies, open fds.

Also ``run_python``: run code in a fresh interpreter that imports the same
fastfork as this test session (for tests that change process-wide state), and
``Ready``: how a test waits for its children to be ready, without sleeping.
"""
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import fastfork

# The directory holding the fastfork package under test, for child interpreters.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastfork.__file__)))


def children(pid=None):
    """Return the set of pids whose parent is ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    found = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(p) for p in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def descendants(pid=None):
    """Return every pid below ``pid`` in the process tree."""
    todo, seen = list(children(pid)), set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children(p))
    return seen


def state(pid):
    """Return the /proc state letter of ``pid`` ('Z' for a zombie), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def zombies(pids):
    """Return the subset of ``pids`` that are zombies."""
    return {p for p in pids if state(p) == "Z"}


def open_fds():
    """Return the set of fd numbers open in this process."""
    # listdir's own fd is closed again by the time the result is read: drop
    # entries that no longer exist.
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(fd))
        except OSError:
            continue
        fds.add(int(fd))
    return fds


def pipe_inodes():
    """Return the inodes of the pipes this process holds open."""
    found = set()
    for fd in open_fds():
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode):
            found.add(st.st_ino)
    return found


def tcp_socket_fds():
    """Return the fds of this process that are TCP sockets (IPv4 or IPv6).

    fastfork itself never opens one; a Dask client's connection pool does.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # the header
                inodes.update(line.split()[9] for line in f)
        except (FileNotFoundError, StopIteration):
            pass
    found = set()
    for fd in open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            found.add(fd)
    return found


def kill_and_reap(pids, timeout=5.0):
    """SIGKILL and reap ``pids`` (our children); return those that were alive."""
    alive = set()
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
            alive.add(p)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for p in pids:
        while True:
            try:
                if os.waitpid(p, os.WNOHANG)[0] or time.monotonic() > deadline:
                    break
            except ChildProcessError:
                break
            time.sleep(0.001)
    return alive


class Ready:
    """A named pipe that children write a byte to once they are ready; the test waits on it.

    Tests synchronise on this instead of sleeping. A forked child calls
    ``ready.signal()`` (it inherited the write end); any other process (a fork
    server's child, an exec'd program) writes a byte to ``ready.path``, e.g.
    with ``signal_ready(path)`` or ``echo > "$path"``. Use as a context manager.
    """

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="fastfork-ready-")
        self.path = os.path.join(self._dir, "ready")
        os.mkfifo(self.path)
        # Holding a write end ourselves: a writer that closes never makes it EOF.
        self._r = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._w = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)

    def signal(self):
        """In a forked child: say it is ready."""
        os.write(self._w, b".")

    def wait(self, count=1, timeout=60.0):
        """Wait until ``count`` children have said they are ready; fail the test after ``timeout``."""
        got = 0
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._r, select.POLLIN)
        while got < count:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise AssertionError(f"{got} of {count} children were ready after {timeout} s")
            try:
                got += len(os.read(self._r, count - got))
            except BlockingIOError:
                pass

    def close(self):
        os.close(self._r)
        os.close(self._w)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def signal_ready(path):
    """From any process: write the byte that ``Ready.wait`` counts to ``path``."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


def wait_readable(fd, timeout=60.0):
    """Wait until ``fd`` has data to read; fail the test after ``timeout``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise AssertionError(f"fd {fd} had nothing to read after {timeout} s")


def child_env(env=None, unbuffered=True):
    """The environment of a child interpreter that imports this fastfork.

    ``unbuffered=False`` removes PYTHONUNBUFFERED, for stdio flushing tests;
    ``env`` entries are added last.
    """
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT, os.path.dirname(os.path.abspath(__file__))]
        + ([result["PYTHONPATH"]] if result.get("PYTHONPATH") else []))
    if not unbuffered:
        result.pop("PYTHONUNBUFFERED", None)
    if env:
        result.update(env)
    return result


def run_python(code, *, env=None, timeout=60, check=False, input=None, unbuffered=True):
    """Run ``code`` in a fresh interpreter importing this fastfork.

    Returns the CompletedProcess (text mode); see child_env for ``env`` and
    ``unbuffered``.
    """
    return subprocess.run(
        [sys.executable, "-c", code], env=child_env(env, unbuffered), timeout=timeout,
        check=check, capture_output=True, text=True, input=input)


def wait_ended(pids, timeout=30.0):
    """Wait until none of ``pids`` (anyone's processes) runs; return those still running.

    Ended means gone or a zombie: an orphan's zombie waits for init to reap it.
    """
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in pids if state(p) not in (None, "Z")]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.005)
