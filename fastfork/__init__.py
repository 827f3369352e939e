"""fastfork: create, supervise and reap many child processes, fast and safely.

The public API; every name is re-exported from the module that owns it.
Those modules load on first use (PEP 562), so ``import fastfork`` stays
cheaper than ``import subprocess``: a program that only needs ``fastfork.fork``
does not pay for the fork server, the command runner or pickle.
"""
import os as _os
import sys as _sys

from fastfork._version import __version__

# typing.TYPE_CHECKING without importing typing (which costs more than all of
# this module): type checkers treat any constant of this name as true.
TYPE_CHECKING = False

if not hasattr(_os, "fork"):
    raise ImportError(
        f"fastfork needs fork(), which {_sys.platform} does not have; "
        "use multiprocessing (spawn context) or subprocess instead")


def _core_is_built():
    """True if an import system finder can find fastfork._core (found, not loaded)."""
    return any(finder.find_spec("fastfork._core", __path__) is not None
               for finder in _sys.meta_path if hasattr(finder, "find_spec"))


# An unbuilt source tree fails here, at import, saying how to build it.
if not _core_is_built():  # pragma: no cover - depends on how it was installed
    raise ImportError(
        "fastfork's compiled core (fastfork._core) is not built. From a source "
        "checkout run `pip install .` (or `python setup.py build_ext --inplace` "
        "to work in the tree).")

if TYPE_CHECKING:  # what the lazy loading below provides, for type checkers and IDEs
    from fastfork._core import _exit, fork, reap, wait, wait3, wait4, waitpid
    from fastfork.child import Child
    from fastfork.commands import (DEVNULL, PIPE, STDOUT, CommandResult, Process, spawn,
                                   spawn_many)
    from fastfork import ready
    from fastfork.errors import (ChildError, ChildTimeout, FastforkError, ForkError,
                                 ServerError, ServiceError, TimeoutExpired)
    from fastfork.executor import ForkExecutor
    from fastfork.fanout import (FunctionChild, as_completed, background, map, start,
                                 start_child)
    from fastfork.server import ForkServer, ServerChild
    from fastfork.services import service
    from fastfork.shared import PrivateBuffer, SharedBuffer

# public name -> the module that defines it
_SOURCES = {
    "_exit": "fastfork._core",
    "fork": "fastfork._core",
    "reap": "fastfork._core",
    "wait": "fastfork._core",
    "wait3": "fastfork._core",
    "wait4": "fastfork._core",
    "waitpid": "fastfork._core",
    "Child": "fastfork.child",
    "CommandResult": "fastfork.commands",
    "DEVNULL": "fastfork.commands",
    "PIPE": "fastfork.commands",
    "Process": "fastfork.commands",
    "STDOUT": "fastfork.commands",
    "spawn": "fastfork.commands",
    "spawn_many": "fastfork.commands",
    "ChildError": "fastfork.errors",
    "ChildTimeout": "fastfork.errors",
    "ServiceError": "fastfork.errors",
    "service": "fastfork.services",
    "ready": None,  # a submodule: fastfork.ready
    "FastforkError": "fastfork.errors",
    "ForkError": "fastfork.errors",
    "ServerError": "fastfork.errors",
    "TimeoutExpired": "fastfork.errors",
    "FunctionChild": "fastfork.fanout",
    "as_completed": "fastfork.fanout",
    "background": "fastfork.fanout",
    "map": "fastfork.fanout",
    "start": "fastfork.fanout",
    "start_child": "fastfork.fanout",
    "ForkServer": "fastfork.server",
    "ServerChild": "fastfork.server",
    "ForkExecutor": "fastfork.executor",
    "PrivateBuffer": "fastfork.shared",
    "SharedBuffer": "fastfork.shared",
}

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
    "service",
    "ready",
    "ChildError",
    "ChildTimeout",
    "FastforkError",
    "ForkError",
    "ServerError",
    "ServiceError",
    "TimeoutExpired",
    "_exit",
    "fork",
    "reap",
    "wait",
    "wait3",
    "wait4",
    "waitpid",
]


def __getattr__(name):
    """Load the module that defines ``name`` on first use; AttributeError if none does.

    Raises RuntimeError if that first use comes while the interpreter shuts
    down (nothing can be imported any more then).
    """
    if name not in _SOURCES:
        raise AttributeError(f"module 'fastfork' has no attribute {name!r}")
    source = _SOURCES[name] or f"fastfork.{name}"
    try:
        __import__(source)
    except ImportError as err:
        if _sys.is_finalizing():
            raise RuntimeError(f"fastfork.{name} was first used while the interpreter shuts "
                               "down, when nothing can be imported any more") from err
        raise
    module = _sys.modules[source]
    value = module if _SOURCES[name] is None else getattr(module, name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
