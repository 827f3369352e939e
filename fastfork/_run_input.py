"""``fastfork run``'s input: the items, the replacement strings, the command of each job.

Everything here works on bytes: items are taken byte for byte (a file name
that is not UTF-8 reaches the command unchanged) and arguments given on the
command line are turned back into their original bytes with os.fsencode.

Replacement strings are GNU parallel's:

    {}    the item                    {/}   its basename
    {.}   the item without extension  {//}  its directory name
    {/.}  the basename without extension
    {#}   the job number (1, 2, ...)  {%}   the slot number (1 .. -j)

A brace pair that looks like one of them but is not (``{..}``, ``{1}``,
``{=...=}``) is an error, so that a typo fails before anything runs; other
braces (``awk '{print $1}'``, ``{a,b}``) are left alone.
"""
import os
import re
import shlex

__all__ = ["Template", "Job", "split_items", "item_jobs", "count_jobs", "command_jobs",
           "quote_argv"]

# What is (or looks like) a replacement string: braces around characters of
# the known ones, digits, or a perl expression {= ... =} of GNU parallel.
_CANDIDATE = re.compile(rb"\{[./#%0-9]*\}|\{=.*?=\}")
KNOWN = ("{}", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}")
# GNU parallel's rule for an extension: a dot and what follows it in the last
# path component (so "a.b/c" has none and ".bashrc" is all extension).
_EXTENSION = re.compile(rb"\.[^/.]*\Z")


def _basename(item):
    return item.rpartition(b"/")[2]


def _dirname(item):
    """The directory part as Perl's File::Basename dirname gives it ("." for none)."""
    stripped = item.rstrip(b"/")
    if not stripped:
        return b"/" if item else b"."
    head, sep, _ = stripped.rpartition(b"/")
    if not sep:
        return b"."
    return head.rstrip(b"/") or b"/"


def _no_extension(item):
    return _EXTENSION.sub(b"", item)


_ITEM_FORMS = {
    b"{}": lambda item: item,
    b"{.}": _no_extension,
    b"{/}": _basename,
    b"{//}": _dirname,
    b"{/.}": lambda item: _no_extension(_basename(item)),
}


class Template:
    """A command with replacement strings, parsed once and filled in per job.

    ``args``: the command's arguments (str or bytes). Raises ValueError naming
    an unknown replacement string.
    """

    def __init__(self, args):
        self._parts = []          # per argument: bytes (no replacement) or a list of pieces
        self.has_replacements = False
        self.uses_slot = False
        for arg in args:
            raw = os.fsencode(arg)
            pieces = []
            last = 0
            for match in _CANDIDATE.finditer(raw):
                name = match.group()
                if name.decode("ascii", "replace") not in KNOWN:
                    raise ValueError(
                        f"unknown replacement string {os.fsdecode(name)!r} in "
                        f"{os.fsdecode(raw)!r}; known: {' '.join(KNOWN)}")
                pieces += [raw[last:match.start()], name]
                last = match.end()
                self.uses_slot |= name == b"{%}"
            if pieces:
                pieces.append(raw[last:])
                self._parts.append([p for p in pieces if p])
                self.has_replacements = True
            else:
                self._parts.append(raw)

    def render(self, item, seq, slot, append=False):
        """Return the argv (bytes) for ``item`` as job ``seq`` in ``slot``.

        With ``append`` the item is added as the last argument (xargs style).
        """
        argv = []
        for part in self._parts:
            if isinstance(part, bytes):
                argv.append(part)
                continue
            out = []
            for piece in part:
                if piece == b"{#}":
                    out.append(b"%d" % seq)
                elif piece == b"{%}":
                    out.append(b"%d" % slot)
                elif piece in _ITEM_FORMS:
                    out.append(_ITEM_FORMS[piece](item))
                else:
                    out.append(piece)
            argv.append(b"".join(out))
        if append:
            argv.append(item)
        return argv


def split_items(data, separator, what):
    """Split input ``data`` (bytes) into items at ``separator`` (b"\\n" or b"\\0").

    A final separator ends the last item rather than starting an empty one.
    With newline separation an item holding a NUL byte cannot be passed to a
    command: ValueError naming ``what`` and the line number.
    """
    if not data:
        return []
    items = data.split(separator)
    if items[-1] == b"":
        items.pop()
    if separator != b"\0":
        for number, item in enumerate(items, 1):
            if b"\0" in item:
                raise ValueError(f"{what} line {number}: a NUL byte cannot be passed to a "
                                 "command (use -0 for NUL-separated input)")
    return items


_ANSI_C_ESCAPES = {0x0a: b"\\n", 0x09: b"\\t", 0x0d: b"\\r", 0x5c: b"\\\\", 0x27: b"\\'"}


def _has_control(arg):
    return any(b < 32 or b == 127 for b in arg)


def _ansi_c_quote(arg):
    """bash's $'...' form of ``arg``: every byte below 32 written as an escape."""
    out = bytearray(b"$'")
    for byte in arg:
        if byte in _ANSI_C_ESCAPES:
            out += _ANSI_C_ESCAPES[byte]
        elif byte < 32 or byte == 127:
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    return bytes(out + b"'")


def quote_argv(argv):
    """Return ``argv`` (bytes) as one line that a shell splits back into it.

    Arguments with control characters use bash's $'...' quoting, so the
    result never spans lines (a job log line stays one line).
    """
    return b" ".join(_ansi_c_quote(arg) if _has_control(arg)
                     else os.fsencode(shlex.quote(os.fsdecode(arg))) for arg in argv)


class Job:
    """One job: its number, its item and how to make its command.

    ``seq`` is the job number ({#}, from 1); ``item`` the input item (bytes;
    for commands read from input, the command line); ``label`` what --tag
    puts before each output line; ``argv`` the command (bytes), set by
    ``command(slot)`` at launch.
    """

    __slots__ = ("seq", "item", "label", "argv", "_maker")

    def __init__(self, seq, item, maker, label=None):
        self.seq = seq
        self.item = item
        self.label = item if label is None else label
        self.argv = None
        self._maker = maker

    def command(self, slot):
        """Return (and keep in ``argv``) the command run in job slot ``slot``."""
        self.argv = self._maker.argv(self, slot)
        return self.argv

    def describe(self, slot=1):
        """The command as one shell-quoted line (bytes), for logs and messages."""
        return self._maker.describe(self, self.argv or self._maker.argv(self, slot))


class _ItemCommands:
    """``template`` filled in with each item; the item appended if no replacement string."""

    def __init__(self, template, append):
        self.template = template
        self.append = append

    def argv(self, job, slot):
        return self.template.render(job.item, job.seq, slot, self.append)

    def describe(self, job, argv):
        return quote_argv(argv)


class _ShellCommands:
    """Each item is a command line run by ``shell -c``."""

    def __init__(self, shell):
        self.shell = os.fsencode(shell)

    def argv(self, job, slot):
        return [self.shell, b"-c", job.item]

    def describe(self, job, argv):
        # The line as written; one spanning lines (from -0 input) as a quoted shell call.
        return quote_argv(argv) if _has_control(job.item) else job.item


class _SplitCommands:
    """Each item is a command line split into words like a shell (no expansion)."""

    def __init__(self):
        self.words = {}     # seq -> argv, split when the input is read

    def argv(self, job, slot):
        return self.words[job.seq]

    def describe(self, job, argv):
        return quote_argv(argv)


def item_jobs(template, items):
    """One job per item (bytes) running ``template``."""
    maker = _ItemCommands(template, append=not template.has_replacements)
    return [Job(seq, item, maker) for seq, item in enumerate(items, 1)]


def count_jobs(template, count):
    """``count`` jobs of ``template``; ``{}`` is the run's index (0, 1, ...), nothing appended."""
    maker = _ItemCommands(template, append=False)
    return [Job(i + 1, b"%d" % i, maker) for i in range(count)]


def command_jobs(lines, shell, what):
    """Jobs for input lines that are whole commands.

    Blank lines and lines starting with ``#`` are skipped. With ``shell`` (a
    path) each line runs as ``shell -c LINE``; with None it is split like a
    shell would (no expansion) and run directly. Raises ValueError naming
    ``what`` and the line number for a line that cannot be split.
    """
    maker = _ShellCommands(shell) if shell is not None else _SplitCommands()
    jobs = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        job = Job(len(jobs) + 1, line, maker)
        if shell is None:
            try:
                words = shlex.split(os.fsdecode(line))
            except ValueError as exc:
                raise ValueError(f"{what} line {number}: {exc}: {os.fsdecode(line)!r}") from None
            maker.words[job.seq] = [os.fsencode(w) for w in words]
        jobs.append(job)
    return jobs
