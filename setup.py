"""Build the one extension module, vringipc._ring, from cython_src/.

VRINGIPC_DEBUG=1 builds with bounds checks, line tracing and annotation;
VRINGIPC_ASAN=1 adds AddressSanitizer (for fuzzing).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("VRINGIPC_DEBUG") == "1"
asan = os.environ.get("VRINGIPC_ASAN") == "1"

cflags = ["-O3", "-std=gnu11", "-Wno-unused-function"]
ldflags = []
macros = []
directives = {"language_level": 3, "embedsignature": True}
if debug:
    cflags = ["-O0", "-g", "-std=gnu11"]
    directives.update(boundscheck=True, wraparound=True, linetrace=True)
    macros += [("CYTHON_TRACE_NOGIL", "1")]
if asan:
    cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    ldflags += ["-fsanitize=address"]

ext = Extension(
    "vringipc._ring",
    ["cython_src/_ring.pyx"],
    include_dirs=["cython_src"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    define_macros=macros,
)

setup(
    ext_modules=cythonize(
        [ext], include_path=["cython_src"], compiler_directives=directives, annotate=debug
    )
)
