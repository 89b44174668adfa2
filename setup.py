"""Build the optional cowtree._fuse_ops extension; everything else is in pyproject.toml.

The extension adds lseek (SEEK_DATA, SEEK_HOLE) and fallocate to FUSE
mounts.  It needs a C compiler and the libfuse 3 headers (Debian:
libfuse3-dev).  Without them the build skips it with a warning, and
mounts keep the kernel's generic behaviour for those two calls.
"""

import shlex
import subprocess

from setuptools import Extension, setup


def fuse3_flags() -> tuple[list[str], list[str]]:
    """Return (compile flags, link flags) for libfuse 3 from pkg-config, or the usual Debian paths."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True, check=True)
        libs = subprocess.run(["pkg-config", "--libs", "fuse3"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/fuse3"], ["-lfuse3"]
    return shlex.split(cflags.stdout), shlex.split(libs.stdout)


compile_flags, link_flags = fuse3_flags()

setup(
    ext_modules=[
        Extension(
            "cowtree._fuse_ops",
            sources=["cowtree/_fuse_ops.c"],
            extra_compile_args=compile_flags + ["-Wall"],
            extra_link_args=link_flags + ["-ldl"],
            optional=True,
        ),
    ],
)
