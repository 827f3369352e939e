"""What runs in each task process of fastfork.dask.

Apart from ``fastfork.dask`` so that it does not import distributed: a fork
server that holds this, Dask's task spec and the task's modules is half the
size of one that holds distributed, and a fork costs in proportion to the
size of the process forked. The worker turns what comes back into Dask's
own message (``fastfork.dask``).
"""
import os
import pickle
import resource
import time
import traceback

import cloudpickle
from tblib import pickling_support

from fastfork._result import short_repr
from fastfork.errors import ChildError

# Where this process runs ("worker tcp://..., host ..."), for map's errors.
location = None


def run_task(task, data, memory_limit, where):
    """Run a Dask task, ``task(data)``; return ``(ok, value or exception, start, stop)`` pickled.

    SystemExit and KeyboardInterrupt end the process, as they end a worker.
    The exception keeps its traceback (tblib). Raises TypeError if the result
    cannot be pickled.
    """
    _prepare(memory_limit, where)
    start = time.time()
    try:
        value, ok = task(data), True
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        value, ok = exc, False
    stop = time.time()
    if not ok:
        pickling_support.install(value)
    try:
        return _dumps((ok, value, start, stop))
    except Exception as exc:
        if ok:
            raise _cannot_send(exc) from exc
    text = "".join(traceback.format_exception(value))
    substitute = Exception(f"{type(value).__name__}: {value} (an exception that cannot be "
                           f"pickled; its traceback in the task's process:\n{text})")
    return _dumps((False, substitute, start, stop))


def run_call(fn, args, kwargs, memory_limit, where):
    """Run ``fn(*args, **kwargs)``; return its result pickled. TypeError if it cannot be."""
    _prepare(memory_limit, where)
    value = fn(*args, **kwargs)
    try:
        return _dumps(value)
    except Exception as exc:
        raise _cannot_send(exc) from exc


def call_item(fn, index, item):
    """``fastfork.dask.map``'s task: ``fn(item)``; what it raises becomes a ChildError."""
    try:
        return fn(item)
    except Exception as exc:
        exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        where = f"item {index}: {short_repr(item)}"
        if location is not None:
            where += f"; {location}"
        raise ChildError(f"child {os.getpid()} ({where}) raised: {exc_type}: {exc}",
                         pid=os.getpid(), index=index, item=short_repr(item),
                         exc_type=exc_type, remote_traceback=traceback.format_exc()) from exc


def _prepare(memory_limit, where):
    global location
    location = where
    if memory_limit is not None:
        _limit_address_space(memory_limit)


def _dumps(value):
    # By value where the standard pickle cannot: a class the client sent that way.
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _cannot_send(exc):
    return TypeError(f"the task's result cannot be sent back from its process: {exc}")


def _limit_address_space(extra):
    """Let this process map at most ``extra`` more bytes than it has mapped now (RLIMIT_AS)."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = mapped + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
