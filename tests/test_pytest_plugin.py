"""The pytest plugin (fastfork.pytest_plugin), run by pytest in a subprocess."""
import textwrap

import pytest

import procutil

pytest_plugins = ["pytester"]

# What every inner run shares: a web server to start as a function or a command.
CONFTEST = textwrap.dedent("""
    import functools, http.server, os, signal, sys, time, urllib.request
    import pytest
    import fastfork
    from fastfork import ready

    def serve(port, greeting):
        print(greeting)
        with http.server.ThreadingHTTPServer(
                ("127.0.0.1", port), http.server.SimpleHTTPRequestHandler) as server:
            server.serve_forever()

    def get(port, path="/"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
            return reply.status

    def start_web(fastfork_service, greeting):
        port = ready.free_port()
        svc = fastfork_service(serve, port, greeting, ready=ready.port(port))
        return port, svc
""")


@pytest.fixture
def inner(pytester, monkeypatch):
    """Run pytest in a subprocess on the given test files, with the plugin loaded."""
    monkeypatch.setenv("PYTHONPATH", procutil.child_env()["PYTHONPATH"])
    pytester.makeconftest(CONFTEST)

    def run(*args, **files):
        pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})
        # Without the slowest plugins to import (hypothesis takes seconds).
        return pytester.runpytest_subprocess(
            "-p", "fastfork.pytest_plugin", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", "-p", "no:benchmark", *args, timeout=100)
    return run


def test_services_stop_at_the_end_of_the_scope_that_started_them(inner):
    result = inner("-v", test_scopes="""
        import pytest
        from conftest import get, start_web

        seen = {}

        @pytest.fixture(scope="session")
        def session_web(fastfork_service):
            return start_web(fastfork_service, "session")

        @pytest.fixture(scope="module")
        def module_web(fastfork_service):
            return start_web(fastfork_service, "module")

        @pytest.fixture
        def function_web(fastfork_service):
            return start_web(fastfork_service, "function")

        def test_first(session_web, module_web, function_web):
            for name, (port, svc) in [("session", session_web), ("module", module_web),
                                      ("function", function_web)]:
                assert get(port) == 200 and svc.alive
                seen[name] = svc

        def test_second(session_web, module_web, function_web):
            assert session_web[1] is seen["session"] and module_web[1] is seen["module"]
            assert seen["session"].alive and seen["module"].alive
            assert function_web[1] is not seen["function"]
            assert not seen["function"].alive and not seen["function"].died
            assert function_web[1].alive

        def test_started_by_the_test_itself(fastfork_service):
            port, svc = start_web(fastfork_service, "test")
            assert get(port) == 200
            seen["test"] = svc

        def test_last():
            assert not seen["test"].alive and not seen["test"].died
            assert seen["session"].alive
    """)
    result.assert_outcomes(passed=4)


def test_a_failing_test_shows_the_output_of_its_services(inner):
    result = inner(test_report="""
        from conftest import get, start_web

        def test_fails(fastfork_service):
            port, svc = start_web(fastfork_service, "GREETING-FROM-THE-SERVICE")
            get(port, "/no-such-page")

        def test_passes(fastfork_service):
            start_web(fastfork_service, "QUIET-SERVICE")
    """)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*- fastfork service serve output -*",
        "*GREETING-FROM-THE-SERVICE*",
        '*"GET /no-such-page HTTP/1.1" 404*',
    ])
    assert "QUIET-SERVICE" not in result.stdout.str()


def test_a_service_that_fails_to_start_errors_the_test_with_its_output(inner):
    result = inner(test_start="""
        import sys, pytest
        from fastfork import ready

        @pytest.fixture
        def broken(fastfork_service):
            argv = [sys.executable, "-c", "print('cannot bind', flush=True); raise SystemExit(2)"]
            return fastfork_service(argv, ready=ready.port(ready.free_port()))

        def test_uses_it(broken):
            pass
    """)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ServiceError: service * exited with code 2 before it was ready*",
                                 "*cannot bind*"])


def test_a_service_that_dies_during_a_test_is_reported(inner):
    result = inner(test_death="""
        import os, signal
        from conftest import start_web

        def test_kills_its_service(fastfork_service):
            port, svc = start_web(fastfork_service, "hello")
            svc.send_signal(signal.SIGKILL)
            os.waitid(os.P_PID, svc.pid, os.WEXITED | os.WNOWAIT)
    """)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*= fastfork services that died =*",
        "service 'serve' (pid *) was killed by SIGKILL without being stopped "
        "-- noticed in test_death.py::test_kills_its_service (call)",
    ])


def test_ctrl_c_stops_and_reaps_every_service(inner, pytester):
    pids = pytester.path / "pids"
    result = inner(test_interrupt=f"""
        import os, signal, sys, pytest
        from fastfork import ready

        @pytest.fixture(scope="session")
        def tree(fastfork_service):
            script = "sleep 60 & echo $!; echo started; wait"
            return fastfork_service(["sh", "-c", script], ready=ready.line("^started$"),
                                    die_with_parent=False)

        def test_interrupted(tree, fastfork_service):
            other = fastfork_service(["sleep", "60"], die_with_parent=False)
            worker = tree.output.split()[0]
            with open({str(pids)!r}, "w") as f:
                f.write(f"{{tree.pid}} {{worker}} {{other.pid}}")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)
    """)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3
    # The inner pytest reaped its children before exiting; the sleep under sh
    # was killed with its group.
    assert procutil.wait_ended(started) == []


def test_each_xdist_worker_runs_its_own_services(inner, pytester):
    pytest.importorskip("xdist")
    record = pytester.path / "record"
    record.mkdir()
    body = f"""
        import os, pytest
        from conftest import get, start_web

        @pytest.fixture(scope="session")
        def web(fastfork_service):
            return start_web(fastfork_service, "per worker")

        @pytest.mark.parametrize("n", range(8))
        def test_uses_the_worker_service(web, n):
            port, svc = web
            assert get(port) == 200
            worker = os.environ["PYTEST_XDIST_WORKER"]
            with open(os.path.join({str(record)!r}, f"{{worker}}-{{n}}"), "w") as f:
                f.write(f"{{svc.pid}} {{port}}")
    """
    result = inner("-n", "2", "-p", "xdist", test_xdist=body)
    result.assert_outcomes(passed=8)
    services = {}
    for entry in record.iterdir():
        worker = entry.name.split("-")[0]
        services.setdefault(worker, set()).add(entry.read_text())
    assert len(services) == 2
    one, two = services.values()
    assert len(one) == len(two) == 1 and one != two
    ports = {s.split()[1] for s in one | two}
    assert len(ports) == 2
