"""The ForkServer process: import the preload modules once, freeze, fork per request.

Run by ``ForkServer`` as a fresh interpreter (``python -c`` calling ``main(fd)``)
with one end of a SOCK_SEQPACKET socketpair; see ``_server_proto`` for the
messages. Single-threaded: one poll loop over the socket and the pidfds of
the children started one by one; a fan-out's children are the C engine's
(``_core.FanOut``), which runs one step per "step" message. The server is the
only one that reaps its children; it reports each outcome to the caller, and
kills them all when the caller goes away.
"""
import collections
import contextlib
import errno
import gc
import importlib
import io
import os
import pickle
import select
import signal
import socket
import sys
import traceback

from fastfork import _core
from fastfork import _server_proto as proto
from fastfork._pickling import BY_VALUE, run_setup
from fastfork._result import ERROR, error_payload
from fastfork.child import close_inherited_fds, close_owned, own_fd
from fastfork.shared import SharedBuffer

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
# Without pidfds, how often (ms) the server polls its children with WNOHANG.
_POLL_MS = 20


class _Unpickler(pickle.Unpickler):
    """Unpickles a request, mapping SharedBuffer references onto the memfds sent along."""

    def __init__(self, file, buffer_fds):
        super().__init__(file)
        self._buffer_fds = buffer_fds

    def persistent_load(self, pid):
        tag, index, size = pid
        if tag != "fastfork.SharedBuffer":
            raise pickle.UnpicklingError(f"unknown persistent id {tag!r}")
        return SharedBuffer._map_fd(self._buffer_fds[index], size)


def _load_request(inline, payload_fd, buffer_fds):
    """Return (fn, args, kwargs) from the inline bytes or the payload memfd."""
    if inline is None:
        # The caller's write left the shared file offset at the end.
        with os.fdopen(payload_fd, "rb", closefd=False) as f:
            f.seek(0)
            inline = f.read()
    if not buffer_fds:
        # Nothing to map: the plain C unpickler, which writes fewer of the
        # pages the child shares with the server.
        return pickle.loads(inline)
    return _Unpickler(io.BytesIO(inline), buffer_fds).load()


class _ByValue:
    """A result that pickles with cloudpickle: classes and functions the call
    brought by value go back the same way (cloudpickle maps them back onto
    the caller's originals)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        import cloudpickle  # type: ignore[import-untyped]
        return pickle.loads, (cloudpickle.dumps(self.value, protocol=pickle.HIGHEST_PROTOCOL),)


def _returning_by_value(fn):
    def call(*args, **kwargs):
        return _ByValue(fn(*args, **kwargs))
    return call


class _LoadFailed(Exception):
    """The child could not set up or unpickle its call; args[0] is the error frame's payload."""

    def __str__(self):
        return "the fork server's child could not load its call"


def _load_call(inline, payload_fd, buffer_fds, setup, setup_failure):
    """In the child: return the call (fn, args, kwargs) to run, ready to return by value.

    ``setup``: the request's setup steps; ``setup_failure``: (step,
    exception) if the server could not carry one out, else None.
    Raises _LoadFailed with the payload of the error to report.
    """
    if setup_failure is not None:
        step, exc = setup_failure
        raise _LoadFailed(error_payload(exc, _describe_failed_step(step)))
    try:
        fn, args, kwargs = _load_request(inline, payload_fd, buffer_fds)
    except BaseException as exc:
        stage = "could not unpickle the function or its arguments in the fork server"
        if "__mp_main__" in str(exc):
            stage += (" (it imports the main script as __mp_main__, which does not run the "
                      "`if __name__ == '__main__':` block: define functions outside it)")
        raise _LoadFailed(error_payload(exc, stage)) from None
    if BY_VALUE in setup:
        fn = _returning_by_value(fn)
    return fn, tuple(args), dict(kwargs)


def _child_signals(setsig=signal.signal, sigint=int(signal.SIGINT),
                   interrupt=int(proto.INTERRUPT_SIGNAL), on_sigint=signal.default_int_handler,
                   default=signal.SIG_DFL):
    """In a child: the signal dispositions of a child forked by the caller.

    The server ignores SIGINT (Ctrl-C is the caller's business) and catches
    the interrupt signal for itself. (Bound at definition: each global
    looked up in a child is one more shared page written.)
    """
    setsig(sigint, on_sigint)
    setsig(interrupt, default)


def _grandchild(result_fd, inline, payload_fd, buffer_fds, print_traceback, setup,
                setup_failure):
    """The life of a child started by "start": load the call, run it, report; the exit code."""
    _child_signals()
    close_inherited_fds()
    try:
        fn, args, kwargs = _load_call(inline, payload_fd, buffer_fds, setup, setup_failure)
    except _LoadFailed as failed:
        _core.write_frame(result_fd, ERROR, failed.args[0])
        return 1
    return _core.run_function(fn, args, kwargs, result_fd, print_traceback)


def _run_item(item):
    """The function a fan-out's engine runs in each child: load the item's call and run it.

    A call that cannot be loaded raises _LoadFailed, whose payload the server
    puts in the place of the engine's report (``_fan_out_outcome``).
    """
    _child_signals()
    inline, buffer_fds, setup, setup_failure = item
    fn, args, kwargs = _load_call(inline, -1, buffer_fds, setup, setup_failure)
    return fn(*args, **kwargs)


_LOAD_FAILED = f"{_LoadFailed.__module__}.{_LoadFailed.__qualname__}"


def _fan_out_outcome(kind, payload):
    """The payload to report for a fan-out child's frame: the load failure's own, if any."""
    if kind == ERROR and _LOAD_FAILED.encode() in payload:
        info = pickle.loads(payload)  # plain data: the exception travels as bytes
        if info["exc_type"] == _LOAD_FAILED and info["exception"] is not None:
            return pickle.loads(info["exception"]).args[0]
    return payload


class _NeedItems(Exception):
    """Raised by a fan-out's items when the caller has not sent the next one yet."""


class _Interrupted(BaseException):
    """Raised by the interrupt signal's handler to leave a fan-out's step or close."""


class _Items:
    """A fan-out's items as its engine draws them: those the caller sent so far.

    The engine gets each as (payload, buffer fds, setup, setup failure), the
    server having carried out the setup first.
    """

    def __init__(self, server):
        self.server = server
        self.queue = collections.deque()
        self.ended = False
        self.drawn = 0
        self.fds = {}  # index -> the buffer fds its child needs, until it is reported

    def add(self, items, fds, ended):
        """Queue the items of a "step" message; ``fds`` are their memfds, in order."""
        at = 0
        for payload, n_fds, setup in items:
            self.queue.append((payload, fds[at:at + n_fds], setup, None))
            at += n_fds
        self.ended = ended

    def __iter__(self):
        return self

    def __next__(self):
        # Runs between two forks, while earlier children share the server's
        # pages: the less it writes, the fewer pages they copy.
        if not self.queue:
            if self.ended:
                raise StopIteration
            raise _NeedItems
        item = self.queue[0]
        if item[2]:
            with self.server.uninterrupted():
                item = (*item[:3], self.server.prepare(item[2]))
        self.queue.popleft()
        if item[1]:
            self.fds[self.drawn] = item[1]
        self.drawn += 1
        return item

    def release(self, index):
        """Close the memfds of item ``index`` (its child has been reported)."""
        for fd in self.fds.pop(index, ()):
            os.close(fd)

    def close(self):
        """Close every memfd still held."""
        for index in list(self.fds):
            self.release(index)
        for _, fds, _, _ in self.queue:
            for fd in fds:
                os.close(fd)
        self.queue.clear()


def _describe_failed_step(step):
    if step[0] == "main":
        return (f"the fork server could not import the main script {step[2]} "
                "(it is imported as __mp_main__ to find its functions)")
    return f"the fork server could not import {step[1]}"


class _FanOut:
    """A fan-out the caller drives: the engine and the items it was sent."""

    def __init__(self, server, options):
        jobs, timeout, grace, fork_retries, print_traceback, stop_on_failure = options
        self.items = _Items(server)
        # Between two forks only this server's own code runs (no user code, no
        # printing: setup steps flush what they print), hence flush_each_fork off.
        self.engine = _core.FanOut(_run_item, self.items, jobs, timeout, grace, fork_retries,
                                   signal.SIGKILL, print_traceback, stop_on_failure, False)

    def close(self, grace):
        try:
            self.engine.close(grace)
        finally:
            self.items.close()


class _Server:
    """The request loop."""

    def __init__(self, sock, board):
        self.sock = sock
        self.live = {}        # pid -> (req_id, pidfd or -1)
        self.by_pidfd = {}    # pidfd -> pid
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.setup_done = {}  # setup step -> None, or the exception it raised
        self.fan_outs = {}    # fan_id -> _FanOut
        self.board = board    # the fan-outs the caller interrupts (see _server_proto)
        # The fan-out whose step (or close: ``closing``) runs now, which the
        # interrupt signal may cut short; None outside those.
        self.current = None
        self.closing = False
        self.signalled = False  # the interrupt signal came since the current block began
        # Every child fastfork forks here closes the socket first thing.
        own_fd(sock.fileno())

    def on_interrupt(self, signum, frame):
        self.signalled = True
        if self.current is not None and self.interrupt_posted():
            raise _Interrupted

    def interrupt_posted(self):
        """True if the caller asks to cut the current step (or close) short."""
        fan_id = self.current
        posted = self.board.posted()
        return -fan_id in posted or (not self.closing and fan_id in posted)

    @contextlib.contextmanager
    def interruptible(self, fan_id, closing=False):
        """Let the interrupt signal raise _Interrupted in the block, if posted for ``fan_id``."""
        self.current, self.closing = fan_id, closing
        self.signalled = False
        try:
            if self.interrupt_posted():  # the signal may have come already
                raise _Interrupted
            yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def uninterrupted(self):
        """Hold the interrupt signal back inside an interruptible block."""
        fan_id, self.current = self.current, None
        try:
            yield
        finally:
            self.current = fan_id
        if fan_id is not None and self.signalled and self.interrupt_posted():
            raise _Interrupted

    def serve(self):
        """Serve until the caller closes its end; then kill and reap every child."""
        try:
            while True:
                blind = any(pidfd < 0 for _, pidfd in self.live.values())
                for fd, _ in self.poller.poll(_POLL_MS if blind else None):
                    if fd == self.sock.fileno():
                        if not self.handle_request():
                            return
                    else:
                        self.reap(self.by_pidfd[fd])
                if blind:
                    for pid, (_, pidfd) in list(self.live.items()):
                        if pidfd < 0:
                            self.reap(pid)
        except (BrokenPipeError, ConnectionResetError):
            return  # the caller is gone
        finally:
            self.shutdown()

    def handle_request(self):
        """Handle one message; False when the caller has gone (EOF)."""
        message, fds, fds_lost = proto.recv(self.sock)
        if message is None:
            return False
        kind = message[0]
        if kind == "start":
            _, req_id, inline, setup, print_traceback = message
            if fds_lost or not fds:
                for fd in fds:
                    os.close(fd)
                proto.send(self.sock, ("failed", req_id, errno.EMFILE,
                                       "the fork server ran out of file descriptors"))
            else:
                self.start(req_id, inline, print_traceback, fds, setup)
        elif kind == "step":
            self.step(message, fds, fds_lost)
        elif kind == "stop":
            fan = self.fan_outs.get(message[1])
            if fan is not None:
                fan.engine.stop_launching()
        elif kind == "close":
            self.close_fan_out(message[1], message[2])
        elif kind == "signal":
            _, req_id, signum = message
            for pid, (rid, _) in self.live.items():
                if rid == req_id:
                    # Not reaped yet (only this loop reaps), so the pid is still ours.
                    os.kill(pid, signum)
        return True

    # ------------------------------------------------------------ fan-outs

    def step(self, message, fds, fds_lost):
        """Run a fan-out's engine one step with the items sent along; report what it gave."""
        _, fan_id, until_done, items, ended, options = message
        fan = self.fan_outs.get(fan_id)
        if fan is None and options is None:
            for fd in fds:
                os.close(fd)
            return  # a step sent before its fan-out was closed by an interrupt
        try:
            if fds_lost:
                for fd in fds:
                    os.close(fd)
                raise OSError(errno.EMFILE, "the fork server ran out of file descriptors")
            if fan is None:
                fan = self.fan_outs[fan_id] = _FanOut(self, options)
            fan.items.add(items, fds, ended)
            need_items = False
            try:
                with self.interruptible(fan_id):
                    handed = fan.engine.step(until_done)
            except _NeedItems:
                handed, need_items = [], True
        except _Interrupted:
            return  # the caller is closing it: its "close" follows
        except OSError as exc:
            proto.send(self.sock, ("raised", fan_id, exc.errno, exc.strerror))
            return
        except Exception:
            proto.send(self.sock, ("raised", fan_id, None, traceback.format_exc()))
            return
        outcomes = []
        for index, _, pid, returncode, kind, payload, timed_out, lost in handed:
            fan.items.release(index)
            if kind is not None:
                payload = _fan_out_outcome(kind, payload)
            outcomes.append((index, pid, returncode, kind, payload, timed_out, lost))
        engine = fan.engine
        error = engine.fork_error
        proto.send(self.sock, (
            "stepped", fan_id, outcomes, need_items, fan.items.drawn, engine.started,
            engine.done_running, None if error is None else (error.errno, error.strerror),
            None if engine.pending is None else engine.pending[0]))

    def close_fan_out(self, fan_id, grace):
        """Stop a fan-out's children (``grace``), reap them and report "closed".

        The interrupt signal, sent again, cuts the grace short.
        """
        fan = self.fan_outs.pop(fan_id, None)
        if fan is not None:
            try:
                with self.interruptible(fan_id, closing=True):
                    fan.close(grace)
            except _Interrupted:
                fan.close(0)  # closing twice is harmless: this kills whatever is left
        proto.send(self.sock, ("closed", fan_id))

    # ------------------------------------------------------------ single children

    def prepare(self, setup):
        """Carry out the setup steps not done yet; return (step, exception) of a failed one.

        Each step runs once per server: a failure is remembered and reported
        by every child that needs the step.
        """
        ran = False
        for step in setup:
            # One main script per server, imported once (even if sys.argv changed since).
            key = step[:1] if step[0] == "main" else step
            if key not in self.setup_done:
                ran = True
                try:
                    run_setup(step)
                    self.setup_done[key] = None
                except BaseException as exc:  # SystemExit from a script, too
                    self.setup_done[key] = exc
            if self.setup_done[key] is not None:
                return step, self.setup_done[key]
        if ran:
            # What the import printed must not be printed again by the children.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            # What the import made joins what the children share untouched.
            gc.collect()
            gc.freeze()
        return None

    def start(self, req_id, inline, print_traceback, fds, setup=()):
        """Prepare ``setup``, fork the child for one request, report its pid (and pidfd)."""
        setup_failure = self.prepare(setup)
        result_fd = fds[0]
        payload_fd = fds[1] if inline is None else -1
        buffer_fds = fds[2:] if inline is None else fds[1:]
        registry = []
        try:
            _core.fork_call(
                lambda: _grandchild(result_fd, inline, payload_fd, buffer_fds,
                                    print_traceback, setup, setup_failure),
                registry, signal.SIGKILL)
        except OSError as exc:
            proto.send(self.sock, ("failed", req_id, exc.errno, exc.strerror))
            return
        finally:
            for fd in fds:
                os.close(fd)
        pid = registry[0]
        pidfd = -1
        if _HAVE_PIDFD:
            try:
                pidfd = own_fd(os.pidfd_open(pid))
            except OSError:
                pidfd = -1  # EMFILE: fall back to polling this one
        self.live[pid] = (req_id, pidfd)
        if pidfd >= 0:
            self.by_pidfd[pidfd] = pid
            self.poller.register(pidfd, select.POLLIN)
        proto.send(self.sock, ("started", req_id, pid), [pidfd] if pidfd >= 0 else [])

    def reap(self, pid):
        """Reap ``pid`` if it has exited and report its outcome."""
        try:
            done, status, rusage = os.wait4(pid, os.WNOHANG)
            returncode = os.waitstatus_to_exitcode(status) if done else None
        except ChildProcessError:  # cannot happen unless SIGCHLD was set to SIG_IGN
            done, returncode, rusage = pid, None, None
        if not done:
            return
        req_id, pidfd = self.live.pop(pid)
        if pidfd >= 0:
            self.poller.unregister(pidfd)
            del self.by_pidfd[pidfd]
            close_owned(pidfd)
        proto.send(self.sock, ("exited", req_id, returncode, rusage))

    def shutdown(self):
        """SIGKILL and reap every child still running."""
        for fan in self.fan_outs.values():
            fan.close(0)
        self.fan_outs.clear()
        for pid, (_, pidfd) in self.live.items():
            try:
                if pidfd >= 0:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, (_, pidfd) in list(self.live.items()):
            try:
                _core.waitpid(pid, 0)
            except ChildProcessError:
                pass
            if pidfd >= 0:
                close_owned(pidfd)
        self.live.clear()


def main(fd):
    """Serve the caller on socket ``fd``; returns the process exit code."""
    # A mask survives exec: a server started from a thread that blocks
    # signals (a ForkExecutor's) would pass it on to every child.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    message, fds, _ = proto.recv(sock)
    if message is None:
        return 0
    _, path, preload = message
    board = proto.Board(fds[0])
    sys.path[:] = path
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException:
        proto.send(sock, ("error", traceback.format_exc()))
        return 1
    # Keep the children's refcount and GC writes off the pages they share with
    # the server (gc.freeze docs: "use it before a POSIX fork() call").
    gc.collect()
    gc.freeze()
    server = _Server(sock, board)
    signal.signal(proto.INTERRUPT_SIGNAL, server.on_interrupt)
    proto.send(sock, ("ready", os.getpid()))
    server.serve()
    return 0
