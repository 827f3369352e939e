"""The fan-out contract (fastfork/_scheduler.py), checked against every front end.

Each rule is written once and runs against every front end in FRONT_ENDS:
``map``, ``as_completed``, ``ForkServer.map``, ``ForkServer.as_completed``,
``spawn_many``, ``ForkExecutor`` (from the caller and from a server) and the
asyncio ones (``aio.map``, ``aio.as_completed``, ``aio.spawn_many``, each run in
``asyncio.run``). A new front end joins by adding its adapter to that list.

A task is Python source run in the child -- by a function for the function
front ends, as ``sys.executable -c`` for ``spawn_many`` -- with ``x`` (the
item), ``LOG`` (a file shared by the test and every child) and the helpers of
PRELUDE; it sets ``result``. Children synchronise through the log (lines
appended atomically), never by sleeping a fixed time.
"""
import ast
import asyncio
import concurrent.futures
import dataclasses
import errno
import math
import os
import signal
import sys
import textwrap
import time

import pytest

import faultlib
import fastfork
import procutil
from fastfork import aio

PRELUDE = '''
import os, signal, sys, time

def note(*words):
    with open(LOG, "a") as f:
        f.write(" ".join(map(str, words)) + "\\n")

def lines():
    try:
        with open(LOG) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []

def count(first_word):
    return sum(1 for line in lines() if line.split()[:1] == [first_word])

def noted(*words):
    return " ".join(map(str, words)) in lines()

def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True

def wait_until(condition, limit=60.0):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the condition did not come true")
        time.sleep(0.002)
'''


def contract_task(spec):
    """The function the function front ends run: exec the task's source."""
    source, x, log = spec
    namespace = {"x": x, "LOG": log}
    exec(PRELUDE + source, namespace)
    return namespace.get("result")


def command_for(source, x, log):
    """The ``sys.executable -c`` program running the task; prints repr(result)."""
    return [sys.executable, "-c",
            f"LOG = {log!r}\nx = {x!r}\n{PRELUDE}\n{source}\nprint(repr(result))"]


# ---------------------------------------------------------------- the front ends

@dataclasses.dataclass
class Outcome:
    """One item's outcome, whatever the front end: a value, or a failure."""

    ok: bool
    value: object = None
    timed_out: bool = False
    error: object = None        # the ChildError / ForkError / CommandResult
    start_errno: int = None     # the errno when no child could be started


@dataclasses.dataclass
class Run:
    outcomes: dict          # index -> Outcome, in the order the front end gave them
    raised: BaseException   # what the call raised (None if nothing)
    elapsed: float


class FrontEnd:
    """Adapter: runs task source over items through one front end.

    ``completion_order``: outcomes arrive as children finish (``on_result``
    is called then); ``chunks``: takes ``chunksize``; ``server``: children
    are forked by a ForkServer, ``fork_server`` once ``open()`` started it;
    ``one_call``: one call over all the items, which the first failure
    stops and whose fork retries can be set (an executor runs what it is given).
    """

    name = None
    completion_order = False
    chunks = False
    server = False
    one_call = True

    def open(self):
        pass

    def close(self):
        pass

    def run(self, source, items, log, *, jobs, timeout=None, grace=1.0, keep_going=False,
            retries=8, chunksize=1, on_result=None):
        """Run the task over ``items``; return a Run. What the call raises is in the Run."""
        outcomes = {}

        def record(index, outcome):
            outcomes[index] = outcome
            if on_result is not None:
                on_result(index, outcome)

        raised = None
        started = time.monotonic()
        try:
            self.call(textwrap.dedent(source), list(items), log, record, jobs=jobs,
                      timeout=timeout, grace=grace, keep_going=keep_going, retries=retries,
                      chunksize=chunksize)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt is a result here
            raised = exc
        return Run(outcomes, raised, time.monotonic() - started)


def function_outcome(value):
    if isinstance(value, fastfork.ForkError):
        return Outcome(False, error=value, start_errno=value.errno)
    if isinstance(value, fastfork.ChildError):
        # A ChildTimeout exactly when the child was stopped for its timeout.
        assert isinstance(value, fastfork.ChildTimeout) == value.timed_out, value
        return Outcome(False, timed_out=value.timed_out, error=value)
    return Outcome(True, value)


class FunctionFrontEnd(FrontEnd):
    chunks = True

    def call(self, source, items, log, record, *, keep_going, retries, **options):
        specs = [(source, x, log) for x in items]
        for index, value in self.fan_out(specs, return_exceptions=keep_going,
                                         fork_retries=retries, **options):
            record(index, function_outcome(value))


class Map(FunctionFrontEnd):
    name = "map"

    def fan_out(self, specs, **options):
        return enumerate(fastfork.map(contract_task, specs, **options))


class AsCompleted(FunctionFrontEnd):
    name = "as_completed"
    completion_order = True

    def fan_out(self, specs, **options):
        return fastfork.as_completed(contract_task, specs, **options)


class ServerFrontEnd(FunctionFrontEnd):
    server = True
    fork_server = None

    def open(self):
        self.fork_server = fastfork.ForkServer(preload=["test_contract"]).open()

    def close(self):
        self.fork_server.close()


class ServerMap(ServerFrontEnd):
    name = "ForkServer.map"

    def fan_out(self, specs, **options):
        return enumerate(self.fork_server.map(contract_task, specs, **options))


class ServerAsCompleted(ServerFrontEnd):
    name = "ForkServer.as_completed"
    completion_order = True

    def fan_out(self, specs, **options):
        return self.fork_server.as_completed(contract_task, specs, **options)


class SpawnMany(FrontEnd):
    name = "spawn_many"
    completion_order = True  # through its callback

    def call(self, source, items, log, record, *, keep_going, retries, chunksize, **options):
        assert chunksize == 1, "spawn_many takes no chunksize"
        fastfork.spawn_many(
            [command_for(source, x, log) for x in items], keep_going=keep_going,
            spawn_retries=retries, capture=True,
            callback=lambda index, result: record(index, self.outcome(result)), **options)

    @staticmethod
    def outcome(result):
        if result.error is not None:
            return Outcome(False, error=result, start_errno=result.error.errno)
        if result.ok:
            return Outcome(True, ast.literal_eval(result.stdout.decode()))
        return Outcome(False, timed_out=result.timed_out, error=result)


class Executor(FrontEnd):
    """ForkExecutor: a future per item, collected with concurrent.futures.as_completed."""

    name = "ForkExecutor"
    completion_order = True
    chunks = False
    one_call = False

    def executor(self, jobs, **options):
        return fastfork.ForkExecutor(jobs, **options)

    def call(self, source, items, log, record, *, jobs, timeout, grace, keep_going, retries,
             chunksize):
        assert chunksize == 1, "a ForkExecutor's chunks are map's, not per item"
        with self.executor(jobs, timeout=timeout, grace=grace) as ex:
            futures = {ex.submit(contract_task, (source, x, log)): i
                       for i, x in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()
                if error is None:
                    record(futures[future], Outcome(True, future.result()))
                else:
                    # What the task raised comes back as itself, the ChildError as its cause.
                    if not isinstance(error, fastfork.FastforkError):
                        error = error.__cause__
                    record(futures[future], function_outcome(error))


class ServerExecutor(Executor, ServerFrontEnd):
    name = "ForkServer.executor"

    def executor(self, jobs, **options):
        return self.fork_server.executor(jobs, **options)


class AioMap(FrontEnd):
    name = "aio.map"

    def call(self, source, items, log, record, *, keep_going, retries, chunksize, **options):
        assert chunksize == 1, "aio.map takes no chunksize"
        values = asyncio.run(aio.map(contract_task, [(source, x, log) for x in items],
                                     return_exceptions=keep_going, fork_retries=retries,
                                     **options))
        for index, value in enumerate(values):
            record(index, function_outcome(value))


class AioAsCompleted(FrontEnd):
    name = "aio.as_completed"
    completion_order = True

    def call(self, source, items, log, record, *, keep_going, retries, chunksize, **options):
        assert chunksize == 1, "aio.as_completed takes no chunksize"

        async def consume():
            async for index, value in aio.as_completed(
                    contract_task, [(source, x, log) for x in items],
                    return_exceptions=keep_going, fork_retries=retries, **options):
                record(index, function_outcome(value))
        asyncio.run(consume())


class AioSpawnMany(SpawnMany):
    name = "aio.spawn_many"

    def call(self, source, items, log, record, *, keep_going, retries, chunksize, **options):
        assert chunksize == 1, "aio.spawn_many takes no chunksize"
        asyncio.run(aio.spawn_many(
            [command_for(source, x, log) for x in items], keep_going=keep_going,
            spawn_retries=retries, capture=True,
            callback=lambda index, result: record(index, self.outcome(result)), **options))


# Every front end of the contract. A new one joins here.
FRONT_ENDS = [Map(), AsCompleted(), ServerMap(), ServerAsCompleted(), SpawnMany(), Executor(),
              ServerExecutor(), AioMap(), AioAsCompleted(), AioSpawnMany()]
BY_NAME = {fe.name: fe for fe in FRONT_ENDS}


def front_ends(capability=None):
    """The front ends having ``capability`` (an adapter attribute), as pytest params."""
    return [pytest.param(fe.name, id=fe.name) for fe in FRONT_ENDS
            if capability is None or getattr(fe, capability)]


@pytest.fixture(scope="module")
def opened():
    """The names of the front ends opened for this module (their servers run until its end)."""
    names = set()
    yield names
    for name in names:
        BY_NAME[name].close()


@pytest.fixture(scope="module", params=front_ends(), ids=lambda name: name)
def any_front_end(request, opened):
    """Each front end, opened once for the module (before the per-test leak guard)."""
    return _open(request.param, opened)


@pytest.fixture(scope="module", params=front_ends("completion_order"), ids=lambda name: name)
def completing_front_end(request, opened):
    """Each front end that hands out results as children finish."""
    return _open(request.param, opened)


@pytest.fixture(scope="module", params=front_ends("chunks"), ids=lambda name: name)
def chunking_front_end(request, opened):
    """Each front end that takes ``chunksize``."""
    return _open(request.param, opened)


def _open(name, opened):
    fe = BY_NAME[name]
    if name not in opened:
        fe.open()
        opened.add(name)
    return fe


@pytest.fixture
def log(tmp_path):
    return str(tmp_path / "log")


def read_log(log):
    with open(log) as f:
        return f.read().splitlines()


# ---------------------------------------------------------------- 1. results in order

def test_results_in_input_order(any_front_end, log):
    # Item i finishes only after item i+1 has: completion order is the reverse.
    run = any_front_end.run("""
        note("start", x)
        if x < 3:
            wait_until(lambda: noted("done", x + 1))
        note("done", x)
        result = x * 10
    """, range(4), log, jobs=4)
    assert run.raised is None, run.raised
    assert [run.outcomes[i].value for i in range(4)] == [0, 10, 20, 30]


def test_results_as_completed(completing_front_end, log):
    # Item i waits until the caller has been handed item i+1's result.
    def on_result(index, outcome):
        with open(log, "a") as f:
            f.write(f"reported {index}\n")
    run = completing_front_end.run("""
        if x < 3:
            wait_until(lambda: noted("reported", x + 1))
        result = x
    """, range(4), log, jobs=4, on_result=on_result)
    assert run.raised is None, run.raised
    assert list(run.outcomes) == [3, 2, 1, 0]
    assert [o.value for o in run.outcomes.values()] == [3, 2, 1, 0]


# ---------------------------------------------------------------- 2. the jobs limit

def test_at_most_jobs_children_at_once(any_front_end, log):
    # Item i ends once items up to i + jobs - 1 have started: every wave is
    # full, so a front end launching one child too many would show it.
    jobs, n = 3, 8
    run = any_front_end.run(f"""
        note("start", x)
        wait_until(lambda: count("start") >= min(x + {jobs}, {n}))
        note("end", x)
        result = x
    """, range(n), log, jobs=jobs)
    assert run.raised is None, run.raised
    alive = most = 0
    for line in read_log(log):
        alive += 1 if line.startswith("start") else -1
        most = max(most, alive)
    assert most == jobs
    assert sorted(run.outcomes) == list(range(n))


# ---------------------------------------------------------------- 3. timeouts

# Timeouts long enough for a child to be ready before them (installing its
# SIGTERM handler) even where an interpreter start-up takes seconds (spawn_many
# on a loaded machine).
TIMEOUT = 3.0


def test_timeouts_stop_children_that_ignore_sigterm_concurrently(any_front_end, log):
    timeout, grace = TIMEOUT, 1.5
    run = any_front_end.run("""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        note("ready", x)
        time.sleep(600)
    """, range(4), log, jobs=4, timeout=timeout, grace=grace, keep_going=True)
    assert run.raised is None, run.raised
    assert sorted(read_log(log)) == [f"ready {i}" for i in range(4)]
    for outcome in run.outcomes.values():
        assert outcome.timed_out and not outcome.ok
        assert outcome.error.returncode == -signal.SIGKILL
    # A behaviour bound, not a speed threshold: the four stops overlap, so
    # the call takes about timeout + grace. Stopping them one after another
    # (each waiting out its grace) takes timeout + 4 * grace; the bound sits
    # between, loose enough for a loaded machine.
    assert run.elapsed < timeout + 2 * grace


def test_a_timeout_is_reported_however_the_child_then_exits(any_front_end, log):
    # Item 0's SIGTERM handler makes it finish normally with a result; item
    # 1's raises SystemExit. Both were stopped for their timeout.
    run = any_front_end.run("""
        if x == 0:
            stop = []
            signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
            note("ready", x)
            wait_until(lambda: stop)
            note("caught", x)
            result = "finished anyway"
        else:
            def leave(*a):
                note("caught", x)
                sys.exit("terminated")
            signal.signal(signal.SIGTERM, leave)
            note("ready", x)
            time.sleep(600)
    """, range(2), log, jobs=2, timeout=TIMEOUT, grace=30.0, keep_going=True)
    assert run.raised is None, run.raised
    assert sorted(read_log(log)) == ["caught 0", "caught 1", "ready 0", "ready 1"]
    for outcome in run.outcomes.values():
        assert outcome.timed_out and not outcome.ok, outcome
    if isinstance(run.outcomes[1].error, fastfork.ChildError):
        assert run.outcomes[1].error.exc_type == "SystemExit"
        assert "timed out" in str(run.outcomes[1].error)


# ---------------------------------------------------------------- 4. the first failure

@pytest.mark.parametrize("keep_going", [False, True], ids=["stop", "keep_going"])
def test_first_failure_stops_new_launches(any_front_end, log, keep_going):
    if not keep_going and not any_front_end.one_call:
        pytest.skip("an executor runs every task it was given: its caller cancels the rest")
    # Item 0 fails while item 1 runs; item 1 ends only once item 0 has exited.
    run = any_front_end.run("""
        note("start", x, os.getpid())
        if x == 0:
            wait_until(lambda: count("start") >= 2)
            raise ValueError("item 0 fails")
        if x == 1:
            wait_until(lambda: any(line.startswith("start 0 ") for line in lines()))
            pid0 = next(line.split()[2] for line in lines() if line.startswith("start 0 "))
            wait_until(lambda: gone(pid0))
        result = x
    """, range(4), log, jobs=2, keep_going=keep_going)
    started = sorted(int(line.split()[1]) for line in read_log(log))
    failure = run.outcomes.get(0, Outcome(False, error=run.raised)).error
    assert failure is not None
    if isinstance(failure, fastfork.ChildError):
        assert failure.index == 0 and failure.exc_type == "ValueError"
    if keep_going:
        assert run.raised is None, run.raised
        assert started == [0, 1, 2, 3]
        assert [run.outcomes[i].ok for i in range(4)] == [False, True, True, True]
    else:
        assert started == [0, 1]  # the running item finished; none started after
        assert 2 not in run.outcomes and 3 not in run.outcomes
        if 1 in run.outcomes:
            assert run.outcomes[1].value == 1


# ---------------------------------------------------------------- 5. EAGAIN: back off, retry

EAGAIN_CODE = """
import procutil
import test_contract
FDS = procutil.open_fds()
fe = test_contract.BY_NAME[{name!r}]
{join}
fe.open()
group = {group!r}
def set_max(value):
    with open(group + "/pids.max", "w") as f:
        f.write(str(value))
def refused():
    with open(group + "/pids.events") as f:
        return int(f.read().split()[1])
def current():
    with open(group + "/pids.current") as f:
        return int(f.read())
out = {{}}
try:
    # Only two children fit; each waits until a fork has been refused.
    set_max(current() + 2)
    run = fe.run('''
        wait_until(lambda: int(open({group!r} + "/pids.events").read().split()[1]) > 0)
        result = x
    ''', range(6), {log!r}, jobs=4, retries=20)
    out["transient"] = [repr(run.raised), sorted(run.outcomes),
                        [o.value for o in run.outcomes.values()], refused()]
    # No child fits at all: the retries run out.
    set_max(current())
    before = refused()
    run = fe.run("result = x", range(3), {log!r}, jobs=2, retries=2)
    errnos = [o.start_errno for o in run.outcomes.values()]
    errnos.append(getattr(run.raised, "errno", None))
    out["exhausted"] = [sorted(set(errnos) - {{None}}), any(o.ok for o in run.outcomes.values()),
                        refused() - before]
finally:
    set_max("max")
    fe.close()
faultlib.report(out, FDS)
"""


def test_eagain_is_retried_with_back_off(any_front_end, tmp_path):
    if not any_front_end.one_call:
        pytest.skip("an executor's fork retries are fixed (tests/test_executor.py)")
    with faultlib.pids_cgroup("max") as group:
        out = faultlib.contained(
            "import faultlib\n" + EAGAIN_CODE.format(
                name=any_front_end.name, join=group.join_code, group=group.path,
                log=str(tmp_path / "log")))
    results, indexes, values, refused = out["transient"]
    assert results == "None"
    assert indexes == list(range(6)) and sorted(values) == list(range(6))
    # Refused, then retried until a child made room. Without back-off the 20
    # retries would be used up at once, long before a child could exit.
    assert refused >= 1
    errnos, any_ok, refused = out["exhausted"]
    assert errnos == [errno.EAGAIN] and not any_ok
    # Every launch is tried once and retried twice before it is given up;
    # the items after it fail with the same error without being tried.
    assert refused == 3


# ---------------------------------------------------------------- 6. Ctrl-C

@pytest.fixture
def sigusr1_interrupts():
    """SIGUSR1 raises KeyboardInterrupt in this process (as Ctrl-C's SIGINT would)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGUSR1, interrupt)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_ctrl_c_stops_and_reaps_everything(any_front_end, log, sigusr1_interrupts):
    jobs = 3
    before = procutil.children()
    # The last child of the first wave sends the interrupt once it runs.
    run = any_front_end.run(f"""
        note("start", x)
        if x == {jobs - 1}:
            os.kill({os.getpid()}, signal.SIGUSR1)
        time.sleep(600)
    """, range(6), log, jobs=jobs, grace=5.0)
    assert isinstance(run.raised, KeyboardInterrupt), run.raised
    assert procutil.children() == before
    if any_front_end.server:
        # The server is its children's parent and reaps them on its own thread of
        # control: the caller's stop ends them at once, their reaping follows.
        server_pid = any_front_end.fork_server.pid
        assert procutil.wait_ended(procutil.children(server_pid)) == []
        deadline = time.monotonic() + 30
        while procutil.children(server_pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert procutil.children(server_pid) == set()
    assert len(read_log(log)) <= jobs


# ---------------------------------------------------------------- 7. die with the parent

DIE_CODE = """
import os, signal, subprocess, sys, time
import procutil
inner = '''
import test_contract
fe = test_contract.BY_NAME[{name!r}]
fe.open()
fe.run("note('pid', os.getpid()); time.sleep(600)", range(3), {log!r}, jobs=3)
'''
proc = subprocess.Popen([sys.executable, "-c", inner])
def pids():
    try:
        with open({log!r}) as f:
            return [int(line.split()[1]) for line in f]
    except FileNotFoundError:
        return []
deadline = time.monotonic() + 60
while len(pids()) < 3 and time.monotonic() < deadline and proc.poll() is None:
    time.sleep(0.01)
children = pids()
os.kill(proc.pid, signal.SIGKILL)
proc.wait()
deadline = time.monotonic() + 10
while any(procutil.state(p) not in (None, "Z") for p in children) and time.monotonic() < deadline:
    time.sleep(0.01)
print(len(children), sum(procutil.state(p) not in (None, "Z") for p in children))
"""


def test_children_die_with_the_parent_by_default(any_front_end, tmp_path):
    # The caller is SIGKILLed mid-run: no child may survive it.
    result = faultlib.run_contained(DIE_CODE.format(name=any_front_end.name,
                                                    log=str(tmp_path / "log")))
    assert result.stdout.split() == ["3", "0"], result.stderr
    assert result.leftover == 0


# ---------------------------------------------------------------- 8. chunksize

def test_chunks_keep_results_per_item_in_order(chunking_front_end, log):
    run = chunking_front_end.run("result = (x * 10, os.getpid())", range(10), log,
                                 jobs=2, chunksize=4)
    assert run.raised is None, run.raised
    values = [run.outcomes[i].value for i in range(10)]
    assert [v for v, _ in values] == [x * 10 for x in range(10)]
    # One child per chunk: items 0-3, 4-7, 8-9.
    pids = [pid for _, pid in values]
    assert len(set(pids)) == math.ceil(10 / 4)
    assert pids[0:4] == [pids[0]] * 4 and pids[4:8] == [pids[4]] * 4


def test_chunks_keep_errors_per_item(chunking_front_end, log):
    run = chunking_front_end.run("""
        if x == 5:
            raise ValueError(f"bad {x}")
        result = x
    """, range(8), log, jobs=2, chunksize=3, keep_going=True)
    assert run.raised is None
    assert [run.outcomes[i].ok for i in range(8)] == [True] * 5 + [False] + [True] * 2
    err = run.outcomes[5].error
    assert err.index == 5 and err.exc_type == "ValueError" and "bad 5" in str(err)
    # Without keep_going, the failed item's error is raised.
    run = chunking_front_end.run("""
        if x == 5:
            raise ValueError(f"bad {x}")
        result = x
    """, range(8), log, jobs=2, chunksize=3)
    assert isinstance(run.raised, fastfork.ChildError) and run.raised.index == 5


def test_a_crashed_chunk_fails_every_item_naming_it(chunking_front_end, log):
    run = chunking_front_end.run("""
        if x == 5:
            os._exit(7)
        result = x
    """, range(9), log, jobs=2, chunksize=3, keep_going=True)
    assert run.raised is None
    assert [run.outcomes[i].ok for i in range(9)] == [True] * 3 + [False] * 3 + [True] * 3
    for i in (3, 4, 5):
        err = run.outcomes[i].error
        assert isinstance(err, fastfork.ChildError) and err.index == i
        assert f"(item {i}: " in str(err) and err.returncode == 7


def test_a_timed_out_chunk_fails_every_item_with_child_timeout(chunking_front_end, log):
    run = chunking_front_end.run("""
        if x == 1:
            time.sleep(600)
        result = x
    """, range(4), log, jobs=2, chunksize=2, timeout=TIMEOUT, grace=1.0, keep_going=True)
    assert run.raised is None
    assert [run.outcomes[i].ok for i in range(4)] == [False, False, True, True]
    for i in (0, 1):
        assert isinstance(run.outcomes[i].error, fastfork.ChildTimeout)
        assert run.outcomes[i].error.index == i
