"""The public API is typed: mypy --strict checks a user's script against it.

One mypy run (slow: seconds) checks two scripts: GOOD uses every public
name and must pass cleanly, its ``assert_type`` lines pinning the inferred
types; BAD holds mistakes, each line marked ``# E: <error code>`` with the
error mypy must report there -- and no other error anywhere.
"""
import os
import re
import site
import subprocess
import sys
import textwrap

import pytest

import fastfork
import procutil

pytest.importorskip("mypy")

GOOD = '''
from __future__ import annotations

import os
import re
import resource
import shlex
from collections.abc import Iterator
from contextlib import AbstractContextManager

from typing_extensions import assert_type

import fastfork
from fastfork import ready


def square(x: int) -> int:
    return x * x


def greet(name: str, punct: str = "!") -> str:
    return name + punct


def main(flag: bool, server: fastfork.ForkServer) -> None:
    assert_type(fastfork.map(square, [1, 2], jobs=2, timeout=1.5, chunksize=2), list[int])
    assert_type(fastfork.map(square, range(3), return_exceptions=True),
                list[int | BaseException])
    assert_type(fastfork.map(square, [1], return_exceptions=flag), list[int | BaseException])
    assert_type(fastfork.as_completed(square, (1, 2)), Iterator[tuple[int, int]])
    assert_type(fastfork.as_completed(square, [1], return_exceptions=True),
                Iterator[tuple[int, int | BaseException]])
    child = fastfork.start(greet, "a", punct="?")
    assert_type(child, fastfork.FunctionChild[str])
    assert_type(child.result(timeout=1), str)
    assert_type(child.wait(), int | None)
    assert_type(child.pid, int | None)
    assert_type(fastfork.start_child(greet, ("a",), die_with_parent=True),
                fastfork.FunctionChild[str])
    with fastfork.background(greet, "a", grace=1.0) as helper:
        assert_type(helper, fastfork.FunctionChild[str])
    handle: fastfork.Child = helper
    assert_type(handle.poll(), int | None)

    proc = fastfork.spawn(["echo", b"hi", os.curdir], stdout=fastfork.PIPE,
                          stderr=fastfork.STDOUT, stdin=fastfork.DEVNULL, env={"A": "1"})
    assert_type(proc, fastfork.Process)
    assert_type(proc.communicate(b"x"), tuple[bytes | None, bytes | None])
    fastfork.spawn(("true",), cwd="/")
    fastfork.spawn(shlex.split("echo hi"))
    results = fastfork.spawn_many([["true"], ("false",)], capture=True)
    assert_type(results, list[fastfork.CommandResult])
    assert_type(results[0].ok, bool)
    assert_type(results[0].stdout, bytes | None)
    assert_type(fastfork.spawn_many([["true"]], keep_going=False),
                list[fastfork.CommandResult | None])

    assert_type(server.map(square, [1]), list[int])
    assert_type(server.map(square, [1], return_exceptions=True), list[int | BaseException])
    assert_type(server.as_completed(square, [1]), Iterator[tuple[int, int]])
    assert_type(server.start(greet, "x"), fastfork.ServerChild[str])
    assert_type(server.start(greet, "x").result(), str)
    with fastfork.ForkServer(preload=["json"]) as other:
        assert_type(other, fastfork.ForkServer)
        assert_type(other.executor(2), fastfork.ForkExecutor)
    with fastfork.ForkExecutor(2, timeout=5.0) as pool:
        assert_type(pool.submit(greet, "x").result(), str)
        assert_type(list(pool.map(square, [1, 2])), list[int])

    with fastfork.service(["sleep", "9"], ready=fastfork.ready.port(ready.free_port())) as svc:
        assert_type(svc.pid, int | None)
        assert_type(svc.output, str)
    fastfork.service(greet, "a", ready=ready.notify())
    fastfork.service(greet, "a", ready=ready.line(re.compile(r"up")))
    fastfork.service(greet, "a", ready=lambda: True)
    assert_type(ready.signal_ready("port 1"), bool)

    with fastfork.SharedBuffer(4096) as shared:
        assert_type(shared.chunk(0, 2), memoryview)
        assert_type(shared.bounds(0, 2, itemsize=8), tuple[int, int])
    assert_type(fastfork.PrivateBuffer(4096).hugepages, bool)

    errors: list[type[fastfork.FastforkError]] = [
        fastfork.ChildError, fastfork.ChildTimeout, fastfork.ForkError,
        fastfork.TimeoutExpired, fastfork.ServerError, fastfork.ServiceError]
    try:
        child.result()
    except fastfork.ChildError as err:
        assert_type(err.signal, int | None)
        assert_type(err.remote_traceback, str | None)

    pid = fastfork.fork()
    if pid == 0:
        fastfork._exit(0)
    assert_type(fastfork.waitpid(pid, 0), tuple[int, int])
    assert_type(fastfork.wait(), tuple[int, int])
    assert_type(fastfork.wait3(0), tuple[int, int, resource.struct_rusage])
    assert_type(fastfork.wait4(pid, 0), tuple[int, int, resource.struct_rusage])
    assert_type(fastfork.reap([pid], timeout=1.0), list[tuple[int, int]])
'''

BAD = '''
from __future__ import annotations

import fastfork


def square(x: int) -> int:
    return x * x


def greet(name: str) -> str:
    return name


def main(server: fastfork.ForkServer) -> None:
    fastfork.map(square, [1], jobs="2")  # E: call-overload
    fastfork.map(square, ["a"])  # E: arg-type
    fastfork.spawn("echo hi")  # E: arg-type
    total: str = fastfork.map(square, [1])[0]  # E: assignment
    fastfork.start(greet, 1)  # E: arg-type
    fastfork.start(greet, "a", "b")  # E: call-arg
    text: int = fastfork.start(greet, "a").result()  # E: assignment
    server.map(square, ["a"])  # E: arg-type
    server.start(greet, name=2)  # E: arg-type
    fastfork.spawn_many(["true"])  # E: list-item
    fastfork.spawn(["ls"], env=["A=1"])  # E: arg-type
    first: int = fastfork.map(square, [1], return_exceptions=True)[0]  # E: assignment
    for index, value in fastfork.as_completed(square, [1]):
        value.upper()  # E: attr-defined
    fastfork.SharedBuffer("1")  # E: arg-type
    fastfork.service(greet, ready=3)  # E: arg-type
    fastfork.waitpid("1", 0)  # E: arg-type
'''

ERROR = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def expected_errors(source):
    """{(line, code)} of the lines of ``source`` marked ``# E: code``."""
    return {(number, line.rsplit("# E:", 1)[1].strip())
            for number, line in enumerate(source.splitlines(), 1) if "# E:" in line}


def search_path_env():
    """The environment for mypy: MYPYPATH finds the fastfork under test unless installed."""
    env = dict(os.environ)
    installed = {os.path.realpath(p) for p in [*site.getsitepackages(),
                                                site.getusersitepackages()]}
    if os.path.realpath(procutil.PACKAGE_ROOT) not in installed:
        env["MYPYPATH"] = procutil.PACKAGE_ROOT
    return env


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory):
    """Run mypy --strict once over GOOD and BAD; return {script: {(line, code)}}."""
    tmp = tmp_path_factory.mktemp("typing")
    for name, source in (("good.py", GOOD), ("bad.py", BAD)):
        (tmp / name).write_text(source)
    # follow-imports=silent: report errors in the scripts only, as for an
    # installed package (the library's own code is checked by its authors).
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-error-summary", "--show-error-codes", "--cache-dir", str(tmp / "cache"),
         "good.py", "bad.py"],
        cwd=tmp, env=search_path_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    errors = {"good.py": set(), "bad.py": set()}
    for line in proc.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            errors[os.path.basename(match["file"])].add((int(match["line"]), match["code"]))
        else:
            assert ": note: " in line, f"unexpected mypy output: {line}\n{proc.stdout}"
    errors["output"] = proc.stdout
    return errors


def test_the_good_script_uses_every_public_name():
    used = set(re.findall(r"\bfastfork\.(\w+)", GOOD)) | set(re.findall(r"\bready\.(\w+)", GOOD))
    assert set(fastfork.__all__) - used == set()
    assert set(fastfork.ready.__all__) - {"Probe"} <= used


def test_correct_use_type_checks_cleanly_with_the_inferred_types(mypy_errors):
    assert mypy_errors["good.py"] == set(), mypy_errors["output"]


def test_each_mistake_is_reported_on_its_line_and_nothing_else(mypy_errors):
    assert mypy_errors["bad.py"] == expected_errors(BAD), mypy_errors["output"]
