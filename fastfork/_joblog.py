"""``fastfork run --joblog``: one line per finished job, in GNU parallel's format.

The file is tab-separated with the header GNU parallel writes::

    Seq  Host  Starttime  JobRuntime  Send  Receive  Exitval  Signal  Command

Host is ``:`` (this machine), Starttime seconds since the epoch, JobRuntime
seconds, Send 0 (jobs get no input), Receive the bytes of output the job
wrote when its output was captured (0 with --ungroup). A job killed by a
signal, or stopped for its timeout, has Exitval -1 (and the signal's number
in Signal); a program that could not be started has Exitval 127 (not
found) or 126.

Each line is written with one ``write`` to a file opened with O_APPEND, so
an interrupted run never leaves half a line; reading ignores a trailing
partial line anyway (a crash of the machine can still cut one).
"""
import os

__all__ = ["HEADER", "JobLog", "read_joblog", "log_fields"]

HEADER = b"Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"


def log_fields(returncode, timed_out=False):
    """Return (Exitval, Signal) for a Popen-style ``returncode`` (-N: killed by signal N)."""
    if returncode < 0:
        return -1, -returncode
    return (-1 if timed_out else returncode), 0


def read_joblog(path):
    """Return {seq: succeeded} for the jobs recorded in the job log at ``path``.

    A job recorded several times keeps its last outcome. A missing file gives
    {}. Raises ValueError for a file that is not a job log.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    lines = data.split(b"\n")
    lines.pop()  # b"" after the last newline, or a line cut short: not recorded
    if lines and lines[0] + b"\n" == HEADER:
        lines = lines[1:]
    elif lines:
        raise ValueError(f"{os.fsdecode(path)} is not a job log (it does not start with "
                         "the header line Seq, Host, Starttime, ...)")
    done = {}
    for number, line in enumerate(lines, 2):
        fields = line.split(b"\t", 8)
        try:
            seq, exitval, signal = int(fields[0]), int(fields[6]), int(fields[7])
        except (ValueError, IndexError):
            raise ValueError(f"{os.fsdecode(path)} line {number}: not a job log line: "
                             f"{line[:80]!r}") from None
        done[seq] = exitval == 0 and signal == 0
    return done


class JobLog:
    """An open job log: ``record`` writes one line per finished job.

    ``resume``: append to an existing log (writing the header only if it is
    empty) instead of starting a new one. Raises OSError if the file cannot
    be opened.
    """

    def __init__(self, path, resume=False):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if not resume:
            flags |= os.O_TRUNC
        self._fd = os.open(path, flags, 0o666)
        try:
            if resume:
                self._end_partial_line(path)
            if not os.fstat(self._fd).st_size:
                os.write(self._fd, HEADER)
        except BaseException:
            os.close(self._fd)
            raise

    def _end_partial_line(self, path):
        """Drop a last line cut short, so that new lines start at a line boundary."""
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            os.truncate(self._fd, data.rfind(b"\n") + 1)

    def record(self, seq, start_time, runtime, received, returncode, command, timed_out=False):
        """Write the line of job ``seq``; ``command`` is bytes (one line)."""
        exitval, signal = log_fields(returncode, timed_out)
        line = b"%d\t:\t%.3f\t%10.3f\t0\t%d\t%d\t%d\t%s\n" % (
            seq, start_time, runtime, received, exitval, signal, command)
        os.write(self._fd, line)

    def close(self):
        """Close the file (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
