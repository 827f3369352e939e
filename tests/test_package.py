"""The package surface: exports, the import errors, the console entry points."""
import glob
import os
import shutil
import subprocess
import sys

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
