"""fastfork run end to end: input, output modes, job log, resume, retries, halt, exit status."""
import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

import faultlib
import procutil
from fastfork import _workloads as W
from fastfork import runner

SH = "/bin/sh"


def stdin_of(data, tty=False):
    stream = io.TextIOWrapper(io.BytesIO(data))
    stream.isatty = lambda: tty
    return stream


def run(argv, capfd, stdin=b"", tty=False, monkeypatch=None):
    """Call runner.main in-process with ``stdin`` (bytes); return (status, stdout, stderr)."""
    saved = sys.stdin
    sys.stdin = stdin_of(stdin, tty)
    try:
        status = runner.main(runner.build_parser().parse_args(argv))
    finally:
        sys.stdin = saved
    out, err = capfd.readouterr()
    return status, out, err


def cli(args, input=b"", timeout=60, **kwargs):
    """Run ``python -m fastfork run ARGS`` in a fresh interpreter; bytes in and out."""
    env = dict(os.environ, PYTHONPATH=procutil.PACKAGE_ROOT, SHELL=SH)
    return subprocess.run([sys.executable, "-m", "fastfork", "run", *args], input=input,
                          capture_output=True, env=env, timeout=timeout, **kwargs)


def summary(err):
    match = re.search(r"^fastfork run: ran (\d+), failed (\d+)(.*), total", err, re.M)
    assert match, err
    return int(match.group(1)), int(match.group(2)), match.group(3)


def joblog_lines(path):
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == b"Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
    assert lines[-1] == b""
    rows = [line.split(b"\t") for line in lines[1:-1]]
    assert all(len(row) == 9 for row in rows), rows
    return rows


@pytest.fixture(autouse=True)
def plain_shell(monkeypatch):
    monkeypatch.setenv("SHELL", SH)


# ---------------------------------------------------------------- input

def test_stdin_items_replace_braces(capfd):
    status, out, err = run(["-k", "--", "echo", "x{}"], capfd, b"1\n2\n3\n")
    assert (status, out) == (0, "x1\nx2\nx3\n")
    assert summary(err)[:2] == (3, 0)


def test_items_are_appended_like_xargs(capfd):
    status, out, _ = run(["-k", "--", "echo", "pre"], capfd, b"a\nb  c\n\n")
    assert (status, out) == (0, "pre a\npre b  c\npre \n")


def test_items_after_colons_and_job_numbers(capfd):
    status, out, _ = run(["-k", "--", "echo", "{#}:{}", ":::", "a", "b c", "d"], capfd, b"x\n")
    assert (status, out) == (0, "1:a\n2:b c\n3:d\n")


def test_arg_file_and_dash(tmp_path, capfd):
    items = tmp_path / "items"
    items.write_bytes(b"one\ntwo\n")
    status, out, _ = run(["-k", "-a", str(items), "--", "echo"], capfd, b"not read\n")
    assert (status, out) == (0, "one\ntwo\n")
    status, out, _ = run(["-k", "-a", "-", "--", "echo"], capfd, b"from stdin\n")
    assert out == "from stdin\n"
    status, _, err = run(["-a", str(tmp_path / "missing"), "--", "echo"], capfd)
    assert status == 2 and "No such file or directory" in err


def test_replacement_strings_end_to_end(capfd):
    status, out, _ = run(["-j", "1", "--", "echo", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}"],
                         capfd, b"dir/file.tar.gz\n")
    assert (status, out) == (0, "dir/file.tar file.tar.gz dir file.tar 1 1\n")


def test_slots_and_environment(capfd, monkeypatch):
    monkeypatch.setenv("FASTFORK_SLOT", "outer")  # as inside another run: replaced
    status, out, _ = run(["-j", "3", "-n", "30", "--", SH, "-c",
                          "echo {%} $FASTFORK_SLOT {#} $FASTFORK_SEQ {} $FASTFORK_INDEX"], capfd)
    assert status == 0
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 30
    for slot, env_slot, seq, env_seq, index, env_index in rows:
        assert slot == env_slot and slot in ("1", "2", "3")
        assert seq == env_seq and index == env_index and int(index) == int(seq) - 1
    assert sorted(int(r[2]) for r in rows) == list(range(1, 31))


def test_no_two_running_jobs_share_a_slot(tmp_path, capfd):
    # A job holds directory SLOT while it runs: a second job in the same slot fails.
    status, out, err = run(["-j", "3", "-n", "60", "--", SH, "-c",
                            f"mkdir {tmp_path}/{{%}} || exit 9; rmdir {tmp_path}/{{%}}"], capfd)
    assert status == 0, err


def test_terminal_stdin_means_no_input(capfd):
    # A command with stdin a terminal (and no -n/-a/:::) runs once, as -n 1.
    status, out, err = run(["--", "echo", "run {}"], capfd, b"never read\n", tty=True)
    assert (status, out) == (0, "run 0\n")
    # With a pipe as stdin, every line is an item; -n never reads stdin.
    assert run(["--", "echo", "{}"], capfd, b"a\n")[1] == "a\n"
    assert run(["-k", "-n", "2", "--", "echo", "{}"], capfd, b"a\n")[1] == "0\n1\n"
    # An empty pipe: nothing to do.
    status, out, err = run(["--", "echo", "x"], capfd, b"")
    assert (status, out) == (0, "") and summary(err)[:2] == (0, 0)


def test_command_lines_run_through_the_shell(capfd):
    lines = b"echo a | tr a b\n# comment\n\nexit 3\necho $0\n"
    status, out, err = run(["-k"], capfd, lines)
    assert (status, out) == (1, "b\n/bin/sh\n")
    assert "failed:  [2] exited with code 3  exit 3" in err
    status, out, _ = run(["-k", "--", ":::", "echo one", "echo two"], capfd)
    assert out == "one\ntwo\n"


def test_no_shell_splits_lines(capfd):
    status, out, _ = run(["-k", "--no-shell"], capfd, b"echo 'a  b' \"c\" | d\n")
    assert (status, out) == (0, "a  b c | d\n")
    status, out, err = run(["--no-shell"], capfd, b"true\necho 'open\n")
    assert status == 2 and "stdin line 2: No closing quotation" in err and out == ""


def test_awkward_items_reach_the_command_byte_for_byte(tmp_path, capfdbinary):
    items = [b"with space", b"it's \"quoted\"", b"new\nline", b"\xff\xfe not utf-8", b"-n",
             b"$HOME `x`"]
    results = tmp_path / "res"
    joblog = tmp_path / "log"
    status, out, err = run(["-0", "-k", "--results", str(results), "--joblog", str(joblog),
                            "--", "printf", "%s|", "{}"], capfdbinary, b"\0".join(items) + b"\0")
    assert status == 0, err
    assert out == b"".join(item + b"|" for item in items)
    for seq, item in enumerate(items, 1):
        assert (results / str(seq) / "stdout").read_bytes() == item + b"|"
    rows = joblog_lines(joblog)
    assert [int(r[0]) for r in rows] != [] and len(rows) == len(items)
    # Each command is logged on one line, quoted so that bash gives the item back.
    for row, item in zip(sorted(rows, key=lambda r: int(r[0])), items):
        split = subprocess.run([b"bash", b"-c", b"printf '%s\\0' " + row[8]],
                               capture_output=True, timeout=60).stdout
        assert split.split(b"\0")[-2] == item
    # Newline-separated input keeps non-UTF-8 bytes too.
    status, out, _ = run(["--", "printf", "%s"], capfdbinary, b"caf\xe9\n")
    assert out == b"caf\xe9"


# ---------------------------------------------------------------- output

LOOP = "i=0; while [ $i -lt 10000 ]; do echo {}-$i; echo e{}-$i >&2; i=$((i+1)); done"


@pytest.mark.parametrize("mode", ["--group", "--line-buffer"])
def test_four_jobs_of_10000_lines_never_interleave(mode):
    result = cli(["-j", "4", mode, "--", SH, "-c", LOOP, ":::", "a", "b", "c", "d"])
    assert result.returncode == 0, result.stderr
    for stream, prefix in ((result.stdout, b""), (result.stderr, b"e")):
        lines = stream.decode().splitlines()
        if prefix:
            lines = [l for l in lines if not l.startswith("fastfork run:")
                     and not l.startswith("  ")]
        assert len(lines) == 40000
        per_job = {}
        for line in lines:
            job, _, number = line.partition("-")
            per_job.setdefault(job, []).append(int(number))
        assert sorted(per_job) == [prefix.decode() + j for j in "abcd"]
        for numbers in per_job.values():
            assert numbers == list(range(10000))  # every line whole, in order
        if mode == "--group":
            # Grouped: each job's lines are one block.
            blocks = [line.partition("-")[0] for line in lines]
            changes = sum(1 for x, y in zip(blocks, blocks[1:]) if x != y)
            assert changes == 3


def test_keep_order_with_jobs_ending_out_of_order(tmp_path, capfd):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Job 1 reads the fifo to its end, which comes when job 3 (holding it open) exits.
    script = (f"if [ {{}} = 1 ]; then cat {fifo} >/dev/null; fi; "
              f"if [ {{}} = 3 ]; then exec 3>{fifo}; fi; echo out{{}}; echo err{{}} >&2")
    status, out, err = run(["-j", "3", "-k", "--", SH, "-c", script, ":::", "1", "2", "3"],
                           capfd)
    assert (status, out) == (0, "out1\nout2\nout3\n")
    assert err.startswith("err1\nerr2\nerr3\n")


def test_tag(capfd):
    status, out, err = run(["-k", "--tag", "--", SH, "-c", "echo a; echo b; echo c >&2",
                            ":::", "x y", "z"], capfd)
    assert out == "x y\ta\nx y\tb\nz\ta\nz\tb\n"
    assert err.startswith("x y\tc\nz\tc\n")
    status, out, _ = run(["-k", "--tag", "-n", "2", "--", "echo", "hi"], capfd)
    assert out == "0\thi\n1\thi\n"


def test_line_buffer_prints_lines_before_the_job_ends(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=procutil.PACKAGE_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastfork", "run", "--line-buffer", "--", SH, "-c",
         f"echo first; cat {fifo}; echo last", ":::", "x"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"first\n"  # while the job waits on the fifo
        with open(fifo, "wb") as f:
            f.write(b"middle\n")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out == b"middle\nlast\n"
    assert proc.returncode == 0, err


def test_ungroup_lets_jobs_write_directly(capfd):
    status, out, err = run(["-u", "--", "echo"], capfd, b"a\n")
    assert (status, out) == (0, "a\n")


def test_results_directory(tmp_path, capfd):
    results = tmp_path / "out"
    status, out, err = run(["--results", str(results), "--timeout", "30", "--", SH, "-c",
                            "echo o{}; echo e{} >&2; exit {}", ":::", "0", "3"], capfd)
    assert status == 1
    assert sorted(os.listdir(results)) == ["1", "2"]
    assert (results / "1" / "stdout").read_text() == "o0\n"
    assert (results / "1" / "stderr").read_text() == "e0\n"
    assert (results / "1" / "exitval").read_text() == "0\n"
    assert (results / "2" / "exitval").read_text() == "3\n"
    assert (results / "2" / "cmd").read_text().startswith("/bin/sh -c ")


def test_tmpdir_holds_output_in_unlinked_files(tmp_path, capfd):
    status, out, _ = run(["-k", "--tmpdir", str(tmp_path), "--", "echo"], capfd, b"a\nb\n")
    assert (status, out) == (0, "a\nb\n")
    assert os.listdir(tmp_path) == []


def test_summary_goes_to_stderr_after_every_job(capfd):
    status, out, err = run(["-j", "2", "--", SH, "-c", "echo to-err >&2", ":::", "1", "2"],
                           capfd)
    assert err.splitlines()[:3] == ["to-err", "to-err", err.splitlines()[2]]
    assert err.splitlines()[2].startswith("fastfork run: ran 2")
    status, out, err = run(["--quiet", "--", "false", ":::", "1"], capfd)
    assert (status, out, err) == (1, "", "")


def test_bar(capfd):
    status, out, err = run(["--bar", "-j", "1", "--", "true", ":::", "1", "2", "3"], capfd)
    assert status == 0
    assert "100% 3/3" in err
    status, out, err = run(["--no-bar", "--", "true", ":::", "1"], capfd)
    assert "\r" not in err


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capfd):
    marker = tmp_path / "ran"
    status, out, err = run(["--dry-run", "-j", "2", "--", "touch", f"{marker}{{%}}", "{}",
                            ":::", "a b", "c"], capfd)
    assert status == 0 and err == ""
    assert out == f"touch {marker}1 'a b'\ntouch {marker}2 c\n"
    assert not os.path.exists(f"{marker}1")


def test_broken_stdout_stops_the_run_quietly():
    env = dict(os.environ, PYTHONPATH=procutil.PACKAGE_ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "fastfork", "run", "-k", "-n", "100000",
                             "--", "echo", "{}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"0\n"
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"Exception" not in err


def test_broken_stdout_stops_a_run_printing_big_outputs():
    # Each job's output is copied by the printing thread: its error stops the run.
    env = dict(os.environ, PYTHONPATH=procutil.PACKAGE_ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "fastfork", "run", "-n", "10000", "--",
                             "head", "-c", "300000", "/dev/zero"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1) == b"\0"
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"Exception" not in err


# ---------------------------------------------------------------- job log, resume, retries

def test_joblog_columns_and_missing_program(tmp_path, capfd):
    log = tmp_path / "log"
    status, out, err = run(["-k", "--joblog", str(log), "--", SH, "-c", "printf 12345; exit {}",
                            ":::", "0", "4"], capfd)
    status2, _, err2 = run(["--joblog", str(log), "--", "ff-no-such-program", ":::", "x"],
                           capfd)
    assert (status, status2) == (1, 1)
    rows = joblog_lines(log)
    assert len(rows) == 1  # a new run without --resume starts a new log
    seq, host, start, runtime, send, receive, exitval, signal, command = rows[0]
    assert (seq, host, send, receive, exitval, signal) == (b"1", b":", b"0", b"0", b"127", b"0")
    assert command == b"ff-no-such-program x"
    assert "failed:  [1] could not start: No such file or directory: ff-no-such-program" in err2
    assert "slowest" not in err2


def test_joblog_receive_and_signal(tmp_path, capfd):
    log = tmp_path / "log"
    run(["-k", "--joblog", str(log), "--", SH, "-c", "printf 12345; kill -9 $$; exit {}",
         ":::", "0"], capfd)
    rows = joblog_lines(log)
    assert [r[5:8] for r in rows] == [[b"5", b"-1", b"9"]]
    assert float(rows[0][2]) > 1e9 and float(rows[0][3]) >= 0


def test_resume_and_resume_failed(tmp_path, capfd):
    log = tmp_path / "log"
    marker = tmp_path / "fixed"
    script = f"echo ran {{}}; [ {{}} != 2 ] || [ -e {marker} ]"
    argv = ["-k", "--joblog", str(log), "--", SH, "-c", script, ":::", "1", "2", "3"]
    status, out, _ = run(argv, capfd)
    assert (status, out) == (1, "ran 1\nran 2\nran 3\n")
    status, out, err = run(["--resume", *argv], capfd)
    assert (status, out) == (0, "") and "skipped 3" in err
    marker.touch()
    status, out, err = run(["--resume-failed", *argv], capfd)
    assert (status, out) == (0, "ran 2\n") and "skipped 2" in err
    rows = [(r[0], r[6]) for r in joblog_lines(log)]
    assert sorted(rows[:3]) == [(b"1", b"0"), (b"2", b"1"), (b"3", b"0")]
    assert rows[3:] == [(b"2", b"0")]
    assert run(["--resume", *argv], capfd)[1] == ""


def test_resume_after_sigint_in_the_middle(tmp_path):
    """Interrupt a run while job 5 runs; the resumed run does exactly the rest."""
    log, fifo, results = tmp_path / "log", tmp_path / "fifo", tmp_path / "res"
    os.mkfifo(fifo)
    marker = tmp_path / "interrupted"
    # Job 5 tells the runner (through the fifo) that it runs, then waits for ever;
    # once the marker exists (second run) it just succeeds.
    script = (f"if [ {{}} = 5 ] && [ ! -e {marker} ]; then touch {marker}; "
              f"echo running > {fifo}; exec sleep 600; fi; echo done {{}}")
    args = ["-j", "2", "--joblog", str(log), "--results", str(results), "--", SH, "-c",
            script, ":::", *map(str, range(1, 21))]
    code = textwrap.dedent(f"""
        import signal, sys, threading, os
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from fastfork import cli
        def interrupt():
            with open({str(fifo)!r}) as f:
                f.read()
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt, daemon=True).start()
        sys.exit(cli.main(["run"] + {args!r}))
    """)
    first = faultlib.run_contained(code)
    assert first.returncode == 130, first.stderr
    assert "interrupted" in first.stderr
    assert first.leftover == 0
    done_first = {int(r[0]) for r in joblog_lines(log)}
    assert 5 not in done_first
    assert not (results / "5" / "exitval").exists()
    second = cli(["--resume", *args])
    assert second.returncode == 0, second.stderr
    rows = joblog_lines(log)
    seqs = [int(r[0]) for r in rows]
    assert sorted(seqs) == list(range(1, 21))  # every job once: none lost, none twice
    assert set(seqs[len(done_first):]) == set(range(1, 21)) - done_first
    assert all(r[6] == b"0" for r in rows)
    assert all((results / str(i) / "exitval").read_text() == "0\n" for i in range(1, 21))


def test_retries(tmp_path, capfd):
    log = tmp_path / "log"
    tries = tmp_path / "tries"
    # Fails on its first two attempts, prints which attempt it is.
    script = f"echo x >> {tries}{{}}; n=$(wc -l < {tries}{{}}); echo attempt $n; [ $n -ge 3 ]"
    status, out, err = run(["--retries", "2", "--joblog", str(log), "--", SH, "-c", script,
                            ":::", "a"], capfd)
    assert (status, out) == (0, "attempt 3\n")  # only the last attempt's output
    assert [r[6] for r in joblog_lines(log)] == [b"0"]
    status, out, err = run(["--retries", "1", "--", SH, "-c", script, ":::", "b"], capfd)
    assert (status, out) == (1, "attempt 2\n")
    assert (tmp_path / "triesb").read_text().count("x") == 2


# ---------------------------------------------------------------- halt, timeout, status

def test_every_job_runs_by_default(capfd):
    status, out, err = run(["-j", "1", "-k", "--keep-going", "--", SH, "-c", "echo {}; exit 1",
                            ":::", "a", "b", "c"], capfd)
    assert (status, out) == (3, "a\nb\nc\n")


def test_halt_soon_fail(capfd):
    status, out, err = run(["-j", "1", "--halt", "soon,fail=2", "--", SH, "-c",
                            "echo {}; exit 1", ":::", "a", "b", "c", "d"], capfd)
    assert (status, out) == (2, "a\nb\n")
    assert summary(err)[2] == ", not run 2"
    assert "halted: --halt soon,fail=2 reached" in err


def test_halt_now_stops_running_jobs(tmp_path, capfd):
    log = tmp_path / "log"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Job 1 opens the fifo (so job 2 knows it runs), then sleeps; job 2 waits for that
    # and fails.
    status, out, err = run(["-j", "2", "--joblog", str(log), "--halt", "now,fail=1", "--",
                            SH, "-c", f"if [ {{}} = 1 ]; then exec 3>{fifo}; exec 3>&-; "
                            f"exec sleep 600; fi; cat {fifo}; exit 1", ":::", "1", "2", "3"],
                           capfd)
    assert status == 1
    assert [r[0] for r in joblog_lines(log)] == [b"2"]  # the stopped job is not recorded
    ran, failed, rest = summary(err)
    assert (ran, failed, rest) == (1, 1, ", stopped 1, not run 1")


def test_halt_on_success_and_percentages(capfd):
    status, out, err = run(["-j", "1", "-k", "--halt", "soon,success=2", "--", SH, "-c",
                            "echo {}; exit {}", ":::", "1", "0", "0", "0"], capfd)
    assert (status, out) == (1, "1\n0\n0\n")
    status, out, err = run(["-j", "1", "--halt", "soon,fail=50%", "--", SH, "-c",
                            "exit 1", ":::", "1", "2", "3", "4"], capfd)
    assert status == 2 and summary(err)[2] == ", not run 2"


def test_timeout_seconds_and_percent_of_median(tmp_path, capfd):
    log = tmp_path / "log"
    status, out, err = run(["--timeout", "0.2", "--joblog", str(log), "--", SH, "-c",
                            "exec sleep 30", ":::", "x"], capfd)
    assert status == 1
    assert "timed out (was killed by SIGTERM)" in err
    assert [r[6:8] for r in joblog_lines(log)] == [[b"-1", b"15"]]
    # Three quick successes set the median; the fourth job runs far past 300% of it.
    status, out, err = run(["-j", "1", "--timeout", "300%", "--", SH, "-c",
                            "[ {} = slow ] && exec sleep 600; true", ":::", "a", "b", "c",
                            "slow"], capfd)
    assert status == 1
    assert "failed:  [4] timed out" in err


def test_exit_status_is_the_number_of_failures_up_to_101(capfd):
    assert run(["-n", "3", "--", "false"], capfd)[0] == 3
    assert run(["-j", "4", "-n", "102", "--", "false"], capfd)[0] == 101


@pytest.mark.parametrize("argv, message", [
    (["-j", "0", "--", "true"], "jobs must be >= 1"),
    (["-n=-1", "--", "true"], "-n must be >= 0"),
    (["-n", "3"], "-n needs a command"),
    (["--timeout=-1", "--", "true"], "--timeout '-1'"),
    (["--timeout", "abc", "--", "true"], "--timeout 'abc'"),
    (["--halt", "sometimes", "--", "true"], "--halt 'sometimes'"),
    (["--retries=-1", "--", "true"], "--retries must be >= 0"),
    (["-n", "2", "--", "echo", ":::", "a"], "-n and ::: both give the input"),
    (["-a", "f", "--", "echo", ":::", "a"], "-a and ::: both give the input"),
    (["-0", "--", "echo", ":::", "a"], "-0 applies to input read from stdin or -a"),
    (["--no-shell", "--", "echo"], "--no-shell applies to command lines"),
    (["-u", "-k", "--", "echo"], "-k/--keep-order needs the output captured"),
    (["-u", "--tag", "--", "echo"], "--tag needs the output captured"),
    (["-u", "--results", "d", "--", "echo"], "--results needs the output captured"),
    (["-u", "--tmpdir", "/", "--", "echo"], "--tmpdir needs the output captured"),
    (["--tmpdir", "/nonexistent-dir", "--", "echo"], "not a directory"),
    (["--resume", "--", "echo"], "--resume and --resume-failed need --joblog"),
    (["--", "echo", "{1}"], "unknown replacement string '{1}'"),
    (["--", "echo", ":::", "a", ":::", "b"], "only one ::: list is supported"),
])
def test_bad_options_exit_2_before_anything_runs(argv, message, capfd):
    before = procutil.children()
    status, out, err = run(argv, capfd, b"item\n")
    assert status == 2
    assert message in err
    assert out == "" and procutil.children() == before


@pytest.mark.parametrize("argv", [["--line-buffer", "-u"], ["--resume", "--resume-failed"],
                                  ["--bar", "--no-bar"]])
def test_exclusive_options_exit_2(argv):
    result = cli([*argv, "--", "true"])
    assert result.returncode == 2 and b"not allowed with argument" in result.stderr


def test_resume_with_a_file_that_is_not_a_joblog(tmp_path, capfd):
    log = tmp_path / "log"
    log.write_text("something else\n")
    status, _, err = run(["--joblog", str(log), "--resume", "--", "true", ":::", "a"], capfd)
    assert status == 2 and "is not a job log" in err


# ---------------------------------------------------------------- processes and faults

def test_low_fd_limit_throttles_instead_of_failing():
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from fastfork import cli
        sys.exit(cli.main(["run", "-j", "100", "-n", "200", "--", "true"]))
    """)
    result = faultlib.run_contained(code)
    assert result.returncode == 0, result.stderr
    assert "ran 200, failed 0" in result.stderr
    assert result.leftover == 0


def test_grandchild_holding_stdout_does_not_hold_the_runner(tmp_path):
    pidfile = tmp_path / "grandchild"
    code = textwrap.dedent(f"""
        import os, signal, sys
        from fastfork import cli
        status = cli.main(["run", "--timeout", "60", "--", "/bin/sh", "-c",
                           "sleep 600 & echo $! > {pidfile}; echo job done", ":::", "x"])
        with open({str(pidfile)!r}) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        sys.exit(status)
    """)
    result = faultlib.run_contained(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job done\n"


def test_ctrl_c_stops_every_job():
    code = textwrap.dedent("""
        import os, signal, threading, procutil
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from fastfork import runner
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        status = runner.main(runner.build_parser().parse_args(
            ["-j", "3", "-n", "10", "--", "sleep", "30"]))
        print(status, sorted(procutil.descendants()))
    """)
    result = faultlib.run_contained(code)
    assert result.stdout == "130 []\n", result.stderr
    assert "interrupted" in result.stderr
    assert result.leftover == 0


def test_python_m_fastfork_run_help_documents_the_modes():
    result = cli(["--help"])
    assert result.returncode == 0
    for word in (b"--line-buffer", b"--keep-order", b"--joblog", b"--resume-failed",
                 b"--halt", b"{/.}", b"Examples:"):
        assert word in result.stdout


@pytest.mark.parametrize("workload, method", [
    (w.key, m.name) for w in (W.RUN_TRUE, W.RUN_ECHO, W.RUN_OUTPUT) for m in w.methods])
def test_benchmark_workloads_run(workload, method):
    # Shape only: each method of the CLI workloads runs its jobs (no timing here).
    W.measure(W.WORKLOADS[workload].method(method), 3 if workload != "run-output" else 1)
