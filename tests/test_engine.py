"""The C fan-out engine behind map and as_completed (fastfork._core.FanOut, src/_fanout.pxi).

A child writes its result frame (1-byte kind, 8-byte length, pickle) to its own
pipe without blocking first; a result that overfills the pipe makes it ring the
fan-out's doorbell with its slot number, and the parent drains that pipe while
it waits. These tests aim at that path (results around the pipe's capacity,
many children ringing at once, a child killed mid-write), at stopping (timeouts,
stop_on_failure, closing early, close() and the __dealloc__ safety net), at
which fds the children hold, at the traceback a failing child sends, and at
how a child's exit is seen: through its pipe hanging up, the one fd the parent
holds for it (a child that closes its pipe early, a grandchild that holds it
open, with and without pidfds). The autouse guard in conftest.py checks after
each test that no child process or fd was left behind.
"""
import contextlib
import ctypes
import errno
import fcntl
import gc
import itertools
import json
import os
import pickle
import re
import select
import signal
import sys
import textwrap
import threading
import time

import pytest

import fastfork
import procutil
from fastfork import _core

PIPE_CAPACITY = 1 << 16         # Linux's default pipe capacity
HEADER = 9                      # the frame's kind byte and 8-byte length
PROTOCOL = pickle.HIGHEST_PROTOCOL
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# A deadlock in the engine turns into a "timed out" error, not a hung test.
NO_DEADLOCK = 30


# ------------------------------------------------------------------ helpers


def blob(n, seed=0):
    """``n`` bytes in a pattern (period 251) that shows a lost, doubled or moved chunk."""
    period = bytes((seed + k) % 256 for k in range(251))
    return (period * (n // 251 + 1))[:n]


def blob_len_for_frame(size):
    """The length of a blob whose result frame is exactly ``size`` bytes."""
    target = size - HEADER
    for n in range(max(0, target - 40), target + 1):
        if len(pickle.dumps(bytes(n), PROTOCOL)) == target:
            return n
    raise AssertionError(f"no bytes object pickles to {target} bytes")


def frame_size(value):
    return HEADER + len(pickle.dumps(value, PROTOCOL))


def make_blob(item):
    seed, n = item
    return blob(n, seed)


def sleep_then(x):
    time.sleep(x)
    return x


def wait_readable(fd, count, timeout=10.0):
    """Read ``count`` bytes from ``fd`` (blocking), failing the test after ``timeout``."""
    got = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            pytest.fail(f"children reported {len(got)} of {count} bytes in {timeout} s")
        got += os.read(fd, count - len(got))
    return got


def new_engine(fn, items, jobs):
    """A _core.FanOut over ``items`` (as map builds it, minus the decoding).

    Each child has NO_DEADLOCK seconds, so a stuck engine fails the test.
    """
    return _core.FanOut(fn, iter(items), jobs, NO_DEADLOCK, 1.0, 0, 0, False, False)


# --------------------------------------------- 1. results around the pipe capacity

# Frame sizes either side of the 64 KiB pipe: one that fits with room to spare,
# one that fills it exactly (no ring), one byte over (a partial non-blocking
# write, then a ring for the last byte), the largest frame written in one
# write(2) (payload 64 KiB) and the smallest written as header + payload; then
# 1 MiB and 20 MiB. The first item returns b"" (the smallest frame of all).
AROUND_CAPACITY = [PIPE_CAPACITY - HEADER - 50, PIPE_CAPACITY - 1, PIPE_CAPACITY,
                   PIPE_CAPACITY + 1, PIPE_CAPACITY + HEADER, PIPE_CAPACITY + HEADER + 1,
                   1 << 20, 20 << 20]


def _around_capacity_items(frames):
    lengths = [0]
    for size in frames:
        n = blob_len_for_frame(size) if size < 2 * PIPE_CAPACITY else size
        lengths.append(n)
    items = [(seed, n) for seed, n in enumerate(lengths)]
    # The helper really produces the frame sizes meant (a check on the test itself).
    for (seed, n), size in zip(items[1:], frames):
        if size < 2 * PIPE_CAPACITY:
            assert frame_size(blob(n, seed)) == size
    return items


def test_map_results_around_the_pipe_capacity_in_input_order():
    items = _around_capacity_items(AROUND_CAPACITY)
    out = fastfork.map(make_blob, items, jobs=4, timeout=NO_DEADLOCK)
    assert [len(b) for b in out] == [n for _, n in items]
    assert out == [blob(n, seed) for seed, n in items]


def test_as_completed_results_around_the_pipe_capacity():
    items = _around_capacity_items(AROUND_CAPACITY)
    got = {}
    for index, value in fastfork.as_completed(make_blob, items, jobs=4, timeout=NO_DEADLOCK):
        assert index not in got
        got[index] = value
    assert got == {i: blob(n, seed) for i, (seed, n) in enumerate(items)}


def shrink_pipes_then_blob(item):
    """In a map child: shrink its pipes (the result pipe, the doorbell) to one page first."""
    fds = _core.owned_fds()  # in a fan-out child: exactly its result pipe and the doorbell
    assert len(fds) == 2, fds
    for fd in fds:
        fcntl.fcntl(fd, F_SETPIPE_SZ, 4096)
        assert fcntl.fcntl(fd, F_GETPIPE_SZ) == 4096
    return make_blob(item)


def test_results_around_a_shrunk_pipe_capacity():
    # The same boundaries around a 4 KiB pipe: results that overfill a pipe
    # of any capacity ring, and those that fit do not need to.
    page = 4096
    frames = [page - HEADER - 50, page - 1, page, page + 1, page + HEADER + 1,
              PIPE_CAPACITY, PIPE_CAPACITY + 1, 1 << 20]
    items = [(seed, blob_len_for_frame(size)) for seed, size in enumerate(frames)]
    for (seed, n), size in zip(items, frames):
        assert frame_size(blob(n, seed)) == size
    out = fastfork.map(shrink_pipes_then_blob, items, jobs=4, timeout=NO_DEADLOCK)
    assert out == [blob(n, seed) for seed, n in items]
    got = dict(fastfork.as_completed(shrink_pipes_then_blob, items, jobs=4,
                                     timeout=NO_DEADLOCK))
    assert got == dict(enumerate(out))


# --------------------------------------------- 2. many children ringing at once


def test_many_children_overfilling_their_pipes_at_once():
    # 40 results of 64 KiB + 1 .. ~370 KiB, eight at a time: the doorbell gets
    # up to eight tokens at once, and slots are reused by children that ring
    # after a sibling's token was answered.
    items = [(seed, PIPE_CAPACITY + 1 + 7919 * seed) for seed in range(40)]
    expected = [blob(n, seed) for seed, n in items]
    assert fastfork.map(make_blob, items, jobs=8, timeout=NO_DEADLOCK) == expected
    got = dict(fastfork.as_completed(make_blob, items, jobs=8, timeout=NO_DEADLOCK))
    assert got == dict(enumerate(expected))


def _ring_once_all_run(spec):
    """Wait until every child of the fan-out runs, then send a result over the pipe's size."""
    log, count, seed = spec
    with open(log, "a") as f:
        f.write("x")
    deadline = time.monotonic() + 120  # only bounds a failing run
    while os.path.getsize(log) < count and time.monotonic() < deadline:
        time.sleep(0.001)
    return os.path.getsize(log) >= count, blob(PIPE_CAPACITY + 1 + seed, seed)


@pytest.mark.parametrize("jobs", [150, 2**40], ids=["150", "no limit"])
def test_slots_beyond_the_first_allocation_ring_and_report(tmp_path, jobs):
    # 150 children at once: the engine's slots grow past their first
    # allocation while children run, and children in the new slots ring the
    # doorbell (a result over the pipe's size) with their slot numbers.
    log = str(tmp_path / "started")
    specs = [(log, 150, seed) for seed in range(150)]
    # No timeout: under load, starting 150 children can take longer than any
    # one of them should run.
    assert fastfork.map(_ring_once_all_run, specs, jobs=jobs) == [
        (True, blob(PIPE_CAPACITY + 1 + seed, seed)) for seed in range(150)]


def test_slow_consumer_of_as_completed_gets_every_big_result():
    # While the consumer holds a result, nobody drains the pipes: children that
    # rang meanwhile block in write until as_completed is resumed.
    items = [(seed, 3 * PIPE_CAPACITY + seed) for seed in range(12)]
    got = {}
    for index, value in fastfork.as_completed(make_blob, items, jobs=6, timeout=NO_DEADLOCK):
        got[index] = value
        if len(got) <= 3:
            time.sleep(0.05)
    assert got == {i: blob(n, seed) for i, (seed, n) in enumerate(items)}


def test_fork_retries_between_children_that_ring(fork_fault):
    calls = itertools.count(1)
    failed = []

    def every_third_fork_fails():
        call = next(calls)
        if call % 3 == 0:
            failed.append(call)
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    fork_fault(every_third_fork_fails)
    items = [(seed, 2 * PIPE_CAPACITY + seed) for seed in range(12)]
    out = fastfork.map(make_blob, items, jobs=4, fork_retries=1, timeout=NO_DEADLOCK)
    assert out == [blob(n, seed) for seed, n in items]
    # 12 forks succeeded, and each failure was retried: 17 calls in all.
    assert failed == [3, 6, 9, 12, 15]


# --------------------------------------------- 3. killed by a timeout mid-write


def stall_mid_write(item):
    """Return a 32 MiB result, but SIGSTOP this child once it is blocked writing it.

    A thread watches the main thread's system call: a write of the payload
    (>= 1 MiB) to our result pipe while that pipe is blocking again means the
    child rang the doorbell (the pipe is non-blocking until it rings) and is
    now writing the rest; "rang" goes to ``marker`` just before the stop.
    """
    marker, n = item
    mark = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fds = set(_core.owned_fds())  # the result pipe and the doorbell
    syscall = f"/proc/self/task/{os.getpid()}/syscall"

    def watch():
        while True:
            with open(syscall) as f:
                fields = f.read().split()
            if len(fields) < 4 or fields[0] in ("running", "-1"):
                continue
            fd, count = int(fields[1], 16), int(fields[3], 16)
            if fd in fds and count >= 1 << 20 and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
                os.write(mark, b"rang")
                os.kill(os.getpid(), signal.SIGSTOP)
                return
    threading.Thread(target=watch, daemon=True).start()
    return blob(n)


def stall_or_blob(item):
    kind, arg = item
    return stall_mid_write(arg) if kind == "stall" else make_blob(arg)


def test_child_that_rang_then_timed_out_mid_write_reports_the_timeout(tmp_path):
    try:
        with open(f"/proc/self/task/{os.getpid()}/syscall") as f:
            f.read()
    except OSError as exc:
        pytest.skip(f"cannot watch a thread's system call here: {exc}")
    marker = str(tmp_path / "marker")
    items = [("stall", (marker, 32 << 20)), ("blob", (1, 3 << 20)), ("blob", (2, 10))]
    out = fastfork.map(stall_or_blob, items, jobs=3, timeout=2.0, grace=1.0,
                       return_exceptions=True)
    assert (tmp_path / "marker").read_bytes() == b"rang", \
        "the child never blocked writing after a ring"
    err = out[0]
    assert isinstance(err, fastfork.ChildError), f"got a {type(err).__name__}, not the timeout"
    # Stopped (SIGSTOP) mid-write: the timeout's SIGTERM came with a SIGCONT.
    assert err.returncode == -signal.SIGTERM and err.index == 0
    assert "timed out" in str(err) and "unpickled" not in str(err), str(err)
    assert out[1:] == [blob(3 << 20, 1), blob(10, 2)]


# --------------------------------------------- 4. as_completed closed early


def test_breaking_out_of_as_completed_stops_and_reaps_the_rest():
    sleep = 20
    before = procutil.children()
    started = time.monotonic()
    for index, value in fastfork.as_completed(sleep_then, [0.0, sleep, sleep, sleep], jobs=4):
        assert (index, value) == (0, 0.0)
        assert len(procutil.children() - before) == 3  # the sleepers run
        break
    # The generator was closed as the loop let go of it: nothing left, not even a zombie.
    assert procutil.children() - before == set()
    assert time.monotonic() - started < sleep / 2


def stubborn_or_writer(kind):
    if kind == "quick":
        return kind
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(SYNC_W, b"s")
        time.sleep(30)
    time.sleep(0.1)  # let "quick" finish first
    os.write(SYNC_W, b"w")
    return blob(50 << 20)  # overfills its pipe: blocks while nobody drains it


def test_closing_as_completed_stops_writers_blocked_on_a_full_pipe_and_stubborn_children(
        sync_pipe):
    before = procutil.children()
    fds_before = procutil.open_fds()
    started = time.monotonic()
    gen = fastfork.as_completed(stubborn_or_writer, ["quick", "big", "big", "stubborn"],
                                jobs=4, grace=0.3)
    with contextlib.closing(gen):
        assert next(gen) == (0, "quick")
        wait_readable(sync_pipe, 3)  # the writers fill their pipes and block: nobody drains now
        assert len(procutil.children() - before) == 3
    assert procutil.children() - before == set()
    assert procutil.open_fds() == fds_before
    assert time.monotonic() - started < 15  # the stubborn child was SIGKILLed after grace


def test_closing_as_completed_after_the_rest_exited_does_not_wait_out_the_grace():
    # close() reaps the children that have already exited and frees their
    # slots at once: with nothing left running it must not sleep out the grace.
    grace = 30.0
    before = procutil.children()
    gen = fastfork.as_completed(sleep_then, [0.0, 0.1, 0.1], jobs=3, grace=grace)
    with contextlib.closing(gen):
        # Under load a 0.1 s child can finish first, and the engine may have
        # reaped more than the one it reported: the rest are what it has not.
        index, value = next(gen)
        assert value == [0.0, 0.1, 0.1][index]
        rest = procutil.children() - before
        assert len(rest) <= 2
        deadline = time.monotonic() + 10
        while procutil.zombies(rest) != rest and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procutil.zombies(rest) == rest  # both have exited; nobody reaped them yet
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert procutil.children() - before == set()
    assert elapsed < grace / 2, f"closing took {elapsed:.2f} s with nothing left running"


# --------------------------------------------- 5. stop_on_failure


def record_then_maybe_fail(item):
    log, i, how = item
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if i == 2:
        if how == "raise":
            raise ValueError(f"item {i} fails")
        if how == "exit":
            os._exit(3)
        if how == "timeout":
            time.sleep(30)
        if how == "timeout, then a result":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit())  # sends None, exits 0
            time.sleep(30)
    return i


def _started(log):
    with open(log) as f:
        return [int(line) for line in f]


@pytest.mark.parametrize("how", ["raise", "exit", "timeout", "timeout, then a result"])
def test_map_first_failure_stops_new_starts(tmp_path, how):
    log = str(tmp_path / "started")
    items = [(log, i, how) for i in range(6)]
    with pytest.raises(fastfork.ChildError) as info:
        fastfork.map(record_then_maybe_fail, items, jobs=1,
                     timeout=3 if how.startswith("timeout") else None)
    err = info.value
    assert err.index == 2
    if how == "raise":
        assert err.exc_type == "ValueError" and err.returncode == 1
    elif how == "exit":
        assert err.returncode == 3 and "without a result" in str(err)
    elif how == "timeout":
        assert "timed out" in str(err) and err.returncode == -signal.SIGTERM
    else:
        assert "timed out" in str(err) and err.returncode == 0
    assert _started(log) == [0, 1, 2]  # items 3..5 were never started


def test_as_completed_first_failure_stops_new_starts(tmp_path):
    log = str(tmp_path / "started")
    items = [(log, i, "raise") for i in range(6)]
    got = []
    with pytest.raises(fastfork.ChildError) as info:
        for index, value in fastfork.as_completed(record_then_maybe_fail, items, jobs=1):
            got.append((index, value))
    assert got == [(0, 0), (1, 1)] and info.value.index == 2
    assert _started(log) == [0, 1, 2]


def test_return_exceptions_runs_every_item_past_a_failure(tmp_path):
    log = str(tmp_path / "started")
    items = [(log, i, "raise") for i in range(6)]
    out = fastfork.map(record_then_maybe_fail, items, jobs=1, return_exceptions=True)
    assert out[:2] == [0, 1] and out[3:] == [3, 4, 5]
    assert isinstance(out[2], fastfork.ChildError) and out[2].exc_type == "ValueError"
    assert _started(log) == list(range(6))


# --------------------------------------------- 6. a result the parent cannot unpickle


def _refuse_to_load(message):
    raise ValueError(message)


class LoadsBadly:
    """Pickles fine in the child; unpickling it (in the parent) raises."""

    def __reduce__(self):
        return _refuse_to_load, ("refusing to be unpickled",)


def unloadable_at(item):
    log, i = item
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return LoadsBadly() if i == 1 else blob(i * PIPE_CAPACITY, i)


def _check_unloadable(err):
    assert isinstance(err, fastfork.ChildError), err
    assert "could not be unpickled" in str(err) and "refusing to be unpickled" in str(err)
    assert err.index == 1 and err.returncode == 0  # the child itself succeeded


def test_result_that_cannot_be_unpickled_fails_its_item_only(tmp_path):
    log = str(tmp_path / "started")
    items = [(log, i) for i in range(4)]
    out = fastfork.map(unloadable_at, items, jobs=2, return_exceptions=True)
    _check_unloadable(out[1])
    assert [out[0], *out[2:]] == [blob(i * PIPE_CAPACITY, i) for i in (0, 2, 3)]
    got = dict(fastfork.as_completed(unloadable_at, items, jobs=2, return_exceptions=True))
    _check_unloadable(got.pop(1))
    assert got == {i: blob(i * PIPE_CAPACITY, i) for i in (0, 2, 3)}


def test_map_finds_an_unloadable_result_once_every_child_has_run(tmp_path):
    # map decodes nothing until every child has exited (until_done), so the
    # item after the unloadable one was started all the same.
    log = str(tmp_path / "started")
    with pytest.raises(fastfork.ChildError) as info:
        fastfork.map(unloadable_at, [(log, i) for i in range(4)], jobs=1)
    _check_unloadable(info.value)
    assert _started(log) == [0, 1, 2, 3]


class CountsChildrenWhenLoaded:
    """Unpickled in the parent as the number of children it has at that moment."""

    def __reduce__(self):
        return len_of_children, ()


def len_of_children():
    return len(procutil.children())


def quick_or_sleep(x):
    if x == "quick":
        return CountsChildrenWhenLoaded()
    time.sleep(x)
    return x


def test_map_decodes_results_only_after_every_child_exited():
    base = len(procutil.children())
    assert fastfork.map(quick_or_sleep, ["quick", 0.3, 0.3], jobs=3) == [base, 0.3, 0.3]
    # as_completed decodes each result as it comes: the sleepers still run then.
    got = dict(fastfork.as_completed(quick_or_sleep, ["quick", 1.0, 1.0], jobs=3))
    assert got == {0: base + 2, 1: 1.0, 2: 1.0}


# --------------------------------------------- 7. the child's traceback


def raise_value_error(item):
    raise ValueError(f"bad item {item}")


def unpicklable_result(_):
    return threading.Lock()


TRACEBACK_FRAME = re.compile(r'^  File "([^"]+)", line \d+, in (\S+)$', re.MULTILINE)


@pytest.mark.parametrize("how", ["map", "as_completed", "start"])
def test_a_childs_traceback_shows_the_users_frames_only(how):
    # The frames that call the function in the child are fastfork's own (its
    # compiled core): they tell the user nothing and are left out.
    with pytest.raises(fastfork.ChildError) as info:
        if how == "map":
            fastfork.map(raise_value_error, [1], timeout=NO_DEADLOCK)
        elif how == "as_completed":
            list(fastfork.as_completed(raise_value_error, [1], timeout=NO_DEADLOCK))
        else:
            fastfork.start(raise_value_error, 1).result(timeout=NO_DEADLOCK)
    text = info.value.remote_traceback
    assert text.startswith("Traceback (most recent call last):\n"), text
    assert TRACEBACK_FRAME.findall(text) == [(__file__, "raise_value_error")], text
    assert text.endswith("ValueError: bad item 1\n"), text


def test_traceback_of_an_unpicklable_result_has_no_frame_of_fastfork():
    with pytest.raises(fastfork.ChildError) as info:
        fastfork.map(unpicklable_result, [1], timeout=NO_DEADLOCK)
    text = info.value.remote_traceback
    assert TRACEBACK_FRAME.findall(text) == [], text
    assert "cannot pickle" in text, text


def test_a_traceback_printed_by_the_child_shows_the_users_frames_only():
    proc = procutil.run_python(textwrap.dedent("""
        import fastfork

        def fail(item):
            raise ValueError(f"bad item {item}")

        for error in fastfork.map(fail, [1], return_exceptions=True, print_traceback=True):
            print(type(error).__name__)
        try:
            fastfork.start_child(fail, (2,), print_traceback=True).result(timeout=30)
        except fastfork.ChildError:
            print("ChildError")
    """))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ChildError", "ChildError"], proc.stderr
    frames = TRACEBACK_FRAME.findall(proc.stderr)
    assert frames == [("<string>", "fail")] * 2, proc.stderr
    assert "bad item 1" in proc.stderr and "bad item 2" in proc.stderr


# --------------------------------------------- 8. _core.FanOut used directly


def test_engine_steps_until_done_and_reports_whole_outcomes():
    fds_before = procutil.open_fds()
    owned_before = set(_core.owned_fds())
    items = [(0, 5), (1, PIPE_CAPACITY * 3), (2, 0), (3, 1 << 20)]
    engine = new_engine(make_blob, items, 2)
    outcomes = []
    try:
        while not engine.done_running:
            outcomes += engine.step()
        assert engine.step() == []
        assert engine.started == 4 and engine.fork_error is None and engine.pending is None
    finally:
        engine.close(0)
    assert sorted(o[0] for o in outcomes) == [0, 1, 2, 3]
    for index, item, pid, returncode, kind, payload, timed_out, lost in outcomes:
        assert item == items[index] and pid > 0
        assert (returncode, kind, timed_out, lost) == (0, b"R", False, False)
        assert pickle.loads(payload) == make_blob(item)
    assert procutil.open_fds() == fds_before
    assert set(_core.owned_fds()) == owned_before


def test_engine_close_twice_is_safe():
    # A second close() finds the slots freed and returns. Run in a fresh
    # interpreter, so that a crash fails this test, not the whole session.
    code = textwrap.dedent("""
        import pickle, fastfork.child, procutil  # fastfork.child registers the engine's fd set
        from fastfork import _core
        def double(x):
            return 2 * x
        fds = procutil.open_fds()
        engine = _core.FanOut(double, iter([1, 2, 3]), 2, None, 1.0, 0, 0, False, False)
        outcomes = []
        while not engine.done_running:
            outcomes += engine.step()
        print(sorted(pickle.loads(o[5]) for o in outcomes), flush=True)
        engine.close(0)
        print("closed", flush=True)
        engine.close(0)
        print("closed again", engine.step(), engine.done_running, flush=True)
        print(procutil.open_fds() == fds, len(procutil.children()))
    """)
    proc = procutil.run_python(code)
    assert proc.stdout.splitlines() == ["[2, 4, 6]", "closed", "closed again [] True",
                                        "True 0"], (proc.returncode, proc.stderr)
    assert proc.returncode == 0, proc.stderr


def quick_sleeper_stubborn_stopped(kind):
    if kind == "quick":
        return kind
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(SYNC_W, b"x")
    if kind == "stopped":
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(30)


SYNC_W = -1  # the write end of a test's sync pipe, inherited by its children


@pytest.fixture
def sync_pipe():
    """A pipe children write a byte to once they are ready (SYNC_W in the child)."""
    global SYNC_W
    r, w = os.pipe()
    SYNC_W = w
    try:
        yield r
    finally:
        SYNC_W = -1
        os.close(r)
        os.close(w)


def test_engine_close_stops_running_children(sync_pipe):
    before = procutil.children()
    fds_before = procutil.open_fds()
    owned_before = set(_core.owned_fds())
    engine = new_engine(quick_sleeper_stubborn_stopped,
                        ["quick", "sleeper", "stubborn", "stopped"], 4)
    try:
        [outcome] = engine.step()
        assert outcome[:2] == (0, "quick") and outcome[4] == b"R"
        wait_readable(sync_pipe, 3)  # SIGTERM is ignored, the last one stopped
        running = procutil.children() - before
        assert len(running) == 3
        started = time.monotonic()
        engine.close(0.3)
        elapsed = time.monotonic() - started
    finally:
        engine.close(0)  # a second close() does nothing (it would stop what is left)
    # Nothing left the moment close() returns: not running, not a zombie.
    assert procutil.children() & running == set()
    assert elapsed >= 0.3 * 0.99  # the stubborn child had its grace before SIGKILL
    assert engine.done_running and engine.step() == []  # outcomes of stopped children dropped
    assert procutil.open_fds() == fds_before
    assert set(_core.owned_fds()) == owned_before


def test_engine_deleted_while_children_run_kills_and_reaps_them(sync_pipe):
    # The __dealloc__ safety net: an engine dropped without close() (no Python
    # code can run there) SIGKILLs and reaps its children and closes its fds,
    # a child blocked writing into its full pipe included.
    before = procutil.children()
    fds_before = procutil.open_fds()
    owned_before = set(_core.owned_fds())
    engine = new_engine(stubborn_or_writer, ["quick", "stubborn", "big"], 3)
    [outcome] = engine.step()
    assert outcome[:2] == (0, "quick")
    running = procutil.children() - before
    assert len(running) == 2
    wait_readable(sync_pipe, 2)  # "big" is writing: step() no longer drains its pipe
    del engine, outcome
    gc.collect()
    assert procutil.children() & running == set()  # no zombie: reaped in __dealloc__
    assert all(procutil.state(pid) is None for pid in running)
    assert procutil.open_fds() == fds_before
    assert set(_core.owned_fds()) == owned_before


def test_big_results_with_sigchld_ignored():
    # SIGCHLD ignored: the kernel reaps the children itself (the engine sees
    # ECHILD: "lost"), and the frames, rung or not, are still read whole.
    code = textwrap.dedent("""
        import signal, fastfork, procutil
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        def f(n):
            return b"x" * n
        sizes = [10, 70000, 1 << 20, 5 << 20]
        print([len(b) for b in fastfork.map(f, sizes, jobs=4, timeout=30)])
        print(sorted(len(b) for _, b in fastfork.as_completed(f, sizes, jobs=4, timeout=30)))
        print(len(procutil.children()))
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == 0, proc.stderr
    sizes = [10, 70000, 1 << 20, 5 << 20]
    assert proc.stdout.splitlines() == [str(sizes), str(sizes), "0"]


# --------------------------------------------- 9. another thread starting children


# Run in a fresh interpreter: a library loaded by an earlier test can make
# pipes in every forked child (libuv, under uvloop, makes its signal pipe anew
# in each child from a pthread_atfork handler), which no check here could tell
# from an inherited one.
_THREADS_AND_MAP = textwrap.dedent("""
    import json, os, stat, threading, time, warnings
    import fastfork

    def pipe_inodes():
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                st = os.fstat(int(fd))
            except OSError:
                continue
            if stat.S_ISFIFO(st.st_mode):
                found.add(st.st_ino)
        return found

    def pipes_held(_):
        time.sleep(0.05)  # siblings and the other thread's children are alive meanwhile
        return sorted(pipe_inodes())

    baseline = pipe_inodes()  # the interpreter's own pipes, inherited by every child
    stop = threading.Event()
    theirs = []  # (inode of a start() child's result pipe, the pipes that child held)
    errors = []

    def other_thread():
        try:
            while not stop.is_set():
                kids = [fastfork.start(pipes_held, None) for _ in range(3)]
                inodes = [os.fstat(k._result_fd).st_ino for k in kids]
                theirs.extend(zip(inodes, [k.result(timeout=30) for k in kids]))
        except BaseException as exc:
            errors.append(repr(exc))

    thread = threading.Thread(target=other_thread)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        thread.start()
        try:
            while len(theirs) < 3 and thread.is_alive():  # the other thread forks by now
                time.sleep(0.01)
            in_map = fastfork.map(pipes_held, range(16), jobs=4, timeout=30)
        finally:
            stop.set()
            thread.join()
    print(json.dumps({"baseline": sorted(baseline), "theirs": theirs, "mine": in_map,
                      "errors": errors}))
""")


def test_fan_out_children_hold_no_pipe_of_another_threads_children():
    proc = procutil.run_python(_THREADS_AND_MAP, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["errors"], report["errors"]
    baseline = set(report["baseline"])
    their_pipes = {inode for inode, _ in report["theirs"]}
    mine = [set(held) - baseline for held in report["mine"]]
    # Each map child holds two pipes: its own result pipe and the doorbell,
    # which all of them share; none of the other thread's result pipes.
    assert all(len(held) == 2 for held in mine), mine
    doorbell = set.intersection(*mine)
    assert len(doorbell) == 1, mine
    assert len({(held - doorbell).pop() for held in mine}) == 16, mine
    assert not set.union(*mine) & their_pipes
    # And the other thread's children hold only their own result pipe.
    for inode, held in report["theirs"]:
        assert set(held) - baseline == {inode}, (inode, set(held) - baseline, doorbell)


# ---------------------------------------------------------------- the fd limit

# Each child's body: say it runs, then wait until the parent lets all go at once.
_ALL_AT_ONCE = textwrap.dedent("""
    import json, os, resource, sys, threading
    import fastfork

    N = 100
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def child(i):
        os.close(go_w)
        os.write(ready_w, b"x")
        os.read(go_r, 1)  # end of file once every child holds no go_w
        return i

    def release():
        got = 0
        while got < N:
            got += len(os.read(ready_r, N - got))
        os.close(go_w)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, HARD if HARD else hard))
    if not HARD:
        threading.Thread(target=release, daemon=True).start()
    try:
        results = fastfork.map(child, range(N), jobs=N)
    except OSError as exc:
        print(json.dumps({"errno": exc.errno, "message": str(exc)}))
    else:
        print(json.dumps({"results": results,
                          "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                          "hard": hard}))
""")


def _run_for_report(script):
    """Run ``script`` in a fresh interpreter; return the JSON report it prints."""
    proc = procutil.run_python(script, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _run_all_at_once(hard):
    return _run_for_report(_ALL_AT_ONCE.replace("HARD", repr(hard)))


def test_fd_limit_is_raised_as_far_as_the_children_need():
    # 100 children at once hold 100 fds in the parent (one each); the soft
    # limit starts at 64.
    report = _run_all_at_once(None)
    assert report["results"] == list(range(100))
    assert 100 < report["soft"] <= report["hard"]
    if report["hard"] > 200:
        assert report["soft"] < 200  # only as far as needed, not to the hard limit


# A fan-out of 100 children, jobs=100, under a hard fd limit of 64; with FREE
# set, the parent first opens files until only FREE fds are left. The
# children wait until the parent warns that it holds the others back (or
# they would finish, and free their fds, before the limit is reached).
_UNDER_64_FDS = textwrap.dedent("""
    import json, os, resource, warnings
    import fastfork

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    go_r, go_w = os.pipe()
    held = []
    if FREE is not None:
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass
        for _ in range(FREE):
            os.close(held.pop())
    caught = []

    def show(message, category, filename, lineno, file=None, line=None):
        caught.append((category.__name__, str(message), filename))
        if category is RuntimeWarning:
            os.write(go_w, b"x" * 100)  # one byte for each child

    def child(i):
        os.read(go_r, 1)
        return abs(i)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            report = {"results": fastfork.map(child, range(100), jobs=100)}
        except OSError as exc:
            report = {"errno": exc.errno, "message": str(exc)}
    report["warnings"] = caught
    print(json.dumps(report))
""")


def _run_under_64_fds(free):
    return _run_for_report(_UNDER_64_FDS.replace("FREE", repr(free)))


def test_fd_limit_too_low_holds_children_back_with_one_warning():
    # About 55 children fit in 64 fds: the rest start as running ones finish.
    report = _run_under_64_fds(None)
    assert report["results"] == list(range(100))
    [(category, message, filename)] = report["warnings"]
    assert category == "RuntimeWarning"
    assert "RLIMIT_NOFILE" in message and "jobs=100" in message
    assert filename == "<string>"  # the user's line, not fastfork's


def test_no_fd_left_for_a_child_is_a_clear_error():
    # The fan-out's own three fds fit, and one more: not the two a child needs.
    report = _run_under_64_fds(4)
    assert report["errno"] == errno.EMFILE
    assert "RLIMIT_NOFILE" in report["message"] and "raise the" in report["message"]
    assert report["warnings"] == []


# ------------------------------------- 10. a child's exit seen through its pipe
#
# The parent holds one fd per running child, the read end of its result pipe,
# and learns of the child's exit when that pipe hangs up. These tests aim at
# what could keep a pipe from hanging up when the child exits, or make it hang
# up while the child runs on, with pidfds and without them.

READY_W = GO_R = GO_W = -1  # a test's pipes, inherited by its children


@pytest.fixture
def ready_and_go():
    """Two pipes: children write a byte to ``ready`` (READY_W) when they are
    ready, then wait on ``go`` (GO_R) until the test closes its write end.

    Yields (ready_r, release), ``release()`` closing the test's end of ``go``.
    A child must close its own copy of GO_W first (see close_go_w).
    """
    global READY_W, GO_R, GO_W
    ready_r, READY_W = os.pipe()
    GO_R, GO_W = os.pipe()

    def release():
        global GO_W
        if GO_W >= 0:
            os.close(GO_W)
            GO_W = -1

    try:
        yield ready_r, release
    finally:
        release()
        for fd in (ready_r, READY_W, GO_R):
            os.close(fd)
        READY_W = GO_R = -1


def close_go_w():
    """In a child: close the inherited write end of ``go``, so that it ends when the test's does."""
    if GO_W >= 0:
        os.close(GO_W)


def wait_for_go():
    assert os.read(GO_R, 1) == b""  # end of file: the test released us


def pipe_inodes_of(fds):
    return {os.fstat(fd).st_ino for fd in fds}


def close_result_pipe_then_wait(kind):
    """Close the fan-out's fds (as os.closerange would), say so, and wait for the test."""
    if kind == "waiter":
        # Returns once the other child has closed its pipe and runs on.
        assert os.read(READY_R, 1) == b"x"
        return "waited"
    close_go_w()
    for fd in _core.owned_fds():  # its result pipe and the doorbell
        os.close(fd)
    os.write(READY_W, b"x")
    wait_for_go()
    return "never sent: the result pipe is closed"


READY_R = -1


def test_child_that_closes_its_pipe_early_runs_on_and_fails_without_a_result(
        pidfd_mode, ready_and_go):
    # Its pipe hangs up while it runs: the engine waits for its exit through
    # a pidfd (or polls its pid), and reports it as a child without a result.
    global READY_R
    ready_r, release = ready_and_go
    READY_R = ready_r
    before = procutil.children()
    fds_before = procutil.open_fds() - {GO_W}  # closed by release()
    try:
        gen = fastfork.as_completed(close_result_pipe_then_wait, ["closer", "waiter"], jobs=2,
                                    timeout=NO_DEADLOCK, return_exceptions=True)
        with contextlib.closing(gen):
            assert next(gen) == (1, "waited")
            [closer] = procutil.children() - before
            assert procutil.state(closer) not in (None, "Z")  # not reaped, runs on
            release()
            [(index, error)] = list(gen)
    finally:
        READY_R = -1
    assert index == 0 and isinstance(error, fastfork.ChildError), error
    assert error.returncode == 70 and "without a result" in str(error)  # writing failed
    assert not isinstance(error, fastfork.ChildTimeout)
    assert procutil.children() - before == set()
    assert procutil.open_fds() == fds_before


def close_result_pipe_and_hang(_):
    close_go_w()
    for fd in _core.owned_fds():
        os.close(fd)
    wait_for_go()  # never released: the timeout stops it


def test_timeout_stops_a_child_whose_pipe_hung_up(pidfd_mode, ready_and_go):
    # A child that hung up its pipe and runs on is signalled for its timeout
    # through the pidfd that replaced the pipe (or by pid when polling).
    before = procutil.children()
    with pytest.raises(fastfork.ChildTimeout) as caught:
        fastfork.map(close_result_pipe_and_hang, [0], timeout=0.5, grace=0)
    assert caught.value.returncode == -signal.SIGKILL
    assert procutil.children() - before == set()


def test_close_stops_a_child_whose_pipe_hung_up(pidfd_mode, ready_and_go):
    # close() signals a child that hung up its pipe and runs on, through the
    # pidfd that replaced the pipe (or by pid when polling), and reaps it.
    global READY_R
    ready_r, release = ready_and_go
    READY_R = ready_r
    before = procutil.children()
    fds_before = procutil.open_fds()
    engine = new_engine(say_when_terminated, ["closer", "waiter"], 2)
    try:
        [outcome] = engine.step()
        assert outcome[:2] == (1, "waiter")
        [closer] = procutil.children() - before
        assert procutil.state(closer) not in (None, "Z")
    finally:
        READY_R = -1
        engine.close(NO_DEADLOCK)
    # It got SIGTERM, not only close()'s last SIGKILL; it has exited, so the byte is there.
    os.set_blocking(ready_r, False)
    assert os.read(ready_r, 1) == b"t"
    assert procutil.children() - before == set()
    assert procutil.open_fds() == fds_before


def say_when_terminated(kind):
    if kind == "closer":
        signal.signal(signal.SIGTERM, lambda *_: (os.write(READY_W, b"t"), os._exit(15)))
    return close_result_pipe_then_wait(kind)


def fork_lingering_grandchild(how):
    """Fork a grandchild that outlives this child until the test releases it.

    The grandchild reports, on READY_W, the inodes of the pipes it holds; the
    child returns the grandchild's pid and the inodes of its own fan-out fds.
    """
    close_go_w()
    fan_out_pipes = pipe_inodes_of(_core.owned_fds())  # its result pipe and the doorbell
    if how == "os.fork":
        pid = os.fork()
    else:  # a fork that runs no at-fork hook, as a C extension's
        pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        try:
            held = procutil.pipe_inodes()
            os.write(READY_W, (json.dumps(sorted(held)) + "\n").encode())
            wait_for_go()
        finally:
            os._exit(0)
    return pid, sorted(fan_out_pipes)


def _read_line(fd):
    line = b""
    while not line.endswith(b"\n"):
        line += wait_readable(fd, 1, NO_DEADLOCK)
    return line


@pytest.mark.parametrize("how", ["os.fork", "raw fork"])
def test_a_grandchild_holding_on_does_not_keep_the_child_from_being_reaped(
        pidfd_mode, ready_and_go, how):
    # os.fork's grandchild closes the fan-out's fds (an at-fork hook), so the
    # pipe hangs up at the child's exit; a raw fork's grandchild keeps the
    # result pipe open, and the engine's once-a-second sweep reaps the child.
    # Either way map returns while the grandchild still runs, with the result.
    ready_r, release = ready_and_go
    before = procutil.children()
    [(grandchild, fan_out_pipes)] = fastfork.map(fork_lingering_grandchild, [how],
                                                 timeout=NO_DEADLOCK)
    held = set(json.loads(_read_line(ready_r)))
    try:
        assert procutil.state(grandchild) not in (None, "Z")  # map did not wait for it
        if how == "os.fork":
            assert not held & set(fan_out_pipes), (held, fan_out_pipes)
        else:
            assert held & set(fan_out_pipes)  # the case the sweep is for
    finally:
        release()
        assert procutil.wait_ended([grandchild]) == []  # reparented: init reaps it
    assert procutil.children() - before == set()


def ready_then_wait(i):
    if i == "waiter":
        assert os.read(READY_R, N_BLOCKED) == b"x" * N_BLOCKED  # one write each: atomic
        return i
    close_go_w()
    os.write(READY_W, b"x")
    wait_for_go()
    return i


N_BLOCKED = 50


def test_the_engine_holds_one_fd_per_running_child(pidfd_mode, ready_and_go):
    global READY_R
    ready_r, release = ready_and_go
    READY_R = ready_r
    fds_before = procutil.open_fds()
    go_w = GO_W  # closed by release()
    items = ["waiter"] + list(range(N_BLOCKED))
    engine = new_engine(ready_then_wait, items, len(items))
    try:
        # The waiter returns once all the others run and block.
        [outcome] = engine.step()
        assert outcome[:2] == (0, "waiter")
        held = procutil.open_fds() - fds_before
        # One per running child, and the fan-out's own three (epoll, doorbell).
        assert len(held) <= N_BLOCKED + 3, sorted(held)
        release()
        outcomes = []
        while not engine.done_running:
            outcomes += engine.step()
    finally:
        READY_R = -1
        engine.close(0)
    assert sorted(pickle.loads(o[5]) for o in outcomes) == list(range(N_BLOCKED))
    assert procutil.open_fds() == fds_before - {go_w}


def mixed_size_result(i):
    return blob(MIXED_SIZES[i % len(MIXED_SIZES)], i)


# Empty, small, just under and over the pipe's capacity, and a few times it.
MIXED_SIZES = [0, 100, PIPE_CAPACITY - 100, PIPE_CAPACITY + 1, 3 * PIPE_CAPACITY, 1 << 20]


def test_many_children_at_once_with_results_of_mixed_sizes(pidfd_mode):
    n = 300
    fds_before = procutil.open_fds()
    got = fastfork.map(mixed_size_result, range(n), jobs=n)
    assert got == [mixed_size_result(i) for i in range(n)]
    assert dict(fastfork.as_completed(mixed_size_result, range(n), jobs=n)) == dict(
        enumerate(got))
    assert procutil.open_fds() == fds_before
