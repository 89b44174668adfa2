"""Snapshots, writable clones, rollback, reflinks and space accounting."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cowtree import ondisk
from cowtree import subvolume as sv
from cowtree.blockdev import ImageFile, RecordingDevice
from cowtree.check import check_volume
from cowtree.errors import Exists, NotFound, ReadOnly
from cowtree.image import live, mkfs, open_image
from cowtree.transaction import CrashPoint, Volume

from treeutil import read_all

ROOT = ondisk.ROOT_DIR_INO


def fill(fs, count: int, size: int = 3000, prefix: bytes = b"f") -> list[int]:
    inos = []
    for i in range(count):
        inode = fs.mknod(ROOT, prefix + b"%05d" % i, 0o100644)
        fs.write(inode.ino, 0, (b"%d," % i) * (size // 4))
        inos.append(inode.ino)
    return inos


def recording(path: str) -> Volume:
    return Volume.open(path, writable=True, device=RecordingDevice(ImageFile(path, True)))


def node_writes(volume, owner: int | None = None) -> int:
    """Return the nodes written so far (superblocks excluded), of one tree when owner is given."""
    count = 0
    for entry in volume.dev.log:
        if entry[0] != "write" or entry[1] < ondisk.FIRST_ALLOC:
            continue
        for start in range(0, len(entry[2]), volume.nodesize):
            header = ondisk.NODE_HEADER_CODEC.unpack_from(entry[2], start)
            if header[1] != ondisk.NODE_MAGIC:
                continue
            if owner is None or header[5] == owner:
                count += 1
    return count


def test_snapshot_cost_independent_of_size(tmp_path):
    written = []
    for files in (50, 500, 5000):
        path = str(tmp_path / f"s{files}.img")
        volume = mkfs(path, nodesize=4096)
        fill(live(volume), files, size=200)
        volume.commit()
        volume.close()
        volume = recording(path)
        volume.strict = False
        before = volume.bytes_used
        sv.create_snapshot(volume, b"snap")
        written.append((node_writes(volume), volume.bytes_used - before))
        volume.close()
    # One root copy, plus the paths of the root and extent trees it touched.
    counts = [w for w, _ in written]
    assert max(counts) - min(counts) <= 4, written
    assert max(counts) <= 12, written


def test_change_after_snapshot_copies_one_path(make_image):
    path, volume, fs = make_image(nodesize=4096)
    inos = fill(fs, 2000, size=100)
    volume.commit()
    sv.create_snapshot(volume, b"before")
    volume.close()
    volume = recording(path)
    volume.strict = False
    fs = live(volume)
    depth = volume.tree(ondisk.FS_TREE_ID).level + 1
    fs.write(inos[1234], 0, b"changed")
    volume.commit()
    # Exactly one root-to-leaf path of the filesystem tree is copied.  The
    # extent tree also changes: each copied shared node adds a reference to
    # each of its children, as lazy reference counting does.
    assert node_writes(volume, ondisk.FS_TREE_ID) == depth
    snap = sv.open_filesystem(volume, b"before")
    assert snap.read(snap.resolve(b"/f01234"), 0, 8) == b"1234,123"
    assert fs.read(inos[1234], 0, 8) == b"changed3"
    volume.close()


def test_snapshot_is_read_only(make_image):
    _, volume, fs = make_image()
    fill(fs, 3)
    sub = sv.create_snapshot(volume, b"ro")
    assert sub.tree_id == ondisk.FIRST_SUBVOL_ID
    snap = sv.open_filesystem(volume, b"ro")
    with pytest.raises(ReadOnly, match="Read-only file system"):
        snap.write(snap.resolve(b"/f00000"), 0, b"x")
    with pytest.raises(ReadOnly):
        snap.mknod(ROOT, b"new", 0o100644)


def test_snapshot_name_errors(make_image):
    _, volume, fs = make_image()
    sv.create_snapshot(volume, b"one")
    with pytest.raises(Exists):
        sv.create_snapshot(volume, b"one")
    with pytest.raises(NotFound):
        sv.open_filesystem(volume, b"missing")
    with pytest.raises(NotFound):
        sv.delete_subvolume(volume, b"missing")
    for bad in (b"", b"a/b", b"a:b", b"a@b", b"."):
        with pytest.raises(OSError):
            sv.create_snapshot(volume, bad)


def test_snapshot_identity_stored(make_image):
    _, volume, _ = make_image()
    first = sv.create_snapshot(volume, b"one")
    second = sv.create_snapshot(volume, b"two", source=b"one")
    live_sub = sv.find(volume, None)
    assert first.identity.stored
    assert second.identity.stored
    assert not live_sub.identity.stored
    assert len({live_sub.identity.uuid, first.identity.uuid, second.identity.uuid}) == 3
    assert first.identity.parent_uuid == live_sub.identity.uuid
    assert second.identity.parent_uuid == first.identity.uuid
    assert first.identity.received_uuid == sv.ZERO_UUID
    assert uuid.UUID(bytes=first.identity.uuid).version == 4
    assert first.stream_identity == (first.identity.uuid, first.item.created_gen)


def test_identity_derived_without_item(make_image, reopen):
    _, volume, _ = make_image()
    sub = sv.create_snapshot(volume, b"old")
    # An image made before the SUBVOL_UUID item existed has no such item.
    volume.root_tree.delete((sub.tree_id, ondisk.SUBVOL_UUID, 0))
    volume.commit()
    volume, _ = reopen(volume, writable=False)
    derived = sv.find(volume, b"old").identity
    assert not derived.stored
    name = f"subvolume {sub.tree_id} {sub.item.created_gen} {sub.item.created_ns}"
    assert derived.uuid == uuid.uuid5(uuid.UUID(bytes=volume.uuid), name).bytes
    volume, _ = reopen(volume, writable=False)
    assert sv.find(volume, b"old").identity.uuid == derived.uuid
    assert check_volume(volume).problems == []


def test_delete_drops_identity(make_image):
    _, volume, _ = make_image()
    sub = sv.create_snapshot(volume, b"gone")
    sv.delete_subvolume(volume, b"gone")
    assert volume.root_tree.get((sub.tree_id, ondisk.SUBVOL_UUID, 0)) is None


def test_writable_clone_changes_independently(make_image):
    _, volume, fs = make_image(nodesize=4096)
    inos = fill(fs, 300)
    sv.create_snapshot(volume, b"clone", writable=True)
    clone = sv.open_filesystem(volume, b"clone")
    clone.write(clone.resolve(b"/f00007"), 0, b"CLONE")
    clone.unlink(ROOT, b"f00008")
    fs.write(inos[9], 0, b"LIVE")
    volume.commit()
    assert fs.read(inos[7], 0, 5) == b"7,7,7"
    assert fs.resolve(b"/f00008") == inos[8]
    assert clone.read(clone.resolve(b"/f00007"), 0, 5) == b"CLONE"
    assert clone.read(clone.resolve(b"/f00009"), 0, 4) == b"9,9,"
    with pytest.raises(NotFound):
        clone.resolve(b"/f00008")


def test_rollback_restores_snapshot(make_image, reopen):
    _, volume, fs = make_image(nodesize=4096)
    inos = fill(fs, 200)
    sv.create_snapshot(volume, b"good")
    fs.write(inos[0], 0, b"bad")
    fs.unlink(ROOT, b"f00001")
    fs.mknod(ROOT, b"extra", 0o100644)
    volume.commit()
    sv.rollback(volume, b"good")
    volume, fs = reopen(volume)
    assert fs.read(fs.resolve(b"/f00000"), 0, 4) == b"0,0,"
    assert fs.resolve(b"/f00001") == inos[1]
    with pytest.raises(NotFound):
        fs.resolve(b"/extra")
    assert not check_volume(volume).problems


def test_reflink_space_accounting(make_image):
    _, volume, fs = make_image()
    fresh = volume.bytes_used
    big = fs.mknod(ROOT, b"big", 0o100644)
    data = os.urandom(16 << 20)
    for offset in range(0, len(data), 4 << 20):
        fs.write(big.ino, offset, data[offset:offset + (4 << 20)])
    volume.commit()
    after_file = volume.bytes_used
    copies = []
    for i in range(4):
        copy = fs.mknod(ROOT, b"copy%d" % i, 0o100644)
        fs.clone_file(fs, big.ino, copy.ino)
        copies.append(copy.ino)
    volume.commit()
    metadata = volume.bytes_used - after_file
    assert metadata <= 8 * volume.nodesize
    fs.write(copies[0], 8192, b"z" * 4096)
    volume.commit()
    # One data block, plus at most a node or two for the split item.
    grown = volume.bytes_used - after_file - metadata
    assert 4096 <= grown <= 4096 + 2 * volume.nodesize
    assert read_all(fs, big.ino) == data
    assert read_all(fs, copies[1]) == data
    assert fs.read(copies[0], 8192, 4096) == b"z" * 4096
    sv.create_snapshot(volume, b"snap")
    for name in (b"big", b"copy0", b"copy1", b"copy2", b"copy3"):
        fs.unlink(ROOT, name)
    volume.commit()
    assert volume.bytes_used > len(data)  # the snapshot still holds the data
    sv.delete_subvolume(volume, b"snap")
    assert volume.bytes_used <= fresh + 2 * volume.nodesize
    assert not check_volume(volume).problems


def test_usage_exclusive_and_shared(make_image):
    _, volume, fs = make_image(nodesize=4096)
    inos = fill(fs, 100, size=8192)
    sv.create_snapshot(volume, b"s")
    counter = sv.UsageCounter(volume)
    live_usage = counter.subvolume(ondisk.FS_TREE_ID)
    assert live_usage.shared > 0
    assert live_usage.exclusive <= 2 * volume.nodesize
    fs.write(inos[3], 0, os.urandom(8192))
    volume.commit()
    counter = sv.UsageCounter(volume)
    changed = counter.path(fs, inos[3])
    assert changed.exclusive == 8192
    assert changed.shared == 0
    other = counter.path(fs, inos[4])
    assert other.shared == fs.get_inode(inos[4]).nbytes > 0


@pytest.mark.slow
def test_thousand_snapshots_delete_in_any_order(make_image, rng):
    _, volume, fs = make_image(nodesize=4096)
    volume.strict = False
    inos = fill(fs, 300)
    volume.commit()
    baseline = volume.bytes_used
    for i in range(1000):
        if i % 100 == 0:
            fs.write(inos[i // 100], 0, b"gen %d" % i)
        sv.create_snapshot(volume, b"s%04d" % i)
    subs = sv.list_subvolumes(volume)
    assert len(subs) == 1001
    assert not check_volume(volume).problems
    names = [b"s%04d" % i for i in range(1000)]
    rng.shuffle(names)
    for name in names:
        sv.delete_subvolume(volume, name)
    assert len(sv.list_subvolumes(volume)) == 1
    report = check_volume(volume)
    assert not report.problems
    assert volume.bytes_used <= baseline + 4 * volume.nodesize


def test_crash_during_drop_resumes(make_image, reopen):
    path, volume, fs = make_image(nodesize=4096)
    inos = fill(fs, 3000, size=300)
    sv.create_snapshot(volume, b"keep")
    sv.create_snapshot(volume, b"doomed", writable=True)
    doomed = sv.open_filesystem(volume, b"doomed")
    for i in range(0, 3000, 3):
        doomed.write(doomed.resolve(b"/f%05d" % i), 0, b"doomed data")
    volume.commit()
    commits = []

    def crash_after_three(step):
        if step == "after-commit":
            commits.append(step)
            if len(commits) == 3:
                raise CrashPoint("power cut")

    old_batch = sv.DROP_BATCH
    sv.DROP_BATCH = 50
    try:
        volume.crash_hook = crash_after_three
        with pytest.raises(CrashPoint):
            sv.delete_subvolume(volume, b"doomed")
    finally:
        sv.DROP_BATCH = old_batch
    volume.crash_hook = None
    volume, fs = reopen(volume)
    pending = [sub for sub in sv.list_subvolumes(volume, include_deleting=True) if sub.deleting]
    assert len(pending) == 1
    assert pending[0].item.drop_objectid or pending[0].item.drop_type or pending[0].item.drop_offset
    sv.drop_pending(volume)
    assert not [sub for sub in sv.list_subvolumes(volume, include_deleting=True) if sub.deleting]
    assert not check_volume(volume).problems
    keep = sv.open_filesystem(volume, b"keep")
    for i in (0, 3, 1500, 2997, 2999):
        expected = (b"%d," % i) * 75
        assert read_all(keep, keep.resolve(b"/f%05d" % i)) == expected
        assert read_all(fs, inos[i]) == expected


class SnapshotMachine(RuleBasedStateMachine):
    """Random file changes, snapshots, clones, rollbacks and reflinks against a model.

    Files live in the root directory of each subvolume.  The model keeps a
    frozen {name: bytes} per snapshot; every subvolume must read back its
    own model after every step, and strict mode checks reference counts at
    every commit.
    """

    names = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
    snaps = st.sampled_from([b"s1", b"s2", b"s3", b"s4"])

    @initialize()
    def setup(self):
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "model.img")
        self.volume = mkfs(self.path, nodesize=4096)
        self.models = {None: {}}          # subvolume name -> {file name: bytes}
        self.writable = {None: True}

    def teardown(self):
        self.volume.close()
        self.dir.cleanup()

    def fs(self, name):
        return sv.open_filesystem(self.volume, name)

    @rule(target_sub=st.sampled_from([None, b"s1", b"s2", b"s3", b"s4"]), name=names,
          offset=st.integers(0, 20000), length=st.integers(1, 9000), byte=st.integers(0, 255))
    def write(self, target_sub, name, offset, length, byte):
        if target_sub not in self.models or not self.writable[target_sub]:
            return
        fs = self.fs(target_sub)
        model = self.models[target_sub]
        try:
            ino = fs.resolve(b"/" + name)
        except NotFound:
            ino = fs.mknod(ROOT, name, 0o100644).ino
            model[name] = b""
        data = bytes([byte]) * length
        fs.write(ino, offset, data)
        old = model[name]
        model[name] = old[:offset].ljust(offset, b"\0") + data + old[offset + length:]

    @rule(name=names, size=st.integers(0, 30000))
    def truncate(self, name, size):
        fs = self.fs(None)
        if name not in self.models[None]:
            return
        fs.truncate(fs.resolve(b"/" + name), size)
        old = self.models[None][name]
        self.models[None][name] = old[:size].ljust(size, b"\0")

    @rule(name=names)
    def unlink(self, name):
        if name in self.models[None]:
            self.fs(None).unlink(ROOT, name)
            del self.models[None][name]

    @rule(src=names, dst=names)
    def reflink(self, src, dst):
        model = self.models[None]
        if src not in model or src == dst:
            return
        fs = self.fs(None)
        if dst not in model:
            fs.mknod(ROOT, dst, 0o100644)
        fs.clone_file(fs, fs.resolve(b"/" + src), fs.resolve(b"/" + dst))
        model[dst] = model[src]

    @rule(snap=snaps, writable=st.booleans(), from_snap=st.sampled_from([None, b"s1", b"s2"]))
    def snapshot(self, snap, writable, from_snap):
        if snap in self.models or from_snap not in self.models:
            return
        sv.create_snapshot(self.volume, snap, source=from_snap, writable=writable)
        self.models[snap] = dict(self.models[from_snap])
        self.writable[snap] = writable

    @rule(snap=snaps)
    def delete(self, snap):
        if snap not in self.models:
            return
        sv.delete_subvolume(self.volume, snap)
        del self.models[snap]
        del self.writable[snap]

    @rule(snap=snaps)
    def rollback(self, snap):
        if snap not in self.models:
            return
        sv.rollback(self.volume, snap)
        self.models[None] = dict(self.models[snap])

    @rule()
    def commit(self):
        self.volume.commit()

    @precondition(lambda self: True)
    @rule()
    def reopen(self):
        self.volume.commit()
        self.volume.close()
        self.volume = open_image(self.path, writable=True)

    @invariant()
    def every_subvolume_reads_its_model(self):
        for sub, model in self.models.items():
            fs = self.fs(sub)
            names = {name for _, name, _, _ in fs.readdir(ROOT)}
            assert names == set(model), (sub, names, set(model))
            for name, content in model.items():
                assert read_all(fs, fs.resolve(b"/" + name)) == content, (sub, name)


TestSnapshotMachine = SnapshotMachine.TestCase
