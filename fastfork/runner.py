"""``fastfork run``: run commands in parallel, like xargs -P and GNU parallel.

    fastfork run [OPTIONS] -- COMMAND ARGS...  < items      one job per input line
    fastfork run [OPTIONS] -- COMMAND ARGS... ::: A B C     one job per item given here
    fastfork run [OPTIONS] -a FILE -- COMMAND ARGS...       one job per line of FILE
    fastfork run [OPTIONS] -n COUNT -- COMMAND ARGS...      COUNT jobs, {} is 0..COUNT-1
    fastfork run [OPTIONS] < commands.txt                   each line is a command

Input. With a COMMAND, each item (a line, or with -0 a NUL-separated item)
is put in place of {} in ARGS, or appended when ARGS have no replacement
string (as xargs). Replacement strings: {} the item, {.} without extension,
{/} basename, {//} directory, {/.} basename without extension, {#} job
number (from 1), {%} slot number (1..JOBS). An unknown one ({1}, {..}) is an
error. Standard input is read only when no other input (-n, -a, :::) is
given and it is not a terminal; a COMMAND with no input at all runs once.
Input is read to the end before the first job starts. Without a COMMAND
each item is a command line, run by $SHELL -c (or /bin/sh), or, with
--no-shell, split into words like a shell (no expansion) and run directly;
blank lines and lines starting with # are skipped. Jobs read /dev/null and
get FASTFORK_SEQ ({#}), FASTFORK_SLOT ({%}) and FASTFORK_INDEX ({#} - 1)
in their environment.

Output. By default each job's stdout and stderr go to temporary files (in
memory, or in --tmpdir DIR) and are printed whole when the job ends: jobs
never mix, even for megabytes.
--line-buffer prints whole lines as they come; --ungroup lets jobs write
directly (fastest; lines may mix). -k/--keep-order prints jobs in input
order; --tag puts the item and a TAB before each line. --results DIR keeps
each job's output in DIR/N/stdout and DIR/N/stderr, its command in
DIR/N/cmd and, once it has ended, its exit status in DIR/N/exitval (-S when
killed by signal S); N is the job number.

Control. Every job runs even if others fail; --halt stops early: soon
(start no new job) or now (stop the running ones too), after fail=N,
success=N or done=N jobs, or N% of all jobs (--halt soon,fail=1,
--halt now,fail=10%). --retries N runs a failing job up to N more times.
--timeout S stops a job after S seconds (SIGTERM, then SIGKILL); 200%
means twice the median run time of the jobs that succeeded so far (from 3
on). --joblog FILE writes one tab-separated line per job (GNU parallel's
columns); --resume skips the jobs it lists, --resume-failed only those that
succeeded (give the same input again). A summary goes to stderr at the end
(--quiet drops it); a progress bar with an ETA is shown when stderr is a
terminal (--bar / --no-bar to choose).

Exit status: 0 if every job succeeded, else the number of failed jobs (at
most 101); 2 for a usage error; 130 after Ctrl-C, which stops every job
(the job log and results stay whole: a job without a line or an exitval
did not finish, and --resume runs it again); 141 when whoever reads the
output goes away (| head), which stops every job too.

Examples:
    find . -name '*.log' | fastfork run -j 8 -- gzip
    fastfork run -k --tag -- wc -l {} ::: *.txt
    find . -print0 | fastfork run -0 --joblog jobs.tsv -- convert {} {.}.png
    fastfork run --joblog jobs.tsv --resume-failed -- convert {} {.}.png ::: *.jpg
    fastfork run --halt now,fail=1 --timeout 300% < tests.txt
"""
import argparse
import os
import sys
import time

from fastfork._checks import check_jobs
from fastfork._joblog import JobLog, read_joblog
from fastfork._run_control import Bar, Timeout, exit_status, parse_halt, parse_timeout
from fastfork._run_input import Template, command_jobs, count_jobs, item_jobs, split_items
from fastfork._run_jobs import JobRunner
from fastfork._run_output import Output, write_all
from fastfork.errors import describe_status

__all__ = ["add_arguments", "build_parser", "main"]

_MAX_LISTED = 10
_ITEMS_MARK = ":::"


def add_arguments(parser):
    """Add ``fastfork run``'s options and arguments to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[2]
    add = parser.add_argument
    add("-j", "--jobs", type=int, default=None,
        help="jobs running at once (default: CPU count)")
    source = parser.add_argument_group("input")
    source.add_argument("-n", "--count", type=int, default=None,
                        help="run COMMAND COUNT times, {} = 0..COUNT-1 (stdin is not read)")
    source.add_argument("-a", "--arg-file", metavar="FILE",
                        help="read items from FILE instead of stdin ('-' is stdin)")
    source.add_argument("-0", "--null", action="store_true",
                        help="items are separated by NUL bytes, not newlines")
    source.add_argument("--no-shell", action="store_true",
                        help="run input command lines directly (split like a shell) "
                             "instead of through $SHELL -c")
    out = parser.add_argument_group("output")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--group", dest="mode", action="store_const", const="group",
                      help="print each job's output whole when it ends (default)")
    mode.add_argument("--line-buffer", "--lb", dest="mode", action="store_const",
                      const="line", help="print whole lines as they come")
    mode.add_argument("-u", "--ungroup", dest="mode", action="store_const", const="ungroup",
                      help="jobs write straight to stdout/stderr (lines may mix)")
    parser.set_defaults(mode="group")
    out.add_argument("-k", "--keep-order", action="store_true",
                     help="print jobs' output in input order")
    out.add_argument("--tag", action="store_true",
                     help="prefix each output line with the item and a TAB")
    out.add_argument("--results", metavar="DIR",
                     help="also keep each job's stdout, stderr, cmd and exitval in DIR/N/")
    out.add_argument("--tmpdir", metavar="DIR",
                     help="hold running jobs' output in files in DIR instead of in memory")
    out.add_argument("--quiet", action="store_true", help="print no summary")
    bar = out.add_mutually_exclusive_group()
    bar.add_argument("--bar", dest="bar", action="store_true", default=None,
                     help="show a progress bar with an ETA on stderr "
                          "(default: when stderr is a terminal)")
    bar.add_argument("--no-bar", dest="bar", action="store_false", help="never show it")
    out.add_argument("--dry-run", action="store_true",
                     help="print the commands that would run, run nothing")
    ctl = parser.add_argument_group("control")
    ctl.add_argument("--timeout", metavar="S|P%",
                     help="stop a job after S seconds, or P%% of the median run time")
    ctl.add_argument("--retries", type=int, default=0, metavar="N",
                     help="run a failing job up to N more times")
    ctl.add_argument("--halt", default="never", metavar="WHEN,WHY=N",
                     help="stop early: never (default), soon|now,fail|success|done=N or N%%")
    ctl.add_argument("--joblog", metavar="FILE", help="write one line per finished job")
    resume = ctl.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="skip the jobs the --joblog lists")
    resume.add_argument("--resume-failed", action="store_true",
                        help="skip the jobs the --joblog lists as succeeded")
    ctl.add_argument("--keep-going", action="store_true",
                     help="accepted for compatibility: every job runs unless --halt says "
                          "otherwise")
    # dest "argv": fastfork.cli keeps the subcommand's name in "command".
    add("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
        help="-- COMMAND ARGS... [::: ITEM...] (without it: each item is a command)")
    return parser


def build_parser():
    """Return a stand-alone parser for ``fastfork run``."""
    parser = argparse.ArgumentParser(prog="fastfork run", description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


# ---------------------------------------------------------------- planning

def _check_options(args, command, listed):
    """Raise ValueError for a bad option or combination."""
    if args.jobs is not None:
        check_jobs(args.jobs)
    if args.count is not None and args.count < 0:
        raise ValueError(f"-n must be >= 0, not {args.count}")
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, not {args.retries}")
    sources = [name for name, given in (("-n", args.count is not None),
                                        ("-a", args.arg_file is not None),
                                        (_ITEMS_MARK, listed is not None)) if given]
    if len(sources) > 1:
        raise ValueError(f"{' and '.join(sources)} both give the input: use one")
    if args.count is not None and not command:
        raise ValueError("-n needs a command (fastfork run -n COUNT -- COMMAND ...)")
    if args.null and (args.count is not None or listed is not None):
        raise ValueError("-0 applies to input read from stdin or -a")
    if args.no_shell and command:
        raise ValueError("--no-shell applies to command lines read as input (no COMMAND)")
    if args.mode == "ungroup":
        for flag, given in (("-k/--keep-order", args.keep_order), ("--tag", args.tag),
                            ("--results", args.results is not None),
                            ("--tmpdir", args.tmpdir is not None)):
            if given:
                raise ValueError(f"{flag} needs the output captured: not with --ungroup")
    if args.tmpdir is not None and not os.path.isdir(args.tmpdir):
        raise ValueError(f"--tmpdir {args.tmpdir}: not a directory")
    if (args.resume or args.resume_failed) and not args.joblog:
        raise ValueError("--resume and --resume-failed need --joblog FILE")


def _read_input(args, stdin):
    """Return the input's items (bytes), from -a FILE or stdin."""
    if args.arg_file is not None:
        if args.arg_file == "-":
            return _read_stream(stdin, args, "stdin")
        try:
            with open(args.arg_file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"-a {args.arg_file}: {exc.strerror}") from None
        return split_items(data, b"\0" if args.null else b"\n", args.arg_file)
    return _read_stream(stdin, args, "stdin")


def _read_stream(stdin, args, what):
    if stdin is None:  # fd 0 closed: no input
        return []
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else os.fsencode(stdin.read())
    return split_items(data, b"\0" if args.null else b"\n", what)


def _stdin_has_input(stdin):
    """False when stdin is closed or a terminal: then a COMMAND runs without input."""
    if stdin is None:
        return False
    try:
        return not stdin.isatty()
    except (AttributeError, ValueError):
        return False


def plan(args, stdin):
    """Return the list of jobs ``args`` ask for. Raises ValueError for bad input."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    listed = None
    if _ITEMS_MARK in argv:
        at = argv.index(_ITEMS_MARK)
        argv, listed = argv[:at], argv[at + 1:]
        if _ITEMS_MARK in listed:
            raise ValueError(f"only one {_ITEMS_MARK} list is supported")
    _check_options(args, argv, listed)
    if listed is not None:
        items = [os.fsencode(item) for item in listed]
    elif args.count is not None:
        items = None
    elif args.arg_file is not None or not argv or _stdin_has_input(stdin):
        items = _read_input(args, stdin)
    else:
        items = None  # a command, and no input: it runs once
    if not argv:
        shell = None if args.no_shell else (os.environ.get("SHELL") or "/bin/sh")
        return command_jobs(items, shell, args.arg_file or ("arguments" if listed is not None
                                                           else "stdin"))
    template = Template(argv)
    if items is None:
        return count_jobs(template, 1 if args.count is None else args.count)
    return item_jobs(template, items)


def _resumed(args, jobs):
    """Split ``jobs`` into (to run, skipped) by the job log of an earlier run."""
    if not (args.resume or args.resume_failed):
        return jobs, []
    done = read_joblog(args.joblog)
    skip = {seq for seq, ok in done.items() if ok or args.resume}
    return [j for j in jobs if j.seq not in skip], [j for j in jobs if j.seq in skip]


# ---------------------------------------------------------------- running

def _describe(outcome):
    if outcome.error is not None:
        error = outcome.error
        name = f": {os.fsdecode(error.filename)}" if error.filename is not None else ""
        return f"could not start: {error.strerror}{name}"
    if outcome.timed_out:
        return f"timed out ({describe_status(outcome.returncode)})"
    return describe_status(outcome.returncode)


def _summary(runner, skipped, not_run, elapsed, halt_text):
    """The summary lines: counts, why the run halted, the slowest and the failed jobs."""
    outcomes = list(runner.outcomes.values())
    failed = [o for o in outcomes if not o.ok]
    line = f"fastfork run: ran {len(outcomes)}, failed {len(failed)}"
    if skipped:
        line += f", skipped {skipped} (done in the job log)"
    if runner.stopped:
        line += f", stopped {len(runner.stopped)}"
    if not_run:
        line += f", not run {not_run}"
    lines = [f"{line}, total {elapsed:.3f} s"]
    if runner.halted:
        lines.append(f"  halted: --halt {halt_text} reached")
    started = [o for o in outcomes if o.error is None]
    if started:
        slowest = max(started, key=lambda o: o.runtime)
        lines.append(f"  slowest: [{slowest.seq}] {slowest.runtime:.3f} s  "
                     f"{os.fsdecode(slowest.command)}")
    for outcome in failed[:_MAX_LISTED]:
        lines.append(f"  failed:  [{outcome.seq}] {_describe(outcome)}  "
                     f"{os.fsdecode(outcome.command)}")
    if len(failed) > _MAX_LISTED:
        lines.append(f"  ... and {len(failed) - _MAX_LISTED} more failed")
    return "".join(f"{line}\n" for line in lines)


def _run(args, jobs, skipped, halt, timeout):
    """Run ``jobs``; return the exit status."""
    stderr = sys.stderr
    slots = check_jobs(args.jobs)
    show_bar = stderr.isatty() if args.bar is None else args.bar
    bar = Bar(len(jobs), stderr) if show_bar else None
    sys.stdout.flush()
    output = Output(args.mode, args.keep_order, args.tag, args.results,
                    order=[j.seq for j in jobs], before_write=bar.clear if bar else None,
                    tmpdir=args.tmpdir)
    joblog = None
    started = time.monotonic()
    try:
        if args.joblog:
            joblog = JobLog(args.joblog, resume=args.resume or args.resume_failed)
        # The bar is drawn in its turn between jobs' output (see Output.call).
        on_done = ((lambda outcome: output.call(bar.update, outcome.ok)) if bar
                   else (lambda outcome: None))
        runner = JobRunner(jobs, env=os.environ, output=output, joblog=joblog, halt=halt,
                           timeout=timeout, retries=args.retries, on_done=on_done)
        not_run = runner.run(slots)
        for job in not_run:
            output.skip(job.seq)
        for seq in runner.stopped:
            output.skip(seq)
        output.flush()
    except KeyboardInterrupt:
        _finish(output, joblog, bar)
        stderr.write("fastfork run: interrupted; every job was stopped\n")
        return 130
    except BrokenPipeError:
        # Whoever read our output has gone (fastfork run ... | head): stop quietly.
        _finish(output, joblog, bar, discard=True)
        return 141
    _finish(output, joblog, bar)
    if not args.quiet:
        stderr.write(_summary(runner, len(skipped), len(not_run),
                              time.monotonic() - started, args.halt))
        stderr.flush()
    return exit_status(runner.failed)


def _finish(output, joblog, bar, discard=False):
    """Print what is held, close the job log, take the bar off the line."""
    try:
        if discard:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        output.close()
    finally:
        if joblog is not None:
            joblog.close()
        if bar is not None:
            bar.clear()


def _dry_run(jobs, slots):
    for job in jobs:
        write_all(1, job.describe((job.seq - 1) % slots + 1) + b"\n")
    return 0


def main(args):
    """Run ``fastfork run`` with parsed ``args``; return the exit status."""
    stderr = sys.stderr
    try:
        halt = parse_halt(args.halt)
        timeout = parse_timeout(args.timeout) if args.timeout is not None else Timeout()
        jobs = plan(args, sys.stdin)
        jobs, skipped = _resumed(args, jobs)
    except ValueError as exc:
        stderr.write(f"fastfork run: {exc}\n")
        return 2
    if args.dry_run:
        sys.stdout.flush()
        return _dry_run(jobs, check_jobs(args.jobs))
    try:
        return _run(args, jobs, skipped, halt, timeout)
    except OSError as exc:
        # The job log or the results directory could not be written.
        stderr.write(f"fastfork run: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
