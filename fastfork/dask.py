"""fastfork.dask: every Dask task in its own forked process, on every worker.

A Dask worker runs its tasks in threads of one long-lived process: a task
that segfaults takes the worker down (and its data with it), a task that
leaks grows the worker, and a task past its time cannot be stopped.
``ForkIsolation`` is a worker plugin that installs a fastfork executor on
each worker; the tasks routed to it (``isolated()``, or
``dask.annotate(executor="fastfork")``) run each in a fresh process forked
from the worker (or, with ``server=True``, from a small fork server the
worker starts). A crash, an exit, a timeout or a memory limit is then that
task's error, raised from its future; the worker keeps running, with its
data. ``map`` runs a function over items that way, anywhere on the cluster.

How a task reaches the executor: the worker calls
``executor.submit(_run_task_simple, task, data, delay)`` (what it does for
any executor that is not a thread pool; ``distributed.worker``). Only
``task(data)`` runs in the child (``fastfork._dask_child``, which does not
import distributed); its result, or its exception with the traceback, comes
back pickled by cloudpickle (so a class the client sent by value returns
too), and in the worker Dask's own ``_run_task_simple`` makes the task's
message of that outcome, with the child's timings. Nothing of the worker is
used in the child: no event loop, no ``get_worker()``.

Per task, the annotations ``fastfork_timeout`` (seconds) and
``fastfork_memory_limit`` (bytes of address space, RLIMIT_AS) override the
plugin's options (``isolated(timeout=..., memory_limit=...)`` sets them).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import pickle
import socket
import sys
import threading
import types
from concurrent.futures import InvalidStateError
from typing import TYPE_CHECKING, TypeVar, overload

try:
    import cloudpickle  # type: ignore[import-untyped]
    import dask
    import distributed
    from dask.utils import funcname, parse_bytes
    from distributed.diagnostics.plugin import WorkerPlugin
    from distributed.protocol import pickle as dask_pickle
    from distributed.worker import _run_task_simple
except ImportError as _err:
    raise ImportError(
        "fastfork.dask needs dask and distributed: pip install 'fastfork[dask]' "
        f"(original error: {_err})") from _err

from fastfork import _dask_child
from fastfork._checks import check_callable, check_jobs, check_timeout
from fastfork._result import short_repr
from fastfork.errors import ChildError
from fastfork.executor import ForkExecutor
from fastfork.server import ForkServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from contextlib import AbstractContextManager
    from typing import Literal

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["ForkIsolation", "isolated", "map", "dask_setup"]

DEFAULT_NAME = "fastfork"

# The task annotations the executor reads (set by ``isolated``).
TIMEOUT_ANNOTATION = "fastfork_timeout"
MEMORY_ANNOTATION = "fastfork_memory_limit"

# Executor names a worker has of its own.
_RESERVED_NAMES = ("default", "actor", "offload")


# ---------------------------------------------------------------- argument checks

def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if not name or name in _RESERVED_NAMES:
        raise ValueError(f"name must be a non-empty executor name other than "
                         f"{', '.join(_RESERVED_NAMES)}; got {name!r}")
    return name


def _check_memory_limit(limit):
    """Return ``limit`` in bytes (an int, or a str such as "2 GiB"), or None.

    Raises TypeError/ValueError for anything else.
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, str)):
        raise TypeError(f"memory_limit must be an int, a str such as '2 GiB', or None, "
                        f"not {type(limit).__name__}")
    if isinstance(limit, str):
        limit = parse_bytes(limit)  # ValueError for what it cannot read
    if limit <= 0:
        raise ValueError(f"memory_limit must be > 0 bytes, not {limit}")
    return limit


def _check_preload(preload):
    if isinstance(preload, (str, bytes)):
        raise TypeError("preload must be a sequence of module names, not a single string")
    preload = tuple(preload)
    for module in preload:
        if not isinstance(module, str):
            raise TypeError(f"preload names must be str, not {type(module).__name__}")
    return preload


# ---------------------------------------------------------------- the plugin

class ForkIsolation(WorkerPlugin):
    """A worker plugin that runs the tasks routed to it each in a fresh forked process.

    ``client.register_plugin(ForkIsolation())`` installs, on every worker
    (those that join later too), an executor named ``name``; route tasks to
    it with ``isolated()`` or ``dask.annotate(executor=name)``. ``jobs``:
    at most this many task processes per worker and timeout value (default:
    the worker's thread count, which bounds its running tasks anyway).
    ``timeout``: seconds a task may run before its process is stopped
    (SIGTERM, ``grace`` seconds, SIGKILL); the task fails with
    ``fastfork.ChildTimeout``. ``memory_limit``: bytes of address space a
    task may add to what its process starts with (an int or a str such as
    "2 GiB"); past it allocations fail (MemoryError). ``server``: fork the
    tasks from a fork server each worker starts (a small process that has
    imported ``preload`` and Dask) instead of from the worker itself.
    Unregistering the plugin (or closing the worker) lets running tasks end,
    stops the ones the worker gave up on, and reaps every process.

    Raises TypeError/ValueError for bad arguments, before anything starts.
    """

    def __init__(self, jobs: int | None = None, timeout: float | None = None,
                 grace: float = 1.0, server: bool = False, name: str = DEFAULT_NAME, *,
                 memory_limit: int | str | None = None,
                 preload: Iterable[str] = ()) -> None:
        self.jobs = None if jobs is None else check_jobs(jobs)
        self.timeout = check_timeout(timeout, allow_zero=False)
        self.grace = check_timeout(grace, "grace")
        self.memory_limit = _check_memory_limit(memory_limit)
        if not isinstance(server, bool):
            raise TypeError(f"server must be a bool, not {type(server).__name__}")
        self.server = server
        self.preload = _check_preload(preload)
        self.name = _check_name(name)  # also the plugin's name: one plugin per executor
        self._executor: _WorkerExecutor | None = None

    def __repr__(self) -> str:
        return (f"<fastfork.dask.ForkIsolation name={self.name!r} jobs={self.jobs} "
                f"timeout={self.timeout} memory_limit={self.memory_limit} "
                f"server={self.server}>")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_executor"] = None  # a worker's executor stays on that worker
        return state

    async def setup(self, worker: distributed.Worker) -> None:
        """Install the executor on ``worker`` (starting its fork server in server mode)."""
        executor = _WorkerExecutor(worker, self)
        if self.server:
            # An interpreter start and Dask's import: not on the event loop.
            await asyncio.to_thread(executor.start_server)
        self._executor = executor
        worker.executors[self.name] = executor

    async def teardown(self, worker: distributed.Worker) -> None:
        """Remove the executor; wait (in a thread) until its processes are reaped."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if worker.executors.get(self.name) is executor:
            del worker.executors[self.name]
        await asyncio.to_thread(executor.shutdown, True)


class _WorkerExecutor(concurrent.futures.Executor):
    """What a worker sees under the plugin's name: one ForkExecutor per task timeout.

    The worker calls ``submit`` from its event loop; the task's annotations
    (in the worker's state) give its timeout and memory limit. Tasks with
    the same timeout share a ForkExecutor (its timeout is per executor).
    """

    def __init__(self, worker, options):
        self._worker = worker
        self._jobs = options.jobs or worker.state.nthreads
        self._timeout = options.timeout
        self._grace = options.grace
        self._memory_limit = options.memory_limit
        self._server = (ForkServer(preload=("fastfork._dask_child",) + options.preload,
                                   pickler="cloudpickle") if options.server else None)
        self._executors = {}  # timeout -> ForkExecutor
        self._lock = threading.Lock()
        self._shutdown = False
        self._location = None  # once the worker has its address

    def __repr__(self):
        mode = "server" if self._server is not None else "worker"
        return f"<fastfork.dask executor jobs={self._jobs} forking from the {mode}>"

    def start_server(self):
        """Start the fork server now (server mode); ServerError if it cannot start."""
        self._server.open()

    def submit(self, fn, /, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` in a fresh process; return a Future of its result.

        Raises RuntimeError after shutdown, TypeError/ValueError for a bad
        ``fastfork_*`` annotation (the task then fails with it).
        """
        check_callable(fn)
        timeout, memory_limit, where = self._task_options(args)
        if self._location is None:
            self._location = f"worker {self._worker.address}, host {socket.gethostname()}"
        location = self._location
        if fn is _run_task_simple and len(args) == 3 and not kwargs:
            # Only the task runs in the child; Dask makes its message of the outcome.
            task, data, delay = args
            child, call = _dask_child.run_task, (task, data, memory_limit, location)
            finish = functools.partial(_task_message, delay=delay)
        else:
            child, call = _dask_child.run_call, (fn, args, kwargs, memory_limit, location)
            finish = pickle.loads
        executor = self._executor_for(timeout)
        if self._server is None:
            inner = executor.submit(child, *call)
        else:
            # The server imports what the call refers to once: each child
            # would otherwise import the task's modules anew.
            inner = executor._submit(child, call, {}, setup=_imports_of((child, call)))
        return _TaskFuture(inner, finish, where, location)

    def _task_options(self, args):
        """(timeout, memory_limit, what the task is) from the annotations of the task in ``args``."""
        key = getattr(args[0], "key", None) if args else None
        state = self._worker.state.tasks.get(key) if key is not None else None
        annotations = (state.annotations or {}) if state is not None else {}
        timeout, memory_limit = self._timeout, self._memory_limit
        if TIMEOUT_ANNOTATION in annotations:
            timeout = check_timeout(annotations[TIMEOUT_ANNOTATION], TIMEOUT_ANNOTATION,
                                    allow_zero=False)
        if MEMORY_ANNOTATION in annotations:
            memory_limit = _check_memory_limit(annotations[MEMORY_ANNOTATION])
        return timeout, memory_limit, (None if key is None else f"task {short_repr(key)}")

    def _executor_for(self, timeout):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot run tasks after the fastfork executor was shut down")
            executor = self._executors.get(timeout)
            if executor is None:
                options = dict(timeout=timeout, grace=self._grace)
                executor = (ForkExecutor(self._jobs, **options) if self._server is None
                            else self._server.executor(self._jobs, **options))
                self._executors[timeout] = executor
            return executor

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop taking tasks; with ``wait``, return once every process has been reaped.

        Running tasks finish (a cancelled one's process is stopped); with
        ``wait`` the fork server is closed too.
        """
        with self._lock:
            self._shutdown = True
            executors = list(self._executors.values())
        for executor in executors:
            executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait and self._server is not None:
            self._server.close()


class _Discard:
    def write(self, data):
        pass


class _ModuleRecorder(cloudpickle.Pickler):
    """Pickles into nothing, noting the modules that unpickling would import."""

    def __init__(self):
        # Out-of-band buffers (protocol 5) are not even copied.
        super().__init__(_Discard(), protocol=5, buffer_callback=bool)
        self.modules = set()

    def persistent_id(self, obj):
        if isinstance(obj, types.ModuleType):
            self.modules.add(obj.__name__)
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                self.modules.add(module)
        return None


def _imports_of(call):
    """The fork server's setup steps that import the modules ``call`` refers to.

    Only modules imported here from a file or package (not ``__main__``, not
    what a by-value function merely names): a step that fails in the server
    fails the task.
    """
    recorder = _ModuleRecorder()
    try:
        recorder.dump(call)
    except Exception:
        return ()  # the real pickling reports it
    steps = []
    for name in sorted(recorder.modules):
        module = sys.modules.get(name)
        if name != "__main__" and getattr(module, "__spec__", None) is not None:
            steps.append(("import", name))
    return tuple(steps)


async def dask_setup(server: distributed.Worker | distributed.Scheduler) -> None:
    """``--preload fastfork.dask``: install ``ForkIsolation()`` (its defaults) from the command line.

    On ``dask worker`` it installs the plugin on that worker; on ``dask
    scheduler`` it registers it for every worker that connects. For other
    options, preload a file of your own whose ``dask_setup`` does the same
    with them.
    """
    plugin = ForkIsolation()
    if isinstance(server, distributed.Scheduler):
        await server.register_worker_plugin(None, dask_pickle.dumps(plugin), name=plugin.name,
                                            idempotent=False)
    else:
        await server.plugin_add(plugin, name=plugin.name)


# ---------------------------------------------------------------- the worker's future

class _TaskFuture(concurrent.futures.Future):
    """A task's future as the worker sees it.

    Completed from the ForkExecutor's future: ``finish`` turns what the child
    sent into the result, and a ChildError (crash, exit, timeout) says where
    the task ran. ``cancel()`` (the worker does it on close) stops the process.
    """

    def __init__(self, inner, finish, where, location):
        super().__init__()
        self._inner = inner
        self._finish = finish
        self._where = where
        self._location = location
        inner.add_done_callback(self._inner_done)

    def cancel(self):
        """Cancel the task; a running one has its process stopped."""
        cancelled = super().cancel()
        if cancelled:
            self._inner.cancel()
        return cancelled

    def _inner_done(self, inner):
        # Runs in the ForkExecutor's thread (or here, if it was done already).
        if inner.cancelled():
            super().cancel()
            return
        try:
            exc = inner.exception()
            if exc is None:
                value = self._finish(inner.result())
        except BaseException as error:  # what unpickling raised: the task's error
            exc = error
        if isinstance(exc, ChildError):
            _locate(exc, self._where, self._location)
        try:
            if exc is None:
                self.set_result(value)
            else:
                self.set_exception(exc)
        except InvalidStateError:
            pass  # cancelled meanwhile


def _locate(err, where, location):
    """Rewrite a ForkExecutor's ChildError to name the task and the worker it ran on.

    The executor's own numbering of its tasks means nothing here: the error's
    ``index`` becomes None and ``item`` the task ``where`` describes.
    """
    rest = err.message
    for executor_where in (f"child {err.pid} (item {err.index}: {err.item})",
                           f"child {err.pid}"):
        if rest.startswith(executor_where):
            rest = rest[len(executor_where):].lstrip()
            break
    place = location if where is None else f"{where}; {location}"
    err.message = f"child {err.pid} ({place}) {rest}"
    err.args = (err.message,)
    err.index = None
    err.item = where


# ---------------------------------------------------------------- the task's message

class _Outcome:
    """A stand-in task that returns or raises what the real one did in its process."""

    def __init__(self, ok, value):
        self._ok = ok
        self._value = value

    def __call__(self, data):
        if self._ok:
            return self._value
        raise self._value


def _task_message(payload, delay):
    """Dask's message for a task's outcome (``_dask_child.run_task``), timed as it ran."""
    ok, value, start, stop = pickle.loads(payload)
    message = _run_task_simple(_Outcome(ok, value), {}, delay)
    message["start"], message["stop"] = start + delay, stop + delay
    return message


# ---------------------------------------------------------------- the client's side

def isolated(name: str = DEFAULT_NAME, *, timeout: float | None = None,
             memory_limit: int | str | None = None) -> AbstractContextManager[None]:
    """Return a context manager that routes the tasks made inside it to ``name``'s processes.

    A thin wrapper over ``dask.annotate(executor=name, ...)``: covers
    ``client.submit``/``map``/``compute`` and collections (delayed, bag,
    array) built inside it. ``timeout``/``memory_limit`` override the
    plugin's for these tasks. Raises TypeError/ValueError for bad arguments.
    """
    annotations = {"executor": _check_name(name)}
    if timeout is not None:
        annotations[TIMEOUT_ANNOTATION] = check_timeout(timeout, allow_zero=False)
    if memory_limit is not None:
        annotations[MEMORY_ANNOTATION] = _check_memory_limit(memory_limit)
    return dask.annotate(**annotations)


@overload
def map(fn: Callable[[T], R], items: Iterable[T], client: distributed.Client | None = None,
        timeout: float | None = None, return_exceptions: Literal[False] = False, *,
        memory_limit: int | str | None = None, name: str = DEFAULT_NAME) -> list[R]: ...


@overload
def map(fn: Callable[[T], R], items: Iterable[T], client: distributed.Client | None = None,
        timeout: float | None = None, *, return_exceptions: Literal[True],
        memory_limit: int | str | None = None,
        name: str = DEFAULT_NAME) -> list[R | BaseException]: ...


@overload
def map(fn: Callable[[T], R], items: Iterable[T], client: distributed.Client | None = None,
        timeout: float | None = None, return_exceptions: bool = False, *,
        memory_limit: int | str | None = None,
        name: str = DEFAULT_NAME) -> list[R | BaseException]: ...


def map(fn: Callable[[T], R], items: Iterable[T], client: distributed.Client | None = None,
        timeout: float | None = None, return_exceptions: bool = False, *,
        memory_limit: int | str | None = None,
        name: str = DEFAULT_NAME) -> list[R] | list[R | BaseException]:
    """Run ``fn(item)`` for every item, each in its own forked process on the cluster.

    Returns the results in input order. ``client``: default the current one
    (``distributed.get_client()``). Installs ``ForkIsolation(name=name)``
    when no plugin of that name is registered. A failed item is a
    ChildError naming its index, item, pid, worker and host, with the
    child's traceback (``remote_traceback``) or the signal that killed it;
    the first one is raised once the others are cancelled (tasks already
    running finish on their workers) -- or, with ``return_exceptions``,
    each failed item's error is returned in its place. ``timeout`` and
    ``memory_limit`` apply to each item (see ``ForkIsolation``).
    Raises TypeError/ValueError for bad arguments before anything runs.
    """
    check_callable(fn)
    items = list(items)
    context = isolated(name, timeout=timeout, memory_limit=memory_limit)
    if client is None:
        client = distributed.get_client()
    elif not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client or None, "
                        f"not {type(client).__name__}")
    if not items:
        return []
    if name not in client.run_on_scheduler(_worker_plugin_names):
        client.register_plugin(ForkIsolation(name=name))
    with context:
        futures = client.map(_dask_child.call_item, [fn] * len(items), range(len(items)), items,
                             key=funcname(fn), pure=False)
    try:
        return _collect(client, futures, items, return_exceptions)
    finally:
        client.cancel([f for f in futures if not f.done()])


def _worker_plugin_names(dask_scheduler):
    """On the scheduler: the names of the registered worker plugins."""
    return list(dask_scheduler.worker_plugins)


def _collect(client, futures, items, return_exceptions):
    """The results of ``map``'s futures in order; the first error raised or kept in place."""
    index_of = {future.key: i for i, future in enumerate(futures)}
    errors = {}
    for future in distributed.as_completed(futures, loop=client.loop):
        if future.status == "finished":
            continue
        i = index_of[future.key]
        err = future.exception()
        if isinstance(err, ChildError):
            _name_item(err, future.key, i, items[i])
        if not return_exceptions:
            raise err
        errors[i] = err
    done = [f for i, f in enumerate(futures) if i not in errors]
    results = iter(client.gather(done))
    return [errors[i] if i in errors else next(results) for i in range(len(futures))]


def _name_item(err, key, index, item):
    """Put ``map``'s item on a ChildError the worker located by task key."""
    task_where = f"child {err.pid} (task {short_repr(key)};"
    if err.message.startswith(task_where):
        err.message = f"child {err.pid} (item {index}: {short_repr(item)};" + \
            err.message[len(task_where):]
        err.args = (err.message,)
    err.index = index
    err.item = short_repr(item)
