"""Argument checks shared by the public API: bad input fails before any process exists.

Every check raises TypeError for a value of the wrong type and ValueError for
a value of the right type that is out of range.
"""
import math
import os
from subprocess import DEVNULL, PIPE, STDOUT

__all__ = ["check_callable", "check_optional_callable", "check_jobs", "check_timeout",
           "check_count", "check_fan_out", "check_fd_open", "check_pass_fds", "check_stdio",
           "poll_ms", "MAX_WAIT"]

# poll() takes an int of milliseconds: a longer wait is done in slices of this.
MAX_WAIT = (2**31 - 1) / 1000


def check_callable(fn):
    """Raise TypeError unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")


def check_optional_callable(value, name):
    """Return ``value``; TypeError unless it is None or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, not {type(value).__name__}")
    return value


def check_count(value, name, minimum=0):
    """Return ``value``; TypeError unless an int (not bool), ValueError if below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return value


def check_jobs(jobs):
    """Return ``jobs`` (None means the CPU count); TypeError/ValueError unless an int >= 1."""
    if jobs is None:
        return os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise TypeError(f"jobs must be an int or None, not {type(jobs).__name__}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    return jobs


def check_timeout(timeout, name="timeout", allow_zero=True):
    """Return ``timeout`` as a float (or None); ValueError/TypeError if invalid."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number or None, not {type(timeout).__name__}")
    timeout = float(timeout)
    if math.isnan(timeout) or math.isinf(timeout) or timeout < 0 or (
            timeout == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"not {timeout!r}")
    return timeout


def check_fan_out(jobs, timeout, grace, retries, retries_name, chunksize=1):
    """Validate the options every fan-out takes; return them normalised.

    Returns (jobs, timeout, grace, retries, chunksize): ``jobs`` None becomes
    the CPU count, ``timeout`` (None or > 0) and ``grace`` (>= 0) floats.
    ``retries_name`` names the retries option in messages (``fork_retries``,
    ``spawn_retries``).
    """
    return (check_jobs(jobs), check_timeout(timeout, allow_zero=False),
            check_timeout(grace, "grace"), check_count(retries, retries_name),
            check_count(chunksize, "chunksize", minimum=1))


def check_fd_open(fd, what):
    """Return ``fd``; TypeError unless an int, ValueError unless an open fd."""
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{what} must be an int fd, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"{what}: {fd} is not a valid fd")
    try:
        os.get_inheritable(fd)
    except OSError:
        raise ValueError(f"{what}: fd {fd} is not open") from None
    return fd


def check_pass_fds(pass_fds):
    """Return pass_fds as a sorted tuple of open fds; TypeError/ValueError otherwise."""
    if isinstance(pass_fds, (str, bytes)):
        raise TypeError("pass_fds must be a sequence of fds")
    return tuple(sorted({check_fd_open(fd, "pass_fds") for fd in pass_fds}))


def check_stdio(value, name):
    """Validate a stdin/stdout/stderr argument; return it (a fileobj becomes its fd)."""
    if value is None or (value in (PIPE, DEVNULL) and not isinstance(value, bool)):
        return value
    if value == STDOUT and not isinstance(value, bool):
        if name != "stderr":
            raise ValueError(f"STDOUT is only valid for stderr, not {name}")
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be None, PIPE, DEVNULL, an fd or a file object, not bool")
    if isinstance(value, int):
        return check_fd_open(value, name)
    fileno = getattr(value, "fileno", None)
    if fileno is None:
        raise TypeError(f"{name} must be None, PIPE, DEVNULL, an fd or a file object, "
                        f"not {type(value).__name__}")
    try:
        fd = fileno()
    except (OSError, ValueError) as exc:  # closed, or io.UnsupportedOperation
        raise ValueError(f"{name} has no usable file descriptor: {exc}") from None
    return check_fd_open(fd, name)


def poll_ms(timeout):
    """Return ``timeout`` seconds as poll()'s milliseconds (None: no limit).

    Capped at MAX_WAIT, so a huge timeout never overflows; callers loop until
    their deadline anyway.
    """
    if timeout is None:
        return None
    return math.ceil(min(timeout, MAX_WAIT) * 1000)
