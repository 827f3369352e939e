"""Run commands: ``spawn`` one (a ``Process``), ``spawn_many`` fans many out.

On Linux a command's process is created with ``clone(CLONE_VM|CLONE_VFORK)``
(``fastfork._core._spawn``, ``src/spawn.c``): it shares this process's memory
until it execs, so starting a command costs the same from a 10 MB parent as
from a 10 GB one. Other systems use a plain ``fork()`` with the same
async-signal-safe child code (as costly as ``os.fork`` from a large parent).

Conversion and validation happen here, before any process exists; the child
then only applies the prepared plan and execs. Exec failures come back as the
same ``OSError`` subclass, with the same ``filename``, as ``subprocess`` gives.

Differences from ``subprocess`` worth knowing: the command starts with an
empty signal mask (subprocess keeps the calling thread's); signals the
interpreter ignores (SIGPIPE, SIGXFSZ) are reset to SIG_DFL as with
``restore_signals=True``, other ignored signals stay ignored.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import io
import os
import select
import selectors
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping

from fastfork import _core
from fastfork._checks import (MAX_WAIT, check_fan_out, check_optional_callable, check_pass_fds,
                              check_stdio, check_timeout)
from fastfork._scheduler import Scheduler, drive
from fastfork.child import Child, _fd_lock, close_owned, own_fd, reap_dropped
from fastfork.errors import TimeoutExpired

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import Any, Literal, Protocol, SupportsIndex, TypeVar, Union, overload

    from _typeshed import FileDescriptorLike, StrOrBytesPath
    from typing_extensions import TypeAlias

    Arg: TypeAlias = StrOrBytesPath
    """One argument of a command: str, bytes or an os.PathLike of either."""

    T_co = TypeVar("T_co", covariant=True)

    class SequenceNotStr(Protocol[T_co]):
        """A Sequence, but not a str or bytes: their ``__contains__`` takes only
        str (bytes), so a type checker rejects ``spawn("echo hi")``."""

        @overload
        def __getitem__(self, index: SupportsIndex, /) -> T_co: ...
        @overload
        def __getitem__(self, index: slice, /) -> Sequence[T_co]: ...
        def __contains__(self, value: object, /) -> bool: ...
        def __len__(self) -> int: ...
        def __iter__(self) -> Iterator[T_co]: ...
        def __reversed__(self) -> Iterator[T_co]: ...
        def index(self, value: Any, start: int = 0, stop: int = ..., /) -> int: ...
        def count(self, value: Any, /) -> int: ...

    ArgSequence: TypeAlias = SequenceNotStr[Arg]
    """A command's argv: a list or tuple (any Sequence) of Args, not one str."""
    Env: TypeAlias = Union[Mapping[str, StrOrBytesPath], Mapping[bytes, StrOrBytesPath]]
    Stdio: TypeAlias = Union[FileDescriptorLike, None]
    """None (inherit), PIPE, DEVNULL, STDOUT (stderr only), an fd or a file object."""
else:
    def overload(fn):
        return fn

__all__ = ["PIPE", "STDOUT", "DEVNULL", "Process", "CommandResult", "spawn", "spawn_many",
           "ManyCommands"]

# The same values as subprocess's, so either module's constants work here.
PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL

# Create children with fork() instead of vfork-style clone (tests exercise the
# fallback path of non-Linux systems with it).
_USE_FORK = not _core._spawn_uses_vfork()

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

# A write of at most PIPE_BUF bytes to a pipe that polls writable does not block.
_PIPE_BUF = getattr(select, "PIPE_BUF", 512)


# ---------------------------------------------------------------- validation

def _encode(value, what):
    """Return ``value`` (str, bytes or os.PathLike) as bytes for the kernel.

    Raises TypeError for another type, ValueError for an embedded NUL byte.
    """
    if type(value) is str:
        encoded = value.encode(_FS_ENCODING, _FS_ERRORS)  # what os.fsencode does
    elif isinstance(value, bytes):
        encoded = value
    elif isinstance(value, (str, os.PathLike)):
        encoded = os.fsencode(value)
    else:
        raise TypeError(f"{what} must be str, bytes or os.PathLike, not {type(value).__name__}")
    if b"\0" in encoded:
        raise ValueError(f"embedded null byte in {what}: {value!r}")
    return encoded


def _encode_env(env):
    """Return ``env`` (a mapping) as a list of b"KEY=value"; ValueError/TypeError if invalid."""
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping, not {type(env).__name__}")
    entries = []
    for key, value in env.items():
        key_b = _encode(key, "an environment variable name")
        if not key_b or b"=" in key_b:
            raise ValueError(f"illegal environment variable name: {key!r}")
        entries.append(key_b + b"=" + _encode(value, f"environment variable {key!r}"))
    return entries


# One command converted for the child: what _core._spawn takes. A named
# tuple, not a frozen dataclass: one is made per command, and a frozen
# dataclass takes several times longer to build.
#   args       argv as given (for results and errors)
#   paths      candidate executables (bytes), after the PATH lookup
#   argv       bytes
#   envp       b"KEY=value", or None to inherit os.environ
#   cwd        bytes, or None
#   exec_name  the filename of an exec failure, as subprocess reports it
#   cwd_name   the filename of a chdir failure
_Command = collections.namedtuple("_Command", "args paths argv envp cwd exec_name cwd_name")


def _search_path(env):
    """The PATH a bare program name is looked up in: ``env``'s, else os.environ's (a str)."""
    if env is not None:
        return os.pathsep.join(os.get_exec_path(env))
    # os.get_exec_path(None) without its per-call warnings filter: os.environ
    # has str keys only.
    path = os.environ.get("PATH")
    return os.defpath if path is None else path


@functools.lru_cache(maxsize=64)
def _candidates(search_path, program):
    """The paths (bytes) tried for a bare ``program`` on ``search_path``, as
    subprocess tries them: each PATH directory joined with the name."""
    return tuple(os.path.join(os.fsencode(d), program) for d in search_path.split(os.pathsep))


def _prepare(argv, executable=None, env=None, cwd=None):
    """Validate and convert one command; return a _Command.

    The program is looked up on PATH (``env``'s PATH when ``env`` is given) as
    subprocess does. Raises TypeError/ValueError for bad arguments.
    """
    # A list or tuple needs no check against os.PathLike (an ABC: slow to ask).
    if type(argv) is not list and type(argv) is not tuple and isinstance(
            argv, (str, bytes, os.PathLike)):
        raise TypeError("argv must be a sequence of arguments, not a single "
                        f"{type(argv).__name__} (use [program] or shlex.split(command))")
    try:
        args = list(argv)
    except TypeError:
        raise TypeError(f"argv must be a sequence of arguments, not {type(argv).__name__}") from None
    if not args:
        raise ValueError("argv must not be empty")
    argv_b = [_encode(a, "an argument") for a in args]
    exec_name = args[0] if executable is None else executable
    program = argv_b[0] if executable is None else _encode(executable, "executable")
    envp = None if env is None else _encode_env(env)
    cwd_b = None if cwd is None else _encode(cwd, "cwd")
    if b"/" in program:  # a path (os.path.dirname is not empty): no lookup
        paths = [program]
    else:
        paths = list(_candidates(_search_path(env), program))
    return _Command(args, paths, argv_b, envp, cwd_b, exec_name, cwd)


# ---------------------------------------------------------------- the handle

class _PipeFileIO(io.FileIO):
    """A pipe end fastfork owns until it is closed.

    The fd is closed by ``close_owned``, which forgets and closes it in one C
    step: a fork by another thread in between would hand the child an fd that
    fastfork no longer closes there. FileIO itself never closes it
    (closefd=False).
    """

    _fd_released = False

    def close(self):
        try:
            if not self.closed and not self._fd_released:
                fd = self.fileno()
                # Marked first: if a signal handler raises between the two steps,
                # the fd leaks rather than being closed twice (maybe someone else's).
                self._fd_released = True
                close_owned(fd)  # EBADF if someone closed the fd itself (as uvloop does)
        finally:
            super().close()  # closed for good either way, as FileIO does

    def _dealloc_warn(self, source):
        # The buffered file over us calls this when it is collected unclosed;
        # FileIO warns only for an fd it closes itself.
        if not self.closed:
            warnings.warn(f"unclosed file {source!r}", ResourceWarning, stacklevel=2,
                          source=source)


def _pipe_file(fd, mode):
    raw = _PipeFileIO(fd, mode, closefd=False)
    return io.BufferedWriter(raw) if mode == "wb" else io.BufferedReader(raw)


class Process(Child):
    """A running command started by ``spawn``: a ``Child`` plus its pipes.

    Attributes: ``args`` (argv as given); ``stdin``, ``stdout``, ``stderr``:
    binary file objects for the pipes asked for with PIPE, else None. Waiting,
    signalling and stopping are ``Child``'s (``returncode`` is -N after signal N).
    """

    args: list[Arg]
    # Defaults on the class: a command without pipes sets none of them.
    stdin: io.FileIO | None = None
    stdout: io.FileIO | None = None
    stderr: io.FileIO | None = None
    _capture: tuple | list[list[bytes]] = ()  # the bytes read from each capture fd
    _comm = None  # communicate()'s state, kept across a timeout

    def __init__(self, pid: int | None, args: list[Arg], stdin: io.FileIO | None = None,
                 stdout: io.FileIO | None = None, stderr: io.FileIO | None = None, *,
                 capture_fds: Sequence[int] = ()) -> None:
        # pid None: an unstarted handle that _core._spawn fills in.
        self.args = args
        if stdin is not None or stdout is not None or stderr is not None or capture_fds:
            self._attach(stdin, stdout, stderr, capture_fds)
        super().__init__(pid)

    def _attach(self, stdin, stdout, stderr, capture_fds=()):
        """Hold the parent's pipe ends: file objects, or ``capture_fds``.

        spawn_many's capture: the pipes' read ends are the handle's capture
        fds from here on, drained by the wait loop (the _readers hook) while
        the command runs and closed at end of file or once it is reaped.
        Their bytes collect in _capture, one list per pipe.
        """
        if capture_fds:
            self._adopt_capture_fds(capture_fds)
            self._capture = [[] for _ in capture_fds]
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    # ------------------------------------------------------------ hooks

    def _readers(self):
        if not self._capture:
            return {}
        return {fd: functools.partial(self._collect, index)
                for index, fd in enumerate(self._capture_fds) if fd >= 0}

    def _collect(self, index, data):
        if data:
            self._capture[index].append(data)
        else:
            self._close_capture_fd(index)

    def _finish(self):
        if self._capture:  # else there is nothing to drain or close
            super()._finish()
            self._close_capture_fds()

    def _captured(self, index):
        """The bytes captured from capture_fds[index], or None."""
        if index >= len(self._capture):
            return None
        return b"".join(self._capture[index])

    # ------------------------------------------------------------ public

    def communicate(self, input: bytes | None = None,
                    timeout: float | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input`` to stdin, read stdout and stderr to the end, wait for the exit.

        Both pipes are drained together (selectors), so output of any size
        never deadlocks. Returns (stdout, stderr): bytes for a pipe, else None.
        Raises fastfork.TimeoutExpired after ``timeout`` seconds; the command
        keeps running and communicate() can be called again to go on.
        Raises ValueError if ``input`` is given without stdin=PIPE.
        """
        timeout = check_timeout(timeout)
        self._check_owner()
        if input is not None and self.stdin is None and self._comm is None:
            raise ValueError("input given but the process has no stdin pipe (stdin=PIPE)")
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._comm is None:
            self._comm = self._start_communicate(input)
        self._exchange(deadline, timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.wait(remaining)
        except TimeoutExpired:
            self._raise_timeout(timeout)
        return self._communicated()

    def _start_communicate(self, input):
        """Flush stdin (closing it when there is no input); return the buffers."""
        chunks = {f: [] for f in (self.stdout, self.stderr) if f is not None}
        pending = None
        if self.stdin is not None and not self.stdin.closed:
            # communicate() ignores a command that stopped reading (as subprocess).
            with contextlib.suppress(BrokenPipeError):
                self.stdin.flush()
            if input:
                pending = [memoryview(input).cast("B"), 0]
            else:
                with contextlib.suppress(BrokenPipeError):
                    self.stdin.close()
        return chunks, pending

    def _exchange(self, deadline, timeout):
        """Feed stdin and read stdout/stderr until every pipe is closed.

        Raises TimeoutExpired at ``deadline`` (None: none).
        """
        chunks, pending_input = self._comm
        with selectors.PollSelector() as selector:
            for fileobj in (self.stdout, self.stderr):
                if fileobj is not None and not fileobj.closed:
                    selector.register(fileobj, selectors.EVENT_READ)
            if pending_input is not None and self.stdin is not None and not self.stdin.closed:
                selector.register(self.stdin, selectors.EVENT_WRITE)
            while selector.get_map():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._raise_timeout(timeout)
                ready = selector.select(None if remaining is None else min(remaining, MAX_WAIT))
                for key, _ in ready:
                    if key.fileobj is self.stdin:
                        done = self._feed_stdin(pending_input)
                    else:
                        done = self._read_output(key, chunks)
                    if done:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()

    def _feed_stdin(self, pending):
        """Write the next piece of input; True when all is written (or the reader left)."""
        view, offset = pending
        try:
            offset += os.write(self.stdin.fileno(), view[offset:offset + _PIPE_BUF])
        except BrokenPipeError:
            return True
        pending[1] = offset
        return offset >= len(view)

    @staticmethod
    def _read_output(key, chunks):
        """Read what an output pipe holds; True at end of file."""
        data = os.read(key.fd, 32768)
        if data:
            chunks[key.fileobj].append(data)
        return not data

    def _communicated(self):
        """(stdout, stderr) as collected so far: bytes for a pipe, else None."""
        chunks = self._comm[0]
        out = b"".join(chunks[self.stdout]) if self.stdout is not None else None
        err = b"".join(chunks[self.stderr]) if self.stderr is not None else None
        return out, err

    def _raise_timeout(self, timeout):
        out, err = self._communicated()
        raise TimeoutExpired(self.pid, timeout, cmd=self.args, output=out, stderr=err)

    def close_pipes(self) -> None:
        """Close whichever of stdin, stdout, stderr are still open."""
        for fileobj in (self.stdin, self.stdout, self.stderr):
            if fileobj is not None:
                with contextlib.suppress(BrokenPipeError):
                    fileobj.close()

    def __exit__(self, *exc_info: object) -> None:
        if os.getpid() != self._owner:
            return
        try:
            # stdin first: a command reading it sees end of file.
            if self.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.stdin.close()
            super().__exit__(*exc_info)
        finally:
            self.close_pipes()
            self._close_capture_fds()


# ---------------------------------------------------------------- spawn

def spawn(argv: ArgSequence, *, executable: Arg | None = None, env: Env | None = None,
          cwd: Arg | None = None, stdin: Stdio = None, stdout: Stdio = None,
          stderr: Stdio = None, pass_fds: Iterable[int] = (), close_fds: bool = True,
          new_session: bool = False, die_with_parent: bool = False) -> Process:
    """Start a command; return its ``Process``.

    ``argv``: a sequence of str/bytes/os.PathLike; ``argv[0]`` (or
    ``executable``) is looked up on PATH like subprocess does. ``env``: a
    mapping replacing the environment (None inherits). ``stdin``/``stdout``/
    ``stderr``: None (inherit), PIPE, DEVNULL, an fd or a file object; also
    ``stderr=STDOUT``. ``pass_fds`` stay open (and inheritable) in the command;
    with ``close_fds`` every other fd above 2 is closed. ``new_session`` calls
    setsid(). ``die_with_parent`` (Linux) has the kernel SIGKILL the command
    when this process dies -- strictly, when the *thread* that called spawn
    exits (PR_SET_PDEATHSIG), so call it from a long-lived thread.

    Raises TypeError/ValueError for bad arguments before any process exists;
    OSError like subprocess when the command cannot run (FileNotFoundError
    with ``filename`` the program or the missing cwd, PermissionError, ...),
    or when no process can be created (BlockingIOError for EAGAIN). Nothing
    is left open or running then.
    """
    command = _prepare(argv, executable, env, cwd)
    if stdin is None and stdout is None and stderr is None:
        stdio = (None, None, None)
    else:
        stdio = (check_stdio(stdin, "stdin"), check_stdio(stdout, "stdout"),
                 check_stdio(stderr, "stderr"))
    keep = check_pass_fds(pass_fds) if pass_fds != () else ()
    sys.audit("fastfork.spawn", command.exec_name, command.args, cwd, env)
    return _start(command, stdio, keep, bool(close_fds), bool(new_session),
                  bool(die_with_parent))


def _start(command, stdio, keep_fds=(), close_fds=True, new_session=False,
           die_with_parent=False, capture=False):
    """Create the pipes, spawn ``command`` and wrap it in a Process.

    ``stdio`` holds validated stdin/stdout/stderr values. With ``capture`` the
    stdout/stderr pipe ends stay raw non-blocking fds drained by the wait loop.
    """
    reap_dropped()
    proc = Process(None, command.args)
    child_ends = []                 # closed in the parent once the child has them
    parent_ends = [None, None, None]  # ours until the Process holds them
    fds = [-1, -1, -1]
    try:
        with _fd_lock:
            # Under _fd_lock no fork_call child can be created and inherit the
            # child's pipe ends before they are closed here.
            try:
                for i, value in enumerate(stdio):
                    if value is None:
                        continue
                    if value == PIPE:
                        read_end, write_end = os.pipe()
                        if i == 0:
                            fds[0], parent_ends[0] = read_end, own_fd(write_end)
                        else:
                            fds[i], parent_ends[i] = write_end, own_fd(read_end)
                        child_ends.append(fds[i])
                    elif value == DEVNULL:
                        fds[i] = _core.SPAWN_DEVNULL  # the child opens it
                    elif value == STDOUT:
                        fds[2] = fds[1] if fds[1] != -1 else 1
                    else:
                        fds[i] = value
                _core._spawn(command.paths, command.argv, command.envp, command.cwd,
                             fds, keep_fds, close_fds, new_session,
                             signal.SIGKILL if die_with_parent else 0, proc,
                             command.exec_name, command.cwd_name, _USE_FORK)
            finally:
                for fd in child_ends:
                    os.close(fd)
        if parent_ends != [None, None, None]:
            if capture:
                capture_fds = tuple(fd for fd in parent_ends[1:] if fd is not None)
                for fd in capture_fds:
                    os.set_blocking(fd, False)
                proc._attach(None, None, None, capture_fds)
            else:
                proc._attach(*[None if fd is None else _pipe_file(fd, "wb" if i == 0 else "rb")
                               for i, fd in enumerate(parent_ends)])
            parent_ends = [None, None, None]
        return proc
    except BaseException:
        # The spawn failed, or a signal (Ctrl-C) landed right after it.
        if proc.pid is not None:
            with contextlib.suppress(OSError):
                proc._signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                proc._wait_status()
            proc._reaped = True
        proc._close_fds()
        for fd in parent_ends:
            if fd is not None:
                with contextlib.suppress(OSError):
                    close_owned(fd)
        raise


# ---------------------------------------------------------------- spawn_many

@dataclasses.dataclass(frozen=True)
class CommandResult:
    """How one command of ``spawn_many`` ended.

    ``args`` and ``returncode`` (-N if killed by signal N), ``stdout`` and
    ``stderr`` (bytes when captured, else None) mean what they mean in
    ``subprocess.CompletedProcess``; ``duration`` is the wall time in seconds
    from start to reaping; ``timed_out`` is True if the timeout stopped it
    (however it then exited); ``error`` is the OSError if the command could
    not be started at all (then ``returncode`` is 127 when the program was
    not found, else 126, as a shell reports it).
    """

    args: list[Arg]
    returncode: int
    stdout: bytes | None = None
    stderr: bytes | None = None
    duration: float = 0.0
    timed_out: bool = False
    error: OSError | None = None

    @property
    def ok(self) -> bool:
        """True if the command ran, was not stopped for its timeout, and exited 0."""
        return self.returncode == 0 and not self.timed_out and self.error is None

    def check_returncode(self) -> None:
        """Raise if the command failed: its start error, fastfork.TimeoutExpired
        (also a subprocess.TimeoutExpired) if it timed out, else
        subprocess.CalledProcessError for a non-zero exit (as CompletedProcess).
        """
        if self.error is not None:
            raise self.error
        if self.timed_out:
            raise TimeoutExpired(None, round(self.duration, 3), cmd=self.args,
                                 output=self.stdout, stderr=self.stderr)
        if self.returncode:
            raise subprocess.CalledProcessError(self.returncode, self.args,
                                                self.stdout, self.stderr)


@overload
def spawn_many(commands: Iterable[ArgSequence], *, jobs: int | None = None,
               timeout: float | None = None, capture: bool = False,
               keep_going: Literal[True] = True, grace: float = 1.0,
               env: Env | Callable[[int], Env] | None = None, cwd: Arg | None = None,
               stdin: Stdio = DEVNULL, new_session: bool = False, die_with_parent: bool = True,
               spawn_retries: int = 8,
               callback: Callable[[int, CommandResult], object] | None = None,
               ) -> list[CommandResult]: ...


@overload
def spawn_many(commands: Iterable[ArgSequence], *, jobs: int | None = None,
               timeout: float | None = None, capture: bool = False, keep_going: bool,
               grace: float = 1.0, env: Env | Callable[[int], Env] | None = None,
               cwd: Arg | None = None, stdin: Stdio = DEVNULL, new_session: bool = False,
               die_with_parent: bool = True, spawn_retries: int = 8,
               callback: Callable[[int, CommandResult], object] | None = None,
               ) -> list[CommandResult | None]: ...


def spawn_many(commands: Iterable[ArgSequence], *, jobs: int | None = None,
               timeout: float | None = None, capture: bool = False, keep_going: bool = True,
               grace: float = 1.0, env: Env | Callable[[int], Env] | None = None,
               cwd: Arg | None = None, stdin: Stdio = DEVNULL, new_session: bool = False,
               die_with_parent: bool = True, spawn_retries: int = 8,
               callback: Callable[[int, CommandResult], object] | None = None,
               ) -> list[CommandResult] | list[CommandResult | None]:
    """Run many commands, at most ``jobs`` at once; return their results in input order.

    ``commands``: argv sequences. Returns a list of ``CommandResult`` (one per
    command, in input order). ``jobs`` defaults to the CPU count. ``timeout``
    limits each command's run time: past it the command gets SIGTERM, then
    SIGKILL after ``grace`` seconds, without holding up the other commands;
    its result has ``timed_out`` True however it then exits. ``capture``
    collects stdout and stderr (bytes) instead of letting them through. With
    ``keep_going=False`` the first failure (non-zero exit, timeout, cannot
    start) stops new launches: the running commands finish, and the commands
    never started get None. ``env`` is a mapping for every command, or a
    callable taking the command's index and returning its mapping; ``cwd``,
    ``stdin`` (DEVNULL by default; not PIPE) and ``new_session`` are as in
    ``spawn``. Creating a process failing with EAGAIN/ENOMEM is retried up to
    ``spawn_retries`` times with back-off while running commands finish;
    after that, that command and those not started yet fail with the error.
    ``callback(index, result)``, if given, is called as each command finishes.

    ``die_with_parent`` (default True, Linux) has the kernel SIGKILL the
    commands if this process dies: they are started by the calling thread,
    which stays inside ``spawn_many`` for their whole lifetime (the death
    signal follows the thread that started them, PR_SET_PDEATHSIG).

    Every command is validated before the first starts (TypeError/ValueError).
    On any exception -- Ctrl-C, or one raised by ``callback`` -- every running
    command is stopped (SIGTERM, one shared ``grace``, SIGKILL) and reaped
    before it propagates.
    """
    many = ManyCommands(commands, jobs=jobs, timeout=timeout, capture=capture,
                        keep_going=keep_going, grace=grace, env=env, cwd=cwd, stdin=stdin,
                        new_session=new_session, die_with_parent=die_with_parent,
                        spawn_retries=spawn_retries, callback=callback)
    try:
        for entry in drive(many.scheduler):
            many.take(entry)
    finally:
        many.scheduler.close()
    return many.results


class ManyCommands:
    """``spawn_many`` apart from its driver: the validated commands on a Scheduler.

    A driver (``_scheduler.drive``, the asyncio one in ``fastfork.aio``) runs
    ``scheduler`` and passes each finished entry to ``take``, which stores
    its CommandResult in ``results`` (input order) and calls the callback.
    Takes the arguments of ``spawn_many`` and validates them all, before
    anything starts.
    """

    def __init__(self, commands, *, jobs, timeout, capture, keep_going, grace, env, cwd,
                 stdin, new_session, die_with_parent, spawn_retries, callback):
        jobs, timeout, grace, spawn_retries, _ = check_fan_out(
            jobs, timeout, grace, spawn_retries, "spawn_retries")
        self._callback = check_optional_callable(callback, "callback")
        stdin = check_stdio(stdin, "stdin")
        if stdin == PIPE:
            raise ValueError("spawn_many cannot give commands a stdin pipe")
        if isinstance(commands, (str, bytes)):
            raise TypeError("commands must be a sequence of argv sequences")
        prepared = []
        for index, argv in enumerate(commands):
            command_env = env(index) if callable(env) else env
            prepared.append(_prepare(argv, None, command_env, cwd))
        output = PIPE if capture else None
        stdio = (stdin, output, output)
        self._prepared = prepared
        self.results = [None] * len(prepared)

        def launch(index):
            return _start(prepared[index], stdio, (), True, new_session, die_with_parent,
                          capture)

        self.scheduler = Scheduler(launch, range(len(prepared)), jobs=jobs, timeout=timeout,
                                   grace=grace, retries=spawn_retries,
                                   stop_on_failure=not keep_going,
                                   is_failure=lambda entry: not self._result_of(entry).ok)

    def _result_of(self, entry):
        """The CommandResult of a finished entry, made once."""
        if entry.data is None:
            command = self._prepared[entry.index]
            if entry.error is not None:
                entry.data = _start_failure(command, entry.error)
            else:
                proc = entry.handle
                entry.data = CommandResult(
                    proc.args, proc.returncode, proc._captured(0), proc._captured(1),
                    entry.finished_at - entry.started_at, entry.timed_out)
        return entry.data

    def take(self, entry):
        """Store the finished entry's CommandResult; call the callback with it."""
        self.results[entry.index] = result = self._result_of(entry)
        if self._callback is not None:
            self._callback(entry.index, result)


def _start_failure(command, exc):
    code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
    return CommandResult(command.args, code, error=exc)
