"""The ForkServer process: import the preload modules once, freeze, fork per request.

Run by ``ForkServer`` as a fresh interpreter (``python -c`` calling ``main(fd)``)
with one end of a SOCK_SEQPACKET socketpair; see ``_server_proto`` for the
messages. Single-threaded: one poll loop over the socket and the children's
pidfds. The server is the only one that reaps its children; it reports each
outcome to the caller, and kills them all when the caller goes away.
"""
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


def _grandchild(inherited, result_fd, inline, payload_fd, buffer_fds, print_traceback,
                setup, setup_failure):
    """The forked child's life: unpickle the call, run it, report; returns the exit code.

    ``setup``: the request's setup steps; ``setup_failure``: (step,
    exception) if the server could not carry one out, else None.
    """
    # The server ignores SIGINT (Ctrl-C is the caller's business); a child
    # behaves like one forked by the caller.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    if setup_failure is not None:
        step, exc = setup_failure
        _core.write_frame(result_fd, ERROR, error_payload(exc, _describe_failed_step(step)))
        return 1
    try:
        fn, args, kwargs = _load_request(inline, payload_fd, buffer_fds)
    except BaseException as exc:
        stage = "could not unpickle the function or its arguments in the fork server"
        if "__mp_main__" in str(exc):
            stage += (" (it imports the main script as __mp_main__, which does not run the "
                      "`if __name__ == '__main__':` block: define functions outside it)")
        _core.write_frame(result_fd, ERROR, error_payload(exc, stage))
        return 1
    if BY_VALUE in setup:
        fn = _returning_by_value(fn)
    return _core.run_function(fn, tuple(args), dict(kwargs), result_fd, print_traceback)


def _describe_failed_step(step):
    if step[0] == "main":
        return (f"the fork server could not import the main script {step[2]} "
                "(it is imported as __mp_main__ to find its functions)")
    return f"the fork server could not import {step[1]}"


class _Server:
    """The request loop."""

    def __init__(self, sock):
        self.sock = sock
        self.live = {}        # pid -> (req_id, pidfd or -1)
        self.by_pidfd = {}    # pidfd -> pid
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.setup_done = {}  # setup step -> None, or the exception it raised

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
        elif kind == "signal":
            _, req_id, signum = message
            for pid, (rid, _) in self.live.items():
                if rid == req_id:
                    # Not reaped yet (only this loop reaps), so the pid is still ours.
                    os.kill(pid, signum)
        return True

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
        inherited = [self.sock.fileno(), *self.by_pidfd]
        registry = []
        try:
            _core.fork_call(
                lambda: _grandchild(inherited, result_fd, inline, payload_fd, buffer_fds,
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
                pidfd = os.pidfd_open(pid)
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
            os.close(pidfd)
        proto.send(self.sock, ("exited", req_id, returncode, rusage))

    def shutdown(self):
        """SIGKILL and reap every child still running."""
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
                os.close(pidfd)
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
    message, _, _ = proto.recv(sock)
    if message is None:
        return 0
    _, path, preload = message
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
    proto.send(sock, ("ready", os.getpid()))
    _Server(sock).serve()
    return 0
