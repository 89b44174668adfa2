"""SEEK_DATA, SEEK_HOLE and fallocate on FileSystem, checked against expected offsets, contents and space."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from cowtree import ondisk
from cowtree import subvolume as sv
from cowtree.check import check_volume
from cowtree.errors import NoSpaceError
from cowtree.fs import (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                        FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_ZERO_RANGE, MAX_FILE_SIZE, ZERO_CHUNK)
from cowtree.image import live, open_image

BLOCK = ondisk.BLOCK_SIZE
ROOT = ondisk.ROOT_DIR_INO
KIB = 1024
MIB = 1024 * KIB
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def assert_clean(volume) -> None:
    report = check_volume(volume)
    assert report.problems == [], "\n".join(map(str, report.problems))


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as caught:
        call(*args)
    return caught.value.errno


def new_file(fs, name: bytes = b"f") -> int:
    return fs.mknod(ROOT, name, 0o100644).ino


def sparse_file(fs) -> int:
    """Return a 1 MiB file with data only in the block at 512 KiB (four bytes written there)."""
    ino = new_file(fs)
    fs.truncate(ino, MIB)
    fs.write(ino, 512 * KIB, b"data")
    return ino


def extent_map(fs, ino) -> list[tuple[int, int, int]]:
    """Return (file offset, end, disk address) of each regular extent of ino."""
    return [(e.offset, e.end, e.disk_addr) for e in fs.extents(ino) if e.kind == ondisk.FILE_EXTENT_REGULAR]


def used_bytes(volume) -> int:
    return volume.bytes_used + volume.pending_bytes()


# -- SEEK_DATA and SEEK_HOLE ------------------------------------------------------------

def test_seek_sparse_file(make_image):
    _, volume, fs = make_image()
    ino = sparse_file(fs)
    assert fs.seek_data(ino, 0) == 512 * KIB
    assert fs.seek_data(ino, 512 * KIB + 3) == 512 * KIB + 3
    assert fs.seek_hole(ino, 0) == 0
    assert fs.seek_hole(ino, 512 * KIB) == 512 * KIB + BLOCK
    assert fs.seek_hole(ino, 512 * KIB + BLOCK - 1) == 512 * KIB + BLOCK
    assert fs.seek_hole(ino, MIB - 1) == MIB - 1
    assert errno_of(fs.seek_data, ino, 512 * KIB + BLOCK) == errno.ENXIO
    volume.commit()
    assert_clean(volume)


@pytest.mark.parametrize("offset", [-1, MIB, MIB + 1, MAX_FILE_SIZE])
def test_seek_outside_file_enxio(make_image, offset):
    _, _, fs = make_image()
    ino = sparse_file(fs)
    assert errno_of(fs.seek_data, ino, offset) == errno.ENXIO
    assert errno_of(fs.seek_hole, ino, offset) == errno.ENXIO


def test_seek_empty_file_enxio(make_image):
    _, _, fs = make_image()
    ino = new_file(fs)
    assert errno_of(fs.seek_data, ino, 0) == errno.ENXIO
    assert errno_of(fs.seek_hole, ino, 0) == errno.ENXIO


def test_seek_file_ending_in_hole(make_image):
    _, _, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"x" * 8192)
    fs.truncate(ino, MIB)
    assert fs.seek_data(ino, 0) == 0
    assert fs.seek_data(ino, 100) == 100
    assert fs.seek_hole(ino, 0) == 8192
    assert fs.seek_hole(ino, 8191) == 8192
    assert fs.seek_hole(ino, 8192) == 8192
    assert errno_of(fs.seek_data, ino, 8192) == errno.ENXIO


def test_seek_dense_file_hole_at_size(make_image):
    _, _, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"y" * 10000)
    assert fs.seek_hole(ino, 0) == 10000
    assert fs.seek_hole(ino, 9999) == 10000
    assert fs.seek_data(ino, 9999) == 9999


def test_seek_inline_file_is_data(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"z" * 100)
    assert fs._inline_extent(ino) is not None
    assert fs.seek_data(ino, 0) == 0
    assert fs.seek_data(ino, 50) == 50
    assert fs.seek_hole(ino, 0) == 100
    assert errno_of(fs.seek_data, ino, 100) == errno.ENXIO
    fs.truncate(ino, 300)
    assert fs._inline_extent(ino) is not None
    assert fs.seek_hole(ino, 0) == 300
    assert fs.seek_data(ino, 200) == 200
    volume.commit()
    assert_clean(volume)


def test_seek_holes_between_extents(make_image):
    _, _, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"a" * BLOCK)
    fs.write(ino, 3 * BLOCK, b"b" * (2 * BLOCK))
    fs.truncate(ino, 8 * BLOCK)
    assert fs.seek_hole(ino, 0) == BLOCK
    assert fs.seek_data(ino, BLOCK) == 3 * BLOCK
    assert fs.seek_hole(ino, 3 * BLOCK) == 5 * BLOCK
    assert errno_of(fs.seek_data, ino, 5 * BLOCK) == errno.ENXIO


def test_seek_kept_after_reopen_and_in_snapshot(make_image, reopen):
    _, volume, fs = make_image()
    ino = sparse_file(fs)
    volume.commit()
    sv.create_snapshot(volume, b"snap")
    volume, fs = reopen(volume, writable=False)
    assert fs.seek_data(ino, 0) == 512 * KIB
    assert fs.seek_hole(ino, 512 * KIB) == 512 * KIB + BLOCK
    snap = sv.open_filesystem(volume, b"snap")
    assert snap.seek_data(ino, 0) == 512 * KIB
    assert snap.seek_hole(ino, 0) == 0


def test_seek_directory_eisdir(make_image):
    _, _, fs = make_image()
    assert errno_of(fs.seek_data, ROOT, 0) == errno.EISDIR
    assert errno_of(fs.seek_hole, ROOT, 0) == errno.EISDIR


# -- fallocate: allocation ----------------------------------------------------------------

def test_fallocate_fills_holes_only(make_image):
    _, volume, fs = make_image()
    ino = sparse_file(fs)
    data_extent = extent_map(fs, ino)
    assert len(data_extent) == 1
    before = used_bytes(volume)
    fs.fallocate(ino, 0, 0, MIB)
    inode = fs.get_inode(ino)
    assert inode.size == MIB
    assert inode.nbytes == MIB
    assert used_bytes(volume) - before == MIB - BLOCK
    # The block at 512 KiB keeps its extent; every other block is new.
    assert data_extent[0] in extent_map(fs, ino)
    assert fs.read(ino, 0, MIB) == bytes(512 * KIB) + b"data" + bytes(MIB - 512 * KIB - 4)
    assert fs.seek_hole(ino, 0) == MIB
    assert fs.seek_data(ino, 0) == 0
    volume.commit()
    assert_clean(volume)


def test_fallocate_extends_size(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"q" * 5000)
    fs.fallocate(ino, 0, 6000, 10000)
    inode = fs.get_inode(ino)
    assert inode.size == 16000
    assert inode.nbytes == 4 * BLOCK
    assert fs.read(ino, 0, 20000) == b"q" * 5000 + bytes(11000)
    volume.commit()
    assert_clean(volume)


def test_fallocate_inside_data_keeps_extents(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"r" * (3 * BLOCK))
    volume.commit()
    extents = extent_map(fs, ino)
    fs.fallocate(ino, 0, 100, 2 * BLOCK)
    assert extent_map(fs, ino) == extents
    inode = fs.get_inode(ino)
    assert (inode.size, inode.nbytes) == (3 * BLOCK, 3 * BLOCK)
    assert fs.read(ino, 0, 4 * BLOCK) == b"r" * (3 * BLOCK)


def test_fallocate_keep_size_past_eof(make_image, reopen):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"s" * 5000)
    fs.fallocate(ino, FALLOC_FL_KEEP_SIZE, 0, MIB)
    inode = fs.get_inode(ino)
    assert inode.size == 5000
    assert inode.nbytes == MIB
    assert inode.flags & ondisk.INODE_PREALLOC
    assert fs.read(ino, 0, 2 * MIB) == b"s" * 5000
    assert fs.seek_hole(ino, 0) == 5000
    volume.commit()
    assert_clean(volume)

    # Growing over the blocks shows zeros; shrinking drops them and the flag.
    volume, fs = reopen(volume)
    fs.truncate(ino, 3 * BLOCK)
    assert fs.read(ino, 0, 3 * BLOCK) == b"s" * 5000 + bytes(3 * BLOCK - 5000)
    assert fs.get_inode(ino).nbytes == MIB
    fs.truncate(ino, 2 * BLOCK)
    inode = fs.get_inode(ino)
    assert inode.nbytes == 2 * BLOCK
    assert not inode.flags & ondisk.INODE_PREALLOC
    volume.commit()
    assert_clean(volume)


def test_fallocate_keep_size_on_empty_file(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.fallocate(ino, FALLOC_FL_KEEP_SIZE, 0, 64 * KIB)
    inode = fs.get_inode(ino)
    assert (inode.size, inode.nbytes) == (0, 64 * KIB)
    assert errno_of(fs.seek_data, ino, 0) == errno.ENXIO
    # A small write after it goes to blocks, not inline: the file has regular extents.
    fs.write(ino, 0, b"tiny")
    assert fs._inline_extent(ino) is None
    assert fs.read(ino, 0, 100) == b"tiny"
    volume.commit()
    assert_clean(volume)


def test_fallocate_inline_file(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"inline content")
    # Inside the inline data there is nothing to allocate: the file stays inline.
    fs.fallocate(ino, 0, 0, 10)
    assert fs._inline_extent(ino) is not None
    # Past it, the content moves to a block and the range is allocated.
    fs.fallocate(ino, 0, 0, 3 * BLOCK)
    inode = fs.get_inode(ino)
    assert fs._inline_extent(ino) is None
    assert (inode.size, inode.nbytes) == (3 * BLOCK, 3 * BLOCK)
    assert fs.read(ino, 0, 3 * BLOCK) == b"inline content" + bytes(3 * BLOCK - 14)
    volume.commit()
    assert_clean(volume)


def test_fallocate_writes_bounded_chunks(make_image, monkeypatch):
    _, volume, fs = make_image(nodesize=16384)
    ino = new_file(fs)
    lengths = []
    write_data = volume.write_data

    def recording_write_data(data, owner):
        lengths.append(len(data))
        return write_data(data, owner)

    monkeypatch.setattr(volume, "write_data", recording_write_data)
    fs.fallocate(ino, 0, 0, 5 * ZERO_CHUNK + BLOCK)
    assert max(lengths) == ZERO_CHUNK
    assert sum(lengths) == 5 * ZERO_CHUNK + BLOCK
    assert fs.get_inode(ino).nbytes == 5 * ZERO_CHUNK + BLOCK
    volume.commit()
    assert_clean(volume)


def test_fallocate_steps_yield_between_pieces(make_image):
    _, volume, fs = make_image(nodesize=16384)
    ino = new_file(fs)
    fs.write(ino, ZERO_CHUNK, b"d" * BLOCK)
    steps = fs.fallocate_steps(ino, 0, 0, 5 * ZERO_CHUNK)
    allocated = []
    for _ in steps:
        # The new blocks are in the tree, but the inode item is written only at the end.
        allocated.append(sum(e.num_bytes for e in fs.extents(ino)) - BLOCK)
        assert fs.get_inode(ino).size == ZERO_CHUNK + BLOCK
    # The holes before and after the data block make five pieces: the first hole
    # whole, then three of ZERO_CHUNK and the rest.  Each yield comes between two.
    assert allocated == [ZERO_CHUNK, 2 * ZERO_CHUNK, 3 * ZERO_CHUNK, 4 * ZERO_CHUNK]
    inode = fs.get_inode(ino)
    assert (inode.size, inode.nbytes) == (5 * ZERO_CHUNK, 5 * ZERO_CHUNK)
    assert fs.read(ino, ZERO_CHUNK, BLOCK) == b"d" * BLOCK
    volume.commit()
    assert_clean(volume)


def test_fallocate_steps_check_before_first_yield(make_image):
    _, volume, fs = make_image(size_limit=8 * MIB)
    ino = new_file(fs)
    volume.commit()
    steps = fs.fallocate_steps(ino, 0, 0, 16 * MIB)
    with pytest.raises(NoSpaceError):
        next(steps)
    assert not volume.has_changes()
    assert list(fs.fallocate_steps(ino, 0, 0, ZERO_CHUNK)) == []


def test_fallocate_reduces_free_space(make_image):
    _, volume, fs = make_image(size_limit=64 * MIB)
    ino = new_file(fs)
    volume.commit()
    before = volume.bytes_used
    fs.fallocate(ino, 0, 0, 8 * MIB)
    volume.commit()
    assert volume.bytes_used - before >= 8 * MIB
    assert volume.bytes_used - before < 8 * MIB + 64 * KIB
    assert_clean(volume)


def test_fallocate_enospc_leaves_image_unchanged(make_image):
    path, volume, fs = make_image(size_limit=8 * MIB)
    ino = new_file(fs)
    fs.write(ino, 0, b"keep" * 1000)
    volume.commit()
    with open(path, "rb") as image:
        digest = hashlib.sha256(image.read()).hexdigest()
    changes = volume.changes

    for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
        with pytest.raises(NoSpaceError) as caught:
            fs.fallocate(ino, mode, 0, 16 * MIB)
        assert caught.value.errno == errno.ENOSPC
        assert volume.changes == changes
        assert not volume.has_changes()
    inode = fs.get_inode(ino)
    assert (inode.size, inode.nbytes) == (4000, BLOCK)
    volume.close()
    with open(path, "rb") as image:
        assert hashlib.sha256(image.read()).hexdigest() == digest

    # What fits still works, and the image stays within its limit.
    volume = open_image(path, writable=True)
    try:
        fs = live(volume)
        fs.fallocate(ino, 0, 0, 2 * MIB)
        assert fs.get_inode(ino).size == 2 * MIB
        volume.commit()
        assert_clean(volume)
    finally:
        volume.close()
    assert os.path.getsize(path) <= 8 * MIB


# -- fallocate: punching and zeroing -------------------------------------------------------

def test_punch_hole_in_middle(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    content = bytes(range(256)) * (5 * BLOCK // 256)
    fs.write(ino, 0, content)
    volume.commit()
    start, end = BLOCK + 100, 3 * BLOCK + 200
    fs.fallocate(ino, PUNCH, start, end - start)
    inode = fs.get_inode(ino)
    assert inode.size == 5 * BLOCK
    # Blocks 1 and 3 are rewritten with zeros in the range; block 2 is freed.
    assert inode.nbytes == 4 * BLOCK
    assert fs.read(ino, 0, 5 * BLOCK) == content[:start] + bytes(end - start) + content[end:]
    assert fs.seek_hole(ino, 0) == 2 * BLOCK
    assert fs.seek_data(ino, 2 * BLOCK) == 3 * BLOCK
    assert fs.seek_hole(ino, 3 * BLOCK) == 5 * BLOCK
    volume.commit()
    assert_clean(volume)


def test_punch_hole_within_one_block(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"m" * (2 * BLOCK))
    fs.fallocate(ino, PUNCH, 10, 20)
    assert fs.read(ino, 0, 40) == b"m" * 10 + bytes(20) + b"m" * 10
    assert fs.get_inode(ino).nbytes == 2 * BLOCK
    volume.commit()
    assert_clean(volume)


def test_punch_hole_whole_file_and_past_eof(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"n" * 10000)
    fs.fallocate(ino, FALLOC_FL_KEEP_SIZE, 0, 64 * KIB)
    fs.fallocate(ino, PUNCH, 0, MIB)
    inode = fs.get_inode(ino)
    assert (inode.size, inode.nbytes) == (10000, 0)
    assert fs.read(ino, 0, 10000) == bytes(10000)
    assert fs.seek_hole(ino, 0) == 0
    assert errno_of(fs.seek_data, ino, 0) == errno.ENXIO
    volume.commit()
    assert_clean(volume)


def test_punch_hole_inline_file(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"abcdefghij")
    fs.fallocate(ino, PUNCH, 2, 3)
    assert fs.read(ino, 0, 100) == b"ab\0\0\0fghij"
    fs.fallocate(ino, PUNCH, 8, 100)
    assert fs.read(ino, 0, 100) == b"ab\0\0\0fgh\0\0"
    assert fs.get_inode(ino).size == 10
    volume.commit()
    assert_clean(volume)


def test_zero_range_allocates_zeros(make_image):
    _, volume, fs = make_image()
    ino = new_file(fs)
    content = b"w" * (4 * BLOCK)
    fs.write(ino, 0, content)
    fs.truncate(ino, 8 * BLOCK)
    start, end = 100, 6 * BLOCK
    fs.fallocate(ino, FALLOC_FL_ZERO_RANGE, start, end - start)
    inode = fs.get_inode(ino)
    assert inode.size == 8 * BLOCK
    assert inode.nbytes == 6 * BLOCK
    assert fs.read(ino, 0, 8 * BLOCK) == b"w" * 100 + bytes(8 * BLOCK - 100)
    assert fs.seek_hole(ino, 0) == 6 * BLOCK
    volume.commit()
    assert_clean(volume)


def test_zero_range_extends_unless_keep_size(make_image):
    _, volume, fs = make_image()
    first = new_file(fs, b"a")
    second = new_file(fs, b"b")
    for ino in (first, second):
        fs.write(ino, 0, b"v" * 6000)
    fs.fallocate(first, FALLOC_FL_ZERO_RANGE, 5000, 5000)
    fs.fallocate(second, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 5000, 5000)
    assert fs.get_inode(first).size == 10000
    assert fs.read(first, 0, 20000) == b"v" * 5000 + bytes(5000)
    assert fs.get_inode(second).size == 6000
    assert fs.read(second, 0, 20000) == b"v" * 5000 + bytes(1000)
    assert fs.get_inode(second).nbytes == 3 * BLOCK
    volume.commit()
    assert_clean(volume)


# -- fallocate: errors ---------------------------------------------------------------------

@pytest.mark.parametrize("mode, offset, length, expected", [
    (FALLOC_FL_PUNCH_HOLE, 0, BLOCK, errno.EOPNOTSUPP),
    (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, BLOCK, errno.EOPNOTSUPP),
    (FALLOC_FL_COLLAPSE_RANGE, 0, BLOCK, errno.EOPNOTSUPP),
    (FALLOC_FL_INSERT_RANGE, 0, BLOCK, errno.EOPNOTSUPP),
    (FALLOC_FL_UNSHARE_RANGE, 0, BLOCK, errno.EOPNOTSUPP),
    (0x100, 0, BLOCK, errno.EOPNOTSUPP),
    (0, 0, 0, errno.EINVAL),
    (0, -1, BLOCK, errno.EINVAL),
    (0, 0, -5, errno.EINVAL),
    (0, MAX_FILE_SIZE, 1, errno.EFBIG),
], ids=["punch-without-keep-size", "punch-and-zero", "collapse", "insert", "unshare", "unknown-bit",
        "zero-length", "negative-offset", "negative-length", "past-max-size"])
def test_fallocate_invalid_requests(make_image, mode, offset, length, expected):
    _, volume, fs = make_image()
    ino = new_file(fs)
    fs.write(ino, 0, b"u" * 5000)
    volume.commit()
    assert errno_of(fs.fallocate, ino, mode, offset, length) == expected
    assert not volume.has_changes()
    assert fs.read(ino, 0, 10000) == b"u" * 5000


def test_fallocate_directory_and_read_only(make_image):
    _, volume, fs = make_image()
    assert errno_of(fs.fallocate, ROOT, 0, 0, BLOCK) == errno.EISDIR
    ino = new_file(fs)
    sv.create_snapshot(volume, b"ro")
    snap = sv.open_filesystem(volume, b"ro")
    assert errno_of(snap.fallocate, ino, 0, 0, BLOCK) == errno.EROFS
    assert errno_of(snap.fallocate, ino, PUNCH, 0, BLOCK) == errno.EROFS


def test_clone_keeps_prealloc_flag(make_image):
    _, volume, fs = make_image()
    source = new_file(fs, b"src")
    fs.write(source, 0, b"p" * 100)
    fs.fallocate(source, FALLOC_FL_KEEP_SIZE, 0, 32 * KIB)
    copy = new_file(fs, b"copy")
    fs.clone_file(fs, source, copy)
    assert fs.get_inode(copy).flags & ondisk.INODE_PREALLOC
    assert fs.read(copy, 0, 1000) == b"p" * 100
    volume.commit()
    assert_clean(volume)


# -- against a model ---------------------------------------------------------------------------

def check_seek_against_content(fs, ino, content: bytes, rng) -> None:
    """Check SEEK_DATA and SEEK_HOLE at random offsets: what they skip must read as zeros."""
    size = len(content)
    for offset in [0, size - 1] + [rng.randrange(size) for _ in range(20)]:
        if offset < 0:
            continue
        hole = fs.seek_hole(ino, offset)
        assert offset <= hole <= size
        try:
            data = fs.seek_data(ino, offset)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            data = size
        assert offset <= data <= size
        assert content[offset:data] == bytes(data - offset), f"SEEK_DATA from {offset} skipped data"
        if hole < size:
            following = fs.seek_data(ino, hole) if any(content[hole:]) else size
            assert content[hole:following] == bytes(following - hole), f"hole at {hole} holds data"


def test_random_fallocate_against_model(make_image, rng):
    _, volume, fs = make_image()
    ino = new_file(fs)
    content = bytearray()
    for step in range(120):
        operation = rng.choice(["write", "truncate", "alloc", "keep", "punch", "zero", "zero-keep", "commit"])
        offset = rng.randrange(0, 40 * BLOCK)
        length = rng.randrange(1, 12 * BLOCK)
        end = offset + length
        if operation == "write":
            data = bytes([rng.randrange(1, 256)]) * length
            fs.write(ino, offset, data)
            content[len(content):] = bytes(max(0, end - len(content)))
            content[offset:end] = data
        elif operation == "truncate":
            fs.truncate(ino, offset)
            del content[offset:]
            content[len(content):] = bytes(offset - len(content))
        elif operation == "commit":
            volume.commit()
            assert_clean(volume)
            continue
        else:
            mode = {"alloc": 0, "keep": FALLOC_FL_KEEP_SIZE, "punch": PUNCH, "zero": FALLOC_FL_ZERO_RANGE,
                    "zero-keep": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}[operation]
            fs.fallocate(ino, mode, offset, length)
            if operation in ("punch", "zero", "zero-keep"):
                content[offset:min(end, len(content))] = bytes(max(0, min(end, len(content)) - offset))
            if operation in ("alloc", "zero") and end > len(content):
                content[len(content):] = bytes(end - len(content))
        assert fs.get_inode(ino).size == len(content), f"step {step}: {operation} {offset} {length}"
        assert fs.read(ino, 0, len(content) + BLOCK) == bytes(content), f"step {step}: {operation} {offset} {length}"
        if content:
            check_seek_against_content(fs, ino, bytes(content), rng)
    volume.commit()
    assert_clean(volume)


def test_feature_bits_set_on_first_use(make_image, reopen):
    """Blocks past the size set RO_COMPAT_PREALLOC, a snapshot COMPAT_SUBVOL_UUID, both at the commit."""
    path, volume, fs = make_image()
    assert volume.sb.ro_compat_flags == 0
    assert volume.sb.compat_flags == 0
    ino = fs.mknod(ondisk.ROOT_DIR_INO, b"f", 0o100644).ino
    fs.fallocate(ino, FALLOC_FL_KEEP_SIZE, 0, 64 * KIB)
    volume.commit()
    volume, fs = reopen(volume)
    assert volume.sb.ro_compat_flags == ondisk.RO_COMPAT_PREALLOC
    assert volume.sb.compat_flags == 0
    sv.create_snapshot(volume, b"s1")
    volume.commit()
    volume, fs = reopen(volume, writable=False)
    assert volume.sb.ro_compat_flags == ondisk.RO_COMPAT_PREALLOC
    assert volume.sb.compat_flags == ondisk.COMPAT_SUBVOL_UUID
