"""The engine's self-check: every committed tree, every reference count,
free space, file extents and data checksums, checked against each other.

:func:`check_volume` walks every tree from its root and visits each distinct
node once, however many subvolumes share it, so its cost follows the number
of distinct blocks.  It recomputes each extent's reference count as the
number of distinct nodes (and root items) that point to it, which is what
lazy reference counting stores, and compares that with the extent tree.

The filesystem-level checks follow the same rule.  Each subtree of a
subvolume gets a :class:`_Summary`, cached by node address: the problems
local to its items, and a sum of hashed facts in which every directory
entry cancels the INODE_REF, DIR_ITEM and inode type it needs, and every
inode cancels its link count, directory size and orphan item.  A subvolume
whose sums cancel to zero is consistent across inodes; a subtree that
snapshots share is summed once.  Only a subvolume whose sums do not cancel
is read item by item (:class:`_ExactFileCheck`) to name the inodes at fault.

Tests run it after every commit (``COWTREE_STRICT=1``); ``cowtree fsck``
(:mod:`cowtree.fsck`) builds on it.  Every problem becomes a
:class:`Problem`; nothing stops at the first one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import stat as stat_module
from collections import Counter, defaultdict

from . import ondisk
from .btree import Tree
from .checksum import crc32c
from .errors import CorruptionError, CowtreeError
from .fs import FileExtent, Inode, decode_dirents, decode_refs, decode_xattrs, name_hash
from .subvolume import ZERO_UUID, Identity, derived_uuid
from .transaction import LAYER_SHIFT, EXTENT, RootItem

BLOCK = ondisk.BLOCK_SIZE
MODULUS = 1 << 128
FS_ITEM_TYPES = {ondisk.INODE_ITEM, ondisk.INODE_REF, ondisk.XATTR_ITEM, ondisk.ORPHAN_ITEM, ondisk.DIR_ITEM,
                 ondisk.DIR_INDEX, ondisk.EXTENT_DATA}
FILE_TYPES = {stat_module.S_IFREG, stat_module.S_IFDIR, stat_module.S_IFLNK, stat_module.S_IFIFO,
              stat_module.S_IFCHR, stat_module.S_IFBLK, stat_module.S_IFSOCK}
DATA_READ_BYTES = 4 << 20


@dataclasses.dataclass
class Problem:
    """One inconsistency: what, where, why, found and expected.

    ``kind`` is "error" or "leak".  ``repair`` is a tuple naming the fix
    :mod:`cowtree.fsck` can apply through a normal transaction, or None
    when no safe fix exists.
    """

    what: str
    where: str
    why: str
    found: object = None
    expected: object = None
    kind: str = "error"
    repair: tuple | None = None

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
    data_blocks_checked: int = 0
    items: int = 0
    subvolumes: int = 0
    exact_passes: int = 0     # subvolumes whose sums did not cancel and were read item by item
    # Nodes that could not be read: what lies below them was not counted, so
    # reference counts, leaks and missing inodes found are unreliable.
    unread_nodes: int = 0

    def add(self, *args, **kwargs) -> None:
        self.problems.append(Problem(*args, **kwargs))

    def add_corruption(self, exc: CorruptionError, suffix: str = "") -> None:
        self.problems.append(Problem(exc.what, exc.where + suffix, exc.why, exc.found, exc.expected))

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


def _fact(*parts) -> int:
    """Return a 128-bit hash of one fact, for the cancelling sums."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest(), "little")


# ---------------------------------------------------------------------------
# Per-subtree summaries of filesystem facts
#
# A run is the items of one objectid inside a subtree, as a tuple
# (ino, inode, first extent offset, last extent end, max extent end,
#  inline length, where).  ``inode`` is (mode, nlink, size, flags) or None when the
# INODE_ITEM lies outside the subtree; extent fields are None without
# extents and the inline length is -1 without an inline extent.  Runs are
# never changed once built, because summaries are shared between trees.

RUN_INO, RUN_INODE, RUN_FIRST, RUN_LAST, RUN_MAX, RUN_INLINE, RUN_WHERE = range(7)


@dataclasses.dataclass
class _Summary:
    """Filesystem facts of one subtree: the cancelling sum, root inodes, and its first and last runs."""

    total: int
    roots: int
    runs: list


def _merge_runs(left: tuple, right: tuple, problems: list) -> tuple:
    """Return the run of left followed by right (same objectid), reporting overlapping extents."""
    if left[RUN_LAST] is not None and right[RUN_FIRST] is not None and right[RUN_FIRST] < left[RUN_LAST]:
        problems.append(Problem("file extent", f"inode {left[RUN_INO]} {right[RUN_WHERE]}",
                                "overlaps the previous extent", right[RUN_FIRST], f">= {left[RUN_LAST]}"))
    first = left[RUN_FIRST] if left[RUN_FIRST] is not None else right[RUN_FIRST]
    last = right[RUN_LAST] if right[RUN_LAST] is not None else left[RUN_LAST]
    maxima = [v for v in (left[RUN_MAX], right[RUN_MAX]) if v is not None]
    return (left[RUN_INO], left[RUN_INODE] or right[RUN_INODE], first, last, max(maxima) if maxima else None,
            max(left[RUN_INLINE], right[RUN_INLINE]), left[RUN_WHERE])


def _finish_run(run: tuple, sub: str, inline_max: int, problems: list) -> None:
    """Check one inode whose items are all known."""
    ino = run[RUN_INO]
    if ino == ondisk.ORPHAN_OBJECTID:
        return
    where = f"{ino} {sub}"
    inode = run[RUN_INODE]
    if inode is None:
        problems.append(Problem("inode", where, f"items without an INODE_ITEM ({run[RUN_WHERE]})"))
        return
    mode, _nlink, size, flags = inode
    fmt = stat_module.S_IFMT(mode)
    if fmt == stat_module.S_IFREG:
        # PREALLOC files may keep blocks past their size (fallocate FALLOC_FL_KEEP_SIZE).
        if run[RUN_MAX] is not None and run[RUN_MAX] > -(-size // BLOCK) * BLOCK \
                and not flags & ondisk.INODE_PREALLOC:
            problems.append(Problem("inode", where, "file extents reach past the file size", run[RUN_MAX],
                                    f"<= {size}"))
    elif fmt == stat_module.S_IFLNK:
        target = run[RUN_INLINE]
        if target < 0:
            problems.append(Problem("inode", where, "symlink without target"))
        elif target > min(ondisk.SYMLINK_MAX, inline_max) or target == 0:
            problems.append(Problem("inode", where, "symlink target length out of range", target,
                                    f"1 to {min(ondisk.SYMLINK_MAX, inline_max)}"))
        elif target != size:
            problems.append(Problem("inode", where, "symlink size differs from its target", size, target))
    elif run[RUN_FIRST] is not None:
        problems.append(Problem("inode", where, "file extents on an inode that is not a file or symlink",
                                oct(mode), "no EXTENT_DATA"))


def _valid_name(name: bytes) -> bool:
    return bool(name) and len(name) <= ondisk.NAME_MAX and name not in (b".", b"..") and \
        b"/" not in name and b"\0" not in name


class _LeafScanner:
    """Turns one leaf of a filesystem tree into a _Summary and its local problems."""

    def __init__(self, inline_max: int, report_unknown: bool):
        self.inline_max = inline_max
        self.report_unknown = report_unknown

    def scan(self, node, where: str, problems: list) -> _Summary:
        total = 0
        roots = 0
        runs: list = []
        run = None
        for slot, (key, data) in enumerate(zip(node.keys, node.vals)):
            objectid, typ, offset = key
            at = f"{where} slot {slot}"
            if typ not in FS_ITEM_TYPES:
                if self.report_unknown:
                    problems.append(Problem("item", at, "item type not valid in a filesystem tree", typ,
                                            sorted(FS_ITEM_TYPES)))
                continue
            if run is None or run[RUN_INO] != objectid:
                if run is not None:
                    runs.append(tuple(run))
                run = [objectid, None, None, None, None, -1, at]
            try:
                total += self._item(run, objectid, typ, offset, data, at, problems)
            except CorruptionError as exc:
                problems.append(Problem(exc.what, at, exc.why, exc.found, exc.expected))
            if typ == ondisk.INODE_ITEM and objectid == ondisk.ROOT_DIR_INO and run[RUN_INODE] is not None \
                    and stat_module.S_ISDIR(run[RUN_INODE][0]):
                roots += 1
        if run is not None:
            runs.append(tuple(run))
        # Only the first and last runs can continue into a neighbour; the rest are complete.
        if len(runs) > 2:
            for complete in runs[1:-1]:
                _finish_run(complete, f"({where})", self.inline_max, problems)
            runs = [runs[0], runs[-1]]
        return _Summary(total % MODULUS, roots, runs)

    def _item(self, run, objectid, typ, offset, data, at, problems) -> int:
        """Check one item; return its contribution to the cancelling sum."""
        total = 0
        if typ == ondisk.INODE_ITEM:
            inode = Inode.decode(objectid, data)
            if stat_module.S_IFMT(inode.mode) not in FILE_TYPES:
                problems.append(Problem("inode", f"{objectid} ({at})", "invalid file type", oct(inode.mode),
                                        "a regular file, directory, symlink, fifo, device or socket"))
            run[RUN_INODE] = (inode.mode, inode.nlink, inode.size, inode.flags)
            dtype = (inode.mode >> 12) & 0xF
            if inode.is_dir:
                names = 0 if objectid == ondisk.ROOT_DIR_INO else 1
                total += (inode.nlink - 2) * _fact("subdirs", objectid)
                total += inode.size * _fact("dirsize", objectid)
            else:
                names = inode.nlink
                if inode.nlink == 0:
                    total += _fact("orphan", objectid)
            total -= names * _fact("type", objectid, dtype)
        elif typ == ondisk.INODE_REF:
            for index, name in decode_refs(data, at):
                total -= _fact("ref", offset, index, objectid, name)
        elif typ == ondisk.DIR_INDEX:
            entries = list(decode_dirents(data, at))
            if len(entries) != 1:
                problems.append(Problem("dir index", at, "wrong number of entries", len(entries), 1))
            for child, dtype, name in entries:
                if not _valid_name(name):
                    problems.append(Problem("dir entry", at, "invalid name", repr(name), "1-255 bytes, no '/' or NUL"))
                total += _fact("ref", objectid, offset, child, name)
                total += _fact("type", child, dtype)
                total -= _fact("item", objectid, name, child, dtype)
                total -= 2 * len(name) * _fact("dirsize", objectid)
                if dtype == ondisk.DT_DIR:
                    total -= _fact("subdirs", objectid)
        elif typ == ondisk.DIR_ITEM:
            for child, dtype, name in decode_dirents(data, at):
                if name_hash(name) != offset:
                    problems.append(Problem("dir item", at, f"name {name!r} stored under the wrong hash", offset,
                                            name_hash(name)))
                total += _fact("item", objectid, name, child, dtype)
        elif typ == ondisk.XATTR_ITEM:
            for name, _value in decode_xattrs(data, at):
                if not name or len(name) > 255 or name_hash(name) != offset:
                    problems.append(Problem("xattr item", at, f"name {name!r} invalid or stored under the wrong hash",
                                            offset, name_hash(name)))
        elif typ == ondisk.EXTENT_DATA:
            self._extent(run, objectid, offset, data, at, problems)
        elif typ == ondisk.ORPHAN_ITEM:
            if objectid != ondisk.ORPHAN_OBJECTID:
                problems.append(Problem("orphan item", at, "wrong objectid", objectid, ondisk.ORPHAN_OBJECTID))
            total -= _fact("orphan", offset)
        return total

    def _extent(self, run, objectid, offset, data, at, problems) -> None:
        extent = FileExtent.decode(offset, data, at)
        where = f"inode {objectid} ({at})"
        if run[RUN_LAST] is not None and offset < run[RUN_LAST]:
            problems.append(Problem("file extent", where, "overlaps the previous extent", offset,
                                    f">= {run[RUN_LAST]}"))
        if extent.kind == ondisk.FILE_EXTENT_INLINE:
            if offset != 0:
                problems.append(Problem("file extent", where, "inline extent not at offset 0", offset, 0))
            if len(extent.inline) > self.inline_max:
                problems.append(Problem("file extent", where, "inline extent too long", len(extent.inline),
                                        f"<= {self.inline_max}"))
            run[RUN_INLINE] = len(extent.inline)
        else:
            if offset % BLOCK or extent.num_bytes % BLOCK or extent.extent_offset % BLOCK or not extent.num_bytes:
                problems.append(Problem("file extent", where, "not block aligned",
                                        f"{offset}+{extent.num_bytes} at {extent.extent_offset}",
                                        "non-zero multiples of 4096"))
            if extent.extent_offset + extent.num_bytes > extent.disk_len:
                problems.append(Problem("file extent", where, "reaches past its data extent",
                                        extent.extent_offset + extent.num_bytes, f"<= {extent.disk_len}"))
        if run[RUN_FIRST] is None:
            run[RUN_FIRST] = offset
        run[RUN_LAST] = extent.end
        run[RUN_MAX] = extent.end if run[RUN_MAX] is None else max(run[RUN_MAX], extent.end)


def _combine(children: list, sub: str, inline_max: int, problems: list) -> _Summary:
    """Return the summary of an internal node from its children's, in key order."""
    total = 0
    roots = 0
    runs: list = []
    for child in children:
        total += child.total
        roots += child.roots
        for run in child.runs:
            if runs and runs[-1][RUN_INO] == run[RUN_INO]:
                runs[-1] = _merge_runs(runs[-1], run, problems)
            else:
                runs.append(run)
    if len(runs) > 2:
        for run in runs[1:-1]:
            _finish_run(run, sub, inline_max, problems)
        runs = [runs[0], runs[-1]]
    return _Summary(total % MODULUS, roots, runs)


# ---------------------------------------------------------------------------
# Walking the trees


class _Walker:
    def __init__(self, volume, report: Report, progress=None, report_unknown: bool = False):
        self.vol = volume
        self.report = report
        self.progress = progress
        self.visited: set[int] = set()
        self.summaries: dict[int, _Summary | None] = {}
        self.node_refs: Counter = Counter()      # address -> pointers from distinct nodes and roots
        self.data_refs: Counter = Counter()      # data extent address -> items in distinct leaves
        self.data_lengths: dict[int, set] = defaultdict(set)
        self.base_data: set = set()    # (layer, address, length) of base data extents the files use
        self.scanner = _LeafScanner(ondisk.inline_max(volume.nodesize), report_unknown)
        self.generation = volume.generation
        self.image_end = volume.free.high_water

    def walk(self, tree: Tree, files: bool = False, drop_key=None) -> _Summary | None:
        """Walk tree, counting the pointers of every node not visited before.

        With files, return the subtree summary of the root, or None when a
        node could not be read.  ``drop_key`` is the drop progress of a
        subvolume being deleted: subtrees wholly below it are already freed,
        so neither they nor the pointers to them count.
        """
        if tree.root_ptr[2] == 0:
            self.node_refs[tree.root_ptr[0]] += 1
        # Summaries are built for every subvolume tree, also one being
        # deleted, because a later subvolume may share its nodes.
        self.files = files or tree.tree_id == ondisk.FS_TREE_ID or tree.tree_id >= ondisk.FIRST_SUBVOL_ID
        self.drop_key = drop_key
        return self._walk(tree, tree.root_ptr, tree.level, None, None, [])

    def _walk(self, tree, ptr, level, low, high, path):
        addr, _, layer = ptr
        # A base image's node is read through the overlay for the file-level
        # checks; its address, generation and count belong to its own image.
        visit_key = addr | layer << LAYER_SHIFT
        if visit_key in self.visited:
            return self.summaries.get(visit_key)
        self.visited.add(visit_key)
        path_text = "/".join(map(str, path)) or "root"
        where = f"at block {addr} in {tree.name}, path {path_text}" + (f", base layer {layer}" if layer else "")
        if layer:
            pass
        elif addr % BLOCK or addr < ondisk.FIRST_ALLOC:
            self.report.add("node", where, "block pointer to an address no node can have", addr,
                            f"a multiple of 4096 at or above {ondisk.FIRST_ALLOC}")
            self.report.unread_nodes += 1
            return None
        elif addr + self.vol.nodesize > self.image_end:
            self.report.add("node", where, "lies past the end of the image", addr + self.vol.nodesize,
                            f"<= {self.image_end}")
            self.report.unread_nodes += 1
            return None
        try:
            node = self.vol.read_node(ptr, level, tree)
        except CorruptionError as exc:
            self.report.add_corruption(exc, f" (path {path_text})")
            self.report.unread_nodes += 1
            return None
        self.report.nodes += 1
        if self.progress is not None and self.report.nodes % 256 == 0:
            self.progress(self.report)
        what = "leaf" if node.level == 0 else "node"
        if node.gen > self.generation and not layer:
            self.report.add(what, where, "generation newer than the superblock's", node.gen,
                            f"<= {self.generation}")
        if node.owner != tree.tree_id and tree.tree_id in (ondisk.ROOT_TREE_ID, ondisk.EXTENT_TREE_ID):
            self.report.add(what, where, "node belongs to another tree", node.owner, tree.tree_id)
        if node.keys:
            if low is not None and node.keys[0] < low:
                self.report.add(what, where, "first key below the parent's separator", node.keys[0], f">= {low}")
            if high is not None and node.keys[-1] >= high:
                self.report.add(what, where, "last key not below the next separator", node.keys[-1], f"< {high}")
        elif level or path:
            self.report.add(what, where, "empty node below the root", 0, ">= 1 item")
        if node.level:
            children = []
            for slot, child in enumerate(node.vals):
                if self.drop_key is not None and slot + 1 < len(node.keys) and node.keys[slot + 1] <= self.drop_key:
                    continue
                if child[2] == 0:
                    self.node_refs[child[0]] += 1
                if child[1] > node.gen and child[2] == layer:
                    self.report.add("node", f"{where} slot {slot}", "child generation newer than its parent",
                                    child[1], f"<= {node.gen}")
                child_high = node.keys[slot + 1] if slot + 1 < len(node.keys) else high
                children.append(self._walk(tree, child, node.level - 1, node.keys[slot], child_high, path + [slot]))
            if not self.files or any(c is None for c in children):
                return None
            summary = _combine(children, f"({where})", self.scanner.inline_max, self.report.problems)
            self.summaries[visit_key] = summary
            return summary
        self.report.items += len(node.keys)
        for slot, (key, data) in enumerate(zip(node.keys, node.vals)):
            if key[1] == ondisk.EXTENT_DATA:
                try:
                    extent = FileExtent.decode(key[2], data, f"{where} slot {slot}")
                except CorruptionError:
                    continue    # the leaf scanner reports it
                if extent.kind == ondisk.FILE_EXTENT_REGULAR and extent.layer == 0:
                    self.data_refs[extent.disk_addr] += 1
                    self.data_lengths[extent.disk_addr].add(extent.disk_len)
                elif extent.kind == ondisk.FILE_EXTENT_REGULAR:
                    self.base_data.add((extent.layer, extent.disk_addr, extent.disk_len))
        if not self.files:
            return None
        summary = self.scanner.scan(node, where, self.report.problems)
        self.summaries[visit_key] = summary
        return summary


def check_volume(volume, check_files: bool = True, check_data: bool = False, progress=None,
                 report_unknown_items: bool = False) -> Report:
    """Check the committed state of volume (the running transaction must be empty).

    ``check_data`` also reads every data block and compares its CRC32C with
    the extent tree's.  ``progress(report)`` is called now and then during
    long walks.  Items of types that filesystems do not use are ignored (the
    B-tree tests store such items) unless ``report_unknown_items`` is set.
    """
    report = Report()
    walker = _Walker(volume, report, progress, report_unknown_items)
    walker.walk(volume.root_tree)
    walker.walk(volume.extent_tree)
    subvolumes = _subvolumes(volume, report)
    _check_identities(volume, report)
    for tree_id, item in subvolumes:
        report.subvolumes += 1
        tree = Tree(volume, tree_id, (item.root_addr, item.root_gen, item.root_layer), item.level,
                    item.last_snapshot, name=f"subvolume {tree_id}")
        if item.flags & ondisk.ROOT_DELETING:
            walker.walk(tree, drop_key=(item.drop_objectid, item.drop_type, item.drop_offset))
            continue
        summary = walker.walk(tree, files=True)
        if summary is not None and check_files:
            _check_subvolume_files(volume, tree, summary, walker, report)
    extents = _check_extents(volume, walker, report)
    if check_data:
        _check_base_data(volume, sorted(walker.base_data), report)
        _check_data(volume, extents, report, progress)
    return report


def _subvolumes(volume, report: Report) -> list:
    out = []
    try:
        for key, data in volume.root_tree.items((0, 0, 0)):
            if key[1] != ondisk.ROOT_ITEM:
                continue
            try:
                out.append((key[0], RootItem.decode(data, f"in root tree key {key}")))
            except CorruptionError as exc:
                report.add_corruption(exc)
    except CorruptionError:
        pass  # the walk of the root tree reported the node
    return out


def _check_identities(volume, report: Report) -> None:
    """Check every SUBVOL_UUID item against the ROOT_ITEMs and the other subvolumes' UUIDs."""
    items: dict[int, RootItem] = {}
    stored: dict[int, tuple] = {}
    try:
        for key, data in volume.root_tree.items((0, 0, 0)):
            if key[1] == ondisk.ROOT_ITEM:
                try:
                    items[key[0]] = RootItem.decode(data, f"in root tree key {key}")
                except CorruptionError:
                    pass    # _subvolumes reports it
            elif key[1] == ondisk.SUBVOL_UUID:
                stored[key[0]] = (key, data)
    except CorruptionError:
        return  # the walk of the root tree reported the node
    uuids: dict[bytes, int] = {}
    received: dict[bytes, int] = {}
    for tree_id in sorted(set(items) | set(stored)):
        item = items.get(tree_id)
        where = f"of subvolume {tree_id}"
        if tree_id not in stored:
            if item is not None and not item.flags & ondisk.ROOT_DELETING:
                uuids.setdefault(derived_uuid(volume.uuid, tree_id, item), tree_id)
            continue
        key, data = stored[tree_id]
        what = "SUBVOL_UUID item"
        drop = ("subvol_uuid", key)
        if key[2] != 0:
            report.add(what, where, "key offset is not 0", key[2], 0, repair=drop)
            continue
        if item is None:
            report.add(what, where, "no ROOT_ITEM for this tree id", repair=drop)
            continue
        if item.flags & ondisk.ROOT_DELETING:
            report.add(what, where, "left behind by a deleted subvolume", repair=drop)
            continue
        try:
            identity = Identity.decode(data, f"in root tree key {key}")
        except CorruptionError as exc:
            report.add(what, where, exc.why, exc.found, exc.expected, repair=drop)
            continue
        if identity.uuid == ZERO_UUID:
            report.add(what, where, "UUID is all zeros", repair=drop)
        elif identity.uuid in uuids:
            report.add(what, where, f"UUID also belongs to subvolume {uuids[identity.uuid]}", identity.uuid.hex(),
                       "a UUID of its own")
        else:
            uuids[identity.uuid] = tree_id
        if not identity.received:
            if identity.sent_gen or identity.received_gen:
                report.add(what, where, "generations of a receive without a received UUID",
                           (identity.sent_gen, identity.received_gen), (0, 0))
            continue
        if not item.flags & ondisk.ROOT_READONLY:
            report.add(what, where, "received subvolume is writable", "writable", "read-only")
        if identity.received_gen > volume.generation:
            report.add(what, where, "received in a generation newer than the superblock's",
                       identity.received_gen, f"<= {volume.generation}")
        if identity.received_uuid in received:
            report.add(what, where, f"received UUID also belongs to subvolume {received[identity.received_uuid]}",
                       identity.received_uuid.hex(), "a received UUID of its own")
        else:
            received[identity.received_uuid] = tree_id


def _check_subvolume_files(volume, tree: Tree, summary: _Summary, walker: _Walker, report: Report) -> None:
    sub = f"in subvolume {tree.tree_id}"
    for run in summary.runs:
        _finish_run(run, sub, walker.scanner.inline_max, report.problems)
    if summary.total == 0 and (summary.roots == 1 or (summary.roots == 0 and not summary.runs)):
        return  # consistent, or a tree without filesystem items
    # Some cross-inode fact does not cancel: read the subvolume item by item to name it.
    report.exact_passes += 1
    before = len(report.problems)
    exact = _ExactFileCheck(report, tree.tree_id)
    try:
        for key, data in tree.items():
            exact.visit(key, data)
    except CorruptionError as exc:
        report.add_corruption(exc)
        return
    exact.end()
    if len(report.problems) == before:
        report.add("subvolume", f"{tree.tree_id}", "directory entries, INODE_REFs, link counts or orphan items "
                   "disagree, but no single inode could be named", f"{summary.total:#x}/{summary.roots}", "0/1")


def add_to_chunks(sums: dict, addr: int, length: int) -> None:
    """Add the bytes of extent [addr, addr + length) to sums, per chunk index."""
    end = addr + length
    while addr < end:
        chunk = addr // ondisk.CHUNK_SIZE
        part = min(end, (chunk + 1) * ondisk.CHUNK_SIZE) - addr
        sums[chunk] = sums.get(chunk, 0) + part
        addr += part


def _check_extents(volume, walker: _Walker, report: Report) -> list:
    """Compare the extent tree with the counted pointers; return the data extents [(addr, length, csums)]."""
    bytes_used = 0
    chunk_sums: dict[int, int] = {}
    previous_end = ondisk.FIRST_ALLOC
    extent_items: set[int] = set()
    data_extents = []
    try:
        items = list(volume.extent_tree.items((0, 0, 0)))
    except CorruptionError:
        items = []  # the walk of the extent tree reported the node
        report.add("extent tree", "at its root", "unreadable: reference counts and leaks were not checked")
    for key, data in items:
        if key[1] != ondisk.EXTENT_ITEM:
            report.add("extent item", f"key {key}", "item type not valid in the extent tree", key[1],
                       ondisk.EXTENT_ITEM)
            continue
        addr, _, length = key
        where = f"{addr}+{length}"
        if len(data) < EXTENT.size:
            report.add("extent item", where, "too short", len(data), f">= {EXTENT.size}")
            continue
        refs, _gen, flags, _owner = EXTENT.unpack_from(data)
        bytes_used += length
        add_to_chunks(chunk_sums, addr, length)
        extent_items.add(addr)
        if addr < previous_end:
            report.add("extent item", where, "overlaps the previous extent or the superblock area", addr,
                       f">= {previous_end}")
        if addr % BLOCK or length % BLOCK or not length:
            report.add("extent item", where, "not block aligned", f"{addr}+{length}", "multiples of 4096")
        previous_end = max(previous_end, addr + length)
        if addr + length > volume.free.high_water:
            report.add("extent item", where, "lies past the end of the image", addr + length,
                       f"<= {volume.free.high_water}")
        if flags == ondisk.EXTENT_FLAG_TREE_BLOCK:
            expected = walker.node_refs.get(addr, 0)
            if length != volume.nodesize:
                report.add("extent item", where, "tree block of the wrong length", length, volume.nodesize)
            if addr in walker.data_refs:
                report.add("extent", where, "tree block also referenced as file data",
                           walker.data_refs[addr], 0)
        elif flags == ondisk.EXTENT_FLAG_DATA:
            expected = walker.data_refs.get(addr, 0)
            report.data_extents += 1
            report.data_bytes += length
            if len(data) - EXTENT.size != length // BLOCK * 4:
                report.add("extent item", where, "checksum array of the wrong size", len(data) - EXTENT.size,
                           length // BLOCK * 4)
            else:
                data_extents.append((addr, length, data[EXTENT.size:]))
            if addr in walker.node_refs:
                report.add("extent", where, "data extent also referenced as a tree block",
                           walker.node_refs[addr], 0)
            wrong = sorted(walker.data_lengths.get(addr, set()) - {length})
            if wrong:
                report.add("file extent", f"pointing at extent {where}", "disk length differs from the extent item",
                           wrong, length)
        else:
            report.add("extent item", where, "invalid flags", flags, "DATA or TREE_BLOCK")
            continue
        if expected == 0:
            report.add("extent", where, "allocated but not referenced (leaked)", refs, 0, kind="leak",
                       repair=("leak", addr, length))
        elif refs != expected:
            report.add("extent", where, "reference count differs from the pointers found", refs, expected,
                       repair=("refs", addr, length, expected))
    if items:
        counted = set(walker.node_refs) | set(walker.data_refs)
        for addr in sorted(counted - extent_items):
            kind = "node" if addr in walker.node_refs else "data extent"
            report.add(kind, f"at block {addr}", "referenced but has no EXTENT_ITEM (free space in use)")
        if bytes_used != volume.bytes_used:
            report.add("superblock", f"generation {volume.generation}", "bytes_used differs from the extent tree",
                       volume.bytes_used, bytes_used, repair=("bytes_used", bytes_used))
        try:
            recorded = volume._read_chunk_items()
        except CorruptionError as exc:
            report.add_corruption(exc)
            recorded = None
        if recorded is not None:
            for chunk in sorted(set(recorded) | set(chunk_sums)):
                if recorded.get(chunk, 0) != chunk_sums.get(chunk, 0):
                    report.add("chunk item", f"of chunk {chunk} (address {chunk * ondisk.CHUNK_SIZE}) in the root tree",
                               "bytes in use differ from the extent tree", recorded.get(chunk, 0),
                               chunk_sums.get(chunk, 0), repair=("chunks",))
    # Free runs in memory must not overlap allocated extents.
    free = volume.free
    for start, end in zip(free.starts, free.ends):
        try:
            hit = volume.extent_tree.floor((end - 1, 0xFF, 0xFFFFFFFFFFFFFFFF))
        except CorruptionError:
            break
        if hit is not None and hit[0][1] == ondisk.EXTENT_ITEM and hit[0][0] + hit[0][2] > start:
            report.add("free space", f"run {start}-{end}", "overlaps an allocated extent", hit[0][0], "no overlap")
    return data_extents


def _check_data(volume, extents: list, report: Report, progress=None) -> None:
    """Read every data block of every data extent once and compare its CRC32C."""
    dev = volume.dev
    for addr, length, csums in extents:
        for start in range(0, length, DATA_READ_BYTES):
            size = min(DATA_READ_BYTES, length - start)
            buf = dev.pread(addr + start, size)
            view = memoryview(buf)
            for block in range(0, size, BLOCK):
                index = (start + block) // BLOCK
                stored = int.from_bytes(csums[index * 4:index * 4 + 4], "little")
                part = view[block:block + BLOCK]
                where = f"at {addr + start + block} in extent {addr}+{length}"
                if len(part) < BLOCK:
                    report.add("data block", where, "short read, past the end of the image", len(part), BLOCK)
                    break
                report.data_blocks_checked += 1
                computed = crc32c(part)
                if computed != stored:
                    report.add("data block", where, "checksum mismatch", f"{computed:#010x}", f"{stored:#010x}")
        if progress is not None:
            progress(report)


def _check_base_data(volume, extents: list, report: Report) -> None:
    """Read the base images' data extents that this image's files use, checking each block."""
    for layer, addr, length in extents:
        base = volume.layers[layer] if layer < len(volume.layers) else None
        if base is None:
            report.add("file extent", f"pointing at extent {addr}+{length}", "names a base layer the image lacks",
                       layer, f"< {len(volume.layers)}")
            continue
        for start in range(0, length, DATA_READ_BYTES):
            size = min(DATA_READ_BYTES, length - start)
            try:
                base.read_data(addr, 0, start, size)
                report.data_blocks_checked += size // BLOCK
            except CorruptionError as exc:
                report.add(exc.what, f"{exc.where} of base image {base.path}", exc.why, exc.found, exc.expected)


# ---------------------------------------------------------------------------
# The exact, item-by-item filesystem pass


class _ExactFileCheck:
    """Cross-inode checks of one subvolume, fed every item in key order.

    Used only where the cancelling sums show a fault, to name it and to
    attach the repair that fixes it.
    """

    def __init__(self, report: Report, tree_id: int):
        self.report = report
        self.tree_id = tree_id
        self.inodes: dict[int, tuple] = {}                # ino -> (mode, nlink, size)
        self.index_entries: list = []                      # (dir, index, child, dtype, name)
        self.item_entries: Counter = Counter()             # (dir, name, child, dtype)
        self.refs: Counter = Counter()                     # (parent, index, child, name)
        self.orphans: set[int] = set()

    def visit(self, key, data) -> None:
        objectid, typ, offset = key
        where = f"key {key} in subvolume {self.tree_id}"
        try:
            if typ == ondisk.INODE_ITEM:
                inode = Inode.decode(objectid, data)
                self.inodes[objectid] = (inode.mode, inode.nlink, inode.size)
            elif typ == ondisk.DIR_INDEX:
                for child, dtype, name in decode_dirents(data, where):
                    self.index_entries.append((objectid, offset, child, dtype, name))
            elif typ == ondisk.DIR_ITEM:
                for child, dtype, name in decode_dirents(data, where):
                    self.item_entries[(objectid, name, child, dtype)] += 1
            elif typ == ondisk.INODE_REF:
                for index, name in decode_refs(data, where):
                    self.refs[(offset, index, objectid, name)] += 1
            elif typ == ondisk.ORPHAN_ITEM:
                self.orphans.add(offset)
        except CorruptionError:
            pass  # reported by the leaf scanner

    def end(self) -> None:
        report = self.report
        sub = f"in subvolume {self.tree_id}"
        tree_id = self.tree_id
        names: Counter = Counter()
        subdirs: Counter = Counter()
        name_bytes: Counter = Counter()
        refs = Counter(self.refs)
        items = Counter(self.item_entries)
        for dir_ino, index, child, dtype, name in self.index_entries:
            where = f"{name!r} in directory {dir_ino} {sub}"
            name_bytes[dir_ino] += len(name)
            info = self.inodes.get(child)
            if info is None:
                report.add("dir entry", where, "points to a missing inode", child, "an existing inode",
                           repair=("dangling", tree_id, dir_ino, index, name))
                refs[(dir_ino, index, child, name)] -= 1
                items[(dir_ino, name, child, dtype)] -= 1
                continue
            names[child] += 1
            if (info[0] >> 12) & 0xF != dtype:
                report.add("dir entry", where, "type differs from the inode", dtype, (info[0] >> 12) & 0xF)
            if stat_module.S_ISDIR(info[0]):
                subdirs[dir_ino] += 1
            if refs[(dir_ino, index, child, name)] > 0:
                refs[(dir_ino, index, child, name)] -= 1
            else:
                report.add("dir entry", where, f"no INODE_REF of inode {child} matches it", 0, 1)
            if items[(dir_ino, name, child, dtype)] > 0:
                items[(dir_ino, name, child, dtype)] -= 1
            else:
                report.add("dir entry", where, "DIR_INDEX without a matching DIR_ITEM", 0, 1)
        for (dir_ino, name, child, dtype), count in items.items():
            if count > 0:
                report.add("dir entry", f"{name!r} in directory {dir_ino} {sub}",
                           "DIR_ITEM without a matching DIR_INDEX", count, 0,
                           repair=("dangling_item", tree_id, dir_ino, name, child) if child not in self.inodes
                           else None)
        stale = {key for key, count in refs.items() if count > 0}
        for parent, index, child, name in sorted(stale):
            report.add("inode", f"{child} {sub}", f"INODE_REF names {name!r} in directory {parent}, "
                       "which has no such entry", 1, 0, repair=("stale_ref", tree_id, child, parent, name))
        for ino, (mode, nlink, size) in sorted(self.inodes.items()):
            where = f"{ino} {sub}"
            is_dir = stat_module.S_ISDIR(mode)
            if ino == ondisk.ROOT_DIR_INO:
                if not is_dir:
                    report.add("inode", where, "root directory is not a directory", oct(mode), "a directory")
                if names[ino]:
                    report.add("inode", where, "root directory has a name", names[ino], 0)
            elif names[ino] == 0 and ino not in self.orphans:
                report.add("inode", where, "not linked from any directory (orphan)", 0, ">= 1 entry",
                           repair=("orphan", tree_id, ino))
                continue
            elif ino in self.orphans and names[ino]:
                report.add("inode", where, "has an ORPHAN_ITEM but is linked", names[ino], 0)
            if is_dir:
                expected = 2 + subdirs[ino]
                if size != 2 * name_bytes[ino]:
                    report.add("inode", where, "directory size differs from its entries", size,
                               2 * name_bytes[ino], repair=("dirsize", tree_id, ino, 2 * name_bytes[ino]))
                if names[ino] > 1:
                    report.add("inode", where, "directory with more than one name", names[ino], 1)
            else:
                expected = names[ino]
            if nlink != expected:
                report.add("inode", where, "link count differs from the directory entries", nlink, expected,
                           repair=("nlink", tree_id, ino, expected))
        for ino in sorted(self.orphans - set(self.inodes)):
            report.add("orphan item", f"for inode {ino} {sub}", "names a missing inode", ino, "an existing inode",
                       repair=("orphan_item", tree_id, ino))
        if ondisk.ROOT_DIR_INO not in self.inodes and self.inodes:
            report.add("inode", f"{ondisk.ROOT_DIR_INO} {sub}", "root directory is missing")
