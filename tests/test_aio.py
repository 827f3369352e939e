"""fastfork.aio: children and commands awaited on an event loop (asyncio, and uvloop when installed)."""
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastfork
import procutil
from fastfork import aio

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
    """Run a coroutine to completion on a fresh loop of the kind under test."""
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


@pytest.fixture
def ready_pipe():
    """A pipe (read end, write end) a child writes to when it is ready."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def readable(fd):
    """Wait on the running loop until ``fd`` is readable; return one line written to it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.add_reader(fd, lambda: future.done() or future.set_result(None))
    try:
        await future
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


def wait_for_gate(fd, value):
    os.read(fd, 1)
    return value


def serve_until_interrupted(fd):
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
        with pytest.raises(fastfork.ChildError) as info:
            await aio.run(say_ready_then_sleep, w, timeout=0.2)
        pid = int(await readable(r))
        assert info.value.pid == pid
        assert info.value.returncode == -signal.SIGTERM
        assert "timed out" in str(info.value)
        assert_gone(pid)
        # A child ignoring SIGTERM gets SIGKILL after the grace.
        with pytest.raises(fastfork.ChildError) as info:
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


def test_ctrl_c_in_asyncio_run_stops_and_reaps_every_child():
    script = textwrap.dedent("""
        import asyncio, os, signal, sys, time
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

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            print("interrupted", len(procutil.children()), len(procutil.open_fds()), flush=True)
    """)
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
    words = out.split()
    assert words[:2] == ["interrupted", "0"], err
    # Only what any interpreter has open (stdio and the like) is left.
    assert int(words[2]) <= 4, err
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

def test_children_without_a_pidfd_are_polled(arun, monkeypatch):
    monkeypatch.setattr(fastfork.child, "_HAVE_PIDFD", False)
    real_start_child = fastfork.fanout.start_child

    def start_child_without_pidfd(*args, **kwargs):
        child = real_start_child(*args, **kwargs)
        child._close_pidfd()
        return child
    monkeypatch.setattr(fastfork.fanout, "start_child", start_child_without_pidfd)

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
        async with aio.background(serve_until_interrupted, w,
                                  stop_signal=signal.SIGINT) as child:
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
