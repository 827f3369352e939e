"""Build fastfork's compiled core (src/ -> fastfork._core).

All metadata lives in pyproject.toml; this file only describes the extension.
"""
import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "fastfork._core",
    # Hand-written C helpers sit beside the .pyx; src/_core.c is Cython's output.
    sources=["src/_core.pyx"]
    + sorted(p for p in glob.glob("src/*.c") if not p.endswith("_core.c")),
    include_dirs=["src"],
    define_macros=[("_GNU_SOURCE", "1")],
    # No debug information and no symbol table: they made up most of the 1.6 MB
    # extension, and every install (pip install ., a wheel) would carry them.
    extra_compile_args=["-g0"],
    extra_link_args=["-s"],
)

setup(
    ext_modules=cythonize(
        [core],
        language_level=3,
        compiler_directives={
            "embedsignature": True,
            "binding": True,
            # Not yet: module state (the owned-fd set, the dropped-children list) is
            # checked and changed in steps the GIL makes atomic; see docs/free-threading.md.
            # A free-threaded Python turns the GIL back on when it imports the core.
            "freethreading_compatible": False,
        },
    ),
)
