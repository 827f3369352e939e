"""fastfork._core against its os twins: fork, waitpid, wait, wait3, wait4, _exit;
plus the batch ``reap`` and ``fork_call``.

Each drop-in is run beside its ``os`` namesake on the same inputs in the same
test. Tests that change process-wide state (signal handlers, interval timers,
at-fork hooks, audit hooks, rlimits, cgroups, interpreter shutdown) run in a
fresh interpreter through ``procutil.run_python``.
"""
import _imp
import errno
import json
import math
import os
import resource
import signal
import sys
import textwrap
import threading
import time
import types
import warnings

import pytest

import fastfork
import procutil
from fastfork import _core

FORKS = pytest.mark.parametrize("fork", [os.fork, fastfork.fork], ids=["os", "fastfork"])


def fork_and(fork, body):
    """Fork with ``fork``; the child runs ``body()`` and exits with its result (99 if it raised)."""
    pid = fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    return pid


def twins(body, reaper):
    """Fork the same child twice: once with os.fork, once with fastfork.fork."""
    pids = fork_and(os.fork, body), fork_and(fastfork.fork, body)
    reaper.extend(pids)
    return pids


def blocked_child(fork, reaper, code=0):
    """Fork a child that exits with ``code`` once the returned write fd is closed."""
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(code)
    os.close(r)
    reaper.append(pid)
    return pid, w


def exitcode(status):
    return os.waitstatus_to_exitcode(status)


def run_script(code, **kwargs):
    """Run ``code`` in a fresh interpreter; return the JSON it prints last."""
    proc = procutil.run_python(textwrap.dedent(code), **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ fork


@FORKS
def test_fork_returns_zero_in_child_and_pid_in_parent(fork, reaper):
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        try:
            os.write(w, repr((type(pid).__name__, pid, os.getpid())).encode())
        finally:
            os._exit(0)
    reaper.append(pid)
    os.close(w)
    assert type(pid) is int and pid > 0
    assert pid in procutil.children()
    with os.fdopen(r) as f:
        assert f.read() == repr(("int", 0, pid))
    assert os.waitpid(pid, 0) == (pid, 0)


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_fork_with_threads_only_forking_thread_survives_and_warns_like_os(where, reaper):
    release = threading.Event()
    idle = threading.Thread(target=release.wait)
    idle.start()
    results = {}

    def child_view():
        # 0 when the child holds exactly one thread, which threading sees as main.
        ok = (threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1
              and threading.current_thread() is threading.main_thread())
        return 0 if ok else 1

    def do_fork(name, fork):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pid = fork_and(fork, child_view)
        reaper.append(pid)
        pid_text = str(os.getpid())
        results[name] = (
            [(w.category, str(w.message).replace(pid_text, "PID"), w.filename) for w in caught],
            exitcode(os.waitpid(pid, 0)[1]))

    try:
        for name, fork in (("os", os.fork), ("fastfork", fastfork.fork)):
            if where == "main thread":
                do_fork(name, fork)
            else:
                t = threading.Thread(target=do_fork, args=(name, fork))
                t.start()
                t.join()
    finally:
        release.set()
        idle.join()
    assert results["fastfork"] == results["os"]
    warned, code = results["fastfork"]
    assert code == 0
    if sys.version_info >= (3, 12):
        assert [(c, m) for c, m, _ in warned] == [(
            DeprecationWarning,
            "This process (pid=PID) is multi-threaded, use of fork() may lead to "
            "deadlocks in the child.")]
        assert warned[0][2] == __file__
    else:
        assert warned == []


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_a_child_forked_from_any_thread_runs_its_signal_handlers_between_bytecodes(
        where, reaper):
    # CPython 3.13's os.fork leaves a child forked from a worker thread
    # unable to run Python-level handlers until some C code checks for
    # signals; fastfork.fork makes the forking thread the child's main
    # thread for signals too. The child's loop never sleeps or makes a
    # system call that a signal would interrupt.
    outcome = {}

    def handles_sigterm():
        handled = []
        signal.signal(signal.SIGTERM, lambda *args: handled.append(1))
        os.write(ready_w, b"r")
        deadline = time.monotonic() + 30  # only bounds a failing run
        while not handled and time.monotonic() < deadline:
            pass
        return 0 if handled else 1

    def fork_and_signal():
        pid = fork_and(fastfork.fork, handles_sigterm)
        reaper.append(pid)
        assert os.read(ready_r, 1) == b"r"
        os.kill(pid, signal.SIGTERM)
        outcome["code"] = exitcode(os.waitpid(pid, 0)[1])

    ready_r, ready_w = os.pipe()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # forking with a thread
            if where == "main thread":
                fork_and_signal()
            else:
                thread = threading.Thread(target=fork_and_signal)
                thread.start()
                thread.join()
    finally:
        os.close(ready_r)
        os.close(ready_w)
    assert outcome == {"code": 0}


# Each entry point forks on a line marked "# at: NAME", with an idle thread
# running; the script reports the warnings each one issued.
THREADS_WARNING_SCRIPT = """
import json, os, subprocess, threading, warnings, fastfork
release = threading.Event()
idle = threading.Thread(target=release.wait)
idle.start()
seen = {}

def record(name, caught):
    seen[name] = [[w.filename, w.lineno, w.category.__name__,
                   str(w.message).replace(str(os.getpid()), "PID")] for w in caught]

def fork_here(fork):
    pid = fork()  # at: in-function
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

for name, fork in (("os", os.fork), ("fastfork", fastfork.fork)):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fork_here(fork)
    record(name + " in a function", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pid = os.fork()  # at: os
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
record("os", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pid = fastfork.fork()  # at: fastfork
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
record("fastfork", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastfork.map(abs, [-1])  # at: map
record("map", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastfork.start(abs, -1).result(timeout=30)  # at: start
record("start", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    list(fastfork.as_completed(abs, [-1]))  # at: as_completed
record("as_completed", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with fastfork.background(abs, -1) as child:  # at: background
        child.wait(timeout=30)
record("background", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with fastfork.ForkServer() as server:  # at: ForkServer
        server.start(abs, -1).result(timeout=30)
record("ForkServer", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastfork.spawn(["true"]).wait(timeout=30)
record("spawn", caught)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    subprocess.run(["true"])
record("subprocess", caught)

release.set()
idle.join()
print(json.dumps(seen))
"""


@pytest.mark.skipif(sys.version_info < (3, 12), reason="os.fork warns about threads from 3.12")
def test_threads_warning_names_the_line_that_forked_for_every_entry_point():
    lines = {line.rpartition("# at: ")[2]: number
             for number, line in enumerate(THREADS_WARNING_SCRIPT.splitlines(), 1)
             if "# at: " in line}
    seen = run_script(THREADS_WARNING_SCRIPT)

    def warned_at(name):
        return [["<string>", lines[name], "DeprecationWarning",
                 "This process (pid=PID) is multi-threaded, use of fork() may lead to "
                 "deadlocks in the child."]]

    # fastfork.fork warns exactly as os.fork does, at module level and in a function.
    assert seen["os"] == warned_at("os")
    assert seen["fastfork"] == warned_at("fastfork")
    assert seen["fastfork in a function"] == seen["os in a function"] == warned_at("in-function")
    # The library's forks name the user's line that called into fastfork.
    for name in ("map", "start", "as_completed", "background", "ForkServer"):
        assert seen[name] == warned_at(name), name
    # spawn creates its process vfork-style and execs at once: like subprocess, no warning.
    assert seen["spawn"] == seen["subprocess"] == []


@pytest.mark.parametrize("how", ["fork", "start"])
def test_a_signal_during_an_at_fork_hook_is_not_lost_with_threads_running(how):
    # While the hooks run, the forking thread blocks signals, but another
    # thread can still receive one; its C-level handler sets a flag, and the
    # Python-level handler would then run inside the hook, in the main thread,
    # where what it raised would be printed as "Exception ignored" and lost.
    call = {
        "fork": "pid = fastfork.fork()\n    if pid == 0:\n        os._exit(0)",
        "start": "fastfork.start(int).result(timeout=30)",
    }[how]
    proc = procutil.run_python(textwrap.dedent("""
        import os, signal, threading, warnings, fastfork, procutil
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        signal.signal(signal.SIGINT, signal.default_int_handler)
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()

        def other_thread():
            os.read(go_r, 1)
            # raise() returns once this thread's C-level handler has run.
            signal.raise_signal(signal.SIGINT)
            os.write(done_w, b"!")

        helper = threading.Thread(target=other_thread)
        helper.start()
        armed = [1]

        def before():
            if armed:
                armed.clear()
                os.write(go_w, b"!")
                os.read(done_r, 1)  # the signal has been received meanwhile
                sum(range(100))  # bytecode, where a due Python-level handler runs

        os.register_at_fork(before=before)
        outcome = "lost"
        try:
            {call}
        except KeyboardInterrupt:
            outcome = "raised"
        for pid in procutil.children():
            os.waitpid(pid, 0)
        helper.join()
        print(outcome, signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """).format(call=call))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["raised", "True"], proc.stderr
    assert "Exception ignored" not in proc.stderr


def test_a_signal_handler_set_by_an_at_fork_hook_stays_with_threads_running():
    # Held signals get their handler back after the hooks, unless a hook set
    # one of its own: here SIG_DFL, whose default action ends the process.
    proc = procutil.run_python(textwrap.dedent("""
        import os, signal, threading, warnings, fastfork
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        signal.signal(signal.SIGUSR1, lambda *args: print("handled"))
        release = threading.Event()
        idle = threading.Thread(target=release.wait, daemon=True)
        idle.start()
        os.register_at_fork(before=lambda: signal.signal(signal.SIGUSR1, signal.SIG_DFL))
        pid = fastfork.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print(signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, flush=True)
        signal.raise_signal(signal.SIGUSR1)  # its default action ends the process
        print("survived")
    """))
    assert proc.stdout.split() == ["True"], proc.stderr
    assert proc.returncode == -signal.SIGUSR1, proc.stderr


@FORKS
def test_fork_waits_for_a_thread_holding_the_import_lock(fork, reaper):
    # CPython's test_fork1.test_threaded_import_lock_fork: the child must see
    # the complete module, never the partial one.
    name = "fastfork_test_fake_module"
    started = threading.Event()

    def importer():
        _imp.acquire_lock()
        try:
            sys.modules[name] = "partial"
            started.set()
            time.sleep(0.05)  # give the main thread time to reach fork()
            sys.modules[name] = "complete"
        finally:
            _imp.release_lock()

    t = threading.Thread(target=importer)
    t.start()
    try:
        started.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = fork_and(fork, lambda: 42 if __import__(name) == "complete" else 1)
        reaper.append(pid)
        t.join()
        assert exitcode(os.waitpid(pid, 0)[1]) == 42
    finally:
        t.join()
        sys.modules.pop(name, None)


@FORKS
def test_fork_while_a_thread_is_stuck_importing(fork, reaper, tmp_path, monkeypatch):
    # A thread sits inside a module's import (holding that module's import
    # lock); the child must still be able to import another module.
    gate = types.ModuleType("fastfork_test_gate")
    gate.started, gate.release = threading.Event(), threading.Event()
    (tmp_path / "fastfork_test_blocking.py").write_text(
        "import sys\n"
        "sys.modules['fastfork_test_gate'].started.set()\n"
        "sys.modules['fastfork_test_gate'].release.wait()\n")
    (tmp_path / "fastfork_test_other.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "fastfork_test_gate", gate)
    t = threading.Thread(target=__import__, args=("fastfork_test_blocking",))
    t.start()
    try:
        gate.started.wait()

        def child():
            import fastfork_test_other
            return fastfork_test_other.VALUE

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = fork_and(fork, child)
        reaper.append(pid)
        assert exitcode(fastfork.waitpid(pid, 0)[1]) == 42
    finally:
        gate.release.set()
        t.join()
        for mod in ("fastfork_test_blocking", "fastfork_test_other"):
            sys.modules.pop(mod, None)


def test_fork_reseeds_random_in_each_child(reaper):
    import random
    values = []
    for _ in range(2):
        r, w = os.pipe()
        pid = fastfork.fork()
        if pid == 0:
            try:
                os.write(w, repr(random.random()).encode())
            finally:
                os._exit(0)
        reaper.append(pid)
        os.close(w)
        with os.fdopen(r) as f:
            values.append(float(f.read()))
        assert fastfork.waitpid(pid, 0) == (pid, 0)
    assert values[0] != values[1]


def test_at_fork_hooks_run_like_os_fork():
    out = run_script("""
        import json, os, fastfork
        events = []
        for tag in ("1", "2"):
            os.register_at_fork(before=lambda t=tag: events.append("before" + t),
                                after_in_parent=lambda t=tag: events.append("parent" + t),
                                after_in_child=lambda t=tag: events.append("child" + t))
        seen = {}
        for name, fork in (("os", os.fork), ("fastfork", fastfork.fork)):
            del events[:]
            r, w = os.pipe()
            pid = fork()
            if pid == 0:
                os.write(w, json.dumps(events).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                child = json.loads(f.read())
            os.waitpid(pid, 0)
            seen[name] = {"parent": list(events), "child": child}
        print(json.dumps(seen))
    """)
    assert out["fastfork"] == out["os"]
    # before hooks run in reverse registration order, after hooks in order.
    assert out["fastfork"] == {"parent": ["before2", "before1", "parent1", "parent2"],
                               "child": ["before2", "before1", "child1", "child2"]}


def test_fork_raises_the_os_fork_audit_event():
    out = run_script("""
        import json, os, sys, fastfork
        seen, refuse = [], []
        def hook(event, args):
            if event == "os.fork":
                seen.append([event, list(args)])
                if refuse:
                    raise PermissionError("audit says no")
        sys.addaudithook(hook)
        out = {}
        for name, fork in (("os", os.fork), ("fastfork", fastfork.fork)):
            del seen[:]
            pid = fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            refuse.append(1)
            try:
                fork()
                refused = None
            except PermissionError as e:
                refused = str(e)
            refuse.clear()
            out[name] = [seen[:], refused]
        print(json.dumps(out))
    """)
    assert out["fastfork"] == out["os"]
    assert out["fastfork"] == [[["os.fork", []], ["os.fork", []]], "audit says no"]


SHUTDOWN_SCRIPT = """
import atexit, os, sys, fastfork
# Module globals may already be gone when __del__ runs at finalization: bind
# everything the handlers use as defaults.
fork = {{"os": os.fork, "fastfork": fastfork.fork}}["{which}"]

# The audit hook lives until the very end: give it its own globals, or it
# would keep __main__ (and the Finalized instance) alive past its __del__.
hook_globals = {{"write": os.write}}
exec("def audit(event, args):\\n"
     "    if event == 'os.fork':\\n"
     "        write(1, b'audit\\\\n')\\n", hook_globals)
audit = hook_globals.pop("audit")

def attempt(fork=fork, os=os, BaseException=BaseException, type=type):
    try:
        pid = fork()
    except BaseException as e:
        os.write(1, f"raised {{type(e).__name__}}: {{e}}\\n".encode())
        return
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    os.write(1, b"forked\\n")

sys.addaudithook(audit)
if "{when}" == "atexit":
    atexit.register(attempt)
else:
    class Finalized:
        def __del__(self, attempt=attempt):
            attempt()
    Finalized.instance = Finalized()  # freed while the interpreter finalizes
"""


@pytest.mark.parametrize("when", ["atexit", "finalization"])
def test_fork_at_interpreter_shutdown_behaves_like_os(when):
    outcome = {}
    for which in ("os", "fastfork"):
        proc = procutil.run_python(SHUTDOWN_SCRIPT.format(which=which, when=when))
        assert proc.returncode == 0, proc.stderr
        outcome[which] = proc.stdout.strip()
    if when == "atexit" and (3, 12, 0) <= sys.version_info[:3] < (3, 12, 2):
        # 3.12.0/3.12.1 refused fork in atexit handlers, a regression fixed by
        # gh-113964; fastfork follows the fixed behaviour.
        assert outcome["fastfork"] == "audit\nforked"
        return
    assert outcome["fastfork"] == outcome["os"]
    if when == "finalization" and sys.version_info >= (3, 12):
        # Refused before the audit event is raised.
        name = "PythonFinalizationError" if sys.version_info >= (3, 13) else "RuntimeError"
        assert outcome["fastfork"] == f"raised {name}: can't fork at interpreter shutdown"
    else:
        assert outcome["fastfork"] == "audit\nforked"


def test_fork_call_refuses_and_wait4_works_at_interpreter_shutdown():
    # The library never starts a child while the interpreter finalizes, on any
    # version (os.fork still does on 3.10/3.11); reaping one still works.
    proc = procutil.run_python(textwrap.dedent("""
        import os, fastfork
        from fastfork import _core
        pid = os.fork()
        if pid == 0:
            os._exit(3)

        class Finalized:
            def __del__(self, os=os, fork_call=_core.fork_call, wait4=fastfork.wait4,
                        RuntimeError=RuntimeError, pid=pid):
                registry = []
                try:
                    fork_call(lambda: 0, registry)
                    refused = "forked"
                except RuntimeError as e:
                    refused = str(e)
                got, status, ru = wait4(pid, 0)
                os.write(1, f"{refused}|{registry}|{got == pid}|{status >> 8}|{ru.ru_maxrss > 0}".encode())
        Finalized.instance = Finalized()
    """))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "can't fork at interpreter shutdown|[]|True|3|True", proc.stderr


def test_fork_failure_raises_blocking_io_error_like_os():
    # A pids cgroup full to its limit makes fork() fail with EAGAIN (root
    # ignores RLIMIT_NPROC). A live thread makes 3.12+ warn even so, as os does.
    if not os.access("/sys/fs/cgroup/pids", os.W_OK):
        pytest.skip("no writable pids cgroup")
    out = run_script("""
        import json, os, threading, warnings, fastfork
        base = "/sys/fs/cgroup/pids"
        with open("/proc/self/cgroup") as f:
            home = [l.split(":", 2)[2].strip() for l in f if l.split(":")[1] == "pids"][0]
        cg = f"{base}/fastfork-coretests-{os.getpid()}"
        os.mkdir(cg)
        release = threading.Event()
        t = threading.Thread(target=release.wait)
        t.start()
        out = {}
        try:
            with open(cg + "/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            try:
                with open(cg + "/pids.current") as f:
                    current = f.read().strip()
                with open(cg + "/pids.max", "w") as f:
                    f.write(current)
                for name, fork in (("os", os.fork), ("fastfork", fastfork.fork)):
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        try:
                            pid = fork()
                        except OSError as e:
                            result = [type(e).__name__, e.errno, e.strerror]
                        else:
                            if pid == 0:
                                os._exit(0)
                            os.waitpid(pid, 0)
                            result = "forked"
                    out[name] = [result, [str(w.message).replace(str(os.getpid()), "PID")
                                          for w in caught]]
            finally:
                with open(f"{base}{home}/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
        finally:
            release.set()
            t.join()
            os.rmdir(cg)
        print(json.dumps(out))
    """)
    assert out["fastfork"] == out["os"]
    assert out["fastfork"][0] == ["BlockingIOError", 11, os.strerror(11)]
    assert len(out["fastfork"][1]) == (1 if sys.version_info >= (3, 12) else 0)


# ------------------------------------------------------------------ wait family


def test_waitpid_exit_and_signal_statuses_match_os(reaper):
    cases = [lambda c=c: c for c in (0, 1, 42, 255)]
    for body in cases:
        a, b = twins(body, reaper)
        ra, rb = os.waitpid(a, 0), fastfork.waitpid(b, 0)
        assert type(rb) is tuple and [type(x) for x in rb] == [int, int]
        assert (rb[0], exitcode(rb[1])) == (b, exitcode(ra[1])) == (b, body())
        assert rb[1] == ra[1]
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1):
        def body(sig=sig):
            if sig != signal.SIGKILL:
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            time.sleep(60)
            return 1
        a, b = twins(body, reaper)
        ra, rb = os.waitpid(a, 0), fastfork.waitpid(b, 0)
        assert rb == (b, ra[1])
        assert exitcode(rb[1]) == -sig


def test_waitpid_stopped_and_continued_statuses_match_os(reaper):
    statuses = []
    for fork, waitpid in ((os.fork, os.waitpid), (fastfork.fork, fastfork.waitpid)):
        r, w = os.pipe()
        pid = fork()
        if pid == 0:
            try:
                os.close(w)
                os.kill(os.getpid(), signal.SIGSTOP)
                os.read(r, 1)
            finally:
                os._exit(5)
        reaper.append(pid)
        os.close(r)
        stopped = waitpid(pid, os.WUNTRACED)
        os.kill(pid, signal.SIGCONT)
        continued = waitpid(pid, os.WCONTINUED)
        os.close(w)
        exited = waitpid(pid, 0)
        statuses.append([s for _, s in (stopped, continued, exited)])
        assert [p for p, _ in (stopped, continued, exited)] == [pid] * 3
    assert statuses[0] == statuses[1]
    stopped, continued, exited = statuses[1]
    assert os.WIFSTOPPED(stopped) and os.WSTOPSIG(stopped) == signal.SIGSTOP
    assert os.WIFCONTINUED(continued)
    assert exitcode(exited) == 5


def test_wnohang_with_nothing_ready_returns_zeros_like_os(reaper):
    pid, w = blocked_child(os.fork, reaper, code=3)
    try:
        assert fastfork.waitpid(pid, os.WNOHANG) == os.waitpid(pid, os.WNOHANG) == (0, 0)
        got, want = fastfork.wait3(os.WNOHANG), os.wait3(os.WNOHANG)
        assert got == want and got[:2] == (0, 0) and all(v == 0 for v in got[2])
        assert type(got[2]) is resource.struct_rusage
        got, want = fastfork.wait4(pid, os.WNOHANG), os.wait4(pid, os.WNOHANG)
        assert got == want and got[:2] == (0, 0) and all(v == 0 for v in got[2])
        assert type(got[2]) is resource.struct_rusage
    finally:
        os.close(w)
    assert exitcode(fastfork.waitpid(pid, 0)[1]) == 3


def _busy_child():
    # Some page faults and CPU time so the rusage fields are not all zero.
    sum(len(bytearray(4096)) for _ in range(2000))
    return 9


@pytest.mark.parametrize("call", [
    pytest.param(lambda pid: os.wait4(pid, 0), id="os.wait4"),
    pytest.param(lambda pid: fastfork.wait4(pid, 0), id="fastfork.wait4"),
    pytest.param(lambda pid: os.wait3(0), id="os.wait3"),
    pytest.param(lambda pid: fastfork.wait3(0), id="fastfork.wait3"),
])
def test_wait3_wait4_rusage_is_the_childs(call, reaper):
    # The kernel adds a reaped child's usage to RUSAGE_CHILDREN: the delta
    # across the call must equal the struct_rusage returned, field by field.
    pid = fork_and(os.fork, _busy_child)
    reaper.append(pid)
    assert procutil.children() == {pid}
    while procutil.state(pid) != "Z":
        time.sleep(0.001)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    got_pid, status, ru = call(pid)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (got_pid, exitcode(status)) == (pid, 9)
    assert type(ru) is resource.struct_rusage
    assert [type(v) for v in ru] == [float, float] + [int] * 14
    for field in ("ru_minflt", "ru_majflt", "ru_inblock", "ru_oublock", "ru_nvcsw",
                  "ru_nivcsw", "ru_nswap", "ru_nsignals"):
        assert getattr(after, field) - getattr(before, field) == getattr(ru, field), field
    for field in ("ru_utime", "ru_stime"):
        assert math.isclose(getattr(after, field) - getattr(before, field),
                            getattr(ru, field), abs_tol=2e-6), field
    assert ru.ru_minflt > 0 and ru.ru_maxrss > 0


@pytest.mark.parametrize("wait", [os.wait, fastfork.wait], ids=["os", "fastfork"])
def test_wait_reaps_any_child(wait, reaper):
    pid = fork_and(fastfork.fork, lambda: 17)
    reaper.append(pid)
    assert procutil.children() == {pid}
    got = wait()
    assert type(got) is tuple and got[0] == pid and exitcode(got[1]) == 17
    with pytest.raises(ChildProcessError) as err:
        wait()
    assert err.value.errno == 10


class Index:
    """An integer-like object (has __index__), accepted where os accepts ints."""

    def __index__(self):
        return -1


BAD_CALLS = [
    ("waitpid", ("x", 0)), ("waitpid", (1.5, 0)), ("waitpid", (None, 0)),
    ("waitpid", (1, "x")), ("waitpid", (1, 0.0)), ("waitpid", (2**40, 0)),
    ("waitpid", (-2**40, 0)), ("waitpid", (1, 2**40)), ("waitpid", (1,)), ("waitpid", ()),
    ("waitpid", (1, 0, 0)),
    ("waitpid", (1, 0)), ("waitpid", (0, 0)), ("waitpid", (-1, 0)), ("waitpid", (-1, os.WNOHANG)),
    ("waitpid", (Index(), 0)), ("waitpid", (2**31 - 1, 0)), ("waitpid", (1, 0x7fff0000)),
    ("wait", ()), ("wait", (0,)),
    ("wait3", (0,)), ("wait3", (os.WNOHANG,)), ("wait3", ("x",)), ("wait3", (1.0,)),
    ("wait3", (2**40,)), ("wait3", (0x7fff0000,)), ("wait3", ()),
    ("wait4", (1, 0)), ("wait4", (-1, os.WNOHANG)), ("wait4", ("x", 0)), ("wait4", (1.0, 0)),
    ("wait4", (2**40, 0)), ("wait4", (1, 0x7fff0000)), ("wait4", (1,)),
    ("fork", (1,)),
]


@pytest.mark.parametrize("name,args", BAD_CALLS, ids=[f"{n}{a!r}" for n, a in BAD_CALLS])
def test_bad_calls_fail_like_os(name, args):
    # No children here: every call that gets past argument checking is ECHILD/EINVAL.
    outcome = []
    for mod in (os, fastfork):
        try:
            outcome.append(("returned", getattr(mod, name)(*args)))
        except Exception as e:
            outcome.append((type(e), getattr(e, "errno", None)))
    assert outcome[1] == outcome[0]
    assert outcome[1][0] != "returned"  # every case here fails


def test_keyword_arguments_accepted_like_os():
    for mod in (os, fastfork):
        with pytest.raises(TypeError):
            mod.waitpid(pid=1, options=0)  # positional-only
        with pytest.raises(ChildProcessError):
            mod.wait3(options=0)
        with pytest.raises(ChildProcessError):
            mod.wait4(pid=1, options=0)


@pytest.mark.parametrize("code", [0, 1, 42, 255, 256, 257, -1, 2**31 - 1, -2**31,
                                  2**31, "1", 1.5, None, Index()])
def test_exit_codes_and_argument_errors_like_os(code, reaper):
    def child(exit_fn):
        def body():
            try:
                exit_fn(code)
            except TypeError:
                return 200
            except OverflowError:
                return 201
            return 202
        return body

    a = fork_and(os.fork, child(os._exit))
    b = fork_and(fastfork.fork, child(fastfork._exit))
    reaper.extend([a, b])
    sa, sb = os.waitpid(a, 0)[1], os.waitpid(b, 0)[1]
    assert sb == sa


def test_exit_skips_cleanup_and_buffers(reaper, tmp_path):
    # Like os._exit: no atexit handlers, no flushing of Python buffers.
    out = tmp_path / "out"
    for exit_fn in (os._exit, fastfork._exit):
        def body(exit_fn=exit_fn):
            import atexit
            f = open(out, "a", buffering=1 << 16)
            f.write("lost")
            atexit.register(lambda: open(out, "a").write("atexit"))
            exit_fn(4)
        pid = fork_and(fastfork.fork, body)
        reaper.append(pid)
        assert exitcode(os.waitpid(pid, 0)[1]) == 4
    assert not out.exists() or out.read_text() == ""


# ------------------------------------------------------------------ signals


EINTR_SCRIPT = """
import json, os, signal, time, fastfork
hits = 0
def count(signum, frame):
    global hits
    hits += 1
signal.signal(signal.SIGALRM, count)

def blocked(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "S"

def child(code):
    parent = os.getpid()
    pid = os.fork()  # interval timers are not inherited across fork
    if pid == 0:
        # Exit 0.1 s after the parent is asleep in its wait (however late
        # a loaded machine lets it get there), so SIGALRMs land in the call.
        while not blocked(parent):
            time.sleep(0.001)
        time.sleep(0.1)
        os._exit(code)
    return pid

def first(r):
    return list(r[:2])

calls = {
    "os.waitpid": lambda p: first(os.waitpid(p, 0)),
    "waitpid": lambda p: first(fastfork.waitpid(p, 0)),
    "os.wait": lambda p: first(os.wait()),
    "wait": lambda p: first(fastfork.wait()),
    "os.wait3": lambda p: first(os.wait3(0)),
    "wait3": lambda p: first(fastfork.wait3(0)),
    "os.wait4": lambda p: first(os.wait4(p, 0)),
    "wait4": lambda p: first(fastfork.wait4(p, 0)),
    "reap": lambda p: list(fastfork.reap([p])[0]),
    "reap_timeout": lambda p: list(fastfork.reap([p], timeout=30)[0]),
}
out = {}
for code, (name, call) in enumerate(calls.items(), start=1):
    pid = child(code)
    hits = 0
    signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
    try:
        got = call(pid)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
    out[name] = [got == [pid, code << 8], hits]

# A timeout that expires while interrupted returns what finished: nothing.
# (This child exits only when told, however late a loaded machine runs it.)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    os.read(r, 1)
    os._exit(99)
os.close(r)
hits = 0
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
try:
    early = fastfork.reap([pid], timeout=0.2)
finally:
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
os.close(w)
out["reap_expired"] = [early == [] and fastfork.reap([pid]) == [(pid, 99 << 8)], hits]
print(json.dumps(out))
"""


def test_eintr_from_an_interval_timer_during_every_wait_call():
    # The handler count only grows past 1 if handlers run while the call is
    # blocked (repeated SIGALRMs coalesce while no handler runs).
    out = run_script(EINTR_SCRIPT)
    assert set(out) == {"os.waitpid", "waitpid", "os.wait", "wait", "os.wait3", "wait3",
                        "os.wait4", "wait4", "reap", "reap_timeout", "reap_expired"}
    for name, (right_result, hits) in out.items():
        assert right_result, name
        assert hits >= 2, (name, hits)


def test_keyboard_interrupt_during_a_blocked_wait_propagates():
    out = run_script("""
        import json, os, signal, fastfork
        def interrupt(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, interrupt)
        calls = {
            "os.waitpid": lambda p: os.waitpid(p, 0),
            "waitpid": lambda p: fastfork.waitpid(p, 0),
            "wait": lambda p: fastfork.wait(),
            "wait3": lambda p: fastfork.wait3(0),
            "wait4": lambda p: fastfork.wait4(p, 0),
            "reap": lambda p: fastfork.reap([p]),
            "reap_timeout": lambda p: fastfork.reap([p], timeout=30),
        }
        out = {}
        for name, call in calls.items():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(3)
            os.close(r)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            try:
                call(pid)
                what = "returned"
            except KeyboardInterrupt:
                what = "KeyboardInterrupt"
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().rpartition(")")[2].split()[0] != "Z"
            os.close(w)
            out[name] = [what, alive, os.waitstatus_to_exitcode(fastfork.waitpid(pid, 0)[1])]
        print(json.dumps(out))
    """)
    assert out == {name: ["KeyboardInterrupt", True, 3] for name in
                   ("os.waitpid", "waitpid", "wait", "wait3", "wait4", "reap", "reap_timeout")}


def test_sigchld_ignored_gives_child_process_error_like_os():
    out = run_script("""
        import json, os, signal, fastfork
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
        calls = {
            "os.waitpid": lambda p: os.waitpid(p, 0),
            "waitpid": lambda p: fastfork.waitpid(p, 0),
            "os.wait": lambda p: os.wait(),
            "wait": lambda p: fastfork.wait(),
            "os.wait3": lambda p: os.wait3(0),
            "wait3": lambda p: fastfork.wait3(0),
            "os.wait4": lambda p: os.wait4(p, 0),
            "wait4": lambda p: fastfork.wait4(p, 0),
            "reap": lambda p: fastfork.reap([p]),
            "reap_timeout": lambda p: fastfork.reap([p], timeout=30),
        }
        out = {}
        for name, call in calls.items():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            try:
                call(pid)
                out[name] = "returned"
            except ChildProcessError as e:
                out[name] = [type(e).__name__, e.errno, getattr(e, "pids", [pid]) == [pid],
                             getattr(e, "reaped", [])]
        print(json.dumps(out))
    """)
    assert len(out) == 10
    assert all(v == ["ChildProcessError", 10, True, []] for v in out.values()), out


# ------------------------------------------------------------------ reap


def test_reap_returns_pairs_in_the_order_given(reaper):
    pids = [fork_and(fastfork.fork, lambda c=c: c) for c in range(10)]
    reaper.extend(pids)
    order = pids[::2] + pids[1::2]
    got = fastfork.reap(order)
    assert type(got) is list and all(type(p) is tuple for p in got)
    assert [p for p, _ in got] == order
    assert [exitcode(s) for _, s in got] == [pids.index(p) for p in order]


def test_reap_never_reaps_a_pid_not_listed(reaper):
    listed = [fork_and(fastfork.fork, lambda: 1) for _ in range(2)]
    other = fork_and(fastfork.fork, lambda: 2)
    reaper.extend(listed + [other])
    assert [exitcode(s) for _, s in fastfork.reap(listed)] == [1, 1]
    while procutil.state(other) != "Z":
        time.sleep(0.001)
    assert procutil.state(other) == "Z"  # exited but not reaped by reap(listed)
    assert exitcode(os.waitpid(other, 0)[1]) == 2


@pytest.mark.parametrize("args,error", [
    (([5, 5],), ValueError), (([0],), ValueError), (([-1],), ValueError),
    (([1, -3],), ValueError), ((["7"],), TypeError), (([1.5],), TypeError),
    (([None],), TypeError), ((5,), TypeError), (([2**40],), OverflowError),
    (([1], -1), ValueError), (([1], math.nan), ValueError), (([1], math.inf), ValueError),
    (([1], -math.inf), ValueError), (([1], "1"), TypeError), (([1], [1]), TypeError),
])
def test_reap_rejects_bad_arguments_before_waiting(args, error, reaper):
    # A real, already exited child listed first must stay unreaped.
    pid = fork_and(fastfork.fork, lambda: 0)
    reaper.append(pid)
    while procutil.state(pid) != "Z":
        time.sleep(0.001)
    pids, *rest = args
    if isinstance(pids, list):
        pids = [pid] + pids
    with pytest.raises(error):
        fastfork.reap(pids, *rest)
    assert procutil.state(pid) == "Z"
    assert os.waitpid(pid, 0) == (pid, 0)


def test_a_pid_beyond_pid_t_closes_no_fd():
    # reap() once closed whatever numbers the memory of its unfilled pidfd
    # slots held when a pid overflowed pid_t: stdout and the held fds among them.
    out = run_script("""
        import json, os, fastfork
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1000)]
        not_children = list(range(10**6, 10**6 + 300))
        for n in range(1, 300):
            try:
                fastfork.reap([pid, 2**40] + not_children[:n])
            except OverflowError:
                pass
            try:
                fastfork.reap(not_children[:n], timeout=0)  # leaves freed arrays behind
            except ChildProcessError:
                pass
        closed = []
        for fd in [0, 1, 2] + held:
            try:
                os.fstat(fd)
            except OSError:
                closed.append(fd)
        print(json.dumps([closed, fastfork.reap([pid]) == [(pid, 0)]]))
    """)
    assert out == [[], True]


def test_reap_empty_and_timeout_zero(reaper):
    assert fastfork.reap([]) == [] == fastfork.reap([], timeout=0)
    pid, w = blocked_child(fastfork.fork, reaper, code=6)
    try:
        assert fastfork.reap([pid], timeout=0) == []
        assert fastfork.reap((p for p in [pid]), timeout=0.0) == []
    finally:
        os.close(w)
    assert fastfork.reap([pid], timeout=30) == [(pid, 6 << 8)]


def test_reap_not_our_child_keeps_partial_results(reaper):
    gone = fork_and(fastfork.fork, lambda: 0)
    os.waitpid(gone, 0)  # already reaped: ECHILD from now on
    kids = [fork_and(fastfork.fork, lambda c=c: c) for c in (3, 4)]
    reaper.extend(kids)
    for timeout in (None, 30):
        batch = [kids.pop(0), 1, gone] if timeout is None else [1, kids.pop(0)]
        with pytest.raises(ChildProcessError) as err:
            fastfork.reap(batch, timeout)
        assert err.value.errno == 10 and isinstance(err.value, OSError)
        assert err.value.pids == [p for p in batch if p in (1, gone)]
        (child,) = [p for p in batch if p not in (1, gone)]
        assert err.value.reaped == [(child, (3 if timeout is None else 4) << 8)]


def test_reap_with_timeout_returns_only_finished_children(reaper):
    quick = [fork_and(fastfork.fork, lambda: 1) for _ in range(3)]
    reaper.extend(quick)
    slow, w = blocked_child(fastfork.fork, reaper, code=2)
    try:
        for pid in quick:  # finished before the call, however loaded the machine
            while procutil.state(pid) != "Z":
                time.sleep(0.001)
        got = fastfork.reap([quick[0], slow] + quick[1:], timeout=0.2)
        assert got == [(p, 1 << 8) for p in quick]
        assert procutil.state(slow) not in (None, "Z")  # still running, untouched
    finally:
        os.close(w)
    assert fastfork.reap([slow], timeout=30) == [(slow, 2 << 8)]


def test_reap_a_large_batch(reaper):
    # 500 children wait on one pipe; reap (pidfd path) is already blocked when
    # a thread closes the last write end, so every exit is seen while waiting.
    n = 500
    r, w = os.pipe()
    pids = []
    for i in range(n):
        pid = fastfork.fork()
        if pid == 0:
            try:
                os.close(w)
                os.read(r, 1)
            finally:
                os._exit(i % 256)
        pids.append(pid)
    reaper.extend(pids)
    os.close(r)
    first_half = fastfork.reap(pids[:10], timeout=0)
    assert first_half == []
    closer = threading.Timer(0.05, os.close, args=(w,))
    closer.start()
    try:
        got = fastfork.reap(pids[: n // 2], timeout=60)
    finally:
        closer.join()
    got += fastfork.reap(pids[n // 2:])
    assert [p for p, _ in got] == pids
    assert [exitcode(s) for _, s in got] == [i % 256 for i in range(n)]


@pytest.mark.parametrize("call", [
    pytest.param(lambda pid: fastfork.reap([pid]), id="reap"),
    pytest.param(lambda pid: fastfork.reap([pid], timeout=60), id="reap_timeout"),
    pytest.param(lambda pid: [fastfork.waitpid(pid, 0)], id="waitpid"),
    pytest.param(lambda pid: [fastfork.wait4(pid, 0)[:2]], id="wait4"),
])
def test_blocking_waits_release_the_gil(call, reaper):
    # The child exits 0 only if a Python thread makes progress while the call
    # blocks; if the GIL were held it would give up after 10 s and exit 1.
    r, w = os.pipe()
    pid = fastfork.fork()
    if pid == 0:
        try:
            os.close(w)
            import select
            ready, _, _ = select.select([r], [], [], 10)
        finally:
            os._exit(0 if ready else 1)
    reaper.append(pid)
    os.close(r)
    main = threading.get_ident()

    def worker():
        # Once the main thread's innermost frame is the lambda, it is in (or
        # about to enter) the C call; sleeping then hands the GIL over, and the
        # worker only wakes again if the call releases it.
        while sys._current_frames()[main].f_code is not call.__code__:
            time.sleep(0.001)
        for _ in range(5):
            time.sleep(0.01)
        os.write(w, b"x")

    t = threading.Thread(target=worker)
    try:
        t.start()
        got = call(pid)
    finally:
        t.join()
        os.close(w)
    assert got == [(pid, 0)]


def test_reap_timeout_without_pidfds_falls_back_to_polling():
    # With the fd table full, pidfd_open fails (EMFILE) part-way: the first
    # pending child gets the one free slot, the next does not.
    out = run_script("""
        import json, os, resource, fastfork
        r, w = os.pipe()
        pids = []
        for code in (1, 2, 3):
            pid = os.fork()
            if pid == 0:
                os.close(w)
                if code != 1:
                    os.read(r, 1)
                os._exit(code)
            pids.append(pid)
        os.close(r)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        fillers = []
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(fillers.pop())
        partial = fastfork.reap(pids, timeout=0.2)
        os.close(w)
        rest = fastfork.reap(pids[1:], timeout=30)
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # listdir's own fd
                pass
        print(json.dumps([partial == [(pids[0], 1 << 8)],
                          rest == [(pids[1], 2 << 8), (pids[2], 3 << 8)],
                          [link for link in links if "pidfd" in link]]))
    """)
    assert out == [True, True, []]  # right results, no pidfd left open


def test_reap_huge_timeout_does_not_overflow(reaper):
    pid = fork_and(fastfork.fork, lambda: 8)
    reaper.append(pid)
    assert fastfork.reap([pid], timeout=1e300) == [(pid, 8 << 8)]


# ------------------------------------------------------------------ fork_call


class Boom(BaseException):
    pass


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("fn,code", [
    (lambda: 0, 0), (lambda: 7, 7), (lambda: 255, 255),
    (lambda: None, 70), (lambda: "3", 70), (lambda: 256, 70), (lambda: -1, 70),
    (lambda: 3.0, 70), (_raise(SystemExit(0)), 70), (_raise(SystemExit(4)), 70),
    (_raise(KeyboardInterrupt()), 70), (_raise(Boom()), 70), (_raise(ValueError()), 70),
    (lambda: os._exit(12), 12),
], ids=["0", "7", "255", "None", "str", "256", "-1", "float", "SystemExit0", "SystemExit4",
        "KeyboardInterrupt", "BaseException", "ValueError", "os._exit"])
def test_fork_call_child_never_returns(fn, code, reaper):
    me = os.getpid()
    registry = [123]
    pid = _core.fork_call(fn, registry)
    if os.getpid() != me:  # the child came back from fork_call: a bug
        os._exit(99)
    reaper.append(pid)
    assert registry == [123, pid]
    assert type(pid) is int and pid > 0
    assert exitcode(fastfork.waitpid(pid, 0)[1]) == code


@pytest.mark.parametrize("args,error", [
    ((None, []), TypeError), ((42, []), TypeError), ((lambda: 0, ()), TypeError),
    ((lambda: 0, None), TypeError), ((lambda: 0, {}), TypeError),
    ((lambda: 0, [], 9.0), TypeError), ((lambda: 0, [], "9"), TypeError),
    ((lambda: 0, [], -1), ValueError), ((lambda: 0, [], signal.NSIG), ValueError),
    ((lambda: 0, [], 2**40), OverflowError),
])
def test_fork_call_rejects_bad_arguments_before_forking(args, error):
    before = procutil.children()
    with pytest.raises(error):
        _core.fork_call(*args)
    assert procutil.children() == before
    assert args[1] in ([], (), None, {})  # nothing recorded


def test_fork_call_pdeathsig_kills_the_child_when_its_parent_dies():
    # A middle process fork_calls a grandchild and exits. This interpreter is a
    # child subreaper, so the orphaned grandchild is reparented to it and its
    # real status is reaped here: SIGKILL with pdeathsig; its own exit (5, once
    # released) without; 70 when the middle died before the grandchild could
    # ask for the signal (forced with an at-fork hook that waits for that).
    out = run_script("""
        import ctypes, json, os, signal, time, fastfork
        from fastfork import _core
        PR_SET_CHILD_SUBREAPER = 36
        assert ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        out = {}
        for case, sig in (("kill", signal.SIGKILL), ("none", 0), ("died_first", signal.SIGKILL)):
            hold_r, hold_w = os.pipe()  # the grandchild waits on this
            info_r, info_w = os.pipe()  # the middle reports the grandchild's pid
            ready_r, ready_w = os.pipe()  # the grandchild is running fn
            middle = os.fork()
            if middle == 0:
                gc, registry = None, []
                try:
                    os.close(info_r)
                    me = os.getpid()
                    def grandchild():
                        for fd in (info_w, hold_w):
                            os.close(fd)
                        os.write(ready_w, b"r")
                        os.read(hold_r, 1)
                        return 5
                    if case == "died_first":
                        def wait_for_orphaning():
                            while os.getppid() == me:
                                time.sleep(0.001)
                        os.register_at_fork(after_in_child=wait_for_orphaning)
                    gc = _core.fork_call(grandchild, registry, pdeathsig=sig)
                    if case != "died_first":
                        os.read(ready_r, 1)
                    os.write(info_w, str(gc).encode())
                finally:
                    os._exit(0 if registry == [gc] else 1)
            for fd in (info_w, hold_r, ready_r):
                os.close(fd)
            with os.fdopen(info_r) as f:
                gc = int(f.read())
            survived = None
            try:
                middle_code = os.waitstatus_to_exitcode(fastfork.waitpid(middle, 0)[1])
                if case == "none":
                    with open(f"/proc/{gc}/stat") as f:
                        survived = f.read().rpartition(")")[2].split()[0] != "Z"
                    os.close(hold_w)
                    hold_w = None
                got = fastfork.reap([gc], timeout=10)
            finally:
                os.close(ready_w)
                if hold_w is not None:
                    os.close(hold_w)
                try:
                    os.kill(gc, signal.SIGKILL)
                    os.waitpid(gc, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            out[case] = [middle_code, survived, [os.waitstatus_to_exitcode(s) for _, s in got]]
        print(json.dumps(out))
    """)
    assert out == {"kill": [0, None, [-signal.SIGKILL]], "none": [0, True, [5]],
                   "died_first": [0, None, [70]]}


def test_fork_call_returns_pid_and_registry_in_parent(reaper):
    registry = []
    pid = _core.fork_call(lambda: 0, registry)
    reaper.append(pid)
    assert registry == [pid]
    assert fastfork.reap(registry) == [(pid, 0)]


def test_reap_interrupted_hands_over_what_it_already_reaped():
    # The slow child interrupts the parent once the parent is asleep inside
    # reap (it said so through the pipe, then its state turned to S): the
    # fast child has been reaped by then, whatever the machine's load.
    out = run_script("""
        import json, os, signal, time, fastfork
        reap = fastfork.reap  # imported now, not inside the interrupted call
        def interrupt(*args):
            raise KeyboardInterrupt
        signal.signal(signal.SIGUSR1, interrupt)
        reaping_r, reaping_w = os.pipe()
        fast = os.fork()
        if fast == 0:
            os._exit(3)
        slow = os.fork()
        if slow == 0:
            os.read(reaping_r, 1)
            parent = os.getppid()
            while True:
                with open(f"/proc/{parent}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] == "S":
                        break
            os.kill(parent, signal.SIGUSR1)
            time.sleep(30)
            os._exit(0)
        os.waitid(os.P_PID, fast, os.WEXITED | os.WNOWAIT)  # the fast child has exited
        os.write(reaping_w, b"r")
        try:
            reap([fast, slow])
            reaped = None
        except KeyboardInterrupt as exc:
            reaped = exc.reaped
        os.kill(slow, signal.SIGKILL)
        print(json.dumps([reaped == [(fast, 3 << 8)], reap([slow]) == [(slow, 9)]]))
    """)
    assert out == [True, True]


# ------------------------------------------------------------------ owned fds


def test_owned_fds_are_recorded_forgotten_and_closed():
    r, w = os.pipe()
    try:
        assert _core.own_fd(r) == r
        assert r in _core.owned_fds() and w not in _core.owned_fds()
        _core.disown_fd(r)
        assert r not in _core.owned_fds()
        _core.own_fd(w)
    finally:
        os.close(r)
    _core.close_owned(w)
    assert w not in _core.owned_fds()
    with pytest.raises(OSError) as info:
        _core.close_owned(w)  # closed already
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        _core.own_fd(-1)
    with pytest.raises(TypeError):
        _core.own_fd("3")


def owned_fd_seen_by_child(fd):
    """In a fastfork child: is ``fd`` still owned, and still open?"""
    try:
        os.fstat(fd)
        is_open = True
    except OSError:
        is_open = False
    return [fd in _core.owned_fds(), is_open]


def test_fastfork_children_close_every_owned_fd_first():
    r, w = os.pipe()
    _core.own_fd(r)
    try:
        assert fastfork.start(owned_fd_seen_by_child, r).result(timeout=30) == [False, False]
        assert fastfork.map(owned_fd_seen_by_child, [r]) == [[False, False]]
        assert r in _core.owned_fds()  # the parent's copy is untouched
    finally:
        _core.close_owned(r)
        os.close(w)
