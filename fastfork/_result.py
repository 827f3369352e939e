"""The result pipe: how a forked child's return value or error reaches the parent.

One frame per child: a 1-byte kind, an 8-byte big-endian length, then that many
bytes of pickle. The parent unpickles only a frame that arrived whole, so a
child killed mid-write (SIGKILL, OOM) never has truncated bytes unpickled.
The child's side (running the function, writing the frame) is in C:
``fastfork._core.run_function`` and ``write_frame``.
"""
import pickle
import struct
import traceback

__all__ = ["OK", "ERROR", "error_payload", "user_traceback", "FrameReader"]

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
        self.eof = False

    def feed(self, data):
        """Add bytes read from the pipe (b"" means end of file)."""
        if data:
            self._chunks.append(data)
            self._size += len(data)
        else:
            self.eof = True

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
