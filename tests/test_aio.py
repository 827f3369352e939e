"""fastfork.aio: children and commands awaited on an event loop (asyncio; uvloop if installed)."""
import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastfork
import procutil
from fastfork import _core, aio

try:
    import uvloop
except ImportError:
    uvloop = None

needs_311 = pytest.mark.skipif(sys.version_info < (3, 11),
                               reason="TaskGroup and asyncio.timeout are 3.11+")


@pytest.fixture(scope="module")
def uvloop_started():
    """Run uvloop once before the leak guard looks: its first loop opens a pipe for good."""
    if uvloop is not None:
        uvloop.run(asyncio.sleep(0))


@pytest.fixture(params=["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    uvloop is None, reason="uvloop is not installed"))])
def arun(request, uvloop_started):
    """Run a coroutine to completion on a fresh loop of the kind under test.

    Bounded on the loop itself: pytest-timeout's SIGALRM does not interrupt
    uvloop, so a hanging test fails instead of stalling the run.
    """
    run = uvloop.run if request.param == "uvloop" else asyncio.run
    return lambda coro: run(asyncio.wait_for(coro, 100))


@pytest.fixture
def ready_pipe():
    """A pipe (read end, write end) a child writes to when it is ready."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def readable(fd):
    """Wait on the running loop until ``fd`` is readable; return what was written to it.

    Gives up after a minute (TimeoutError): a test fails rather than hangs.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.add_reader(fd, lambda: future.done() or future.set_result(None))
    try:
        await asyncio.wait_for(future, 60)
    finally:
        loop.remove_reader(fd)
    return os.read(fd, 64).decode()


# ------------------------------------------------------------------ child functions

def add(a, b=0):
    return a + b


def boom():
    raise ValueError("boom from the child")


def exit_with(code):
    os._exit(code)


def big_result(size):
    return b"x" * size


def say_ready_then_sleep(fd, ignore_term=False):
    """Write our pid to ``fd`` once ready (SIGTERM ignored if asked), then sleep."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(fd, f"{os.getpid()}\n".encode())
    time.sleep(60)


def serve_until_interrupted(fd):
    # SIGINT raises KeyboardInterrupt here even in a test run started with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        os.write(fd, b"ready\n")
        time.sleep(60)
    except KeyboardInterrupt:
        return "clean"


def assert_gone(pid):
    """``pid`` was our child and has been reaped (not a zombie, not running)."""
    assert pid not in procutil.children()
    assert procutil.state(pid) is None


# ------------------------------------------------------------------ run

def test_run_returns_the_result(arun):
    async def main():
        return await asyncio.gather(aio.run(add, 1, 2), aio.run(add, 1, b=5),
                                    aio.run(add, a=2, b=3))
    assert arun(main()) == [3, 6, 5]


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def test_run_raises_child_error_like_the_synchronous_api(arun):
    async def main():
        with pytest.raises(fastfork.ChildError) as raised:
            await aio.run(boom)
        assert raised.value.exc_type == "ValueError"
        assert "boom from the child" in raised.value.remote_traceback
        assert isinstance(raised.value.__cause__, ValueError)
        with pytest.raises(fastfork.ChildError) as exited:
            await aio.run(exit_with, 3)
        assert exited.value.returncode == 3
        with pytest.raises(fastfork.ChildError) as killed:
            await aio.run(kill_myself)
        assert killed.value.signal == signal.SIGKILL
    arun(main())


def test_run_timeout_stops_the_child_and_raises(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        with pytest.raises(fastfork.ChildTimeout) as info:
            await aio.run(say_ready_then_sleep, w, timeout=0.2)
        pid = int(await readable(r))
        assert isinstance(info.value, TimeoutError) and info.value.timed_out
        assert info.value.pid == pid
        assert info.value.returncode == -signal.SIGTERM
        assert "timed out" in str(info.value)
        assert_gone(pid)
        # A child ignoring SIGTERM gets SIGKILL after the grace.
        with pytest.raises(fastfork.ChildTimeout) as info:
            await aio.run(say_ready_then_sleep, w, True, timeout=0.2)
        assert info.value.returncode == -signal.SIGKILL
        assert_gone(int(await readable(r)))
    arun(main())


def test_bad_arguments_raise_before_any_fork():
    before = procutil.children()
    with pytest.raises(RuntimeError, match="running event loop"):
        aio.start(add, 1)

    async def main():
        with pytest.raises(TypeError):
            await aio.run(42)
        for timeout in (-1, 0, float("nan"), float("inf")):
            with pytest.raises(ValueError):
                await aio.run(add, 1, timeout=timeout)
        with pytest.raises(TypeError):
            await aio.run(add, 1, timeout="1")
        with pytest.raises(TypeError):
            aio.start_child(add, (1,), kwargs=[1])
        with pytest.raises(ValueError):
            aio.start_child(add, (1,), grace=-1)
        with pytest.raises(ValueError):
            async with aio.background(add, 1, stop_signal=12345):
                pass
        with pytest.raises(TypeError):
            async with aio.background("not callable"):
                pass
        with pytest.raises(TypeError):
            await aio.spawn("ls")
        with pytest.raises(ValueError):
            await aio.spawn([])
        with pytest.raises(ValueError):
            await aio.spawn(["true"], stderr=aio.STDOUT, stdout=aio.STDOUT)
        with pytest.raises(ValueError):
            await aio.spawn(["true"], limit=0)
        with pytest.raises(TypeError):
            await aio.spawn(["true"], limit=1.5)
        with pytest.raises(FileNotFoundError) as missing:
            await aio.spawn(["/nonexistent/fastfork-test-program"])
        assert missing.value.filename == "/nonexistent/fastfork-test-program"
    asyncio.run(main())
    assert procutil.children() == before


# ------------------------------------------------------------------ start: the handle

def test_start_handle_waits_signals_and_times_out(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        handle = aio.start(say_ready_then_sleep, w)
        assert int(await readable(r)) == handle.pid
        assert handle.returncode is None and not handle.finished
        assert "running" in repr(handle)
        with pytest.raises(fastfork.TimeoutExpired):
            await handle.wait(timeout=0.01)
        assert handle.returncode is None  # a timed-out wait leaves it running
        handle.terminate()
        # Two waiters on one handle both see the end.
        rc, _ = await asyncio.gather(handle.wait(), handle.wait())
        assert rc == handle.returncode == -signal.SIGTERM
        with pytest.raises(fastfork.ChildError):
            await handle.result()
        handle.kill()  # reaped already: nothing happens
        assert_gone(handle.pid)
    arun(main())


def test_a_handle_is_awaited_on_the_loop_that_started_it(ready_pipe):
    r, w = ready_pipe

    async def first():
        return aio.start(say_ready_then_sleep, w)

    async def second():
        with pytest.raises(RuntimeError, match="event loop that started it"):
            await handle.wait()
    handle = asyncio.run(first())
    try:
        asyncio.run(second())
    finally:
        handle._child.stop(0)  # its loop is gone: stop it the synchronous way


def test_result_and_context_manager(arun):
    async def main():
        async with aio.start(add, 20, 22) as handle:
            assert await handle.result() == 42
        assert handle.returncode == 0
        assert await handle.result() == 42  # again, from the finished handle
    arun(main())


def test_stop_escalates_to_sigkill_without_blocking_the_loop(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        handle = aio.start(say_ready_then_sleep, w, True)
        await readable(r)
        stopping = asyncio.ensure_future(handle.stop(grace=0.5))
        await asyncio.sleep(0)
        # The stop has sent SIGTERM (ignored) and now waits out the grace on the
        # loop: this coroutine runs meanwhile.
        assert not stopping.done() and not handle.finished
        assert await stopping == -signal.SIGKILL
    arun(main())


def test_stop_continues_a_stopped_child(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        handle = aio.start(say_ready_then_sleep, w)
        await readable(r)
        handle.send_signal(signal.SIGSTOP)
        assert await handle.stop(grace=5) == -signal.SIGTERM
    arun(main())


# ------------------------------------------------------------------ cancellation

def test_cancelling_the_awaiting_task_stops_and_reaps(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        for ignore_term in (False, True):
            task = asyncio.ensure_future(aio.run(say_ready_then_sleep, w, ignore_term))
            pid = int(await readable(r))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert_gone(pid)
        # A handle's wait() and result() too.
        handle = aio.start(say_ready_then_sleep, w)
        await readable(r)
        waiting = asyncio.ensure_future(handle.result())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert handle.returncode == -signal.SIGTERM
    arun(main())


def test_cancelled_again_during_the_grace_kills_at_once(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        task = asyncio.ensure_future(aio.run(say_ready_then_sleep, w, True))
        pid = int(await readable(r))
        task.cancel()
        await asyncio.sleep(0)  # the task is now in the grace (SIGTERM is ignored)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_gone(pid)
    arun(main())


@needs_311
def test_task_group_failure_stops_its_children(arun, ready_pipe):
    r, w = ready_pipe
    pids = []

    async def fail_once_ready():
        pids.append(int(await readable(r)))
        raise RuntimeError("sibling failed")

    async def main():
        with pytest.raises(ExceptionGroup) as info:  # noqa: F821 - 3.11+
            async with asyncio.TaskGroup() as group:
                group.create_task(aio.run(say_ready_then_sleep, w))
                group.create_task(fail_once_ready())
        assert [type(e) for e in info.value.exceptions] == [RuntimeError]
    arun(main())
    assert_gone(pids[0])


@needs_311
def test_asyncio_timeout_stops_a_child_and_a_command(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await aio.run(say_ready_then_sleep, w)
        assert_gone(int(await readable(r)))
        proc = await aio.spawn(["sleep", "60"], stdout=aio.PIPE, stderr=aio.PIPE)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await proc.communicate()
        assert proc.returncode == -signal.SIGTERM
        assert_gone(proc.pid)
    arun(main())


# The end of a script whose main() is interrupted: "interrupted", then the
# children and fds left once the coroutines asyncio.run abandoned (on 3.10)
# are closed -- when nothing refers to them, the KeyboardInterrupt's
# traceback included.
RUN_MAIN_INTERRUPTED = textwrap.dedent("""
    run(asyncio.sleep(0))  # a loop's first run may open fds for good (uvloop)
    fds = procutil.open_fds()
    try:
        run(main())
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    gc.collect()
    print(len(procutil.children()), len(procutil.open_fds() - fds), flush=True)
""")


@pytest.mark.parametrize("runner", ["asyncio.run", pytest.param(
    "uvloop.run", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"))])
def test_a_keyboard_interrupt_inside_a_task_still_reaps_every_child(runner):
    # Where Ctrl-C lands on 3.10 (asyncio.run has no SIGINT handler there): in
    # some task's step. asyncio.run then re-raises it while cancelling the
    # rest, closes the loop, and the coroutines still waiting are closed
    # without a loop: their children must be killed and reaped all the same.
    script = f"import asyncio, {runner.split('.')[0]}\nrun = {runner}\n" + textwrap.dedent("""
        import asyncio, gc, time
        import procutil
        from fastfork import aio

        def sleeper(_=None):
            time.sleep(60)

        async def interrupted_read(self, n=-1):
            raise KeyboardInterrupt  # as if Ctrl-C landed in communicate()'s reading
        asyncio.StreamReader.read = interrupted_read

        async def main():
            tasks = [asyncio.ensure_future(aio.run(sleeper)),
                     asyncio.ensure_future(aio.map(sleeper, range(2), jobs=2))]
            proc = await aio.spawn(["sleep", "60"], stdout=aio.PIPE)
            async with aio.background(sleeper):
                await asyncio.sleep(0)  # the run() and map() tasks have forked
                await asyncio.sleep(0)
                print(len(procutil.children()), flush=True)
                tasks.append(asyncio.ensure_future(proc.communicate()))
                await asyncio.gather(*tasks)

    """) + RUN_MAIN_INTERRUPTED
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=procutil.child_env(), timeout=60)
    assert proc.stdout.split() == ["5", "interrupted", "0", "0"], proc.stderr


@pytest.mark.parametrize("runner", ["asyncio.run", pytest.param(
    "uvloop.run", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"))])
def test_ctrl_c_in_asyncio_run_stops_and_reaps_every_child(runner):
    script = f"import asyncio, {runner.split('.')[0]}\nrun = {runner}\n" + textwrap.dedent("""
        import asyncio, gc, os, signal, sys, time
        import procutil
        from fastfork import aio
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def sleeper():
            time.sleep(60)

        async def main():
            tasks = [asyncio.ensure_future(aio.run(sleeper)) for _ in range(3)]
            proc = await aio.spawn(["sleep", "60"], stdout=aio.PIPE)
            tasks.append(asyncio.ensure_future(proc.communicate()))
            async with aio.background(sleeper):
                await asyncio.sleep(0)  # the run() tasks have forked
                print(*procutil.children(), flush=True)
                await asyncio.gather(*tasks)

    """) + RUN_MAIN_INTERRUPTED
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=procutil.child_env())
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 5, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == ["interrupted", "0", "0"], err
    for pid in pids:
        assert procutil.state(pid) is None


# ------------------------------------------------------------------ size and number

def test_100_mb_result_and_output(arun):
    size = 100 << 20

    async def main():
        assert len(await aio.run(big_result, size)) == size
        proc = await aio.spawn(["head", "-c", str(size), "/dev/zero"], stdout=aio.PIPE)
        out, err = await proc.communicate()
        assert (len(out), err, proc.returncode) == (size, None, 0)
    arun(main())


def test_input_and_output_larger_than_a_pipe_through_cat(arun):
    data = os.urandom(3 << 20)

    async def main():
        proc = await aio.spawn(["cat"], stdin=aio.PIPE, stdout=aio.PIPE, stderr=aio.PIPE)
        out, err = await proc.communicate(data)
        assert (out, err, proc.returncode) == (data, b"", 0)
    arun(main())


def test_a_thousand_children_awaited_at_once():
    # 2 fds per child (pidfd, result pipe): run where RLIMIT_NOFILE can be raised
    # without touching this test process.
    script = textwrap.dedent("""
        import asyncio, os, resource, sys
        import procutil
        from fastfork import aio
        N = 1000
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 2 * N + 200
        if soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                print("skip", hard); sys.exit(0)
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

        def wait_for_gate(fd, value):
            os.read(fd, 1)
            return value

        async def main():
            gate_r, gate_w = os.pipe()
            handles = [aio.start(wait_for_gate, gate_r, i) for i in range(N)]
            alive = len(procutil.children())
            results = asyncio.gather(*(h.result() for h in handles))
            os.write(gate_w, b"x" * N)
            values = await results
            os.close(gate_r); os.close(gate_w)
            print(alive, values == list(range(N)), len(procutil.children()))
        fds = procutil.open_fds()
        asyncio.run(main())
        print(sorted(procutil.open_fds() - fds))
    """)
    proc = procutil.run_python(script, timeout=110)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if lines[0].startswith("skip"):
        pytest.skip(f"RLIMIT_NOFILE hard limit {lines[0].split()[1]} is too low")
    assert lines == ["1000 True 0", "[]"]


def test_mixed_with_asyncio_create_subprocess_exec(arun):
    async def asyncio_command(code):
        proc = await asyncio.create_subprocess_exec("sh", "-c", f"exit {code}")
        return await proc.wait()

    async def fastfork_command(code):
        proc = await aio.spawn(["sh", "-c", f"exit {code}"])
        return await proc.wait()

    async def main():
        jobs = []
        for i in range(10):
            jobs += [asyncio_command(i), fastfork_command(i + 10), aio.run(add, i, 20)]
        return await asyncio.gather(*jobs)
    results = arun(main())
    assert results[0::3] == list(range(10))
    assert results[1::3] == list(range(10, 20))
    assert results[2::3] == list(range(20, 30))


# ------------------------------------------------------------------ commands

def test_spawn_streams(arun):
    async def main():
        proc = await aio.spawn(["sh", "-c", "read line; echo got $line; echo oops >&2; exit 4"],
                               stdin=aio.PIPE, stdout=aio.PIPE, stderr=aio.PIPE)
        assert isinstance(proc.stdin, asyncio.StreamWriter)
        assert isinstance(proc.stdout, asyncio.StreamReader)
        proc.stdin.write(b"hello\n")
        await proc.stdin.drain()
        assert await proc.stdout.readline() == b"got hello\n"
        assert await proc.stderr.readline() == b"oops\n"
        assert await proc.wait() == 4
        assert proc.args == ["sh", "-c", "read line; echo got $line; echo oops >&2; exit 4"]
        await proc.close_pipes()
    arun(main())


def test_spawn_stderr_to_stdout_and_inherited_stdio(arun, tmp_path):
    async def main():
        proc = await aio.spawn(["sh", "-c", "echo out; echo err >&2"],
                               stdout=aio.PIPE, stderr=aio.STDOUT)
        out, err = await proc.communicate()
        assert (out, err) == (b"out\nerr\n", None)
        with open(tmp_path / "log", "wb") as log:
            proc = await aio.spawn(["echo", "to file"], stdout=log)
            assert await proc.communicate() == (None, None)
        assert (tmp_path / "log").read_bytes() == b"to file\n"
    arun(main())


def test_communicate_input_needs_a_stdin_pipe(arun):
    async def main():
        async with await aio.spawn(["true"]) as proc:
            with pytest.raises(ValueError):
                await proc.communicate(b"data")
    arun(main())


def test_command_that_stops_reading_is_not_an_error(arun):
    async def main():
        proc = await aio.spawn(["head", "-c", "1"], stdin=aio.PIPE, stdout=aio.PIPE)
        out, _ = await proc.communicate(b"y" * (4 << 20))
        assert (out, proc.returncode) == (b"y", 0)
    arun(main())


def test_process_context_manager_closes_stdin_stops_and_closes_pipes(arun):
    async def main():
        async with await aio.spawn(["cat"], stdin=aio.PIPE, stdout=aio.PIPE) as proc:
            proc.stdin.write(b"abc")
            assert await proc.stdout.readexactly(3) == b"abc"
        assert proc.finished
        assert_gone(proc.pid)
    arun(main())


# ------------------------------------------------------------------ without pidfds

@pytest.fixture
def without_pidfds():
    """Handles made meanwhile wait by pid (WNOHANG polling), as where the kernel has no pidfds."""
    from fastfork import _core
    _core._set_use_pidfd(False)
    yield
    _core._set_use_pidfd(True)


def test_children_without_a_pidfd_are_polled(arun, without_pidfds):
    async def main():
        handle = aio.start(big_result, 10 << 20)
        assert handle._child._pidfd == -1
        assert len(await handle.result()) == 10 << 20
        proc = await aio.spawn(["sh", "-c", "echo polled; exit 5"], stdout=aio.PIPE)
        assert proc._child._pidfd == -1
        assert await proc.communicate() == (b"polled\n", None)
        assert proc.returncode == 5
    arun(main())


# ------------------------------------------------------------------ background

def test_background_stops_on_leaving_the_block(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        async with aio.background(say_ready_then_sleep, w) as child:
            await readable(r)
        assert child.returncode == -signal.SIGTERM
        with pytest.raises(RuntimeError):
            async with aio.background(say_ready_then_sleep, w) as child:
                await readable(r)
                raise RuntimeError("the block failed")
        assert child.returncode == -signal.SIGTERM
        # A long grace: on a loaded machine the child may need seconds to
        # handle the interrupt, send its result and exit.
        async with aio.background(serve_until_interrupted, w,
                                  stop_signal=signal.SIGINT, grace=60) as child:
            await readable(r)
        assert await child.result() == "clean"
    arun(main())


def test_child_leaves_the_loops_signal_handlers_behind():
    code = textwrap.dedent("""
        import asyncio, os, signal, time
        from fastfork import aio
        def report_handlers(fd):
            os.write(fd, repr((signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
                               signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                               signal.set_wakeup_fd(-1))).encode())
            time.sleep(60)
        async def main():
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, print, "parent's")
            r, w = os.pipe()
            async with aio.start(report_handlers, w) as child:
                print(os.read(r, 100).decode())
                print(await child.stop(grace=30))
        signal.signal(signal.SIGINT, signal.default_int_handler)  # asyncio.run takes it over
        asyncio.run(main())
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == 0, proc.stderr
    # SIGTERM ends the child (it would else be ignored until SIGKILL) and the
    # parent's handler never hears of it.
    assert proc.stdout.splitlines() == ["(True, True, -1)", str(-signal.SIGTERM)]


def test_stdio_flushed_before_fork_as_in_the_synchronous_api():
    code = textwrap.dedent("""
        import asyncio
        from fastfork import aio
        async def main():
            print("parent line", end="")
            await aio.run(print, " child line", end="")
        asyncio.run(main())
    """)
    proc = procutil.run_python(code, unbuffered=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "parent line child line"


def test_from_fastfork_import_aio():
    proc = procutil.run_python("from fastfork import aio; import fastfork; "
                               "print(aio.run.__module__, 'aio' in fastfork.__all__)")
    assert proc.stdout.split() == ["fastfork.aio", "False"], proc.stderr


# ------------------------------------------------------------------ fan-out: map, as_completed

def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def read_gate(fd):
    return os.read(fd, 1)


def test_map_and_as_completed(arun):
    async def main():
        assert await aio.map(square, range(20), jobs=3) == [x * x for x in range(20)]
        assert await aio.map(square, []) == []
        pairs = [pair async for pair in aio.as_completed(square, range(6), jobs=2)]
        assert sorted(pairs) == [(i, i * i) for i in range(6)]
        outcomes = await aio.map(fail_on_three, range(6), jobs=2, return_exceptions=True)
        assert outcomes[:3] == [0, 1, 2] and outcomes[4:] == [4, 5]
        assert isinstance(outcomes[3], fastfork.ChildError) and outcomes[3].index == 3
        with pytest.raises(fastfork.ChildError) as info:
            await aio.map(fail_on_three, range(6), jobs=2)
        assert (info.value.index, info.value.exc_type) == (3, "ValueError")
    arun(main())


def test_map_timeout_is_a_child_timeout(arun):
    async def main():
        with pytest.raises(fastfork.ChildTimeout) as info:
            await aio.map(time.sleep, [0, 60], timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert (info.value.index, info.value.returncode) == (1, -signal.SIGTERM)
    arun(main())


def test_map_does_not_block_the_loop(arun):
    # The children wait for bytes this coroutine writes while map runs: a
    # blocked loop would never get to write them.
    async def main():
        r, w = os.pipe()
        try:
            mapping = asyncio.ensure_future(aio.map(read_gate, [r] * 4, jobs=4))
            await asyncio.sleep(0)
            os.write(w, b"abcd")
            assert sorted(await mapping) == [b"a", b"b", b"c", b"d"]
        finally:
            os.close(r)
            os.close(w)
    arun(main())


def test_fan_out_bad_arguments_raise_before_any_fork():
    before = procutil.children()

    async def main():
        for kwargs in ({"jobs": 0}, {"timeout": 0}, {"timeout": -1}, {"fork_retries": -1},
                       {"grace": -1}):
            with pytest.raises(ValueError):
                await aio.map(square, [1], **kwargs)
            with pytest.raises(ValueError):
                aio.as_completed(square, [1], **kwargs)
        for kwargs in ({"jobs": 1.5}, {"timeout": "1"}):
            with pytest.raises(TypeError):
                await aio.map(square, [1], **kwargs)
        with pytest.raises(TypeError):
            await aio.map("not callable", [1])
        with pytest.raises(TypeError):
            await aio.map(square, 5)
        with pytest.raises(TypeError):
            await aio.spawn_many("ls")
        with pytest.raises(ValueError):
            await aio.spawn_many([["true"], []])
        with pytest.raises(ValueError):
            await aio.spawn_many([["true"]], stdin=aio.PIPE)
        with pytest.raises(TypeError):
            await aio.spawn_many([["true"]], callback=5)
    asyncio.run(main())
    assert procutil.children() == before


async def read_pids(fd, count):
    """Read ``count`` pids, one per line, as children write them to ``fd``."""
    text = ""
    while text.count("\n") < count:
        text += await readable(fd)
    return [int(line) for line in text.split()]


@pytest.fixture
def fifo(tmp_path):
    """A FIFO commands write to: (path, read fd); a spare writer keeps it from EOF."""
    path = str(tmp_path / "ready")
    os.mkfifo(path)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    yield path, r
    os.close(w)
    os.close(r)


def test_cancelling_map_or_spawn_many_stops_and_reaps_every_child(arun, ready_pipe, fifo):
    r, w = ready_pipe
    path, fifo_r = fifo

    async def main():
        task = asyncio.ensure_future(aio.map(say_ready_then_sleep, [w] * 3, jobs=2))
        pids = await read_pids(r, 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        task = asyncio.ensure_future(aio.spawn_many(
            [["sh", "-c", f"echo $$ > {path}; exec sleep 60"]] * 3, jobs=2))
        pids += await read_pids(fifo_r, 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for pid in pids:
            assert_gone(pid)
    arun(main())


def test_closing_as_completed_early_stops_the_rest(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        items = [None, w, w]
        completed = aio.as_completed(lambda fd: fd and say_ready_then_sleep(fd), items, jobs=3)
        async with contextlib.aclosing(completed):
            async for index, value in completed:
                assert (index, value) == (0, None)
                pids = [int(line) for line in (await readable(r)).split()]
                while len(pids) < 2:
                    pids += [int(line) for line in (await readable(r)).split()]
                break
        for pid in pids:
            assert_gone(pid)
    arun(main())


def test_cancelling_map_awaits_the_grace_on_the_loop_and_again_kills_at_once(arun, ready_pipe):
    r, w = ready_pipe

    async def main():
        # SIGTERM ignored: the children outlive the grace, awaited on the loop.
        for cancels in (1, 2):
            task = asyncio.ensure_future(aio.map(
                lambda fd: say_ready_then_sleep(fd, True), [w] * 3, jobs=2, grace=0.2))
            pids = await read_pids(r, 2)
            task.cancel()
            await asyncio.sleep(0)
            assert not task.done()  # in the grace, and the loop runs meanwhile
            if cancels == 2:
                task.cancel()  # SIGKILL now, not after the grace
            with pytest.raises(asyncio.CancelledError):
                await task
            for pid in pids:
                assert_gone(pid)
    arun(main())


def hang_up_then_pause(_):
    """Close the fan-out's fds in this child (its result pipe), then run on until killed."""
    for fd in _core.owned_fds():
        os.close(fd)
    signal.pause()


def test_map_times_out_a_child_whose_pipe_hung_up(arun, pidfd_mode):
    # The engine then waits for the child's exit through a pidfd, or polls
    # its pid on the loop's timer; the timeout is the loop's timer too.
    async def main():
        with pytest.raises(fastfork.ChildTimeout) as info:
            await aio.map(hang_up_then_pause, [0], timeout=0.3, grace=0)
        assert info.value.returncode == -signal.SIGKILL
    arun(main())


def leave_a_grandchild_holding_the_pipe(fds):
    """Fork a grandchild without at-fork hooks (so it keeps the result pipe) that waits on fds."""
    pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        try:
            os.close(fds[1])
            os.read(fds[0], 1)  # end of file once the test closes its write end
        finally:
            os._exit(0)
    return pid


def test_map_reaps_a_child_whose_grandchild_holds_its_pipe(arun):
    # The pipe does not hang up at the child's exit: the engine's sweep,
    # on the loop's timer, reaps it within about a second.
    r, w = os.pipe()
    try:
        [grandchild] = arun(aio.map(leave_a_grandchild_holding_the_pipe, [(r, w)]))
        assert procutil.state(grandchild) not in (None, "Z")  # map did not wait for it
    finally:
        os.close(w)  # the grandchild reads end of file and exits
        os.close(r)
    assert procutil.wait_ended([grandchild]) == []  # reparented: init reaps it


# ------------------------------------------------------------------ fan-out: spawn_many

def test_spawn_many_results_capture_and_callback(arun):
    seen = []

    async def main():
        return await aio.spawn_many(
            [["true"], ["false"], ["sh", "-c", "echo out; echo err >&2"],
             ["head", "-c", str(20 << 20), "/dev/zero"], ["/nonexistent/program"]],
            jobs=2, capture=True, callback=lambda i, result: seen.append(i))
    results = arun(main())
    assert [r.returncode for r in results] == [0, 1, 0, 0, 127]
    assert (results[2].stdout, results[2].stderr) == (b"out\n", b"err\n")
    assert len(results[3].stdout) == 20 << 20
    assert isinstance(results[4].error, FileNotFoundError)
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_spawn_many_timeout_and_keep_going(arun):
    async def main():
        timed = await aio.spawn_many([["sleep", "60"], ["true"]], timeout=0.3)
        assert timed[0].timed_out and timed[0].returncode == -signal.SIGTERM
        assert timed[1].ok
        stopped = await aio.spawn_many([["false"], ["true"], ["true"]], jobs=1,
                                       keep_going=False)
        assert stopped[0].returncode == 1 and stopped[1:] == [None, None]
    arun(main())


def test_spawn_many_does_not_block_the_loop(arun):
    # The commands read bytes this coroutine writes while spawn_many runs.
    async def main():
        gate_r, gate_w = os.pipe()
        try:
            running = asyncio.ensure_future(
                aio.spawn_many([["head", "-c", "1"]] * 3, jobs=3, stdin=gate_r, capture=True))
            await asyncio.sleep(0)
            os.write(gate_w, b"xyz")
            assert sorted(r.stdout for r in await running) == [b"x", b"y", b"z"]
        finally:
            os.close(gate_r)
            os.close(gate_w)
    arun(main())


def test_spawn_many_callback_raising_stops_the_rest(arun, fifo):
    path, fifo_r = fifo

    def callback(index, result):
        raise RuntimeError(f"callback failed on {index}")

    async def main():
        gate_r, gate_w = os.pipe()
        try:
            task = asyncio.ensure_future(aio.spawn_many(
                [["sh", "-c", f"echo $$ > {path}; exec sleep 60"]] * 2 + [["head", "-c", "1"]],
                jobs=3, stdin=gate_r, callback=callback))
            pids = await read_pids(fifo_r, 2)
            os.write(gate_w, b"x")  # the third command ends: the callback raises
            with pytest.raises(RuntimeError, match="callback failed on 2"):
                await task
        finally:
            os.close(gate_r)
            os.close(gate_w)
        for pid in pids:
            assert_gone(pid)
    arun(main())
