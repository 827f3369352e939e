"""fastfork for asyncio: await children and commands without blocking the event loop.

``run`` forks a child running a function and awaits its result; ``start``
returns a handle to await later; ``spawn`` starts a command whose pipes are
asyncio streams; ``background`` ties a helper process to an ``async with``
block; ``map``, ``as_completed`` and ``spawn_many`` fan out over many items
or commands. The API parallels the synchronous one (``fastfork.start``,
``fastfork.map``, ``fastfork.spawn`` ...) and raises the same errors for the
same bad input, before any process exists. The fan-outs run on the same
engines as the synchronous ones, driven by the event loop instead of
blocking: ``map`` and ``as_completed`` on the C engine of ``fastfork.map``,
``spawn_many`` on ``fastfork._scheduler``.

Every child is watched with ``loop.add_reader`` -- a handle's pidfd (polled
with back-off where there is none) and pipes, or the one epoll fd of the
engine behind ``map`` and ``as_completed`` -- and its pipes are drained as
data arrives: the loop never blocks waiting, and no SIGCHLD handler or thread
is involved. Only children fastfork created are reaped, so this mixes freely
with ``asyncio.create_subprocess_exec``. Commands are created vfork-style:
starting one pauses the loop for about one exec, whatever the parent's size.

Cancellation kills: when a task awaiting a child or a command is cancelled
(``TaskGroup``, ``asyncio.timeout``, Ctrl-C in ``asyncio.run``), the process
gets SIGTERM, ``grace`` seconds (awaited on the loop), then SIGKILL; it is
reaped and its fds closed before the CancelledError propagates. On Python
3.10, whose asyncio.run has no Ctrl-C handling, the KeyboardInterrupt lands
inside some task and asyncio.run abandons the others; their processes are
SIGKILLed and reaped when those coroutines are closed (once nothing refers to
them).
"""
from __future__ import annotations

import _signal
import asyncio
import contextlib
import os
import signal
from collections.abc import (AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping,
                             Sequence)
from typing import IO, Any, Generic, TypeVar, Union

from fastfork import _core
from fastfork import commands as _commands
from fastfork import fanout as _fanout
from fastfork._aiodrive import EngineDriver, LoopDriver
from fastfork._aiowatch import LoopWatch, on_loop, stop as _stop, wait_or_stop
from fastfork._checks import check_callable, check_fan_out, check_timeout
from fastfork.child import reap_dropped, stop_all
from fastfork.commands import DEVNULL, PIPE, STDOUT, CommandResult
from fastfork.errors import TimeoutExpired

__all__ = ["AsyncChild", "AsyncProcess", "run", "start", "start_child", "background",
           "map", "as_completed", "spawn", "spawn_many", "CommandResult", "PIPE", "STDOUT",
           "DEVNULL"]

T = TypeVar("T")
StrOrBytesPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
Stdio = Union[None, int, IO[Any]]

# Seconds between SIGTERM and SIGKILL when the wait of ``run`` is cancelled or
# times out (as in fastfork.map).
RUN_GRACE = 1.0


def _running_loop() -> asyncio.AbstractEventLoop:
    """The running loop; RuntimeError (before anything forks) when there is none."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("fastfork.aio needs a running event loop: call it from a "
                           "coroutine (asyncio.run(main()))") from None


def _leave_the_loop():
    """In a forked child: undo the signal plumbing of the parent's event loop.

    The child inherits the loop's wakeup fd (a signal in the child would wake
    the parent's loop, which would run the parent's handler for it) and the
    handlers the loop and asyncio.run installed (SIGTERM set with
    add_signal_handler would no longer end the child; SIGINT would cancel a
    task of a loop that does not run here). Those go back to their defaults:
    SIG_DFL, and KeyboardInterrupt for SIGINT.
    """
    # Through _signal, the C module under signal: signal's wrappers turn each
    # handler into an enum member, which for a function fails the slow way
    # (formatting an error message). In a forked child that costs some 130
    # page faults, about as much as the rest of a short child's life.
    _signal.set_wakeup_fd(-1)
    for sig in _signal.valid_signals():
        try:
            handler = _signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if not callable(handler):
            continue  # SIG_DFL, SIG_IGN, or not set from Python
        module = getattr(getattr(handler, "func", handler), "__module__", None) or ""
        if module.startswith(("asyncio.", "uvloop.")):
            _signal.signal(sig, _signal.default_int_handler if sig == signal.SIGINT
                           else _signal.SIG_DFL)


def _outside_the_loop(fn, args, kwargs):
    """The function a child forked by fastfork.aio runs: ``fn`` once the loop is left."""
    _leave_the_loop()
    return fn(*args, **kwargs)


class _LeavingTheLoop:
    """``fn`` for a fan-out's children: each leaves the parent's loop first, then calls it."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item):
        _leave_the_loop()
        return self.fn(item)


def _start_outside_the_loop(fn, args=(), kwargs=None, **options):
    """``fastfork.start_child``, the child leaving the parent's loop first."""
    return _fanout.start_child(_outside_the_loop,
                               (fn, tuple(args), {} if kwargs is None else kwargs), **options)


class _Handle:
    """What an async child and an async process share: waiting, signalling, stopping."""

    def __init__(self, child: Any, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self._child = child
        self._watch = LoopWatch(child, loop)
        self.grace = grace

    def __repr__(self) -> str:
        state = "running" if not self.finished else f"returncode={self.returncode}"
        return f"<{type(self).__name__} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """The process id."""
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        """None while running, the exit code, or -N if killed by signal N."""
        return self._child.returncode

    @property
    def finished(self) -> bool:
        """True once the process has exited and been reaped."""
        return self._child.finished

    @property
    def lost(self) -> bool:
        """True if someone else reaped the process, so its exit status is unknown."""
        return self._child.lost

    def _check_loop(self) -> None:
        # No running loop at all is let through: a coroutine closed after its
        # loop ended still stops its process (synchronously, see _stop).
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is not self._watch.loop:
            raise RuntimeError(f"{self!r} belongs to the event loop that started it; "
                               "await it there")

    def send_signal(self, sig: int) -> None:
        """Send ``sig``; nothing once reaped (through the pidfd: never a recycled pid)."""
        self._child.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self._child.terminate()

    def kill(self) -> None:
        """Send SIGKILL."""
        self._child.kill()

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit and reap it; return ``returncode``.

        Raises fastfork.TimeoutExpired if it still runs after ``timeout``
        seconds (it keeps running). If the waiting task is cancelled, the
        process is stopped (SIGTERM, ``grace`` seconds, SIGKILL) and reaped
        before the CancelledError propagates.
        """
        timeout = check_timeout(timeout)
        self._check_loop()
        if not await wait_or_stop(self._watch, self.grace, timeout):
            raise TimeoutExpired(self.pid, timeout, cmd=getattr(self, "args", None))
        return self.returncode

    async def stop(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGTERM), wait up to ``grace`` seconds, then SIGKILL; reap.

        Returns ``returncode``. The grace is awaited, so the loop runs meanwhile.
        """
        grace = check_timeout(grace, "grace")
        sig = signal.Signals(sig)
        self._check_loop()
        await _stop(self._watch, grace, sig)
        return self.returncode

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class AsyncChild(_Handle, Generic[T]):
    """A forked child running a function, on the running event loop.

    Attributes: ``pid``, ``returncode``, ``finished``, ``lost`` (as
    ``fastfork.Child``); ``grace``: the seconds between SIGTERM and SIGKILL
    when a wait on it is cancelled. ``async with`` stops it on leaving.
    """

    async def result(self, timeout: float | None = None) -> T:
        """Wait for the child and return what its function returned.

        Raises ChildError if the function raised (with the child's traceback),
        the child died or exited without a result; fastfork.TimeoutExpired
        after ``timeout`` seconds (the child keeps running). Cancellation
        stops the child, as for ``wait``.
        """
        await self.wait(timeout)
        return self._child.result()


def start_child(fn: Callable[..., T], args: Iterable[Any] = (),
                kwargs: Mapping[str, Any] | None = None, *, die_with_parent: bool = False,
                print_traceback: bool = False, grace: float = RUN_GRACE) -> AsyncChild[T]:
    """Fork a child that runs ``fn(*args, **kwargs)``; return its AsyncChild.

    ``die_with_parent`` and ``print_traceback`` are as in
    ``fastfork.start_child``; ``grace`` is the handle's grace on cancellation.
    Raises TypeError/ValueError for bad arguments and RuntimeError outside a
    running event loop, before any process exists; OSError if fork fails.
    """
    loop = _running_loop()
    check_callable(fn)
    grace = check_timeout(grace, "grace")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    child = _start_outside_the_loop(fn, args, kwargs, die_with_parent=die_with_parent,
                                    print_traceback=print_traceback)
    try:
        return AsyncChild(child, loop, grace)
    except BaseException:
        child._abandon()
        raise


def start(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> AsyncChild[T]:
    """Fork a child that runs ``fn(*args, **kwargs)``; return its AsyncChild.

    Call it from a coroutine. For options use ``start_child``. Raises
    TypeError for a non-callable, RuntimeError outside a running loop;
    OSError if fork fails.
    """
    return start_child(fn, args, kwargs)


async def run(fn: Callable[..., T], /, *args: Any, timeout: float | None = None,
              **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a forked child; return its result.

    Raises ChildError as ``fastfork.map`` does (the function raised, the
    child died); past ``timeout`` seconds the child is stopped (SIGTERM, one
    second, SIGKILL) and fastfork.ChildTimeout (a ChildError and a
    TimeoutError) is raised. Cancelling the awaiting task stops the child the
    same way. TypeError/ValueError for bad arguments before anything forks.
    """
    timeout = check_timeout(timeout, allow_zero=False)
    handle = start_child(fn, args, kwargs)
    if not await wait_or_stop(handle._watch, RUN_GRACE, timeout):
        handle._child.timed_out = True
        await _stop(handle._watch, RUN_GRACE)
    return handle._child.result()


@contextlib.asynccontextmanager
async def background(fn: Callable[..., Any], /, *args: Any,
                     kwargs: Mapping[str, Any] | None = None,
                     stop_signal: int = signal.SIGTERM, grace: float = 5.0,
                     die_with_parent: bool = True) -> AsyncIterator[AsyncChild[Any]]:
    """Run ``fn(*args, **kwargs)`` in a child for the length of an ``async with`` block.

    Yields the AsyncChild. On leaving the block, normally, by exception or by
    cancellation, the child gets ``stop_signal``, ``grace`` seconds (awaited)
    and SIGKILL, and is reaped. ``die_with_parent`` (default True) as in
    ``fastfork.background``. Raises TypeError/ValueError before anything forks.
    """
    check_callable(fn)
    grace = check_timeout(grace, "grace")
    stop_signal = signal.Signals(stop_signal)
    handle = start_child(fn, args, kwargs, die_with_parent=die_with_parent)
    try:
        yield handle
    finally:
        await handle.stop(grace, stop_signal)


# ---------------------------------------------------------------- fan-out

def as_completed(fn: Callable[[Any], T], iterable: Iterable[Any], *, jobs: int | None = None,
                 timeout: float | None = None, return_exceptions: bool = False,
                 fork_retries: int = 8, grace: float = 1.0, die_with_parent: bool = True,
                 print_traceback: bool = False) -> AsyncGenerator[tuple[int, Any], None]:
    """Run ``fn(item)`` in a forked child per item; yield (index, result) as they finish.

    ``async for index, value in aio.as_completed(...)``. The options and
    the rules (at most ``jobs`` at once, per-child ``timeout`` with
    ChildTimeout, EAGAIN/ENOMEM retried, the first failure stopping new
    launches and raised once the running children are reported, or per-item
    errors with ``return_exceptions``) are those of ``fastfork.as_completed``:
    the same engine, driven by the event loop. When the iteration ends
    early -- cancelled, an exception, or the generator closed
    (``contextlib.aclosing``) -- every running child is stopped (SIGTERM,
    ``grace`` awaited, SIGKILL) and reaped. Raises TypeError/ValueError for
    bad arguments here, before any process is created.
    """
    return _fan_out(fn, iterable, False, jobs=jobs, timeout=timeout,
                    return_exceptions=return_exceptions, fork_retries=fork_retries, grace=grace,
                    die_with_parent=die_with_parent, print_traceback=print_traceback)


def _fan_out(fn, iterable, until_done, *, jobs, timeout, return_exceptions, fork_retries, grace,
             die_with_parent, print_traceback):
    """Validate a fan-out's arguments (before any fork); return its as_completed generator."""
    check_callable(fn)
    jobs, timeout, grace, fork_retries, _ = check_fan_out(
        jobs, timeout, grace, fork_retries, "fork_retries")
    return _as_completed(fn, iter(iterable), return_exceptions, print_traceback, until_done,
                         jobs=jobs, timeout=timeout, fork_retries=fork_retries, grace=grace,
                         die_with_parent=die_with_parent)


async def _as_completed(fn, items, return_exceptions, print_traceback, until_done, *, jobs,
                        timeout, fork_retries, grace, die_with_parent):
    """as_completed over the iterator ``items`` with the C engine of fastfork.map, on the loop.

    ``until_done`` (map): the loop steps the engine at each child's exit
    without waking this task; every outcome comes in one batch at the end.
    """
    reap_dropped()
    # Other tasks run between two forks and may print: stdio is flushed
    # before every fork (the engine's default).
    engine = _core.FanOut(_LeavingTheLoop(fn), items, jobs, timeout, grace, fork_retries,
                          signal.SIGKILL if die_with_parent else 0, print_traceback,
                          not return_exceptions)
    reports = _fanout.EngineReports(engine, items, return_exceptions)
    driver = EngineDriver(engine, until_done, grace)
    try:
        while not engine.done_running:
            for reported in reports.take(await driver.finished()):
                yield reported
        reports.finish()
    finally:
        await driver.close()


async def map(fn: Callable[[Any], T], iterable: Iterable[Any], *, jobs: int | None = None,
              timeout: float | None = None, return_exceptions: bool = False,
              fork_retries: int = 8, grace: float = 1.0, die_with_parent: bool = True,
              print_traceback: bool = False) -> list[Any]:
    """Run ``fn(item)`` in a forked child per item; return the results in input order.

    ``fastfork.map`` on the event loop: the same options, errors and rules
    (see ``as_completed``). Cancelling the awaiting task stops and reaps
    every running child before the CancelledError propagates. Raises
    TypeError/ValueError for bad arguments before any process is created.
    """
    completed = _fan_out(fn, iterable, True, jobs=jobs, timeout=timeout,
                         return_exceptions=return_exceptions, fork_retries=fork_retries,
                         grace=grace, die_with_parent=die_with_parent,
                         print_traceback=print_traceback)
    results = {}
    async with contextlib.aclosing(completed):
        async for index, value in completed:
            results[index] = value
    return [results[i] for i in range(len(results))]


# ---------------------------------------------------------------- commands

class _PipeProtocol(asyncio.StreamReaderProtocol):
    """A command's pipe: closed at end of file, with a future set once it is closed."""

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader)
        self.closed = loop.create_future()

    def eof_received(self) -> bool:
        super().eof_received()
        return False  # close the pipe now (some loops keep it open otherwise)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class AsyncProcess(_Handle):
    """A running command started by ``aio.spawn``.

    Attributes: ``args`` (argv as given); ``stdin``: an asyncio.StreamWriter
    for stdin=PIPE, else None; ``stdout``, ``stderr``: asyncio.StreamReaders
    for PIPE, else None; ``pid``, ``returncode``, ``grace`` as AsyncChild's.
    ``async with`` closes stdin, stops the command and closes its pipes.
    """

    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    def __init__(self, process: _commands.Process, loop: asyncio.AbstractEventLoop,
                 grace: float) -> None:
        super().__init__(process, loop, grace)
        self.args = process.args
        self.stdin = self.stdout = self.stderr = None
        self._loop = loop
        # "stdin"/"stdout"/"stderr" -> (transport, protocol), once connected.
        self._pipes: dict[str, tuple[asyncio.BaseTransport, _PipeProtocol]] = {}

    async def _connect(self, limit: int) -> None:
        """Turn the Process's pipe files into asyncio streams."""
        process = self._child
        if process.stdin is not None:
            # (The protocol's reader stays unused: this pipe is only written.)
            writer, protocol = await self._loop.connect_write_pipe(
                lambda: _PipeProtocol(asyncio.StreamReader(), self._loop), process.stdin)
            self._pipes["stdin"] = writer, protocol
            self.stdin = asyncio.StreamWriter(writer, protocol, None, self._loop)
        for name in ("stdout", "stderr"):
            fileobj = getattr(process, name)
            if fileobj is not None:
                reader = asyncio.StreamReader(limit=limit)
                transport, protocol = await self._loop.connect_read_pipe(
                    lambda: _PipeProtocol(reader, self._loop), fileobj)
                self._pipes[name] = transport, protocol
                setattr(self, name, reader)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input`` to stdin and close it, read stdout and stderr to the end, wait.

        Returns (stdout, stderr): bytes for a pipe, else None. Everything is
        read as it arrives, so output of any size never deadlocks. A command
        that stops reading its input is not an error. Raises ValueError if
        ``input`` is given without stdin=PIPE. Cancellation stops the command
        (SIGTERM, ``grace``, SIGKILL) and closes its pipes.
        """
        if input is not None and self.stdin is None:
            raise ValueError("input given but the process has no stdin pipe (stdin=PIPE)")
        try:
            out, err, _ = await asyncio.gather(
                self._read_to_end("stdout"), self._read_to_end("stderr"), self._feed(input))
            await self.wait()
        except BaseException:
            await self._abort()
            raise
        return out, err

    async def _read_to_end(self, name: str) -> bytes | None:
        reader = getattr(self, name)
        if reader is None:
            return None
        data = await reader.read()
        await asyncio.shield(self._pipes[name][1].closed)
        return data

    async def _feed(self, input: bytes | None) -> None:
        if self.stdin is None:
            return
        if input:
            self.stdin.write(input)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await self.stdin.drain()
        self.stdin.close()
        await asyncio.shield(self._pipes["stdin"][1].closed)

    async def close_pipes(self) -> None:
        """Close whichever of stdin, stdout and stderr are still open; wait until closed."""
        if not on_loop(self._loop):
            self._close_pipes_now()
            return
        for name in ("stdin", "stdout", "stderr"):
            if name in self._pipes:
                self._pipes[name][0].close()
            else:
                # Not (yet) a stream: a spawn cut short while connecting.
                fileobj = getattr(self._child, name)
                if fileobj is not None:
                    with contextlib.suppress(BrokenPipeError):
                        fileobj.close()
        for _, protocol in self._pipes.values():
            await asyncio.shield(protocol.closed)

    def _close_pipes_now(self) -> None:
        """Close the pipes' files directly: their loop has ended (it cannot close transports)."""
        for name in ("stdin", "stdout", "stderr"):
            if name in self._pipes:
                fileobj = self._pipes[name][0].get_extra_info("pipe")
            else:
                fileobj = getattr(self._child, name)
            if fileobj is not None:
                with contextlib.suppress(OSError):
                    fileobj.close()

    async def _abort(self) -> None:
        """Stop the command with ``grace`` and close its pipes (a cancelled operation)."""
        try:
            await _stop(self._watch, self.grace)
        finally:
            await self.close_pipes()

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self.stdin is not None:
                self.stdin.close()  # a command reading stdin sees end of file
            await self.stop()
        finally:
            await self.close_pipes()


async def spawn(argv: Sequence[StrOrBytesPath], *, executable: StrOrBytesPath | None = None,
                env: Mapping[Any, Any] | None = None, cwd: StrOrBytesPath | None = None,
                stdin: Stdio = None, stdout: Stdio = None, stderr: Stdio = None,
                pass_fds: Sequence[int] = (), close_fds: bool = True,
                new_session: bool = False, die_with_parent: bool = False,
                limit: int = 2**16, grace: float = RUN_GRACE) -> AsyncProcess:
    """Start a command; return its AsyncProcess once its pipes are streams.

    The arguments are ``fastfork.spawn``'s; ``limit`` is the buffer limit of
    the stdout/stderr StreamReaders (as in asyncio), ``grace`` the handle's
    grace on cancellation. Raises TypeError/ValueError for bad arguments and
    RuntimeError outside a running loop before any process exists; OSError
    like ``fastfork.spawn`` when the command cannot run.
    """
    loop = _running_loop()
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    grace = check_timeout(grace, "grace")
    process = _commands.spawn(argv, executable=executable, env=env, cwd=cwd, stdin=stdin,
                              stdout=stdout, stderr=stderr, pass_fds=pass_fds,
                              close_fds=close_fds, new_session=new_session,
                              die_with_parent=die_with_parent)
    try:
        handle = AsyncProcess(process, loop, grace)
    except BaseException:
        stop_all([process], 0)
        process.close_pipes()
        raise
    try:
        await handle._connect(limit)
    except BaseException:
        await handle._abort()
        raise
    return handle


async def spawn_many(commands: Iterable[Sequence[StrOrBytesPath]], *, jobs: int | None = None,
                     timeout: float | None = None, capture: bool = False,
                     keep_going: bool = True, grace: float = 1.0,
                     env: Mapping[Any, Any] | Callable[[int], Mapping[Any, Any]] | None = None,
                     cwd: StrOrBytesPath | None = None, stdin: Stdio = DEVNULL,
                     new_session: bool = False, die_with_parent: bool = True,
                     spawn_retries: int = 8,
                     callback: Callable[[int, CommandResult], object] | None = None,
                     ) -> list[CommandResult | None]:
    """Run many commands, at most ``jobs`` at once; return their CommandResults in input order.

    ``fastfork.spawn_many`` on the event loop: the same arguments, results
    and rules, the same scheduler. Captured output is read as it arrives.
    Cancelling the awaiting task (or ``callback`` raising) stops every
    running command (SIGTERM, ``grace`` awaited, SIGKILL) and reaps it
    before the exception propagates. Every command is validated before the
    first starts (TypeError/ValueError).
    """
    many = _commands.ManyCommands(commands, jobs=jobs, timeout=timeout, capture=capture,
                                  keep_going=keep_going, grace=grace, env=env, cwd=cwd,
                                  stdin=stdin, new_session=new_session,
                                  die_with_parent=die_with_parent,
                                  spawn_retries=spawn_retries, callback=callback)
    driver = LoopDriver(many.scheduler)
    try:
        while entries := await driver.finished():
            for entry in entries:
                many.take(entry)
    finally:
        await driver.close()
    return many.results
