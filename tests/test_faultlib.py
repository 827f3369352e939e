"""The fault-injection tools themselves work: shim, seccomp launcher, subreaper, cgroups."""
import json
import signal
import subprocess
import textwrap

import pytest

import faultlib


def run(code, **kwargs):
    """run_contained(code) expecting success; return the JSON the code printed last."""
    result = faultlib.run_contained(textwrap.dedent(code), **kwargs)
    return _check(result)


def _check(result):
    assert result.returncode == 0, result.stderr
    assert result.leftover == 0, "the code left processes behind"
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- shim

FORK_N_TIMES = """
import json, os, fastfork, faultlib
out = []
for i in range(6):
    fork = os.fork if i % 2 else fastfork.fork
    try:
        pid = fork()
    except OSError as exc:
        out.append(exc.errno)
        continue
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    out.append(0)
s = faultlib.shim()
print(json.dumps([out, s.calls("fork"), s.failures("fork")]))
"""


def test_shim_fails_os_fork_and_cython_fork_after_n_calls():
    result = faultlib.run_with_shim(FORK_N_TIMES, "fork", "EAGAIN", after=3)
    out, calls, failures = _check(result)
    assert out == [0, 0, 0, 11, 11, 11]
    assert (calls, failures) == (6, 3)


def test_shim_every_k_calls_with_a_budget():
    result = faultlib.run_with_shim(FORK_N_TIMES, "fork", "ENOMEM", after=1, every=2, count=2)
    out, calls, failures = _check(result)
    # Calls 3 and 5 fail (every 2nd after the first); the budget of 2 is then spent.
    assert out == [0, 0, 12, 0, 12, 0]
    assert failures == 2


def test_shim_eintr_on_waits_is_retried_by_python():
    code = """
    import json, os, fastfork, faultlib
    statuses = []
    waits = [
        lambda pid: os.waitpid(pid, 0)[1],
        lambda pid: fastfork.waitpid(pid, 0)[1],
        lambda pid: os.wait4(pid, 0)[1],
        lambda pid: fastfork.wait4(pid, 0)[1],
        lambda pid: fastfork.wait()[1],
        lambda pid: os.wait()[1],
        lambda pid: fastfork.wait3(0)[1],
        lambda pid: fastfork.reap([pid])[0][1],
    ]
    for code, wait in enumerate(waits):
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        statuses.append(os.waitstatus_to_exitcode(wait(pid)))
    s = faultlib.shim()
    print(json.dumps([statuses, {f: s.failures(f) for f in ("waitpid", "wait4", "wait", "wait3")}]))
    """
    result = faultlib.run_with_shim(textwrap.dedent(code), ["waitpid", "wait4", "wait", "wait3"],
                                    "EINTR", count=2)
    statuses, failures = _check(result)
    assert statuses == list(range(8))
    # Each function's first two calls were interrupted.
    assert failures == {"waitpid": 2, "wait4": 2, "wait": 2, "wait3": 2}, failures


def test_shim_controls_from_ctypes_and_owner_only():
    code = """
    import errno, json, os, faultlib
    s = faultlib.shim()
    assert not any(k.startswith("FF_SHIM_") for k in os.environ)
    s.arm(False)
    pid = os.fork()                # disarmed: works
    if pid == 0:
        # A forked child is not the owner: never injected into.
        os._exit(0 if os.fork() == 0 or True else 1)
    os.waitpid(pid, 0)
    s.arm(True)
    try:
        os.fork()
        failed = None
    except OSError as exc:
        failed = exc.errno
    s.configure("fork", errno.ENOMEM, after=0, every=1, count=1)
    try:
        os.fork()
    except OSError as exc:
        again = exc.errno
    pid = os.fork()                # the budget of one is spent
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print(json.dumps([failed, again, s.failures("fork")]))
    """
    result = faultlib.run_with_shim(textwrap.dedent(code), "fork", "EAGAIN", armed=False)
    # The grandchild the child forked was orphaned and reaped by the subreaper,
    # or is a leftover: either way the child itself was not injected into.
    assert result.returncode == 0, result.stderr
    failed, again, failures = __import__("json").loads(result.stdout.splitlines()[-1])
    assert (failed, again, failures) == (11, 12, 1)


def test_shim_covers_vfork_posix_spawn_and_pipes():
    code = """
    import json, os, subprocess
    out = {}
    for name, call in [
        ("subprocess", lambda: subprocess.run(["true"])),
        ("posix_spawn", lambda: os.posix_spawn("/bin/true", ["true"], os.environ)),
        ("posix_spawnp", lambda: os.posix_spawnp("true", ["true"], os.environ)),
        ("pipe", os.pipe),
    ]:
        try:
            call()
            out[name] = 0
        except OSError as exc:
            out[name] = exc.errno
    print(json.dumps(out))
    """
    result = faultlib.run_with_shim(
        textwrap.dedent(code), ["vfork", "fork", "posix_spawn", "posix_spawnp", "pipe2", "pipe"],
        "EMFILE")
    assert _check(result) == {"subprocess": 24, "posix_spawn": 24, "posix_spawnp": 24, "pipe": 24}


def test_shim_successful_vfork_still_runs_the_child():
    code = """
    import json, subprocess, faultlib
    out = subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout
    print(json.dumps([out, faultlib.shim().calls("vfork") + faultlib.shim().calls("fork")]))
    """
    out, calls = _check(faultlib.run_with_shim(textwrap.dedent(code), ["vfork", "fork"],
                                               "EAGAIN", after=100))
    assert out == "hi\n"
    assert calls >= 1


# ---------------------------------------------------------------- seccomp

def test_seccomp_blocks_every_way_to_create_a_process_but_not_threads():
    code = """
    import json, os, subprocess, threading, multiprocessing, fastfork
    out = {}
    t = threading.Thread(target=lambda: None)
    t.start(); t.join()
    for name, call in [
        ("os.fork", os.fork),
        ("fastfork.fork", fastfork.fork),
        ("subprocess", lambda: subprocess.run(["true"])),
        ("posix_spawn", lambda: os.posix_spawn("/bin/true", ["true"], os.environ)),
        ("multiprocessing", lambda: multiprocessing.get_context("fork").Process(target=int).start()),
    ]:
        try:
            call()
            out[name] = 0
        except OSError as exc:
            out[name] = exc.errno
    print(json.dumps(out))
    """
    for err, number in (("EAGAIN", 11), ("ENOMEM", 12)):
        out = _check(faultlib.run_with_seccomp(textwrap.dedent(code), err))
        assert out == dict.fromkeys(["os.fork", "fastfork.fork", "subprocess", "posix_spawn",
                                     "multiprocessing"], number)


def test_seccomp_clone3_errno_also_blocks_threads():
    code = """
    import json, threading
    try:
        threading.Thread(target=int).start()
        out = "started"
    except RuntimeError as exc:
        out = str(exc)
    print(json.dumps(out))
    """
    out = _check(faultlib.run_with_seccomp(textwrap.dedent(code), "EAGAIN", clone3_errno=True))
    assert out == "can't start new thread"


# ---------------------------------------------------------------- subreaper

def test_subreaper_reaps_and_counts_what_the_code_leaves_behind():
    code = """
    import os, time
    first = os.fork()
    if first == 0:                # a child that orphans a sleeping grandchild
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
    second = os.fork()
    if second == 0:               # a child never reaped: a zombie at exit
        os._exit(0)
    for pid in (first, second):   # wait until both have exited, leaving them unreaped
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    """
    result = faultlib.run_contained(textwrap.dedent(code))
    assert result.returncode == 0, result.stderr
    # The orphaned grandchild is alive; the first child is a zombie, the second too.
    assert result.leftover == 3
    assert result.leftover_zombies == 2


def test_subreaper_passes_on_exit_code_and_killing_signal():
    assert faultlib.run_contained("import os; os._exit(7)").returncode == 7
    assert faultlib.run_contained("import os; os.kill(os.getpid(), 9)").returncode == -9


def test_run_contained_timeout_kills_the_whole_tree():
    code = "import os, time\nos.fork(); os.fork(); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        faultlib.run_contained(code, timeout=1)


def test_pid_namespace_gives_a_private_ns_last_pid():
    code = """
    import json, os
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write("499")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print(json.dumps([os.getpid(), pid]))
    """
    assert run(code, launcher=faultlib.pid_namespace()) == [1, 500]


# ---------------------------------------------------------------- cgroups

def test_pids_cgroup_makes_the_fifth_fork_fail_with_eagain():
    with faultlib.pids_cgroup(5) as group:
        code = group.join_code + textwrap.dedent("""
        import json, faultlib
        print(json.dumps(faultlib.fork_until_failure(limit=10)))
        """)
        assert run(code) == [4, 11]
        # The pids controller doubles as a leak detector for all descendants.
        assert group.pids_current() == 0
        assert group.procs() == set()


def test_memory_cgroup_oom_kills_a_child_with_status_minus_9():
    with faultlib.memory_cgroup(64 << 20) as group:
        code = textwrap.dedent("""
        import json, os, fastfork
        pid = fastfork.fork()
        if pid == 0:
            with open(%r, "w") as f:
                f.write(str(os.getpid()))
            hog = []
            while True:
                hog.append(bytearray(1 << 20))
        print(json.dumps(os.waitstatus_to_exitcode(fastfork.waitpid(pid, 0)[1])))
        """ % f"{group.path}/cgroup.procs")
        assert run(code) == -signal.SIGKILL
        assert int(group.read("memory.failcnt")) > 0
