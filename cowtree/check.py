"""The engine's self-check: every committed tree, every reference count,
free space and file extents, checked against each other.

:func:`check_volume` walks every tree from its root and visits each distinct
node once, however many subvolumes share it, so its cost follows the number
of distinct blocks.  It recomputes each extent's reference count as the
number of distinct nodes (and root items) that point to it, which is what
lazy reference counting stores, and compares that with the extent tree.

Tests run it after every commit (``COWTREE_STRICT=1``); ``cowtree fsck``
builds on it.  Every problem becomes a :class:`Problem`; nothing stops at
the first one.
"""

from __future__ import annotations

import dataclasses
import stat as stat_module
from collections import Counter, defaultdict

from . import ondisk
from .btree import Tree
from .errors import CorruptionError, CowtreeError
from .fs import FileExtent, decode_dirents, decode_refs, decode_xattrs
from .transaction import EXTENT, RootItem

BLOCK = ondisk.BLOCK_SIZE


@dataclasses.dataclass
class Problem:
    """One inconsistency: what, where, why, found and expected."""

    what: str
    where: str
    why: str
    found: object = None
    expected: object = None
    kind: str = "error"     # "error" or "leak"

    def __str__(self) -> str:
        text = f"{self.what} {self.where}: {self.why}"
        if self.found is not None or self.expected is not None:
            text += f" (found {self.found}, expected {self.expected})"
        return text


@dataclasses.dataclass
class Report:
    """The result of a check."""

    problems: list = dataclasses.field(default_factory=list)
    nodes: int = 0
    data_extents: int = 0
    data_bytes: int = 0
    items: int = 0

    def add(self, *args, **kwargs) -> None:
        self.problems.append(Problem(*args, **kwargs))

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.kind == "error"]

    @property
    def leaks(self) -> list:
        return [p for p in self.problems if p.kind == "leak"]

    def raise_if_errors(self) -> None:
        if self.problems:
            lines = "\n".join(str(p) for p in self.problems[:20])
            raise CowtreeError(f"self-check found {len(self.problems)} problems:\n{lines}")


class _Walker:
    def __init__(self, volume, report: Report):
        self.vol = volume
        self.report = report
        self.visited: set[int] = set()
        self.node_refs: Counter = Counter()      # address -> pointers from distinct nodes and roots
        self.data_refs: Counter = Counter()      # data extent address -> items in distinct leaves
        self.data_lengths: dict[int, int] = {}
        self.node_owner: dict[int, str] = {}

    def walk(self, tree: Tree) -> None:
        """Walk tree, counting the pointers of every node not visited before."""
        if tree.root_ptr[2] == 0:
            self.node_refs[tree.root_ptr[0]] += 1
        self._walk(tree, tree.root_ptr, tree.level, None, None, [])

    def _walk(self, tree, ptr, level, low, high, path) -> None:
        addr = ptr[0]
        if ptr[2]:
            return
        if addr in self.visited:
            return
        self.visited.add(addr)
        where = f"at block {addr} in {tree.name}, path {'/'.join(map(str, path)) or 'root'}"
        try:
            node = self.vol.read_node(ptr, level, tree)
        except CorruptionError as exc:
            self.report.add(exc.what, exc.where + f" (path {'/'.join(map(str, path)) or 'root'})", exc.why,
                            exc.found, exc.expected)
            return
        self.report.nodes += 1
        end = addr + self.vol.nodesize
        if end > self.vol.free.high_water:
            self.report.add("node", where, "lies past the end of the image", end, f"<= {self.vol.free.high_water}")
        if node.keys:
            if low is not None and node.keys[0] < low:
                self.report.add("node", where, "first key below the parent's separator", node.keys[0], f">= {low}")
            if high is not None and node.keys[-1] >= high:
                self.report.add("node", where, "last key not below the next separator", node.keys[-1], f"< {high}")
        elif level or path:
            self.report.add("node", where, "empty node below the root", 0, ">= 1 item")
        if node.level:
            for slot, child in enumerate(node.vals):
                if child[2] == 0:
                    self.node_refs[child[0]] += 1
                child_high = node.keys[slot + 1] if slot + 1 < len(node.keys) else high
                self._walk(tree, child, node.level - 1, node.keys[slot], child_high, path + [slot])
            return
        self.report.items += len(node.keys)
        for slot, (key, data) in enumerate(zip(node.keys, node.vals)):
            if key[1] == ondisk.EXTENT_DATA:
                try:
                    extent = FileExtent.decode(key[2], data, f"{where} slot {slot}")
                except CorruptionError as exc:
                    self.report.add(exc.what, exc.where, exc.why, exc.found, exc.expected)
                    continue
                if extent.kind == ondisk.FILE_EXTENT_REGULAR and extent.layer == 0:
                    self.data_refs[extent.disk_addr] += 1
                    self.data_lengths[extent.disk_addr] = extent.disk_len


def check_volume(volume, check_files: bool = True) -> Report:
    """Check the committed state of volume (the running transaction must be empty)."""
    report = Report()
    walker = _Walker(volume, report)
    walker.walk(volume.root_tree)
    walker.walk(volume.extent_tree)
    extent_items = []

    subvolumes = []
    for key, data in volume.root_tree.items((0, 0, 0)):
        if key[1] != ondisk.ROOT_ITEM:
            continue
        try:
            item = RootItem.decode(data, f"in root tree key {key}")
        except CorruptionError as exc:
            report.add(exc.what, exc.where, exc.why, exc.found, exc.expected)
            continue
        subvolumes.append((key[0], item))

    files = _FileCheck(report) if check_files else None
    for tree_id, item in subvolumes:
        tree = Tree(volume, tree_id, (item.root_addr, item.root_gen, item.root_layer), item.level,
                    item.last_snapshot, name=f"subvolume {tree_id}")
        walker.walk(tree)
        if files is None:
            continue
        # NOTE: the file-level pass reads every item of every subvolume, so
        # subvolumes that share subtrees are read once each at this level.
        files.begin(tree_id)
        try:
            for key, data in tree.items():
                files.visit(tree, key, data, f"key {key} in subvolume {tree_id}")
        except CorruptionError as exc:
            report.add(exc.what, exc.where, exc.why, exc.found, exc.expected)
        files.end(tree_id)

    # Compare the extent tree with the counted pointers.
    bytes_used = 0
    previous_end = ondisk.FIRST_ALLOC
    for key, data in volume.extent_tree.items((0, 0, 0)):
        if key[1] != ondisk.EXTENT_ITEM:
            continue
        addr, _, length = key
        where = f"extent {addr}+{length}"
        if len(data) < EXTENT.size:
            report.add("extent item", where, "too short", len(data), f">= {EXTENT.size}")
            continue
        refs, gen, flags, owner = EXTENT.unpack_from(data)
        bytes_used += length
        extent_items.append(addr)
        if addr < previous_end:
            report.add("extent item", where, "overlaps the previous extent", addr, f">= {previous_end}")
        previous_end = max(previous_end, addr + length)
        if addr + length > volume.free.high_water:
            report.add("extent item", where, "lies past the end of the image", addr + length,
                       f"<= {volume.free.high_water}")
        if flags == ondisk.EXTENT_FLAG_TREE_BLOCK:
            expected = walker.node_refs.get(addr, 0)
            if length != volume.nodesize:
                report.add("extent item", where, "tree block of the wrong length", length, volume.nodesize)
        elif flags == ondisk.EXTENT_FLAG_DATA:
            expected = walker.data_refs.get(addr, 0)
            report.data_extents += 1
            report.data_bytes += length
            if len(data) - EXTENT.size != length // BLOCK * 4:
                report.add("extent item", where, "checksum array of the wrong size", len(data) - EXTENT.size,
                           length // BLOCK * 4)
        else:
            report.add("extent item", where, "invalid flags", flags, "DATA or TREE_BLOCK")
            continue
        if expected == 0:
            report.add("extent", where, "allocated but not referenced (leaked)", refs, 0, kind="leak")
        elif refs != expected:
            report.add("extent", where, "reference count differs from the pointers found", refs, expected)
    counted = set(walker.node_refs) | set(walker.data_refs)
    for addr in sorted(counted - set(extent_items)):
        kind = "node" if addr in walker.node_refs else "data extent"
        report.add(kind, f"at block {addr}", "referenced but has no EXTENT_ITEM (free space in use)")
    if bytes_used != volume.bytes_used:
        report.add("superblock", f"generation {volume.generation}", "bytes_used differs from the extent tree",
                   volume.bytes_used, bytes_used)
    # Free runs in memory must not overlap allocated extents.
    free = volume.free
    for start, end in zip(free.starts, free.ends):
        hit = volume.extent_tree.floor((end - 1, 0xFF, 0xFFFFFFFFFFFFFFFF))
        if hit is not None and hit[0][1] == ondisk.EXTENT_ITEM and hit[0][0] + hit[0][2] > start:
            report.add("free space", f"run {start}-{end}", "overlaps an allocated extent", hit[0][0], "no overlap")
    return report


class _FileCheck:
    """Filesystem-level checks of one subvolume, fed leaf items in key order."""

    def __init__(self, report: Report):
        self.report = report

    def begin(self, tree_id: int) -> None:
        self.tree_id = tree_id
        self.inodes: dict[int, tuple] = {}           # ino -> (mode, nlink, size)
        self.entries: Counter = Counter()             # ino -> names pointing at it
        self.subdirs: Counter = Counter()             # dir ino -> child directories
        self.dir_names: defaultdict = defaultdict(int)  # dir ino -> sum of name lengths
        self.entry_types: list = []                   # (dir, name, ino, dtype)
        self.refs: Counter = Counter()
        self.extent_end: dict[int, int] = {}
        self.orphans: set[int] = set()

    def visit(self, tree, key, data, where) -> None:
        objectid, typ, offset = key
        report = self.report
        try:
            if typ == ondisk.INODE_ITEM:
                from .fs import Inode
                inode = Inode.decode(objectid, data)
                self.inodes[objectid] = (inode.mode, inode.nlink, inode.size)
            elif typ == ondisk.DIR_INDEX:
                for ino, dtype, name in decode_dirents(data, where):
                    self._name(where, name)
                    self.entries[ino] += 1
                    self.dir_names[objectid] += len(name)
                    self.entry_types.append((objectid, name, ino, dtype))
            elif typ == ondisk.DIR_ITEM:
                for _ino, _dtype, name in decode_dirents(data, where):
                    from .fs import name_hash
                    if name_hash(name) != offset:
                        report.add("dir item", where, f"name {name!r} stored under the wrong hash", offset,
                                   name_hash(name))
            elif typ == ondisk.INODE_REF:
                for _index, name in decode_refs(data, where):
                    self.refs[objectid] += 1
            elif typ == ondisk.XATTR_ITEM:
                list(decode_xattrs(data, where))
            elif typ == ondisk.EXTENT_DATA:
                extent = FileExtent.decode(offset, data, where)
                previous = self.extent_end.get(objectid, 0)
                if extent.offset < previous:
                    report.add("file extent", where, f"inode {objectid}: overlaps the previous extent",
                               extent.offset, f">= {previous}")
                if extent.kind == ondisk.FILE_EXTENT_REGULAR and (extent.offset % BLOCK or extent.num_bytes % BLOCK):
                    report.add("file extent", where, f"inode {objectid}: not block aligned",
                               f"{extent.offset}+{extent.num_bytes}", "multiples of 4096")
                if extent.kind == ondisk.FILE_EXTENT_REGULAR and \
                        extent.extent_offset + extent.num_bytes > extent.disk_len:
                    report.add("file extent", where, f"inode {objectid}: reaches past its data extent",
                               extent.extent_offset + extent.num_bytes, f"<= {extent.disk_len}")
                self.extent_end[objectid] = extent.end
            elif typ == ondisk.ORPHAN_ITEM:
                self.orphans.add(offset)
        except CorruptionError as exc:
            report.add(exc.what, exc.where, exc.why, exc.found, exc.expected)

    def _name(self, where, name) -> None:
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255:
            self.report.add("dir entry", where, "invalid name", repr(name), "1-255 bytes, no '/' or NUL")

    def end(self, tree_id: int) -> None:
        report = self.report
        sub = f"in subvolume {tree_id}"
        for dir_ino, name, ino, dtype in self.entry_types:
            info = self.inodes.get(ino)
            if info is None:
                report.add("dir entry", f"{name!r} in directory {dir_ino} {sub}", "points to a missing inode", ino,
                           "an existing inode")
                continue
            if (info[0] >> 12) & 0xF != dtype:
                report.add("dir entry", f"{name!r} in directory {dir_ino} {sub}", "type differs from the inode",
                           dtype, (info[0] >> 12) & 0xF)
            if stat_module.S_ISDIR(info[0]):
                self.subdirs[dir_ino] += 1
        for ino, (mode, nlink, size) in self.inodes.items():
            where = f"{ino} {sub}"
            if stat_module.S_ISDIR(mode):
                expected = 2 + self.subdirs[ino]
                if size != 2 * self.dir_names[ino]:
                    report.add("inode", where, "directory size differs from its entries", size,
                               2 * self.dir_names[ino])
            else:
                expected = self.entries[ino]
            if ino == ondisk.ROOT_DIR_INO:
                if self.entries[ino]:
                    report.add("inode", where, "root directory has a name", self.entries[ino], 0)
            elif self.entries[ino] == 0 and ino not in self.orphans:
                report.add("inode", where, "not linked from any directory (orphan)", 0, ">= 1 entry")
                continue
            if ino in self.orphans:
                expected = 0
            if nlink != expected:
                report.add("inode", where, "link count differs from the directory entries", nlink, expected)
            if self.refs[ino] != self.entries[ino]:
                report.add("inode", where, "INODE_REF names differ from the directory entries",
                           self.refs[ino], self.entries[ino])
            end = self.extent_end.get(ino, 0)
            if stat_module.S_ISREG(mode) and end > -(-size // BLOCK) * BLOCK:
                report.add("inode", where, "file extents reach past the file size", end, f"<= {size}")
