"""fastfork run's output routing, driven directly: jobs' files are written by the test."""
import os

import pytest

from fastfork import _run_output
from fastfork._run_output import Output, _tagged


class FakeJob:
    def __init__(self, seq, label=None):
        self.seq = seq
        self.label = label if label is not None else b"%d" % seq

    def describe(self):
        return b"cmd %d" % self.seq


def write(fds, out=b"", err=b""):
    os.write(fds[0], out)
    os.write(fds[1], err)


def test_grouped_prints_each_job_whole_when_it_ends(capfdbinary):
    output = Output("group")
    a, b = FakeJob(1), FakeJob(2)
    fa, fb = output.open(a), output.open(b)
    write(fa, b"a1\n", b"ea\n")
    write(fb, b"b1\n")
    write(fa, b"a2 no newline")
    output.poll()  # grouped: nothing before the end
    assert capfdbinary.readouterr() == (b"", b"")
    assert output.finish(b, 0) == 3
    assert output.finish(a, 0) == len(b"a1\nea\na2 no newline")
    output.close()
    assert capfdbinary.readouterr() == (b"b1\na1\na2 no newline", b"ea\n")


def test_keep_order_holds_jobs_that_end_early(capfdbinary):
    output = Output("group", keep_order=True, order=[1, 2, 3, 4])
    jobs = [FakeJob(i) for i in range(1, 5)]
    fds = [output.open(j) for j in jobs]
    for job, f in zip(jobs, fds):
        write(f, b"out%d\n" % job.seq, b"err%d\n" % job.seq)
    output.finish(jobs[2], 0)
    output.finish(jobs[1], 0)
    assert capfdbinary.readouterr() == (b"", b"")
    output.finish(jobs[0], 0)
    assert capfdbinary.readouterr() == (b"out1\nout2\nout3\n", b"err1\nerr2\nerr3\n")
    output.skip(4)  # job 4 will not run after all: nothing waits for it
    output.finish(jobs[3])  # ... and its attempt is discarded
    output.close()
    assert capfdbinary.readouterr() == (b"", b"")


def test_keep_order_close_prints_held_output_after_a_gap(capfdbinary):
    output = Output("group", keep_order=True, order=[1, 2, 3])
    jobs = [FakeJob(i) for i in range(1, 4)]
    fds = [output.open(j) for j in jobs]
    write(fds[2], b"three\n")
    output.finish(jobs[2], 0)
    output.close()  # jobs 1 and 2 never ended (interrupted): 3 still printed
    assert capfdbinary.readouterr().out == b"three\n"


def test_discarded_attempt_prints_nothing_and_keeps_its_turn(capfdbinary):
    output = Output("group", keep_order=True, order=[1, 2])
    one, two = FakeJob(1), FakeJob(2)
    write(output.open(one), b"first attempt\n")
    output.finish(one)            # to be retried
    write(output.open(two), b"two\n")
    output.finish(two, 0)
    write(output.open(one), b"second attempt\n")
    output.finish(one, 0)
    output.close()
    assert capfdbinary.readouterr().out == b"second attempt\ntwo\n"


def test_line_buffer_prints_complete_lines_as_they_come(capfdbinary):
    output = Output("line", tag=True)
    job = FakeJob(1, b"item x")
    f = output.open(job)
    write(f, b"first\nsecond part", b"e1\ne")
    output.poll()
    assert capfdbinary.readouterr() == (b"item x\tfirst\n", b"item x\te1\n")
    write(f, b" ends\n")
    output.poll()
    assert capfdbinary.readouterr().out == b"item x\tsecond part ends\n"
    write(f, b"tail")
    output.finish(job, 0)
    output.close()
    assert capfdbinary.readouterr() == (b"item x\ttail", b"item x\te")


def test_line_buffer_with_keep_order_streams_only_the_first_job(capfdbinary):
    output = Output("line", keep_order=True, order=[1, 2])
    one, two = FakeJob(1), FakeJob(2)
    f1, f2 = output.open(one), output.open(two)
    write(f2, b"two\n")
    write(f1, b"one\n")
    output.poll()
    assert capfdbinary.readouterr().out == b"one\n"
    output.finish(one, 0)
    assert capfdbinary.readouterr().out == b"two\n"  # now the first: its lines come
    write(f2, b"more\n")
    output.finish(two, 0)
    output.close()
    assert capfdbinary.readouterr().out == b"more\n"


@pytest.mark.parametrize("chunks", [[b"a\nb\n"], [b"a", b"\nb", b"\n"], [b"a\n", b"b\n"],
                                    [b"\n\n"], [b"a\nb"]])
def test_tagging_across_chunk_boundaries(chunks):
    text = b"".join(chunks)
    start, out = True, b""
    for chunk in chunks:
        data, start = _tagged(chunk, b"T\t", start)
        out += data
    lines = text.split(b"\n")
    expected = b"\n".join(b"T\t" + line for line in lines[:-1]) + b"\n" if text.endswith(
        b"\n") else b"\n".join(b"T\t" + line for line in lines)
    assert out == expected


def test_results_directory(tmp_path, capfdbinary):
    results = tmp_path / "res"
    output = Output("group", results=str(results))
    ok, bad = FakeJob(1), FakeJob(2)
    write(output.open(ok), b"out\n", b"err\n")
    write(output.open(bad), b"partial")
    output.finish(ok, 0)
    output.finish(bad)            # stopped: no exitval
    output.close()
    assert (results / "1" / "stdout").read_bytes() == b"out\n"
    assert (results / "1" / "stderr").read_bytes() == b"err\n"
    assert (results / "1" / "exitval").read_text() == "0\n"
    assert (results / "1" / "cmd").read_bytes() == b"cmd 1\n"
    assert not (results / "2" / "exitval").exists()
    assert sorted(os.listdir(results / "2")) == ["cmd", "stderr", "stdout"]
    assert capfdbinary.readouterr().out == b"out\n"


def test_ungroup_captures_nothing():
    output = Output("ungroup")
    assert output.open(FakeJob(1)) == (None, None)
    assert output.finish(FakeJob(1), 0) == 0
    output.close()


def test_output_to_an_append_only_file(tmp_path):
    # sendfile refuses an O_APPEND destination: the copy falls back to read/write.
    from fastfork import _run_output
    target = tmp_path / "log"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        copier = _run_output._Copier()
        src = _run_output._temp_file(str(tmp_path))
        try:
            os.write(src, b"x" * 3_000_000)
            assert copier.copy(fd, src, 0, 3_000_000) == 3_000_000
        finally:
            os.close(src)
    finally:
        os.close(fd)
    assert target.read_bytes() == b"x" * 3_000_000


BIG = 3 * _run_output._INLINE_BYTES  # printed by the printing thread, not inline


def test_big_outputs_are_printed_whole_in_the_order_jobs_ended(capfdbinary):
    output = Output("group")
    jobs = [FakeJob(i) for i in (1, 2, 3)]
    fds = [output.open(j) for j in jobs]
    for job, f in zip(jobs, fds):
        write(f, bytes([ord("a") + job.seq]) * BIG, b"e%d\n" % job.seq)
    seen = []
    for job in (jobs[1], jobs[0], jobs[2]):
        assert output.finish(job, 0) == BIG + 3
        # Terminal writes (the progress bar) wait for the output before them.
        output.call(lambda: seen.append(os.fstat(1).st_size))
    output.close()
    captured = capfdbinary.readouterr()
    assert captured.out == b"c" * BIG + b"b" * BIG + b"d" * BIG
    assert captured.err == b"e2\ne1\ne3\n"
    assert seen == [BIG, 2 * BIG, 3 * BIG]


def test_keep_order_with_big_outputs(capfdbinary):
    output = Output("group", keep_order=True, order=[1, 2, 3])
    jobs = [FakeJob(i) for i in (1, 2, 3)]
    fds = [output.open(j) for j in jobs]
    for job, f in zip(jobs, fds):
        write(f, bytes([ord("a") + job.seq]) * BIG)
    for job in (jobs[2], jobs[1], jobs[0]):
        output.finish(job, 0)
    output.close()
    assert capfdbinary.readouterr().out == b"b" * BIG + b"c" * BIG + b"d" * BIG


def test_a_reader_gone_is_reported_once_and_every_file_closed():
    saved = os.dup(1)
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        output = Output("group")
        jobs = [FakeJob(i) for i in (1, 2, 3)]
        fds = [output.open(j) for j in jobs]
        for f in fds:
            write(f, b"x" * BIG)
        output.finish(jobs[0], 0)
        with pytest.raises(BrokenPipeError):
            output.flush()
        output.finish(jobs[1], 0)   # printing is over: only closes its files
        output.close()              # job 3 never ended; nothing raised twice
    finally:
        os.dup2(saved, 1)
        os.close(saved)
