"""The ForkServer wire protocol: pickled tuples over a SOCK_SEQPACKET socketpair.

One message per packet, fds riding along with SCM_RIGHTS. Both ends run the
same fastfork as the same user, so control messages are pickles.

Caller -> server:
    ("init", sys_path, preload)                 once, first; fds: the Board's memfd
    ("start", req_id, inline, setup, print_traceback)
                                                fds: result pipe write end,
                                                [payload memfd if inline is None],
                                                SharedBuffer memfds; ``setup``: what
                                                the server prepares once before it
                                                forks (see ``_pickling``)
    ("signal", req_id, signum)                  for a child without a pidfd
    ("step", fan_id, until_done, items, ended, options)
                                                run a fan-out's engine one step (see
                                                below); fds: the items' SharedBuffer memfds
    ("stop", fan_id)                            the fan-out launches nothing more
    ("close", fan_id, grace)                    stop its children, reap them, forget it
Server -> caller:
    ("ready", server_pid) | ("error", traceback_text)
    ("started", req_id, pid)                    fds: the child's pidfd (if any)
    ("failed", req_id, errno, strerror)         fork (or fd passing) failed
    ("exited", req_id, returncode, rusage)
    ("stepped", fan_id, outcomes, need_items, drawn, started, done_running,
     fork_error, pending_index)                 what one step of the engine gave
    ("raised", fan_id, errno, text)             the step raised OSError (errno) or
                                                something else (errno None)
    ("closed", fan_id)

A fan-out (ForkServer.map, as_completed) runs the C engine (_core.FanOut) in
the server, so its children are forked and reaped there without a message
per child. The caller drives it step by step as it drives the local engine:
each "step" carries the next items, each pickled on its own as for "start"
(payload, number of memfds, setup), and the first one the options (jobs,
timeout, grace, fork_retries, print_traceback, stop_on_failure). A step that
runs out of items before the input has ended answers ``need_items``.
``outcomes`` are (index, pid, returncode, kind, payload, timed_out, lost) as
the engine gives them. A caller interrupted while the server may be inside
a step posts the fan-out's id on the ``Board`` (a page both share), sends
"close" and then INTERRUPT_SIGNAL: the server leaves the step, then reads
the "close". Posting ``-fan_id`` as well (a second interrupt) cuts the
close's grace short. The board says which fan-out a signal is for, so a
signal that arrives late never stops another one.

A message larger than a packet travels in a memfd: the packet is SPILLED
and the memfd comes last among its fds.

The caller closing its end (EOF) tells the server to kill its children and exit.
"""
import array
import errno
import os
import pickle
import signal
import socket
import struct

from fastfork import _core

# Payloads up to this size travel inside the packet; larger ones in a memfd,
# since a SEQPACKET message must fit the socket buffer (EMSGSIZE otherwise).
INLINE_MAX = 32 * 1024
RECV_MAX = INLINE_MAX + 4096
# SCM_MAX_FD in the kernel (include/net/scm.h).
MAX_FDS = 253
# The packet of a message that travels in a memfd (a pickle never starts with it).
SPILLED = b"M"
# What interrupts a server inside a fan-out's step (see the module docstring).
INTERRUPT_SIGNAL = signal.SIGUSR1


def send(sock, message, fds=()):
    """Send one pickled message with ``fds`` attached."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > INLINE_MAX:
        spill = os.memfd_create("fastfork-message", os.MFD_CLOEXEC)
        try:
            with os.fdopen(spill, "wb", closefd=False) as f:
                f.write(data)
            socket.send_fds(sock, [SPILLED], [*fds, spill])
        finally:
            os.close(spill)
    elif fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock, *, block=True):
    """Receive one message; return (message, fds, fds_lost), (None, [], False) at EOF.

    ``fds_lost`` is True when the kernel could not attach every fd (the
    receiver is out of fds: EMFILE); the fds that did arrive are closed then.
    fds received are close-on-exec. Non-blocking mode raises BlockingIOError
    when nothing is waiting. Raises OSError(EMSGSIZE) for a truncated packet.
    """
    flags = socket.MSG_CMSG_CLOEXEC | (0 if block else socket.MSG_DONTWAIT)
    # Not socket.recv_fds: before 3.12 it ignores its flags argument.
    fds = array.array("i")
    data, ancdata, msg_flags, _ = sock.recvmsg(
        RECV_MAX, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), flags)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    fds = list(fds)
    lost = bool(msg_flags & socket.MSG_CTRUNC)
    if lost or msg_flags & socket.MSG_TRUNC or not data:
        for fd in fds:
            os.close(fd)
        fds = []
    if msg_flags & socket.MSG_TRUNC:
        raise OSError(errno.EMSGSIZE, "fork server message truncated")
    if not data:
        return None, [], False
    if data == SPILLED:
        if not fds:
            raise OSError(errno.EMFILE, "fork server message lost: out of file descriptors")
        spill = fds.pop()
        try:
            # The sender's write left the shared file offset at the end.
            data = os.pread(spill, os.fstat(spill).st_size, 0)
        finally:
            os.close(spill)
    return pickle.loads(data), fds, lost


class Board:
    """The fan-out ids a caller is interrupting, in a memfd both ends read and write.

    ``Board()`` makes one; ``Board(fd)`` uses the memfd received. ``fd`` is
    owned (see fastfork.child.own_fd): no child forked by either end keeps it.
    The caller posts and clears ids (under its connection's lock); the server
    only reads. Closed by ``close()``.
    """

    SLOTS = 64
    _SLOT = struct.Struct("q")

    def __init__(self, fd=None):
        if fd is None:
            fd = os.memfd_create("fastfork-board", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.SLOTS * self._SLOT.size)
            except BaseException:
                os.close(fd)
                raise
        self.fd = _core.own_fd(fd)

    def _slots(self):
        data = os.pread(self.fd, self.SLOTS * self._SLOT.size, 0)
        return [value for (value,) in self._SLOT.iter_unpack(data)]

    def post(self, value):
        """Put ``value`` on the board; False if it is full."""
        for i, slot in enumerate(self._slots()):
            if slot == 0:
                os.pwrite(self.fd, self._SLOT.pack(value), i * self._SLOT.size)
                return True
        return False

    def clear(self, fan_id):
        """Take ``fan_id`` and ``-fan_id`` off the board."""
        for i, slot in enumerate(self._slots()):
            if slot in (fan_id, -fan_id):
                os.pwrite(self.fd, self._SLOT.pack(0), i * self._SLOT.size)

    def posted(self):
        """The values on the board now (a set)."""
        return set(self._slots())

    def close(self):
        """Close the memfd."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _core.close_owned(fd)
