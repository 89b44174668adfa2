"""Free space loaded lazily from the extent tree: bounded work per transaction, no double use."""

from __future__ import annotations

import os

import pytest

from cowtree import alloc, ondisk
from cowtree.check import check_volume
from cowtree.errors import NoSpaceError
from cowtree.image import live, mkfs, open_image

ROOT = ondisk.ROOT_DIR_INO


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(alloc, "CHUNK", 1 << 20)


def counting_scans(volume) -> list:
    calls = []
    scan = volume.free.scan

    def counted(lo, hi):
        calls.append((lo, hi))
        return scan(lo, hi)

    volume.free.scan = counted
    return calls


def fill_and_punch(path: str, files: int = 48, size: int = 96 << 10) -> None:
    """Make an image of several chunks, then free every other file so each chunk has holes."""
    volume = mkfs(path, nodesize=4096)
    fs = live(volume)
    for i in range(files):
        inode = fs.mknod(ROOT, b"f%03d" % i, 0o100644)
        fs.write(inode.ino, 0, bytes([i]) * size)
    volume.commit()
    for i in range(0, files, 2):
        fs.unlink(ROOT, b"f%03d" % i)
    volume.commit()
    volume.close()


def test_chunk_scans_bounded_per_transaction(tmp_path, small_chunks):
    path = str(tmp_path / "chunks.img")
    fill_and_punch(path)
    volume = open_image(path, writable=True)
    assert len(volume.free.unloaded) >= 4
    calls = counting_scans(volume)
    fs = live(volume)
    for i in range(6):
        inode = fs.mknod(ROOT, b"new%d" % i, 0o100644)
        fs.write(inode.ino, 0, b"x" * (200 << 10))
    volume.commit()
    # Each chunk scan may start with a floor look-up, which is not a scan call.
    assert len(calls) <= alloc.LOADS_PER_TRANSACTION
    assert not check_volume(volume).problems
    volume.close()


def test_holes_in_unloaded_chunks_are_reused(tmp_path, small_chunks):
    path = str(tmp_path / "reuse.img")
    fill_and_punch(path)
    size_before = None
    for round_number in range(12):
        volume = open_image(path, writable=True)
        size_before = size_before or volume.free.high_water
        fs = live(volume)
        inode = fs.mknod(ROOT, b"r%02d" % round_number, 0o100644)
        fs.write(inode.ino, 0, b"y" * (64 << 10))
        volume.commit()
        volume.close()
    volume = open_image(path)
    # Twelve 64 KiB files fit in the holes the punched files left.
    assert volume.free.high_water <= size_before + 4 * volume.nodesize * 12
    assert not check_volume(volume).problems
    volume.close()


def test_full_image_scans_everything_before_enospc(tmp_path, small_chunks):
    path = str(tmp_path / "limit.img")
    volume = mkfs(path, nodesize=4096, size_limit=8 << 20)
    fs = live(volume)
    i = 0
    with pytest.raises(NoSpaceError):
        while True:
            inode = fs.mknod(ROOT, b"g%03d" % i, 0o100644)
            fs.write(inode.ino, 0, b"z" * (256 << 10))
            volume.commit()
            i += 1
    volume.abort()
    for j in range(0, i, 2):
        fs.unlink(ROOT, b"g%03d" % j)
    volume.commit()
    volume.close()
    volume = open_image(path, writable=True)
    fs = live(volume)
    # The only free space lies in chunks no transaction has loaded yet.
    inode = fs.mknod(ROOT, b"after", 0o100644)
    fs.write(inode.ino, 0, b"w" * (512 << 10))
    volume.commit()
    assert fs.read(inode.ino, 0, 4) == b"wwww"
    assert not check_volume(volume).problems
    volume.close()


def test_rewrites_across_commands_reuse_space(tmp_path, small_chunks):
    """Writing and removing a large file again and again, one open per round, keeps the file size."""
    path = str(tmp_path / "rewrite.img")
    mkfs(path).close()
    data = bytes(range(256)) * (24 << 12)   # 24 MiB, larger than several 1 MiB chunks
    sizes = []
    for _ in range(4):
        volume = open_image(path, writable=True)
        fs = live(volume)
        inode = fs.mknod(ROOT, b"big", 0o100644)
        for offset in range(0, len(data), 4 << 20):
            fs.write(inode.ino, offset, data[offset:offset + (4 << 20)])
        volume.commit()
        fs.unlink(ROOT, b"big")
        volume.commit()
        volume.close()
        sizes.append(os.path.getsize(path))
    assert sizes[-1] <= sizes[0] + (1 << 20), sizes
