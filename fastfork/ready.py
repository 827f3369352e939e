"""Readiness probes for ``fastfork.service``: when has a service started?

Entering ``with fastfork.service(..., ready=probe)`` returns once the probe says so:

- ``port(8000)``: a TCP connection to 127.0.0.1:8000 succeeds (``host=`` for
  another address); ``port("/run/app.sock")``: a connection to a Unix socket.
- ``line(r"Listening on (\\d+)")``: a line of the service's output (stdout or
  stderr) matches; the match object becomes the handle's ``ready_result``.
- ``notify()``: a Python service says so itself by calling ``signal_ready()``.
- a callable: called with no arguments until it returns something truthy,
  which becomes ``ready_result``; an OSError it raises (connection refused,
  a URLError) counts as "not yet".

``free_port()`` picks a free TCP port to give the service.
"""
from __future__ import annotations

import os
import re
import socket

from fastfork.child import _fd_lock, close_owned, own_fd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Union

    from typing_extensions import TypeAlias

    Pattern: TypeAlias = Union[str, bytes, "re.Pattern[str]", "re.Pattern[bytes]"]

__all__ = ["Probe", "port", "line", "notify", "signal_ready", "free_port"]

# A connection attempt that neither succeeds nor fails takes at most this long
# (a remote host that drops packets); the service's ready timeout still applies.
_CONNECT_TIMEOUT = 1.0

# line() reads the output in pieces of this size, stopping at the first match.
_LINE_CHUNK = 1 << 20

# In a service started with ready=notify(): the write end of the pipe to the parent.
_notify_fd = -1


class Probe:
    """A way to tell that a service is ready; made by port(), line() and notify()."""

    def _watch(self, service):
        """Return a fresh _Watch following one start of ``service``."""
        raise NotImplementedError


class _Watch:
    """One start's view of a probe; ``check()`` gives the ready value or None."""

    fds = ()          # fds to poll: readable means "check again now"
    child_fd = -1     # an fd the service needs (notify's write end)
    last_error = None  # the last failed attempt (an OSError), for error messages

    def check(self):
        """Return the ready value, or None while the service is not ready."""
        raise NotImplementedError

    def started(self):
        """The service process exists: drop what only it needed."""

    def close(self):
        """Release what the watch holds."""


# ---------------------------------------------------------------- port

class _Port(Probe, _Watch):
    def __init__(self, address):
        self.address = address  # a Unix socket's path, or (host, port)

    def __str__(self):
        if isinstance(self.address, str):
            return f"Unix socket {self.address}"
        return "TCP port {}:{}".format(*self.address)

    def _watch(self, service):
        return _Port(self.address)

    def check(self):
        try:
            if isinstance(self.address, str):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(_CONNECT_TIMEOUT)
                    sock.connect(self.address)
            else:
                socket.create_connection(self.address, timeout=_CONNECT_TIMEOUT).close()
        except OSError as exc:
            self.last_error = exc
            return None
        return self.address


def port(port: int | str | os.PathLike[str], host: str = "127.0.0.1") -> Probe:
    """Ready once a connection to ``host``:``port`` succeeds; ready_result is (host, port).

    ``port`` may also be a Unix socket's path (str or os.PathLike; ``host``
    is then unused): ready once a connection to it succeeds.
    Raises TypeError/ValueError for a bad port or host.
    """
    if isinstance(port, (str, os.PathLike)):
        path = os.fspath(port)
        if not path or "\0" in path:
            raise ValueError(f"bad Unix socket path: {port!r}")
        return _Port(path)
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int or a Unix socket path, not {type(port).__name__}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, not {port}")
    if not isinstance(host, str) or not host:
        raise TypeError(f"host must be a non-empty str, not {host!r}")
    return _Port((host, port))


# ---------------------------------------------------------------- line

class _Line(Probe):
    def __init__(self, pattern):
        self.pattern = pattern

    def __str__(self):
        return f"a line matching {self.pattern.pattern!r}"

    def _watch(self, service):
        return _LineWatch(self.pattern, service)


class _LineWatch(_Watch):
    """Reads the service's output file as it grows; matches complete lines only."""

    def __init__(self, pattern, service):
        self._pattern = pattern
        self._text = isinstance(pattern.pattern, str)
        self._service = service
        self._offset = 0
        self._partial = b""   # the last line, until its newline arrives

    def check(self):
        while True:
            data = self._service._output_from(self._offset, _LINE_CHUNK)
            if not data:
                return None
            self._offset += len(data)
            end = data.rfind(b"\n")
            if end < 0:
                self._partial += data
                continue
            block = self._partial + data[:end]
            self._partial = data[end + 1:]
            if self._text:
                lines = block.decode("utf-8", "replace").split("\n")
            else:
                lines = block.split(b"\n")
            for text in lines:
                match = self._pattern.search(text)
                if match:
                    return match


def line(pattern: Pattern, flags: int = 0) -> Probe:
    """Ready once a complete line of the service's output matches ``pattern`` (re.search).

    ``pattern``: a str (matched against the line decoded as UTF-8) or bytes,
    or a compiled pattern. ready_result is the match object.
    Raises TypeError/ValueError for a bad pattern.
    """
    if not isinstance(pattern, (str, bytes, re.Pattern)):
        raise TypeError(f"pattern must be str, bytes or re.Pattern, not {type(pattern).__name__}")
    try:
        compiled = re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"bad pattern {pattern!r}: {exc}") from exc
    return _Line(compiled)


# ---------------------------------------------------------------- notify

class _Notify(Probe):
    def __str__(self):
        return "the service to call fastfork.ready.signal_ready()"

    def _watch(self, service):
        return _NotifyWatch()


class _NotifyWatch(_Watch):
    """A pipe the service writes one line to when it is ready."""

    def __init__(self):
        with _fd_lock:  # no fastfork child may inherit the pipe before it is owned
            read_end, write_end = os.pipe()
            self.fds = (own_fd(read_end),)
            self.child_fd = own_fd(write_end)
        os.set_blocking(read_end, False)
        self._received = b""

    def check(self):
        if not self.fds:
            return None
        try:
            data = os.read(self.fds[0], 4096)
        except BlockingIOError:
            return None
        if not data:
            self._close_read_end()  # the service closed it without a word; it may exit
            return None
        self._received += data
        message, newline, _ = self._received.partition(b"\n")
        return message.decode("utf-8", "replace") if newline else None

    def started(self):
        if self.child_fd >= 0:
            close_owned(self.child_fd)
            self.child_fd = -1

    def _close_read_end(self):
        if self.fds:
            close_owned(self.fds[0])
            self.fds = ()

    def close(self):
        self.started()
        self._close_read_end()


def notify() -> Probe:
    """Ready once the service calls ``fastfork.ready.signal_ready()``: for a Python callable.

    ready_result is the message given to signal_ready ("" by default).
    """
    return _Notify()


def signal_ready(message: str = "") -> bool:
    """Tell the parent that this service is ready (a service started with ready=notify()).

    ``message``, one line of text, becomes the handle's ready_result (a port
    the service picked, for instance). Returns True once told; False when
    this process is no such service, or has signalled already.
    Raises TypeError/ValueError for a message that is not one line of text.
    """
    global _notify_fd
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, not {type(message).__name__}")
    if "\n" in message:
        raise ValueError("message must be a single line")
    fd, _notify_fd = _notify_fd, -1
    if fd < 0:
        return False
    data = (message + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except BrokenPipeError:
        return False  # the parent has gone
    finally:
        close_owned(fd)
    return True


def _set_notify_fd(fd):
    """In a freshly forked service: where signal_ready() writes (-1: nowhere)."""
    global _notify_fd
    _notify_fd = fd


# ---------------------------------------------------------------- callables

class _Callable(Probe, _Watch):
    def __init__(self, fn):
        self.fn = fn

    def __str__(self):
        return f"{getattr(self.fn, '__qualname__', repr(self.fn))}() to return a true value"

    def _watch(self, service):
        return _Callable(self.fn)

    def check(self):
        try:
            value = self.fn()
        except OSError as exc:
            self.last_error = exc
            return None
        return value if value else None


def _probe_of(ready):
    """Return ``ready`` (None, a Probe or a callable) as a Probe or None; TypeError otherwise."""
    if ready is None or isinstance(ready, Probe):
        return ready
    if callable(ready):
        return _Callable(ready)
    raise TypeError("ready must be None, a fastfork.ready probe or a callable, "
                    f"not {type(ready).__name__}")


# ---------------------------------------------------------------- ports

def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now, for a service to listen on.

    The kernel picks it among the ephemeral ports, so parallel test runs
    (pytest-xdist workers) get different ports; another process could still
    take it before the service binds it.
    """
    with socket.create_server((host, 0)) as sock:
        return sock.getsockname()[1]
