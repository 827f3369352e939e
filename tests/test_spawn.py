"""fastfork.spawn: commands started vfork-style (and by the fork fallback), compared with subprocess."""
import os
import resource
import signal
import subprocess
import textwrap
import time

import pytest

import importlib

import fastfork
import faultlib
import procutil
from fastfork import DEVNULL, PIPE, STDOUT, spawn, spawn_many

# The module behind fastfork.spawn and spawn_many.
spawn_mod = importlib.import_module("fastfork.commands")


@pytest.fixture(params=["vfork", "fork"])
def creation(request, monkeypatch):
    """Run the test with vfork-style creation and with the plain-fork fallback."""
    if request.param == "vfork" and not fastfork._core._spawn_uses_vfork():
        pytest.skip("no vfork-style creation on this system")
    monkeypatch.setattr(spawn_mod, "_USE_FORK", request.param == "fork")
    return request.param


def _run(argv, **kwargs):
    kwargs = {"stdout": PIPE, "stderr": PIPE, **kwargs}
    with spawn(argv, **kwargs) as proc:
        out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


# ---------------------------------------------------------------- output and exit codes

COMMANDS = [
    ["true"],
    ["false"],
    ["sh", "-c", "exit 3"],
    ["sh", "-c", "exit 255"],
    ["sh", "-c", "echo out; echo err >&2"],
    ["sh", "-c", "kill -TERM $$"],
    ["printf", "%s|", "a b", "", "ü", "--"],
    [b"echo", b"\xff\xfe"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(map(str, a))[:30])
def test_output_and_exit_code_match_subprocess(argv, creation):
    expected = subprocess.run(argv, capture_output=True, timeout=30)
    assert _run(argv) == (expected.returncode, expected.stdout, expected.stderr)


def test_many_commands_output_and_exit_codes_in_order():
    commands = [["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 5}"] for i in range(60)]
    results = spawn_many(commands, jobs=4, capture=True)
    assert [r.args for r in results] == commands
    assert [r.returncode for r in results] == [i % 5 for i in range(60)]
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(60)]
    assert [r.stderr for r in results] == [f"e{i}\n".encode() for i in range(60)]
    assert all(r.duration >= 0 and not r.timed_out and r.error is None for r in results)


def test_spawn_many_without_capture_lets_output_through(capfd):
    results = spawn_many([["echo", "through"]] * 3, jobs=2)
    assert [(r.returncode, r.stdout, r.stderr) for r in results] == [(0, None, None)] * 3
    assert capfd.readouterr().out == "through\n" * 3


def test_stdio_options(tmp_path, creation):
    # stderr=STDOUT merges into the stdout pipe; a file object and an fd work as targets.
    assert _run(["sh", "-c", "echo a; echo b >&2"], stderr=STDOUT)[1:] == (b"a\nb\n", None)
    target = tmp_path / "out"
    with open(target, "wb") as f:
        with spawn(["echo", "to file"], stdout=f) as proc:
            assert proc.wait(30) == 0
    assert target.read_bytes() == b"to file\n"
    with spawn(["cat"], stdin=DEVNULL, stdout=PIPE) as proc:
        assert proc.communicate(timeout=30) == (b"", None)
    with spawn(["cat"], stdin=PIPE, stdout=PIPE) as proc:
        assert proc.communicate(b"in", timeout=30) == (b"in", None)


def test_stdio_sources_that_are_low_fds_are_not_clobbered(creation):
    # stdout goes to the parent's fd 2 and stderr to its fd 1: the crossing dup2s
    # must not overwrite each other (CPython issue #12607).
    code = ("import os, sys\n"
            "import importlib\n"
            "s = importlib.import_module('fastfork.commands')\n"
            "from fastfork import spawn\n"
            "s._USE_FORK = os.environ.get('FF_TEST_FORK') == '1'\n"
            "p = spawn(['sh', '-c', 'echo O; echo E >&2'], stdout=2, stderr=1)\n"
            "sys.exit(p.wait(30))\n")
    result = procutil.run_python(code, env={"FF_TEST_FORK": "1" if creation == "fork" else "0"})
    assert result.returncode == 0
    assert result.stdout == "E\n" and result.stderr == "O\n"


def test_env_cwd_and_path_lookup(tmp_path, creation):
    assert _run(["/usr/bin/env"], env={"A": "1", b"B": b"2"}) == (0, b"A=1\nB=2\n", b"")
    assert _run(["pwd"], cwd=tmp_path)[1] == str(tmp_path).encode() + b"\n"
    # The program is looked up on env's PATH, like subprocess does.
    script = tmp_path / "ff-test-tool"
    script.write_text("#!/bin/sh\necho found $0\n")
    script.chmod(0o755)
    env = {"PATH": f"/nonexistent:{tmp_path}"}
    expected = subprocess.run(["ff-test-tool"], env=env, capture_output=True)
    assert _run(["ff-test-tool"], env=env) == (0, expected.stdout, b"")
    # executable= replaces the program; argv[0] is what the command sees.
    assert _run(["argv0-name", "-c", "echo $0"], executable="sh")[1] == b"argv0-name\n"


def test_new_session(creation):
    with spawn(["sleep", "30"], new_session=True) as proc:
        assert os.getsid(proc.pid) == proc.pid
    with spawn(["sleep", "30"]) as proc:
        assert os.getsid(proc.pid) == os.getsid(0)


# ---------------------------------------------------------------- exec failures


@pytest.mark.parametrize("case", ["ENOENT bare name", "ENOENT path", "ENOENT executable",
                                  "EACCES", "directory", "ENOEXEC", "E2BIG", "missing cwd",
                                  "cwd is a file", "ENOTDIR in path"])
def test_exec_failure_raises_like_subprocess(case, tmp_path, creation):
    kwargs = dict(faultlib.exec_failure_cases(tmp_path)[case])
    args = kwargs.pop("args")
    with pytest.raises(OSError) as expected:
        subprocess.Popen(args, **kwargs)
    with pytest.raises(OSError) as got:
        spawn(args, **kwargs)
    assert type(got.value) is type(expected.value)
    assert got.value.errno == expected.value.errno
    assert got.value.filename == expected.value.filename
    assert got.value.strerror == expected.value.strerror


def test_start_failures_in_spawn_many_are_results():
    results = spawn_many([["true"], ["ff-no-such-program"], ["/"], ["false"]])
    assert [r.returncode for r in results] == [0, 127, 126, 1]
    assert isinstance(results[1].error, FileNotFoundError)
    assert isinstance(results[2].error, PermissionError)
    with pytest.raises(FileNotFoundError):
        results[1].check_returncode()
    with pytest.raises(subprocess.CalledProcessError):
        results[3].check_returncode()
    results[0].check_returncode()


# ---------------------------------------------------------------- validation before any process

BAD_ARGUMENTS = [
    (dict(argv=[]), ValueError),
    (dict(argv=["echo", "a\0b"]), ValueError),
    (dict(argv=["echo\0"]), ValueError),
    (dict(argv=["echo", 3]), TypeError),
    (dict(argv=["echo", None]), TypeError),
    (dict(argv="echo hi"), TypeError),
    (dict(argv=b"echo"), TypeError),
    (dict(argv=5), TypeError),
    (dict(argv=["true"], env={"A=B": "x"}), ValueError),
    (dict(argv=["true"], env={"": "x"}), ValueError),
    (dict(argv=["true"], env={"A": "b\0"}), ValueError),
    (dict(argv=["true"], env={"A\0": "b"}), ValueError),
    (dict(argv=["true"], env={"A": 1}), TypeError),
    (dict(argv=["true"], env=["A=1"]), TypeError),
    (dict(argv=["true"], cwd="/tmp\0"), ValueError),
    (dict(argv=["true"], executable=3), TypeError),
    (dict(argv=["true"], stdin=STDOUT), ValueError),
    (dict(argv=["true"], stdout=True), TypeError),
    (dict(argv=["true"], stdout=-7), ValueError),
    (dict(argv=["true"], stdout="out.txt"), TypeError),
    (dict(argv=["true"], pass_fds=[-1]), ValueError),
    (dict(argv=["true"], pass_fds=["3"]), TypeError),
]


@pytest.mark.parametrize("kwargs,exc", BAD_ARGUMENTS, ids=lambda v: repr(v)[:40])
def test_bad_arguments_raise_before_any_process(kwargs, exc, monkeypatch):
    created = []
    monkeypatch.setattr(spawn_mod._core, "_spawn", lambda *a, **k: created.append(a))
    before = procutil.children()
    with pytest.raises(exc):
        spawn(**kwargs)
    assert created == [] and procutil.children() == before


def test_closed_fds_raise_before_any_process(monkeypatch):
    created = []
    monkeypatch.setattr(spawn_mod._core, "_spawn", lambda *a, **k: created.append(a))
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    closed_file = open(os.devnull)
    closed_file.close()
    for kwargs in (dict(pass_fds=[r]), dict(stdin=r), dict(stdout=w), dict(stderr=closed_file)):
        with pytest.raises(ValueError):
            spawn(["true"], **kwargs)
    assert created == []


def test_spawn_many_validates_every_command_before_starting_any(monkeypatch):
    created = []
    monkeypatch.setattr(spawn_mod._core, "_spawn", lambda *a, **k: created.append(a))
    for commands, kwargs, exc in [
        ([["true"], ["true"], ["echo", "\0"]], {}, ValueError),
        ([["true"], []], {}, ValueError),
        ([["true"], "ls"], {}, TypeError),
        ("ls", {}, TypeError),
        ([["true"]], dict(jobs=0), ValueError),
        ([["true"]], dict(jobs=1.5), TypeError),
        ([["true"]], dict(timeout=-1), ValueError),
        ([["true"]], dict(timeout=float("nan")), ValueError),
        ([["true"]], dict(stdin=PIPE), ValueError),
        ([["true"]], dict(callback=3), TypeError),
        ([["true"], ["true"]], dict(env=lambda i: {"A=": "1"} if i else {}), ValueError),
    ]:
        with pytest.raises(exc):
            spawn_many(commands, **kwargs)
    assert created == []


# ---------------------------------------------------------------- fds and signals in the child

def _fds_of(pid, settled):
    """{fd: target} of process ``pid``, read until ``settled(set of fds)`` or 5 s pass.

    Right after spawn returns, the kernel may still be closing the
    close-on-exec fds of the exec: a listing can name an fd that is gone
    a moment later.
    """
    deadline = time.monotonic() + 5
    while True:
        try:
            fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{pid}/fd")}
        except FileNotFoundError:
            fds = None
        if (fds is not None and settled(set(fds))) or time.monotonic() > deadline:
            return fds
        time.sleep(0.01)


def test_child_holds_only_its_own_fds(creation):
    inheritable_r, inheritable_w = os.pipe()
    os.set_inheritable(inheritable_r, True)
    cloexec_r, cloexec_w = os.pipe()
    passed_r, passed_w = os.pipe()
    try:
        # A sibling command with pipes of its own is running meanwhile.
        with spawn(["sleep", "30"], stdin=PIPE, stdout=PIPE) as sibling, \
                spawn(["sleep", "30"], stdout=PIPE, pass_fds=[passed_r]) as proc:
            fds = _fds_of(proc.pid, lambda fds: fds == {0, 1, 2, passed_r})
            assert fds is not None and set(fds) == {0, 1, 2, passed_r}, fds
            assert fds[passed_r] == os.readlink(f"/proc/self/fd/{passed_r}")
            assert fds[1] != os.readlink(f"/proc/self/fd/{sibling.stdout.fileno()}")
            with spawn(["sleep", "30"], close_fds=False) as leaky:
                cloexec = {cloexec_r, cloexec_w, passed_r, sibling.stdout.fileno()}
                fds = set(_fds_of(leaky.pid, lambda fds: not fds & cloexec) or ())
                # close_fds=False keeps inheritable fds only; fastfork's own are close-on-exec.
                assert inheritable_r in fds
                assert not fds & cloexec
    finally:
        for fd in (inheritable_r, inheritable_w, cloexec_r, cloexec_w, passed_r, passed_w):
            os.close(fd)


def test_signal_dispositions_and_mask_are_reset():
    code = textwrap.dedent("""
        import os, signal
        from fastfork import spawn, PIPE
        signal.signal(signal.SIGUSR1, lambda *a: None)   # caught -> default
        signal.signal(signal.SIGHUP, signal.SIG_IGN)     # ignored by the caller -> kept
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
        def bits(status, name):
            fields = dict(line.split(":\\t") for line in status.splitlines() if ":\\t" in line)
            return {s for s in range(1, 65) if int(fields[name], 16) >> (s - 1) & 1}
        with open("/proc/self/status") as f:
            ignored_here = bits(f.read(), "SigIgn")
        p = spawn(["cat", "/proc/self/status"], stdout=PIPE)
        out = p.communicate(timeout=30)[0].decode()
        # Whatever this interpreter inherited as ignored stays ignored, except
        # SIGPIPE and SIGXFSZ, which Python itself ignores (as with subprocess).
        expected = ignored_here - {signal.SIGPIPE, signal.SIGXFSZ}
        print(signal.SIGHUP in expected, bits(out, "SigIgn") == expected,
              sorted(bits(out, "SigBlk")), sorted(bits(out, "SigCgt")))
    """)
    result = procutil.run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True True [] []\n"


# ---------------------------------------------------------------- pipes, timeouts, stopping

def test_10mb_through_pipes_with_communicate(creation):
    data = os.urandom(10 << 20)
    with spawn(["cat"], stdin=PIPE, stdout=PIPE) as proc:
        assert proc.communicate(data, timeout=60) == (data, None)
    # Both pipes full at once: draining one at a time would deadlock.
    script = "head -c 10485760 /dev/zero; head -c 10485760 /dev/zero >&2; echo done"
    with spawn(["sh", "-c", script], stdout=PIPE, stderr=PIPE) as proc:
        out, err = proc.communicate(timeout=60)
    assert (len(out), len(err), out[-5:]) == ((10 << 20) + 5, 10 << 20, b"done\n")
    results = spawn_many([["head", "-c", str(10 << 20), "/dev/zero"]] * 2, capture=True)
    assert [len(r.stdout) for r in results] == [10 << 20] * 2


def test_communicate_timeout_keeps_partial_output_and_can_resume():
    with spawn(["sh", "-c", "echo first; sleep 0.5; echo second"], stdout=PIPE) as proc:
        with pytest.raises(fastfork.TimeoutExpired) as info:
            proc.communicate(timeout=0.2)
        assert isinstance(info.value, subprocess.TimeoutExpired)
        assert info.value.output == b"first\n" and info.value.cmd == proc.args
        assert proc.communicate(timeout=30) == (b"first\nsecond\n", None)
        assert proc.returncode == 0


def test_communicate_input_without_stdin_pipe():
    with spawn(["true"]) as proc:
        with pytest.raises(ValueError):
            proc.communicate(b"x")


TRAPS_TERM = ["sh", "-c", "trap '' TERM; exec sleep 30"]


def test_timeouts_escalate_from_sigterm_to_sigkill():
    results = spawn_many([["sleep", "30"], TRAPS_TERM, ["true"]], jobs=3, timeout=0.5,
                         grace=0.3)
    assert [(r.returncode, r.timed_out) for r in results] == [
        (-signal.SIGTERM, True), (-signal.SIGKILL, True), (0, False)]
    with procutil.Ready() as ready, spawn(
            ["sh", "-c", "trap '' TERM; echo > \"$0\"; exec sleep 30", ready.path]) as proc:
        ready.wait()  # sh has installed the trap
        assert proc.stop(timeout=0.3) == -signal.SIGKILL
    with spawn(["sleep", "30"]) as proc:
        with pytest.raises(fastfork.TimeoutExpired):
            proc.wait(0.1)
    assert proc.returncode == -signal.SIGTERM  # the with block stopped it


def test_a_timed_out_command_is_not_ok_however_it_exited():
    result = fastfork.CommandResult(["x"], 0, b"out", b"", duration=1.5, timed_out=True)
    assert not result.ok
    with pytest.raises(subprocess.TimeoutExpired) as info:
        result.check_returncode()
    assert isinstance(info.value, fastfork.TimeoutExpired)
    assert info.value.cmd == ["x"] and info.value.output == b"out"


def test_keep_going_false_stops_new_launches():
    commands = [["sh", "-c", "exit 1"], ["sleep", "0.3"], ["true"], ["true"]]
    seen = []
    results = spawn_many(commands, jobs=2, keep_going=False,
                         callback=lambda i, r: seen.append(i))
    assert results[0].returncode == 1
    assert results[1].returncode == 0  # was running: allowed to finish
    assert results[2:] == [None, None]
    assert sorted(seen) == [0, 1]


def test_spawn_many_runs_at_most_jobs_at_once():
    most = []
    spawn_many([["sleep", "0.05"]] * 12, jobs=3,
               callback=lambda i, r: most.append(len(procutil.children())))
    assert max(most) <= 3
    assert len(most) == 12


def test_spawn_many_raises_the_soft_fd_limit_as_far_as_its_commands_need():
    # 100 commands at once under a soft limit of 64: each holds a pidfd here.
    # Every command says it runs (on the script's stderr, a pipe), then waits
    # for end of file on stdin, which comes once all 100 have said so.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < 300:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) leaves no room to raise the soft one")
    code = textwrap.dedent("""
        import os, resource, threading, warnings
        from fastfork import spawn_many
        warnings.simplefilter("error", RuntimeWarning)  # no "held back" warning
        N = 100
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        os.dup2(ready_w, 2)
        os.close(ready_w)
        def release():
            got = 0
            while got < N:
                got += len(os.read(ready_r, N - got))
            os.close(go_w)
        threading.Thread(target=release, daemon=True).start()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        results = spawn_many([["sh", "-c", "printf x >&2; exec cat"]] * N, jobs=N,
                             stdin=go_r)
        print(all(r.ok for r in results), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    result = procutil.run_python(code)
    assert result.returncode == 0, result.stderr
    ok, soft = result.stdout.split()
    assert ok == "True"
    assert 100 < int(soft) < 1000  # only as far as the commands need


def test_spawn_many_env_per_command():
    results = spawn_many([["sh", "-c", "echo $IDX"]] * 3, capture=True,
                         env=lambda i: {"IDX": str(i)})
    assert [r.stdout for r in results] == [b"0\n", b"1\n", b"2\n"]


def test_error_in_callback_stops_and_reaps_everything():
    def boom(index, result):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        spawn_many([["true"]] + [["sleep", "30"]] * 3, jobs=4, grace=0.5, callback=boom)
    assert not procutil.children()


def test_ctrl_c_during_spawn_many_stops_and_reaps_everything():
    code = textwrap.dedent("""
        import os, signal, threading, procutil
        from fastfork import spawn_many
        try:
            spawn_many([["sh", "-c", "kill -INT $PPID; exec sleep 30"]] + [["sleep", "30"]] * 19,
                       jobs=4, grace=0.5,
                       callback=lambda i, r: print("finished", i))
        except KeyboardInterrupt:
            print("KeyboardInterrupt", sorted(procutil.descendants()))
    """)
    result = faultlib.run_contained(code)
    assert result.stdout == "KeyboardInterrupt []\n", result.stderr
    assert result.leftover == 0


def test_die_with_parent():
    # A middle interpreter spawns `sleep` and exits; the sleep is orphaned to the
    # subreaper, which reaps it as soon as it dies.
    code = textwrap.dedent("""
        import os, signal, subprocess, sys, time, procutil
        inner = ("import os; from fastfork import spawn, DEVNULL; "
                 "print(spawn(['sleep', '30'], stdout=DEVNULL, stderr=DEVNULL,"
                 " die_with_parent=%s).pid); "
                 "os._exit(0)")
        for flag in (True, False):
            pid = int(subprocess.run([sys.executable, "-c", inner % flag], check=True,
                                     capture_output=True, text=True).stdout)
            deadline = time.monotonic() + 5
            while procutil.state(pid) not in (None, "Z") and time.monotonic() < deadline:
                time.sleep(0.01)
            alive = procutil.state(pid) not in (None, "Z")
            print(flag, "alive" if alive else "gone")
            if alive:
                os.kill(pid, signal.SIGKILL)
    """)
    result = faultlib.run_contained(code)
    assert result.stdout == "True gone\nFalse alive\n", result.stderr
    assert result.leftover == 0


def test_exec_path_cannot_create_a_process_seccomp():
    """clone fails (seccomp): a clean BlockingIOError, nothing left open."""
    code = textwrap.dedent("""
        import importlib, os, procutil
        s = importlib.import_module("fastfork.commands")
        from fastfork import spawn, spawn_many, PIPE
        before = procutil.open_fds()
        for use_fork in (False, True):
            s._USE_FORK = use_fork
            try:
                spawn(["true"], stdin=PIPE, stdout=PIPE, stderr=PIPE)
            except BlockingIOError as exc:
                print("raised", exc.errno)
        results = spawn_many([["true"]] * 3, spawn_retries=2)
        print([(r.returncode, type(r.error).__name__) for r in results])
        print("fds", procutil.open_fds() == before)
    """)
    result = faultlib.run_with_seccomp(code, "EAGAIN")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "raised 11", "raised 11", str([(126, "BlockingIOError")] * 3), "fds True"]


def test_spawn_from_a_512mb_parent():
    code = textwrap.dedent("""
        from fastfork import spawn, PIPE
        big = bytearray(512 << 20)
        for i in range(0, len(big), 4096):
            big[i] = 1
        p = spawn(["echo", "from a big parent"], stdout=PIPE)
        print(p.communicate(timeout=30)[0].decode(), end="")
    """)
    result = procutil.run_python(code)
    assert (result.returncode, result.stdout) == (0, "from a big parent\n"), result.stderr


def test_process_handle():
    with spawn(["sh", "-c", "exit 7"]) as proc:
        assert proc.args == ["sh", "-c", "exit 7"]
        assert proc.wait(30) == 7
        assert proc.rusage is not None
        assert proc.stdin is proc.stdout is proc.stderr is None
    assert isinstance(proc, fastfork.Child)
    with spawn(["cat"], stdin=PIPE, stdout=PIPE) as proc:
        stdin, stdout = proc.stdin, proc.stdout
    assert stdin.closed and stdout.closed and proc.returncode is not None


def test_dropped_process_with_captured_output_closes_its_pipes():
    # spawn_many's Process reads the command's output through fds of its own;
    # dropped while running (a Ctrl-C between its start and its bookkeeping),
    # its finalizer closes them, and the command is reaped later.
    import gc
    import warnings
    from fastfork import commands
    before = procutil.open_fds()
    command = commands._prepare(["sleep", "0.05"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        proc = commands._start(command, (None, fastfork.PIPE, fastfork.PIPE), capture=True)
        pid = proc.pid
        assert len(procutil.open_fds() - before) == 3  # stdout, stderr and the pidfd
        del proc
        gc.collect()
    assert len(procutil.open_fds() - before) == 1  # the pidfd, kept until it is reaped
    deadline = time.monotonic() + 30
    while procutil.state(pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)  # until the command has exited (a zombie: nobody reaped it)
    fastfork.spawn(["true"]).wait(timeout=30)  # spawn reaps dropped children
    assert procutil.state(pid) is None
    assert procutil.open_fds() == before


# ---------------------------------------------------------------- stdio opened by the child

def test_devnull_is_opened_by_the_child(creation):
    before = procutil.open_fds()
    with spawn(["sh", "-c", "readlink /proc/self/fd/0 /proc/self/fd/2; cat"],
               stdin=DEVNULL, stdout=PIPE, stderr=DEVNULL) as proc:
        assert procutil.open_fds() - before == {proc.stdout.fileno(), proc._pidfd} - {-1}
        assert proc.communicate(timeout=30) == (b"/dev/null\n/dev/null\n", None)
    with spawn(["sh", "-c", "echo lost; echo lost too >&2"], stdout=DEVNULL,
               stderr=STDOUT) as proc:
        assert proc.wait(30) == 0


# ---------------------------------------------------------------- threads

def test_spawns_from_many_threads_each_get_their_own_outcome(tmp_path, creation):
    # Each thread has its own clone stack and its own exec failure report.
    from concurrent.futures import ThreadPoolExecutor
    missing = str(tmp_path / "missing")

    def one(i):
        if i % 2:
            with pytest.raises(FileNotFoundError) as info:
                spawn([f"{missing}{i}"])
            return info.value.filename
        return spawn(["sh", "-c", f"exit {i % 7}"]).wait()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(40)))
    assert results == [f"{missing}{i}" if i % 2 else i % 7 for i in range(40)]


# ---------------------------------------------------------------- the blocking wait

@pytest.fixture(params=["pidfd", "pid"])
def wait_by(request):
    """Wait through pidfds (where the kernel has them), and by pid."""
    using = fastfork._core._set_use_pidfd(request.param == "pidfd")
    try:
        if request.param == "pidfd" and not using:
            pytest.skip("no pidfd here")
        yield request.param
    finally:
        fastfork._core._set_use_pidfd(True)


def test_wait_without_timeout_makes_one_blocking_wait(wait_by, monkeypatch):
    def no_polling(*args, **kwargs):
        raise AssertionError("wait() without a timeout polled")

    from fastfork import child as child_module
    monkeypatch.setattr(child_module, "wait_all", no_polling)
    with spawn(["sh", "-c", "read line; exit 4"], stdin=PIPE) as proc:
        assert (proc._pidfd >= 0) == (wait_by == "pidfd")  # held from the start
        proc.stdin.close()  # the command reads end of file and exits
        assert proc.wait() == 4
    assert proc.finished and proc.rusage is not None and proc._pidfd == -1


def test_blocking_wait_runs_signal_handlers_and_goes_on(wait_by):
    import threading
    main = threading.get_ident()
    handled = threading.Semaphore(0)
    ticks = []

    def on_signal(signum, frame):
        ticks.append(signum)
        handled.release()

    def interrupt_then_finish(proc):
        for _ in range(3):
            # Sent again until handled: a signal landing just before the
            # wait's system call starts is handled only once it returns.
            signal.pthread_kill(main, signal.SIGUSR1)
            while not handled.acquire(timeout=0.1):
                signal.pthread_kill(main, signal.SIGUSR1)
        proc.stdin.close()

    old = signal.signal(signal.SIGUSR1, on_signal)
    try:
        with spawn(["sh", "-c", "read line; exit 5"], stdin=PIPE) as proc:
            helper = threading.Thread(target=interrupt_then_finish, args=(proc,))
            helper.start()
            try:
                assert proc.wait() == 5
            finally:
                helper.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert len(ticks) >= 3 and set(ticks) == {signal.SIGUSR1}


def test_exception_from_a_handler_leaves_the_command_to_wait_for(wait_by):
    import threading

    class Interrupted(Exception):
        pass

    def on_signal(signum, frame):
        raise Interrupted

    main = threading.get_ident()
    stop = threading.Event()

    def interrupt():
        # Sent until the wait is interrupted: a signal landing just before
        # the wait's system call starts is handled only once it returns.
        while not stop.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)
            stop.wait(0.1)

    old = signal.signal(signal.SIGUSR1, on_signal)
    try:
        with spawn(["sh", "-c", "read line; exit 6"], stdin=PIPE) as proc:
            helper = threading.Thread(target=interrupt)
            try:
                with pytest.raises(Interrupted):
                    helper.start()
                    proc.wait()
            finally:
                signal.signal(signal.SIGUSR1, lambda signum, frame: None)
                stop.set()
                helper.join()
            assert not proc.finished and proc.returncode is None
            proc.stdin.close()
            assert proc.wait() == 6
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_blocking_wait_with_sigchld_ignored_reports_the_command_lost():
    # SIGCHLD ignored: the kernel reaps the command itself, and a blocking
    # wait ends (ECHILD) once it has exited instead of hanging.
    code = textwrap.dedent("""
        import signal
        import fastfork
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        proc = fastfork.spawn(["true"])
        print(proc.wait(), proc.lost, proc.finished)
    """)
    result = procutil.run_python(code)
    assert (result.returncode, result.stdout) == (0, "None True True\n"), result.stderr
