"""The package surface: exports, the import errors, the console entry points."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import fastfork
import procutil


def test_all_names_exist_and_exceptions_say_fastfork():
    for name in fastfork.__all__:
        assert hasattr(fastfork, name), name
    for exc in (fastfork.FastforkError, fastfork.ChildError, fastfork.ForkError,
                fastfork.TimeoutExpired, fastfork.ServerError):
        assert exc.__module__ == "fastfork"


def test_drop_ins_are_compiled_not_aliases():
    import os as _os
    for name in ("fork", "waitpid", "wait", "wait3", "wait4", "_exit"):
        assert getattr(fastfork, name) is not getattr(_os, name)
        assert getattr(fastfork, name).__module__ == "fastfork._core"


def test_unbuilt_source_tree_says_how_to_build(tmp_path):
    package_dir = os.path.dirname(fastfork.__file__)
    copy = tmp_path / "fastfork"
    shutil.copytree(package_dir, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import fastfork"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode != 0
    assert "not built" in proc.stderr and "pip install ." in proc.stderr


def test_no_fork_platform_import_error():
    proc = procutil.run_python("import os; del os.fork; import fastfork")
    assert proc.returncode != 0
    assert "fork()" in proc.stderr and "multiprocessing" in proc.stderr


def test_python_m_fastfork_help():
    env = {**os.environ, "PYTHONPATH": procutil.PACKAGE_ROOT}
    proc = subprocess.run([sys.executable, "-m", "fastfork", "--help"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "run" in proc.stdout


def test_stubs_and_marker_ship_with_the_package():
    package_dir = os.path.dirname(fastfork.__file__)
    assert os.path.exists(os.path.join(package_dir, "py.typed"))
    assert glob.glob(os.path.join(package_dir, "_core.pyi"))


def test_sdist_manifest_takes_every_source_file_the_build_needs():
    # setup.py compiles src/_core.pyx, which includes the .pxi files and links
    # the .c files: an sdist without one of them cannot be built.
    import fnmatch
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    manifest = os.path.join(repo, "MANIFEST.in")
    if not os.path.exists(manifest):
        pytest.skip("needs the source checkout (the tests run from a copy)")
    with open(manifest) as f:
        rules = [line.split() for line in f if line.strip()]
    patterns = [p for rule in rules if rule[:2] == ["recursive-include", "src"] for p in rule[2:]]
    excluded = [rule[1] for rule in rules if rule[0] == "exclude"]
    needed = [os.path.relpath(path, repo)
              for path in glob.glob(os.path.join(repo, "src", "*"))
              if not path.endswith((".so", ".html")) and "_core.c" not in path]
    assert needed, "no source files found"
    for path in needed:
        assert path not in excluded, path
        assert any(fnmatch.fnmatch(os.path.basename(path), p) for p in patterns), path
