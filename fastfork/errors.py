"""fastfork's exception tree. Every exception pickles and says ``fastfork``.

    FastforkError
     +-- ChildError        a child failed: raised, crashed, was killed, lost
     |    +-- ChildTimeout a child ran past its timeout and was stopped; also a TimeoutError
     +-- ForkError         fork() failed (EAGAIN, ENOMEM ...); also an OSError
     +-- TimeoutExpired    a wait ran out of time; also subprocess.TimeoutExpired
     +-- ServerError       a ForkServer died or cannot be reached
     +-- ServiceError      a service exited or was not ready in time

OSErrors from the kernel otherwise pass through unchanged (ChildProcessError
for ECHILD, BlockingIOError for EAGAIN ...).
"""
from __future__ import annotations

import signal as _signal
import subprocess as _subprocess

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["FastforkError", "ChildError", "ChildTimeout", "ForkError", "TimeoutExpired",
           "ServerError", "ServiceError"]


def _signal_name(signum):
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class FastforkError(Exception):
    """Base class of every error fastfork raises itself."""

    __module__ = "fastfork"


class ChildError(FastforkError):
    """A child did not deliver a result.

    Attributes: ``pid``; ``returncode`` (negative signal number if killed,
    None if unknown); ``signal`` (the killing signal, or None); ``index`` (the
    item's position in a fan-out, or None); ``item`` (its repr); ``exc_type``
    (name of the exception the child raised, or None); ``remote_traceback``
    (the child's formatted traceback, or None); ``timed_out`` (True if the
    fan-out's timeout stopped the child: then it is a ChildTimeout).
    """

    __module__ = "fastfork"

    def __init__(self, message: str, *, pid: int | None = None, returncode: int | None = None,
                 index: int | None = None, item: str | None = None,
                 exc_type: str | None = None, remote_traceback: str | None = None,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.pid = pid
        self.returncode = returncode
        self.index = index
        self.item = item
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.timed_out = timed_out

    @property
    def signal(self) -> int | None:
        """The signal that killed the child, or None."""
        if self.returncode is not None and self.returncode < 0:
            return -self.returncode
        return None

    def __str__(self):
        text = self.message
        if self.remote_traceback:
            text += "\n\n--- traceback in the child ---\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self):
        return (_rebuild, (type(self), (self.message,), dict(
            pid=self.pid, returncode=self.returncode, index=self.index,
            item=self.item, exc_type=self.exc_type,
            remote_traceback=self.remote_traceback, timed_out=self.timed_out)))


class ChildTimeout(ChildError, TimeoutError):
    """A child ran past its fan-out's timeout and was stopped.

    Reported however the child then ended: killed by the stop signal or
    SIGKILL, or exiting on its own from a signal handler (what it sent
    afterwards is kept as detail: ``exc_type``, ``remote_traceback``).
    ``timed_out`` is always True. Also a TimeoutError, so ``except
    TimeoutError`` catches it.
    """

    __module__ = "fastfork"

    def __init__(self, message: str, **fields: Any) -> None:
        fields["timed_out"] = True
        super().__init__(message, **fields)


class ForkError(FastforkError, OSError):
    """fork() kept failing (EAGAIN, ENOMEM ...) after the allowed retries.

    An OSError: ``errno`` and ``strerror`` are the kernel's. ``started`` is how
    many children had been created before the failure (they are still reaped
    and their results delivered).
    """

    __module__ = "fastfork"

    def __init__(self, errno: int, strerror: str, *, started: int = 0) -> None:
        OSError.__init__(self, errno, strerror)
        self.started = started

    def __str__(self):
        return (f"[Errno {self.errno}] fork failed: {self.strerror} "
                f"({self.started} children had been started)")

    def __reduce__(self):
        return (_rebuild, (type(self), (self.errno, self.strerror),
                           {"started": self.started}))


class TimeoutExpired(FastforkError, _subprocess.TimeoutExpired):
    """A wait for a child ran out of time.

    Also a ``subprocess.TimeoutExpired``: ``timeout``, ``cmd``, ``output`` and
    ``stderr`` mean the same; ``pid`` is the child's.
    """

    __module__ = "fastfork"

    def __init__(self, pid: int | None, timeout: float, cmd: Any = None,
                 output: bytes | None = None, stderr: bytes | None = None) -> None:
        _subprocess.TimeoutExpired.__init__(self, cmd, timeout, output, stderr)
        self.pid = pid

    def __str__(self):
        what = f"command {self.cmd!r}" if self.cmd is not None else f"child {self.pid}"
        return f"{what} timed out after {self.timeout} seconds"

    def __reduce__(self):
        return (_rebuild, (type(self), (self.pid, self.timeout, self.cmd),
                           {"output": self.output, "stderr": self.stderr}))


class ServerError(FastforkError):
    """A ForkServer died, or a request to it could not be carried out."""

    __module__ = "fastfork"


class ServiceError(FastforkError):
    """A service (fastfork.service) could not be started: it exited or was not ready in time.

    (Also raised, before anything starts, when a command could not be given
    its stop signal back from this thread.)

    Attributes: ``name`` (the function or command), ``pid``, ``returncode``
    (its status once stopped and reaped; -N if killed by signal N, None if
    unknown), ``timed_out`` (True if the ready timeout ran out; False if it
    exited first) and ``output`` (the last lines it printed, or None).
    """

    __module__ = "fastfork"

    def __init__(self, message: str, *, name: str | None = None, pid: int | None = None,
                 returncode: int | None = None, timed_out: bool = False,
                 output: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.pid = pid
        self.returncode = returncode
        self.timed_out = timed_out
        self.output = output

    def __str__(self):
        return self.message

    def __reduce__(self):
        return (_rebuild, (type(self), (self.message,), dict(
            name=self.name, pid=self.pid, returncode=self.returncode,
            timed_out=self.timed_out, output=self.output)))


def _rebuild(cls, args, kwargs):
    """Unpickle an exception whose constructor takes keyword-only fields."""
    return cls(*args, **kwargs)


def describe_exception(type_name, message):
    """Return 'Type: message', or just 'Type' when the exception has no text."""
    message = str(message)
    return f"{type_name}: {message}" if message.strip() else type_name


def describe_status(returncode):
    """Return words for a Popen-style returncode ('exited with code 3', 'killed by SIGSEGV')."""
    if returncode is None:
        return "ended with an unknown status"
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with code {returncode}"
import errno as _e; RETRYABLE_FORK_ERRNOS = (_e.EAGAIN, _e.ENOMEM)
