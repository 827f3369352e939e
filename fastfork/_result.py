"""The result pipe: how a forked child's return value or error reaches the parent.

One frame per child: a 1-byte kind, an 8-byte big-endian length, then that many
bytes of pickle. The parent unpickles only a frame that arrived whole, so a
child killed mid-write (SIGKILL, OOM) never has truncated bytes unpickled.
The child's side (running the function, writing the frame) is in C:
``fastfork._core.run_function`` and ``write_frame``; the parent's side turns
a frame (or its absence) into a value or a ChildError: ``decode_outcome``.
"""
import contextlib
import pickle
import struct
import traceback

from fastfork.errors import ChildError, ChildTimeout, describe_exception, describe_status

__all__ = ["OK", "ERROR", "error_payload", "user_traceback", "FrameReader", "decode_outcome",
           "short_repr"]

OK = b"R"
ERROR = b"E"
_HEADER = struct.Struct("!cQ")


def error_payload(exc, stage):
    """Pickle what the parent needs to report ``exc``: stage, type, message, traceback.

    ``stage`` says what went wrong in words ("raised", "exited", ...).

    The exception itself is included when it pickles (and unpickles) cleanly.
    """
    info = {
        "stage": stage,
        "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": _safe_str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, user_traceback(exc))),
        "exception": None,
    }
    try:
        data = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
        info["exception"] = data
    except BaseException:
        pass
    return pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL)


def user_traceback(exc):
    """The traceback of ``exc`` from the first frame that is not fastfork's own.

    fastfork's frames on top (those that called the function in the child)
    tell the user nothing, so they are left out, as the standard library
    leaves out its own where it can. None if every frame is fastfork's.
    """
    tb = exc.__traceback__
    while tb is not None and _is_fastfork_frame(tb.tb_frame):
        tb = tb.tb_next
    return tb


def _is_fastfork_frame(frame):
    # The compiled core's frames carry its module's globals, like any other.
    module = frame.f_globals.get("__name__") or ""
    return module == "fastfork" or module.startswith("fastfork.")


def _safe_str(exc):
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__name__}: str() failed>"


class FrameReader:
    """Collects the bytes of one frame as they arrive from the pipe."""

    def __init__(self):
        self._chunks = []
        self._size = 0

    def feed(self, data):
        """Add bytes read from the pipe (b"", end of file, adds nothing)."""
        if data:
            self._chunks.append(data)
            self._size += len(data)

    def frame(self):
        """Return (kind, payload) if a whole frame arrived, else None."""
        if self._size < _HEADER.size:
            return None
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [data]
        kind, length = _HEADER.unpack_from(data)
        if self._size < _HEADER.size + length or kind not in (OK, ERROR):
            return None
        return kind, memoryview(data)[_HEADER.size:_HEADER.size + length]


def decode_outcome(frame, *, pid, returncode, index, item, timed_out, lost):
    """Turn a child's result frame into (True, value) or (False, ChildError).

    ``frame`` is (kind, payload) as it arrived whole, or None if none did.
    ``index``/``item`` place the child in a fan-out (index None: not in one);
    ``timed_out``: a fan-out's timeout stopped it -- then the error is a
    ChildTimeout whatever the child sent afterwards (a result from a SIGTERM
    handler, SystemExit), kept as detail; ``lost``: reaped by someone else,
    so ``returncode`` is unknown.
    """
    def error(message, cls=ChildError, **fields):
        where = f"child {pid}"
        if index is not None:
            where += f" (item {index}: {short_repr(item)})"
        return cls(f"{where} {message}", pid=pid, returncode=returncode, index=index,
                   item=short_repr(item) if index is not None else None, **fields)

    if timed_out:
        return False, _timeout_error(frame, returncode, error)
    if frame is None:
        if lost:
            return False, error("was reaped by someone else (ECHILD): its outcome is unknown")
        return False, error(f"{describe_status(returncode)} without a result")
    kind, payload = frame
    try:
        data = pickle.loads(payload)
    except Exception as exc:  # not BaseException: a Ctrl-C here must propagate
        return False, error(f"sent a result that could not be unpickled: {exc!r}")
    if kind == OK:
        return True, data
    err = error(f"{data['stage']}: {describe_exception(data['exc_type'], data['message'])}",
                exc_type=data["exc_type"], remote_traceback=data["traceback"])
    err.__cause__ = _exception_of(data)
    return False, err


def _timeout_error(frame, returncode, error):
    """The ChildTimeout of a child its timeout stopped; what it sent is detail only."""
    message = f"timed out and was stopped ({describe_status(returncode)})"
    if frame is None:
        return error(message, ChildTimeout)
    kind, payload = frame
    if kind == OK:
        return error(message + "; the result it sent after the stop signal was dropped",
                     ChildTimeout)
    try:
        data = pickle.loads(payload)
    except Exception:
        return error(message, ChildTimeout)
    err = error(f"{message}; after the stop signal it {data['stage']}: "
                f"{describe_exception(data['exc_type'], data['message'])}", ChildTimeout,
                exc_type=data["exc_type"], remote_traceback=data["traceback"])
    err.__cause__ = _exception_of(data)
    return err


def _exception_of(data):
    """The child's exception itself, if it travelled and unpickles; else None."""
    if data["exception"] is not None:
        with contextlib.suppress(Exception):
            return pickle.loads(data["exception"])
    return None


def short_repr(item, limit=80):
    """repr(item), cut to ``limit`` characters; never raises."""
    try:
        text = repr(item)
    except Exception:
        text = f"<{type(item).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
