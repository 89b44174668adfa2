"""Helpers for send and receive tests: run both in memory, cut streams apart, compare subvolumes."""

from __future__ import annotations

import io
import stat
import struct

from cowtree import ondisk, receive, send
from cowtree.check import check_volume
from cowtree.checksum import crc32c
from cowtree.stream import HEADER_CODEC, RECORD_CSUM_SPAN, RECORD_HEADER_CODEC
from cowtree.subvolume import list_subvolumes, open_filesystem

BLOCK = ondisk.BLOCK_SIZE
CHUNK = 1 << 20


def send_bytes(volume, name: bytes, parent: bytes | None = None) -> bytes:
    out = io.BytesIO()
    send.send(volume, name, out, parent=parent)
    return out.getvalue()


def receive_bytes(volume, data: bytes):
    return receive.receive(volume, io.BytesIO(data))


def split_stream(data: bytes) -> tuple[bytes, list[bytes]]:
    """Return (header with its name and checksum, [each record's bytes]) of a stream."""
    name_len = HEADER_CODEC.unpack_from(data)[-1]
    header_end = HEADER_CODEC.size + name_len + 4
    records = []
    position = header_end
    while position < len(data):
        length = RECORD_HEADER_CODEC.unpack_from(data, position)[0]
        end = position + RECORD_HEADER_CODEC.size + length
        records.append(data[position:end])
        position = end
    return data[:header_end], records


def reframe(record: bytes, seq: int | None = None, record_type: int | None = None) -> bytes:
    """Return record with a new sequence number or type and a checksum that fits them."""
    length, old_type, flags, old_seq, _ = RECORD_HEADER_CODEC.unpack_from(record)
    payload = record[RECORD_HEADER_CODEC.size:]
    head = RECORD_HEADER_CODEC.pack(length, old_type if record_type is None else record_type, flags,
                                    old_seq if seq is None else seq, 0)[:RECORD_CSUM_SPAN]
    return head + struct.pack("<I", crc32c(payload, crc32c(head))) + payload


def record_type(record: bytes) -> int:
    return RECORD_HEADER_CODEC.unpack_from(record)[1]


def image_state(volume) -> tuple:
    """Return what a failed receive must leave unchanged: generation, subvolumes, file size."""
    subvolumes = [(sub.tree_id, sub.name, sub.item.root_addr) for sub in list_subvolumes(volume, True)]
    return volume.generation, subvolumes, volume.dev.size()


def count_node_reads(volume, call) -> int:
    """Return the distinct nodes that call() reads from the image file; the cache may hold others."""
    reads = set()
    pread = volume.dev.pread

    def counting_pread(offset, length):
        if length == volume.nodesize:
            reads.add(offset)
        return pread(offset, length)

    volume.dev.pread = counting_pread
    try:
        call()
    finally:
        volume.dev.pread = pread
    return len(reads)


def assert_clean(volume) -> None:
    problems = check_volume(volume, check_data=True).problems
    assert problems == [], [str(problem) for problem in problems]


def data_blocks(fs, ino: int, size: int) -> set:
    """Return the numbers of the blocks below size that some extent of file ino covers."""
    covered = set()
    for extent in fs.extents(ino, 0, size):
        if extent.kind == ondisk.FILE_EXTENT_REGULAR and not extent.disk_addr:
            continue
        end = min(extent.end, size)
        covered.update(range(extent.offset // BLOCK, -(-end // BLOCK)))
    return covered


def inode_facts(fs, ino: int) -> dict:
    """Return everything of an inode that a send must carry, its content included."""
    inode = fs.get_inode(ino)
    facts = {
        "mode": inode.mode, "uid": inode.uid, "gid": inode.gid, "rdev": inode.rdev, "size": inode.size,
        "nlink": inode.nlink, "atime": inode.atime_ns, "mtime": inode.mtime_ns, "ctime": inode.ctime_ns,
        "otime": inode.otime_ns,
        "xattrs": sorted((name, fs.getxattr(ino, name)) for name in fs.listxattr(ino)),
    }
    if inode.is_dir:
        facts["seq"] = inode.seq
        facts["entries"] = sorted((index, name, child) for index, name, child, _ in fs.readdir(ino))
    elif inode.is_symlink:
        facts["target"] = fs.readlink(ino)
    elif inode.is_reg:
        facts["content_crc"] = file_crc(fs, ino, inode.size)
        facts["blocks"] = data_blocks(fs, ino, inode.size)
    return facts


def file_crc(fs, ino: int, size: int) -> int:
    value = 0
    for offset in range(0, size, CHUNK):
        value = crc32c(fs.read(ino, offset, CHUNK), value)
    return value


def subvolume_facts(fs) -> dict:
    """Return {inode number: facts} for every inode reachable from the root."""
    out = {}
    pending = [ondisk.ROOT_DIR_INO]
    while pending:
        ino = pending.pop()
        if ino in out:
            continue
        out[ino] = inode_facts(fs, ino)
        if stat.S_ISDIR(out[ino]["mode"]):
            pending.extend(child for _, _, child in out[ino]["entries"])
    return out


def assert_same_subvolume(volume_a, name_a: bytes, volume_b, name_b: bytes) -> None:
    """Assert that snapshot b has the inodes, names, attributes, xattrs and data of a, and its holes.

    Snapshot b may have a hole where a has a data block of zeros, because
    the filesystem stores some zeros as holes (a file that leaves inline
    storage with only zeros gets no block), and the contents compare equal.
    """
    facts_a = subvolume_facts(open_filesystem(volume_a, name_a))
    facts_b = subvolume_facts(open_filesystem(volume_b, name_b))
    assert sorted(facts_a) == sorted(facts_b), "inode numbers"
    for ino, facts in facts_a.items():
        for field, value in facts.items():
            if field == "blocks":
                assert facts_b[ino][field] <= value, f"inode {ino}: data blocks where the source has holes"
            else:
                assert facts_b[ino][field] == value, f"inode {ino}: {field}"
