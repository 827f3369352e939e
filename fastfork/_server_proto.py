"""The ForkServer wire protocol: pickled tuples over a SOCK_SEQPACKET socketpair.

One message per packet, fds riding along with SCM_RIGHTS. Both ends run the
same fastfork as the same user, so control messages are pickles.

Caller -> server:
    ("init", sys_path, preload)                 once, first
    ("start", req_id, inline, setup, print_traceback)
                                                fds: result pipe write end,
                                                [payload memfd if inline is None],
                                                SharedBuffer memfds; ``setup``: what
                                                the server prepares once before it
                                                forks (see ``_pickling``)
    ("signal", req_id, signum)                  for a child without a pidfd
Server -> caller:
    ("ready", server_pid) | ("error", traceback_text)
    ("started", req_id, pid)                    fds: the child's pidfd (if any)
    ("failed", req_id, errno, strerror)         fork (or fd passing) failed
    ("exited", req_id, returncode, rusage)

The caller closing its end (EOF) tells the server to kill its children and exit.
"""
import array
import errno
import os
import pickle
import socket

# Payloads up to this size travel inside the packet; larger ones in a memfd,
# since a SEQPACKET message must fit the socket buffer (EMSGSIZE otherwise).
INLINE_MAX = 32 * 1024
RECV_MAX = INLINE_MAX + 4096
# SCM_MAX_FD in the kernel (include/net/scm.h).
MAX_FDS = 253


def send(sock, message, fds=()):
    """Send one pickled message with ``fds`` attached."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
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
    return pickle.loads(data), fds, lost
