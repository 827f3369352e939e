"""``fastfork run``'s output: where each job's stdout and stderr go, and when they are printed.

Modes:

- grouped (default): a job writes to two unlinked temporary files, in
  memory (memfd) or in ``tmpdir`` (no pipe, so a job can never stall on a
  full pipe, and a grandchild holding them open cannot keep the runner
  waiting); when it ends they are copied whole to this process's stdout
  and stderr, so jobs' output is never interleaved;
- line-buffered: the same files are read while the jobs run and every
  complete line is printed as it comes (never half a line);
- ungrouped: jobs inherit this process's stdout and stderr.

In the grouped modes a job's output is copied by one printing thread, in
the order the jobs ended (or, with ``keep_order``, their turns came): the
runner reaps and launches while a slow reader takes megabytes, so no slot
waits for the copy. Small outputs are printed at once when that thread has
nothing queued (no hand-over for the common case). Anything written to
stdout or stderr during the run (the progress bar too) goes through
``Output.call`` so it keeps its place between jobs' output.

``keep_order`` prints jobs in input order (output of a job that ends before
its turn is moved to one spool file in ``tmpdir``, or the system's
temporary directory, until then); ``tag`` puts a label and a
TAB before every line; ``results`` keeps each job's output in
DIR/<seq>/stdout and DIR/<seq>/stderr (with DIR/<seq>/cmd and, once it
ended, DIR/<seq>/exitval).
"""
import collections
import errno
import os
import select
import tempfile
import threading

__all__ = ["Output", "write_all"]

_CHUNK = 1 << 20
# Output up to this size is printed by the runner itself when the printing
# thread is idle: it fits in a pipe's default buffer, so it seldom waits.
_INLINE_BYTES = 1 << 16
_OUT, _ERR = 1, 2  # the fds this process prints jobs' output to


def _wait_writable(fd):
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()


def write_all(fd, data):
    """Write all of ``data`` to ``fd``, waiting if it is non-blocking and full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            _wait_writable(fd)


def _temp_file(directory=None):
    """Return a new unlinked temporary file (read-write, close-on-exec).

    In ``directory``, or, with None, in memory (memfd): creating one costs a
    tenth of a file on a disk's filesystem, which matters at thousands of jobs.
    """
    if directory is None and hasattr(os, "memfd_create"):
        return os.memfd_create("fastfork-run", os.MFD_CLOEXEC)
    if directory is None:
        directory = tempfile.gettempdir()
    flags = os.O_RDWR | os.O_CLOEXEC
    if hasattr(os, "O_TMPFILE"):
        try:
            return os.open(directory, flags | os.O_TMPFILE, 0o600)
        except OSError as exc:
            # Filesystems without O_TMPFILE; EMFILE and others are the caller's.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    fd, path = tempfile.mkstemp(dir=directory)
    os.unlink(path)
    return fd


class _Copier:
    """Copies byte ranges of files to a destination fd (sendfile when the kernel can)."""

    def __init__(self):
        self._sendfile = {}   # dst fd -> whether sendfile works to it

    def copy(self, dst, src, offset, count):
        """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst``; return the bytes copied."""
        done = 0
        while done < count:
            if self._sendfile.get(dst, True):
                try:
                    n = os.sendfile(dst, src, offset + done, count - done)
                except BlockingIOError:
                    _wait_writable(dst)
                    continue
                except OSError as exc:
                    # EINVAL: dst opened with O_APPEND (or a kind sendfile refuses).
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    self._sendfile[dst] = False
                    continue
            else:
                data = os.pread(src, min(_CHUNK, count - done), offset + done)
                write_all(dst, data)
                n = len(data)
            if n == 0:
                break  # the file is shorter than expected
            done += n
        return done


class _Printer:
    """Runs printing tasks on a thread of its own, one at a time, in the order submitted.

    A task that raises (BrokenPipeError once the reader has gone) makes the
    later ones skip their printing; their cleanup still runs. The error is
    raised in the caller's thread by the next ``submit``, ``raise_error`` or
    ``finish``.
    """

    def __init__(self):
        self._tasks = collections.deque()
        self._changed = threading.Condition()
        self._busy = 0        # tasks queued or running
        self._thread = None
        self._error = None
        self._reported = False

    def idle(self):
        """True when no task is queued or running."""
        return self._busy == 0

    def submit(self, task, cleanup=None):
        """Queue ``task()`` and then ``cleanup()``. Raises a failed task's error."""
        self.raise_error()
        with self._changed:
            self._tasks.append((task, cleanup))
            self._busy += 1
            self._changed.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fastfork run output",
                                            daemon=True)
            self._thread.start()

    def raise_error(self):
        """Raise the error of a failed task, once."""
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _work(self):
        while True:
            with self._changed:
                while not self._tasks:
                    self._changed.wait()
                task, cleanup = self._tasks.popleft()
            if task is None and cleanup is None:
                return
            try:
                if task is not None and self._error is None:
                    task()
            except BaseException as exc:
                self._error = exc
            finally:
                try:
                    if cleanup is not None:
                        cleanup()
                except BaseException as exc:
                    if self._error is None:
                        self._error = exc
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()

    def running(self):
        """True while the thread is there (after ``finish`` was interrupted, still)."""
        return self._thread is not None

    def wait(self):
        """Wait until every task submitted has run; raise a failed task's error."""
        self._wait_idle()
        self.raise_error()

    def _wait_idle(self):
        with self._changed:
            while self._busy:
                self._changed.wait()

    def finish(self):
        """Wait for every task, then end the thread; raise a failed task's error.

        Interrupted (Ctrl-C while a reader holds the output up), the tasks
        left only clean up, and the thread is left to end by itself.
        """
        try:
            self._wait_idle()
        except BaseException as exc:
            if self._error is None:
                self._error = exc
                self._reported = True
            self._stop()
            raise
        self._stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_error()

    def _stop(self):
        if self._thread is not None:
            with self._changed:
                self._tasks.append((None, None))
                self._changed.notify()


def _tagged(chunk, tag, at_line_start):
    """``chunk`` with ``tag`` before each line; returns (bytes, whether it ended a line)."""
    ends_line = chunk.endswith(b"\n")
    body = chunk[:-1] if ends_line else chunk
    out = (tag if at_line_start else b"") + body.replace(b"\n", b"\n" + tag)
    return (out + b"\n" if ends_line else out), ends_line


class _Captured:
    """The output files of one running or finished job, and how much was printed."""

    __slots__ = ("job", "fds", "sent", "line_start", "held")

    def __init__(self, job, fds):
        self.job = job
        self.fds = fds                 # [stdout fd, stderr fd]
        self.sent = [0, 0]             # bytes of each already printed (or spooled)
        self.line_start = [True, True]  # for --tag: the next byte printed starts a line
        self.held = None               # keep-order: [(stream, spool offset, length)]

    def close(self):
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                self.fds[i] = -1
                os.close(fd)


class Output:
    """Routes jobs' output in one of the modes (see the module's docstring).

    ``mode`` is "group", "line" or "ungroup"; ``order`` the job numbers in
    the order they are to be printed with ``keep_order``; ``before_write`` a
    callable run before anything is printed (clears a progress bar).
    ``tmpdir`` holds running jobs' output (None: memory). Raises OSError if
    the results directory cannot be made.
    """

    def __init__(self, mode="group", keep_order=False, tag=False, results=None,
                 order=(), before_write=None, tmpdir=None):
        self.mode = mode
        self.captures = mode != "ungroup"
        self.keep_order = keep_order
        self.tag = tag
        self.results = results
        self._before_write = before_write
        self._tmpdir = tmpdir
        self._copier = _Copier()
        self._running = {}        # seq -> _Captured
        self._held = {}           # keep-order: seq -> _Captured (ended before its turn)
        self._order = collections.deque(order)
        self._skipped = set()
        self._spool = -1
        self._spool_end = 0
        # Line-buffered output is printed as it comes, by the runner itself.
        self._printer = _Printer() if mode == "group" else None
        if results is not None:
            os.makedirs(results, exist_ok=True)

    # ------------------------------------------------------------ per job

    def open(self, job):
        """Return (stdout, stderr) for the command of ``job``: fds, or None to inherit.

        Raises OSError (EMFILE when out of fds) with nothing left open.
        """
        if not self.captures:
            return None, None
        fds = []
        try:
            if self.results is not None:
                fds = self._open_results(job)
            else:
                for _ in range(2):
                    fds.append(_temp_file(self._tmpdir))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._running[job.seq] = _Captured(job, fds)
        return fds[0], fds[1]

    def _open_results(self, job):
        directory = os.path.join(self.results, str(job.seq))
        os.makedirs(directory, exist_ok=True)
        for name in ("exitval", "exitval.tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
        with open(os.path.join(directory, "cmd"), "wb") as f:
            f.write(job.describe() + b"\n")
        fds = []
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            for name in ("stdout", "stderr"):
                fds.append(os.open(os.path.join(directory, name), flags, 0o666))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def finish(self, job, returncode=None):
        """``job`` ended: print (or hold) its output; return the bytes it wrote.

        With ``returncode`` None the attempt is discarded (to be retried, or
        stopped): nothing is printed and the job keeps its place in the order.
        Returns 0 when output is not captured. Raises the error printing met
        (BrokenPipeError when the reader has gone), maybe for an earlier job.
        """
        captured = self._running.pop(job.seq, None)
        if captured is None:
            return 0
        if returncode is None:
            captured.close()  # no task of the printing thread has it
            return 0
        try:
            sizes = [os.fstat(fd).st_size for fd in captured.fds]
            if self.results is not None:
                self._write_exitval(job, returncode)
        except BaseException:
            captured.close()
            raise
        self._submit(lambda: self._print_ended(captured, sizes), captured.close, sum(sizes))
        return sum(sizes)

    def _print_ended(self, captured, sizes):
        if not self.keep_order or self._order and self._order[0] == captured.job.seq:
            self._forward(captured, sizes)
            if self.keep_order:
                self._order.popleft()
                self._advance()
        else:
            self._hold(captured, sizes)

    def call(self, function, *args):
        """Run ``function(*args)`` (it writes to the terminal) in its turn between jobs' output."""
        self._submit(lambda: function(*args), None, 0)

    def _submit(self, task, cleanup, size):
        """Run ``task`` then ``cleanup`` after everything submitted before.

        Here and now when there is no printing thread, or when it is idle
        and ``task`` prints little (``size`` bytes, plus what keep-order
        may release); else on that thread.
        """
        printer = self._printer
        if printer is not None and not (printer.idle() and
                                        size + self._spool_end <= _INLINE_BYTES):
            printer.submit(task, cleanup)
            return
        try:
            if printer is not None:
                printer.raise_error()
            task()
        finally:
            if cleanup is not None:
                cleanup()

    def skip(self, seq):
        """Job ``seq`` will not run (halted, or done by an earlier run): free its turn."""
        if self.keep_order:
            self._submit(lambda: self._skip(seq), None, 0)

    def _skip(self, seq):
        self._skipped.add(seq)
        self._advance()

    def _write_exitval(self, job, returncode):
        directory = os.path.join(self.results, str(job.seq))
        temp = os.path.join(directory, "exitval.tmp")
        with open(temp, "w") as f:
            f.write(f"{returncode}\n")
        os.replace(temp, os.path.join(directory, "exitval"))  # atomic: present means ended

    # ------------------------------------------------------------ printing

    def poll(self):
        """Line-buffered mode: print the complete lines written since the last call.

        Grouped: raise the error printing met (BrokenPipeError when the
        reader has gone) without waiting for the next job to end.
        """
        if self.mode != "line":
            if self._printer is not None:
                self._printer.raise_error()
            return
        if self.keep_order:
            head = self._running.get(self._order[0]) if self._order else None
            if head is not None:
                self._forward(head)
            return
        for captured in list(self._running.values()):
            self._forward(captured)

    def _forward(self, captured, sizes=None):
        """Print what ``captured`` has not printed yet.

        With ``sizes`` (the job has ended) all of it, up to those sizes;
        without, only up to each file's last newline.
        """
        for stream, fd in enumerate(captured.fds):
            start = captured.sent[stream]
            end = os.fstat(fd).st_size if sizes is None else sizes[stream]
            if end <= start:
                continue
            if sizes is None:
                last = self._last_newline(fd, start, end)
                if last < 0:
                    continue
                end = last + 1
            self._print(stream, fd, start, end - start, captured)
            captured.sent[stream] = end

    @staticmethod
    def _last_newline(fd, start, end):
        """Offset of the last b"\\n" in ``fd`` between ``start`` and ``end``, or -1."""
        pos = end
        while pos > start:
            begin = max(start, pos - _CHUNK)
            found = os.pread(fd, pos - begin, begin).rfind(b"\n")
            if found >= 0:
                return begin + found
            pos = begin
        return -1

    def _print(self, stream, fd, offset, count, captured):
        dst = _OUT if stream == 0 else _ERR
        if self._before_write is not None:
            self._before_write()
        if not self.tag:
            self._copier.copy(dst, fd, offset, count)
            return
        tag = captured.job.label + b"\t"
        end = offset + count
        while offset < end:
            chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not chunk:
                break
            data, captured.line_start[stream] = _tagged(chunk, tag, captured.line_start[stream])
            write_all(dst, data)
            offset += len(chunk)

    # ------------------------------------------------------------ keep-order

    def _hold(self, captured, sizes):
        """Move the output of a job that ended before its turn into the spool."""
        if self._spool < 0:
            # On disk unless asked otherwise: held output can grow to the whole run's.
            self._spool = _temp_file(self._tmpdir or tempfile.gettempdir())
        regions = []
        for stream, (fd, size) in enumerate(zip(captured.fds, sizes)):
            if size > captured.sent[stream]:
                os.lseek(self._spool, self._spool_end, os.SEEK_SET)
                length = self._copier.copy(self._spool, fd, captured.sent[stream],
                                           size - captured.sent[stream])
                regions.append((stream, self._spool_end, length))
                self._spool_end += length
        captured.held = regions
        captured.close()
        self._held[captured.job.seq] = captured

    def _advance(self):
        """Print held output whose turn has come."""
        while self._order:
            seq = self._order[0]
            if seq in self._skipped:
                self._skipped.discard(seq)
            elif seq in self._held:
                captured = self._held.pop(seq)
                for stream, offset, length in captured.held:
                    self._print(stream, self._spool, offset, length, captured)
            else:
                break
            self._order.popleft()
        if not self._held and self._spool_end:
            os.ftruncate(self._spool, 0)
            self._spool_end = 0
        if self.mode == "line":
            self.poll()  # the new head may have lines waiting

    def flush(self):
        """Wait until the output of every job that ended is printed.

        Raises the error printing met (BrokenPipeError when the reader has gone).
        """
        if self._printer is not None:
            self._printer.wait()

    def close(self):
        """Print what is still held (in order), discard running jobs' output, close files.

        Raises the error printing met, if it was not raised yet.
        """
        try:
            if self._printer is not None:
                self._printer.finish()
            for seq in sorted(self._held):
                captured = self._held.pop(seq)
                for stream, offset, length in captured.held:
                    self._print(stream, self._spool, offset, length, captured)
        finally:
            for captured in self._running.values():
                captured.close()
            self._running.clear()
            self._held.clear()
            # A thread that was not waited for (interrupted) may still use the spool.
            if self._spool >= 0 and not (self._printer is not None and self._printer.running()):
                os.close(self._spool)
                self._spool = -1
