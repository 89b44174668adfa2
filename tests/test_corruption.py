"""Damaged images: every case says what is damaged and what must be reported.

The cases are numbered (``NNN-short-name`` in the test ids).  The rule they
share: damage is reported as an error that names the damaged block (and,
for file data, the inode), at the moment the damaged bytes are read; a read
never returns wrong data, and an image that cannot be read is never taken
for an empty or new one.
"""

from __future__ import annotations

import os

import pytest

from cowtree import ondisk
from cowtree.check import check_volume
from cowtree.errors import CorruptionError, NotAnImageError
from cowtree.image import live, mkfs, open_image
from cowtree.transaction import EXTENT

from fsmodel import ROOT, Driver, FsModel, assert_matches

pytestmark = pytest.mark.corruption

BLOCK = ondisk.BLOCK_SIZE


class SmallImage:
    """A small committed image with every kind of item, and the models of its last two generations."""

    def __init__(self, directory):
        self.path = str(directory / "small.img")
        volume = mkfs(self.path, nodesize=4096)
        fs = live(volume)
        driver = Driver(fs, FsModel(fs.get_inode(ROOT).mode & 0o7777))
        sub = driver.mkdir(ROOT, b"sub")
        for index in range(25):
            inode = driver.create(ROOT if index % 2 else sub.ino, b"file%02d" % index)
            driver.write(inode.ino, 0, bytes([65 + index]) * (index * 700))
            if index % 5 == 0:
                driver.write(inode.ino, 3 * BLOCK + 11, b"after a hole")
            driver.setxattr(inode.ino, b"user.index", b"%d" % index)
        driver.symlink(sub.ino, b"link", b"../file01")
        volume.commit()
        self.previous_generation = volume.generation
        self.previous_model = driver.model.copy()

        driver.write(driver.model.entries[ROOT][b"file01"], 0, b"newest generation")
        driver.create(ROOT, b"newest")
        volume.commit()
        self.generation = volume.generation
        self.model = driver.model.copy()

        self.nodes = []          # (address, owning tree id)
        self.data_blocks = {}    # address of each data block a file reads -> inode
        for key, value in volume.extent_tree.items():
            if key[1] != ondisk.EXTENT_ITEM:
                continue
            _refs, _gen, flags, owner = EXTENT.unpack_from(value)
            if flags == ondisk.EXTENT_FLAG_TREE_BLOCK:
                self.nodes.append((key[0], owner))
        for ino in driver.model.files():
            for extent in fs.extents(ino):
                if extent.kind != ondisk.FILE_EXTENT_REGULAR:
                    continue
                first = extent.disk_addr + extent.extent_offset
                for block in range(first, first + extent.num_bytes, BLOCK):
                    self.data_blocks[block] = ino
        self.image_bytes = volume.free.high_water
        volume.close()
        with open(self.path, "rb") as image:
            self.pristine = image.read()

    def damaged_copy(self, directory, offset: int, name: str = "damaged.img") -> str:
        """Write a copy of the image with the byte at offset inverted; return its path."""
        path = str(directory / name)
        image = bytearray(self.pristine)
        image[offset] ^= 0xFF
        with open(path, "wb") as out:
            out.write(image)
        return path

    def what_is_at(self, offset: int):
        """Return ("node", address), ("data", block address, inode), ("superblock", copy) or ("free",).

        "free" covers every byte no committed node or file reads.
        """
        for index, start in enumerate(ondisk.SUPERBLOCK_OFFSETS):
            if start <= offset < start + BLOCK:
                return ("superblock", index)
        for address, _owner in self.nodes:
            if address <= offset < address + 4096:
                return ("node", address)
        block = offset - offset % BLOCK
        if block in self.data_blocks:
            return ("data", block, self.data_blocks[block])
        return ("free",)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    return SmallImage(tmp_path_factory.mktemp("corruption"))


def assert_error_names(exc: BaseException, *parts: str) -> None:
    for part in parts:
        assert part in str(exc), f"the error must name {part!r}: {exc}"


def assert_reports_damage(path: str, model: FsModel, parts: tuple) -> None:
    """Reading everything either returns the model's data or raises CorruptionError naming parts.

    The checker, which reads every block, must name the damage too.
    """
    try:
        volume = open_image(path)
    except CorruptionError as exc:
        assert_error_names(exc, *parts)
        return
    try:
        caught = None
        try:
            assert_matches(live(volume), model)
        except CorruptionError as exc:
            assert_error_names(exc, *parts)
            caught = exc
        try:
            report = check_volume(volume)
        except CorruptionError as exc:
            assert_error_names(exc, *parts)
            return
        found = [str(problem) for problem in report.problems if all(part in str(problem) for part in parts)]
        assert found, f"the checker must report damage at {parts}; it reported {report.problems} (read: {caught})"
    finally:
        volume.close()


def test_001_node_byte_flip_every_node(small_image, tmp_path):
    """001: one inverted byte in each node in turn.

    Must report: CorruptionError naming "block <address>" when that node is
    read (at open for a tree root), and the checker names it too.
    """
    assert len(small_image.nodes) >= 8, "the image must have several nodes"
    for address, _owner in small_image.nodes:
        for where in (0, 70, 2048, 4095):
            path = small_image.damaged_copy(tmp_path, address + where)
            assert_reports_damage(path, small_image.model, (f"block {address}",))


def test_002_data_byte_flip_every_block(small_image, tmp_path):
    """002: one inverted byte in each data block in turn.

    Must report: CorruptionError naming the data block's address and the
    inode, on reading that file; every other file reads correctly.
    """
    assert len(small_image.data_blocks) >= 10
    model = small_image.model
    for block, ino in sorted(small_image.data_blocks.items()):
        path = small_image.damaged_copy(tmp_path, block + 1234)
        volume = open_image(path)
        try:
            fs = live(volume)
            with pytest.raises(CorruptionError) as caught:
                fs.read(ino, 0, len(model.inodes[ino].data))
            assert_error_names(caught.value, "data block", f"at {block}", f"inode {ino}")
            for other in model.files():
                if other != ino:
                    assert fs.read(other, 0, 1 << 20) == model.inodes[other].data, f"inode {other}"
        finally:
            volume.close()


@pytest.mark.parametrize("copy", ["newest", "previous"], ids=["003-newest-superblock", "004-previous-superblock"])
def test_superblock_copy_damaged(small_image, tmp_path, copy):
    """003: the newest superblock copy damaged: opens at the previous generation, whole.
    004: the previous copy damaged: opens at the newest generation.
    """
    newest_index = small_image.generation % 2
    index = newest_index if copy == "newest" else 1 - newest_index
    for where in (0, 13, 40, 200, 4000):
        path = small_image.damaged_copy(tmp_path, ondisk.SUPERBLOCK_OFFSETS[index] + where)
        volume = open_image(path)
        try:
            if copy == "newest":
                assert volume.generation == small_image.previous_generation
                assert_matches(live(volume), small_image.previous_model, f"byte {where} of the newest copy")
            else:
                assert volume.generation == small_image.generation
                assert_matches(live(volume), small_image.model, f"byte {where} of the previous copy")
            report = check_volume(volume)
            assert report.problems == []
            assert isinstance(volume.superblock_scan.copies[index], Exception), "the damaged copy must be rejected"
        finally:
            volume.close()


def test_005_both_superblocks_zeroed(small_image, tmp_path):
    """005: both superblock copies zeroed.

    Must report: NotAnImageError saying there is no valid superblock, with
    what each copy failed.
    """
    path = str(tmp_path / "zeroed.img")
    image = bytearray(small_image.pristine)
    for offset in ondisk.SUPERBLOCK_OFFSETS:
        image[offset:offset + BLOCK] = bytes(BLOCK)
    with open(path, "wb") as out:
        out.write(image)
    with pytest.raises(NotAnImageError) as caught:
        open_image(path)
    assert_error_names(caught.value, path, "not a cowtree image", "no valid superblock", "copy 0", "copy 1")


CUTS = [
    pytest.param(lambda image: 16, id="006-cut-inside-first-superblock"),
    pytest.param(lambda image: BLOCK, id="007-cut-after-first-superblock"),
    pytest.param(lambda image: ondisk.SUPERBLOCK_OFFSETS[1] + 100, id="008-cut-inside-second-superblock"),
    pytest.param(lambda image: ondisk.FIRST_ALLOC, id="009-cut-before-first-node"),
    pytest.param(lambda image: image.image_bytes // 2, id="010-cut-in-the-middle"),
    pytest.param(lambda image: image.image_bytes - 1, id="011-cut-last-byte"),
]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_image_rejected(small_image, tmp_path, cut):
    """006-011: the image file cut short.

    Must report: NotAnImageError saying the image is truncated; never open
    it as an empty image.
    """
    length = cut(small_image)
    path = str(tmp_path / "cut.img")
    with open(path, "wb") as out:
        out.write(small_image.pristine[:length])
    with pytest.raises(NotAnImageError) as caught:
        open_image(path)
    # The directory of the test's files is named after the test, so the path is left out.
    message = str(caught.value).replace(path, "<image>")
    assert "truncated" in message, f"cut at {length} bytes: {message}"


def test_012_empty_file_rejected(tmp_path):
    """012: an empty file.  Must report: NotAnImageError naming the file."""
    path = str(tmp_path / "empty.img")
    open(path, "wb").close()
    with pytest.raises(NotAnImageError) as caught:
        open_image(path)
    assert_error_names(caught.value, path, "not a cowtree image")
    assert os.path.getsize(path) == 0, "a rejected open must not write to the file"


@pytest.mark.parametrize("magic", [False, True], ids=["013-random-file", "014-random-file-with-magic"])
def test_random_file_rejected(tmp_path, rng, magic):
    """013: a file of random bytes.  014: the same, starting with the superblock magic.

    Must report: NotAnImageError naming the file; the file is not changed.
    """
    path = str(tmp_path / "random.img")
    content = bytearray(rng.randbytes(1 << 20))
    if magic:
        for offset in ondisk.SUPERBLOCK_OFFSETS:
            content[offset:offset + 8] = ondisk.MAGIC
    with open(path, "wb") as out:
        out.write(content)
    with pytest.raises(NotAnImageError) as caught:
        open_image(path, writable=True)
    assert_error_names(caught.value, path, "not a cowtree image")
    with open(path, "rb") as image:
        assert image.read() == bytes(content)


def test_015_random_byte_flips(small_image, tmp_path, rng):
    """015: one inverted byte at random offsets anywhere in the image.

    Must report: in a node, an error naming the node; in a data block, an
    error naming the block and the inode; in a superblock copy, a fall-back
    to the other copy; in free space, nothing, and all data reads back.
    """
    seen = set()
    for _ in range(120):
        offset = rng.randrange(small_image.image_bytes)
        kind = small_image.what_is_at(offset)
        seen.add(kind[0])
        path = small_image.damaged_copy(tmp_path, offset)
        label = f"byte {offset} ({kind})"
        if kind[0] == "node":
            assert_reports_damage(path, small_image.model, (f"block {kind[1]}",))
        elif kind[0] == "data":
            _, block, ino = kind
            volume = open_image(path)
            try:
                with pytest.raises(CorruptionError) as caught:
                    live(volume).read(ino, 0, len(small_image.model.inodes[ino].data))
                assert_error_names(caught.value, f"at {block}", f"inode {ino}")
            finally:
                volume.close()
        elif kind[0] == "superblock":
            volume = open_image(path)
            try:
                expected = small_image.generation if kind[1] != small_image.generation % 2 else \
                    small_image.previous_generation
                assert volume.generation == expected, label
            finally:
                volume.close()
        else:
            volume = open_image(path)
            try:
                assert_matches(live(volume), small_image.model, label)
                assert check_volume(volume).problems == [], label
            finally:
                volume.close()
    assert "node" in seen


def test_016_node_from_another_image(small_image, tmp_path):
    """016: a node replaced by the node at the same address of another image.

    The other image is built by the same steps, so it has a valid node with
    a valid checksum at the same address.  Must report: CorruptionError
    naming the block and saying it belongs to another image.
    """
    other = SmallImage(tmp_path)
    shared = sorted(set(small_image.nodes) & set(other.nodes))
    assert shared, "the two images must place some node at the same address"
    for address, _owner in shared:
        path = str(tmp_path / "mixed.img")
        image = bytearray(small_image.pristine)
        image[address:address + 4096] = other.pristine[address:address + 4096]
        assert image != bytearray(small_image.pristine)
        with open(path, "wb") as out:
            out.write(image)
        assert_reports_damage(path, small_image.model, (f"block {address}", "another image"))


def test_017_lost_node_write(tmp_path):
    """017: a node write lost: the block still holds an older node once written at that address.

    The old node's checksum and address are valid.  Must report:
    CorruptionError naming the block and the generation mismatch.
    """
    path = str(tmp_path / "lost.img")
    volume = mkfs(path, nodesize=4096)
    fs = live(volume)
    for index in range(40):
        inode = fs.mknod(ROOT, b"f%02d" % index, 0o100644)
        fs.write(inode.ino, 0, b"x" * 100)
    volume.commit()
    with open(path, "rb") as image:
        before = image.read()
    # Several rounds of changes, until a node address is reused with a newer generation.
    reused = None
    for round_index in range(20):
        for index in range(0, 40, 3):
            fs.write(fs.lookup(ROOT, b"f%02d" % index), 0, b"round %d" % round_index)
        volume.commit()
        with open(path, "rb") as image:
            after = image.read()
        for key, value in volume.extent_tree.items():
            if key[1] != ondisk.EXTENT_ITEM or EXTENT.unpack_from(value)[2] != ondisk.EXTENT_FLAG_TREE_BLOCK:
                continue
            address = key[0]
            old = before[address:address + 4096]
            if old[4:8] == ondisk.NODE_MAGIC.to_bytes(4, "little") and old != after[address:address + 4096]:
                reused = address
                break
        if reused is not None:
            break
    volume.close()
    assert reused is not None, "no node address was reused; the allocator never reuses freed blocks?"

    damaged = bytearray(after)
    damaged[reused:reused + 4096] = before[reused:reused + 4096]
    with open(path, "wb") as out:
        out.write(damaged)
    try:
        volume = open_image(path)
    except CorruptionError as exc:
        assert_error_names(exc, f"block {reused}", "generation")
        return
    try:
        report = check_volume(volume)
        problems = [str(p) for p in report.problems if f"block {reused}" in str(p)]
        assert problems, report.problems
        assert "generation" in problems[0]
    finally:
        volume.close()
