"""fastfork._checks: one set of argument checks for every fan-out.

A value of the wrong type is a TypeError, a value out of range a ValueError,
whichever front end takes it, and nothing is started before the check.
"""
import math

import pytest

import fastfork
import procutil
from fastfork import _checks


def test_check_count():
    assert _checks.check_count(0, "n") == 0
    assert _checks.check_count(3, "n", minimum=1) == 3
    for bad in (1.0, "1", True, None):
        with pytest.raises(TypeError, match="n must be an int"):
            _checks.check_count(bad, "n")
    with pytest.raises(ValueError, match="n must be >= 1, not 0"):
        _checks.check_count(0, "n", minimum=1)


def test_check_fan_out_normalises():
    jobs, timeout, grace, retries, chunksize = _checks.check_fan_out(
        None, 2, 0, 3, "fork_retries", 5)
    assert jobs >= 1 and timeout == 2.0 and isinstance(timeout, float)
    assert (grace, retries, chunksize) == (0.0, 3, 5)


def test_check_optional_callable():
    assert _checks.check_optional_callable(None, "callback") is None
    assert _checks.check_optional_callable(len, "callback") is len
    with pytest.raises(TypeError, match="callback must be callable"):
        _checks.check_optional_callable(3, "callback")


WRONG_TYPE = [dict(jobs=1.5), dict(jobs="2"), dict(jobs=True), dict(timeout="1"),
              dict(grace="1"), dict(retries=1.5), dict(retries="3"), dict(retries=True),
              dict(retries=None)]
WRONG_VALUE = [dict(jobs=0), dict(jobs=-1), dict(timeout=0), dict(timeout=-1),
               dict(timeout=math.nan), dict(timeout=math.inf), dict(grace=-1),
               dict(grace=math.nan), dict(retries=-1)]
CHUNKS_WRONG_TYPE = [dict(chunksize=2.0), dict(chunksize="2"), dict(chunksize=None)]
CHUNKS_WRONG_VALUE = [dict(chunksize=0), dict(chunksize=-3)]


@pytest.fixture(scope="module")
def server():
    # Never started: every call below must fail before it needs the server.
    srv = fastfork.ForkServer()
    yield srv
    assert srv.pid is None
    srv.close()


def call(front_end, server, options):
    """Call ``front_end`` with ``options`` (``retries`` under the front end's own name)."""
    options = dict(options)
    if "retries" in options:
        name = "spawn_retries" if front_end == "spawn_many" else "fork_retries"
        options[name] = options.pop("retries")
    if front_end == "spawn_many":
        return fastfork.spawn_many([["true"]], **options)
    if front_end == "map":
        return fastfork.map(abs, [1], **options)
    if front_end == "as_completed":
        return fastfork.as_completed(abs, [1], **options)
    if front_end == "ForkServer.map":
        return server.map(abs, [1], **options)
    return server.as_completed(abs, [1], **options)


FRONT_ENDS = ["map", "as_completed", "ForkServer.map", "ForkServer.as_completed", "spawn_many"]
FUNCTION_FRONT_ENDS = FRONT_ENDS[:4]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("options", WRONG_TYPE, ids=repr)
def test_wrong_type_is_a_type_error(front_end, options, server):
    before = procutil.children()
    with pytest.raises(TypeError):
        call(front_end, server, options)
    assert procutil.children() == before


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("options", WRONG_VALUE, ids=repr)
def test_wrong_value_is_a_value_error(front_end, options, server):
    before = procutil.children()
    with pytest.raises(ValueError):
        call(front_end, server, options)
    assert procutil.children() == before


@pytest.mark.parametrize("front_end", FUNCTION_FRONT_ENDS)
def test_chunksize_checks(front_end, server):
    for options in CHUNKS_WRONG_TYPE:
        with pytest.raises(TypeError, match="chunksize"):
            call(front_end, server, options)
    for options in CHUNKS_WRONG_VALUE:
        with pytest.raises(ValueError, match="chunksize"):
            call(front_end, server, options)


@pytest.mark.parametrize("front_end", FUNCTION_FRONT_ENDS)
def test_not_callable_is_a_type_error(front_end, server):
    with pytest.raises(TypeError):
        if front_end == "map":
            fastfork.map(3, [1])
        elif front_end == "as_completed":
            fastfork.as_completed(3, [1])
        elif front_end == "ForkServer.map":
            server.map(3, [1])
        else:
            server.as_completed(3, [1])


def test_spawn_many_callback_must_be_callable():
    with pytest.raises(TypeError, match="callback"):
        fastfork.spawn_many([["true"]], callback="print")



def test_jobs_beyond_a_c_int_means_no_limit():
    assert fastfork.map(abs, [-1, -2], jobs=2**100) == [1, 2]
    assert sorted(fastfork.as_completed(abs, [-1, -2], jobs=2**100)) == [(0, 1), (1, 2)]
    [result] = fastfork.spawn_many([["true"]], jobs=2**100)
    assert result.ok
    with fastfork.ForkExecutor(2**100) as executor:
        assert executor.submit(abs, -1).result() == 1
