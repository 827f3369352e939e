"""The README's tour and the examples run as written."""
import os
import re
import subprocess
import sys

import pytest

import procutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


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
    proc = subprocess.run([sys.executable, path, *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if name == "fan_out.py":
        n = int(args[0]) if args else 3
        assert len([l for l in proc.stdout.splitlines() if l.startswith("child ")]) == n
