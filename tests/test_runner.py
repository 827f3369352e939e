"""fastfork run: count mode, stdin mode, exit status, summary, progress, Ctrl-C."""
import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

import faultlib
import procutil
from fastfork import runner


def run(argv, capfd, stdin_text=None, monkeypatch=None):
    """Call runner.main in-process; return (status, stdout, stderr)."""
    if stdin_text is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    status = runner.main(runner.build_parser().parse_args(argv))
    out, err = capfd.readouterr()
    return status, out, err


def test_count_mode_index_and_placeholder(capfd):
    status, out, err = run(["-j", "3", "-n", "5", "--", "sh", "-c",
                            "echo run-{} idx-$FASTFORK_INDEX"], capfd)
    assert status == 0
    assert sorted(out.splitlines()) == [f"run-{i} idx-{i}" for i in range(5)]
    assert re.search(r"^fastfork run: ran 5, failed 0, total \d+\.\d+ s$", err, re.M)
    assert re.search(r"^  slowest: \[\d\] \d+\.\d+ s  sh -c ", err, re.M)


def test_failure_exit_status_and_summary(capfd):
    status, out, err = run(["-k", "-n", "4", "--", "sh", "-c", "exit $(({} % 2))"], capfd)
    assert status == 1
    assert "ran 4, failed 2" in err
    assert re.findall(r"failed:  \[(\d)\] exited with code 1", err) == ["1", "3"]


def test_without_keep_going_the_first_failure_stops_launches(capfd):
    status, out, err = run(["-j", "1", "-n", "5", "--", "sh", "-c", "echo {}; exit 1"], capfd)
    assert status == 1
    assert out == "0\n"
    assert "ran 1, failed 1, not run 4" in err


def test_timeout_is_a_failure(capfd):
    status, out, err = run(["--timeout", "0.2", "--", "sleep", "30"], capfd)
    assert status == 1
    assert "timed out (was killed by SIGTERM)" in err


def test_command_that_cannot_start(capfd):
    status, out, err = run(["--", "ff-no-such-program"], capfd)
    assert status == 1
    assert "could not start: [Errno 2] No such file or directory" in err


def test_stdin_mode(capfd, monkeypatch):
    lines = "echo a\n# a comment\n\n   \necho 'b  c' \"d\"\nsh -c 'echo $FASTFORK_INDEX'\n"
    status, out, err = run(["-j", "1"], capfd, lines, monkeypatch)
    assert status == 0
    assert out == "a\nb  c d\n2\n"
    assert "ran 3, failed 0" in err


def test_stdin_mode_keeps_going_and_fails(capfd, monkeypatch):
    status, out, err = run(["-k", "-j", "1"], capfd, "false\necho after\n", monkeypatch)
    assert (status, out) == (1, "after\n")
    assert "failed:  [0] exited with code 1  false" in err


@pytest.mark.parametrize("argv,stdin_text,message", [
    (["-j", "0", "--", "true"], None, "-j must be >= 1"),
    (["-n", "-1", "--", "true"], None, "-n must be >= 0"),
    (["-n", "3"], "", "-n needs a command"),
    (["--timeout", "-1", "--", "true"], None, "timeout must be"),
    ([], "echo 'unbalanced\n", "stdin line 1: No closing quotation"),
    ([], "echo a\0b\n", "embedded null byte"),
])
def test_usage_errors_exit_2_without_running_anything(argv, stdin_text, message, capfd,
                                                      monkeypatch):
    before = procutil.children()
    status, out, err = run(argv, capfd, stdin_text or "", monkeypatch)
    assert status == 2
    assert message in err
    assert out == "" and procutil.children() == before


def test_progress_line_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Result:
        ok = False

    for stream, expected in ((Terminal(), "\r\x1b[K[1/2] 1 failed\r\x1b[K"), (io.StringIO(), "")):
        progress = runner._Progress(2, stream)
        progress.update(Result())
        progress.clear()
        assert stream.getvalue() == expected


def test_python_m_fastfork_run():
    env = dict(os.environ, PYTHONPATH=procutil.PACKAGE_ROOT)
    result = subprocess.run([sys.executable, "-m", "fastfork", "run", "-n", "2", "--",
                             "echo", "x{}"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert (result.returncode, sorted(result.stdout.split())) == (0, ["x0", "x1"])
    assert "ran 2, failed 0" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fastfork", "run"], input="false\n",
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1


def test_ctrl_c_stops_every_command():
    code = textwrap.dedent("""
        import procutil
        from fastfork import runner
        # The first command sends the runner SIGINT, as Ctrl-C would, once it runs.
        interrupt_first = '[ "$FASTFORK_INDEX" = 0 ] && kill -INT $PPID; exec sleep 30'
        status = runner.main(runner.build_parser().parse_args(
            ["-j", "3", "-n", "10", "--", "sh", "-c", interrupt_first]))
        print(status, sorted(procutil.descendants()))
    """)
    result = faultlib.run_contained(code)
    assert result.stdout == "130 []\n", result.stderr
    assert "interrupted" in result.stderr
    assert result.leftover == 0
