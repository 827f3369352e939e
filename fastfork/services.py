"""Services: a server (a Python callable or a command) for the length of a ``with`` block.

``service`` starts it in a session of its own, waits until it is ready (see
fastfork.ready), and on leaving the block stops its whole process group --
``stop_signal``, ``grace`` seconds, SIGKILL -- and reaps it. Its stdout and
stderr go to a temporary file, not a pipe: a chatty service never stalls on a
full pipe that nobody reads.

The group is signalled only while its leader is unreaped: until then no other
process can be given its pid, so no stranger's group can carry that id.
"""
from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable

from fastfork import ready as _ready
from fastfork._checks import check_timeout, poll_ms
from fastfork.child import _POLL_MAX, _POLL_MIN, _fd_lock, close_owned, own_fd, stop_all
from fastfork.commands import DEVNULL, STDOUT, _prepare, spawn
from fastfork.errors import ServiceError, describe_status
from fastfork.fanout import start_child

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Union

    from typing_extensions import Self, TypeAlias

    from fastfork.child import Child
    from fastfork.commands import Arg, ArgSequence, Env

    Ready: TypeAlias = Union[_ready.Probe, Callable[[], object], None]
    """None (ready at once), a fastfork.ready probe, or a callable polled until truthy."""

__all__ = ["Service", "service"]

# How much of the output errors and tail() look at, at most.
_TAIL_BYTES = 64 * 1024


def service(target: Callable[..., object] | ArgSequence, /, *args: Any,
            kwargs: dict[str, Any] | None = None, ready: Ready = None,
            ready_timeout: float | None = 30.0, stop_signal: int = signal.SIGTERM,
            grace: float = 5.0, die_with_parent: bool = True, env: Env | None = None,
            cwd: Arg | None = None) -> Service:
    """Run a service for the length of a ``with`` block; entering it returns once it is ready.

    ``target``: a Python callable, forked and called as ``target(*args,
    **kwargs)``, or a command (an argv sequence), spawned like
    ``fastfork.spawn`` (``env`` and ``cwd`` as there). Either way it runs in
    a new session, with stdin from /dev/null and stdout and stderr captured
    (``Service.output``).

    ``ready``: None (ready at once), a probe from fastfork.ready (``port``,
    ``line``, ``notify``) or a callable polled until it returns something
    truthy. ``ready_timeout`` seconds (None: no limit) after the start, or as
    soon as the service exits, ServiceError is raised with its exit status
    and last lines of output, and nothing is left running.

    On leaving the block the service's process group gets ``stop_signal``
    (the service gets that signal's default action even if this process
    ignores it: KeyboardInterrupt for SIGINT in a Python service), ``grace``
    seconds for the leader to exit, then SIGKILL; the leader is reaped.
    Processes that left the group (their own setsid) are not reached.
    ``die_with_parent`` (Linux) has the kernel kill the leader if this process
    -- for a command, the thread that started it -- dies.

    Returns a Service (a context manager). Raises TypeError/ValueError for bad
    arguments here, before any process is created.
    """
    return Service(target, args, kwargs, ready=ready, ready_timeout=ready_timeout,
                   stop_signal=stop_signal, grace=grace, die_with_parent=die_with_parent,
                   env=env, cwd=cwd)


class Service:
    """A service started by ``fastfork.service``; use it as a context manager.

    Attributes: ``name`` (the function's name or the command line), ``pid``
    and ``returncode`` (None while running; -N if killed by signal N) of the
    leader, ``ready_result`` (what the ready probe gave: a match object, the
    notify message, (host, port) ...), ``output`` and ``output_bytes`` (what
    it printed so far; kept after the stop), ``alive`` and ``died`` (ended
    without being stopped). Without ``with``: ``start()``, then ``stop()``.
    """

    name: str
    ready_result: Any

    def __init__(self, target: Callable[..., object] | ArgSequence,
                 args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *,
                 ready: Ready = None, ready_timeout: float | None = 30.0,
                 stop_signal: int = signal.SIGTERM, grace: float = 5.0,
                 die_with_parent: bool = True, env: Env | None = None,
                 cwd: Arg | None = None) -> None:
        """Validate the arguments (see ``service``); nothing starts before ``start()``."""
        self._probe = _ready._probe_of(ready)
        if callable(target):
            if env is not None or cwd is not None:
                raise TypeError("env and cwd are for a command target, not a callable")
            kwargs = {} if kwargs is None else kwargs
            if not isinstance(kwargs, dict):
                raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
            self._command = None
            self.name = getattr(target, "__qualname__", None) or repr(target)
        else:
            if not isinstance(target, Iterable):
                raise TypeError("target must be a callable or a command (an argv sequence), "
                                f"not {type(target).__name__}")
            if args or kwargs:
                raise TypeError("arguments of a command go in its argv list, not in *args "
                                "or kwargs")
            if isinstance(self._probe, _ready._Notify):
                raise ValueError("ready=notify() is for a Python callable target; "
                                 "wait for a command with port() or line()")
            self._command = _prepare(target, env=env, cwd=cwd)
            self.name = shlex.join(os.fsdecode(a) for a in self._command.argv)
        self._target = target
        self._args = tuple(args)
        self._kwargs = kwargs
        self._env = env
        self._cwd = cwd
        self._ready_timeout = check_timeout(ready_timeout, "ready_timeout", allow_zero=False)
        self._stop_signal = _check_signal(stop_signal)
        self._grace = check_timeout(grace, "grace")
        self._die_with_parent = bool(die_with_parent)
        self._launched: list[Child] = []  # the leader's handle once it exists
        self._output_fd = -1      # the temporary file, while the service may write to it
        self._output = None       # its whole content once the service is stopped
        self._stop_requested = False
        self._died = False
        self._owner = os.getpid()
        self.ready_result = None

    def __repr__(self) -> str:
        if self._child is None:
            state = "not started"
        elif self.returncode is None:
            state = f"pid={self.pid} running"
        else:
            state = f"pid={self.pid} returncode={self.returncode}"
        return f"<Service {self.name!r} {state}>"

    # ------------------------------------------------------------ state

    @property
    def _child(self):
        return self._launched[0] if self._launched else None

    @property
    def pid(self) -> int | None:
        """The leader's pid (None before the start)."""
        return None if self._child is None else self._child.pid

    @property
    def returncode(self) -> int | None:
        """The leader's exit status once reaped, else None."""
        return None if self._child is None else self._child.returncode

    def poll(self) -> int | None:
        """Return ``returncode``: None while the leader runs.

        A leader found exited is reaped, and what is left of its group killed.
        """
        child = self._child
        if child is not None and not child.finished:
            child._drain()
            if self._leader_exited():
                self._note_exit()
                self._end()
        return self.returncode

    @property
    def alive(self) -> bool:
        """True while the service runs (started, and its leader has not exited)."""
        return self._child is not None and self.poll() is None

    @property
    def died(self) -> bool:
        """True if the service ended without being stopped (it crashed or exited)."""
        self.poll()
        return self._died

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the leader (not its group); nothing once it is reaped."""
        if self._child is not None:
            self._child.send_signal(sig)

    # ------------------------------------------------------------ output

    @property
    def output_bytes(self) -> bytes:
        """Everything the service wrote to stdout and stderr so far (bytes)."""
        return self._output_from(0)

    @property
    def output(self) -> str:
        """``output_bytes`` decoded as UTF-8 (undecodable bytes replaced)."""
        return self.output_bytes.decode("utf-8", "replace")

    def tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of the output (at most 64 KiB of it) as text."""
        size = self._output_size()
        data = self._output_from(max(0, size - _TAIL_BYTES))
        text = data.decode("utf-8", "replace").splitlines()
        if size > _TAIL_BYTES and text:
            text = text[1:]  # cut mid-line
        return "\n".join(text[-lines:]) if lines > 0 else ""

    def _output_size(self):
        if self._output is not None:
            return len(self._output)
        if self._output_fd < 0:
            return 0
        return os.fstat(self._output_fd).st_size

    def _output_from(self, offset, size=None):
        """The output from byte ``offset`` on (at most ``size`` bytes of it)."""
        end = None if size is None else offset + size
        if self._output is not None:
            return self._output[offset:end]
        if self._output_fd < 0:
            return b""
        chunks = []
        while end is None or offset < end:
            # pread: the service shares the file offset; moving it would make it overwrite.
            chunk = os.pread(self._output_fd, 1 << 24 if end is None else end - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------ start

    def start(self) -> Self:
        """Start the service and return once it is ready; return self.

        Raises ServiceError if it exits or its ready timeout passes first (it
        is stopped and reaped then), OSError if it cannot be started; nothing
        is left running either way. RuntimeError if started before.
        """
        if self._launched or self._output is not None:
            raise RuntimeError(f"service {self.name!r} was started already")
        if self._command is not None:
            _check_can_hand_over(self._stop_signal)
        watch = None
        try:
            with _fd_lock:  # no fastfork child may inherit the file before it is owned
                fd, path = tempfile.mkstemp(prefix="fastfork-service-")
                self._output_fd = own_fd(fd)
            os.unlink(path)
            if self._probe is not None:
                watch = self._probe._watch(self)
            self._create(watch)
            if watch is not None:
                watch.started()
                self.ready_result = self._wait_ready(watch)
        except BaseException:
            self.stop()
            raise
        finally:
            if watch is not None:
                watch.close()
        return self

    def _create(self, watch):
        keep = [self._output_fd]
        notify_fd = -1 if watch is None else watch.child_fd
        if self._command is None:
            if notify_fd >= 0:
                keep.append(notify_fd)
            start_child(_run_service, (self._target, self._args, self._kwargs,
                                       self._output_fd, notify_fd),
                        die_with_parent=self._die_with_parent, print_traceback=True,
                        launched=self._launched, stop_signal=self._stop_signal,
                        keep_fds=keep)
        else:
            with _handed_over(self._stop_signal):
                self._launched.append(spawn(
                    self._target, env=self._env, cwd=self._cwd, stdin=DEVNULL,
                    stdout=self._output_fd, stderr=STDOUT, new_session=True,
                    die_with_parent=self._die_with_parent))

    def _wait_ready(self, watch):
        """Wait until ``watch`` sees the service ready; return what it gave."""
        timeout = self._ready_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_MIN
        while True:
            if self._leader_exited():
                self._note_exit()
                raise self._not_started(f"before it was ready (waiting for {self._probe})")
            value = watch.check()
            if value is not None:
                return value
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                why = f"was not ready within {timeout:g} s (waiting for {self._probe})"
                if watch.last_error is not None:
                    why += f"; last attempt: {type(watch.last_error).__name__}: {watch.last_error}"
                raise self._not_started(why, timed_out=True)
            self._pause(delay if remaining is None else min(delay, remaining), watch.fds)
            delay = min(delay * 2, _POLL_MAX)

    def _not_started(self, why, timed_out=False):
        """Stop the service; return the ServiceError saying ``why`` it did not start."""
        pid = self.pid
        self.stop()
        status = describe_status(self.returncode)
        if timed_out:
            message = f"service {self.name!r} (pid {pid}) {why}; stopped, it {status}"
        else:
            message = f"service {self.name!r} (pid {pid}) {status} {why}"
        tail = self.tail()
        message += ("\n--- last lines of its output ---\n" + tail) if tail else (
            "\n(it printed nothing)")
        return ServiceError(message, name=self.name, pid=pid, returncode=self.returncode,
                            timed_out=timed_out, output=tail)

    # ------------------------------------------------------------ stop

    def stop(self) -> int | None:
        """Stop the service and its process group; reap the leader. Returns ``returncode``.

        ``stop_signal`` to the group, up to ``grace`` seconds for the leader
        to exit, then SIGKILL to what is left of the group. Does nothing more
        once stopped; the output stays readable.
        """
        if os.getpid() != self._owner:
            raise RuntimeError(f"service {self.name!r} belongs to process {self._owner}")
        child = self._child
        try:
            if child is not None and not child.finished:
                if self._leader_exited():
                    self._note_exit()
                else:
                    self._stop_requested = True
                    self._signal_group(self._stop_signal)
                    self._signal_group(signal.SIGCONT)  # a stopped process acts on nothing else
                    self._wait_exit(self._grace)
        finally:
            self._stop_requested = True
            self._end()
        return self.returncode

    def _note_exit(self):
        """The leader was found exited: it died, unless it was being stopped."""
        if not self._stop_requested:
            self._died = True

    def _end(self):
        """SIGKILL what is left of the group, reap the leader, keep the output."""
        child = self._child
        if child is not None and not child.finished:
            self._signal_group(signal.SIGKILL)
            stop_all([child], 0, sig=signal.SIGKILL)
        if self._output_fd >= 0 and (child is None or child.finished):
            self._output = self._output_from(0)
            close_owned(self._output_fd)
            self._output_fd = -1

    def _signal_group(self, sig):
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # No such group yet: the forked leader has not called setsid(), so
            # it has started no process either.
            self._child.send_signal(sig)

    def _leader_exited(self):
        """True once the leader has exited; it stays unreaped (a zombie) if so."""
        child = self._child
        if child.finished:
            return True
        try:
            return os.waitid(os.P_PID, child.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped by someone else (SIGCHLD ignored): gone

    def _wait_exit(self, timeout):
        """Wait up to ``timeout`` seconds for the leader to exit, without reaping it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_MIN
        while not self._leader_exited():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._pause(delay if remaining is None else min(delay, remaining), ())
            delay = min(delay * 2, _POLL_MAX)
        return True

    def _pause(self, timeout, fds):
        """Sleep up to ``timeout`` s, waking early when the leader exits or an fd is readable.

        Drains the leader's result pipe meanwhile (a Python service's return value).
        """
        child = self._child
        poller = select.poll()
        watched = list(fds) + list(child._readers())
        if child._pidfd >= 0:
            watched.append(child._pidfd)  # readable once it exits; reading reaps nothing
        for fd in watched:
            poller.register(fd, select.POLLIN)
        poller.poll(poll_ms(timeout))
        child._drain()

    # ------------------------------------------------------------ context manager

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if os.getpid() == self._owner:
            self.stop()


def _check_signal(sig):
    """Return ``sig`` as a signal.Signals; TypeError/ValueError if it is none."""
    if isinstance(sig, bool) or not isinstance(sig, int):
        raise TypeError(f"stop_signal must be a signal number, not {type(sig).__name__}")
    try:
        return signal.Signals(sig)
    except ValueError:
        raise ValueError(f"stop_signal {sig} is not a signal") from None


def _run_service(fn, args, kwargs, output_fd, notify_fd):
    """In the forked service: a session of its own, output to the file; then ``fn``."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    close_owned(output_fd)
    # New streams on fds 1 and 2 (the parent's may be a test runner's capture),
    # line-buffered so that ready.line() sees each line as it is printed.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                      closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                      closefd=False)
    _ready._set_notify_fd(notify_fd)
    return fn(*args, **kwargs)


def _check_can_hand_over(sig):
    """Raise ServiceError if a command could not be given ``sig``'s default action."""
    if signal.getsignal(sig) == signal.SIG_IGN and \
            threading.current_thread() is not threading.main_thread():
        raise ServiceError(
            f"{sig.name} is ignored in this process, and a command inherits that: it would "
            f"not stop on its stop signal. fastfork gives it back its default action only "
            f"when the service is started from the main thread; start it there or choose "
            f"another stop_signal")


@contextlib.contextmanager
def _handed_over(sig):
    """Spawn inside this block and the command gets ``sig``'s default action.

    spawn resets the signals this process catches to SIG_DFL in the command
    but leaves ignored ones ignored (the caller's choice, as with nohup). A
    service must act on its stop signal, so for the spawn an ignored ``sig``
    is caught by a handler that does nothing: ignored here all the same.
    """
    if signal.getsignal(sig) != signal.SIG_IGN:
        yield
        return
    signal.signal(sig, _ignore)
    try:
        yield
    finally:
        signal.signal(sig, signal.SIG_IGN)


def _ignore(signum, frame):
    """A signal handler that does nothing."""
