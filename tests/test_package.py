"""The package surface: exports, the import errors, the console entry points."""
import fnmatch
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import fastfork
import procutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ---------------------------------------------------------------- what is shipped

# Top-level files and folders the sdist must carry whole: what builds the
# extension and what tests it (tests/ runs the README's tour and the examples).
SHIPPED_FILES = ("LICENSE", "README.md", "pyproject.toml", "setup.py")
SHIPPED_DIRS = ("fastfork", "src", "tests", "bench", "examples")
# What a checkout holds in those folders that is made, not written.
BUILD_PRODUCTS = ("*.so", "*.o", "*.pyc", "*.html", "src/_core.c")
# Build outputs and caches in a checkout, left out of the copy the sdist is built from.
CHECKOUT_LEFTOVERS = (".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                      ".benchmarks", ".pytest_cache", "*.so", "*.o", "_core.c", "_core.html")
# What setuptools adds to every sdist.
SDIST_METADATA = ("PKG-INFO", "setup.cfg", "MANIFEST.in", "fastfork.egg-info/*")


def _source_files():
    """The checkout's files that belong in the sdist, relative to the checkout."""
    found = set(SHIPPED_FILES)
    for top in SHIPPED_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            for name in filenames:
                path = os.path.relpath(os.path.join(dirpath, name), REPO)
                if not any(fnmatch.fnmatch(path, p) for p in BUILD_PRODUCTS):
                    found.add(path)
    return found


@pytest.fixture(scope="session")
def distributions(tmp_path_factory):
    """The sdist, and the wheel built from it (not from the tree), once per session.

    Returns (sdist member names relative to its top folder, wheel path).
    """
    if not all(os.path.exists(os.path.join(REPO, name)) for name in ("setup.py", "src")):
        pytest.skip("needs the source checkout (the tests run from a copy)")
    if importlib.util.find_spec("build") is None:
        pytest.skip("building the sdist and wheel needs the 'build' package "
                    "(pip install build, or the 'test' extra)")
    # From a copy without build leftovers: setuptools adds to an sdist every file
    # listed in a stale fastfork.egg-info, whatever MANIFEST.in says now.
    tree = tmp_path_factory.mktemp("checkout") / "fastfork"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*CHECKOUT_LEFTOVERS))
    out = tmp_path_factory.mktemp("dist")
    # Without --sdist/--wheel, build makes the sdist, unpacks it and builds the wheel from it.
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    with tarfile.open(sdist) as tar:
        members = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    return members, wheel


@pytest.mark.timeout(900)
def test_sdist_holds_what_builds_and_tests_the_package_and_nothing_else(distributions):
    members, _ = distributions
    missing = _source_files() - set(members)
    assert not missing, f"the sdist lacks {sorted(missing)} (see MANIFEST.in)"
    extra = [name for name in members if name not in _source_files()
             and not any(fnmatch.fnmatch(name, p) for p in SDIST_METADATA)]
    assert not extra, f"the sdist carries {extra}"


@pytest.mark.timeout(900)
def test_wheel_holds_the_package_stubs_and_licence_but_no_sources(distributions):
    _, wheel = distributions
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(info).decode()
    package = {n for n in names if n.startswith("fastfork/")}
    modules = {f"fastfork/{name}" for name in os.listdir(os.path.join(REPO, "fastfork"))
               if name.endswith(".py")}
    assert modules <= package, sorted(modules - package)
    assert {"fastfork/py.typed", "fastfork/_core.pyi"} <= package
    assert len(fnmatch.filter(package, "fastfork/_core.*.so")) == 1, sorted(package)
    assert not [n for n in names if n.endswith((".pyx", ".pxi", ".pxd", ".c", ".h"))]
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/", "src/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: MIT" in metadata.splitlines()
    version = {}
    with open(os.path.join(REPO, "fastfork", "_version.py")) as f:
        exec(f.read(), version)
    assert f"Version: {version['__version__']}" in metadata.splitlines()


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_wheel_extension_carries_no_symbol_table_or_debug_information(distributions, tmp_path):
    _, wheel = distributions
    with zipfile.ZipFile(wheel) as whl:
        (extension,) = fnmatch.filter(whl.namelist(), "fastfork/_core.*.so")
        path = whl.extract(extension, tmp_path)
    sections = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True,
                              check=True).stdout
    assert ".symtab" not in sections and ".debug_" not in sections, sections
