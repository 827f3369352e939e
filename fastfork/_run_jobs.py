"""``fastfork run``'s execution: launch each job, record how it ended, retry, halt.

One ``JobRunner`` runs a list of ``_run_input.Job``: it starts a job's
command in a free slot with its output routed by ``_run_output.Output``,
writes the job log line when it ends, retries a failed job up to
``retries`` times and applies --halt.
"""
import dataclasses
import errno
import time

from fastfork import commands
from fastfork.child import stop_all, wait_all
from fastfork.errors import RETRYABLE_FORK_ERRNOS

__all__ = ["JobRunner", "Outcome"]

# Out of processes or of fds: wait for a running job to end, then try again.
_THROTTLE_ERRNOS = frozenset(RETRYABLE_FORK_ERRNOS) | {errno.EMFILE, errno.ENFILE}
_GRACE = 1.0  # SIGTERM -> SIGKILL for a job past its timeout or stopped by --halt now


@dataclasses.dataclass
class Outcome:
    """How a job ended: ``returncode`` (-N: signal N), run time, and why."""

    seq: int
    returncode: int
    runtime: float
    start_time: float          # seconds since the epoch
    timed_out: bool = False
    error: OSError = None      # the command could not be started
    attempts: int = 1
    command: bytes = b""

    @property
    def ok(self):
        return self.returncode == 0


class JobRunner:
    """Runs jobs at most ``jobs`` at once; see the module docstring.

    ``env``: the environment (a mapping) every job gets, plus FASTFORK_SEQ
    ({#}), FASTFORK_SLOT ({%}) and FASTFORK_INDEX ({#} - 1). ``output`` an
    ``Output``, ``joblog`` a ``JobLog`` or None, ``halt`` a ``Halt``,
    ``timeout`` a ``Timeout``, ``retries`` an int >= 0, ``on_done`` a
    callable(outcome) run after each job's final attempt.
    """

    def __init__(self, jobs, *, env, output, joblog, halt, timeout, retries, on_done):
        self.jobs = jobs
        self.output = output
        self.joblog = joblog
        self.halt = halt
        self.timeout = timeout
        self.retries = retries
        self.on_done = on_done
        self.outcomes = {}         # seq -> Outcome of the final attempt
        self.failed = self.succeeded = 0
        self.halted = None         # "soon"/"now" once --halt stopped the run
        self.stopped = []          # seqs stopped by --halt now (not recorded: rerun on resume)
        self._base_env = commands._encode_env(env)
        self._attempts = {}

    # ------------------------------------------------------------ one job

    def _launch(self, job, slot):
        """Start ``job`` in ``slot``; return its Process. Raises OSError (nothing left open)."""
        argv = job.command(slot)
        seq = job.seq
        command = dataclasses.replace(
            commands._prepare(argv),
            envp=self._base_env + [b"FASTFORK_SEQ=%d" % seq, b"FASTFORK_SLOT=%d" % slot,
                                   b"FASTFORK_INDEX=%d" % (seq - 1)])
        out, err = self.output.open(job)
        try:
            return commands._start(command, (commands.DEVNULL, out, err))
        except BaseException:
            self.output.finish(job)
            raise

    def _ended(self, job, returncode, started, start_time, timed_out=False, error=None):
        """Record one attempt; return True if the job is retried."""
        runtime = time.monotonic() - started
        attempts = self._attempts.get(job.seq, 0) + 1
        self._attempts[job.seq] = attempts
        if returncode != 0 and attempts <= self.retries:
            self.output.finish(job)   # discard this attempt's output
            return True
        outcome = Outcome(job.seq, returncode, runtime, start_time, timed_out, error,
                          attempts, job.describe())
        received = self.output.finish(job, returncode)
        if self.joblog is not None:
            self.joblog.record(job.seq, start_time, runtime, received, returncode,
                               outcome.command)
        if outcome.ok:
            self.succeeded += 1
            self.timeout.add_success(runtime)
        else:
            self.failed += 1
        self.outcomes[job.seq] = outcome
        self.on_done(outcome)
        if self.halted is None and self.halt.reached(self.failed, self.succeeded,
                                                     len(self.jobs)):
            self.halted = self.halt.when
        return False

    # ------------------------------------------------------------ the loop

    def run(self, slots):
        """Run every job, at most ``slots`` at once; return when all ended or the run halted.

        On any exception (Ctrl-C) every running job is stopped and reaped,
        its output discarded, before it propagates.
        """
        pending = list(reversed(self.jobs))   # popped from the end: input order
        free = list(range(slots, 0, -1))      # slot numbers, lowest popped first
        running = {}                          # Process -> (job, slot, started, start_time)
        try:
            while True:
                while pending and free and self.halted is None:
                    job = pending.pop()
                    slot = free.pop()
                    started, start_time = time.monotonic(), time.time()
                    try:
                        proc = self._launch(job, slot)
                    except OSError as exc:
                        if exc.errno in _THROTTLE_ERRNOS and running:
                            pending.append(job)
                            free.append(slot)
                            break
                        free.append(slot)
                        code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
                        if self._ended(job, code, started, start_time, error=exc):
                            pending.append(job)
                        continue
                    running[proc] = (job, slot, started, start_time)
                if not running:
                    break
                limit = self.timeout.limit()
                wait_for = None
                if limit is not None:
                    first = min(s for _, _, s, _ in running.values())
                    wait_for = max(0.0, first + limit - time.monotonic())
                if self.output.mode == "line":
                    wait_for = 0.05 if wait_for is None else min(wait_for, 0.05)
                wait_all(list(running), wait_for, until_any=True)
                self.output.poll()
                now = time.monotonic()
                for proc in list(running):
                    job, slot, started, start_time = running[proc]
                    timed_out = False
                    if not proc.finished:
                        if limit is None or now < started + limit:
                            continue
                        timed_out = True
                        stop_all([proc], _GRACE)
                    del running[proc]
                    free.append(slot)
                    free.sort(reverse=True)
                    if self._ended(job, proc.returncode, started, start_time, timed_out):
                        pending.append(job)
                if self.halted == "now" and running:
                    stop_all(list(running), _GRACE)
                    for proc, (job, *_rest) in running.items():
                        self.output.finish(job)
                        self.stopped.append(job.seq)
                    running.clear()
            return [job for job in reversed(pending)]
        finally:
            if running:
                stop_all(list(running), _GRACE)
                for job, *_rest in running.values():
                    self.output.finish(job)
