"""Process and fd accounting shared by the tests: children, zombies, open fds.

Also ``run_python``: run code in a fresh interpreter that imports the same
fastfork as this test session (for tests that change process-wide state).
"""
import os
import signal
import stat
import subprocess
import sys
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
