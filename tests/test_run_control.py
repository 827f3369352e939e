"""fastfork run's control pieces: --halt and --timeout parsing, exit status, the bar, the job log."""
import io
import os

import pytest

from fastfork._joblog import HEADER, JobLog, log_fields, read_joblog
from fastfork._run_control import Bar, Halt, Timeout, exit_status, parse_halt, parse_timeout


@pytest.mark.parametrize("text, expected", [
    ("never", Halt()),
    ("0", Halt()),
    ("soon,fail=1", Halt("soon", "fail", 1)),
    ("1", Halt("soon", "fail", 1)),
    ("2", Halt("now", "fail", 1)),
    ("-1", Halt("soon", "success", 1)),
    ("-2", Halt("now", "success", 1)),
    ("now,fail=3", Halt("now", "fail", 3)),
    ("soon,success=2", Halt("soon", "success", 2)),
    ("now,done=5", Halt("now", "done", 5)),
    ("soon,fail=10%", Halt("soon", "fail", percent=10.0)),
    ("now,success=2.5%", Halt("now", "success", percent=2.5)),
    ("20%", Halt("soon", "fail", percent=20.0)),
])
def test_parse_halt(text, expected):
    assert parse_halt(text) == expected


@pytest.mark.parametrize("text", ["", "always", "soon", "soon,fail", "soon,fail=", "later,fail=1",
                                  "soon,oops=1", "soon,fail=0", "soon,fail=-1", "soon,fail=x",
                                  "now,fail=0%", "now,fail=101%", "soon,fail=1.5"])
def test_parse_halt_rejects(text):
    with pytest.raises(ValueError, match="--halt"):
        parse_halt(text)


def test_halt_reached():
    assert not Halt().reached(100, 0, 100)
    assert not Halt("soon", "fail", 2).reached(1, 50, 100)
    assert Halt("soon", "fail", 2).reached(2, 0, 100)
    assert Halt("now", "success", 1).reached(0, 1, 100)
    assert Halt("now", "done", 3).reached(1, 2, 100)
    # A percentage is of all the jobs, as in GNU parallel.
    ten_percent = Halt("soon", "fail", percent=10)
    assert not ten_percent.reached(9, 0, 100)
    assert ten_percent.reached(10, 0, 100)
    assert not ten_percent.reached(0, 0, 0)


def test_parse_timeout_and_median_limit():
    assert parse_timeout("2.5").limit() == 2.5
    dynamic = parse_timeout("200%")
    assert dynamic.dynamic and dynamic.limit() is None
    for runtime in (1.0, 3.0):
        dynamic.add_success(runtime)
    assert dynamic.limit() is None  # fewer than 3 successes: no limit yet
    dynamic.add_success(2.0)
    assert dynamic.limit() == 4.0
    assert Timeout().limit() is None
    for bad in ("0", "-1", "nan", "inf", "x", "0%", "-5%", "%"):
        with pytest.raises(ValueError, match="--timeout"):
            parse_timeout(bad)


def test_exit_status_counts_failures_up_to_101():
    assert [exit_status(n) for n in (0, 1, 7, 101, 102, 5000)] == [0, 1, 7, 101, 101, 101]


def test_bar_text_and_clear():
    stream = io.StringIO()
    bar = Bar(4, stream, interval=0)
    bar._started -= 10
    bar.update(True)
    text = bar.text(bar._started + 10, 60)
    assert text.startswith(" 25% 1/4 ETA 30s [")
    assert len(text) == 59 and text.endswith("]")  # the last column stays free: no wrap
    bar.update(False)
    assert ", 1 failed" in bar.text(bar._started + 10, 60)
    assert stream.getvalue().startswith("\r\x1b[K")
    bar.clear()
    assert stream.getvalue().endswith("\r\x1b[K")
    assert len(bar.text(bar._started, 12)) <= 11  # a narrow terminal: no bar, never wraps


def test_joblog_round_trip(tmp_path):
    path = tmp_path / "log"
    log = JobLog(path)
    log.record(1, 1700000000.5, 0.25, 12, 0, b"echo a")
    log.record(2, 1700000001.0, 1.5, 0, 3, b"false")
    log.record(3, 1700000002.0, 30.0, 0, -15, b"sleep 99")
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[0] + b"\n" == HEADER
    assert lines[1] == b"1\t:\t1700000000.500\t     0.250\t0\t12\t0\t0\techo a"
    assert lines[3].split(b"\t")[6:8] == [b"-1", b"15"]
    assert read_joblog(path) == {1: True, 2: False, 3: False}
    assert log_fields(-9) == (-1, 9) and log_fields(4) == (4, 0)
    assert log_fields(0, timed_out=True) == (-1, 0)  # ended by itself after its SIGTERM


def test_joblog_resume_appends_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(HEADER + b"1\t:\t1.0\t1.0\t0\t0\t0\t0\ta\n2\t:\t1.0\t1.0\t0\t0\t1\t")
    assert read_joblog(path) == {1: True}
    log = JobLog(path, resume=True)
    log.record(2, 2.0, 1.0, 0, 0, b"b")
    log.close()
    assert read_joblog(path) == {1: True, 2: True}
    assert path.read_bytes().count(HEADER) == 1
    JobLog(path).close()  # without resume: a new log
    assert path.read_bytes() == HEADER


def test_joblog_reading_errors(tmp_path):
    assert read_joblog(tmp_path / "missing") == {}
    other = tmp_path / "other"
    other.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="not a job log"):
        read_joblog(other)
    other.write_bytes(HEADER + b"x\ty\n")
    with pytest.raises(ValueError, match="line 2: not a job log line"):
        read_joblog(other)
    assert not os.path.exists(tmp_path / "missing")
