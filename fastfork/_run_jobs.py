"""``fastfork run``'s execution: jobs on the scheduler, with retries, halting and the job log.

``JobRunner`` feeds the jobs to a ``fastfork._scheduler.Scheduler``, which
launches them while there are free slots, waits out process and fd
shortages (a low ``ulimit -n`` slows launching, it fails no job), enforces
timeouts and stops everything on Ctrl-C. This module only says how one job
is launched (its slot, its command, where its output goes) and what happens
when it ends: retry it (the job is added again), record it (job log,
output), and halt when --halt says so (stop launching, or close).
"""
import dataclasses
import errno
import heapq
import os
import time

from fastfork import commands
from fastfork._scheduler import Scheduler, drive

__all__ = ["JobRunner", "Outcome"]

# How often running jobs' output is looked at with --line-buffer.
_LINE_POLL = 0.05
# How often a grouped run checks on the thread printing jobs' output: a
# reader that went away (| head) stops the run without waiting for a job to end.
_PRINT_CHECK = 0.5
# The environment variables each job gets (see JobRunner).
_JOB_VARIABLES = ("FASTFORK_SEQ", "FASTFORK_SLOT", "FASTFORK_INDEX")


@dataclasses.dataclass
class Outcome:
    """How a job's final attempt ended."""

    job: object                # the _run_input.Job
    returncode: int            # -N: killed by signal N; 127/126: could not start
    runtime: float             # seconds
    start_time: float          # seconds since the epoch
    timed_out: bool = False
    error: OSError = None      # the command could not be started
    attempts: int = 1

    @property
    def seq(self):
        return self.job.seq

    @property
    def command(self):
        """The command as one shell-quoted line (bytes), as in the job log."""
        return self.job.describe()

    @property
    def ok(self):
        """True if the job ran, was not stopped for its timeout, and exited 0."""
        return self.returncode == 0 and not self.timed_out and self.error is None


class JobRunner:
    """Runs ``jobs`` (``_run_input.Job``) at most ``slots`` at once.

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
        self.halted = None         # "soon" or "now" once --halt stopped the run
        self.stopped = []          # seqs stopped by --halt now: not recorded, rerun on resume
        self.not_run = []          # jobs never started
        # Without this run's variables: a nested run must see its own values, not ours.
        self._base_env = commands._encode_env(
            {k: v for k, v in env.items() if k not in _JOB_VARIABLES})
        self._free_slots = []      # heap of free slot numbers
        self._attempts = {}        # seq -> attempts so far
        self._start_times = {}     # seq -> wall-clock start of the current attempt
        self._slots = {}           # seq -> slot of the current attempt
        self._pending = 0          # jobs without a final outcome (retries may still come)
        self._scheduler = None
        self._stdin = -1           # /dev/null, opened once for every job

    # ------------------------------------------------------------ one attempt

    def _launch(self, job):
        """Start ``job`` in the lowest free slot; return its Process.

        Raises OSError (as the scheduler expects) with the slot freed and
        nothing left open.
        """
        slot = self._take_slot()
        try:
            argv = job.command(slot)
            seq = job.seq
            command = commands._prepare(argv)._replace(
                envp=self._base_env + [b"FASTFORK_SEQ=%d" % seq, b"FASTFORK_SLOT=%d" % slot,
                                       b"FASTFORK_INDEX=%d" % (seq - 1)])
            out, err = self.output.open(job)
            try:
                self._start_times[seq] = time.time()
                process = commands._start(command, (self._stdin, out, err),
                                          die_with_parent=True)
            except BaseException:
                self.output.finish(job)
                raise
        except BaseException:
            self._release(slot)
            raise
        self._slots[seq] = slot
        return process

    def _take_slot(self):
        """The lowest free slot number.

        A slot is freed when its job is handled; the scheduler may launch
        while other jobs that ended in the same step wait to be handled:
        their slots are taken back here.
        """
        if not self._free_slots:
            running = {entry.task.seq for entry in self._scheduler.running}
            for seq in [seq for seq in self._slots if seq not in running]:
                self._release(self._slots.pop(seq))
        return heapq.heappop(self._free_slots)

    def _release(self, slot):
        heapq.heappush(self._free_slots, slot)

    def _ended(self, entry, scheduler):
        """Handle a finished attempt: retry it, or record the job's outcome.

        The next job is launched before this one's output is printed, so a
        slot never waits while megabytes of output are copied.
        """
        job = entry.task
        seq = job.seq
        slot = self._slots.pop(seq, None)
        if slot is not None:
            self._release(slot)
        if entry.error is not None:
            returncode = 127 if entry.error.errno in (errno.ENOENT, errno.ENOTDIR) else 126
            runtime = 0.0
        else:
            returncode = entry.handle.returncode
            runtime = entry.finished_at - entry.started_at
        outcome = Outcome(job, returncode, runtime, self._start_times.pop(seq, time.time()),
                          entry.timed_out, entry.error)
        attempts = self._attempts.get(seq, 0) + 1
        self._attempts[seq] = attempts
        if not outcome.ok and attempts <= self.retries and self.halted is None:
            self.output.finish(job)   # this attempt's output is dropped
            scheduler.add(job)
            scheduler.fill()
            return
        outcome.attempts = attempts
        self.outcomes[seq] = outcome
        if outcome.ok:
            self.succeeded += 1
            self.timeout.add_success(runtime)
        else:
            self.failed += 1
        self._pending -= 1
        if not self._pending:
            scheduler.close_input()
        if self.timeout.dynamic:
            self._update_timeout(scheduler)
        self._halt(scheduler)
        scheduler.fill()
        received = self.output.finish(job, returncode)
        if self.joblog is not None:
            self.joblog.record(seq, outcome.start_time, runtime, received, returncode,
                               outcome.command, outcome.timed_out)
        self.on_done(outcome)

    def _halt(self, scheduler):
        """Apply --halt once its condition holds."""
        if self.halted is not None or not self.halt.reached(self.failed, self.succeeded,
                                                            len(self.jobs)):
            return
        self.halted = self.halt.when
        scheduler.stop_launching()
        if self.halted == "now":
            running = [entry.task for entry in scheduler.running]
            scheduler.close()
            for job in running:
                self.output.finish(job)
                self.stopped.append(job.seq)

    def _update_timeout(self, scheduler):
        """With a timeout relative to the median run time: apply its new value."""
        limit = self.timeout.limit()
        if limit == scheduler.timeout:
            return
        scheduler.timeout = limit
        for entry in scheduler.running:
            scheduler.set_timeout(entry, limit)

    # ------------------------------------------------------------ the run

    def run(self, slots):
        """Run the jobs; return when all have ended or the run halted.

        On any exception (Ctrl-C) every running job is stopped and reaped,
        its output dropped, before it propagates.
        """
        self._free_slots = list(range(1, slots + 1))
        self._scheduler = scheduler = Scheduler(
            self._launch, None, jobs=slots, timeout=self.timeout.limit(), stop_on_failure=False)
        for job in self.jobs:
            scheduler.add(job)
        self._pending = len(self.jobs)   # jobs without a final outcome: retries may come
        if not self._pending:
            scheduler.close_input()
        every = {"line": _LINE_POLL, "group": _PRINT_CHECK}.get(self.output.mode)
        self._stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for entry in drive(scheduler, every=every):
                if entry is None:
                    self.output.poll()
                    continue
                self._ended(entry, scheduler)
        finally:
            os.close(self._stdin)
        self.not_run = [entry.task for entry in scheduler.queued]
        return self.not_run
