"""fastfork._scheduler: the state machine's rules one by one, its poll driver, and an
asyncio driver built on the same interface (the shape later front ends rely on).

The front-end view of the same rules is tests/test_contract.py.
"""
import asyncio
import errno
import itertools
import os
import signal
import time

import pytest

import fastfork
from fastfork._scheduler import Scheduler, backoff, drive


def wait_for_fd(fd):
    """The child's work: block until ``fd`` (a pipe) has data or hits end of file."""
    os.read(fd, 1)
    return "released"


def ignore_term_and_block(fd):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(fd, b"r")
    time.sleep(600)


def start(fn, *args):
    return fastfork.start_child(fn, args)


class Launcher:
    """launch(task) for a Scheduler: records each call; ``faults`` raise instead.

    ``faults`` maps a task to the errnos its successive launches fail with.
    A task is (fn, args).
    """

    def __init__(self, faults=None):
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.calls = []

    def __call__(self, task):
        self.calls.append(task)
        pending = self.faults.get(task)
        if pending:
            err = pending.pop(0)
            raise OSError(err, os.strerror(err))
        fn, args = task
        return start(fn, *args)


def results(entries):
    return {e.index: (e.handle.result() if e.error is None and not e.cancelled else e)
            for e in entries}


def test_backoff_doubles_up_to_half_a_second():
    assert [backoff(n) for n in (1, 2, 3)] == [0.01, 0.02, 0.04]
    assert backoff(7) == backoff(30) == 0.5


def test_the_c_engine_backs_off_by_the_same_function():
    # One formula for every fan-out: the scheduler's is the C engine's.
    assert backoff is fastfork._core.backoff


def test_eagain_is_retried_after_a_back_off():
    task = (abs, (-3,))
    launch = Launcher({task: [errno.EAGAIN, errno.ENOMEM]})
    scheduler = Scheduler(launch, [task], jobs=1, retries=2)
    assert scheduler.fill() == []  # failed, backing off
    deadline = scheduler.next_deadline()
    assert deadline is not None and deadline > time.monotonic() - 1
    done = list(drive(scheduler))
    assert [e.handle.result() for e in done] == [3]
    assert launch.calls == [task] * 3


def test_retries_run_out_then_that_task_and_every_waiting_one_fail():
    tasks = [(abs, (-i,)) for i in range(4)]
    launch = Launcher({tasks[1]: [errno.EAGAIN] * 3})
    scheduler = Scheduler(launch, tasks, jobs=1, retries=2, stop_on_failure=False)
    done = list(drive(scheduler))
    assert done[0].handle.result() == 0
    assert [(e.index, e.error.errno) for e in done[1:]] == [
        (1, errno.EAGAIN), (2, errno.EAGAIN), (3, errno.EAGAIN)]
    # Tasks 2 and 3 were not tried: they would meet the same limit.
    assert launch.calls == [tasks[0]] + [tasks[1]] * 3


def test_given_up_retries_fail_an_endless_input_a_batch_at_a_time():
    task = (abs, (-1,))
    launch = Launcher({task: [errno.ENOMEM] * 3})
    scheduler = Scheduler(launch, itertools.repeat(task), jobs=2, retries=2,
                          stop_on_failure=False)
    entries = drive(scheduler)
    first = list(itertools.islice(entries, 10))
    entries.close()
    assert [e.index for e in first] == list(range(10))
    assert all(e.error.errno == errno.ENOMEM for e in first)
    assert launch.calls == [task] * 3


def test_a_failed_launch_stops_new_launches():
    tasks = [(abs, (-i,)) for i in range(3)]
    launch = Launcher({tasks[0]: [errno.EACCES]})
    scheduler = Scheduler(launch, tasks, jobs=1)
    done = list(drive(scheduler))
    assert [(e.index, e.error.errno) for e in done] == [(0, errno.EACCES)]
    assert launch.calls == [tasks[0]]


def test_out_of_fds_waits_for_a_running_child_then_fails_only_alone():
    r, w = os.pipe()
    try:
        first, second = (wait_for_fd, (r,)), (abs, (-2,))
        launch = Launcher({second: [errno.EMFILE]})
        scheduler = Scheduler(launch, [first, second], jobs=2)
        with pytest.warns(RuntimeWarning, match="open-file limit") as caught:
            assert [e.task for e in scheduler.fill()] == [first]
        assert caught[0].filename == __file__  # it names the caller's line
        # The second launch failed for want of fds: no retry while the first runs.
        assert launch.calls == [first, second]
        assert scheduler.fill() == [] and launch.calls == [first, second]
        assert scheduler.next_deadline() is None  # woken by the child's exit only
        os.write(w, b"x")
        done = list(drive(scheduler))
        assert [e.handle.result() for e in done] == ["released", 2]
        assert launch.calls == [first, second, second]
    finally:
        os.close(r)
        os.close(w)
    # With nothing running, running out of fds fails the task at once.
    launch = Launcher({second: [errno.EMFILE]})
    done = list(drive(Scheduler(launch, [second], jobs=2)))
    assert [e.error.errno for e in done] == [errno.EMFILE]


def test_dynamic_input_add_and_close_input():
    launch = Launcher()
    scheduler = Scheduler(launch, jobs=2)
    entries = [scheduler.add((abs, (-i,))) for i in range(5)]
    assert [e.index for e in entries] == list(range(5))
    assert not scheduler.done
    scheduler.close_input()
    assert results(drive(scheduler)) == {i: i for i in range(5)}
    with pytest.raises(RuntimeError):
        scheduler.add((abs, (1,)))


def test_cancel_a_running_and_a_queued_task_without_waiting():
    r, w = os.pipe()
    try:
        launch = Launcher()
        scheduler = Scheduler(launch, jobs=1, grace=1.0)
        running = scheduler.add((ignore_term_and_block, (w,)))
        queued = scheduler.add((abs, (-1,)))
        after = scheduler.add((abs, (-2,)))
        scheduler.close_input()
        assert scheduler.fill() == [running]
        os.read(r, 1)  # its SIGTERM handler is in place
        assert scheduler.cancel(queued) and scheduler.cancel(running)
        assert not scheduler.cancel(queued)
        started = time.monotonic()
        done = list(drive(scheduler))
        # The cancelled child ignores SIGTERM: SIGKILL follows after the grace.
        assert time.monotonic() - started >= 1.0
        assert [e.index for e in done] == [1, 0, 2]
        assert running.cancelled and running.handle.returncode == -signal.SIGKILL
        assert queued.cancelled and queued.handle is None
        # A cancel is not a failure: the next task still ran.
        assert after.handle.result() == 2
    finally:
        os.close(r)
        os.close(w)


def test_close_stops_every_child_in_one_shared_grace():
    r, w = os.pipe()
    try:
        grace = 1.0
        scheduler = Scheduler(Launcher(), [(ignore_term_and_block, (w,))] * 4, jobs=4,
                              grace=grace)
        launched = scheduler.fill()
        for _ in launched:
            os.read(r, 1)
        started = time.monotonic()
        scheduler.close()
        elapsed = time.monotonic() - started
        scheduler.close()  # twice is harmless
    finally:
        os.close(r)
        os.close(w)
    assert all(e.handle.returncode == -signal.SIGKILL for e in launched)
    # A behaviour bound, not a speed threshold: one grace shared by all four
    # (waiting out each child's grace in turn would take 4 * grace).
    assert elapsed < 2 * grace
    assert scheduler.done


def test_watch_changes_report_each_fd_once():
    scheduler = Scheduler(Launcher(), [(abs, (-1,))], jobs=1)
    [entry] = scheduler.fill()
    removed, added = scheduler.watch_changes()
    assert removed == set() and set(added) == set(scheduler.fds())
    assert scheduler.watch_changes() == (set(), {})
    for callback in added.values():
        callback()  # a callback whose fd has nothing to read does no harm
    list(drive(scheduler))
    assert entry.handle.finished and scheduler.fds() == {}


def test_next_deadline_says_when_to_launch_and_when_to_wait():
    scheduler = Scheduler(Launcher(), [(abs, (-1,)), (abs, (-2,))], jobs=1)
    assert scheduler.next_deadline() <= time.monotonic()  # room, and a task waiting
    [entry] = scheduler.fill()
    assert scheduler.next_deadline() is None  # no room: wait for the child's fds
    entry.handle.wait()
    for callback in scheduler.fds().values():
        callback()
    assert scheduler.advance() == [entry]
    # Room again: a driver must come back at once even with nothing running.
    assert not scheduler.running and scheduler.next_deadline() <= time.monotonic()
    assert [e.handle.result() for e in drive(scheduler)] == [2]


async def drive_with_asyncio(scheduler):
    """The scheduler driven by an event loop: add_reader on its fds, call_at on its deadline."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    timer = None
    finished = []

    def on_readable(callback):
        callback()
        wake.set()

    registered = set()
    try:
        while True:
            scheduler.fill()
            finished.extend(scheduler.advance())
            if scheduler.done:
                return finished
            removed, added = scheduler.watch_changes()
            for fd in removed:
                loop.remove_reader(fd)
                registered.discard(fd)
            for fd, callback in added.items():
                loop.add_reader(fd, on_readable, callback)
                registered.add(fd)
            if timer is not None:
                timer.cancel()
            deadline = scheduler.next_deadline()
            # loop.time() is time.monotonic(), the scheduler's clock.
            timer = None if deadline is None else loop.call_at(deadline, wake.set)
            await wake.wait()
            wake.clear()
    finally:
        for fd in registered:
            loop.remove_reader(fd)
        scheduler.close()


def test_an_asyncio_driver_runs_the_same_scheduler():
    r, w = os.pipe()
    try:
        # The last task blocks until its timeout stops it.
        tasks = [(abs, (-i,)) for i in range(6)] + [(wait_for_fd, (r,))]
        scheduler = Scheduler(Launcher(), tasks, jobs=3, timeout=2.0, grace=0.2,
                              stop_on_failure=False)
        done = asyncio.run(drive_with_asyncio(scheduler))
    finally:
        os.close(r)
        os.close(w)
    by_index = {e.index: e for e in done}
    assert [by_index[i].handle.result() for i in range(6)] == list(range(6))
    assert by_index[6].timed_out and by_index[6].handle.returncode == -signal.SIGTERM


# ---------------------------------------------------------------- for fastfork run

def test_set_timeout_gives_a_running_child_a_deadline():
    r, w = os.pipe()
    try:
        scheduler = Scheduler(Launcher(), jobs=1, grace=1.0)
        entry = scheduler.add((wait_for_fd, (r,)))
        scheduler.close_input()
        assert not scheduler.set_timeout(entry, 0.0)  # not launched yet
        assert scheduler.fill() == [entry]
        assert scheduler.set_timeout(entry, 0.0)      # due at once
        done = list(drive(scheduler))
    finally:
        os.close(r)
        os.close(w)
    assert done == [entry]
    assert entry.timed_out and entry.handle.returncode == -signal.SIGTERM
    assert not scheduler.set_timeout(entry, 5.0)      # finished


def test_drive_every_yields_none_while_children_run():
    r, w = os.pipe()
    try:
        scheduler = Scheduler(Launcher(), [(wait_for_fd, (r,))], jobs=1)
        seen = []
        for item in drive(scheduler, every=0.01):
            seen.append(item)
            if item is None and len(seen) == 2:
                os.write(w, b"x")  # the child can end only now
    finally:
        os.close(r)
        os.close(w)
    assert seen[:2] == [None, None]
    assert [e.handle.result() for e in seen if e is not None] == ["released"]
