"""Numbered corrupt-image cases for ``cowtree fsck``.

Each case plants one defect with ``tools/corrupt`` in a copy of a clean
image built by :func:`build_image`.  It states a substring that the ``why``
of at least one reported problem must contain, and whether
``fsck --repair`` must leave the image clean.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from cowtree import ondisk
from cowtree.image import live, mkfs
from cowtree.subvolume import create_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORRUPT = os.path.join(ROOT, "tools", "corrupt")
BLOCK = ondisk.BLOCK_SIZE


@dataclasses.dataclass
class Case:
    """One planted defect and what fsck must report about it."""

    id: str
    damage: str
    args: list
    must_report: str
    repairable: bool
    exit_before: int = 2


CASES = [
    Case("001-node-byte-flip", "one byte inverted inside a leaf of the live tree",
         ["flip-node", "--tree", "5", "--level", "0", "--index", "2"], "checksum mismatch", False),
    Case("002-data-byte-flip", "one byte inverted in the first data block of /big",
         ["flip-data", "--path", "/big"], "checksum mismatch", False),
    Case("003-superblock-copy-zeroed", "the superblock copy not in use is zeroed",
         ["zero-super", "COPY_NOT_IN_USE"], "invalid", True),
    Case("004-refcount-raised", "the stored reference count of a shared leaf set to 9",
         ["set-refs", "--tree", "5", "--level", "0", "--index", "1", "--count", "9"],
         "reference count differs", True),
    Case("005-refcount-lowered", "the stored reference count of a shared leaf set to 1",
         ["set-refs", "--tree", "5", "--level", "0", "--index", "1", "--count", "1"],
         "reference count differs", True),
    Case("006-child-wrong-generation", "a child pointer of the live root names the next generation",
         ["child-gen", "--tree", "5", "--slot", "1"], "generation differs from the parent's pointer", False),
    Case("007-entry-removed", "the DIR_ITEM and DIR_INDEX of /dir/f003 removed, the inode kept",
         ["remove-entry", "/dir/f003"], "not linked from any directory", True),
    Case("008-link-count-bumped", "the link count of /f004 raised by one",
         ["bump-nlink", "/f004"], "link count differs", True),
    Case("009-leaked-block", "a node-sized extent allocated that nothing references",
         ["leak"], "leaked", True, exit_before=3),
    Case("010-extent-tree-byte-flip", "one byte inverted inside the extent tree's root",
         ["flip-node", "--tree", "2", "--index", "0"], "checksum mismatch", False),
    Case("011-snapshot-link-count", "the link count of /f006 in snapshot snap raised by two",
         ["bump-nlink", "/f006", "--snapshot", "snap", "--by", "2"], "link count differs", True),
    Case("012-data-extent-refcount", "the reference count of /big's data extent set to 5",
         ["set-refs", "--data", "DATA_OF_BIG", "--count", "5"], "reference count differs", True),
    Case("013-subvol-uuid-stale", "a SUBVOL_UUID item for tree id 999, which has no ROOT_ITEM",
         ["subvol-uuid", "stale", "--snapshot", "snap"], "no ROOT_ITEM for this tree id", True),
    Case("014-subvol-uuid-duplicate", "snapshot snap's SUBVOL_UUID item given the live filesystem's UUID",
         ["subvol-uuid", "duplicate", "--snapshot", "snap"], "UUID also belongs to subvolume", False),
    Case("015-subvol-uuid-short", "snapshot snap's SUBVOL_UUID item cut to 40 of its 64 bytes",
         ["subvol-uuid", "short", "--snapshot", "snap"], "SUBVOL_UUID has the wrong size", True),
]


def build_image(path: str, nodesize: int = 4096, files: int = 200) -> dict:
    """Create an image with directories, files, a hole, xattrs, a symlink, a snapshot and a reflink.

    Return {path: content} of the live filesystem's regular files.
    """
    volume = mkfs(path, nodesize=nodesize)
    fs = live(volume)
    contents = {}
    directory = fs.mkdir(ondisk.ROOT_DIR_INO, b"dir")
    for index in range(files):
        parent = directory.ino if index % 2 else ondisk.ROOT_DIR_INO
        name = b"f%03d" % index
        inode = fs.mknod(parent, name, 0o644)
        data = bytes([index % 250 + 1]) * (index * 53)
        fs.write(inode.ino, 0, data)
        if index % 7 == 0:
            fs.setxattr(inode.ino, b"user.n", b"%d" % index)
        contents[(b"/dir/" if index % 2 else b"/") + name] = data
    big = fs.mknod(ondisk.ROOT_DIR_INO, b"big", 0o644)
    big_data = os.urandom(5 * BLOCK) + b"\0" * (2 * BLOCK) + b"tail"
    fs.write(big.ino, 0, big_data[:5 * BLOCK])
    fs.write(big.ino, 7 * BLOCK, b"tail")
    contents[b"/big"] = big_data
    clone = fs.mknod(ondisk.ROOT_DIR_INO, b"big-clone", 0o644)
    fs.clone_file(fs, big.ino, clone.ino)
    contents[b"/big-clone"] = big_data
    fs.symlink(ondisk.ROOT_DIR_INO, b"link", b"dir/f001")
    fs.link(fs.resolve(b"/f002"), directory.ino, b"hard")
    contents[b"/dir/hard"] = contents[b"/f002"]
    volume.commit()
    create_snapshot(volume, b"snap")
    fs.write(fs.resolve(b"/f000"), 0, b"changed after the snapshot")
    contents[b"/f000"] = b"changed after the snapshot"
    volume.commit()
    volume.close()
    return contents


def resolve_args(case: Case, path: str) -> list:
    """Fill the placeholders of a case's arguments from the image at path."""
    from cowtree.image import open_image
    args = list(case.args)
    volume = open_image(path)
    try:
        if "COPY_NOT_IN_USE" in args:
            args[args.index("COPY_NOT_IN_USE")] = str(1 - volume.superblock_scan.chosen.copy_index)
        if "DATA_OF_BIG" in args:
            fs = live(volume)
            extent = next(e for e in fs.extents(fs.resolve(b"/big")) if e.kind == ondisk.FILE_EXTENT_REGULAR)
            args[args.index("DATA_OF_BIG")] = str(extent.disk_addr)
    finally:
        volume.close()
    return args


def plant(case: Case, path: str) -> None:
    """Run tools/corrupt on path for case; raise when it fails."""
    env = dict(os.environ)
    env.pop("COWTREE_STRICT", None)
    subprocess.run([sys.executable, CORRUPT, path, *resolve_args(case, path)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
