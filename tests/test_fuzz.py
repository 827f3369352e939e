"""Property tests over the public API's arguments (Hypothesis).

Whatever the arguments, the parent never crashes and no process is left
behind: a call either works, or raises TypeError/ValueError, or an OSError
with one of the errnos that call may meet here (named per call below: any
other errno, EBADF say, is a bug), or reports a per-child error (ChildError).
The default run keeps the example counts small; ``pytest -m soak`` runs many
more.
"""
import contextlib
import errno
import math
import os
import pickle

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import fastfork  # noqa: E402
import procutil  # noqa: E402

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SOAK = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# The errnos each call may raise with these arguments:
# fork failing for good (ForkError),
FORK_ERRNOS = {errno.EAGAIN, errno.ENOMEM}
# no such program or cwd, or not a program (a directory, a file without exec bit),
EXEC_ERRNOS = {errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ENOEXEC}
# none of the pids is a child of ours.
REAP_ERRNOS = {errno.ECHILD}


@contextlib.contextmanager
def only_errors(errnos, *also):
    """Let TypeError, ValueError and ``also`` pass, and OSErrors with one of ``errnos``."""
    try:
        yield
    except (TypeError, ValueError, *also):
        pass
    except OSError as exc:
        if exc.errno not in errnos:
            raise AssertionError(f"unexpected errno: {exc!r}") from exc

# Arguments of every shape: valid ones, wrong types, odd numbers, odd strings.
numbers = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True, min_value=None, max_value=None),
    st.sampled_from([0, 0.0, -0.0, 1e-9, 2**63, -(2**63)]))
junk = st.one_of(numbers, st.text(max_size=5), st.binary(max_size=5),
                 st.lists(st.integers(), max_size=2), st.just(object()))
texts = st.one_of(st.text(max_size=8), st.binary(max_size=8))


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling")


class _OddError(Exception):
    """An exception that cannot be pickled back (its __init__ needs two args)."""

    def __init__(self, a, b):
        super().__init__(a)


class _StrFails(Exception):
    def __str__(self):
        raise RuntimeError("str failed")


class _Base(BaseException):
    pass


def _behaviour(kind):
    """A child function doing one odd thing."""
    def fn(x):
        if kind == "return":
            return x
        if kind == "unpicklable":
            return _Unpicklable()
        if kind == "lambda":
            return lambda: x
        if kind == "odd-error":
            raise _OddError(1, 2)
        if kind == "str-fails":
            raise _StrFails()
        if kind == "base":
            raise _Base()
        if kind == "exit":
            raise SystemExit(x if isinstance(x, int) else "bye")
        if kind == "os-exit":
            os._exit(3)
        if kind == "keyboard":
            raise KeyboardInterrupt
        raise AssertionError(kind)
    return fn


KINDS = ["return", "unpicklable", "lambda", "odd-error", "str-fails", "base", "exit",
         "os-exit", "keyboard"]


def _no_leftovers(before_children):
    assert procutil.children() == before_children


def _check_map(jobs, timeout, kinds, items):
    before = procutil.children()
    fns = [_behaviour(k) for k in kinds]
    results = None
    with only_errors(FORK_ERRNOS, fastfork.ChildError):
        results = fastfork.map(lambda i: fns[i % len(fns)](items[i % len(items)]),
                               range(len(kinds)), jobs=jobs, timeout=timeout,
                               return_exceptions=True)
    if results is not None:
        assert len(results) == len(kinds)
        for i, (kind, got) in enumerate(zip(kinds, results)):
            if kind == "return":
                item = items[i % len(items)]
                if isinstance(got, fastfork.ChildError) and "timed out" in str(got):
                    # A timeout can stop even a trivial child (junk like 1e-9, a busy machine).
                    assert timeout is not None, (timeout, got)
                elif isinstance(item, float) and math.isnan(item):
                    assert isinstance(got, float) and math.isnan(got)
                else:
                    assert got == item
            elif kind == "exit" and isinstance(items[i % len(items)], int) and (
                    items[i % len(items)] & 0xFF == 0):
                assert got is None  # SystemExit with exit status 0 is a success
            else:
                assert isinstance(got, fastfork.ChildError), (kind, got)
                pickle.loads(pickle.dumps(got))   # errors always pickle
    _no_leftovers(before)


map_args = dict(
    jobs=st.one_of(st.integers(1, 4), junk),
    timeout=st.one_of(st.none(), st.floats(0.5, 30), junk),
    kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=5),
    items=st.lists(st.one_of(st.integers(), st.text(max_size=3), st.floats()),
                   min_size=1, max_size=3),
)


@FAST
@given(**map_args)
def test_map_arguments_and_odd_callables(jobs, timeout, kinds, items):
    _check_map(jobs, timeout, kinds, items)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@SOAK
@given(**map_args)
def test_map_arguments_and_odd_callables_soak(jobs, timeout, kinds, items):
    _check_map(jobs, timeout, kinds, items)


def _check_spawn(argv, env, cwd, pass_fds, timeout):
    before = procutil.children()
    fds = procutil.open_fds()
    p = None
    with only_errors(EXEC_ERRNOS | FORK_ERRNOS):
        p = fastfork.spawn(argv, env=env, cwd=cwd, pass_fds=pass_fds,
                           stdout=fastfork.DEVNULL, stderr=fastfork.DEVNULL)
    if p is not None:
        try:
            p.wait(timeout=timeout)
        except (TypeError, ValueError):
            p.wait()
        except fastfork.TimeoutExpired:
            p.stop(0.1)
    _no_leftovers(before)
    assert procutil.open_fds() == fds


spawn_args = dict(
    argv=st.one_of(
        st.lists(st.sampled_from(["true", "false", "/bin/true", "nonexistent-cmd", "",
                                  "/", "a\0b", "sh"]), max_size=3),
        st.lists(texts, max_size=3), junk),
    env=st.one_of(st.none(), st.dictionaries(texts, texts, max_size=3), junk),
    cwd=st.one_of(st.none(), st.sampled_from(["/", "/tmp", "/nonexistent", "", "/\0"]), junk),
    pass_fds=st.one_of(st.just(()), st.lists(st.integers(-2, 2000), max_size=2), junk),
    timeout=st.one_of(st.none(), st.floats(0.1, 5), junk),
)


@FAST
@given(**spawn_args)
def test_spawn_arguments(argv, env, cwd, pass_fds, timeout):
    _check_spawn(argv, env, cwd, pass_fds, timeout)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@SOAK
@given(**spawn_args)
def test_spawn_arguments_soak(argv, env, cwd, pass_fds, timeout):
    _check_spawn(argv, env, cwd, pass_fds, timeout)


@FAST
@given(commands=st.one_of(st.lists(st.lists(st.sampled_from(["true", "false", "echo", "x",
                                                             "no-such-cmd"]),
                                            max_size=3), max_size=4), junk),
       jobs=st.one_of(st.none(), st.integers(1, 3), junk),
       timeout=st.one_of(st.none(), st.floats(0.5, 10), junk),
       capture=st.booleans())
def test_spawn_many_arguments(commands, jobs, timeout, capture):
    before = procutil.children()
    results = None
    with only_errors(FORK_ERRNOS):
        results = fastfork.spawn_many(commands, jobs=jobs, timeout=timeout, capture=capture)
    if results is not None:
        assert len(results) == len(commands)
        for result in results:
            assert isinstance(result.returncode, int)
    _no_leftovers(before)


@FAST
@given(pids=st.one_of(st.lists(st.integers(-5, 5), max_size=3), junk),
       timeout=st.one_of(st.none(), numbers))
def test_reap_arguments(pids, timeout):
    # No real child is listed: only errors are possible, never a hang or a crash.
    with only_errors(REAP_ERRNOS):
        fastfork.reap(pids, timeout=timeout)


@FAST
@given(grace=st.one_of(st.floats(0, 1), junk), stop_signal=st.one_of(st.integers(-1, 70), junk))
def test_background_arguments(grace, stop_signal):
    before = procutil.children()
    with only_errors(FORK_ERRNOS):
        with fastfork.background(lambda: None, grace=grace, stop_signal=stop_signal) as c:
            c.wait(timeout=30)
    _no_leftovers(before)
