"""The README's tour and the examples run as written."""
import os
import re
import subprocess
import sys

import pytest

import procutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


# Runs a script (argv[1]) as `python SCRIPT ARGS` typed in a terminal would,
# whatever this test run inherited: with Python's SIGINT handler (Ctrl-C raises
# KeyboardInterrupt), which a run started with SIGINT ignored (nohup, a
# background job) would not install.
RUN_AS_FROM_A_TERMINAL = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.skipif(not os.path.exists(README), reason="README not shipped here")
def test_readme_tour_runs():
    blocks = python_blocks()
    assert blocks
    for block in blocks:
        proc = procutil.run_python(block)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name, args", [
    ("one_child.py", []), ("fan_out.py", []), ("fan_out.py", ["5"]), ("background_server.py", []),
])
def test_examples_run(name, args):
    path = os.path.join(ROOT, "examples", name)
    if not os.path.exists(path):
        pytest.skip("examples not shipped here")
    env = dict(os.environ, PYTHONPATH=procutil.PACKAGE_ROOT)
    proc = subprocess.run([sys.executable, "-c", RUN_AS_FROM_A_TERMINAL, path, *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if name == "fan_out.py":
        n = int(args[0]) if args else 3
        assert len([l for l in proc.stdout.splitlines() if l.startswith("child ")]) == n
