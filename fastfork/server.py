"""ForkServer: fork short Python tasks from a small, preloaded process.

A fork costs in proportion to the parent's memory (page tables are copied);
a big program that forks many short tasks pays that every time. A
``ForkServer`` is a fresh interpreter, started once, that imports the
``preload`` modules, calls ``gc.freeze()`` and then forks one child per
request -- each fork costs what forking that small process costs.

The server is exec'd (``sys.executable``), not forked from the caller: it is
small whenever it is created, and holds none of the caller's memory, threads,
locks or fds. The price is one interpreter start-up (~50-100 ms) and that
functions and arguments travel pickled: functions by reference (those of the
main script too: the server imports it once, as multiprocessing does), and
lambdas and closures by value when cloudpickle is installed (``_pickling``).
The child does not see the caller's state after the
server started; pass what it needs as arguments. A ``SharedBuffer`` passed as
an argument is shared for real: its memfd is sent along.

The caller and the server talk over a SOCK_SEQPACKET socketpair.

``map`` and ``as_completed`` run fastfork's C fan-out engine inside the
server (``_RemoteFanOut``): the server forks, reaps, times out and retries
the children itself, and the caller drives the engine one step per message
each way, sending the next items and receiving the finished outcomes -- no
message, fd or Python object per child, so a task costs about what it costs
``fastfork.map`` in a process of the server's size.

A single child (``start``, ``background``, the executor's tasks) has its
result pipe made by the caller, its write end passed to the server with
SCM_RIGHTS, so its result goes straight from the child to the caller. The
server sends the child's pidfd back, so the caller waits on and signals the
child through the pidfd (never a pid that could be recycled); the server
reaps the child and reports its exit status and rusage.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import select
import signal
import socket
import sys
import threading
import weakref
from typing import TYPE_CHECKING, TypeVar, overload

from fastfork import _core
from fastfork import _server_proto as proto
from fastfork import fanout
from fastfork._pickling import check_not_importing_main, check_pickler, pickle_call
from fastfork._checks import check_callable, check_timeout, poll_ms
from fastfork.child import (Child, _fd_lock, close_inherited_fds,
                            close_owned, own_fd, stop_all)
from fastfork.errors import ServerError, describe_status

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, Literal

    from typing_extensions import ParamSpec, Self

    from fastfork.executor import ForkExecutor

    P = ParamSpec("P")

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["ForkServer", "ServerChild"]

# The directory holding the fastfork package, put first on the server's path
# so that it runs this very fastfork whatever the caller's sys.path says.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_readable(fd, timeout=None):
    """Wait until ``fd`` is readable (or hung up); False if ``timeout`` seconds pass first.

    poll(), never select(): select() cannot watch an fd numbered 1024 or more.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(poll_ms(timeout)))


def _pidfd_exited(pidfd, timeout=0.0):
    """True if the process behind ``pidfd`` has exited (within ``timeout`` seconds)."""
    return _wait_readable(pidfd, timeout)


class _Connection:
    """One running server process: its socket, its handle, the replies due."""

    def __init__(self, preload, start_timeout):
        self.lock = threading.RLock()
        self.dead = False
        self.replies = {}                            # req_id -> None (waiting) or reply
        self.children = weakref.WeakValueDictionary()  # req_id -> ServerChild
        self.fan_outs = {}                           # fan_id -> _RemoteFanOut
        self.ids = itertools.count(1)
        self.process = None
        self.sock = None
        self.board = proto.Board()
        try:
            self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                own_fd(self.sock.fileno())
                self._launch(theirs)
            finally:
                theirs.close()
            proto.send(self.sock, ("init", list(sys.path), tuple(preload)), [self.board.fd])
            message = self._first_message(start_timeout)
        except BaseException:
            if self.sock is None:
                self.board.close()
            self.close(grace=0)
            raise
        if message[0] != "ready":
            self.close(grace=0)
            raise ServerError("the fork server failed to start:\n" + message[1])
        self.pid = message[1]

    def _launch(self, theirs):
        fd = theirs.fileno()
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
                f"from fastfork._server_main import main; sys.exit(main({fd}))")
        argv = [sys.executable, "-c", code]

        def exec_server():
            close_inherited_fds()
            os.set_inheritable(fd, True)
            os.execv(argv[0], argv)

        # PR_SET_PDEATHSIG fires when the *thread* that forked exits (prctl(2)),
        # so only a server started from the main thread gets it; otherwise the
        # server relies on seeing EOF on the socket when the caller dies.
        deathsig = signal.SIGKILL if threading.current_thread() is threading.main_thread() else 0
        registry = []
        _core.fork_call(exec_server, registry, deathsig)  # under _fd_lock
        self.process = Child(registry[0])

    def _first_message(self, timeout):
        if not _wait_readable(self.sock.fileno(), timeout):
            raise ServerError(f"the fork server did not start within {timeout} seconds")
        message, _, _ = proto.recv(self.sock)
        if message is None:
            self.process.wait(5)
            raise ServerError(f"the fork server {self.process.pid} "
                              f"{describe_status(self.process.returncode)} while starting")
        return message

    # ------------------------------------------------------------ messages

    def send(self, message, fds=()):
        """Send a message; ServerError if the server is gone."""
        if self.dead:
            raise ServerError(f"the fork server {self.pid} died")
        try:
            proto.send(self.sock, message, fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._mark_dead()
            raise ServerError(f"the fork server {self.pid} died") from exc

    def pump(self, until=None):
        """Read and dispatch the server's messages.

        Without ``until``, reads what is waiting and returns. With it, blocks
        until ``until()`` is true (returns True) or the server dies (False).
        """
        with self.lock:
            while True:
                if until is not None and until():
                    return True
                if self.dead:
                    return False
                try:
                    message, fds, _ = proto.recv(self.sock, block=False)
                except BlockingIOError:
                    if until is None:
                        return False
                    _wait_readable(self.sock.fileno())
                    continue
                except ConnectionResetError:
                    message, fds = None, []
                if message is None:
                    self._mark_dead()
                    continue
                self._dispatch(message, fds)

    def _dispatch(self, message, fds):
        kind, req_id = message[0], message[1]
        if kind in ("started", "failed"):
            if req_id in self.replies:
                self.replies[req_id] = (message, fds)
            elif kind == "started":
                # Its caller was interrupted before the reply came: nobody owns it.
                self._kill_orphan(req_id, fds)
        elif kind == "exited":
            child = self.children.get(req_id)
            if child is not None:
                child._status = (message[2], message[3])
        elif kind in ("stepped", "raised", "closed"):
            fan = self.fan_outs.get(req_id)
            if fan is not None:
                fan._deliver(message)

    def _kill_orphan(self, req_id, fds):
        if fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fds[0], signal.SIGKILL)
            for fd in fds:
                os.close(fd)
        else:
            with contextlib.suppress(ServerError):
                self.send(("signal", req_id, signal.SIGKILL))

    def _mark_dead(self):
        self.dead = True

    def interrupt(self):
        """Send the server the signal that cuts a fan-out's step short (see _server_proto)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(proto.INTERRUPT_SIGNAL)

    # ------------------------------------------------------------ requests

    def request_start(self, payload, buffer_fds, setup, print_traceback):
        """Ask the server to fork a child; return (req_id, pid, pidfd, result read fd).

        ``setup``: what the server prepares first (see ``_pickling``).

        Raises ServerError if the server is gone, OSError if its fork failed.
        """
        read_fd = write_fd = payload_fd = -1
        try:
            with _fd_lock:
                read_fd, write_fd = os.pipe()
                own_fd(read_fd)
                own_fd(write_fd)
            fds = [write_fd]
            inline = payload
            if len(payload) > proto.INLINE_MAX:
                payload_fd = os.memfd_create("fastfork-call", os.MFD_CLOEXEC)
                with os.fdopen(payload_fd, "wb", closefd=False) as f:
                    f.write(payload)
                fds.append(payload_fd)
                inline = None
            fds.extend(buffer_fds)
            with self.lock:
                req_id = next(self.ids)
                self.replies[req_id] = None
                try:
                    self.send(("start", req_id, inline, setup, print_traceback), fds)
                    # The fds are in flight now; our copies can go.
                    close_owned(write_fd)
                    write_fd = -1
                    if not self.pump(lambda: self.replies[req_id] is not None):
                        raise ServerError(f"the fork server {self.pid} died")
                finally:
                    reply = self.replies.pop(req_id)
                    if reply is not None and sys.exc_info()[0] is not None:
                        self._kill_orphan(req_id, reply[1])
            (kind, *rest), pidfds = reply
            if kind == "failed":
                raise OSError(rest[1], rest[2])
            pidfd = pidfds[0] if pidfds else -1
            fd, read_fd = read_fd, -1
            os.set_blocking(fd, False)
            return req_id, rest[1], pidfd, fd
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    close_owned(fd)
            if payload_fd >= 0:
                os.close(payload_fd)

    def close(self, grace=5.0):
        """Close the socket (the server kills its children and exits) and reap it."""
        with self.lock:
            self.dead = True
            if self.sock is not None:
                sock, self.sock = self.sock, None
                close_owned(sock.detach())
                self.board.close()
        if self.process is not None and not self.process.finished:
            with contextlib.suppress(Exception):
                self.process.wait(grace)
            self.process.stop(0)


# Items sent to the server beyond those it has drawn: a fan-out starts with
# ``jobs`` and doubles this, up to here, whenever the server runs out.
_MAX_AHEAD = 256


class _RemoteFanOut:
    """A fan-out run by the C engine inside the server, seen from here.

    It has the interface of ``_core.FanOut`` that ``fanout.drive_engine``
    drives, so the server's fan-outs keep the engine's contract: the
    children are forked, reaped, timed out and retried in the server, and
    each ``step`` is one message each way with the next items and the
    finished outcomes. Items are drawn from ``items`` a few ahead of the
    server's launches (see _MAX_AHEAD), each pickled as for ``start``.
    Raises from ``step`` what pickling an item raises (TypeError), OSError
    if the server's engine failed with one, ServerError if the server died.
    """

    def __init__(self, server, fn, items, jobs, timeout, grace, fork_retries, print_traceback,
                 stop_on_failure):
        self._server = server
        self._conn = None
        self._id = None
        self._fn = fn
        self._source = items
        self._options = (jobs, timeout, grace, fork_retries, print_traceback, stop_on_failure)
        self._ahead = jobs
        self._items = {}        # index -> item, from its sending until its outcome
        self._held = None       # an item drawn and pickled, left for the next message
        self._sent = 0
        self._drawn = 0         # how many the server's engine has drawn
        self._ended = False     # ``items`` is exhausted
        self._launching = True
        self._reply = None
        self._in_step = False   # a step was sent and not answered yet
        self._closed = False
        self._closed_by_server = False
        self._pending = None
        self.started = 0
        self.fork_error = None
        self.done_running = False

    @property
    def pending(self):
        """(index, item) of the item whose fork failed for good, or None."""
        return None if self._pending is None else (self._pending, self._items[self._pending])

    def unstarted(self):
        """Yield the items sent that the server never drew, then the rest of the input."""
        while self._drawn < self._sent:
            self._drawn += 1
            yield self._items.pop(self._drawn - 1)
        if self._held is not None:
            yield self._held[0]
        yield from self._source

    def stop_launching(self):
        """Start no more children; the running ones go on."""
        self._launching = False
        if self._conn is not None and not self._closed:
            self._conn.send(("stop", self._id))

    def step(self, until_done=False):
        """Run the server's engine one step; return its outcomes as _core.FanOut.step does."""
        options = None
        if self._conn is None:
            self._conn = self._server._connection()
            self._id = next(self._conn.ids)
            self._conn.fan_outs[self._id] = self
            options = self._options
        conn = self._conn
        batch, fds = self._next_items()
        self._reply = None
        self._in_step = True
        conn.send(("step", self._id, until_done, batch, self._ended, options), fds)
        if not conn.pump(lambda: self._reply is not None):
            raise ServerError(f"the fork server {conn.pid} died")
        self._in_step = False
        kind, _, *rest = self._reply
        if kind == "raised":
            code, text = rest
            if code is None:
                raise ServerError(f"the fork server's fan-out failed:\n{text}")
            raise OSError(code, text)
        (outcomes, need_items, self._drawn, self.started, self.done_running, fork_error,
         self._pending) = rest
        if fork_error is not None:
            self.fork_error = OSError(*fork_error)
        if need_items:
            self._ahead = min(2 * self._ahead, _MAX_AHEAD)
        items = self._items
        return [(index, items.pop(index), pid, returncode, kind, payload, timed_out, lost)
                for index, pid, returncode, kind, payload, timed_out, lost in outcomes]

    def _next_items(self):
        """Draw and pickle the items to send with the next step: (batch, their memfds)."""
        batch, fds = [], []
        while (self._launching and not self._ended
               and self._sent < self._drawn + self._ahead):
            if self._held is None:
                try:
                    item = next(self._source)
                except StopIteration:
                    self._ended = True
                    break
                self._held = (item, self._server._pickle(self._fn, (item,), {}))
            item, (payload, buffer_fds, setup) = self._held
            if batch and len(fds) + len(buffer_fds) >= proto.MAX_FDS:
                break  # one fd is left for a message too large for a packet
            self._held = None
            self._items[self._sent] = item
            self._sent += 1
            batch.append((payload, len(buffer_fds), setup))
            fds.extend(buffer_fds)
        return batch, fds

    def _deliver(self, message):
        """Take the server's message about this fan-out (under the connection's lock)."""
        if message[0] == "closed":
            self._closed_by_server = True
        elif not self._closed:
            self._reply = message

    def close(self, grace):
        """Stop every running child (``grace`` as in _core.FanOut.close) and forget the fan-out.

        Blocks until the server has reaped them; an exception meanwhile
        (a second Ctrl-C) cuts the grace short, and is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn is None:
            return  # nothing reached the server
        try:
            self._close_remote(conn, grace)
        finally:
            with conn.lock:
                conn.board.clear(self._id)
                conn.fan_outs.pop(self._id, None)

    def _close_remote(self, conn, grace):
        with conn.lock:
            if conn.dead:
                return  # its children died with it
            # A step still out may be blocked in the engine: post, then signal.
            interrupt = self._in_step and conn.board.post(self._id)
            try:
                conn.send(("close", self._id, grace))
            except ServerError:
                return  # it died just now: its children die with it
        if interrupt:
            conn.interrupt()
        error = None
        while True:
            try:
                conn.pump(lambda: self._closed_by_server)
                break
            except BaseException as exc:
                if error is None:
                    error = exc
                    with conn.lock:
                        hurry = conn.board.post(-self._id)
                    if hurry:
                        conn.interrupt()
        if error is not None:
            raise error


class ServerChild(fanout.FunctionChild[R]):
    """A child forked by a ForkServer: the same interface as FunctionChild.

    It is not this process's child: its pidfd came from the server (which
    opened it before it could reap the pid) and the server reports its exit
    status and rusage. ``server_died`` is True if the server died before
    reporting; ``result()`` then raises ServerError.
    """

    server_died: bool

    def __init__(self, connection: _Connection, req_id: int, pid: int, pidfd: int,
                 result_fd: int, *, index: int | None = None, item: object = None) -> None:
        self._conn = connection
        self._req_id = req_id
        self._status = None
        self.server_died = False
        self._reaps_own_pid = False  # the server reaps it; only our fds are ours
        # The server's pidfd, opened before it could reap the pid (-1: none):
        # one opened here by pid might already name another process.
        super().__init__(pid, result_fd, index=index, item=item, pidfd=pidfd)

    def _try_reap(self):
        """Finish the child once the server has reported it; True once finished."""
        if self._finished:
            return True
        conn = self._conn
        conn.pump()
        if self._status is None and self._pidfd >= 0 and _pidfd_exited(self._pidfd):
            # It has exited: the server reaps it and reports at once.
            conn.pump(lambda: self._status is not None)
        if self._status is None:
            if not conn.dead:
                return False
            # The server died; its children get SIGKILL (PR_SET_PDEATHSIG).
            if self._pidfd >= 0 and not _pidfd_exited(self._pidfd, 5.0):
                return False
            self.lost = self.server_died = True
        else:
            self.returncode, self.rusage = self._status
            self.lost = self.returncode is None
        self._close_pidfd()
        self._finish()
        self._finished = True
        return True

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child (through its pidfd, or through the server)."""
        self._check_owner()
        if self._finished:
            return
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)
        elif not self._conn.dead:
            with contextlib.suppress(ServerError):
                self._conn.send(("signal", self._req_id, int(sig)))

    def _decode(self):
        if self.server_died and self._frame.frame() is None:
            return False, ServerError(
                f"the fork server {self._conn.pid} died before child {self.pid} "
                f"reported{'' if self.index is None else f' (item {self.index})'}")
        return super()._decode()


class ForkServer:
    """A small preloaded process that forks the children for ``start``/``map``.

    ``ForkServer(preload=(), *, start_timeout=60.0, pickler=None)``:
    ``preload`` names modules the server imports once, before ``gc.freeze()``;
    every child finds them imported. ``pickler``: None pickles calls with the
    standard pickle (functions by reference; those of the main script are
    found by importing it in the server) and, when cloudpickle is installed,
    sends what that refuses (lambdas, closures) by value; "pickle" never uses
    cloudpickle; "cloudpickle" always does. The server starts on ``open()``, on entering ``with``, or
    lazily on first use; create it early (its start-up takes one interpreter
    launch). ``close()`` (or leaving ``with``) stops every child it made and
    the server; the object cannot be used after that. If this process dies,
    the server and its children die too. If the server dies, calls in flight
    fail with ServerError and the next call starts a new server.

    Raises TypeError for a bad ``preload`` or ``pickler``, ValueError for an
    unknown ``pickler``, ImportError for "cloudpickle" when it is not installed.
    """

    __module__ = "fastfork"

    def __init__(self, preload: Iterable[str] = (), *, start_timeout: float = 60.0,
                 pickler: str | None = None) -> None:
        if isinstance(preload, (str, bytes)):
            raise TypeError("preload must be a sequence of module names, not a single string")
        preload = tuple(preload)
        for name in preload:
            if not isinstance(name, str):
                raise TypeError(f"preload names must be str, not {type(name).__name__}")
        self._preload = preload
        self._start_timeout = check_timeout(start_timeout, "start_timeout", allow_zero=False)
        self._pickler = check_pickler(pickler)
        self._lock = threading.Lock()
        self._conn = None
        self._closed = False
        self._owner = os.getpid()
        self._children: weakref.WeakSet[ServerChild[Any]] = weakref.WeakSet()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._conn is None or self._conn.dead:
            state = "not running"
        else:
            state = f"pid={self._conn.pid}"
        return f"<fastfork.ForkServer {state} preload={self._preload!r}>"

    @property
    def pid(self) -> int | None:
        """The server's pid, or None when it is not running."""
        conn = self._conn
        return None if conn is None or conn.dead else conn.pid

    def _check_usable(self):
        if os.getpid() != self._owner:
            raise RuntimeError(f"this ForkServer belongs to process {self._owner}")
        if self._closed:
            raise ValueError("the ForkServer is closed")

    def _connection(self):
        """The running server, started (or restarted after it died) if need be."""
        self._check_usable()
        check_not_importing_main("a ForkServer")
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.dead:
                conn.pump()  # notice a server that died while idle
            if conn is None or conn.dead:
                if conn is not None:
                    conn.close(grace=0)
                self._conn = conn = _Connection(self._preload, self._start_timeout)
            return conn

    def open(self) -> Self:
        """Start the server now (if it is not running); return self.

        Raises ServerError if it cannot start (e.g. a preload import fails;
        the server's traceback is in the message).
        """
        self._connection()
        return self

    def close(self, grace: float = 1.0) -> None:
        """Stop every child this server made (SIGTERM, ``grace`` s, SIGKILL) and the server.

        Closing twice is harmless.
        """
        if os.getpid() != self._owner:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conn, self._conn = self._conn, None
        children = [c for c in list(self._children) if not c.finished]
        if children and conn is not None and not conn.dead:
            stop_all(children, grace)
        if conn is not None:
            conn.close()
        for child in children:
            child._try_reap()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ the fan-out API

    def start_child(self, fn: Callable[..., R], args: Iterable[Any] = (),
                    kwargs: dict[str, Any] | None = None, *, die_with_parent: bool = True,
                    print_traceback: bool = False, index: int | None = None,
                    item: object = None, launched: list[Any] | None = None) -> ServerChild[R]:
        """Have the server fork a child that runs ``fn(*args, **kwargs)``; return its ServerChild.

        Like ``fastfork.start_child``; the child always dies with the server
        and the server with this process (``die_with_parent`` is accepted for
        the same signature). Raises TypeError for a non-callable or what
        cannot be pickled (see ``pickler``), before anything is sent or
        forked; ServerError if the server dies; OSError if its fork fails.
        """
        check_callable(fn)
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
        return self._start_pickled(self._pickle(fn, tuple(args), kwargs), print_traceback,
                                   index, item, launched)

    def _pickle(self, fn, args, kwargs):
        """Pickle a call for this server: (payload, SharedBuffer fds, setup steps).

        Raises TypeError if it cannot travel (see ``pickler``).
        """
        return pickle_call(fn, args, kwargs, self._pickler)

    def _start_pickled(self, pickled, print_traceback=False, index=None, item=None,
                       launched=None):
        """start_child for a call pickled by ``_pickle``."""
        payload, buffer_fds, setup = pickled
        conn = self._connection()
        req_id, pid, pidfd, result_fd = conn.request_start(payload, buffer_fds, setup,
                                                           print_traceback)
        try:
            child: ServerChild[R] = ServerChild(conn, req_id, pid, pidfd, result_fd,
                                                index=index, item=item)
        except BaseException:
            conn._kill_orphan(req_id, [pidfd] if pidfd >= 0 else [])
            close_owned(result_fd)
            raise
        if launched is not None:
            launched.append(child)  # first, so that a caller interrupted now still stops it
        with conn.lock:
            conn.children[req_id] = child
        self._children.add(child)
        return child

    def start(self, fn: Callable[P, R], /, *args: P.args,
              **kwargs: P.kwargs) -> ServerChild[R]:
        """Run ``fn(*args, **kwargs)`` in a child of the server; return its ServerChild."""
        return self.start_child(fn, args, kwargs)

    @overload
    def as_completed(self, fn: Callable[[T], R], iterable: Iterable[T], *,
                     jobs: int | None = None, timeout: float | None = None,
                     return_exceptions: Literal[False] = False, fork_retries: int = 8,
                     grace: float = 1.0, print_traceback: bool = False,
                     chunksize: int = 1) -> Iterator[tuple[int, R]]: ...

    @overload
    def as_completed(self, fn: Callable[[T], R], iterable: Iterable[T], *,
                     jobs: int | None = None, timeout: float | None = None,
                     return_exceptions: Literal[True], fork_retries: int = 8, grace: float = 1.0,
                     print_traceback: bool = False,
                     chunksize: int = 1) -> Iterator[tuple[int, R | BaseException]]: ...

    @overload
    def as_completed(self, fn: Callable[[T], R], iterable: Iterable[T], *,
                     jobs: int | None = None, timeout: float | None = None,
                     return_exceptions: bool, fork_retries: int = 8, grace: float = 1.0,
                     print_traceback: bool = False,
                     chunksize: int = 1) -> Iterator[tuple[int, R | BaseException]]: ...

    def as_completed(self, fn: Callable[[T], R], iterable: Iterable[T], *,
                     jobs: int | None = None, timeout: float | None = None,
                     return_exceptions: bool = False, fork_retries: int = 8, grace: float = 1.0,
                     print_traceback: bool = False,
                     chunksize: int = 1) -> Iterator[tuple[int, R | BaseException]]:
        """``fastfork.as_completed`` with the children forked by the server.

        Yields (index, result) as children finish; ``chunksize``, ``timeout``
        (ChildTimeout) and the rest as in ``fastfork.as_completed``. Items
        travel to the server in batches, so they are drawn from ``iterable``
        a little ahead of the children that run them (at most a few hundred).
        The children always die with the server, and the server with this
        process. Raises TypeError if ``fn`` cannot be sent to the server,
        before anything starts; ServerError if the server dies meanwhile
        (every running child is stopped first).
        """
        return self._fan_out(False, fn, iterable, jobs=jobs, timeout=timeout,
                             return_exceptions=return_exceptions, fork_retries=fork_retries,
                             grace=grace, print_traceback=print_traceback, chunksize=chunksize)

    def _fan_out(self, until_done, fn, iterable, **options):
        """as_completed (``until_done`` False) or map's fan-out, run by the server's engine."""
        self._check_usable()
        self._pickle(fn, (), {})  # TypeError now if fn cannot travel
        return fanout._fan_out(functools.partial(self._run_remotely, until_done=until_done),
                               fn, iterable, die_with_parent=True, **options)

    def _run_remotely(self, fn, items, return_exceptions, print_traceback, *, jobs, timeout,
                      fork_retries, grace, die_with_parent, until_done):
        """as_completed over the iterator ``items`` on the server's engine (see _RemoteFanOut)."""
        engine = _RemoteFanOut(self, fn, items, jobs, timeout, grace, fork_retries,
                               print_traceback, not return_exceptions)
        yield from fanout.drive_engine(engine, engine.unstarted(), return_exceptions,
                                       until_done, grace)

    @overload
    def map(self, fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
            timeout: float | None = None, return_exceptions: Literal[False] = False,
            fork_retries: int = 8, grace: float = 1.0, print_traceback: bool = False,
            chunksize: int = 1) -> list[R]: ...

    @overload
    def map(self, fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
            timeout: float | None = None, return_exceptions: Literal[True], fork_retries: int = 8,
            grace: float = 1.0, print_traceback: bool = False,
            chunksize: int = 1) -> list[R | BaseException]: ...

    @overload
    def map(self, fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
            timeout: float | None = None, return_exceptions: bool, fork_retries: int = 8,
            grace: float = 1.0, print_traceback: bool = False,
            chunksize: int = 1) -> list[R | BaseException]: ...

    def map(self, fn: Callable[[T], R], iterable: Iterable[T], *, jobs: int | None = None,
            timeout: float | None = None, return_exceptions: bool = False, fork_retries: int = 8,
            grace: float = 1.0, print_traceback: bool = False,
            chunksize: int = 1) -> list[R] | list[R | BaseException]:
        """``fastfork.map`` with the children forked by the server.

        Returns the results in input order; ChildError on a failed item (or,
        with ``return_exceptions``, the error in its place). Raises ServerError
        if the server dies meanwhile (every running child is stopped first).
        """
        # Like fastfork.map, the engine runs every child before results are decoded.
        return fanout.in_input_order(self._fan_out(
            True, fn, iterable, jobs=jobs, timeout=timeout, return_exceptions=return_exceptions,
            fork_retries=fork_retries, grace=grace, print_traceback=print_traceback,
            chunksize=chunksize))

    def executor(self, max_workers: int | None = None, **options: Any) -> ForkExecutor:
        """Return a ``fastfork.ForkExecutor`` whose tasks this server forks.

        ``options``: ``timeout`` and ``grace`` as for ForkExecutor. Shutting
        the executor down leaves the server running; several executors may
        share it. Raises TypeError/ValueError for bad arguments.
        """
        from fastfork.executor import ForkExecutor
        self._check_usable()
        return ForkExecutor(max_workers, server=self, **options)

    @contextlib.contextmanager
    def background(self, fn: Callable[..., R], /, *args: Any,
                   kwargs: dict[str, Any] | None = None, stop_signal: int = signal.SIGTERM,
                   grace: float = 5.0) -> Iterator[ServerChild[R]]:
        """``fastfork.background`` with the child forked by the server."""
        check_callable(fn)
        grace = check_timeout(grace, "grace")
        stop_signal = signal.Signals(stop_signal)
        child = self.start_child(fn, args, kwargs)
        try:
            yield child
        finally:
            stop_all([child], grace, sig=stop_signal)
