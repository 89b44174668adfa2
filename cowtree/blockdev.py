"""Image file I/O: positioned reads and writes, flush barriers, locking and
the superblock copies.

Caveats first:

- ``flush`` is ``os.fdatasync``.  It orders every earlier write before every
  later one; a commit relies on nothing else.
- The lock is ``fcntl.flock`` on the image file: exclusive for a writer,
  shared for readers.  It protects against other cowtree processes only.
- :class:`RecordingDevice` logs every write and flush so that crash tests can
  replay any prefix of a workload's write stream.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os

from . import ondisk
from .checksum import crc32c
from .errors import CorruptionError, ImageInUseError, NoSpaceError, NotAnImageError, UnsupportedFeatureError

log = logging.getLogger(__name__)


class ImageFile:
    """One image file opened for reading, or for reading and writing."""

    def __init__(self, path: str, writable: bool, lock: bool = True):
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
        except IsADirectoryError:
            raise NotAnImageError(f"{path}: is a directory, not an image") from None
        if lock:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise ImageInUseError(f"{path}: image is in use by another process") from None

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data

    def pwrite(self, offset: int, data) -> None:
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise NoSpaceError(f"No space left on device (writing {self.path})") from exc
            raise
        if written != len(data):
            raise NoSpaceError(f"No space left on device (short write to {self.path})")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RecordingDevice:
    """A device wrapper that logs writes and flushes for crash replay.

    ``log`` contains ("write", offset, bytes) and ("flush",) tuples in order.
    """

    def __init__(self, inner):
        self.inner = inner
        self.log: list[tuple] = []
        self.path = inner.path
        self.writable = inner.writable

    def pread(self, offset, length):
        return self.inner.pread(offset, length)

    def pwrite(self, offset, data):
        self.log.append(("write", offset, bytes(data)))
        self.inner.pwrite(offset, data)

    def flush(self):
        self.log.append(("flush",))
        self.inner.flush()

    def truncate(self, size):
        self.log.append(("truncate", size))
        self.inner.truncate(size)

    def size(self):
        return self.inner.size()

    def stat(self):
        return self.inner.stat()

    def close(self):
        self.inner.close()


# ---------------------------------------------------------------------------
# Superblock


@dataclasses.dataclass
class Superblock:
    """The decoded fields of one superblock copy."""

    uuid: bytes
    generation: int
    nodesize: int
    blocksize: int = ondisk.BLOCK_SIZE
    compat_flags: int = 0
    ro_compat_flags: int = 0
    incompat_flags: int = 0
    size_limit: int = 0
    image_bytes: int = ondisk.FIRST_ALLOC
    bytes_used: int = 0
    root_tree_addr: int = 0
    root_tree_gen: int = 0
    extent_tree_addr: int = 0
    extent_tree_gen: int = 0
    root_tree_level: int = 0
    extent_tree_level: int = 0
    created_ns: int = 0
    label: bytes = b""
    version: int = ondisk.VERSION
    copy_index: int = -1      # which copy it was read from; not stored

    def encode(self) -> bytes:
        c = ondisk.SUPERBLOCK_CODEC
        raw = c.pack(
            ondisk.MAGIC, self.version, 0, self.uuid, self.generation, self.nodesize,
            self.blocksize, self.compat_flags, self.ro_compat_flags, self.incompat_flags,
            self.size_limit, self.image_bytes, self.bytes_used, self.root_tree_addr,
            self.root_tree_gen, self.extent_tree_addr, self.extent_tree_gen,
            self.root_tree_level, self.extent_tree_level, self.created_ns,
            self.label.ljust(64, b"\0")[:64],
        )
        block = bytearray(raw.ljust(ondisk.BLOCK_SIZE, b"\0"))
        csum = superblock_csum(block)
        block[12:16] = csum.to_bytes(4, "little")
        return bytes(block)

    @classmethod
    def decode(cls, block: bytes, copy_index: int) -> "Superblock":
        """Decode one copy; raise CorruptionError or NotAnImageError when it is invalid."""
        where = f"copy {copy_index} at offset {ondisk.SUPERBLOCK_OFFSETS[copy_index]}"
        if len(block) < ondisk.BLOCK_SIZE:
            if len(block) >= len(ondisk.MAGIC) and block.startswith(ondisk.MAGIC):
                raise NotAnImageError(f"superblock {where}: image is truncated: the file ends {len(block)} bytes "
                                      f"into this {ondisk.BLOCK_SIZE}-byte copy")
            raise NotAnImageError(f"superblock {where}: file too short")
        if block[:8] != ondisk.MAGIC:
            raise NotAnImageError(f"superblock {where}: bad magic {block[:8]!r}")
        fields = ondisk.SUPERBLOCK_CODEC.unpack_from(block)
        stored = fields[2]
        computed = superblock_csum(block)
        if stored != computed:
            raise CorruptionError("superblock", where, "checksum mismatch", f"{stored:#010x}", f"{computed:#010x}")
        (_, version, _, uuid, generation, nodesize, blocksize, compat, ro_compat, incompat,
         size_limit, image_bytes, bytes_used, rt_addr, rt_gen, et_addr, et_gen, rt_level,
         et_level, created_ns, label) = fields
        if version != ondisk.VERSION:
            raise UnsupportedFeatureError(f"superblock {where}: unsupported format version {version} (this cowtree reads version {ondisk.VERSION})")
        if blocksize != ondisk.BLOCK_SIZE:
            raise CorruptionError("superblock", where, "invalid block size", blocksize, ondisk.BLOCK_SIZE)
        if nodesize < ondisk.MIN_NODE_SIZE or nodesize > ondisk.MAX_NODE_SIZE or nodesize & (nodesize - 1):
            raise CorruptionError("superblock", where, "invalid node size", nodesize, "a power of two from 4096 to 65536")
        return cls(uuid=uuid, generation=generation, nodesize=nodesize, blocksize=blocksize,
                   compat_flags=compat, ro_compat_flags=ro_compat, incompat_flags=incompat,
                   size_limit=size_limit, image_bytes=image_bytes, bytes_used=bytes_used,
                   root_tree_addr=rt_addr, root_tree_gen=rt_gen, extent_tree_addr=et_addr,
                   extent_tree_gen=et_gen, root_tree_level=rt_level, extent_tree_level=et_level,
                   created_ns=created_ns, label=label.rstrip(b"\0"), version=version,
                   copy_index=copy_index)


def superblock_csum(block) -> int:
    """Return the CRC32C of a superblock block without its checksum field."""
    view = memoryview(block)
    return crc32c(view[ondisk.SUPERBLOCK_CSUM_OFFSET + 4:ondisk.BLOCK_SIZE], crc32c(view[:ondisk.SUPERBLOCK_CSUM_OFFSET]))


@dataclasses.dataclass
class SuperblockScan:
    """The result of reading every superblock copy: the chosen one, and each copy or its error."""

    chosen: Superblock
    copies: list  # per copy: a Superblock or the exception it raised


def read_superblocks(dev) -> SuperblockScan:
    """Read every superblock copy and pick the valid one with the highest generation.

    Raise NotAnImageError when no copy is valid, naming what each copy failed.
    """
    copies = []
    for index, offset in enumerate(ondisk.SUPERBLOCK_OFFSETS):
        block = dev.pread(offset, ondisk.BLOCK_SIZE)
        try:
            copies.append(Superblock.decode(block, index))
        except UnsupportedFeatureError:
            raise
        except (CorruptionError, NotAnImageError) as exc:
            copies.append(exc)
    valid = [c for c in copies if isinstance(c, Superblock)]
    if not valid:
        reasons = "; ".join(str(c) for c in copies)
        raise NotAnImageError(f"{dev.path}: not a cowtree image (no valid superblock: {reasons})")
    chosen = max(valid, key=lambda s: s.generation)
    for index, copy in enumerate(copies):
        if isinstance(copy, Exception) and index != chosen.copy_index:
            log.warning("%s: superblock copy %d is invalid (%s); using copy %d, generation %d",
                        dev.path, index, copy, chosen.copy_index, chosen.generation)
    return SuperblockScan(chosen=chosen, copies=copies)


def write_superblock(dev, sb: Superblock) -> None:
    """Write sb into the copy its generation selects; the caller flushes."""
    index = sb.generation % len(ondisk.SUPERBLOCK_OFFSETS)
    dev.pwrite(ondisk.SUPERBLOCK_OFFSETS[index], sb.encode())
    log.debug("wrote superblock copy %d, generation %d", index, sb.generation)
