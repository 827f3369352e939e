"""fastfork: create, supervise and reap many child processes, fast and safely.

The public API; everything here is re-exported from the module that owns it.
"""
import os as _os
import sys as _sys

if not hasattr(_os, "fork"):
    raise ImportError(
        f"fastfork needs fork(), which {_sys.platform} does not have; "
        "use multiprocessing (spawn context) or subprocess instead")

try:
    from fastfork import _core
except ImportError as _err:  # pragma: no cover - depends on how it was installed
    raise ImportError(
        "fastfork's compiled core (fastfork._core) is not built. From a source "
        "checkout run `pip install .` (or `python setup.py build_ext --inplace` "
        f"to work in the tree). Original error: {_err}") from _err

from fastfork._core import _exit, fork, reap, wait, wait3, wait4, waitpid
from fastfork.child import Child
from fastfork.fanout import FunctionChild, as_completed, background, map, start, start_child
from fastfork.commands import (DEVNULL, PIPE, STDOUT, CommandResult, Process, spawn,
                            spawn_many)
from fastfork.errors import (ChildError, ChildTimeout, FastforkError, ForkError,
                             ServerError, ServiceError, TimeoutExpired)
from fastfork import ready
from fastfork.services import service
from fastfork.server import ForkServer, ServerChild
from fastfork.executor import ForkExecutor
from fastfork.shared import PrivateBuffer, SharedBuffer

__version__ = "0.1.0"

__all__ = [
    "ForkExecutor",
    "ForkServer",
    "ServerChild",
    "PrivateBuffer",
    "SharedBuffer",
    "CommandResult",
    "DEVNULL",
    "PIPE",
    "Process",
    "STDOUT",
    "spawn",
    "spawn_many",
    "Child",
    "FunctionChild",
    "as_completed",
    "background",
    "map",
    "start",
    "start_child",
    "ChildError",
    "ChildTimeout",
    "FastforkError",
    "ForkError",
    "ServerError",
    "ServiceError",
    "service",
    "ready",
    "TimeoutExpired",
    "_exit",
    "fork",
    "reap",
    "wait",
    "wait3",
    "wait4",
    "waitpid",
]
