"""Argument checks shared by the public API: bad input fails before any process exists."""
import math
import os

__all__ = ["check_callable", "check_jobs", "check_timeout", "poll_ms", "MAX_WAIT"]

# poll() takes an int of milliseconds: a longer wait is done in slices of this.
MAX_WAIT = (2**31 - 1) / 1000


def check_callable(fn):
    """Raise TypeError unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")


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


def poll_ms(timeout):
    """Return ``timeout`` seconds as poll()'s milliseconds (None: no limit).

    Capped at MAX_WAIT, so a huge timeout never overflows; callers loop until
    their deadline anyway.
    """
    if timeout is None:
        return None
    return math.ceil(min(timeout, MAX_WAIT) * 1000)
