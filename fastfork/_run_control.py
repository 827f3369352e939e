"""``fastfork run``'s control: --halt, --timeout (seconds or % of the median), the bar.

The parsers raise ValueError with a message for the user; the runner turns
it into a usage error (exit status 2) before any job starts.
"""
import dataclasses
import math
import bisect
import shutil
import time

__all__ = ["Halt", "parse_halt", "Timeout", "parse_timeout", "Bar", "exit_status"]

# parallel's exit status for "more than 100 jobs failed".
MAX_FAILED_STATUS = 101

# GNU parallel's older numeric forms of --halt.
_HALT_ALIASES = {"0": "never", "1": "soon,fail=1", "2": "now,fail=1",
                 "-1": "soon,success=1", "-2": "now,success=1"}


@dataclasses.dataclass(frozen=True)
class Halt:
    """When to stop: ``when`` is "never", "soon" (start no new job) or "now" (stop all).

    ``why`` is "fail", "success" or "done"; the threshold is ``count`` jobs,
    or ``percent`` of all the jobs when that is given.
    """

    when: str = "never"
    why: str = "fail"
    count: int = 0
    percent: float = None

    def reached(self, failed, succeeded, total):
        """True once the condition holds after ``failed``/``succeeded`` of ``total`` jobs."""
        if self.when == "never":
            return False
        n = {"fail": failed, "success": succeeded, "done": failed + succeeded}[self.why]
        if self.percent is not None:
            return total > 0 and n > 0 and n * 100 >= self.percent * total
        return n >= self.count


def parse_halt(text):
    """Parse a --halt value (``never``, ``soon,fail=3``, ``now,success=10%``, 0/1/2/-1/-2)."""
    text = _HALT_ALIASES.get(text.strip(), text.strip())
    if text.endswith("%") and "," not in text:
        text = "soon,fail=" + text  # parallel's "1-99%" form
    if text == "never":
        return Halt()
    when, _, condition = text.partition(",")
    why, _, value = condition.partition("=")
    if when not in ("soon", "now") or why not in ("fail", "success", "done") or not value:
        raise ValueError(f"--halt {text!r}: expected never, or soon|now,fail|success|done=N "
                         "or =N% (e.g. soon,fail=1 or now,fail=10%)")
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return Halt(when, why, percent=percent)
        count = int(value)
        if count < 1:
            raise ValueError
        return Halt(when, why, count=count)
    except ValueError:
        raise ValueError(f"--halt {text!r}: {why}= takes a count >= 1 or a percentage "
                         "in (0, 100]") from None


class Timeout:
    """A job's time limit: fixed ``seconds``, or ``percent`` of the median run time.

    The median is that of the jobs that succeeded so far; until three have,
    a percentage sets no limit.
    """

    MIN_SAMPLES = 3

    def __init__(self, seconds=None, percent=None):
        self.seconds = seconds
        self.percent = percent
        self._runtimes = []   # sorted

    @property
    def dynamic(self):
        """True if the limit follows the median run time."""
        return self.percent is not None

    def add_success(self, runtime):
        """Count ``runtime`` (seconds) of a job that succeeded."""
        if self.percent is not None:
            bisect.insort(self._runtimes, runtime)

    def limit(self):
        """The limit in seconds now, or None."""
        if self.percent is None:
            return self.seconds
        if len(self._runtimes) < self.MIN_SAMPLES:
            return None
        # The median, without importing statistics (and decimal) into every run.
        runtimes, middle = self._runtimes, len(self._runtimes) // 2
        median = runtimes[middle] if len(runtimes) % 2 else (
            runtimes[middle - 1] + runtimes[middle]) / 2
        return median * self.percent / 100


def parse_timeout(text):
    """Parse --timeout: seconds (``2.5``) or a percentage of the median run time (``200%``)."""
    text = text.strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not (math.isfinite(percent) and percent > 0):
                raise ValueError
            return Timeout(percent=percent)
        seconds = float(text)
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError
        return Timeout(seconds=seconds)
    except ValueError:
        raise ValueError(f"--timeout {text!r}: expected seconds > 0 (e.g. 30 or 0.5) or a "
                         "percentage of the median run time (e.g. 200%)") from None


def exit_status(failed):
    """The runner's exit status for ``failed`` failed jobs: 0, else the count up to 101."""
    return min(failed, MAX_FAILED_STATUS)


class Bar:
    """A one-line progress bar with an ETA, redrawn on ``stream`` (a terminal).

    Redraws at most every ``interval`` seconds; ``clear`` takes it off the
    line before anything else is written to the terminal.
    """

    def __init__(self, total, stream, interval=0.1):
        self.total = total
        self.stream = stream
        self.interval = interval
        self.done = self.failed = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._shown = False

    def update(self, ok):
        """Count one finished job and redraw if it is time."""
        self.done += 1
        self.failed += not ok
        now = time.monotonic()
        if now - self._drawn_at >= self.interval or self.done == self.total:
            self.draw(now)

    def text(self, now, width):
        """The bar's line for ``width`` columns."""
        elapsed = now - self._started
        percent = 100 * self.done // self.total if self.total else 100
        if self.done and self.done < self.total:
            eta = f"ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        else:
            eta = f"{_duration(elapsed)}"
        failed = f", {self.failed} failed" if self.failed else ""
        head = f"{percent:3d}% {self.done}/{self.total}{failed} {eta} "
        room = width - len(head) - 3
        if room < 10:
            return head[:width - 1]
        filled = room * self.done // self.total if self.total else room
        return f"{head}[{'#' * filled}{'.' * (room - filled)}]"

    def draw(self, now=None):
        """Redraw the bar now."""
        now = time.monotonic() if now is None else now
        self._drawn_at = now
        width = shutil.get_terminal_size().columns
        self.stream.write("\r\x1b[K" + self.text(now, width))
        self.stream.flush()
        self._shown = True

    def clear(self):
        """Take the bar off the line (it is drawn again by the next update)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _duration(seconds):
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
