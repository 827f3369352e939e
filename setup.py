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
)

setup(
    ext_modules=cythonize(
        [core],
        language_level=3,
        compiler_directives={"embedsignature": True, "binding": True},
    ),
)
