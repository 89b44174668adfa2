"""Send and receive in one process: full and incremental streams, the stream's size and cost, and
every way a receive must fail while leaving the image at its last commit."""

from __future__ import annotations

import dataclasses
import io
import os
import stat

import pytest
from hypothesis import given, strategies as st

from cowtree import ondisk, send
from cowtree import subvolume as sv
from cowtree.errors import Exists, InvalidArgument, NoSpaceError, NotFound, StreamError
from cowtree.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE, FileSystem
from cowtree.image import live, mkfs
from cowtree.stream import (ATTR_CODEC, CREATE_CODEC, END_CODEC, ENTRY_CODEC, HEADER_CODEC, RECORD_ATTR,
                            RECORD_CREATE, RECORD_END, RECORD_HEADER_CODEC, RECORD_LINK, RECORD_WRITE, WRITE_CODEC,
                            StreamHeader, StreamWriter)

from fsmodel import Driver, FsModel, assert_matches
from sendutil import (assert_clean, assert_same_subvolume, count_node_reads, image_state, receive_bytes,
                      record_type, reframe, send_bytes, split_stream)

ROOT = ondisk.ROOT_DIR_INO
MTIME_NS = 1_234_567_890_123_456_789


def mkfile(fs, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644) -> int:
    inode = fs.mknod(parent, name, stat.S_IFREG | mode)
    if data:
        fs.write(inode.ino, 0, data)
    return inode.ino


def build_tree(fs) -> dict:
    """Fill fs with every kind of inode and attribute a stream must carry; return some inode numbers."""
    inos = {}
    directory = fs.mkdir(ROOT, b"dir", 0o750)
    inos["dir"] = directory.ino
    inos["sub"] = fs.mkdir(directory.ino, b"sub", 0o700).ino
    inos["plain"] = mkfile(fs, directory.ino, b"plain.txt", b"plain contents\n", 0o640)
    inos["big"] = mkfile(fs, ROOT, b"big.bin", os.urandom(3 << 20) + b"tail")
    inos["sparse"] = mkfile(fs, ROOT, b"sparse", b"head")
    fs.truncate(inos["sparse"], 64 << 20)
    fs.write(inos["sparse"], 32 << 20, b"x" * 5000)
    inos["empty"] = mkfile(fs, ROOT, b"empty")
    inos["blocks"] = mkfile(fs, directory.ino, b"blocks", bytes(range(256)) * 64 * 12)
    fs.link(inos["plain"], ROOT, b"plain-link")
    fs.link(inos["plain"], inos["sub"], b"plain-link-2")
    fs.symlink(ROOT, b"rel-link", b"dir/plain.txt")
    fs.symlink(ROOT, b"dangling", b"/nonexistent/target")
    inos["fifo"] = fs.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o644).ino
    inos["tty"] = fs.mknod(ROOT, b"tty", stat.S_IFCHR | 0o600, rdev=os.makedev(4, 1)).ino
    for name in (b"caf\xe9", b"new\nline", b"-dash", b"colon:name"):
        mkfile(fs, directory.ino, name, name)
    fs.setxattr(inos["plain"], b"user.comment", b"kept")
    fs.setxattr(inos["dir"], b"user.dir", b"on a directory")
    fs.setxattr(inos["big"], b"user.large", b"v" * 500)
    fs.setattr(inos["plain"], uid=1000, gid=1001, atime_ns=MTIME_NS - 7, mtime_ns=MTIME_NS)
    fs.setattr(ROOT, mode=0o711, mtime_ns=MTIME_NS + 1)
    return inos


def change_tree(fs, inos: dict) -> None:
    """Make every kind of change an incremental stream must carry."""
    directory = inos["dir"]
    fs.write(inos["big"], 1 << 20, b"changed in the middle" * 200)
    fs.write(inos["blocks"], 5000, b"y" * 10)
    fs.truncate(inos["blocks"], 9000)
    fs.fallocate(inos["sparse"], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 32 << 20, 4096)
    fs.truncate(inos["sparse"], 80 << 20)
    fs.rename(ROOT, b"dir", ROOT, b"renamed-dir")
    newer = fs.mkdir(ROOT, b"newer", 0o755)
    # A directory moves into a directory created after it, so its number is the smaller.
    fs.rename(directory, b"sub", newer.ino, b"moved-sub")
    fs.unlink(ROOT, b"plain-link")
    fs.link(inos["blocks"], newer.ino, b"blocks-link")
    fs.setxattr(inos["plain"], b"user.comment", b"changed value")
    fs.setxattr(inos["plain"], b"user.added", b"new")
    fs.removexattr(inos["dir"], b"user.dir")
    fs.unlink(ROOT, b"rel-link")
    fs.symlink(ROOT, b"rel-link", b"renamed-dir/blocks")
    replacement = mkfile(fs, ROOT, b"replacement", b"replaces the fifo")
    fs.rename(ROOT, b"replacement", ROOT, b"fifo")
    fs.rename(directory, b"caf\xe9", directory, b"-dash", RENAME_EXCHANGE)
    fs.unlink(directory, b"new\nline")
    removed_dir = fs.mkdir(ROOT, b"gone", 0o755)
    mkfile(fs, removed_dir.ino, b"file", b"inside")
    fs.unlink(removed_dir.ino, b"file")
    fs.rmdir(ROOT, b"gone")
    fs.setattr(inos["empty"], mode=0o600, uid=7, gid=8, mtime_ns=MTIME_NS + 2)
    fs.write(replacement, 0, b"R")
    mkfile(fs, newer.ino, b"fresh", os.urandom(10000))


def two_snapshots(make_image):
    """Return (volume, inos) of an image with snapshot s1 of build_tree and s2 after change_tree."""
    _, volume, fs = make_image()
    inos = build_tree(fs)
    volume.commit()
    sv.create_snapshot(volume, b"s1")
    change_tree(fs, inos)
    volume.commit()
    sv.create_snapshot(volume, b"s2")
    return volume, inos


# ---------------------------------------------------------------------------
# Streams that apply


@pytest.mark.parametrize("nodesize", [4096, 16384])
def test_full_stream_round_trip(make_image, nodesize):
    volume, _ = two_snapshots(make_image)
    _, target, _ = make_image(nodesize=nodesize)
    received = receive_bytes(target, send_bytes(volume, b"s1"))
    assert received.name == b"s1"
    assert received.readonly
    assert_same_subvolume(volume, b"s1", target, b"s1")
    assert_clean(target)


def test_incremental_stream_round_trip(make_image):
    volume, _ = two_snapshots(make_image)
    _, target, _ = make_image()
    receive_bytes(target, send_bytes(volume, b"s1"))
    received = receive_bytes(target, send_bytes(volume, b"s2", parent=b"s1"))
    assert_same_subvolume(volume, b"s2", target, b"s2")
    assert_same_subvolume(volume, b"s1", target, b"s1")
    assert received.identity.parent_uuid == sv.find(target, b"s1").identity.uuid
    assert received.stream_identity == sv.find(volume, b"s2").stream_identity
    assert_clean(target)


def test_stream_sent_on_from_copy(make_image):
    """A copy sends on as its origin would: a third image takes the copy's incremental stream."""
    volume, _ = two_snapshots(make_image)
    _, middle, _ = make_image()
    _, last, _ = make_image(nodesize=8192)
    receive_bytes(middle, send_bytes(volume, b"s1"))
    receive_bytes(middle, send_bytes(volume, b"s2", parent=b"s1"))
    receive_bytes(last, send_bytes(middle, b"s1"))
    receive_bytes(last, send_bytes(middle, b"s2", parent=b"s1"))
    assert_same_subvolume(volume, b"s2", last, b"s2")
    # The origin's own s1 is a parent for a stream of the copy's s2 too.
    _, other, _ = make_image()
    receive_bytes(other, send_bytes(volume, b"s1"))
    receive_bytes(other, send_bytes(middle, b"s2", parent=b"s1"))
    assert_same_subvolume(volume, b"s2", other, b"s2")
    assert_clean(last)


def test_stream_back_to_origin(make_image):
    """Changes made on a copy come back as an incremental stream on top of the origin's snapshot."""
    volume, _ = two_snapshots(make_image)
    _, copy, _ = make_image()
    receive_bytes(copy, send_bytes(volume, b"s1"))
    sv.create_snapshot(copy, b"work", source=b"s1", writable=True)
    work = sv.open_filesystem(copy, b"work")
    mkfile(work, ROOT, b"made-on-the-copy", b"from the copy")
    work.unlink(ROOT, b"empty")
    copy.commit()
    sv.create_snapshot(copy, b"back", source=b"work")
    received = receive_bytes(volume, send_bytes(copy, b"back", parent=b"s1"))
    assert received.identity.parent_uuid == sv.find(volume, b"s1").identity.uuid
    assert_same_subvolume(copy, b"back", volume, b"back")
    assert_clean(volume)


def test_parent_from_another_clone(make_image):
    """Inode numbers that name other inodes in the parent are deleted and created again."""
    _, volume, fs = make_image()
    build_tree(fs)
    volume.commit()
    sv.create_snapshot(volume, b"base")
    sv.create_snapshot(volume, b"clone", source=b"base", writable=True)
    clone = sv.open_filesystem(volume, b"clone")
    # Both sides hand out the same next inode numbers from here on.
    mkfile(clone, ROOT, b"same", b"the clone's file")
    clone.mkdir(ROOT, b"kind", 0o755)
    mkfile(fs, ROOT, b"same", b"the live filesystem's file")
    mkfile(fs, ROOT, b"kind", b"a file here")
    volume.commit()
    sv.create_snapshot(volume, b"from-clone", source=b"clone")
    sv.create_snapshot(volume, b"from-live")
    same_clone = sv.open_filesystem(volume, b"from-clone").resolve(b"/same")
    assert same_clone == sv.open_filesystem(volume, b"from-live").resolve(b"/same")
    _, target, _ = make_image()
    receive_bytes(target, send_bytes(volume, b"from-clone"))
    receive_bytes(target, send_bytes(volume, b"from-live", parent=b"from-clone"))
    assert_same_subvolume(volume, b"from-live", target, b"from-live")
    assert_clean(target)


def test_orphans_are_not_sent(make_image):
    _, volume, fs = make_image()
    orphan = mkfile(fs, ROOT, b"open-file", b"still open")
    fs.unlink(ROOT, b"open-file", keep_if_open=lambda ino: True)
    volume.commit()
    sv.create_snapshot(volume, b"with-orphan")
    assert fs.orphans() == [orphan]
    _, target, _ = make_image()
    receive_bytes(target, send_bytes(volume, b"with-orphan"))
    copy = sv.open_filesystem(target, b"with-orphan")
    with pytest.raises(NotFound):
        copy.get_inode(orphan)
    assert copy.orphans() == []


def test_receive_into_overlay(make_image, tmp_path):
    volume, _ = two_snapshots(make_image)
    base_path, base, base_fs = make_image()
    mkfile(base_fs, ROOT, b"in-the-base", b"base data" * 1000)
    base.commit()
    base.close()
    overlay = mkfs(str(tmp_path / "overlay.img"), base=base_path)
    try:
        receive_bytes(overlay, send_bytes(volume, b"s1"))
        receive_bytes(overlay, send_bytes(volume, b"s2", parent=b"s1"))
        assert_same_subvolume(volume, b"s2", overlay, b"s2")
        assert_clean(overlay)
        # An overlay's snapshot whose nodes lie in the base sends too.
        sv.create_snapshot(overlay, b"live-view")
        _, target, _ = make_image()
        receive_bytes(target, send_bytes(overlay, b"live-view"))
        assert_same_subvolume(overlay, b"live-view", target, b"live-view")
    finally:
        overlay.close()


# ---------------------------------------------------------------------------
# What an incremental stream costs


def test_incremental_stream_is_small(make_image):
    _, volume, fs = make_image()
    inos = [mkfile(fs, ROOT, b"file%05d" % index, os.urandom(4096)) for index in range(3000)]
    volume.commit()
    sv.create_snapshot(volume, b"s1")
    fs.write(inos[1234], 0, os.urandom(4096))
    volume.commit()
    sv.create_snapshot(volume, b"s2")
    full = send.send(volume, b"s2", io.BytesIO())
    out = io.BytesIO()
    stats = send.send(volume, b"s2", out, parent=b"s1")
    # One WRITE of the block, one ATTR, the header and END.
    assert stats.data_bytes == 4096
    assert stats.records == 3
    assert len(out.getvalue()) < 4096 + 512
    # Five passes of one root-to-leaf path on each side, against every node for a full send.
    depth = volume.tree(sv.find(volume, b"s2").tree_id).level + 1
    assert stats.node_reads <= 5 * 2 * (depth + 1), stats
    assert full.node_reads > 20 * stats.node_reads, (full, stats)


def test_sender_reads_few_nodes_from_disk(make_image, reopen):
    """Counted at the device, from a cold cache: an incremental send reads a handful of nodes."""
    _, volume, fs = make_image()
    inos = [mkfile(fs, ROOT, b"file%05d" % index, b"%d" % index) for index in range(5000)]
    volume.commit()
    sv.create_snapshot(volume, b"s1")
    fs.write(inos[4321], 0, b"changed")
    volume.commit()
    sv.create_snapshot(volume, b"s2")
    volume, _ = reopen(volume, writable=False)
    incremental = count_node_reads(volume, lambda: send.send(volume, b"s2", io.BytesIO(), parent=b"s1"))
    full = count_node_reads(volume, lambda: send.send(volume, b"s2", io.BytesIO()))
    assert incremental <= 20, incremental
    assert full > 10 * incremental, (full, incremental)


# ---------------------------------------------------------------------------
# Streams that must be rejected, leaving the image as it was


@pytest.fixture
def streams(make_image):
    """A source image's full stream of s1 and incremental stream s1 -> s2, and a target holding s1."""
    volume, _ = two_snapshots(make_image)
    full = send_bytes(volume, b"s1")
    incremental = send_bytes(volume, b"s2", parent=b"s1")
    _, target, _ = make_image()
    receive_bytes(target, full)
    return full, incremental, target


def fails_cleanly(target, data: bytes, match: str) -> StreamError:
    before = image_state(target)
    with pytest.raises((StreamError, Exists, NotFound), match=match) as info:
        receive_bytes(target, data)
    assert image_state(target) == before
    return info.value


def test_truncated_stream_rejected(streams, make_image):
    full, incremental, target = streams
    header, records = split_stream(incremental)
    cuts = [0, 5, len(header) - 1]
    position = len(header)
    for record in records:
        cuts.append(position)
        cuts.append(position + 7)
        cuts.append(position + len(record) - 1)
        position += len(record)
    for cut in cuts:
        fails_cleanly(target, incremental[:cut], "truncated stream|empty input|not a cowtree send stream")
    assert_clean(target)
    # A full stream cut at each record boundary into an empty image.
    _, empty, _ = make_image()
    header, records = split_stream(full)
    position = len(header)
    for record in records:
        fails_cleanly(empty, full[:position], "truncated stream")
        position += len(record)
    assert sv.list_subvolumes(empty) == [sv.find(empty, None)]
    assert_clean(empty)


def test_flipped_bytes_rejected(streams):
    _, incremental, target = streams
    positions = list(range(0, 120)) + list(range(120, len(incremental), 997)) + [len(incremental) - 1]
    for position in positions:
        damaged = bytearray(incremental)
        damaged[position] ^= 0x20
        fails_cleanly(target, bytes(damaged), "invalid stream|not a cowtree send stream|truncated stream|"
                                              "not supported|unknown flags")
    assert_clean(target)


def test_reordered_records_rejected(streams, make_image):
    full, incremental, target = streams
    header, records = split_stream(incremental)
    swapped = records[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    fails_cleanly(target, header + b"".join(swapped), "records out of order")
    # The last CREATE after the first LINK, which names an inode created
    # before, with sequence numbers rewritten: the phases give it away.
    header, records = split_stream(full)
    link = [i for i, record in enumerate(records) if record_type(record) == RECORD_LINK][0]
    assert record_type(records[link - 1]) == RECORD_CREATE
    records[link - 1], records[link] = records[link], records[link - 1]
    renumbered = [reframe(record, seq=seq + 1) for seq, record in enumerate(records)]
    _, empty, _ = make_image()
    fails_cleanly(empty, header + b"".join(renumbered), r"CREATE\) comes after the LINK records")


def test_unknown_record_type_rejected(streams):
    _, incremental, target = streams
    header, records = split_stream(incremental)
    records[0] = reframe(records[0], record_type=99)
    error = fails_cleanly(target, header + b"".join(records), "unknown type 99")
    assert "a newer cowtree" in str(error)


def test_record_after_end_rejected(streams):
    _, incremental, target = streams
    header, records = split_stream(incremental)
    assert record_type(records[-1]) == RECORD_END
    fails_cleanly(target, incremental + reframe(records[0], seq=len(records) + 1), "after the END record")


def test_missing_parent_rejected(streams, make_image):
    _, incremental, _ = streams
    _, empty, _ = make_image()
    fails_cleanly(empty, incremental, "its parent snapshot .* is not in")


def test_same_stream_twice_rejected(streams):
    full, incremental, target = streams
    fails_cleanly(target, full, "snapshot 's1' already exists")
    receive_bytes(target, incremental)
    fails_cleanly(target, incremental, "snapshot 's2' already exists")


def test_stream_received_under_another_name_rejected(streams):
    full, _, target = streams
    header, records = split_stream(full)
    fields = list(HEADER_CODEC.unpack_from(header))
    renamed = StreamHeader(fields[2], fields[3], fields[4], fields[5], fields[6], fields[7], b"again").encode()
    fails_cleanly(target, renamed + b"".join(records), "already received as 's1'")


def test_parent_with_other_content_rejected(streams):
    """An incremental stream checks link counts and sizes against the local parent."""
    _, incremental, target = streams
    parent = sv.find(target, b"s1")
    # Damage the received parent behind the read-only flag, as no command can.
    fs = FileSystem(target, parent.tree_id, readonly=False)
    fs.link(fs.resolve(b"/empty"), fs.resolve(b"/dir/sub"), b"unexpected")
    target.commit()
    error = fails_cleanly(target, incremental, "stream does not apply")
    assert "sent snapshot" in str(error)


def test_full_image_left_unchanged(make_image):
    volume, _ = two_snapshots(make_image)
    _, small, _ = make_image(size_limit=3 << 20)
    before = image_state(small)
    with pytest.raises(NoSpaceError):
        receive_bytes(small, send_bytes(volume, b"s1"))
    assert image_state(small) == before
    assert_clean(small)


def test_send_rejects_bad_snapshots(make_image):
    _, volume, _ = make_image()
    sv.create_snapshot(volume, b"clone", writable=True)
    sv.create_snapshot(volume, b"ro")
    with pytest.raises(InvalidArgument, match="'clone' is writable"):
        send_bytes(volume, b"clone")
    with pytest.raises(InvalidArgument, match="parent 'clone' is writable"):
        send_bytes(volume, b"ro", parent=b"clone")
    with pytest.raises(InvalidArgument, match="own parent"):
        send_bytes(volume, b"ro", parent=b"ro")
    with pytest.raises(NotFound, match="parent 'nosuch' not found"):
        send_bytes(volume, b"ro", parent=b"nosuch")


def test_end_record_counts_checked(streams):
    _, incremental, target = streams
    header, records = split_stream(incremental)
    count, total, uuid = END_CODEC.unpack_from(records[-1], RECORD_HEADER_CODEC.size)
    for wrong in ((count - 1, total, uuid), (count, total + 1, uuid)):
        end = records[-1][:RECORD_HEADER_CODEC.size] + END_CODEC.pack(*wrong)
        fails_cleanly(target, header + b"".join(records[:-1]) + reframe(end), "the END record counts")
    end = records[-1][:RECORD_HEADER_CODEC.size] + END_CODEC.pack(count, total, bytes(16))
    fails_cleanly(target, header + b"".join(records[:-1]) + reframe(end), "names another snapshot")


def hostile_stream(records: list, next_ino: int = 300) -> bytes:
    """Return a full stream of snapshot "evil" with the given (type, fixed part, tail) records."""
    out = io.BytesIO()
    writer = StreamWriter(out)
    uuid = os.urandom(16)
    writer.header(StreamHeader(0, uuid, 7, bytes(16), 0, next_ino, b"evil"))
    for record_type_, fixed, tail in records:
        writer.record(record_type_, fixed, tail)
    writer.end(uuid)
    return out.getvalue()


def attr(ino: int, mode: int, nlink: int, size: int = 0, seq: int = 2) -> tuple:
    return RECORD_ATTR, ATTR_CODEC.pack(ino, size, nlink, 0, 0, mode, 0, 0, seq, 0, 0, 0, 0), b""


def link(directory: int, index: int, ino: int, dtype: int, name: bytes) -> tuple:
    return RECORD_LINK, ENTRY_CODEC.pack(directory, index, ino, dtype, len(name)), name


@pytest.mark.parametrize("case, records, message", [
    ("symlink without target",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFLNK | 0o777, 0), b""),
      link(ROOT, 2, 257, ondisk.DT_LNK, b"l"), attr(ROOT, stat.S_IFDIR | 0o755, 2, 2, 3),
      attr(257, stat.S_IFLNK | 0o777, 1)], "no SYMLINK record"),
    ("index past the bound",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFREG | 0o644, 0), b""),
      link(ROOT, (1 << 64) - 1, 257, ondisk.DT_REG, b"f")], "outside"),
    ("inode left without a name",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFREG | 0o644, 0), b""),
      attr(257, stat.S_IFREG | 0o644, 0)], "without a name"),
    ("created inode without ATTR",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFREG | 0o644, 0), b""),
      link(ROOT, 2, 257, ondisk.DT_REG, b"f")], "have no ATTR record"),
    ("directory cycle",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFDIR | 0o755, 0), b""),
      (RECORD_CREATE, CREATE_CODEC.pack(258, stat.S_IFDIR | 0o755, 0), b""),
      link(257, 2, 258, ondisk.DT_DIR, b"b"), link(258, 2, 257, ondisk.DT_DIR, b"a"),
      attr(257, stat.S_IFDIR | 0o755, 3, 2, 3), attr(258, stat.S_IFDIR | 0o755, 3, 2, 3)], "cycle"),
    ("name with a slash",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFREG | 0o644, 0), b""),
      link(ROOT, 2, 257, ondisk.DT_REG, b"a/b")], "invalid name"),
    ("inode past next_ino",
     [(RECORD_CREATE, CREATE_CODEC.pack(400, stat.S_IFREG | 0o644, 0), b"")], r"outside \[257, 300\)"),
    ("write to a directory",
     [(RECORD_WRITE, WRITE_CODEC.pack(ROOT, 0), b"data")], "not a regular file"),
    ("second name for a directory",
     [(RECORD_CREATE, CREATE_CODEC.pack(257, stat.S_IFDIR | 0o755, 0), b""),
      link(ROOT, 2, 257, ondisk.DT_DIR, b"a"), link(ROOT, 3, 257, ondisk.DT_DIR, b"b")], "already has a name"),
], ids=lambda value: value if isinstance(value, str) and " " in value else "")
def test_hostile_stream_rejected(make_image, case, records, message):
    _, target, _ = make_image()
    fails_cleanly(target, hostile_stream(records), message)
    assert_clean(target)


# ---------------------------------------------------------------------------
# Random operations against the model

NAMES = st.sampled_from([b"a", b"b", b"c", b"dir", b"x" * 40])
# Offsets and sizes, often at or next to a block boundary, where extents split.
OFFSETS = st.one_of(st.integers(0, 30000), st.sampled_from([0, 1, 4095, 4096, 4097, 8192, 12287]))
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("create"), st.integers(0, 50), NAMES),
    st.tuples(st.just("mkdir"), st.integers(0, 50), NAMES),
    st.tuples(st.just("symlink"), st.integers(0, 50), NAMES, st.binary(min_size=1, max_size=30).map(
        lambda target: target.replace(b"\0", b"_"))),
    st.tuples(st.just("write"), st.integers(0, 50), OFFSETS, st.integers(1, 9000)),
    st.tuples(st.just("truncate"), st.integers(0, 50), OFFSETS),
    st.tuples(st.just("link"), st.integers(0, 50), st.integers(0, 50), NAMES),
    st.tuples(st.just("unlink"), st.integers(0, 50)),
    st.tuples(st.just("rename"), st.integers(0, 50), st.integers(0, 50), NAMES),
    st.tuples(st.just("exchange"), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.just("setxattr"), st.integers(0, 50), NAMES, st.binary(max_size=60)),
    st.tuples(st.just("removexattr"), st.integers(0, 50), NAMES),
    st.tuples(st.just("chmod"), st.integers(0, 50), st.integers(0, 0o7777)),
    st.tuples(st.just("punch"), st.integers(0, 50), OFFSETS, st.integers(1, 12000)),
), min_size=3, max_size=40)


def pick(items: list, index: int):
    return items[index % len(items)] if items else None


def apply_operation(driver: Driver, operation: tuple) -> None:
    """Apply one drawn operation through the driver, choosing targets among what the model has."""
    model = driver.model
    directories = model.directories()
    names = model.names()
    files = model.files()
    kind = operation[0]
    if kind in ("create", "mkdir", "symlink"):
        directory = pick(directories, operation[1])
        if operation[2] in model.entries[directory]:
            return
        if kind == "create":
            driver.create(directory, operation[2])
        elif kind == "mkdir":
            driver.mkdir(directory, operation[2])
        else:
            driver.symlink(directory, operation[2], operation[3])
    elif kind == "write" and files:
        driver.write(pick(files, operation[1]), operation[2], b"%d" % operation[3] * (operation[3] % 97 + 1))
    elif kind == "truncate" and files:
        driver.truncate(pick(files, operation[1]), operation[2])
    elif kind == "link" and files:
        directory = pick(directories, operation[2])
        if operation[3] not in model.entries[directory]:
            driver.link(pick(files, operation[1]), directory, operation[3])
    elif kind == "unlink" and names:
        directory, name = pick(names, operation[1])
        if model.inodes[model.entries[directory][name]].kind == "dir":
            driver.rmdir(directory, name)
        else:
            driver.unlink(directory, name)
    elif kind == "rename" and names:
        directory, name = pick(names, operation[1])
        driver.rename(directory, name, pick(directories, operation[2]), operation[3])
    elif kind == "exchange" and len(names) > 1:
        first, second = pick(names, operation[1]), pick(names, operation[2])
        driver.exchange(first[0], first[1], second[0], second[1])
    elif kind == "setxattr":
        driver.setxattr(pick(sorted(model.inodes), operation[1]), b"user." + operation[2], operation[3])
    elif kind == "removexattr":
        inode = pick(sorted(model.inodes), operation[1])
        if b"user." + operation[2] in model.inodes[inode].xattrs:
            driver.removexattr(inode, b"user." + operation[2])
    elif kind == "chmod":
        driver.chmod(pick(sorted(model.inodes), operation[1]), operation[2])
    elif kind == "punch" and files:
        ino, offset, length = pick(files, operation[1]), operation[2], operation[3]
        driver.fs.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        content = model.inodes[ino].data
        end = min(offset + length, len(content))
        if offset < end:
            model.inodes[ino].data = content[:offset] + bytes(end - offset) + content[end:]


def populate(driver: Driver) -> None:
    """Give each random run a few directories, files with data in and out of line, links and xattrs."""
    first = driver.mkdir(ROOT, b"d0")
    second = driver.mkdir(first.ino, b"d1")
    for index, size in enumerate((10, 3000, 9000, 70000)):
        inode = driver.create(second.ino if index % 2 else ROOT, b"f%d" % index)
        driver.write(inode.ino, 0, bytes([65 + index]) * size)
    driver.link(inode.ino, first.ino, b"hard")
    driver.symlink(first.ino, b"link", b"../f0")
    driver.setxattr(first.ino, b"user.kept", b"value")


@given(first=OPERATIONS, second=OPERATIONS)
def test_random_operations_send_and_receive(tmp_path_factory, first, second):
    directory = tmp_path_factory.mktemp("random")
    source = mkfs(str(directory / "source.img"), nodesize=4096)
    target = mkfs(str(directory / "target.img"), nodesize=4096)
    try:
        model = FsModel()
        driver = Driver(live(source), model)
        populate(driver)
        for operation in first:
            apply_operation(driver, operation)
        source.commit()
        sv.create_snapshot(source, b"s1")
        model_s1 = model.copy()
        for operation in second:
            apply_operation(driver, operation)
        source.commit()
        sv.create_snapshot(source, b"s2")
        receive_bytes(target, send_bytes(source, b"s1"))
        receive_bytes(target, send_bytes(source, b"s2", parent=b"s1"))
        assert_matches(sv.open_filesystem(target, b"s1"), model_s1, "received s1")
        assert_matches(sv.open_filesystem(target, b"s2"), model, "received s2")
        assert_same_subvolume(source, b"s2", target, b"s2")
        assert_clean(target)
    finally:
        source.close()
        target.close()


def test_receive_keeps_image_when_reopened(streams, reopen):
    """A received snapshot is committed: it is there after the image is opened again."""
    _, incremental, target = streams
    receive_bytes(target, incremental)
    generation = target.generation
    fresh, _ = reopen(target, writable=False)
    assert fresh.generation == generation
    assert [sub.name for sub in sv.list_subvolumes(fresh)][1:] == [b"s1", b"s2"]
    assert dataclasses.asdict(sv.find(fresh, b"s2").identity)["received_gen"] == generation


def test_truncate_to_zero_and_up_keeps_hole(make_image):
    """A file emptied and then extended by one byte has no data blocks on either side."""
    _, volume, fs = make_image()
    ino = mkfile(fs, ROOT, b"file", b"x" * 3000)
    volume.commit()
    sv.create_snapshot(volume, b"s1")
    fs.truncate(ino, 0)
    fs.truncate(ino, 1)
    volume.commit()
    sv.create_snapshot(volume, b"s2")
    _, target, _ = make_image()
    receive_bytes(target, send_bytes(volume, b"s1"))
    receive_bytes(target, send_bytes(volume, b"s2", parent=b"s1"))
    assert_same_subvolume(volume, b"s2", target, b"s2")
    assert list(sv.open_filesystem(target, b"s2").extents(ino)) == []


def test_inline_and_regular_files_keep_holes(make_image):
    """Files stored inline on one side and in blocks on the other keep the sender's holes."""
    _, volume, fs = make_image()
    # Stored in a block here, inline on the receiver after its first stream.
    shrunk = mkfile(fs, ROOT, b"shrunk", b"s" * 8000)
    fs.truncate(shrunk, 1)
    # Stored in blocks here and on the receiver, then inline only here.
    refilled = mkfile(fs, ROOT, b"refilled", b"r" * 8000)
    steps = [
        lambda: (fs.truncate(shrunk, 0), fs.truncate(refilled, 0), fs.write(refilled, 0, b"i" * 345)),
        lambda: (fs.truncate(shrunk, 1), fs.write(refilled, 4096, b"b" * 105),
                 fs.fallocate(refilled, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)),
    ]
    _, target, _ = make_image()
    previous = None
    for number in range(len(steps) + 1):
        if number:
            steps[number - 1]()
        volume.commit()
        name = b"s%d" % number
        sv.create_snapshot(volume, name)
        receive_bytes(target, send_bytes(volume, name, parent=previous))
        assert_same_subvolume(volume, name, target, name)
        previous = name
    received = sv.open_filesystem(target, previous)
    assert list(received.extents(shrunk)) == []
    assert [extent.offset for extent in received.extents(refilled)] == [4096]
    assert_clean(target)
