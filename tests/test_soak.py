"""Load and soak: many concurrent children, many fork/reap cycles, a chaos mix.

The default run has short versions (a few seconds on 2 cores); ``pytest -m
soak`` runs the long ones (10,000 concurrent children, 100,000 fork/reap
cycles, the chaos mix at length) and prints their figures. Every run ends
with 0 zombies, the fd count unchanged and RSS growth of a few MB at most.
"""
import json
import os
import threading
import time
import warnings

import pytest

import fastfork
import faultlib
import procutil

RSS_GROWTH_LIMIT = 8 << 20


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class _Budget:
    """Snapshot of fds, children and RSS; ``check()`` asserts nothing grew."""

    def __init__(self):
        self.fds = procutil.open_fds()
        self.children = procutil.children()
        self.rss = _rss()

    def check(self):
        assert procutil.children() == self.children, "children left behind"
        assert procutil.open_fds() == self.fds, "fds leaked"
        growth = _rss() - self.rss
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth >> 20} MB"
        return growth


def _waves(waves, width):
    """``waves`` times: fork ``width`` children that block together, release, reap."""
    for _ in range(waves):
        r, w = os.pipe()
        pids = []
        try:
            for _ in range(width):
                pid = fastfork.fork()
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)          # blocks until the parent closes w
                    os._exit(0)
                pids.append(pid)
        finally:
            os.close(w)
            os.close(r)
            statuses = fastfork.reap(pids)
        assert [s for _, s in statuses] == [0] * width
        assert not procutil.zombies(pids)


def _map_wave(width):
    """One fastfork.map wave of ``width`` children alive at once."""
    r, w = os.pipe()
    released = threading.Event()

    def release_when_all_started():
        # The children block on the pipe until every one of them exists.
        while len(procutil.children()) < width and not released.is_set():
            time.sleep(0.01)
        os.close(w)
        released.set()

    t = threading.Thread(target=release_when_all_started)
    t.start()
    try:
        results = fastfork.map(lambda i: (os.close(w), os.read(r, 1), i)[2], range(width),
                               jobs=width)
    finally:
        released.set()
        t.join()
        os.close(r)
        if not released.is_set():
            os.close(w)
    assert results == list(range(width))


def _cycles(threads, per_thread):
    """fork + _exit + waitpid, ``per_thread`` times in each of ``threads`` threads."""
    errors = []

    def worker():
        try:
            for _ in range(per_thread):
                pid = fastfork.fork()
                if pid == 0:
                    os._exit(7)
                _, status = fastfork.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 7
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    assert errors == []


# ---------------------------------------------------------------- default run

def test_two_waves_of_200_concurrent_children():
    budget = _Budget()
    _waves(2, 200)
    budget.check()


def test_map_wave_of_200_concurrent_children():
    budget = _Budget()
    _map_wave(200)
    budget.check()


def test_400_fork_reap_cycles_from_4_threads():
    budget = _Budget()
    _cycles(4, 100)
    budget.check()


CHAOS = """
import json, os, random, signal, sys, tempfile, time
import fastfork, faultlib, procutil
FDS = procutil.open_fds()

def segv(_):
    import ctypes, resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.string_at(0)

def victim(d):
    open(os.path.join(d, str(os.getpid())), "w").close()
    time.sleep(5)
    return "survived"

def killer(d):
    for name in os.listdir(d):
        try:
            os.kill(int(name), signal.SIGKILL)
            return "killed"
        except (ProcessLookupError, ValueError):
            continue
    return "nobody"

def sleeper(_):
    time.sleep(60)

def ok(i):
    return i

def run(rounds, items, seed):
    random.seed(seed)
    figures = dict(children=0, lost=0, interrupted=0, outcomes={})
    kinds = [segv] * 5 + [victim] * 5 + [killer] * 5 + [sleeper] * 5 + [ok] * 80
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            plan = [random.choice(kinds) for _ in range(items)]
            interrupt = random.random() < INTERRUPT_RATE
            if interrupt:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(0.01, 0.3))
            try:
                res = fastfork.map(lambda i: plan[i](d if plan[i] in (victim, killer) else i),
                                   range(items), jobs=16, timeout=0.5, grace=0.1,
                                   return_exceptions=True)
            except KeyboardInterrupt:
                figures["interrupted"] += 1
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            figures["children"] += items
            for i, (fn, got) in enumerate(zip(plan, res)):
                if isinstance(got, fastfork.ForkError):
                    kind = "fork-error"
                elif isinstance(got, fastfork.ChildError):
                    kind = "timeout" if "timed out" in str(got) else f"signal-{got.signal}"
                else:
                    kind = "ok"
                    if fn is ok and got != i:
                        figures["lost"] += 1
                expected = {segv: {"signal-11"}, victim: {"signal-9", "timeout"},
                            killer: {"ok"}, sleeper: {"timeout"}, ok: {"ok"}}[fn]
                if kind not in expected | {"fork-error"}:
                    figures["lost"] += 1
                key = f"{fn.__name__}:{kind}"
                figures["outcomes"][key] = figures["outcomes"].get(key, 0) + 1
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        figures["errors_injected"] = faultlib.shim().failures("fork")
    except RuntimeError:
        figures["errors_injected"] = 0
    figures["zombies"] = len(procutil.zombies(procutil.children()))
    figures["fds_leaked"] = len(procutil.open_fds() - FDS)
    return figures

signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
faultlib.report(run(ROUNDS, ITEMS, 2024), FDS)
"""


def _chaos(rounds, items, interrupt_rate=0.2, timeout=900):
    code = (CHAOS.replace("ROUNDS", str(rounds)).replace("ITEMS", str(items))
            .replace("INTERRUPT_RATE", repr(interrupt_rate)))
    # Injected fork failures: every 25th fork fails with EAGAIN (map retries them).
    return faultlib.contained(code, runner=faultlib.run_with_shim, funcs="fork",
                              errno="EAGAIN", every=25, timeout=timeout)


def test_chaos_mix_short():
    figures = _chaos(4, 60, interrupt_rate=0.0, timeout=120)
    assert figures["lost"] == 0, figures
    assert figures["zombies"] == 0 and figures["fds_leaked"] == 0, figures
    assert figures["errors_injected"] > 0, figures


# ---------------------------------------------------------------- soak

def _print_figures(name, **figures):
    print(f"\n[soak] {name}: " + json.dumps(figures, sort_keys=True))


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_10000_concurrent_children():
    budget = _Budget()
    start = time.monotonic()
    _waves(1, 10000)
    _waves(5, 2000)
    growth = budget.check()
    _print_figures("10,000 concurrent + 5 waves of 2,000", children=20000, zombies=0,
                   fds_leaked=0, rss_growth_kb=growth >> 10,
                   seconds=round(time.monotonic() - start, 1))


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_100000_fork_reap_cycles_across_pid_wraparound():
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    budget = _Budget()
    start = time.monotonic()
    cycles = max(100000, 3 * pid_max)
    _cycles(4, cycles // 4)
    growth = budget.check()
    _print_figures("fork/reap cycles from 4 threads", cycles=cycles, pid_max=pid_max,
                   wraps=cycles // pid_max, zombies=0, fds_leaked=0,
                   rss_growth_kb=growth >> 10, seconds=round(time.monotonic() - start, 1))


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("interrupt_rate", [
    0.0, pytest.param(0.2, id="random-sigint")])
def test_soak_chaos_mix(interrupt_rate):
    start = time.monotonic()
    figures = _chaos(100, 200, interrupt_rate)
    _print_figures("chaos mix (5% segfault, 5% killed by a sibling, 5% timeout, "
                   f"fork EAGAIN every 25th, SIGINT in {interrupt_rate:.0%} of rounds)",
                   seconds=round(time.monotonic() - start, 1), **figures)
    assert figures["lost"] == 0
    assert figures["zombies"] == 0 and figures["fds_leaked"] == 0
