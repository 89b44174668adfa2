"""Space accounting: a full image, space reuse across commits, and freeing everything."""

from __future__ import annotations

import errno
import os

import pytest

from cowtree import ondisk
from cowtree.check import check_volume
from cowtree.errors import NoSpaceError
from cowtree.image import live, open_image

from fsmodel import ROOT, Driver, FsModel, assert_matches


def assert_clean(volume) -> None:
    report = check_volume(volume)
    assert report.problems == [], "\n".join(map(str, report.problems))


def size_limit_for(nodesize: int) -> int:
    """Return a size limit with about 2 MiB usable above the space kept back for deletions.

    mkfs accepts FIRST_ALLOC + 64 nodes + 1 MiB at the least, and the volume
    keeps max(1 MiB, 64 nodes) of the limit for deletions, which would leave
    room for only a few files.
    """
    return ondisk.FIRST_ALLOC + 64 * nodesize + (1 << 20) + (2 << 20)


@pytest.mark.parametrize("nodesize", [4096, 16384])
def test_full_image_raises_enospc(make_image, nodesize):
    """Filling a size-limited image raises NoSpaceError; abort keeps the last commit and deletes still work."""
    size_limit = size_limit_for(nodesize)
    path, volume, fs = make_image(nodesize=nodesize, size_limit=size_limit)
    driver = Driver(fs, FsModel(fs.get_inode(ROOT).mode & 0o7777))
    committed = driver.model.copy()

    with pytest.raises(NoSpaceError) as caught:
        for index in range(1000):
            inode = driver.create(ROOT, b"fill%04d" % index)
            driver.write(inode.ino, 0, bytes([index % 251 + 1]) * 40000)
            if index % 3 == 2:
                volume.commit()
                committed = driver.model.copy()
    error = caught.value
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert "No space left" in str(error)
    assert len(committed.files()) >= 30, "about 2 MiB must be usable before the image is full"

    volume.abort()
    assert_matches(fs, committed, "after abort of the transaction that ran out of space")
    assert_clean(volume)
    assert os.path.getsize(path) <= size_limit

    # Deleting files must work on a full image: it needs new nodes too.
    driver.model = committed.copy()
    for name in sorted(committed.entries[ROOT])[: len(committed.entries[ROOT]) // 2]:
        driver.unlink(ROOT, name)
    volume.commit()
    assert_clean(volume)
    assert_matches(fs, driver.model, "after deleting half of the files")

    # The space freed is usable again.
    inode = driver.create(ROOT, b"after")
    driver.write(inode.ino, 0, b"y" * 40000)
    volume.commit()
    assert_clean(volume)
    assert os.path.getsize(path) <= size_limit

    volume.close()
    reopened = open_image(path)
    try:
        assert_matches(live(reopened), driver.model, "reopened")
    finally:
        reopened.close()


def test_full_image_of_metadata_then_abort(make_image):
    """Running out of space for nodes alone (no file data) leaves the last commit intact.

    The error comes from a tree operation or from the commit itself, which
    copies extent tree nodes; the test records which and accepts both.
    """
    nodesize = 4096
    size_limit = size_limit_for(nodesize)
    path, volume, fs = make_image(nodesize=nodesize, size_limit=size_limit)
    driver = Driver(fs, FsModel(fs.get_inode(ROOT).mode & 0o7777))
    committed = driver.model.copy()
    in_commit = None
    for index in range(5000):
        try:
            inode = driver.create(ROOT, b"small%05d" % index)
            driver.setxattr(inode.ino, b"user.pad", bytes(700))
        except NoSpaceError:
            in_commit = False
            break
        if index % 100 == 99:
            try:
                volume.commit()
            except NoSpaceError:
                in_commit = True
                break
            committed = driver.model.copy()
    assert in_commit is not None, "5000 files with metadata only never filled the image"

    volume.abort()
    assert_matches(fs, committed, f"after abort (out of space inside commit: {in_commit})")
    assert_clean(volume)
    driver.model = committed.copy()
    driver.unlink(ROOT, sorted(committed.entries[ROOT])[0])
    volume.commit()
    assert_clean(volume)


@pytest.mark.slow
@pytest.mark.parametrize("nodesize", [4096, 16384])
def test_rewrite_one_block_keeps_image_small(make_image, nodesize):
    """Rewriting one 4 KiB file 2,000 times, committing each time, reuses the freed blocks."""
    path, volume, fs = make_image(nodesize=nodesize)
    inode = fs.mknod(ROOT, b"hot", 0o100644)
    for round_index in range(2000):
        fs.write(inode.ino, 0, bytes([round_index % 256]) * ondisk.BLOCK_SIZE)
        volume.commit()
    assert fs.read(inode.ino, 0, ondisk.BLOCK_SIZE) == bytes([1999 % 256]) * ondisk.BLOCK_SIZE
    # A commit rewrites about three nodes and one data block, and the blocks it
    # frees are reused one commit later.  So a handful of nodes is the steady
    # state, and sixteen leave room for a tree to grow a level.
    bound = ondisk.FIRST_ALLOC + 16 * nodesize
    assert os.path.getsize(path) <= bound
    assert volume.free.high_water <= bound
    assert_clean(volume)


def remove_tree(fs, directory: int) -> None:
    """Remove everything below directory, like rm -r."""
    for _, name, ino, dtype in list(fs.readdir(directory)):
        if dtype == ondisk.DT_DIR:
            remove_tree(fs, ino)
            fs.rmdir(directory, name)
        else:
            fs.unlink(directory, name)


@pytest.mark.parametrize("nodesize", [4096, 16384])
def test_remove_everything_returns_space(make_image, nodesize):
    path, volume, fs = make_image(nodesize=nodesize)
    fresh_bytes_used = volume.bytes_used
    for top in range(5):
        directory = fs.mkdir(ROOT, b"dir%d" % top)
        for sub in range(4):
            child = fs.mkdir(directory.ino, b"sub%d" % sub)
            for index in range(15):
                inode = fs.mknod(child.ino, b"file%02d" % index, 0o100644)
                fs.write(inode.ino, 0, bytes([index]) * (index * 1500))
                fs.setxattr(inode.ino, b"user.n", b"%d" % index)
                if index % 4 == 0:
                    fs.link(inode.ino, directory.ino, b"link%d-%02d" % (sub, index))
    volume.commit()
    assert volume.bytes_used > fresh_bytes_used + 100 * ondisk.BLOCK_SIZE
    assert fs.tree.level >= 1

    remove_tree(fs, ROOT)
    volume.commit()
    assert_clean(volume)
    assert list(fs.readdir(ROOT)) == []
    # A tree that does not collapse fully keeps a few nodes more than a fresh
    # image, so three nodes are allowed.
    assert volume.bytes_used <= fresh_bytes_used + 3 * nodesize


def piece_at(offset: int, size: int) -> bytes:
    """Return size bytes that differ with offset, so a misplaced block shows."""
    return offset.to_bytes(8, "little") * (size // 8)


@pytest.mark.parametrize("files", [False, True], ids=["appends", "files"])
def test_no_space_leaves_room_for_the_commit(make_image, reopen, files):
    """Many small extents fill the image; the write that finds no space changes nothing and the commit fits.

    Each 4 KiB append is an extent of its own, and each needs an EXTENT_ITEM
    that only the commit inserts.  Thousands of them need more extent tree
    leaves than the reserve for deletions holds, so the operations must stop
    early enough for the commit, not fail it.
    """
    path, volume, fs = make_image(nodesize=4096, size_limit=24 << 20)
    written = []
    with pytest.raises(NoSpaceError):
        for index in range(1 << 20):
            if files or index == 0:
                ino = fs.mknod(ROOT, b"f%06d" % index, 0o100644).ino
                offset = 0
            before = volume.changes
            try:
                fs.write(ino, offset, piece_at(offset, 4096))
            except NoSpaceError:
                assert volume.changes == before, "the failed write changed the transaction"
                raise
            written.append((ino, offset))
            offset += 4096
    assert len(written) > 3000, "the image should hold thousands of 4 KiB extents"
    volume.commit()
    volume, fs = reopen(volume)
    sizes = {}
    for ino, offset in written:
        assert fs.read(ino, offset, 4096) == piece_at(offset, 4096)
        sizes[ino] = offset + 4096
    for ino, size in sizes.items():
        assert fs.get_inode(ino).size == size
    assert_clean(volume)


def test_writable_open_gives_back_blocks_past_the_end(make_image, reopen):
    """Blocks a crash left past the committed end go at the next writable open, not at a read-only one."""
    path, volume, fs = make_image(nodesize=4096)
    ino = fs.mknod(ROOT, b"f", 0o100644).ino
    fs.write(ino, 0, b"kept" * 1024)
    volume.commit()
    end = volume.sb.image_bytes
    volume.close()
    with open(path, "ab") as image:
        image.write(b"\xff" * (3 << 20))
    volume, fs = reopen(volume, writable=False)
    assert os.path.getsize(path) == end + (3 << 20)
    volume, fs = reopen(volume)
    assert os.path.getsize(path) == end
    assert fs.read(ino, 0, 4096) == b"kept" * 1024
    assert_clean(volume)


def test_setattr_and_truncate_check_space_first(make_image, reopen):
    """chmod, a cut inside a block and a grow on a full image fail before they change anything."""
    path, volume, fs = make_image(nodesize=4096, size_limit=16 << 20)
    inos = []
    with pytest.raises(NoSpaceError):
        for index in range(1 << 20):
            ino = fs.mknod(ROOT, b"f%06d" % index, 0o100644).ino
            fs.write(ino, 0, piece_at(index, 8192))
            inos.append(ino)
    volume.commit()
    calls = [lambda ino: fs.setattr(ino, mode=0o100600), lambda ino: fs.truncate(ino, 3000),
             lambda ino: fs.truncate(ino, 5000)]
    for call in calls:
        failed = False
        for ino in inos:
            before = volume.changes
            try:
                call(ino)
            except NoSpaceError:
                assert volume.changes == before, "the call that found no space changed the transaction"
                failed = True
                break
        assert failed, "the image should run out of space"
        volume.commit()
    fs.truncate(inos[0], 0)
    volume.commit()
    volume, fs = reopen(volume)
    assert_clean(volume)
