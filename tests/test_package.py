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


def test_dir_lists_every_export_and_unknown_names_raise_attribute_error():
    assert set(fastfork.__all__) <= set(dir(fastfork))
    with pytest.raises(AttributeError, match="no_such_name"):
        fastfork.no_such_name
    assert fastfork.__version__ == __import__("fastfork._version").__version__


def loaded_by(code):
    """Run ``code`` in a fresh interpreter; return the modules it added to sys.modules."""
    proc = procutil.run_python(
        "import sys\nbefore = set(sys.modules)\n" + code
        + "\nprint(' '.join(sorted(set(sys.modules) - before)))")
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


# Modules that only some capabilities need: importing fastfork must not load them.
NOT_ON_IMPORT = {"pickle", "socket", "subprocess", "dataclasses", "inspect", "typing",
                 "threading", "multiprocessing", "fastfork._core", "fastfork.commands",
                 "fastfork.server", "fastfork.fanout", "fastfork.shared", "fastfork.benchmark",
                 "fastfork._workloads", "fastfork.runner", "fastfork.cli"}


def test_import_fastfork_loads_only_the_package_itself():
    loaded = loaded_by("import fastfork")
    assert loaded == {"fastfork", "fastfork._version"}, loaded - NOT_ON_IMPORT


def test_a_capability_loads_what_it_needs_on_first_use():
    loaded = loaded_by("import fastfork\nfastfork.fork")
    assert "fastfork._core" in loaded
    assert not loaded & {"socket", "fastfork.server", "fastfork.commands", "fastfork.benchmark"}
    loaded = loaded_by("from fastfork import ForkServer")
    assert {"fastfork.server", "socket"} <= loaded


def test_fastfork_run_does_not_load_the_benchmark():
    loaded = loaded_by("from fastfork import cli\n"
                       "cli.main(['run', '-n', '1', '--', 'true'])")
    assert "fastfork.runner" in loaded
    assert not loaded & {"fastfork.benchmark", "fastfork._workloads", "multiprocessing"}


def test_first_use_at_interpreter_shutdown_is_a_runtime_error():
    proc = procutil.run_python(
        "import fastfork, os\n"
        "class AtShutdown:\n"
        "    def __del__(self, write=os.write):\n"
        "        try:\n"
        "            fastfork.ForkServer\n"
        "        except RuntimeError as exc:\n"
        "            write(1, str(exc).encode())\n"
        "keeper = AtShutdown()  # collected while the interpreter finalizes\n")
    assert proc.returncode == 0, proc.stderr
    assert "fastfork.ForkServer was first used while the interpreter shuts down" in proc.stdout


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
