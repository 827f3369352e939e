"""Test-wide guards: no test may leave a child process or an open fd behind."""
import os
import shutil
import tempfile
import time

import pytest

import procutil

@pytest.fixture(autouse=True, scope="session")
def away_from_the_source_tree():
    """Run the tests from an empty directory when the package under test is installed.

    Child interpreters started by the tests (python -c, python -m) put the
    current directory first on sys.path: run from a source checkout whose
    package is installed elsewhere (the README's `pip install '.[test]' &&
    pytest`), they would import the unbuilt tree.
    """
    here = os.getcwd()
    if not os.path.isdir("fastfork") or os.path.samefile(procutil.PACKAGE_ROOT, here):
        yield
        return
    workdir = tempfile.mkdtemp(prefix="fastfork-tests-")
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(here)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """Fail a test that leaves a child (running or zombie) or a new fd behind.

    Leftover children are killed and reaped so the next test starts clean.
    """
    children_before = procutil.children()
    fds_before = procutil.open_fds()
    yield
    # Give children that are already exiting a moment to be reaped by the code under test.
    deadline = time.monotonic() + 2.0
    while True:
        left = procutil.children() - children_before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    problems = []
    if left:
        zombies = procutil.zombies(left)
        procutil.kill_and_reap(left)
        problems.append(f"left {len(left)} child process(es) behind "
                        f"({len(zombies)} zombie): {sorted(left)}")
    leaked = procutil.open_fds() - fds_before
    if "dask_client" in request.fixturenames:
        # The Dask client's pool of TCP connections grows as it needs (its
        # cluster runs in a process of its own: see test_dask).
        leaked -= procutil.tcp_socket_fds()
    if leaked:
        detail = []
        for fd in sorted(leaked):
            try:
                detail.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                detail.append(str(fd))
        problems.append(f"leaked fds: {', '.join(detail)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def reaper():
    """Record pids a test forks by hand; kill and reap any still there at teardown."""
    pids = []
    yield pids
    procutil.kill_and_reap(pids)


@pytest.fixture
def fork_fault():
    """Install a callable run before each fan-out fork (it may raise OSError)."""
    from fastfork import _core
    yield _core._set_fork_fault
    _core._set_fork_fault(None)


@pytest.fixture(params=["pidfd", "polling"])
def pidfd_mode(request):
    """Run a test with pidfds (where the kernel has them) and with WNOHANG polling."""
    from fastfork import _core
    using = _core._set_use_pidfd(request.param == "pidfd")
    try:
        if request.param == "pidfd" and not using:
            pytest.skip("no pidfd here")
        yield request.param
    finally:
        _core._set_use_pidfd(True)
