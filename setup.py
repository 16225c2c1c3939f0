"""The compiled part of the package: pool.guest._core, the page allocator's hot paths in C.

Everything else about the build is in pyproject.toml; setuptools reads both. The extension
needs only a C compiler and the Python headers (no third-party build dependency), so an
sdist builds on a fresh machine with gcc and python3-dev.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pool.guest._core",
            sources=["pool/guest/_core.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
