"""The filesystem driven by random operations and compared with a model.

Each step applies one operation through :class:`fsmodel.Driver`, which
checks the engine's outcome (or its error) against the model; after every
step the whole filesystem is compared with the model.  Every commit runs
the engine's checker, and a frozen copy of the model is kept per committed
generation: abort and close-and-reopen must return exactly to the model of
the last committed generation.

Write offsets and lengths are drawn around the inline limit and around
4 KiB block boundaries, and past the end of the file, so that inline data,
partial blocks, extent splits and holes all occur.  fallocate draws from
the same offsets and lengths in each supported mode, and a seek step checks
that SEEK_DATA and SEEK_HOLE skip only bytes that read as zeros.  Half of
the runs use 4096-byte nodes so the trees grow several levels deep.
"""

from __future__ import annotations

import random
import shutil
import tempfile

import pytest
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cowtree import ondisk
from cowtree.check import check_volume
from cowtree.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, XATTR_FLAG_CREATE
from cowtree.image import live, mkfs, open_image

from fsmodel import ROOT, Driver, FsModel, assert_matches

NAMES = [b"a", b"b", b"c", b"dir", b"long-" + b"n" * 40]
XATTR_NAMES = [b"user.one", b"user.two", b"trusted.x"]
BLOCK = ondisk.BLOCK_SIZE

names = st.sampled_from(NAMES)
lengths = st.sampled_from([1, 7, 100, 973, 974, 975, 2048, 4045, 4096, 4097, 5000, 8192, 12000, 20000])
jitter = st.integers(min_value=-3, max_value=3)


class FileSystemMachine(RuleBasedStateMachine):
    """One image's live filesystem against FsModel."""

    @initialize(nodesize=st.sampled_from([4096, 16384]))
    def create_image(self, nodesize):
        self.directory = tempfile.mkdtemp(prefix="cowtree-fs-")
        self.path = f"{self.directory}/fs.img"
        self.volume = mkfs(self.path, nodesize=nodesize)
        self.fs = live(self.volume)
        root_perm = self.fs.get_inode(ROOT).mode & 0o7777
        self.driver = Driver(self.fs, FsModel(root_perm))
        self.generations = {self.volume.generation: self.driver.model.copy()}
        event(f"node size {nodesize}")

    def teardown(self):
        if hasattr(self, "volume"):
            self.volume.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def model(self) -> FsModel:
        return self.driver.model

    def last_committed(self) -> FsModel:
        return self.generations[self.volume.generation]

    # -- namespace ------------------------------------------------------------

    @rule(data=st.data(), name=names)
    def create(self, data, name):
        directory = data.draw(st.sampled_from(self.model.directories()), label="directory")
        self.driver.create(directory, name)

    @rule(data=st.data(), name=names)
    def mkdir(self, data, name):
        directory = data.draw(st.sampled_from(self.model.directories()), label="directory")
        self.driver.mkdir(directory, name)

    @rule(data=st.data(), name=names, link_target=st.binary(min_size=1, max_size=120).filter(lambda t: b"\0" not in t))
    def symlink(self, data, name, link_target):
        directory = data.draw(st.sampled_from(self.model.directories()), label="directory")
        self.driver.symlink(directory, name, link_target)

    @rule(data=st.data(), name=names, extra=st.sampled_from([0, 1]))
    def symlink_at_limit(self, data, name, extra):
        """A target of exactly the maximum length is stored; one byte more is rejected."""
        directory = data.draw(st.sampled_from(self.model.directories()), label="directory")
        limit = min(ondisk.SYMLINK_MAX, self.fs.inline_max)
        self.driver.symlink(directory, name, b"t" * (limit + extra))

    @rule(data=st.data(), count=st.integers(min_value=10, max_value=120), size=st.sampled_from([0, 50, 5000]))
    def populate(self, data, count, size):
        """Create many files in one directory, so that the tree needs several leaves."""
        directory = data.draw(st.sampled_from(self.model.directories()), label="directory")
        for index in range(count):
            name = b"bulk%04d" % index
            if name in self.model.entries[directory]:
                continue
            inode = self.driver.create(directory, name)
            if size:
                self.driver.write(inode.ino, 0, bytes([index % 256]) * size)

    @precondition(lambda self: self.model.names())
    @rule(data=st.data(), name=names)
    def link(self, data, name):
        source_dir, source_name = data.draw(st.sampled_from(self.model.names()), label="source")
        ino = self.model.entries[source_dir][source_name]
        directory = data.draw(st.sampled_from(self.model.directories()), label="directory")
        self.driver.link(ino, directory, name)

    @precondition(lambda self: self.model.names())
    @rule(data=st.data())
    def unlink(self, data):
        directory, name = data.draw(st.sampled_from(self.model.names()), label="entry")
        self.driver.unlink(directory, name)

    @precondition(lambda self: self.model.names())
    @rule(data=st.data())
    def rmdir(self, data):
        directory, name = data.draw(st.sampled_from(self.model.names()), label="entry")
        self.driver.rmdir(directory, name)

    @precondition(lambda self: self.model.names())
    @rule(data=st.data(), new_name=names)
    def rename(self, data, new_name):
        """Rename to a free name, over a file, over a directory, or into another directory."""
        old_dir, old_name = data.draw(st.sampled_from(self.model.names()), label="source")
        new_dir = data.draw(st.sampled_from(self.model.directories()), label="target directory")
        self.driver.rename(old_dir, old_name, new_dir, new_name)

    @precondition(lambda self: len(self.model.names()) >= 2)
    @rule(data=st.data())
    def rename_over_existing(self, data):
        """Rename one existing entry onto another existing entry."""
        old_dir, old_name = data.draw(st.sampled_from(self.model.names()), label="source")
        new_dir, new_name = data.draw(st.sampled_from(self.model.names()), label="target")
        self.driver.rename(old_dir, old_name, new_dir, new_name)

    @precondition(lambda self: len(self.model.names()) >= 2)
    @rule(data=st.data())
    def exchange(self, data):
        """Swap two existing entries, possibly a file with a directory, across directories."""
        old_dir, old_name = data.draw(st.sampled_from(self.model.names()), label="source")
        new_dir, new_name = data.draw(st.sampled_from(self.model.names()), label="target")
        self.driver.exchange(old_dir, old_name, new_dir, new_name)

    # -- file data --------------------------------------------------------------

    def _offset(self, data, ino) -> int:
        size = len(self.model.inodes[ino].data)
        inline = self.fs.inline_max
        base = data.draw(st.sampled_from([0, inline, BLOCK, 2 * BLOCK, 3 * BLOCK, size, size + BLOCK + 5,
                                          size + 3 * BLOCK]), label="offset base")
        return max(0, base + data.draw(jitter, label="offset jitter"))

    @precondition(lambda self: self.model.files())
    @rule(data=st.data(), length=lengths, seed=st.integers(min_value=0, max_value=2**32 - 1),
          zeros=st.booleans())
    def write(self, data, length, seed, zeros):
        ino = data.draw(st.sampled_from(self.model.files()), label="file")
        offset = self._offset(data, ino)
        payload = bytes(length) if zeros else random.Random(seed).randbytes(length)
        self.driver.write(ino, offset, payload)

    @precondition(lambda self: self.model.files())
    @rule(data=st.data())
    def read_range(self, data):
        """A read of part of a file returns that part, and nothing past the end of the file."""
        ino = data.draw(st.sampled_from(self.model.files()), label="file")
        content = self.model.inodes[ino].data
        offset = self._offset(data, ino)
        size = data.draw(st.sampled_from([0, 1, 100, BLOCK - 1, BLOCK, 3 * BLOCK + 5]), label="size")
        assert self.fs.read(ino, offset, size) == content[offset:offset + size]

    @precondition(lambda self: self.model.files())
    @rule(data=st.data())
    def truncate(self, data):
        ino = data.draw(st.sampled_from(self.model.files()), label="file")
        size = data.draw(st.sampled_from([0, 1, self.fs.inline_max, self.fs.inline_max + 1, BLOCK - 1, BLOCK,
                                          BLOCK + 1, 3 * BLOCK + 17, 40000]), label="size")
        self.driver.truncate(ino, size)

    @precondition(lambda self: self.model.files())
    @rule(data=st.data(), length=lengths,
          mode=st.sampled_from([0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]))
    def fallocate(self, data, length, mode):
        ino = data.draw(st.sampled_from(self.model.files()), label="file")
        self.driver.fallocate(ino, mode, self._offset(data, ino), length)

    @precondition(lambda self: self.model.files())
    @rule(data=st.data())
    def seek(self, data):
        ino = data.draw(st.sampled_from(self.model.files()), label="file")
        self.driver.seek(ino, self._offset(data, ino))

    @precondition(lambda self: self.model.files())
    @rule(data=st.data(), perm=st.sampled_from([0o600, 0o644, 0o4755, 0o000]))
    def chmod(self, data, perm):
        ino = data.draw(st.sampled_from(self.model.files()), label="file")
        self.driver.chmod(ino, perm)

    # -- xattrs -----------------------------------------------------------------

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES), size=st.sampled_from([0, 5, 200, 700]))
    def setxattr(self, data, name, size):
        ino = data.draw(st.sampled_from(sorted(self.model.inodes)), label="inode")
        self.driver.setxattr(ino, name, bytes([len(name)]) * size)

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, data, name):
        ino = data.draw(st.sampled_from(sorted(self.model.inodes)), label="inode")
        self.driver.removexattr(ino, name)

    @precondition(lambda self: any(inode.xattrs for inode in self.model.inodes.values()))
    @rule(data=st.data())
    def setxattr_create_existing(self, data):
        """XATTR_FLAG_CREATE on an existing name fails and changes nothing."""
        ino = data.draw(st.sampled_from(sorted(i for i, inode in self.model.inodes.items() if inode.xattrs)))
        name = sorted(self.model.inodes[ino].xattrs)[0]
        with pytest.raises(FileExistsError):
            self.fs.setxattr(ino, name, b"ignored", XATTR_FLAG_CREATE)

    # -- transactions -----------------------------------------------------------

    @rule()
    def commit(self):
        generation = self.volume.commit()
        report = check_volume(self.volume)
        assert report.problems == [], "\n".join(map(str, report.problems))
        self.generations[generation] = self.model.copy()
        event(f"deepest tree after commit: level {self.fs.tree.level}")

    @rule()
    def abort(self):
        self.volume.abort()
        self.driver.model = self.last_committed().copy()

    @rule()
    def reopen(self):
        """Close without committing; the image must hold the last committed model."""
        expected_generation = self.volume.generation
        self.volume.close()
        self.volume = open_image(self.path, writable=True)
        assert self.volume.generation == expected_generation
        self.fs = live(self.volume)
        self.driver.fs = self.fs
        self.driver.model = self.last_committed().copy()

    @invariant()
    def matches_model(self):
        if hasattr(self, "volume"):
            assert_matches(self.fs, self.model)


# Each example is a fresh image and a few dozen steps, so the machine runs
# five times the profile's examples with longer runs.
FileSystemMachine.TestCase.settings = settings(settings.default, max_examples=5 * settings.default.max_examples,
                                               stateful_step_count=2 * settings.default.stateful_step_count)
TestFileSystemStateful = pytest.mark.slow(FileSystemMachine.TestCase)


@pytest.mark.parametrize("directory_first", [False, True])
def test_exchange_file_with_directory_across_parents(make_image, directory_first):
    """Swapping a directory with a non-directory in another directory moves one link count between the parents."""
    _, volume, fs = make_image()
    driver = Driver(fs, FsModel(fs.get_inode(ROOT).mode & 0o7777))
    parent = driver.mkdir(ROOT, b"parent")
    driver.mkdir(parent.ino, b"child")
    driver.symlink(ROOT, b"link", b"target")
    if directory_first:
        driver.exchange(parent.ino, b"child", ROOT, b"link")
    else:
        driver.exchange(ROOT, b"link", parent.ino, b"child")
    assert_matches(fs, driver.model)
    assert fs.get_inode(ROOT).nlink == 4
    assert fs.get_inode(parent.ino).nlink == 2
    volume.commit()
    report = check_volume(volume)
    assert report.problems == [], "\n".join(map(str, report.problems))
