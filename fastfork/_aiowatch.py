"""Watching fastfork children from an asyncio event loop without blocking it.

The loop-side counterpart of ``fastfork.child.Watcher``: a child's pidfd and
its pipes are registered with ``loop.add_reader``; the pipes are drained as
data arrives (a child writing a large result never blocks on a full pipe) and
the child is reaped as soon as its pidfd becomes readable. A child without a
pidfd is polled with WNOHANG on the loop's timer, with a capped exponential
back-off. There is no SIGCHLD handler and no thread, and only children
fastfork created are waited for, so this coexists with asyncio's own
subprocess support.
"""
import asyncio
import os
import signal

from fastfork.child import _POLL_MAX, _POLL_MIN, stop_all

__all__ = ["LoopWatch", "wait_finished", "stop", "wait_or_stop"]


class LoopWatch:
    """Drains and reaps one ``Child`` on a running loop.

    ``done`` is a future that gets None once the child is finished (reaped,
    every fd of its handle closed), or the exception that reaping raised.
    Await it through ``wait_finished``, never directly: cancelling a direct
    awaiter would cancel it for every other one.
    """

    def __init__(self, child, loop):
        self.child = child
        self.loop = loop
        self.done = loop.create_future()
        self._fds = set()
        self._timer = None
        self._backoff = _POLL_MIN
        if child.finished:
            self.done.set_result(None)
            return
        try:
            self._watch_pipes()
            if child._pidfd >= 0:
                self._add(child._pidfd, self._on_exit)
            else:
                self._schedule_poll()
        except BaseException:
            self._unwatch()
            raise

    # ------------------------------------------------------------ registration

    def _add(self, fd, callback, *args):
        self.loop.add_reader(fd, callback, *args)
        self._fds.add(fd)

    def _remove(self, fd):
        if fd in self._fds:
            self._fds.discard(fd)
            self.loop.remove_reader(fd)

    def _watch_pipes(self):
        for fd, callback in self.child._readers().items():
            self._add(fd, self._on_data, fd, callback)

    def _unwatch(self):
        """Take every fd of the child off the loop (before reaping closes them)."""
        for fd in list(self._fds):
            self._remove(fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule_poll(self):
        self._timer = self.loop.call_later(self._backoff, self._poll)
        self._backoff = min(self._backoff * 2, _POLL_MAX)

    # ------------------------------------------------------------ callbacks

    def _on_data(self, fd, callback):
        def feed(data):
            if not data:
                self._remove(fd)  # off the loop before the handle closes it
            callback(data)
        self.child._read(fd, feed)

    def _on_exit(self):
        self._unwatch()
        self._reap()

    def _poll(self):
        self._timer = None
        try:
            # WNOWAIT: only look; the handle reaps it below, with its own bookkeeping.
            exited = os.waitid(os.P_PID, self.child.pid,
                               os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            exited = True  # reaped already (by us, half-way, or by someone else)
        if exited:
            self._unwatch()
            self._reap()
        else:
            self._schedule_poll()

    def _reap(self):
        try:
            finished = self.child._try_reap()
        except Exception as exc:
            self._resolve(exc)
            return
        except BaseException:
            # Ctrl-C inside the reap: keep watching, the next poll completes it.
            self._schedule_poll()
            raise
        if finished:
            self._resolve()
        else:
            # The pidfd said it exited but wait4 disagrees: keep draining, poll.
            self._watch_pipes()
            self._schedule_poll()

    def _resolve(self, exc=None):
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    # ------------------------------------------------------------ synchronous end

    def finish_now(self):
        """Stop (SIGKILL at once) and reap the child synchronously.

        For paths cut short (a second cancellation, Ctrl-C): SIGKILL cannot be
        caught, so this waits only for the kernel to end the process.
        """
        self._unwatch()
        try:
            stop_all([self.child], 0)
        finally:
            if self.child.finished:
                self._resolve()


async def wait_finished(watch, timeout=None):
    """Wait up to ``timeout`` seconds (None: no limit) for the child to finish.

    Returns True once it has finished, False on timeout (it keeps running).
    Cancelling this wait leaves the child alone. Raises what reaping raised.
    """
    if not watch.done.done():
        await asyncio.wait((watch.done,), timeout=timeout)
    if not watch.done.done():
        return False
    watch.done.result()
    return True


async def stop(watch, grace, sig=signal.SIGTERM):
    """Stop the child: ``sig`` (and SIGCONT), up to ``grace`` seconds, SIGKILL; reap it.

    The grace is waited for on the loop. If this is cut short (the task is
    cancelled again, Ctrl-C), the child is SIGKILLed and reaped at once
    before the exception propagates.
    """
    child = watch.child
    try:
        if not child.finished:
            child.send_signal(sig)
            # A stopped child cannot act on the signal until it is continued.
            child.send_signal(signal.SIGCONT)
            if grace:
                await wait_finished(watch, grace)
        if not child.finished:
            child.kill()
            await wait_finished(watch)
    finally:
        if not child.finished:
            watch.finish_now()
    if watch.done.done():
        watch.done.result()


async def wait_or_stop(watch, grace, timeout=None):
    """``wait_finished``, but a cancelled (or failed) wait stops the child first.

    The child is stopped as by ``stop`` with ``grace``, then the
    CancelledError (or other exception) propagates.
    """
    try:
        return await wait_finished(watch, timeout)
    except BaseException:
        await stop(watch, grace)
        raise
