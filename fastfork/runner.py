"""``fastfork run``: run a command many times, or one command per stdin line, in parallel.

    fastfork run [-j JOBS] [-n COUNT] [--timeout S] [--keep-going] -- COMMAND ARGS...
    fastfork run [-j JOBS] [--timeout S] [--keep-going] < commands.txt

With a command, it runs COUNT times; run i sees FASTFORK_INDEX=i in its
environment and ``{}`` in ARGS replaced by i. Without one, every non-blank
line of stdin not starting with ``#`` is a command, split like a shell does
(no expansion), as ``xargs -P``. Commands get /dev/null as stdin and share
this process's stdout and stderr. Without ``--keep-going`` the first failure
stops new launches (running commands finish). A progress line is shown when
stderr is a terminal; a summary is printed to stderr at the end.

Exit status: 0 if every command succeeded, 1 if any failed, timed out or
could not start, 2 for a usage error, 130 after Ctrl-C.
"""
import argparse
import os
import shlex
import sys
import time

from fastfork.errors import describe_status
from fastfork.commands import spawn_many

__all__ = ["add_arguments", "build_parser", "main"]

_MAX_LISTED = 10


def add_arguments(parser):
    """Add ``fastfork run``'s options and arguments to ``parser``."""
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="commands running at once (default: CPU count)")
    parser.add_argument("-n", "--count", type=int, default=None,
                        help="run COMMAND this many times (default 1)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop a command after S seconds (SIGTERM, then SIGKILL)")
    parser.add_argument("-k", "--keep-going", action="store_true",
                        help="go on launching after a command fails")
    # dest "argv": fastfork.cli keeps the subcommand's name in "command".
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="-- COMMAND ARGS... (without it: one command per stdin line)")
    return parser


def build_parser():
    """Return a stand-alone parser for ``fastfork run``."""
    parser = argparse.ArgumentParser(
        prog="fastfork run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def _commands_from_args(command, count):
    """COUNT copies of ``command`` with ``{}`` in its arguments replaced by the index."""
    program, args = command[0], command[1:]
    return [[program] + [a.replace("{}", str(i)) for a in args] for i in range(count)]


def _commands_from_lines(lines):
    """Parse one command per line (shell-style words); ValueError names a bad line."""
    commands = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ValueError(f"stdin line {number}: {exc}: {line.rstrip()!r}") from None
        commands.append(words)
    return commands


class _Progress:
    """The one-line progress display on a terminal."""

    def __init__(self, total, stream):
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty()
        self.done = self.failed = 0

    def update(self, result):
        self.done += 1
        self.failed += not result.ok
        if self.enabled:
            self.stream.write(f"\r\x1b[K[{self.done}/{self.total}] {self.failed} failed")
            self.stream.flush()

    def clear(self):
        if self.enabled and self.done:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _describe(result):
    if result.error is not None:
        return f"could not start: {result.error}"
    if result.timed_out:
        return f"timed out ({describe_status(result.returncode)})"
    return describe_status(result.returncode)


def _summary(commands, results, elapsed, stream):
    """Write: ran, failed, not run, the slowest command and the total time."""
    ran = [(i, r) for i, r in enumerate(results) if r is not None]
    failed = [(i, r) for i, r in ran if not r.ok]
    not_run = len(results) - len(ran)
    line = f"fastfork run: ran {len(ran)}, failed {len(failed)}"
    if not_run:
        line += f", not run {not_run}"
    stream.write(f"{line}, total {elapsed:.3f} s\n")
    if ran:
        i, slowest = max(ran, key=lambda item: item[1].duration)
        stream.write(f"  slowest: [{i}] {slowest.duration:.3f} s  {shlex.join(commands[i])}\n")
    for i, result in failed[:_MAX_LISTED]:
        stream.write(f"  failed:  [{i}] {_describe(result)}  {shlex.join(commands[i])}\n")
    if len(failed) > _MAX_LISTED:
        stream.write(f"  ... and {len(failed) - _MAX_LISTED} more failed\n")


def main(args):
    """Run ``fastfork run`` with parsed ``args``; return the exit status."""
    stderr = sys.stderr
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    try:
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"-j must be >= 1, not {args.jobs}")
        if command:
            count = 1 if args.count is None else args.count
            if count < 0:
                raise ValueError(f"-n must be >= 0, not {count}")
            commands = _commands_from_args(command, count)
        else:
            if args.count is not None:
                raise ValueError("-n needs a command (fastfork run -n COUNT -- COMMAND ...)")
            commands = _commands_from_lines(sys.stdin)
    except ValueError as exc:
        stderr.write(f"fastfork run: {exc}\n")
        return 2

    progress = _Progress(len(commands), stderr)
    results = []
    started = time.monotonic()
    try:
        results = spawn_many(
            commands, jobs=args.jobs, timeout=args.timeout, keep_going=args.keep_going,
            env=lambda i: dict(os.environ, FASTFORK_INDEX=str(i)),
            callback=lambda i, result: progress.update(result))
    except KeyboardInterrupt:
        progress.clear()
        stderr.write("fastfork run: interrupted; every command was stopped\n")
        return 130
    except (TypeError, ValueError) as exc:
        stderr.write(f"fastfork run: {exc}\n")
        return 2
    progress.clear()
    _summary(commands, results, time.monotonic() - started, stderr)
    return 0 if all(r is not None and r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
