"""The send stream: a header, then typed records, each with a length and a CRC32C.

``spec/stream.md`` describes the format for an independent implementation,
and ``tests/test_spec.py`` checks its tables against the construct
definitions below, as it does for ``spec/format.md`` and
:mod:`cowtree.ondisk`.  :class:`StreamWriter` frames records;
:class:`StreamReader` checks the framing (lengths, checksums, sequence
numbers, known types, the END record) and returns each record's payload.
What the records mean is :mod:`cowtree.send` and :mod:`cowtree.receive`.

All integers are little-endian.
"""

from __future__ import annotations

import dataclasses
import struct

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64sl, Int64ul, Padding, Struct

from .checksum import crc32c
from .errors import StreamError
from .ondisk import codec

STREAM_MAGIC = b"CoWtSnd\x00"
STREAM_VERSION = 1

# Stream header flags.
STREAM_INCREMENTAL = 1 << 0      # the stream carries only the changes since the parent snapshot
STREAM_FLAGS_KNOWN = STREAM_INCREMENTAL

# Most file data one WRITE record carries.  The receiver keeps a whole
# record in memory to check its checksum before applying it, so this bounds
# its memory, and 1 MiB keeps the per-record cost small next to the data.
MAX_WRITE_DATA = 1 << 20
# Largest payload a reader accepts: a WRITE record's, rounded up to 4 KiB.
# A length field past it is damage, and is rejected before any allocation.
MAX_PAYLOAD = MAX_WRITE_DATA + 4096

# Record types, in the order of the phases they belong to (spec/stream.md).
RECORD_UNLINK = 1
RECORD_DELETE = 2
RECORD_CREATE = 3
RECORD_LINK = 4
RECORD_XATTR_SET = 5
RECORD_XATTR_REMOVE = 6
RECORD_WRITE = 7
RECORD_HOLE = 8
RECORD_SYMLINK = 9
RECORD_ATTR = 10
RECORD_END = 11

RECORD_NAMES = {
    RECORD_UNLINK: "UNLINK", RECORD_DELETE: "DELETE", RECORD_CREATE: "CREATE", RECORD_LINK: "LINK",
    RECORD_XATTR_SET: "XATTR_SET", RECORD_XATTR_REMOVE: "XATTR_REMOVE", RECORD_WRITE: "WRITE",
    RECORD_HOLE: "HOLE", RECORD_SYMLINK: "SYMLINK", RECORD_ATTR: "ATTR", RECORD_END: "END",
}

# ---------------------------------------------------------------------------
# Header
#
# The first bytes of every stream.  Magic and version stay the first two
# fields in every version.  The fixed part is followed by ``name_len`` bytes
# of snapshot name and then a u32 CRC32C of everything before it (the fixed
# part and the name).  ``snapshot_uuid`` and ``snapshot_gen`` name the sent
# content (cowtree.subvolume.Subvolume.stream_identity); ``parent_uuid`` and
# ``parent_gen`` the parent snapshot's, all zeros in a full stream.
# ``next_ino`` is the snapshot's next inode number: every inode the stream
# creates is below it.
#
#   flags: bit 0 INCREMENTAL; others 0, and a reader rejects them.
STREAM_HEADER = Struct(
    "magic" / Bytes(8),
    "version" / Int32ul,
    "flags" / Int32ul,
    "snapshot_uuid" / Bytes(16),
    "snapshot_gen" / Int64ul,
    "parent_uuid" / Bytes(16),
    "parent_gen" / Int64ul,
    "next_ino" / Int64ul,
    "name_len" / Int16ul,
    "reserved" / Padding(6),
)

# Every record starts with this header.  ``length`` counts the payload that
# follows, at most MAX_PAYLOAD.  ``seq`` is 1 for the first record after the
# stream header and one more for each next record.  ``csum`` is the CRC32C of
# the header's first 16 bytes followed by the payload.  ``flags`` is 0.
RECORD_HEADER = Struct(
    "length" / Int32ul,
    "type" / Int16ul,
    "flags" / Int16ul,
    "seq" / Int64ul,
    "csum" / Int32ul,
)

# ---------------------------------------------------------------------------
# Payloads.  Each starts with a fixed part; some continue with bytes whose
# length the fixed part or the record length gives.

# UNLINK and LINK: the directory entry (dir, index) -> ino, as a DIR_INDEX
# item stores it, followed by ``name_len`` name bytes.  ``type`` is the
# entry's DT_* type.
ENTRY_RECORD = Struct(
    "dir" / Int64ul,
    "index" / Int64ul,
    "ino" / Int64ul,
    "type" / Int8ul,
    "name_len" / Int16ul,
)

# DELETE: the inode to delete.  SYMLINK: the symlink, followed by its
# target, which fills the rest of the payload.
INODE_RECORD = Struct(
    "ino" / Int64ul,
)

# CREATE: a new inode without names or content.
CREATE_RECORD = Struct(
    "ino" / Int64ul,
    "mode" / Int32ul,
    "rdev" / Int64ul,
)

# XATTR_SET and XATTR_REMOVE: the name, then (XATTR_SET only) the value.
XATTR_RECORD = Struct(
    "ino" / Int64ul,
    "name_len" / Int16ul,
    "value_len" / Int32ul,
)

# WRITE: file data at ``offset``; the data fills the rest of the payload.
WRITE_RECORD = Struct(
    "ino" / Int64ul,
    "offset" / Int64ul,
)

# HOLE: the byte range [offset, offset + length) of the file reads as zeros.
HOLE_RECORD = Struct(
    "ino" / Int64ul,
    "offset" / Int64ul,
    "length" / Int64ul,
)

# ATTR: the inode's final attributes, as its INODE_ITEM stores them.  ``nlink``
# and, for a directory, ``size`` are what the receiver must have counted.
ATTR_RECORD = Struct(
    "ino" / Int64ul,
    "size" / Int64ul,
    "nlink" / Int32ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "mode" / Int32ul,
    "rdev" / Int64ul,
    "flags" / Int64ul,
    "seq" / Int64ul,
    "atime_ns" / Int64sl,
    "mtime_ns" / Int64sl,
    "ctime_ns" / Int64sl,
    "otime_ns" / Int64sl,
)

# END: how many records came before it, how many stream bytes (the stream
# header included), and the sent snapshot's UUID again.
END_RECORD = Struct(
    "records" / Int64ul,
    "bytes" / Int64ul,
    "snapshot_uuid" / Bytes(16),
)

HEADER_CODEC = codec(STREAM_HEADER)
RECORD_HEADER_CODEC = codec(RECORD_HEADER)
ENTRY_CODEC = codec(ENTRY_RECORD)
INODE_CODEC = codec(INODE_RECORD)
CREATE_CODEC = codec(CREATE_RECORD)
XATTR_CODEC = codec(XATTR_RECORD)
WRITE_CODEC = codec(WRITE_RECORD)
HOLE_CODEC = codec(HOLE_RECORD)
ATTR_CODEC = codec(ATTR_RECORD)
END_CODEC = codec(END_RECORD)
CSUM = struct.Struct("<I")
# The part of a record header that its checksum covers: all but ``csum``.
RECORD_CSUM_SPAN = RECORD_HEADER_CODEC.size - CSUM.size


@dataclasses.dataclass
class StreamHeader:
    """The decoded stream header."""

    flags: int
    snapshot_uuid: bytes
    snapshot_gen: int
    parent_uuid: bytes
    parent_gen: int
    next_ino: int
    name: bytes

    @property
    def incremental(self) -> bool:
        return bool(self.flags & STREAM_INCREMENTAL)

    def encode(self) -> bytes:
        fixed = HEADER_CODEC.pack(STREAM_MAGIC, STREAM_VERSION, self.flags, self.snapshot_uuid, self.snapshot_gen,
                                  self.parent_uuid, self.parent_gen, self.next_ino, len(self.name))
        body = fixed + self.name
        return body + CSUM.pack(crc32c(body))


class StreamWriter:
    """Frames records onto a binary file object; counts records and bytes."""

    def __init__(self, out):
        self.out = out
        self.records = 0
        self.bytes = 0

    def header(self, header: StreamHeader) -> None:
        self._write(header.encode())

    def record(self, record_type: int, fixed: bytes, tail=b"") -> None:
        """Write one record whose payload is fixed followed by tail (bytes or a memoryview)."""
        length = len(fixed) + len(tail)
        if length > MAX_PAYLOAD:
            raise ValueError(f"{RECORD_NAMES[record_type]} record of {length} bytes is longer than {MAX_PAYLOAD}")
        self.records += 1
        head = RECORD_HEADER_CODEC.pack(length, record_type, 0, self.records, 0)[:RECORD_CSUM_SPAN]
        csum = crc32c(tail, crc32c(fixed, crc32c(head)))
        self._write(head + CSUM.pack(csum) + fixed)
        if len(tail):
            self._write(tail)

    def end(self, snapshot_uuid: bytes) -> None:
        """Write the END record, which counts the records and bytes before it."""
        self.record(RECORD_END, END_CODEC.pack(self.records, self.bytes, snapshot_uuid))

    def _write(self, data) -> None:
        self.out.write(data)
        self.bytes += len(data)


@dataclasses.dataclass
class Record:
    """One checked record: its sequence number, type and payload."""

    seq: int
    type: int
    payload: bytes

    @property
    def name(self) -> str:
        return RECORD_NAMES[self.type]

    def fixed(self, codec_struct: struct.Struct) -> tuple:
        """Return the fields of the payload's fixed part; raise StreamError when the payload is too short."""
        if len(self.payload) < codec_struct.size:
            raise StreamError(f"invalid stream: record {self.seq} ({self.name}) is {len(self.payload)} bytes, "
                              f"shorter than its fixed part of {codec_struct.size}")
        return codec_struct.unpack_from(self.payload)

    def exact(self, codec_struct: struct.Struct, extra: int = 0) -> tuple:
        """Return the fields of a payload that must be the fixed part plus extra bytes exactly."""
        if len(self.payload) != codec_struct.size + extra:
            raise StreamError(f"invalid stream: record {self.seq} ({self.name}) is {len(self.payload)} bytes, "
                              f"expected {codec_struct.size + extra}")
        return codec_struct.unpack_from(self.payload)


class StreamReader:
    """Reads and checks a stream from a binary file object, one record at a time."""

    def __init__(self, infile):
        self.infile = infile
        self.bytes = 0
        self.records = 0
        self.ended = False

    def _read(self, size: int, part: str) -> bytes:
        """Read exactly size bytes; at the end of input raise StreamError naming the part being read."""
        parts = []
        left = size
        while left:
            chunk = self.infile.read(left)
            if not chunk:
                got = size - left
                raise StreamError(f"truncated stream: it ends inside {part} after {got} of {size} bytes")
            parts.append(chunk)
            left -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.bytes += size
        return data

    def header(self) -> StreamHeader:
        """Read and check the stream header."""
        first = self.infile.read(len(STREAM_MAGIC))
        if not first:
            raise StreamError("empty input: no send stream")
        self.bytes += len(first)
        if len(first) < len(STREAM_MAGIC) or first != STREAM_MAGIC:
            raise StreamError(f"not a cowtree send stream (magic {first[:8]!r}, expected {STREAM_MAGIC!r})")
        rest = self._read(HEADER_CODEC.size - len(STREAM_MAGIC), "the stream header")
        fixed = first + rest
        (_, version, flags, snapshot_uuid, snapshot_gen, parent_uuid, parent_gen, next_ino,
         name_len) = HEADER_CODEC.unpack(fixed)
        if version != STREAM_VERSION:
            raise StreamError(f"send stream version {version} is not supported (this cowtree reads version "
                              f"{STREAM_VERSION})")
        name = self._read(name_len, "the stream header")
        stored = CSUM.unpack(self._read(CSUM.size, "the stream header"))[0]
        computed = crc32c(name, crc32c(fixed))
        if stored != computed:
            raise StreamError(f"invalid stream: header checksum mismatch (found {stored:#010x}, "
                              f"expected {computed:#010x})")
        if flags & ~STREAM_FLAGS_KNOWN:
            raise StreamError(f"send stream uses unknown flags {flags & ~STREAM_FLAGS_KNOWN:#x}; a newer cowtree "
                              f"wrote it")
        return StreamHeader(flags, snapshot_uuid, snapshot_gen, parent_uuid, parent_gen, next_ino, name)

    def next(self) -> Record:
        """Read and check the next record; the END record's counts are checked too."""
        if self.ended:
            raise StreamError("invalid stream: a record after the END record")
        expected = self.records + 1
        start = self.bytes

        # The header, then the payload its length names.
        head = self.infile.read(RECORD_HEADER_CODEC.size)
        if not head:
            raise StreamError(f"truncated stream: it ends after record {self.records}, before its END record")
        self.bytes += len(head)
        if len(head) < RECORD_HEADER_CODEC.size:
            head += self._read(RECORD_HEADER_CODEC.size - len(head), f"the header of record {expected}")
        length, record_type, flags, seq, stored = RECORD_HEADER_CODEC.unpack(head)
        if length > MAX_PAYLOAD:
            raise StreamError(f"invalid stream: record {expected} claims {length} bytes of payload, more than "
                              f"the limit of {MAX_PAYLOAD}")
        label = f"record {expected} ({RECORD_NAMES.get(record_type, f'type {record_type}')})"
        payload = self._read(length, label)

        # Checks of what was read, the checksum first.
        computed = crc32c(payload, crc32c(head[:RECORD_CSUM_SPAN]))
        if stored != computed:
            raise StreamError(f"invalid stream: {label}: checksum mismatch (found {stored:#010x}, expected "
                              f"{computed:#010x})")
        if seq != expected:
            raise StreamError(f"invalid stream: record {seq} arrived where record {expected} was expected "
                              f"(records out of order)")
        if record_type not in RECORD_NAMES:
            raise StreamError(f"invalid stream: record {seq} has unknown type {record_type} (this cowtree knows "
                              f"types 1 to {max(RECORD_NAMES)}); a newer cowtree may have written it")
        if flags:
            raise StreamError(f"invalid stream: {label} has flags {flags:#x}, expected 0")

        record = Record(seq, record_type, payload)
        self.records = seq
        if record_type == RECORD_END:
            self._check_end(record, start)
        return record

    def _check_end(self, record: Record, start: int) -> None:
        count, total, _uuid = record.exact(END_CODEC)
        if count != record.seq - 1 or total != start:
            raise StreamError(f"invalid stream: the END record counts {count} records and {total} bytes, "
                              f"the stream had {record.seq - 1} records and {start} bytes")
        self.ended = True
        if self.infile.read(1):
            raise StreamError("invalid stream: data after the END record")
