"""``chunksize``: one child per chunk of items, with results and errors kept per item.

A wrapper over any fan-out (the C engine's, the Scheduler's): the items are
cut into chunks of ``chunksize``, and each chunk's child runs ``run_chunk``,
which calls the function on every item of its chunk and returns one outcome
per item -- the same (kind, payload) frame a child sends for a single item.
The parent turns those back into per-item results and ChildErrors. A chunk
whose child crashed, was killed or timed out fails every item of the chunk,
each error naming its item.
"""
import functools
import itertools
import os
import pickle
import traceback

from fastfork._result import ERROR, OK, decode_outcome, error_payload, short_repr
from fastfork.errors import ChildError

__all__ = ["run_chunk", "chunked"]


class _ChunkFailed(Exception):
    """Raised by a chunk's child to make its fan-out stop new launches.

    Carries (pid, outcomes): the outcomes of the items run, the last one failed.
    """


def run_chunk(fn, stop_on_error, print_traceback, items):
    """In the chunk's child: call ``fn(item)`` for each item; return (pid, outcomes).

    ``outcomes`` holds one (kind, payload) per item run, in order: OK and the
    pickled return value, or ERROR and ``error_payload``. A return value is
    pickled here, so one that cannot be pickled fails its item only. An item
    ending the child (SystemExit, KeyboardInterrupt) ends the chunk: the
    items after it are not run. With ``stop_on_error`` the first failed item
    ends the chunk too, and _ChunkFailed is raised so that the fan-out sees
    a failure.
    """
    outcomes = []
    for item in items:
        try:
            value = fn(item)
        except Exception as exc:
            if print_traceback:
                traceback.print_exc()
            outcomes.append((ERROR, error_payload(exc, "raised")))
            if stop_on_error:
                break
            continue
        except BaseException as exc:
            stage = "exited" if isinstance(exc, SystemExit) else "raised"
            outcomes.append((ERROR, error_payload(exc, stage)))
            break
        try:
            outcomes.append((OK, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
        except Exception as exc:
            outcomes.append((ERROR, error_payload(
                exc, "returned a result that could not be pickled")))
            if stop_on_error:
                break
    if stop_on_error and outcomes and outcomes[-1][0] == ERROR:
        raise _ChunkFailed(os.getpid(), outcomes)
    return os.getpid(), outcomes


def chunked(fan, fn, items, chunksize, return_exceptions, print_traceback):
    """Fan ``fn`` out over ``items`` (an iterator) in chunks; yield (index, result) per item.

    ``fan(task, chunks, return_exceptions, print_traceback)`` is the fan-out
    underneath, an as_completed-style iterator of (chunk number, outcome). Items are yielded
    as their chunk completes. Without ``return_exceptions`` the first failed
    item stops new launches (its chunk's child fails), and its error is
    raised once the fan-out ends; otherwise every item's error is yielded in
    its place.
    """
    waiting = {}  # chunk number -> its items, until its outcome is in

    def chunks():
        for number in itertools.count():
            chunk = list(itertools.islice(items, chunksize))
            if not chunk:
                return
            waiting[number] = chunk
            yield chunk

    task = functools.partial(run_chunk, fn, not return_exceptions, print_traceback)
    outcomes = fan(task, chunks(), return_exceptions, False)
    first_error = None
    failed_chunk = None
    try:
        for number, value in outcomes:
            for index, ok, result in _per_item(number * chunksize, waiting.pop(number), value):
                if ok or return_exceptions:
                    yield index, result
                elif first_error is None:
                    first_error = result
    except ChildError as err:
        if err.index not in waiting:
            raise
        failed_chunk = err
    finally:
        outcomes.close()  # abandoned early (closed, or an exception): stop every child now
    if failed_chunk is not None:
        # The fan-out raises its first failed chunk once the others are done.
        number = failed_chunk.index
        for index, ok, result in _per_item(number * chunksize, waiting.pop(number),
                                           failed_chunk):
            if ok:
                yield index, result
            elif first_error is None:
                first_error = result
    if first_error is not None:
        raise first_error


def _per_item(first, items, value):
    """Yield (index, ok, result or error) for each item of a chunk from its outcome."""
    cause = getattr(value, "__cause__", None)
    if isinstance(value, ChildError):
        if value.timed_out or not isinstance(cause, _ChunkFailed):
            for k, item in enumerate(items):
                yield first + k, False, _item_error(value, first + k, item, first, len(items))
            return
        value = cause.args
    elif isinstance(value, BaseException):
        for k in range(len(items)):
            yield first + k, False, value  # ForkError: no child was made for the chunk
        return
    pid, outcomes = value
    for k, item in enumerate(items):
        if k < len(outcomes):
            ok, result = decode_outcome(outcomes[k], pid=pid, returncode=None, index=first + k,
                                        item=item, timed_out=False, lost=False)
        else:
            ok, result = False, ChildError(
                f"child {pid} (item {first + k}: {short_repr(item)}) was not run: item "
                f"{first + len(outcomes) - 1} of its chunk ended the child",
                pid=pid, index=first + k, item=short_repr(item))
        yield first + k, ok, result


def _item_error(err, index, item, first, size):
    """``err`` (a chunk child's failure) re-aimed at one item of the chunk."""
    prefix = f"child {err.pid} (item {err.index}: {err.item}) "
    what = err.message.removeprefix(prefix)
    new = type(err)(
        f"child {err.pid} (item {index}: {short_repr(item)}) {what} "
        f"(in the child running items {first}-{first + size - 1})",
        pid=err.pid, returncode=err.returncode, index=index, item=short_repr(item),
        exc_type=err.exc_type, remote_traceback=err.remote_traceback, timed_out=err.timed_out)
    new.__cause__ = err.__cause__
    return new
