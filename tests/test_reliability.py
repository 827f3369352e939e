"""Faults and edge cases: what fastfork does when fork, exec, waiting or the child go wrong.

Fork failing (EAGAIN, ENOMEM), EINTR in every wait, ECHILD, exec failures,
crashes, BaseExceptions, unpicklable and huge results, OOM, timeouts, Ctrl-C,
signals right after fork, a dying parent, buffered stdio, fd exhaustion,
threads, pid reuse, interpreter shutdown, bad arguments and a large parent.
Each test asserts the outcome fastfork promises: a clear error or a per-child
report, no zombie, no leaked fd, every other result delivered, and no child
running on into the parent's code. Tests that change process-wide state
(signals, timers, rlimits, cgroups, LD_PRELOAD, seccomp) run in a contained
child interpreter (``faultlib.contained``), which checks all of that from
inside and reports once.
"""
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest

import fastfork
import faultlib
import procutil
from faultlib import contained

# Prelude for contained code: imports and the fd baseline taken before any fan-out.
HEAD = """
import errno, json, os, signal, sys, time, threading
import fastfork, faultlib, procutil
FDS = procutil.open_fds()
"""


def _segfault():
    import ctypes
    import faulthandler
    import resource
    faulthandler.disable()   # pytest's handler would dump this child's stack
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.string_at(0)


def _abort():
    import faulthandler
    import resource
    faulthandler.disable()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()


def _square(x):
    return x * x


# ---------------------------------------------------------------- EAGAIN part-way

def test_fork_eagain_partway_through_fanout_shim():
    value = contained(HEAD, """
    # Every fork after the third fails: the first three results still arrive.
    per_item = fastfork.map(lambda x: x * 10, range(6), jobs=2, fork_retries=2,
                            return_exceptions=True)
    got = [r if isinstance(r, int) else [type(r).__name__, r.errno, r.started] for r in per_item]
    try:
        fastfork.map(lambda x: x, range(6), jobs=2, fork_retries=1)
    except fastfork.ForkError as exc:
        raised = [exc.errno, exc.started]
    faultlib.report([got, raised], FDS)
    """, runner=faultlib.run_with_shim, funcs="fork", errno="EAGAIN", after=3)
    got, raised = value
    assert got[:3] == [0, 10, 20]
    assert got[3:] == [["ForkError", errno.EAGAIN, 3]] * 3
    # Raise mode: no fork works any more (the shim's after=3 was used up above).
    assert raised == [errno.EAGAIN, 0]


def test_fork_eagain_transient_is_retried():
    value = contained(HEAD, """
    results = fastfork.map(lambda x: x + 1, range(20), jobs=3)
    faultlib.report([results, faultlib.shim().failures("fork")], FDS)
    """, runner=faultlib.run_with_shim, funcs="fork", errno="EAGAIN", every=3, count=5)
    assert value == [list(range(1, 21)), 5]


def test_fork_eagain_partway_through_fanout_pids_cgroup():
    with faultlib.pids_cgroup(4) as group:
        value = contained(group.join_code, HEAD, """
        # Only 3 children fit next to this interpreter; map backs off and retries.
        results = fastfork.map(lambda x: (time.sleep(0.05), x)[1], range(12), jobs=6)
        # The core surfaces the raw errno.
        forked, err = faultlib.fork_until_failure()
        faultlib.report([results, forked, err], FDS)
        """)
        assert value == [list(range(12)), 3, errno.EAGAIN]
        assert group.pids_current() == 0


# ---------------------------------------------------------------- ENOMEM

ENOMEM_CODE = HEAD + """
out = {}
try:
    fastfork.start(int)
except OSError as exc:
    out["start"] = exc.errno
try:
    fastfork.map(int, range(3), fork_retries=1)
except fastfork.ForkError as exc:
    out["map"] = [exc.errno, exc.started]
res = fastfork.map(int, range(2), fork_retries=0, return_exceptions=True)
out["per_item"] = [[type(r).__name__, r.errno] for r in res]
try:
    fastfork.fork()
except OSError as exc:
    out["fork"] = exc.errno
faultlib.report(out, FDS)
"""
ENOMEM_EXPECTED = {"start": errno.ENOMEM, "map": [errno.ENOMEM, 0],
                   "per_item": [["ForkError", errno.ENOMEM]] * 2, "fork": errno.ENOMEM}


def test_fork_enomem_shim():
    assert contained(ENOMEM_CODE, runner=faultlib.run_with_shim, funcs="fork",
                     errno="ENOMEM") == ENOMEM_EXPECTED


def test_fork_enomem_seccomp():
    assert contained(ENOMEM_CODE, runner=faultlib.run_with_seccomp,
                     errno="ENOMEM") == ENOMEM_EXPECTED


# ---------------------------------------------------------------- exec path

EXEC_BLOCKED = HEAD + """
out = {}
for i in range(20):  # repeated: nothing may accumulate
    try:
        fastfork.spawn(["true"], stdout=fastfork.PIPE, stderr=fastfork.PIPE)
    except OSError as exc:
        out["spawn"] = [type(exc).__name__, exc.errno]
res = fastfork.spawn_many([["true"], ["echo", "x"]], capture=True, spawn_retries=1)
out["spawn_many"] = [[r.returncode, r.error.errno if r.error else None] for r in res]
faultlib.report(out, FDS)
"""


@pytest.mark.parametrize("err", ["EAGAIN", "ENOMEM"])
def test_exec_path_cannot_create_a_process_seccomp(err):
    number = getattr(errno, err)
    out = contained(EXEC_BLOCKED, runner=faultlib.run_with_seccomp, errno=err)
    assert out["spawn"][1] == number
    assert out["spawn_many"] == [[126, number], [126, number]]


def test_exec_path_cannot_create_a_process_shim():
    # The shim sees spawn's clone() (or fork() on the fallback path).
    out = contained(EXEC_BLOCKED, runner=faultlib.run_with_shim,
                    funcs=["clone", "fork", "vfork"], errno="EAGAIN")
    assert out == {"spawn": ["BlockingIOError", errno.EAGAIN],
                   "spawn_many": [[126, errno.EAGAIN], [126, errno.EAGAIN]]}


# ---------------------------------------------------------------- EINTR in every wait

EVERY_WAIT = """
def waits():
    out = []
    def child(code, delay=0.05):
        pid = fastfork.fork()
        if pid == 0:
            time.sleep(delay)
            os._exit(code)
        return pid
    out.append(os.waitstatus_to_exitcode(fastfork.waitpid(child(1), 0)[1]))
    child(2); out.append(os.waitstatus_to_exitcode(fastfork.wait()[1]))
    child(3); out.append(os.waitstatus_to_exitcode(fastfork.wait3(0)[1]))
    out.append(os.waitstatus_to_exitcode(fastfork.wait4(child(4), 0)[1]))
    pids = [child(5), child(6)]
    out.extend(os.waitstatus_to_exitcode(s) for _, s in fastfork.reap(pids))
    pids = [child(7), child(8)]
    got = fastfork.reap(pids, timeout=30)
    out.extend(os.waitstatus_to_exitcode(s) for _, s in got)
    c = fastfork.start(lambda: time.sleep(0.05) or 9)
    out.append(c.wait() or c.result())
    out.append(fastfork.start(lambda: time.sleep(0.05) or 10).result())
    out.extend(fastfork.map(lambda x: time.sleep(0.02) or x, [11, 12, 13], jobs=2))
    out.extend(fastfork.map(lambda x: x, [14, 15], timeout=30))
    p = fastfork.spawn([sys.executable, "-c", "import time; time.sleep(0.05); print(16)"],
                       stdout=fastfork.PIPE)
    out.append(int(p.communicate()[0]))
    p = fastfork.spawn(["sh", "-c", "sleep 0.05; exit 17"])
    out.append(p.wait())
    out.extend(r.returncode for r in fastfork.spawn_many([["sh", "-c", "exit 18"]] * 2))
    return out
"""
EVERY_WAIT_EXPECTED = list(range(1, 17)) + [17, 18, 18]


def test_eintr_during_every_wait_interval_timer():
    value = contained(HEAD, EVERY_WAIT, """
    ticks = [0]
    def on_alarm(signum, frame):
        ticks[0] += 1
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        out = waits()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    faultlib.report([out, ticks[0] > 50], FDS)
    """)
    assert value == [EVERY_WAIT_EXPECTED, True]


def test_eintr_during_every_wait_shim():
    funcs = ["waitpid", "wait", "wait3", "wait4", "waitid", "poll", "ppoll", "select"]
    value = contained(HEAD, EVERY_WAIT, f"""
    out = waits()
    s = faultlib.shim()
    faultlib.report([out, sum(s.failures(f) for f in {funcs!r})], FDS)
    """, runner=faultlib.run_with_shim, funcs=funcs, errno="EINTR", every=2)
    out, injected = value
    assert out == EVERY_WAIT_EXPECTED
    assert injected > 20


# ---------------------------------------------------------------- SIGCHLD ignored

def test_echild_because_sigchld_is_ignored():
    out = contained(HEAD, """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    out = {}
    pid = fastfork.fork()
    if pid == 0:
        os._exit(0)
    try:
        fastfork.waitpid(pid, 0)
    except ChildProcessError as exc:
        out["waitpid"] = exc.errno
    pids = []
    for _ in range(2):
        pid = fastfork.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    try:
        fastfork.reap(pids)
    except ChildProcessError as exc:
        out["reap"] = sorted(exc.pids) == sorted(pids)
    c = fastfork.start(lambda: "from the pipe")
    out["result"] = c.result(timeout=30)
    out["lost"] = [c.lost, c.returncode]
    out["map"] = fastfork.map(lambda x: x * 2, range(5), jobs=2, timeout=30)
    p = fastfork.spawn(["true"])
    out["spawn"] = [p.wait(timeout=30), p.lost]
    faultlib.report(out, FDS)
    """)
    assert out == {"waitpid": errno.ECHILD, "reap": True, "result": "from the pipe",
                   "lost": [True, None], "map": [0, 2, 4, 6, 8], "spawn": [None, True]}


# ---------------------------------------------------------------- reaped by someone else

def test_echild_because_someone_else_reaped_the_child():
    c = fastfork.start(lambda: "still delivered")
    os.waitpid(c.pid, 0)          # a foreign reaper
    assert c.wait(timeout=30) is None and c.lost
    assert c.result() == "still delivered"

    silent = fastfork.start(lambda: os._exit(3))
    os.waitpid(silent.pid, 0)
    with pytest.raises(fastfork.ChildError, match="ECHILD") as info:
        silent.result(timeout=30)
    assert info.value.pid == silent.pid and info.value.returncode is None

    pids = []
    for code in (4, 5):
        pid = fastfork.fork()
        if pid == 0:
            os._exit(code)
        pids.append(pid)
    os.waitpid(pids[0], 0)
    with pytest.raises(ChildProcessError) as info:
        fastfork.reap(pids)
    assert info.value.pids == [pids[0]]
    assert [(p, os.waitstatus_to_exitcode(s)) for p, s in info.value.reaped] == [(pids[1], 5)]

    p = fastfork.spawn(["true"])
    os.waitpid(p.pid, 0)
    assert p.wait(timeout=30) is None and p.lost


# ---------------------------------------------------------------- exec failures

# Each failure's type, errno, strerror and filename are compared with subprocess,
# for both ways of creating the process, in test_spawn.py
# (test_exec_failure_raises_like_subprocess, over faultlib.exec_failure_cases).

def test_nul_in_an_argument_is_a_valueerror_before_any_fork():
    before = procutil.children()
    for argv in (["true", "a\0b"], ["tr\0ue"]):
        with pytest.raises(ValueError):
            fastfork.spawn(argv)
        with pytest.raises(ValueError):
            subprocess.Popen(argv)
    assert procutil.children() == before


def test_no_fd_leak_after_1000_failing_spawns(tmp_path):
    fds = procutil.open_fds()
    cases = list(faultlib.exec_failure_cases(tmp_path).values())
    for i in range(1000):
        kwargs = dict(cases[i % len(cases)])
        args = kwargs.pop("args")
        with pytest.raises(OSError):
            fastfork.spawn(args, stdin=fastfork.PIPE, stdout=fastfork.PIPE,
                           stderr=fastfork.PIPE, **kwargs)
    assert procutil.open_fds() == fds
    assert procutil.children() == set()


# ---------------------------------------------------------------- segfault / abort

def test_child_segfaults_or_aborts():
    fns = [_segfault, _abort, lambda: "fine"]
    results = fastfork.map(lambda f: f(), fns, jobs=3, return_exceptions=True)
    assert results[2] == "fine"
    assert isinstance(results[0], fastfork.ChildError)
    assert results[0].signal == signal.SIGSEGV and results[0].returncode == -signal.SIGSEGV
    assert "SIGSEGV" in str(results[0])
    assert results[1].signal == signal.SIGABRT and "SIGABRT" in str(results[1])
    with pytest.raises(fastfork.ChildError, match="SIGSEGV"):
        fastfork.map(lambda f: f(), [_segfault])
    with pytest.raises(fastfork.ChildError, match="SIGABRT"):
        fastfork.start(_abort).result(timeout=30)


# ---------------------------------------------------------------- exit without a result

def test_child_exits_without_a_result():
    def c_exit(code):
        import ctypes
        ctypes.CDLL(None).exit(code)

    out = contained(HEAD, """
    import ctypes
    results = fastfork.map(lambda f: f(), [lambda: os._exit(3),
                                           lambda: ctypes.CDLL(None).exit(4),
                                           lambda: "ok"], return_exceptions=True)
    out = [[r.returncode, "without a result" in str(r)] if isinstance(r, Exception) else r
           for r in results]
    faultlib.report(out, FDS)
    """)
    assert out == [[3, True], [4, True], "ok"]
    with pytest.raises(fastfork.ChildError, match="exited with code 5 without a result"):
        fastfork.start(c_exit, 5).result(timeout=30)


# ---------------------------------------------------------------- BaseExceptions

def test_base_exceptions_never_run_parent_code(tmp_path):
    sentinel = tmp_path / "sentinel"
    at_exit = tmp_path / "atexit"
    out = contained(HEAD, f"""
    import atexit
    atexit.register(lambda: open({str(at_exit)!r}, "a").write(f"{{os.getpid()}}\\n"))

    class Odd(BaseException):
        pass

    def finally_raises():
        try:
            raise ValueError("first")
        finally:
            raise KeyError("in finally")

    def raiser(exc):
        def fn():
            raise exc
        return fn

    fns = [raiser(SystemExit(5)), raiser(SystemExit(None)), raiser(SystemExit("text")),
           raiser(KeyboardInterrupt()), raiser(GeneratorExit()), raiser(Odd()),
           finally_raises, lambda: sys.exit(6), lambda: 7]
    res = fastfork.map(lambda f: f(), fns, jobs=3, return_exceptions=True)
    out = [[r.returncode, r.exc_type] if isinstance(r, Exception) else r for r in res]
    for fn in fns[:-1]:
        try:
            fastfork.start(fn).result(timeout=30)
        except fastfork.ChildError:
            pass
    with fastfork.background(raiser(KeyboardInterrupt())) as child:
        child.wait(timeout=30)
    open({str(sentinel)!r}, "a").write(f"{{os.getpid()}}\\n")
    faultlib.report(out, FDS)
    """)
    # SystemExit with exit status 0 is a success whose result is None.
    assert out == [[5, "SystemExit"], None, [1, "SystemExit"],
                   [1, "KeyboardInterrupt"], [1, "GeneratorExit"], [1, "__main__.Odd"],
                   [1, "KeyError"], [6, "SystemExit"], 7]
    assert len(sentinel.read_text().split()) == 1
    assert at_exit.read_text().split() == sentinel.read_text().split()


# ---------------------------------------------------------------- unpicklable results

class _ReduceRaises:
    def __reduce__(self):
        raise RuntimeError("cannot pickle me")


class _ReduceExits:
    def __reduce__(self):
        os._exit(9)


class _ReduceCrashes:
    def __reduce__(self):
        _segfault()


def test_result_cannot_be_pickled():
    items = [lambda: (lambda: 1), _ReduceRaises, _ReduceExits, _ReduceCrashes, lambda: "ok"]
    res = fastfork.map(lambda f: f(), items, jobs=2, return_exceptions=True)
    assert res[4] == "ok"
    assert "could not be pickled" in str(res[0])
    assert "could not be pickled" in str(res[1]) and "cannot pickle me" in str(res[1])
    assert res[2].returncode == 9 and "without a result" in str(res[2])
    assert res[3].signal == signal.SIGSEGV
    for r, index in zip(res[:4], range(4)):
        assert isinstance(r, fastfork.ChildError) and r.index == index


# ---------------------------------------------------------------- large outputs

def test_child_writes_far_more_than_a_pipe_holds():
    sizes = [1 << 20, 10 << 20, 100 << 20]
    got = fastfork.map(lambda n: b"x" * n, sizes, jobs=3, timeout=60)
    assert [len(b) for b in got] == sizes
    p = fastfork.spawn([sys.executable, "-c",
                        "import sys; sys.stdout.write('o' * (10 << 20)); "
                        "sys.stderr.write('e' * (10 << 20))"],
                       stdout=fastfork.PIPE, stderr=fastfork.PIPE)
    out, err = p.communicate(timeout=60)
    assert (len(out), len(err)) == (10 << 20, 10 << 20)
    res = fastfork.spawn_many([["head", "-c", str(10 << 20), "/dev/zero"]], capture=True,
                              timeout=60)
    assert len(res[0].stdout) == 10 << 20


# ---------------------------------------------------------------- OOM mid-result

def test_child_oom_killed_mid_result():
    with faultlib.memory_cgroup(96 << 20) as group:
        out = contained(HEAD, f"""
        go_r, go_w = os.pipe()
        def fn():
            with open({group.path + "/cgroup.procs"!r}, "w") as f:
                f.write(str(os.getpid()))
            def hog():
                os.read(go_r, 1)   # the main thread is blocked writing the result by now
                chunks = []
                while True:
                    chunks.append(bytearray(1 << 20))
            threading.Thread(target=hog, daemon=True).start()
            return b"r" * (16 << 20)   # far more than the pipe holds

        c = fastfork.start(fn)
        # Do not drain yet: once the frame starts to arrive, the child is blocked
        # in write() with a partial frame in the pipe. Then let the hog loose.
        procutil.wait_readable(c._result_fd)
        os.write(go_w, b"g")
        os.close(go_r)
        os.close(go_w)
        while procutil.state(c.pid) != "Z":
            time.sleep(0.01)
        try:
            c.result(timeout=30)
            out = "unpickled"
        except fastfork.ChildError as exc:
            out = [exc.signal, "without a result" in str(exc)]
        faultlib.report(out, FDS)
        """)
        assert out == [signal.SIGKILL, True]
        assert int(group.read("memory.failcnt")) > 0


# ---------------------------------------------------------------- timeouts

def _ignore_term():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import time
    time.sleep(60)


def _stop_self():
    os.kill(os.getpid(), signal.SIGSTOP)
    return "resumed"


def test_timeouts_sleeping_ignoring_sigterm_and_stopped():
    import time
    fns = [lambda: time.sleep(60), _ignore_term, _stop_self, lambda: "quick"]
    # The timeout leaves a busy machine time to have _ignore_term install its handler.
    res = fastfork.map(lambda f: f(), fns, jobs=4, timeout=1.0, grace=0.2,
                       return_exceptions=True)
    assert res[3] == "quick"
    assert [r.returncode for r in res[:3]] == [-signal.SIGTERM, -signal.SIGKILL, -signal.SIGTERM]
    assert all("timed out" in str(r) for r in res[:3])
    c = fastfork.start(time.sleep, 60)
    with pytest.raises(fastfork.TimeoutExpired) as info:
        c.wait(timeout=0.1)
    assert info.value.pid == c.pid
    assert c.stop(timeout=0.2) == -signal.SIGTERM
    p = fastfork.spawn(["sleep", "60"])
    with pytest.raises(fastfork.TimeoutExpired):
        p.wait(timeout=0.1)
    p.stop(timeout=0.2)
    res = fastfork.spawn_many([["sleep", "60"], ["true"]], timeout=0.3, grace=0.1)
    assert res[0].timed_out and res[0].returncode == -signal.SIGTERM
    assert res[1].returncode == 0


# ---------------------------------------------------------------- grandchild holds the pipe

def test_grandchild_keeps_the_result_pipe_open():
    out = contained(HEAD, """
    def fn():
        pid = os.fork()
        if pid == 0:   # inherits the result pipe's write end and keeps it
            time.sleep(60)
            os._exit(0)
        return pid

    grandchild = fastfork.start(fn).result(timeout=30)
    more = fastfork.map(lambda x: fn(), range(3), timeout=30)
    alive = [procutil.state(p) not in (None, "Z") for p in [grandchild] + more]
    for pid in [grandchild] + more:
        os.kill(pid, signal.SIGKILL)   # orphans: the subreaper reaps them
    faultlib.report(alive, FDS)
    """)
    # Every result arrived while the grandchildren still held the pipes open.
    assert out == [True] * 4


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_at_random_moments_of_a_fanout():
    out = contained(HEAD, """
    import random
    os.setpgid(0, 0)          # Ctrl-C reaches the whole group: this process and its children
    random.seed(16)
    signal.signal(signal.SIGALRM, lambda *a: os.killpg(0, signal.SIGINT))
    interrupted = completed = 0
    for i in range(25):
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0005, 0.08))
        try:
            fastfork.map(lambda x: time.sleep(0.01 * (x % 3)) or x, range(30), jobs=4)
            signal.setitimer(signal.ITIMER_REAL, 0)
            completed += 1
        except KeyboardInterrupt:
            interrupted += 1
        leaks = faultlib.leak_report(FDS)
        assert not leaks["children"] and not leaks["new_fds"], (i, leaks)
    signal.setitimer(signal.ITIMER_REAL, 0)
    faultlib.report([interrupted > 10, interrupted + completed], FDS)
    """)
    assert out == [True, 25]


def test_children_print_no_tracebacks_on_ctrl_c():
    result = faultlib.run_contained(HEAD + """
os.setpgid(0, 0)
signal.signal(signal.SIGALRM, lambda *a: os.killpg(0, signal.SIGINT))
signal.setitimer(signal.ITIMER_REAL, 0.2)
try:
    fastfork.map(lambda x: time.sleep(5), range(4), jobs=4)
except KeyboardInterrupt:
    print("interrupted")
""")
    assert result.returncode == 0 and result.leftover == 0, result.stderr
    assert result.stdout.strip() == "interrupted"
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- signal right after fork

def test_signal_between_fork_and_pid_recorded():
    out = contained(HEAD, """
    import random
    from fastfork import _core
    from fastfork.child import reap_dropped

    class Tick(Exception):
        pass

    def on_alarm(signum, frame):
        raise Tick

    random.seed(17)
    handles, registry, interrupted = [], [], 0
    signal.signal(signal.SIGALRM, on_alarm)
    for i in range(400):
        # One shot per call, landing anywhere in it (a fork takes about a millisecond).
        try:
            signal.setitimer(signal.ITIMER_REAL, random.uniform(0.00005, 0.003))
            if i % 2:
                handles.append(fastfork.start(int))
            else:
                _core.fork_call(lambda: 0, registry)
            signal.setitimer(signal.ITIMER_REAL, 0)
        except Tick:
            interrupted += 1
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for c in handles:
        c.wait()
    fastfork.reap(registry)
    # A handle dropped by a Tick right after start() returned is reaped later
    # by the library (its __del__ hands the pid over); give those children time.
    deadline = time.monotonic() + 10
    while procutil.children() and time.monotonic() < deadline:
        time.sleep(0.01)
        reap_dropped()
    # Every child that exists was handed back: as a handle, in the registry, or
    # to the library's dropped-handle list; none was lost between fork and record.
    faultlib.report(interrupted > 50, FDS)
    """)
    assert out is True


# ---------------------------------------------------------------- parent SIGKILLed

def test_parent_sigkilled_children_asked_to_die_with_it_do(tmp_path):
    pids_file = tmp_path / "pids"
    out = contained(HEAD, f"""
    PIDS = {str(pids_file)!r}

    def sleeper(_=None):
        with open(PIDS, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(60)

    def parent():
        with fastfork.background(sleeper):                         # die_with_parent default
            fastfork.spawn(["sleep", "60"], die_with_parent=True)
            fastfork.map(sleeper, range(3), jobs=3, die_with_parent=True)

    p = fastfork.start(parent)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(PIDS) and len(open(PIDS).read().split()) == 4:
            break
        time.sleep(0.01)
    victims = [int(x) for x in open(PIDS).read().split()]
    victims += [c for c in procutil.children(p.pid) if c not in victims]
    p.kill()
    p.wait()
    deadline = time.monotonic() + 30
    alive = victims
    while alive and time.monotonic() < deadline:
        alive = [v for v in alive if procutil.state(v) not in (None, "Z")]
        time.sleep(0.01)
    faultlib.report([len(victims), alive], FDS)
    """)
    assert out == [5, []]


# ---------------------------------------------------------------- buffered stdio

def test_buffered_stdio_nothing_lost_nothing_doubled():
    result = faultlib.run_contained(HEAD + """
print("before")                      # sits in the parent's buffer: stdout is a pipe
fastfork.map(lambda i: print(f"child {i}"), range(4), jobs=2)
fastfork.start(lambda: print("started")).result()
# SIGINT: KeyboardInterrupt ends the child through fastfork's guard, which flushes.
ready = procutil.Ready()
def serve():
    print("background")
    ready.signal()
    time.sleep(60)
with ready, fastfork.background(serve, stop_signal=signal.SIGINT, grace=60) as c:
    ready.wait()
print("after")
""", unbuffered=False)
    assert result.returncode == 0 and result.leftover == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines) == sorted(["before", "after", "started", "background"]
                                   + [f"child {i}" for i in range(4)])
    assert lines[0] == "before" and lines[-1] == "after"


# ---------------------------------------------------------------- fd exhaustion

def test_fd_exhaustion_before_forking_rlimit():
    out = contained(HEAD, """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(procutil.open_fds()) + 2, hard))
    out = {}
    for name, call in [("start", lambda: fastfork.start(int)),
                       ("map", lambda: fastfork.map(int, range(3))),
                       ("spawn", lambda: fastfork.spawn(["true"], stdout=fastfork.PIPE,
                                                        stderr=fastfork.PIPE))]:
        try:
            call()
            out[name] = "no error"
        except OSError as exc:
            out[name] = exc.errno
        out[name + " children"] = len(procutil.children())
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    faultlib.report(out, FDS)
    """)
    assert out == {"start": errno.EMFILE, "start children": 0, "map": errno.EMFILE,
                   "map children": 0, "spawn": errno.EMFILE, "spawn children": 0}


def test_fd_exhaustion_before_forking_shim():
    out = contained(HEAD, """
    out = []
    for call in (lambda: fastfork.start(int), lambda: fastfork.map(int, range(3)),
                 lambda: fastfork.spawn(["true"], stdout=fastfork.PIPE)):
        try:
            call()
            out.append("no error")
        except OSError as exc:
            out.append(exc.errno)
        assert not procutil.children()
    faultlib.report(out, FDS)
    """, runner=faultlib.run_with_shim, funcs=["pipe", "pipe2"], errno="ENFILE")
    assert out == [errno.ENFILE] * 3


# ---------------------------------------------------------------- only its own fds

def test_a_child_holds_only_its_own_fds():
    out = contained(HEAD, """
    import fcntl, stat

    def fds_of_child(_):
        time.sleep(0.2)          # siblings are alive meanwhile
        mine = []
        for fd in sorted(procutil.open_fds()):
            if fd > 2:
                st = os.fstat(fd)
                kind = "pipe" if stat.S_ISFIFO(st.st_mode) else "other"
                mine.append([kind, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                             st.st_ino])
        return mine

    keep = [fastfork.spawn(["sleep", "60"], stdout=fastfork.PIPE) for _ in range(2)]
    in_map = fastfork.map(fds_of_child, range(6), jobs=4)
    p = fastfork.spawn([sys.executable, "-c", "import os; print(sorted(map(int, os.listdir('/proc/self/fd'))))"],
                       stdout=fastfork.PIPE)
    spawned = p.communicate()[0].decode().strip()
    for k in keep:
        k.stop(0.1)
        k.close_pipes()
    faultlib.report([in_map, spawned], FDS)
    """)
    in_map, spawned = out
    # Two close-on-exec pipes: its own result pipe and the fan-out's doorbell
    # (one for all the children, which ring it when a result overfills their
    # pipe); nothing of its siblings or of spawn's pipes.
    assert all([[kind, cloexec] for kind, cloexec, _ in fds] == [["pipe", True]] * 2
               for fds in in_map), in_map
    inodes = [{inode for _, _, inode in fds} for fds in in_map]
    doorbell = set.intersection(*inodes)
    assert len(doorbell) == 1, in_map
    result_pipes = [(fds - doorbell).pop() for fds in inodes]
    assert len(set(result_pipes)) == 6, in_map
    assert spawned == "[0, 1, 2, 3]"   # 3 is listdir's own


# ---------------------------------------------------------------- a thread holds a lock

def test_thread_holds_a_lock_at_fork_time():
    out = contained(HEAD, """
    import warnings
    lock, release = threading.Lock(), threading.Event()
    def holder():
        with lock:
            release.wait()
    t = threading.Thread(target=holder)
    t.start()
    while not lock.locked():
        time.sleep(0.001)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fastfork.map(lambda _: lock.acquire() and "acquired", range(2), timeout=0.5,
                           grace=0.2, return_exceptions=True)
        ff_warned = any(issubclass(x.category, DeprecationWarning) for x in w)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        os_warned = any(issubclass(x.category, DeprecationWarning) for x in w)
    release.set()
    t.join()
    faultlib.report([[("timed out" in str(r), r.returncode) for r in res],
                     ff_warned, os_warned], FDS)
    """)
    timeouts, ff_warned, os_warned = out
    assert timeouts == [[True, -signal.SIGTERM]] * 2
    assert ff_warned == os_warned == (sys.version_info >= (3, 12))


# ---------------------------------------------------------------- several threads

def test_forking_from_several_threads_at_once():
    results, errors = {}, []

    def worker(k):
        try:
            got = fastfork.map(_square, range(k * 10, k * 10 + 10), jobs=2)
            got.append(fastfork.start(_square, k).result(timeout=60))
            got.append(fastfork.spawn(["sh", "-c", f"exit {k}"]).wait(timeout=60))
            results[k] = got
        except BaseException as exc:  # reported below, with the thread's number
            errors.append((k, exc))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert results == {k: [x * x for x in range(k * 10, k * 10 + 10)] + [k * k, k]
                       for k in range(4)}


def _pipes_held_after(seconds):
    """In a fan-out child: sleep, then return the inodes of the pipes it holds."""
    time.sleep(seconds)
    return procutil.pipe_inodes()


def test_fan_out_children_never_hold_a_concurrent_spawns_pipe():
    # spawn's pipe ends for its child are not fastfork's to close in every
    # child: spawn holds the fd lock until they are closed, and the fan-out
    # forks under it. A fan-out child must never hold one of those pipes.
    stop, spawning, spawn_pipes, errors = threading.Event(), threading.Event(), set(), []

    def spawner():
        try:
            while not stop.is_set():
                proc = fastfork.spawn(["echo", "hi"], stdout=fastfork.PIPE)
                spawn_pipes.add(os.fstat(proc.stdout.fileno()).st_ino)
                spawning.set()
                assert proc.communicate(timeout=30)[0] == b"hi\n"
        except BaseException as exc:
            errors.append(exc)
        finally:
            spawning.set()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        thread = threading.Thread(target=spawner)
        thread.start()
        try:
            spawning.wait()  # the spawns run before and while the fan-out forks
            held = fastfork.map(_pipes_held_after, [0.5] * 8, jobs=4)
            held.append(fastfork.start(_pipes_held_after, 0.5).result(timeout=30))
        finally:
            stop.set()
            thread.join()
    assert errors == []
    assert spawn_pipes  # the spawns ran alongside the forks
    assert all(not pipes & spawn_pipes for pipes in held), held


# ---------------------------------------------------------------- pid reuse

RECYCLE = """
def recycle(pid):
    # Make the next fork get ``pid`` again (this pid namespace is private).
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        other = os.fork()
        if other == 0:
            signal.pause()
            os._exit(0)
        if other == pid:
            return other
        os.kill(other, signal.SIGKILL)
        os.waitpid(other, 0)
    raise AssertionError("could not recycle the pid")

def reaped_elsewhere_and_recycled(make):
    c = make()
    while procutil.state(c.pid) != "Z":
        time.sleep(0.001)
    os.waitpid(c.pid, 0)            # someone else reaps it: the pid is free
    return c, recycle(c.pid)
"""


def test_pid_reuse_signals_go_through_a_pidfd():
    out = contained(HEAD, RECYCLE, """
    out = []
    for make in (lambda: fastfork.start(int), lambda: fastfork.spawn(["true"])):
        c, other = reaped_elsewhere_and_recycled(make)
        c.send_signal(signal.SIGKILL)
        c.kill()
        c.terminate()
        out.append(os.waitpid(other, os.WNOHANG) == (0, 0))
        os.kill(other, signal.SIGKILL)
        os.waitpid(other, 0)
        out.append([c.wait(timeout=30), c.lost])
    faultlib.report(out, FDS)
    """, launcher=faultlib.pid_namespace())
    assert out == [True, [None, True], True, [None, True]]


def test_pid_reuse_wait_never_reaps_the_new_process():
    out = contained(HEAD, RECYCLE, """
    out = []
    for make in (lambda: fastfork.start(int), lambda: fastfork.spawn(["true"])):
        c, other = reaped_elsewhere_and_recycled(make)
        try:
            out.append([c.wait(timeout=5), c.lost])
        except fastfork.TimeoutExpired:
            out.append("wait() took the new process for its child")
        os.kill(other, signal.SIGKILL)
        # ``other`` is still ours to reap: fastfork must not have taken its status.
        out.append(os.waitstatus_to_exitcode(os.waitpid(other, 0)[1]))
        c.wait(timeout=30)
    faultlib.report(out, FDS)
    """, launcher=faultlib.pid_namespace())
    assert out == [[None, True], -signal.SIGKILL] * 2


# ---------------------------------------------------------------- interpreter shutdown

def test_fork_during_interpreter_shutdown():
    result = faultlib.run_contained(HEAD + """
class AtShutdown:
    def __del__(self, write=os.write, waitpid=os.waitpid, _exit=os._exit, fork=os.fork,
                ff_fork=fastfork.fork, start=fastfork.start, fan_out=fastfork.map):
        out = []
        for call in (fork, ff_fork, lambda: start(int), lambda: fan_out(int, range(2))):
            try:
                pid = call()
            except RuntimeError:
                out.append("RuntimeError")
                continue
            except BaseException as exc:
                out.append(type(exc).__name__)
                continue
            if pid == 0:
                _exit(0)
            out.append("forked")
            if isinstance(pid, int):
                waitpid(pid, 0)
        write(1, (" ".join(out) + "\\n").encode())

keeper = AtShutdown()   # collected while the interpreter finalizes
""")
    assert result.returncode == 0, result.stderr
    os_fork, ff_fork, start, fan_out = result.stdout.split()
    # fastfork.fork is a drop-in: it refuses exactly when os.fork does (3.12+).
    assert ff_fork == os_fork
    # The fan-out API refuses on every version: no child may start at shutdown.
    assert (start, fan_out) == ("RuntimeError", "RuntimeError"), result.stderr
    assert result.leftover == 0, result.stderr


# ---------------------------------------------------------------- bad arguments

BAD_CALLS = [
    (lambda: fastfork.map(_square, range(3), jobs=0), ValueError),
    (lambda: fastfork.map(_square, range(3), jobs=-1), ValueError),
    (lambda: fastfork.map(_square, range(3), jobs=2.5), TypeError),
    (lambda: fastfork.map(_square, range(3), jobs=True), TypeError),
    (lambda: fastfork.map(_square, range(3), jobs="2"), TypeError),
    (lambda: fastfork.map(_square, range(3), timeout=-1), ValueError),
    (lambda: fastfork.map(_square, range(3), timeout=float("nan")), ValueError),
    (lambda: fastfork.map(_square, range(3), timeout=float("inf")), ValueError),
    (lambda: fastfork.map(_square, range(3), timeout="1"), TypeError),
    (lambda: fastfork.map(_square, range(3), fork_retries=-1), ValueError),
    (lambda: fastfork.map(42, range(3)), TypeError),
    (lambda: fastfork.map(_square, 42), TypeError),
    (lambda: fastfork.start("not callable"), TypeError),
    (lambda: fastfork.start_child(_square, (1,), kwargs=[1]), TypeError),
    (lambda: list(fastfork.as_completed(None, range(3))), TypeError),
    (lambda: fastfork.reap([0]), ValueError),
    (lambda: fastfork.reap([-1]), ValueError),
    (lambda: fastfork.reap([os.getpid(), os.getpid()]), ValueError),
    (lambda: fastfork.reap([1], timeout=float("nan")), ValueError),
    (lambda: fastfork.reap([1], timeout=-0.5), ValueError),
    (lambda: fastfork.reap(["x"]), TypeError),
    (lambda: fastfork.spawn([]), ValueError),
    (lambda: fastfork.spawn("ls -l"), TypeError),
    (lambda: fastfork.spawn([1, 2]), TypeError),
    (lambda: fastfork.spawn(["true", "a\0b"]), ValueError),
    (lambda: fastfork.spawn(["true"], env={"A=B": "1"}), ValueError),
    (lambda: fastfork.spawn(["true"], env={"A\0": "1"}), ValueError),
    (lambda: fastfork.spawn(["true"], env={"": "1"}), ValueError),
    (lambda: fastfork.spawn(["true"], env={"A": "1\0"}), ValueError),
    (lambda: fastfork.spawn(["true"], env=[("A", "1")]), TypeError),
    (lambda: fastfork.spawn(["true"], cwd="/tmp\0x"), ValueError),
    (lambda: fastfork.spawn(["true"], pass_fds=[987654]), ValueError),
    (lambda: fastfork.spawn(["true"], pass_fds=[-3]), ValueError),
    (lambda: fastfork.spawn(["true"], stdout=True), TypeError),
    (lambda: fastfork.spawn(["true"], stdin=fastfork.STDOUT), ValueError),
    (lambda: fastfork.spawn_many([["true"]], jobs=0), ValueError),
    (lambda: fastfork.spawn_many([["true"]], timeout=float("nan")), ValueError),
    (lambda: fastfork.spawn_many([["true"], []]), ValueError),
    (lambda: fastfork.spawn_many("true"), TypeError),
]


@pytest.mark.parametrize("call, error", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_arguments_raise_before_any_fork(call, error):
    before = procutil.children()
    with pytest.raises(error):
        call()
    assert procutil.children() == before


def test_closed_fd_in_pass_fds():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError):
        fastfork.spawn(["true"], pass_fds=[r])


# ---------------------------------------------------------------- large parent

def test_large_parent_fan_out_with_timeouts_and_spawn():
    # From a parent holding 1 GiB (slow forks): children whose work fits their
    # timeout all deliver (the timeout starts once a child exists, not before
    # its fork), and spawn still creates its child vfork-style.
    out = contained(HEAD, """
    from fastfork import _core
    ballast = bytearray(b"\\x01") * (1 << 30)      # 1 GiB, every page touched
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    fork_latency = time.monotonic() - t0
    os.waitpid(pid, 0)
    # The children's work takes a few fork latencies and fits their timeout with
    # at least a second to spare, for a busy machine.
    work = 2 * fork_latency
    timeout = work + max(1.0, 4 * fork_latency)
    res = fastfork.map(lambda _: time.sleep(work) or "ok", range(6), jobs=3,
                       timeout=timeout, return_exceptions=True)
    p = fastfork.spawn(["true"])
    spawned = [p.wait(timeout=60), _core._spawn_uses_vfork()]
    faultlib.report([res, spawned, len(ballast) >> 30], FDS)
    """)
    assert out == [["ok"] * 6, [0, True], 1]


# ---------------------------------------------------------------- after-fork hooks

def test_after_fork_hooks_run_random_differs():
    import random
    values = fastfork.map(lambda _: random.random(), range(8), jobs=4)
    assert len(set(values)) == 8
    out = contained(HEAD, """
    calls = []
    os.register_at_fork(before=lambda: calls.append("before"),
                        after_in_parent=lambda: calls.append("parent"),
                        after_in_child=lambda: calls.append("child"))
    seen = fastfork.start(lambda: list(calls)).result()
    mapped = fastfork.map(lambda _: calls[-1], range(2))
    faultlib.report([seen, mapped, calls.count("before"), calls.count("parent")], FDS)
    """)
    assert out == [["before", "child"], ["child", "child"], 3, 3]
