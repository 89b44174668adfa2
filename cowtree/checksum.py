"""CRC32C (Castagnoli) for nodes, superblocks and data blocks.

Two implementations compute the same function.  crcmod's C extension is the
reference named by the design and is cross-checked in the tests.  The
``crc32c`` package uses the CPU's CRC instructions and is about 30 times
faster per 4 KiB block on the test machine (tools/bench_import.py measures
both), so it is used on every hot path when it is installed.
"""

from __future__ import annotations

import warnings

import importlib

import crcmod

# The package re-exports names, so the submodule is fetched by name to read its flag.
_crcmod_impl = importlib.import_module("crcmod.crcmod")

if not getattr(_crcmod_impl, "_usingExtension", False):
    warnings.warn(
        "crcmod is running without its C extension; checksums will be slow. "
        "Reinstall crcmod with a C compiler and the Python headers present.",
        RuntimeWarning,
        stacklevel=2,
    )

# Initial value 0xffffffff, reflected, final XOR 0xffffffff: the usual CRC32C.
crcmod_crc32c = crcmod.mkCrcFun(0x11EDC6F41, initCrc=0, rev=True, xorOut=0xFFFFFFFF)

try:
    from crc32c import crc32c as _fast_crc32c
except ImportError:  # pragma: no cover - exercised only without the package
    _fast_crc32c = None

IMPLEMENTATION = "crc32c" if _fast_crc32c is not None else "crcmod"


if _fast_crc32c is not None:
    def crc32c(data, value: int = 0) -> int:
        """Return the CRC32C of data, continuing from value."""
        return _fast_crc32c(data, value)
else:  # pragma: no cover
    def crc32c(data, value: int = 0) -> int:
        """Return the CRC32C of data, continuing from value."""
        return crcmod_crc32c(bytes(data), value) if value else crcmod_crc32c(bytes(data))
