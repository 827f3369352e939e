"""The asyncio driver of ``fastfork._scheduler.Scheduler``.

The scheduler decides (launch, back-off, deadlines, stop escalation); this
module only waits for it on the running loop: the fds it names are
registered with ``loop.add_reader``, its next deadline is a timer, and
``fill()``/``advance()`` run whenever either fires. Nothing here blocks the
loop, bar the one synchronous SIGKILL-and-reap of a close cut short.
"""
import asyncio

__all__ = ["LoopDriver"]


class LoopDriver:
    """Runs one Scheduler on the running loop.

    ``await finished()`` returns the entries that finished, ``[]`` once the
    scheduler is done. ``await close()`` -- which the consumer calls
    whatever happens, in a ``finally`` -- stops every running child (the
    scheduler's stop signal, its ``grace`` awaited on the loop, SIGKILL) and
    reaps it; a second cancellation during that grace SIGKILLs and reaps the
    rest at once. Closing twice is harmless.
    """

    def __init__(self, scheduler, loop=None):
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop() if loop is None else loop
        self._fds = set()     # fds registered with the loop
        self._wake = None     # the future _wait() sleeps on
        self._error = None    # what a scheduler callback raised, for the next wait

    def _wakeup(self):
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _on_readable(self, callback):
        try:
            callback()
        except Exception as exc:
            # Raised by the driver's next wait (which then closes the
            # scheduler), not lost in the loop's exception handler.
            self._error = exc
        self._wakeup()

    def _raise_error(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _sync_fds(self):
        """Apply the scheduler's watch changes to the loop, removals first."""
        removed, added = self.scheduler.watch_changes()
        for fd in removed:
            if fd in self._fds:
                self._fds.discard(fd)
                self.loop.remove_reader(fd)
        for fd, callback in added.items():
            if fd in self._fds:
                self.loop.remove_reader(fd)
            self._fds.add(fd)
            self.loop.add_reader(fd, self._on_readable, callback)

    def _detach(self):
        for fd in self._fds:
            self.loop.remove_reader(fd)
        self._fds.clear()

    async def _wait(self):
        """Sleep until a watched fd is readable or the scheduler's next deadline."""
        self._raise_error()
        self._sync_fds()
        deadline = self.scheduler.next_deadline()
        self._wake = self.loop.create_future()
        timer = None
        if deadline is not None:
            timer = self.loop.call_later(max(0.0, deadline - self.scheduler.clock()),
                                         self._wakeup)
        try:
            await self._wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()
        self._raise_error()

    async def finished(self):
        """Drive the scheduler until entries finish; return them (in completion order).

        Returns an empty list once the scheduler is done. On any exception
        (cancellation included) the scheduler is closed as ``close()`` does
        before it propagates.
        """
        scheduler = self.scheduler
        try:
            while True:
                scheduler.fill()
                entries = scheduler.advance()
                if entries or scheduler.done:
                    return entries
                await self._wait()
        except BaseException:
            await self.close()
            raise

    async def close(self):
        """Stop every running child without blocking the loop, reap them, close.

        Launches nothing more; each running child gets the stop signal now
        and SIGKILL after the scheduler's grace, as the scheduler escalates.
        """
        scheduler = self.scheduler
        try:
            scheduler.stop_launching()
            for entry in scheduler.running:
                scheduler.cancel(entry)
            while scheduler.running:
                await self._wait()
                scheduler.advance()
        finally:
            self._detach()
            # Blocks only if the wait above was cut short: SIGKILL, then reap.
            scheduler.close(grace=0)
