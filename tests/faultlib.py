"""Fault injection for the tests: C tools, contained child interpreters, cgroups.

- ``tools()`` compiles ``tests/faults/*.c`` once per session into a temporary
  directory (removed at exit); it skips the calling test if there is no ``cc``.
- ``run_contained(code)`` runs ``code`` in a fresh interpreter (the same
  environment as ``procutil.run_python``) under the ``subreaper`` launcher: this
  machine's init never reaps orphans, so everything the code leaves behind is
  killed and reaped there and counted in the result's ``leftover``. The
  interpreter starts with SIGINT and SIGTERM at their defaults (the subreaper
  resets them), so code that sends itself SIGINT gets KeyboardInterrupt even
  when the test run was started with SIGINT ignored.
- ``run_with_shim(code, funcs=..., errno=...)``: the same, with the LD_PRELOAD
  shim (``faults/shim.c``) making the named libc calls fail.
- ``run_with_seccomp(code, errno)``: the same, where no process can be created.
- ``pids_cgroup(n)`` / ``memory_cgroup(bytes)``: a temporary cgroup, removed on
  exit; its ``join_code`` moves the interpreter (or child) running it inside.
- Child-side helpers, for code running in those interpreters: ``shim()``
  (ctypes handle on the shim's controls), ``leak_report()`` and ``report()``;
  test side: ``contained()`` runs such code and checks what it reported.

Signals, rlimits and cgroups are only ever changed in those child interpreters,
never in the pytest process.
"""
import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import procutil

FAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")
_LEFTOVER = re.compile(r"^subreaper: leftover (\d+) \(zombie (\d+)\)\n", re.M)
_tools = None


class Tools:
    """Paths of the compiled tools: ``shim`` (.so), ``seccomp``, ``subreaper``."""

    def __init__(self, directory):
        self.dir = directory
        self.shim = os.path.join(directory, "libffshim.so")
        self.seccomp = os.path.join(directory, "seccomp_launcher")
        self.subreaper = os.path.join(directory, "subreaper")


def tools():
    """Return the compiled Tools, building them on first use.

    Skips the calling test if no C compiler is available; raises
    CalledProcessError (with the compiler's output) if one fails to build.
    """
    global _tools
    if _tools is not None:
        return _tools
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler (cc) to build the fault-injection tools")
    directory = tempfile.mkdtemp(prefix="fastfork-faults-")
    atexit.register(shutil.rmtree, directory, True)
    built = Tools(directory)
    jobs = [
        [cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", built.shim,
         os.path.join(FAULTS_DIR, "shim.c"), "-ldl"],
        [cc, "-O2", "-Wall", "-o", built.seccomp, os.path.join(FAULTS_DIR, "seccomp_launcher.c")],
        [cc, "-O2", "-Wall", "-o", built.subreaper, os.path.join(FAULTS_DIR, "subreaper.c")],
    ]
    for argv in jobs:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    _tools = built
    return built


child_env = procutil.child_env


def run_contained(code, *, launcher=(), env=None, timeout=60, input=None, unbuffered=True,
                  python=None):
    """Run ``code`` in a fresh interpreter under the subreaper (and ``launcher``).

    ``launcher`` is an argv prefix placed between the subreaper and the
    interpreter (e.g. the seccomp launcher). Returns a CompletedProcess (text)
    whose ``leftover`` is the number of descendants still there when the
    interpreter ended (killed and reaped by the subreaper) and ``leftover_zombies``
    how many of those were zombies; that report is removed from ``stderr``.
    On timeout everything is killed and reaped, then subprocess.TimeoutExpired
    is raised.
    """
    argv = [tools().subreaper, "--", *launcher, python or sys.executable, "-c", code]
    proc = subprocess.Popen(argv, env=child_env(env, unbuffered), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM makes the subreaper kill and reap the whole tree; SIGKILL
        # would orphan it to an init that never reaps.
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    match = _LEFTOVER.search(err)
    result.leftover = int(match.group(1)) if match else 0
    result.leftover_zombies = int(match.group(2)) if match else 0
    result.stderr = _LEFTOVER.sub("", err)
    return result


def shim_env(funcs, errno="EAGAIN", *, after=0, every=1, count=None, inherit=False,
             armed=True):
    """Environment variables that load and configure the shim (see faults/shim.c)."""
    if isinstance(funcs, str):
        funcs = [funcs]
    return {
        "LD_PRELOAD": tools().shim,
        "FF_SHIM_FUNCS": ",".join(funcs),
        "FF_SHIM_ERRNO": str(errno),
        "FF_SHIM_AFTER": str(after),
        "FF_SHIM_EVERY": str(every),
        "FF_SHIM_COUNT": str(-1 if count is None else count),
        "FF_SHIM_INHERIT": "1" if inherit else "0",
        "FF_SHIM_ARMED": "1" if armed else "0",
        # Only the interpreter, not the launchers that exec it, is the target.
        "FF_SHIM_EXE": os.path.realpath(sys.executable),
    }


def run_with_shim(code, funcs, errno="EAGAIN", *, after=0, every=1, count=None,
                  inherit=False, armed=True, env=None, **kwargs):
    """Run ``code`` contained, with the shim failing ``funcs`` with ``errno``.

    Per wrapped function: the first ``after`` calls succeed, then every
    ``every``-th call fails, at most ``count`` times (None: no limit). Only the
    interpreter itself is affected unless ``inherit``. ``armed=False`` starts
    with injection off (turn it on from the code with ``shim().arm(1)``).
    Other keyword arguments go to run_contained. Returns its CompletedProcess.
    """
    full_env = shim_env(funcs, errno, after=after, every=every, count=count,
                        inherit=inherit, armed=armed)
    full_env.update(env or {})
    return run_contained(code, env=full_env, **kwargs)


def run_with_seccomp(code, errno="EAGAIN", *, clone3_errno=False, **kwargs):
    """Run ``code`` contained, where creating any process fails with ``errno``.

    Threads still work (clone3 gets ENOSYS, so libc falls back to clone, whose
    flags the filter checks) unless ``clone3_errno``. Other keyword arguments go
    to run_contained. Returns its CompletedProcess.
    """
    launcher = [tools().seccomp] + (["--clone3-errno"] if clone3_errno else [])
    return run_contained(code, launcher=launcher + [str(errno), "--"], **kwargs)


# ---------------------------------------------------------------- cgroups

class Cgroup:
    """A cgroup v1 directory made by ``pids_cgroup``/``memory_cgroup``."""

    def __init__(self, path):
        self.path = path

    def read(self, name):
        """Return the stripped text of control file ``name``."""
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

    def write(self, name, value):
        """Write ``value`` to control file ``name``."""
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def procs(self):
        """Return the set of pids in the cgroup."""
        return {int(p) for p in self.read("cgroup.procs").split()}

    def pids_current(self):
        """Return ``pids.current`` (tasks charged, zombies included) of a pids cgroup."""
        return int(self.read("pids.current"))

    @property
    def join_code(self):
        """Python source that moves the process running it into this cgroup."""
        return (f"import os as _os\n"
                f"with open({os.path.join(self.path, 'cgroup.procs')!r}, 'w') as _f:\n"
                f"    _f.write(str(_os.getpid()))\n")


def _cgroup_parent(controller):
    """This process's own cgroup directory for ``controller`` (nest inside it)."""
    root = f"/sys/fs/cgroup/{controller}"
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return root + path.rstrip("/")
    return root


@contextlib.contextmanager
def _temporary_cgroup(controller, settings):
    parent = _cgroup_parent(controller)
    if not os.access(parent, os.W_OK):
        pytest.skip(f"cgroup v1 {controller} hierarchy {parent} is not writable")
    path = os.path.join(parent, f"fastfork-test-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(path)
    except OSError as exc:
        pytest.skip(f"cannot create a {controller} cgroup: {exc}")
    group = Cgroup(path)
    try:
        for name, value in settings.items():
            group.write(name, value)
        yield group
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group, timeout=10.0):
    """Kill whatever is still in ``group`` and remove it.

    Processes run by run_contained are reaped by its subreaper; rmdir only
    succeeds once every task has left (exited tasks leave at exit).
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            for pid in group.procs():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(group.path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def pids_cgroup(max_pids):
    """Context manager: a temporary pids cgroup allowing ``max_pids`` tasks.

    Yields a Cgroup (see ``pids_current()``); removed on exit. Skips
    the test where the pids hierarchy is not writable.
    """
    return _temporary_cgroup("pids", {"pids.max": max_pids})


def memory_cgroup(limit_bytes):
    """Context manager: a temporary memory cgroup limited to ``limit_bytes``.

    Exceeding the limit gets the largest process inside OOM-killed (SIGKILL).
    Yields a Cgroup, removed on exit; skips where not writable.
    """
    return _temporary_cgroup("memory", {"memory.limit_in_bytes": limit_bytes})


def pid_namespace():
    """Launcher prefix running the interpreter as init of a new pid namespace.

    Everything inside is killed when it exits; ``/proc/sys/kernel/ns_last_pid``
    is then private to the test. Skips where ``unshare`` is missing or fails.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    argv = [unshare, "--pid", "--fork", "--mount-proc"]
    if subprocess.run(argv + ["true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --pid --fork --mount-proc does not work here")
    return argv


# ---------------------------------------------------------------- child side

class _Shim:
    """The shim's controls, as seen from inside an interpreter that preloads it."""

    def __init__(self):
        lib = ctypes.CDLL(None)
        try:
            self._arm = lib.ff_shim_arm
        except AttributeError:
            raise RuntimeError("the fault-injection shim is not preloaded") from None
        self._calls = lib.ff_shim_calls
        self._failures = lib.ff_shim_failures
        self._configure = lib.ff_shim_configure
        for fn in (self._calls, self._failures):
            fn.restype = ctypes.c_long
            fn.argtypes = [ctypes.c_char_p]
        self._configure.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_long,
                                    ctypes.c_long, ctypes.c_long]

    def arm(self, on=True):
        """Turn injection on or off; return the previous state."""
        return bool(self._arm(int(bool(on))))

    def calls(self, name):
        """Calls of libc function ``name`` seen (since load or configure)."""
        return self._calls(name.encode())

    def failures(self, name):
        """Failures injected into ``name``."""
        return self._failures(name.encode())

    def configure(self, funcs, err, after=0, every=1, count=None):
        """Replace the policy and reset the counters (``err`` is an errno number)."""
        if not isinstance(funcs, str):
            funcs = ",".join(funcs)
        self._configure(funcs.encode(), err, after, every, -1 if count is None else count)


def shim():
    """Return the shim's controls; RuntimeError if it is not preloaded."""
    return _Shim()


def fork_until_failure(limit=10_000):
    """In a child interpreter: fastfork.fork until fork fails; kill and reap them all.

    Returns (how many children were forked, the errno of the failure or None).
    """
    import fastfork
    pids, err = [], None
    try:
        for _ in range(limit):
            pid = fastfork.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            pids.append(pid)
    except OSError as exc:
        err = exc.errno
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    fastfork.reap(pids)
    return len(pids), err


def exec_failure_cases(tmp_path):
    """Commands that cannot run, one per kind of exec failure: name -> spawn/Popen kwargs.

    ``args`` is the argv; files the cases need are made in ``tmp_path``.
    """
    noexec = tmp_path / "not-executable"
    noexec.write_text("#!/bin/sh\n")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01\x02 not a program\n")
    garbage.chmod(0o755)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    return {
        "ENOENT bare name": dict(args=["ff-no-such-program-x"]),
        "ENOENT path": dict(args=[str(tmp_path / "missing")]),
        "ENOENT executable": dict(args=["x"], executable="ff-no-such-program-y"),
        "EACCES": dict(args=[str(noexec)]),
        "directory": dict(args=[str(tmp_path)]),
        "ENOEXEC": dict(args=[str(garbage)]),
        "E2BIG": dict(args=["true", "x" * (256 * 1024)]),
        "missing cwd": dict(args=["true"], cwd=str(tmp_path / "no-dir")),
        "cwd is a file": dict(args=["true"], cwd=str(a_file)),
        "ENOTDIR in path": dict(args=[str(a_file / "prog")]),
    }


def leak_report(before_fds=None):
    """Children, zombie children and new fds of this process, as a dict of sets."""
    kids = procutil.children()
    report = {"children": kids, "zombies": procutil.zombies(kids)}
    if before_fds is not None:
        report["new_fds"] = procutil.open_fds() - set(before_fds)
    return report


REPORT_TAG = "FASTFORK-TEST-REPORT "


def report(value, fds_before):
    """Child side: print ``value`` with this process's leaks (children, zombies, fds).

    Call once at the end of the code, after the fan-out; ``contained`` checks
    that exactly one process printed it (no child ran on into parent code).
    """
    leaks = {k: sorted(v) for k, v in leak_report(fds_before).items() if v}
    print(REPORT_TAG + json.dumps({"pid": os.getpid(), "value": value, "leaks": leaks}),
          flush=True)


def contained(*pieces, runner=None, **kwargs):
    """Run the code ``pieces`` (each dedented, then joined) with ``runner``.

    ``runner`` is run_contained by default (or run_with_shim, run_with_seccomp,
    given their arguments in ``kwargs``). Returns the value the code passed to
    ``report()``.

    Fails the test unless the interpreter exited 0, nothing was left for the
    subreaper, exactly one process printed a report and it found no leaked
    child, zombie or fd.
    """
    import textwrap
    code = "\n".join(textwrap.dedent(piece) for piece in pieces)
    result = (runner or run_contained)(code, **kwargs)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    assert result.leftover == 0, f"left {result.leftover} processes behind\n{result.stderr}"
    reports = [json.loads(line[len(REPORT_TAG):]) for line in result.stdout.splitlines()
               if line.startswith(REPORT_TAG)]
    assert len(reports) == 1, f"{len(reports)} processes reported:\n{result.stdout}"
    assert reports[0]["leaks"] == {}, reports[0]["leaks"]
    return reports[0]["value"]
