"""How a call reaches a fork server: pickled by reference, or by value with cloudpickle.

The standard pickle sends functions by reference (module and name). A function
of the caller's main script is found in the server by importing that script
once, as ``__mp_main__`` (as multiprocessing does: its ``if __name__ ==
"__main__":`` block does not run). Lambdas and closures have no name to look
up: they travel by value when cloudpickle is installed. A SharedBuffer becomes
a reference to its memfd, which is sent along with the request.

``pickle_call`` returns the bytes and what the server must prepare before it
forks the child: the *setup* steps, hashable tuples the server carries out
once each (``_server_main`` runs them)::

    ("main", "path", script, argv)     import the main script as __mp_main__
    ("main", "module", name, argv)     the same for a main run with ``python -m``
    ("import", module)                 import a module (a helper the call refers to)
    ("import", "cloudpickle")          the call travels by value (BY_VALUE): the
                                       result returns by value too

Everything is checked here, before anything is sent or forked: what cannot
travel raises TypeError saying what to do.
"""
import importlib
import importlib.util
import io
import os
import pickle
import sys
import types

from fastfork import _server_proto as proto
from fastfork.shared import SharedBuffer

__all__ = ["PICKLERS", "BY_VALUE", "check_pickler", "pickle_call", "run_setup", "check_not_importing_main"]

# None: the standard pickle, and cloudpickle (when installed) for what it refuses.
PICKLERS = (None, "pickle", "cloudpickle")

# The names a function of the main script carries in __module__ (the second
# one in a process that multiprocessing or a fork server started).
_MAIN_NAMES = ("__main__", "__mp_main__")

# The setup step of a call pickled by value: the server imports cloudpickle,
# and the child returns its result by value too.
BY_VALUE = ("import", "cloudpickle")

# True in a fork server while it imports the caller's main script.
_importing_main = False

_HOW_TO = ("functions travel pickled by reference: define them at module level of an "
           "importable module or of the main script")


class _CallPickling:
    """persistent_id for both picklers: SharedBuffers by fd; notes uses of the main script."""

    by_value = False

    def _setup_call_pickling(self):
        self.fds = []
        self.uses_main = False

    def persistent_id(self, obj):
        if isinstance(obj, SharedBuffer):
            fd = obj.fileno()
            if fd < 0:
                raise TypeError("an anonymous SharedBuffer (no memfd on this system) "
                                "cannot reach a fork server's children")
            self.fds.append(fd)
            return ("fastfork.SharedBuffer", len(self.fds) - 1, len(obj))
        # Functions and classes are what pickle saves by module and name.
        if (not self.by_value and isinstance(obj, (types.FunctionType, type))
                and getattr(obj, "__module__", None) in _MAIN_NAMES):
            self.uses_main = True
        return None


class _StdPickler(_CallPickling, pickle.Pickler):
    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._setup_call_pickling()


_cloud_pickler = None


def _cloudpickler():
    """The cloudpickle-based pickler class, or None if cloudpickle is not installed."""
    global _cloud_pickler
    if _cloud_pickler is None:
        try:
            import cloudpickle  # type: ignore[import-untyped]
        except ImportError:
            return None

        class _CloudPickler(_CallPickling, cloudpickle.Pickler):
            by_value = True

            def __init__(self, file):
                super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
                self._setup_call_pickling()

        _cloud_pickler = _CloudPickler
    return _cloud_pickler


def check_pickler(pickler):
    """Return ``pickler`` if valid: None, "pickle" or "cloudpickle".

    Raises TypeError/ValueError for anything else, ImportError for
    "cloudpickle" when it is not installed.
    """
    if pickler is not None and not isinstance(pickler, str):
        raise TypeError(f"pickler must be None or a str, not {type(pickler).__name__}")
    if pickler not in PICKLERS:
        raise ValueError(f"pickler must be None, 'pickle' or 'cloudpickle', not {pickler!r}")
    if pickler == "cloudpickle" and importlib.util.find_spec("cloudpickle") is None:
        raise ImportError("pickler='cloudpickle' needs the cloudpickle package "
                          "(pip install cloudpickle)")
    return pickler


def _main_setup():
    """The setup step that makes the main script importable in the server.

    Returns the step, or a str saying why there is none (an interactive
    session, ``python -c``, a package's ``__main__``).
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    argv = tuple(sys.argv)
    if name is not None:
        if name == "__main__" or name.endswith(".__main__"):
            # A package's __main__.py runs its program when imported (multiprocessing
            # does not import it either).
            return f"{name} runs its program when imported"
        return ("main", "module", name, argv)
    path = getattr(main, "__file__", None)
    if path is None:
        return "it has no file (an interactive session or python -c)"
    return ("main", "path", os.path.abspath(path), argv)


def _dump(pickler_class, call):
    out = io.BytesIO()
    pickler = pickler_class(out)
    pickler.dump(call)
    return out.getvalue(), pickler


def pickle_call(fn, args, kwargs, pickler=None):
    """Pickle ``fn(*args, **kwargs)`` for a fork server.

    ``pickler``: None (the standard pickle; cloudpickle, if installed, for
    what that refuses), "pickle" or "cloudpickle". Returns (payload bytes,
    SharedBuffer fds, setup steps). Raises TypeError if the call cannot be
    sent (saying what to do), ValueError for too many SharedBuffers.
    """
    call = (fn, args, kwargs)
    payload = pickled = None
    failure = None
    if pickler != "cloudpickle":
        try:
            payload, pickled = _dump(_StdPickler, call)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            failure = exc
        else:
            setup = (_main_setup(),) if pickled.uses_main else ()
            if setup and isinstance(setup[0], str):
                failure = TypeError("the call refers to the main module, which the "
                                    f"server cannot import: {setup[0]}")
                payload = None
    cloud = _cloudpickler() if pickler != "pickle" and payload is None else None
    if cloud is not None:
        try:
            payload, pickled = _dump(cloud, call)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            failure = exc
        else:
            setup = (BY_VALUE,)
    if payload is None:
        hint = _HOW_TO
        if pickler is None:
            hint += ", or install cloudpickle to send lambdas and closures by value"
        raise TypeError(f"cannot send {_describe(fn)} and its arguments to the fork server: "
                        f"{failure} ({hint})") from failure
    if len(pickled.fds) > proto.MAX_FDS - 2:
        raise ValueError(f"at most {proto.MAX_FDS - 2} SharedBuffers per call")
    if setup and setup[0][0] == "main":
        # What the child returns may refer to __mp_main__ (its name for our
        # main script): let it unpickle here too, as multiprocessing does.
        sys.modules.setdefault("__mp_main__", sys.modules["__main__"])
    return payload, pickled.fds, setup


def _describe(fn):
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name


def run_setup(step):
    """In the server: carry out one setup step (see the module docstring).

    Raises what the import raises.
    """
    kind = step[0]
    if kind == "import":
        importlib.import_module(step[1])
    elif kind == "main":
        _import_main(*step[1:])
    else:
        raise ValueError(f"unknown setup step {step!r}")


def _import_main(how, target, argv):
    """Import the caller's main script as __mp_main__ and make it ``__main__`` here."""
    import runpy
    global _importing_main
    sys.argv[:] = argv
    module = types.ModuleType("__mp_main__")
    _importing_main = True
    try:
        if how == "path":
            module.__dict__.update(runpy.run_path(target, run_name="__mp_main__"))
        else:
            module.__dict__.update(runpy.run_module(target, run_name="__mp_main__",
                                                    alter_sys=True))
    finally:
        _importing_main = False
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def check_not_importing_main(what):
    """Raise RuntimeError if called while a fork server imports the main script.

    A script that starts a fork server (or an executor) at module level would
    otherwise start one more from every server that imports it.
    """
    if _importing_main:
        raise RuntimeError(
            f"the main script started {what} while a fork server imported it to find "
            "its functions: put that code under `if __name__ == \"__main__\":`")
