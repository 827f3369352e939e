"""The asyncio drivers of the fan-out engines: ``fastfork._scheduler.Scheduler``
and the C engine ``fastfork._core.FanOut``.

The engines decide (launch, back-off, deadlines, stop escalation); this
module only waits for them on the running loop: the fds they name are
registered with ``loop.add_reader``, their next deadline is a timer, and
the engine is stepped whenever either fires. Nothing here blocks the loop,
bar the one synchronous SIGKILL-and-reap of a close cut short.
"""
import asyncio
import contextlib

from fastfork._aiowatch import on_loop

__all__ = ["LoopDriver", "EngineDriver"]


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
        if not on_loop(self.loop):
            with contextlib.suppress(RuntimeError):  # a closed loop has no readers left
                self._detach()
            scheduler.close(grace=0)  # the loop has ended: SIGKILL, then reap
            return
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


class EngineDriver:
    """Runs one ``_core.FanOut`` on the running loop, as ``step()`` runs it blocking.

    The engine's one fd is registered with ``loop.add_reader`` and its
    ``wake_in()`` is a timer; each wake-up runs ``step(wait=False)`` right in
    the loop's callback, which reaps, reads and forks in C. The consumer's
    task is woken only when there are outcomes: with ``until_done`` (map),
    once, when every child has finished. While the consumer is not waiting
    the engine is left alone, as between two blocking steps.

    ``await finished()`` returns the outcomes that finished (``step``'s
    tuples); ``[]`` once the engine is done. ``await close()`` -- which the
    consumer calls whatever happens, in a ``finally`` -- sends every running
    child SIGTERM, awaits them up to ``grace`` seconds on the loop, then
    SIGKILLs and reaps the rest (at once if that wait is cut short, or if the
    loop has ended). Closing twice is harmless.
    """

    def __init__(self, engine, until_done, grace, loop=None):
        self.engine = engine
        self.until_done = until_done
        self.grace = grace
        self.loop = asyncio.get_running_loop() if loop is None else loop
        self._fd = -1         # the engine's fd while registered with the loop
        self._timer = None    # the wake-up the engine asked for ...
        self._timer_at = 0.0  # ... at this loop time
        self._wake = None     # the future the consumer sleeps on
        self._outcomes = []   # stepped out while the consumer slept
        self._error = None    # what a step in a callback raised, for the consumer

    def _on_ready(self):
        """The engine's fd is readable or its timer is due: step it if someone waits."""
        if self._wake is None:
            self._pause()  # stepped again once the consumer asks
            return
        if self._wake.done():
            return  # the consumer is about to run
        try:
            outcomes = self.engine.step(self.until_done, False)
        except Exception as exc:
            # Raised by the consumer's wait (which then closes the driver),
            # not lost in the loop's exception handler.
            self._error = exc
            self._wakeup()
            return
        if outcomes or self.engine.done_running:
            self._outcomes += outcomes
            self._wakeup()
        else:
            self._arm_timer()

    def _wakeup(self):
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _on_timer(self):
        self._timer = None
        self._on_ready()

    def _arm_timer(self):
        """Have the loop step the engine by the time it asks for, if no earlier wake-up is set."""
        delay = self.engine.wake_in()
        if delay is None:
            return
        when = self.loop.time() + delay
        if self._timer is not None:
            if self._timer_at <= when:
                return  # an earlier wake-up steps it, and asks again
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _pause(self):
        """Take the engine off the loop (its fd and its timer)."""
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _wait(self, until=None):
        """Sleep until a step has outcomes, the engine is done, or loop time ``until``."""
        if self._fd < 0:
            self._fd = self.engine.fileno()
            self.loop.add_reader(self._fd, self._on_ready)
        self._arm_timer()
        self._wake = self.loop.create_future()
        limit = None if until is None else self.loop.call_at(until, self._wakeup)
        try:
            await self._wake
        finally:
            self._wake = None
            if limit is not None:
                limit.cancel()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def finished(self):
        """Step the engine until outcomes finish; return them (in completion order).

        Returns an empty list once the engine is done. On any exception
        (cancellation included) the driver is closed as ``close()`` does
        before it propagates.
        """
        engine = self.engine
        try:
            if not self._outcomes:
                self._outcomes = engine.step(self.until_done, False)
            while not (self._outcomes or engine.done_running):
                await self._wait()
            outcomes, self._outcomes = self._outcomes, []
            return outcomes
        except BaseException:
            await self.close()
            raise

    async def close(self):
        """Stop every running child without blocking the loop, reap them, close the engine.

        Starts nothing more; each running child gets SIGTERM now and SIGKILL
        after ``grace``. Outcomes not handed out are dropped.
        """
        engine = self.engine
        if not on_loop(self.loop):
            with contextlib.suppress(RuntimeError):  # a closed loop has no readers left
                self._pause()
            engine.close(0)  # the loop has ended: SIGKILL, then reap
            return
        try:
            engine.terminate()
            deadline = self.loop.time() + self.grace
            while not engine.done_running and self.loop.time() < deadline:
                self._outcomes = []
                try:
                    await self._wait(deadline)
                except Exception:
                    break  # the SIGKILL below ends what is left all the same
        finally:
            self._outcomes = []
            self._pause()
            # Blocks only if the grace was cut short: SIGKILL, then reap.
            engine.close(0)
