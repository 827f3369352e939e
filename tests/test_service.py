"""fastfork.service and fastfork.ready: readiness, process groups, output capture, stop signals."""
import functools
import http.server
import os
import pickle
import signal
import socket
import sys
import textwrap
import time
import urllib.request

import pytest

import fastfork
import procutil
from fastfork import ready


# ---------------------------------------------------------------- helpers

def get(url):
    """GET ``url``; return (status, body)."""
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.status, reply.read()


def serve_http(port, directory):
    """A web server on 127.0.0.1:``port`` (port 0: any), serving ``directory``."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print("Listening on", server.server_address[1])
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped by KeyboardInterrupt")


def serve_http_notify(directory):
    """A web server on a port it picks, told to the parent through signal_ready()."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        ready.signal_ready(str(server.server_address[1]))
        server.serve_forever()


@pytest.fixture
def site(tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the service\n")
    return str(tmp_path)


def sleep_forever():
    while True:
        time.sleep(60)


# ---------------------------------------------------------------- a real HTTP server

def test_http_server_as_a_callable(site):
    port = ready.free_port()
    with fastfork.service(serve_http, port, site, ready=ready.port(port)) as svc:
        assert svc.alive
        assert svc.ready_result == ("127.0.0.1", port)
        assert get(f"http://127.0.0.1:{port}/hello.txt") == (200, b"hello from the service\n")
    assert svc.returncode == -signal.SIGTERM
    assert not svc.alive and not svc.died
    assert "GET /hello.txt" in svc.output  # the request log, on stderr


def test_http_server_as_a_command(site):
    port = ready.free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", site]
    with fastfork.service(argv, ready=ready.port(port)) as svc:
        assert get(f"http://127.0.0.1:{port}/hello.txt") == (200, b"hello from the service\n")
        assert svc.pid > 0 and svc.returncode is None
    assert svc.returncode == -signal.SIGTERM
    assert "GET /hello.txt" in svc.output
    assert "http.server" in svc.name


def test_stop_with_sigint_gives_a_python_service_keyboardinterrupt(site):
    port = ready.free_port()
    with fastfork.service(serve_http, port, site, ready=ready.port(port),
                          stop_signal=signal.SIGINT, grace=60) as svc:
        assert get(f"http://127.0.0.1:{port}/hello.txt")[0] == 200
    assert svc.returncode == 0
    assert svc.output.splitlines()[-1] == "stopped by KeyboardInterrupt"


# ---------------------------------------------------------------- readiness

def test_ready_by_line_from_a_callable(site):
    with fastfork.service(serve_http, 0, site, ready=ready.line(r"Listening on (\d+)")) as svc:
        port = int(svc.ready_result.group(1))
        assert get(f"http://127.0.0.1:{port}/hello.txt")[0] == 200


def test_ready_by_line_from_a_command(site):
    # -u: a Python command's stdout is block-buffered when it is not a terminal.
    code = textwrap.dedent("""
        import socket, sys, time
        sock = socket.create_server(("127.0.0.1", 0))
        print("starting", file=sys.stderr)
        print("Listening on", sock.getsockname()[1])
        conn, _ = sock.accept()
        conn.sendall(b"hi")
        time.sleep(60)
    """)
    argv = [sys.executable, "-u", "-c", code]
    with fastfork.service(argv, ready=ready.line(rb"Listening on (\d+)")) as svc:
        port = int(svc.ready_result.group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            assert conn.recv(2) == b"hi"
    assert svc.output.splitlines()[:2] == ["starting", f"Listening on {port}"]


def test_ready_by_line_matches_whole_lines_only():
    def service_main():
        print("port 80", end="", flush=True)  # no newline yet: not a line
        print("00")
        sleep_forever()
    with fastfork.service(service_main, ready=ready.line(r"port (\d+)$")) as svc:
        assert svc.ready_result.group(1) == "8000"


def test_ready_by_callable_with_back_off(site):
    port = ready.free_port()
    attempts = []

    def answers():
        attempts.append(1)
        return get(f"http://127.0.0.1:{port}/hello.txt")[0] == 200  # refused: OSError

    def late_server():
        print("ready to bind", flush=True)
        serve_http(port, site)
    with fastfork.service(late_server, ready=answers) as svc:
        assert svc.ready_result is True
        assert attempts
        assert get(f"http://127.0.0.1:{port}/hello.txt")[0] == 200


def test_ready_by_the_notify_hook(site):
    with fastfork.service(serve_http_notify, site, ready=ready.notify()) as svc:
        port = int(svc.ready_result)
        assert get(f"http://127.0.0.1:{port}/hello.txt")[0] == 200


def test_notify_message_defaults_to_empty_and_second_signal_is_refused():
    read_end, write_end = os.pipe()

    def service_main():
        first = ready.signal_ready()
        second = ready.signal_ready()
        os.write(write_end, f"{first} {second}".encode())
        sleep_forever()
    try:
        with fastfork.service(service_main, ready=ready.notify()) as svc:
            assert svc.ready_result == ""
            assert os.read(read_end, 100) == b"True False"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_signal_ready_outside_a_service_does_nothing():
    assert ready.signal_ready("x") is False


def test_ready_by_unix_socket(tmp_path):
    path = str(tmp_path / "service.sock")

    def service_main():
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.listen()
        sleep_forever()
    with fastfork.service(service_main, ready=ready.port(path)) as svc:
        assert svc.ready_result == path
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)


def test_no_probe_means_ready_at_once():
    with fastfork.service(time.sleep, 60) as svc:
        assert svc.ready_result is None
        assert svc.alive


def test_free_port_is_free():
    port = ready.free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


# ---------------------------------------------------------------- services that do not start

def test_never_ready_times_out_with_a_clear_error_and_no_leftovers():
    port = ready.free_port()

    def never_listens():
        print("configuring", flush=True)
        sleep_forever()
    service = fastfork.service(never_listens, ready=ready.port(port), ready_timeout=0.5)
    with pytest.raises(fastfork.ServiceError) as info:
        with service:
            pytest.fail("the block ran")
    err = info.value
    assert err.timed_out
    assert err.returncode == -signal.SIGTERM
    message = str(err)
    assert "was not ready within 0.5 s" in message
    assert f"TCP port 127.0.0.1:{port}" in message
    assert "ConnectionRefusedError" in message
    assert "was killed by SIGTERM" in message
    assert "configuring" in message and err.output == "configuring"
    assert not service.alive and service.returncode == -signal.SIGTERM
    assert isinstance(err, fastfork.FastforkError)


def test_crash_before_ready_says_so_with_its_output():
    def crashes():
        print("reading the configuration", flush=True)
        raise RuntimeError("no configuration")
    with pytest.raises(fastfork.ServiceError) as info:
        with fastfork.service(crashes, ready=ready.port(ready.free_port()), ready_timeout=60):
            pytest.fail("the block ran")
    err = info.value
    assert not err.timed_out and err.returncode == 1
    assert "exited with code 1 before it was ready" in str(err)
    assert "reading the configuration" in str(err)
    assert "RuntimeError: no configuration" in str(err)  # the traceback, printed by the child


def test_command_that_exits_before_ready():
    argv = [sys.executable, "-c", "import sys; print('bad port', flush=True); sys.exit(3)"]
    with pytest.raises(fastfork.ServiceError) as info:
        with fastfork.service(argv, ready=ready.line("never")):
            pytest.fail("the block ran")
    assert info.value.returncode == 3
    assert "exited with code 3 before it was ready" in str(info.value)
    assert info.value.output == "bad port"


def test_command_that_cannot_start_raises_oserror():
    with pytest.raises(FileNotFoundError):
        with fastfork.service(["/nonexistent/server"], ready=ready.port(ready.free_port())):
            pytest.fail("the block ran")


def test_service_error_pickles():
    err = fastfork.ServiceError("service 'x' did not start", name="x", pid=5, returncode=-15,
                                timed_out=True, output="last line")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.name, copy.pid, copy.returncode, copy.timed_out, copy.output) == (
        str(err), "x", 5, -15, True, "last line")


def test_interrupt_while_waiting_for_ready_stops_the_service():
    def interrupted():
        raise KeyboardInterrupt
    service = fastfork.service(time.sleep, 60, ready=interrupted)
    with pytest.raises(KeyboardInterrupt):
        service.start()
    assert service.returncode == -signal.SIGTERM


def test_exception_in_the_block_stops_the_service():
    with pytest.raises(KeyboardInterrupt):
        with fastfork.service(time.sleep, 60) as svc:
            raise KeyboardInterrupt
    assert svc.returncode == -signal.SIGTERM


# ---------------------------------------------------------------- stopping the whole tree

def test_a_service_ignoring_sigterm_is_killed_after_the_grace():
    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready.signal_ready()
        sleep_forever()
    with fastfork.service(stubborn, ready=ready.notify(), grace=0.2) as svc:
        pass
    assert svc.returncode == -signal.SIGKILL


def read_pids(fd, count):
    """Read ``count`` newline-terminated pids from ``fd``."""
    data = b""
    while data.count(b"\n") < count:
        chunk = os.read(fd, 4096)
        assert chunk, "the pipe closed early"
        data += chunk
    return [int(p) for p in data.split()]


def test_grandchildren_do_not_survive_the_service():
    read_end, write_end = os.pipe()

    def with_workers():
        for _ in range(2):
            if os.fork() == 0:
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL stops these
                    os.write(write_end, f"{os.getpid()}\n".encode())
                    sleep_forever()
                finally:
                    os._exit(0)
        ready.signal_ready()
        sleep_forever()
    try:
        with fastfork.service(with_workers, ready=ready.notify(), grace=30) as svc:
            os.close(write_end)
            write_end = -1
            workers = read_pids(read_end, 2)
            assert all(procutil.state(p) not in (None, "Z") for p in workers)
            assert all(os.getpgid(p) == svc.pid for p in workers)
        assert svc.returncode == -signal.SIGTERM
        # End of file: every holder of the write end -- the service and its two
        # workers -- has exited.
        assert os.read(read_end, 1) == b""
        assert procutil.wait_ended(workers) == []
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_command_and_its_children_are_stopped_together():
    script = ('(trap "" TERM; exec sleep 60) & echo $!; '
              '(trap "" TERM; exec sleep 60) & echo $!; echo started; wait')
    with fastfork.service(["sh", "-c", script], ready=ready.line("^started$"), grace=30) as svc:
        workers = [int(p) for p in svc.output.split()[:2]]
        assert all(os.getpgid(p) == svc.pid for p in workers)
    assert svc.returncode == -signal.SIGTERM
    assert procutil.wait_ended(workers) == []


def test_a_service_that_dies_is_seen_dead_and_its_group_killed():
    pid_read, pid_write = os.pipe()
    go_read, go_write = os.pipe()

    def dies_on_request():
        if os.fork() == 0:
            try:
                os.write(pid_write, f"{os.getpid()}\n".encode())
                sleep_forever()
            finally:
                os._exit(0)
        ready.signal_ready()
        os.read(go_read, 1)
        sys.exit(4)
    try:
        with fastfork.service(dies_on_request, ready=ready.notify()) as svc:
            (worker,) = read_pids(pid_read, 1)
            assert svc.alive and not svc.died
            os.write(go_write, b"x")
            os.waitid(os.P_PID, svc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            assert not svc.alive
            assert svc.died and svc.returncode == 4
            assert procutil.wait_ended([worker]) == []  # its group went with it
        assert svc.returncode == 4 and svc.died
    finally:
        for fd in (pid_read, pid_write, go_read, go_write):
            os.close(fd)


# ---------------------------------------------------------------- output

def test_a_chatty_service_does_not_stall():
    size = 50 * 2**20
    block = (b"x" * 99 + b"\n") * (2**20 // 100) + b"y" * 75 + b"\n"

    def chatty():
        for _ in range(50):
            os.write(1, block)
        print("done")
        sleep_forever()
    assert len(block) == 2**20
    with fastfork.service(chatty, ready=ready.line("^done$"), ready_timeout=120) as svc:
        assert len(svc.output_bytes) == size + len("done\n")
    output = svc.output_bytes
    assert len(output) == size + len("done\n") and output.endswith(b"y" * 75 + b"\ndone\n")
    assert svc.tail(1) == "done"


def test_output_stays_readable_after_stop_and_stdout_is_line_buffered():
    def talks():
        print("to stdout")
        print("to stderr", file=sys.stderr)
        ready.signal_ready()
        sleep_forever()
    with fastfork.service(talks, ready=ready.notify()) as svc:
        assert svc.output == "to stdout\nto stderr\n"
    assert svc.output == "to stdout\nto stderr\n"
    assert svc.tail(1) == "to stderr" and svc.tail(0) == ""
    assert repr(svc) == f"<Service {svc.name!r} pid={svc.pid} returncode={-signal.SIGTERM}>"


def test_a_service_reads_end_of_file_from_stdin():
    def reads_fd0():
        print("read:", repr(os.read(0, 10)))
        ready.signal_ready()
        sleep_forever()
    with fastfork.service(reads_fd0, ready=ready.notify()) as svc:
        assert svc.output == "read: b''\n"


# ---------------------------------------------------------------- stop signals and SIGINT ignored

def test_sigint_stop_while_the_parent_ignores_sigint():
    # A fresh interpreter: SIG_IGN is process-wide state.
    code = textwrap.dedent("""
        import signal, sys, time
        import fastfork
        from fastfork import ready

        signal.signal(signal.SIGINT, signal.SIG_IGN)

        def server():
            try:
                ready.signal_ready()
                time.sleep(60)
            except KeyboardInterrupt:
                print("clean stop")

        with fastfork.service(server, ready=ready.notify(), stop_signal=signal.SIGINT,
                              grace=60) as svc:
            pass
        print("function", svc.returncode, svc.output.strip())

        argv = [sys.executable, "-c", (
            "import time\\n"
            "try:\\n print('up', flush=True); time.sleep(60)\\n"
            "except KeyboardInterrupt:\\n print('clean stop')")]
        with fastfork.service(argv, ready=ready.line("up"), stop_signal=signal.SIGINT,
                              grace=60) as svc:
            pass
        print("command", svc.returncode, svc.output.split()[-2:])
        print("parent still ignores:", signal.getsignal(signal.SIGINT) == signal.SIG_IGN)

        def sleeper():
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                return "clean stop"
        with fastfork.background(sleeper, stop_signal=signal.SIGINT, grace=60) as child:
            pass  # the signal may come before sleeper runs: it must not be lost
        print("background", child.returncode)
    """)
    proc = procutil.run_python(code, timeout=100)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "function 0 clean stop"
    assert lines[1] == "command 0 ['clean', 'stop']"
    assert lines[2] == "parent still ignores: True"
    # Either it was interrupted in sleeper (exit 0, a result) or before (exit 70): not killed.
    assert lines[3] in ("background 0", "background 70"), proc.stdout


def test_background_sigint_reaches_a_running_function_when_sigint_is_ignored():
    code = textwrap.dedent("""
        import os, signal, time
        import fastfork

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        read_end, write_end = os.pipe()

        def server():
            try:
                os.write(write_end, b"up")
                time.sleep(60)
            except KeyboardInterrupt:
                return "clean"

        with fastfork.background(server, stop_signal=signal.SIGINT, grace=60) as child:
            os.read(read_end, 2)
        print(child.result())
    """)
    proc = procutil.run_python(code, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "clean\n"


def test_a_command_from_a_thread_cannot_get_an_ignored_sigint_back():
    code = textwrap.dedent("""
        import signal, sys, threading
        import fastfork

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        errors = []

        def start():
            try:
                fastfork.service(["sleep", "60"], stop_signal=signal.SIGINT).start()
            except fastfork.ServiceError as err:
                errors.append(str(err))
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        print(errors)
        with fastfork.service(["sleep", "60"], stop_signal=signal.SIGTERM) as svc:
            pass  # another stop signal is fine from anywhere
        print(svc.returncode)
    """)
    proc = procutil.run_python(code)
    assert proc.returncode == 0, proc.stderr
    errors, returncode = proc.stdout.splitlines()
    assert "SIGINT is ignored in this process" in errors
    assert returncode == str(-signal.SIGTERM)


def test_a_python_service_gets_the_stop_signal_default_even_if_the_parent_catches_it():
    caught = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: caught.append(1))
    try:
        def waits():
            ready.signal_ready()
            sleep_forever()
        with fastfork.service(waits, ready=ready.notify(), stop_signal=signal.SIGUSR1) as svc:
            pass
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert svc.returncode == -signal.SIGUSR1
    assert caught == []


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize("call, error", [
    (lambda: fastfork.service(42), TypeError),
    (lambda: fastfork.service("sleep 1"), TypeError),
    (lambda: fastfork.service([]), ValueError),
    (lambda: fastfork.service(["sleep"], 1), TypeError),
    (lambda: fastfork.service(["sleep"], kwargs={"a": 1}), TypeError),
    (lambda: fastfork.service(time.sleep, 1, env={}), TypeError),
    (lambda: fastfork.service(time.sleep, 1, cwd="/"), TypeError),
    (lambda: fastfork.service(time.sleep, kwargs=[1]), TypeError),
    (lambda: fastfork.service(time.sleep, 1, stop_signal=True), TypeError),
    (lambda: fastfork.service(time.sleep, 1, stop_signal="TERM"), TypeError),
    (lambda: fastfork.service(time.sleep, 1, stop_signal=12345), ValueError),
    (lambda: fastfork.service(time.sleep, 1, grace=-1), ValueError),
    (lambda: fastfork.service(time.sleep, 1, ready_timeout=0), ValueError),
    (lambda: fastfork.service(time.sleep, 1, ready=5), TypeError),
    (lambda: fastfork.service(["sleep", "1"], ready=ready.notify()), ValueError),
    (lambda: ready.port(0), ValueError),
    (lambda: ready.port(70000), ValueError),
    (lambda: ready.port(8.0), TypeError),
    (lambda: ready.port(80, host=None), TypeError),
    (lambda: ready.port(""), ValueError),
    (lambda: ready.line("("), ValueError),
    (lambda: ready.line(5), TypeError),
    (lambda: ready.signal_ready(5), TypeError),
    (lambda: ready.signal_ready("two\nlines"), ValueError),
])
def test_bad_arguments_fail_before_anything_starts(call, error):
    before = procutil.children()
    with pytest.raises(error):
        call()
    assert procutil.children() == before


def test_a_service_starts_once():
    service = fastfork.service(time.sleep, 60)
    with service:
        with pytest.raises(RuntimeError, match="started already"):
            service.start()
    with pytest.raises(RuntimeError, match="started already"):
        service.start()


def test_a_service_not_started_stops_as_a_no_op():
    service = fastfork.service(time.sleep, 60)
    assert service.stop() is None and service.pid is None and not service.alive
    assert service.output == "" and repr(service).endswith("not started>")


def test_the_public_names():
    assert fastfork.service is fastfork.services.service
    assert fastfork.ready is ready
    assert fastfork.ServiceError.__module__ == "fastfork"
    assert {"service", "ServiceError", "ready"} <= set(fastfork.__all__)
