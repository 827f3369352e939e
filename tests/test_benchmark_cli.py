"""``fastfork bench``: output format, ``--json`` schema and ``--plot``, on tiny sizes.

No timing assertions: only the shape of what the command writes. Most tests
run the command in-process over a fake workload whose methods create no
process; one runs the real fork and reap workloads in a fresh interpreter.
"""
import argparse
import datetime
import importlib.util
import json
import re
import subprocess
import sys

import pytest

import procutil
from fastfork import _workloads as W
from fastfork import benchmark

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def parse(argv):
    parser = argparse.ArgumentParser(prog="fastfork bench")
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def _fail(n):
    raise RuntimeError("boom")


FAKE = W.Workload(
    key="fake", title="a fake workload", baseline="base",
    methods=(
        W.Method("base", "stdlib", lambda n: None),
        W.Method("fast", "fastfork", lambda n: None),
        W.Method("future", "fastfork", lambda n: None, min_python=(99,)),
        W.Method("prepared", "limit", lambda n, token: None, prepare=lambda n: ("token",),
                 cleanup=lambda token: None),
        W.Method("self-timed", "fastfork", lambda n: 0.25 * n, reports_time=True),
    ),
    sizes={"quick": (3,), "default": (3,), "full": (3, 5)},
    big_sizes={"quick": (), "default": (), "full": ()},
    headline="fast", expect="what this ratio means",
)
BROKEN = W.Workload(
    key="broken", title="a broken workload", baseline="base",
    methods=(W.Method("base", "stdlib", lambda n: None), W.Method("bad", "fastfork", _fail)),
    sizes={m: (2,) for m in W.MODES}, big_sizes={m: () for m in W.MODES},
)
FAKE_TARGETS = (
    W.Target("fast vs base", "fake", "fast", "small", "base", "small", 0.0, ">= 0x"),
    W.Target("fast big vs base", "fake", "fast", "big", "base", "big", 1.0, ">= 1x"),
)


@pytest.fixture
def fake(monkeypatch):
    """Make the bench command see only the fake workloads and targets."""
    monkeypatch.setattr(W, "WORKLOADS", {"fake": FAKE, "broken": BROKEN})
    monkeypatch.setattr(W, "TARGETS", FAKE_TARGETS)


def run_main(capsys, argv):
    status = benchmark.main(parse(argv))
    out, err = capsys.readouterr()
    return status, out, err


ROW = re.compile(r"^(?P<mark>[* ]) (?P<method>\S.*?)\s+(?P<rate>[\d,.]+)\s+"
                 r"(?P<per>[\d,.]+ (?:ms|us))\s+(?P<ratio>[\d.]+x)\s+(?P<rounds>\d+)$")


def test_table_lists_every_method_with_rate_ratio_status_and_a_reading(fake, capsys):
    status, out, _ = run_main(capsys, ["--only", "fake", "--rounds", "2"])
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("fastfork bench ")
    assert "median" in lines[1]
    assert any(line.startswith("a fake workload: N=3, small parent (RSS ") for line in lines)
    rows = {m["method"]: m for m in filter(None, map(ROW.match, lines))}
    assert set(rows) == {"base", "fast", "prepared", "self-timed"}
    assert rows["base"]["mark"] == "*" and rows["base"]["ratio"] == "1.00x"
    assert rows["fast"]["mark"] == " " and rows["fast"]["rounds"] == "2"
    assert rows["self-timed"]["per"] == "250.00 ms"  # what run() reported, not the wall clock
    assert any(re.match(r"^  future\s+skipped: needs Python 99\+$", line) for line in lines)
    # The group ends with what its headline ratio means; the goals are not shown.
    readings = [line for line in lines if line.startswith("  -> ")]
    assert len(readings) == 1
    assert re.match(r"^  -> fast is [\d.]+x base here; what this ratio means$", readings[0])
    assert lines.index(readings[0]) > max(lines.index(line) for line in lines
                                          if ROW.match(line))
    assert not any("goal" in line or "MISSED" in line or "targets" in line for line in lines)


def test_targets_are_shown_on_request(fake, capsys):
    status, out, _ = run_main(capsys, ["--only", "fake", "--rounds", "1", "--targets"])
    assert status == 0
    lines = out.splitlines()
    assert "fastfork's performance goals (throughput ratio, same run)" in lines
    assert any(re.match(r"^  fast vs base\s+[\d.]+x\s+goal >= 0x\s+met$", line) for line in lines)
    assert any(re.match(r"^  fast big vs base\s+-\s+goal >= 1x\s+n/a \(needs --full\)$", line)
               for line in lines)


def test_a_failure_without_text_is_named_without_a_bare_colon(monkeypatch, capsys):
    def interrupted(n):
        raise RuntimeError()
    silent = W.Workload(
        key="silent", title="silent", baseline="base",
        methods=(W.Method("base", "stdlib", lambda n: None),
                 W.Method("bad", "fastfork", interrupted)),
        sizes={m: (1,) for m in W.MODES}, big_sizes={m: () for m in W.MODES})
    monkeypatch.setattr(W, "WORKLOADS", {"silent": silent})
    status, out, _ = run_main(capsys, ["--only", "silent", "--rounds", "1"])
    assert status == 1
    assert re.search(r"^  bad\s+FAILED: RuntimeError$", out, re.M)


def test_the_methods_of_a_group_take_turns_round_by_round():
    calls = []
    workload = W.Workload(
        key="turns", title="turns", baseline="a",
        methods=tuple(W.Method(name, "stdlib", lambda n, name=name: calls.append(name))
                      for name in "abc"),
        sizes={m: (1,) for m in W.MODES}, big_sizes={m: () for m in W.MODES})
    rows = [{"workload": workload, "method": m, "parent": "small", "n": 1}
            for m in workload.methods]
    results = benchmark.run_group(rows, "default", fixed_rounds=3)
    assert calls == list("abc") * 3
    assert [r["rounds"] for r in results] == [3, 3, 3]
    assert [len(g) for g in benchmark.groups(rows + rows[:1])] == [4]


def test_a_failed_workload_is_reported_and_sets_the_exit_status(fake, capsys):
    status, out, _ = run_main(capsys, ["--only", "broken,fake", "--rounds", "1"])
    assert status == 1
    assert re.search(r"^  bad\s+FAILED: RuntimeError: boom$", out, re.M)
    assert re.search(r"^\* base\s", out, re.M)  # the other rows still ran


def test_json_schema(fake, capsys, tmp_path):
    path = tmp_path / "bench.json"
    status, out, _ = run_main(capsys, ["--only", "fake", "--rounds", "3", "--json", str(path)])
    assert status == 0
    assert f"results written to {path}" in out
    report = json.loads(path.read_text())
    assert report["schema"] == 1
    assert report["tool"] == "fastfork bench"
    assert report["mode"] == "default" and report["statistic"] == "median"
    assert datetime.datetime.fromisoformat(report["date"]).tzinfo is not None
    machine = report["machine"]
    for key in ("system", "kernel", "machine", "cpu_count", "python", "implementation",
                "fastfork"):
        assert machine[key], key
    by_method = {r["method"]: r for r in report["results"]}
    assert set(by_method) == {"base", "fast", "future", "prepared", "self-timed"}
    base = by_method["base"]
    assert base["baseline"] is True and base["ratio"] == 1.0
    assert base["status"] == "ok" and base["rounds"] == 3 and len(base["seconds"]) == 3
    assert base["median_s"] >= base["best_s"] >= 0
    assert base["children_per_s"] > 0 and base["n"] == 3 and base["parent"] == "small"
    future = by_method["future"]
    assert future["status"] == "skipped" and future["ratio"] is None
    assert future["reason"] == "needs Python 99+"
    targets = {t["name"]: t for t in report["targets"]}
    assert targets["fast vs base"]["met"] is True and targets["fast vs base"]["ratio"] > 0
    assert targets["fast big vs base"]["met"] is None
    assert targets["fast big vs base"]["why"] == "needs --full"


def test_full_runs_every_size(fake, capsys, tmp_path):
    path = tmp_path / "bench.json"
    run_main(capsys, ["--full", "--only", "fake", "--rounds", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    assert sorted({r["n"] for r in report["results"]}) == [3, 5]
    assert report["mode"] == "full"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_plot_writes_the_chart(tmp_path, suffix, magic):
    # In a fresh interpreter: matplotlib keeps its font files open once loaded.
    path = tmp_path / ("chart" + suffix)
    proc = run_cli(["--quick", "--only", "fork", "--children", "2", "--rounds", "1",
                    "--plot", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert f"chart written to {path}" in proc.stdout
    assert path.read_bytes().startswith(magic)


def test_plot_without_matplotlib_says_how_to_get_it(fake, capsys, tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib...` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "chart.png"
    status, out, err = run_main(capsys, ["--only", "fake", "--rounds", "1", "--plot", str(path)])
    assert status == 0
    assert "pip install 'fastfork[plot]'" in err and "matplotlib" in err
    assert not path.exists()
    assert "* base" in out  # the results are still printed


@pytest.mark.parametrize("argv", [
    ["--plot", "chart.pdf"], ["--only", "nope"], ["--children", "0"], ["--quick", "--full"],
])
def test_bad_arguments_are_refused_before_running(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2


def run_cli(argv):
    """Run ``python -m fastfork bench ARGV`` in a fresh interpreter; return the result."""
    return subprocess.run([sys.executable, "-m", "fastfork", "bench", *argv],
                          capture_output=True, text=True, timeout=60, cwd=procutil.PACKAGE_ROOT)


def test_real_fork_and_reap_workloads_in_a_fresh_interpreter(tmp_path):
    path = tmp_path / "bench.json"
    proc = run_cli(["--quick", "--only", "fork,reap", "--children", "3", "--rounds", "1",
                    "--json", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress line when stderr is not a terminal
    rows = [m for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert {m["method"] for m in rows} == {"os.fork", "fastfork.fork", "C limit",
                                           "os.waitpid loop", "fastfork.reap"}
    report = json.loads(path.read_text())
    assert {(r["workload"], r["status"]) for r in report["results"]} == {
        ("fork", "ok"), ("reap", "ok")}
    assert all(r["n"] == 3 for r in report["results"])


def test_import_time_workload_in_a_fresh_interpreter(tmp_path):
    path = tmp_path / "bench.json"
    proc = run_cli(["--quick", "--only", "import", "--children", "2", "--rounds", "1",
                    "--json", str(path)])
    assert proc.returncode == 0, proc.stderr
    rows = [m for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert [m["method"] for m in rows] == ["import subprocess", "import fastfork"]
    assert re.search(r"^  -> import fastfork is [\d.]+x import subprocess here; ", proc.stdout,
                     re.M)
    report = json.loads(path.read_text())
    assert [r["status"] for r in report["results"]] == ["ok", "ok"]
    assert all(r["per_child_s"] > 0 for r in report["results"])
    assert "import fastfork vs import subprocess" in {t["name"] for t in report["targets"]}
