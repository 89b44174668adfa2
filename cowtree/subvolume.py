"""Subvolumes, snapshots, clones, rollback and space accounting.

A subvolume is one filesystem tree with a ROOT_ITEM (and, except for the
live filesystem, a ROOT_NAME) in the root tree.  A snapshot is made in O(1)
of the tree's size: the running transaction is committed, and the
snapshot's ROOT_ITEM points at the source's root node, whose reference
count goes up by one.  Later writes to either tree copy shared nodes lazily
(``Volume.cow``).

Deleting a subvolume removes its name at once and marks its ROOT_ITEM
DELETING; :func:`drop_pending` then frees its nodes over several commits,
recording in the ROOT_ITEM the key below which everything is already
dropped, so that a crash resumes the drop where the last commit left it.
It descends only into nodes that the dying tree alone references.

Each subvolume has an :class:`Identity`: a UUID, and for one made by
``cowtree receive`` the UUID and generation of the snapshot it was
received from.  Send streams name snapshots by it (:mod:`cowtree.send`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid as uuid_module
from bisect import bisect_right

from . import ondisk
from .btree import Tree
from .errors import CorruptionError, Exists, InvalidArgument, NotFound
from .fs import FileSystem
from .transaction import RootItem

log = logging.getLogger(__name__)

ROOT_ITEM = ondisk.ROOT_ITEM
ROOT_NAME = ondisk.ROOT_NAME
SUBVOL_UUID = ondisk.SUBVOL_UUID
UUID_ITEM = ondisk.SUBVOL_UUID_CODEC
ZERO_UUID = bytes(16)
READONLY = ondisk.ROOT_READONLY
DELETING = ondisk.ROOT_DELETING
LIVE = ondisk.FS_TREE_ID
DROP_BATCH = 2000   # nodes freed per commit while dropping a subvolume


@dataclasses.dataclass
class Identity:
    """The identity of a subvolume: the fields of its SUBVOL_UUID item, stored or derived."""

    uuid: bytes
    parent_uuid: bytes = ZERO_UUID
    received_uuid: bytes = ZERO_UUID
    sent_gen: int = 0
    received_gen: int = 0
    stored: bool = True       # False: derived for a subvolume without the item

    @property
    def received(self) -> bool:
        return self.received_uuid != ZERO_UUID

    def encode(self) -> bytes:
        return UUID_ITEM.pack(self.uuid, self.parent_uuid, self.received_uuid, self.sent_gen, self.received_gen)

    @classmethod
    def decode(cls, data: bytes, where: str) -> "Identity":
        if len(data) != UUID_ITEM.size:
            raise CorruptionError("item", where, "SUBVOL_UUID has the wrong size", len(data), UUID_ITEM.size)
        return cls(*UUID_ITEM.unpack(data))


def derived_uuid(image_uuid: bytes, tree_id: int, item: RootItem) -> bytes:
    """Return the UUID of a subvolume that has no SUBVOL_UUID item (spec/format.md, section 4.1)."""
    name = f"subvolume {tree_id} {item.created_gen} {item.created_ns}"
    return uuid_module.uuid5(uuid_module.UUID(bytes=image_uuid), name).bytes


def format_uuid(raw: bytes) -> str:
    """Return a UUID in the usual 8-4-4-4-12 form, or "-" for all zeros."""
    return "-" if raw == ZERO_UUID else str(uuid_module.UUID(bytes=raw))


@dataclasses.dataclass
class Subvolume:
    """The root tree's record of one subvolume: its tree id, name, ROOT_ITEM and identity."""

    tree_id: int
    name: bytes
    item: RootItem
    identity: Identity

    @property
    def readonly(self) -> bool:
        return bool(self.item.flags & READONLY)

    @property
    def deleting(self) -> bool:
        return bool(self.item.flags & DELETING)

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", "surrogateescape") if self.name else "(live)"

    @property
    def stream_identity(self) -> tuple[bytes, int]:
        """Return the (UUID, generation) that names this subvolume's content in send streams.

        A received subvolume contains what the sent snapshot contained, so it
        goes by that snapshot's UUID and generation, as Btrfs uses received_uuid.
        That lets a stream sent on from it find the first sender's
        snapshots as parents.  Any other subvolume goes by its own UUID and
        the generation that created it.
        """
        if self.identity.received:
            return self.identity.received_uuid, self.identity.sent_gen
        return self.identity.uuid, self.item.created_gen


def check_snapshot_name(name: bytes) -> None:
    """Raise unless name is a valid snapshot name."""
    if not name or name in (b".", b".."):
        raise InvalidArgument(f"invalid snapshot name {name!r}")
    if len(name) > ondisk.NAME_MAX:
        raise InvalidArgument("invalid snapshot name: longer than 255 bytes")
    for bad in (b"/", b":", b"@", b"\0"):
        if bad in name:
            raise InvalidArgument(f"invalid snapshot name {name!r}: contains {bad.decode()!r}")


def list_subvolumes(volume, include_deleting: bool = False) -> list[Subvolume]:
    """Return every subvolume, the live one first, then by id."""
    names: dict[int, bytes] = {}
    items: dict[int, RootItem] = {}
    identities: dict[int, Identity] = {}
    for key, data in volume.root_tree.items((ondisk.FS_TREE_ID, 0, 0)):
        if key[1] == ROOT_ITEM:
            items[key[0]] = RootItem.decode(data, f"in root tree key {key}")
        elif key[1] == ROOT_NAME:
            names[key[0]] = bytes(data)
        elif key[1] == SUBVOL_UUID:
            identities[key[0]] = Identity.decode(data, f"in root tree key {key}")
    # Trees changed in the running transaction carry newer root items in memory.
    for tree_id, tree in volume.trees.items():
        if tree_id in items and getattr(tree, "root_item", None) is not None:
            items[tree_id] = tree.root_item
    out = []
    for tree_id in sorted(items):
        identity = identities.get(tree_id)
        if identity is None:
            identity = Identity(derived_uuid(volume.uuid, tree_id, items[tree_id]), stored=False)
        sub = Subvolume(tree_id, names.get(tree_id, b""), items[tree_id], identity)
        if sub.deleting and not include_deleting:
            continue
        out.append(sub)
    return out


def find(volume, name: bytes | None) -> Subvolume:
    """Return the subvolume called name (None or b"" for the live filesystem)."""
    for sub in list_subvolumes(volume):
        if (not name and sub.tree_id == LIVE) or (name and sub.name == name):
            return sub
    raise NotFound(f"snapshot '{name.decode('utf-8', 'surrogateescape')}' not found")


def open_filesystem(volume, name: bytes | str | None = None) -> FileSystem:
    """Return the FileSystem of a snapshot by name, or of the live filesystem."""
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    sub = find(volume, name)
    return FileSystem(volume, sub.tree_id, readonly=sub.readonly,
                      label=f"{volume.path}@{sub.display_name}" if name else volume.path)


def _next_id(volume) -> int:
    highest = ondisk.FIRST_SUBVOL_ID - 1
    for key, _ in volume.root_tree.items((ondisk.FIRST_SUBVOL_ID, 0, 0)):
        if key[1] == ROOT_ITEM:
            highest = max(highest, key[0])
    for tree_id in volume.trees:
        highest = max(highest, tree_id)
    return highest + 1


def check_new_name(volume, name: bytes) -> None:
    """Raise unless name is a valid snapshot name that no subvolume of volume has."""
    check_snapshot_name(name)
    if any(sub.name == name for sub in list_subvolumes(volume, include_deleting=False)):
        raise Exists(f"snapshot '{name.decode('utf-8', 'surrogateescape')}' already exists")


def create_snapshot(volume, name: bytes, source: bytes | None = None, writable: bool = False) -> Subvolume:
    """Snapshot the live filesystem (or the snapshot called source) as name.

    Commits the running transaction first, then commits the snapshot.
    """
    volume.check_writable()
    check_new_name(volume, name)
    src_sub = find(volume, source)
    # The source's nodes must all belong to committed generations, so that
    # none of them is changed in place once the snapshot shares it.
    volume.commit()
    identity = Identity(uuid_module.uuid4().bytes, parent_uuid=src_sub.identity.uuid)
    tree_id = add_snapshot(volume, src_sub, name, 0 if writable else READONLY, identity)
    volume.commit()
    log.info("created snapshot %r (id %d) of subvolume %d at generation %d", name, tree_id, src_sub.tree_id,
             volume.generation)
    return find(volume, name)


def add_snapshot(volume, src_sub: Subvolume, name: bytes, flags: int, identity: Identity) -> int:
    """Add a snapshot of src_sub called name to the running transaction; return its tree id.

    Nothing is committed.  The source tree must be unchanged in the running
    transaction, so that every node the snapshot shares belongs to a
    committed generation and is copied, not changed in place, on the next
    write through either tree.
    """
    src = volume.tree(src_sub.tree_id)
    transid = volume.transid
    if src.root_ptr[1] == transid and src.root_ptr[2] == 0:
        raise RuntimeError(f"subvolume {src_sub.tree_id} changed in the running transaction; commit before "
                           f"snapshotting it")
    tree_id = _next_id(volume)
    item = dataclasses.replace(
        src.root_item, flags=flags, parent_id=src_sub.tree_id, created_gen=transid,
        created_ns=time.time_ns(), last_snapshot=transid, drop_objectid=0, drop_type=0, drop_offset=0,
        drop_level=0)
    snap = Tree(volume, tree_id, (0, 0, 0), src.level, transid, name=f"subvolume {tree_id}")
    snap.root_item = item
    copy_root(volume, src, snap)
    volume.trees[tree_id] = snap
    src.last_snapshot = transid
    src.changed = True
    volume.root_tree.put((tree_id, ROOT_NAME, 0), name)
    volume.root_tree.put((tree_id, SUBVOL_UUID, 0), identity.encode())
    volume.use_features(compat=ondisk.COMPAT_SUBVOL_UUID)
    return tree_id


def add_empty_subvolume(volume, name: bytes, flags: int, identity: Identity) -> int:
    """Add an empty subvolume tree called name to the running transaction; return its tree id.

    The tree has no root directory yet; nothing is committed.
    """
    tree_id = _next_id(volume)
    item = RootItem(flags=flags, created_gen=volume.transid, created_ns=time.time_ns())
    volume.create_tree(tree_id, item)
    volume.root_tree.put((tree_id, ROOT_NAME, 0), name)
    volume.root_tree.put((tree_id, SUBVOL_UUID, 0), identity.encode())
    volume.use_features(compat=ondisk.COMPAT_SUBVOL_UUID)
    return tree_id


def copy_root(volume, src: Tree, dst: Tree) -> None:
    """Point dst at src's root node, which gains a reference.

    Nothing else is written: the first change through either tree copies
    the root and adds a reference to each of its children (Volume.cow).
    """
    addr, _gen, layer = src.root_ptr
    if layer == 0:
        volume.add_ref(addr, volume.nodesize, +1)
    dst.root_ptr = src.root_ptr
    dst.level = src.level
    dst.changed = True


def delete_subvolume(volume, name: bytes, progress=None) -> None:
    """Delete the snapshot called name and free the space only it used."""
    volume.check_writable()
    sub = find(volume, name)
    if sub.tree_id == LIVE:
        raise InvalidArgument("the live filesystem cannot be deleted")
    tree = volume.tree(sub.tree_id)
    tree.root_item.flags |= DELETING
    tree.root_item.drop_objectid = tree.root_item.drop_type = tree.root_item.drop_offset = 0
    tree.changed = True
    volume.root_tree.delete((sub.tree_id, ROOT_NAME, 0))
    volume.root_tree.delete((sub.tree_id, SUBVOL_UUID, 0))
    volume.commit()
    drop_pending(volume, progress)


def drop_pending(volume, progress=None) -> int:
    """Finish every interrupted or pending subvolume deletion; return nodes freed."""
    freed = 0
    for sub in list_subvolumes(volume, include_deleting=True):
        if sub.deleting:
            freed += _drop(volume, sub.tree_id, progress)
    return freed


def _drop(volume, tree_id: int, progress=None) -> int:
    tree = volume.tree(tree_id)
    item = tree.root_item
    total = 0
    while True:
        start = (item.drop_objectid, item.drop_type, item.drop_offset)
        dropper = _Dropper(volume, tree, start, DROP_BATCH)
        done = dropper.visit(tree.root_ptr, tree.level, start == ondisk.MIN_KEY)
        total += dropper.freed
        if done:
            volume.root_tree.delete((tree_id, ROOT_ITEM, 0))
            # Deleting a subvolume removes this item at once; a drop that an
            # older version started may have left it.
            volume.root_tree.delete((tree_id, SUBVOL_UUID, 0))
            volume.trees.pop(tree_id, None)
            volume.commit()
            log.info("dropped subvolume %d: %d nodes freed", tree_id, total)
            if progress:
                progress(total, True)
            return total
        item.drop_objectid, item.drop_type, item.drop_offset = dropper.resume_key
        item.drop_level = dropper.resume_level
        tree.changed = True
        volume.commit()
        if progress:
            progress(total, False)


class _Dropper:
    """One bounded step of a subvolume drop, in key order from a resume key."""

    def __init__(self, volume, tree, start, budget):
        self.vol = volume
        self.tree = tree
        self.start = start
        self.budget = budget
        self.freed = 0
        self.resume_key = None
        self.resume_level = 0

    def visit(self, ptr, level, fresh: bool) -> bool:
        """Drop the subtree at ptr from self.start on; return False when the budget ran out.

        ``fresh`` means that every key below ptr is at or after the start
        key, so no earlier step touched this subtree.  Only such a subtree
        may be shared: a partly dropped one was found unshared and descended.
        """
        vol = self.vol
        addr, _gen, layer = ptr
        if layer:
            return True
        if fresh and vol.refcount(addr, vol.nodesize) > 1:
            vol.add_ref(addr, vol.nodesize, -1)
            return True
        node = vol.read_node(ptr, level, self.tree)
        if node.level == 0:
            vol.ref_children(node, -1)
        else:
            keys = node.keys
            first = max(0, bisect_right(keys, self.start) - 1)
            for slot in range(first, len(keys)):
                child_fresh = keys[slot] >= self.start
                if child_fresh and self.freed >= self.budget:
                    self.resume_key = keys[slot]
                    self.resume_level = node.level
                    return False
                if not self.visit(node.vals[slot], node.level - 1, child_fresh):
                    return False
        vol.forget_node(addr)
        vol.add_ref(addr, vol.nodesize, -1)
        self.freed += 1
        return True


def rollback(volume, name: bytes) -> None:
    """Make the live filesystem's content that of the snapshot called name.

    Changes made to the live filesystem since then are discarded; the old
    live tree is dropped like a deleted subvolume.
    """
    volume.check_writable()
    snap_sub = find(volume, name)
    if snap_sub.tree_id == LIVE:
        raise InvalidArgument("cannot roll the live filesystem back to itself")
    volume.commit()
    live = volume.tree(LIVE)
    snap = volume.tree(snap_sub.tree_id)
    transid = volume.transid
    # The old live tree becomes an anonymous subvolume that is being dropped.
    old_id = _next_id(volume)
    old = Tree(volume, old_id, live.root_ptr, live.level, live.last_snapshot, name=f"subvolume {old_id}")
    old.root_item = dataclasses.replace(live.root_item, flags=DELETING, drop_objectid=0, drop_type=0,
                                        drop_offset=0, drop_level=0)
    old.changed = True
    volume.trees[old_id] = old
    copy_root(volume, snap, live)
    live.root_item.next_ino = max(live.root_item.next_ino, snap.root_item.next_ino)
    live.last_snapshot = transid
    snap.last_snapshot = transid
    snap.changed = True
    volume.commit()
    drop_pending(volume)


@dataclasses.dataclass
class Usage:
    """Bytes a subvolume or a path references: in total, alone, and shared."""

    total: int = 0
    exclusive: int = 0
    shared: int = 0

    def add(self, nbytes: int, shared: bool) -> None:
        self.total += nbytes
        if shared:
            self.shared += nbytes
        else:
            self.exclusive += nbytes


class UsageCounter:
    """Computes Usage of subvolumes, visiting each shared subtree once.

    A node whose count is above one is shared by several trees, and so is
    everything below it: the bytes below it are computed once, cached by
    address, and counted as shared.  Below an unshared node, a data extent
    counts as shared when its own count is above one (a reflink or a leaf
    that another tree shares).
    """

    def __init__(self, volume):
        self.vol = volume
        self.subtree_bytes: dict[int, int] = {}
        self.refcounts: dict[int, int] = {}

    def _refs(self, addr: int, length: int) -> int:
        refs = self.refcounts.get(addr)
        if refs is None:
            refs = self.vol.refcount(addr, length)
            self.refcounts[addr] = refs
        return refs

    def subvolume(self, tree_id: int) -> Usage:
        tree = self.vol.tree(tree_id)
        usage = Usage()
        self._walk(tree, tree.root_ptr, tree.level, False, usage)
        return usage

    def _walk(self, tree, ptr, level, shared, usage) -> None:
        addr = ptr[0]
        vol = self.vol
        # A base image's node is shared with the base; deleting this
        # subvolume never frees it.
        if not shared and (ptr[2] != 0 or self._refs(addr, vol.nodesize) > 1):
            usage.add(self._subtree(tree, ptr, level), True)
            return
        node = vol.read_node(ptr, level, tree)
        usage.add(vol.nodesize, shared)
        if node.level:
            for child in node.vals:
                self._walk(tree, child, node.level - 1, shared, usage)
            return
        for key, data in zip(node.keys, node.vals):
            if key[1] == ondisk.EXTENT_DATA and data[8] == ondisk.FILE_EXTENT_REGULAR:
                disk_addr, disk_len, _, num_bytes, layer = ondisk.FILE_EXTENT_REG_CODEC.unpack_from(data, 9)
                extent_shared = shared or layer != 0 or self._refs(disk_addr, disk_len) > 1
                usage.add(num_bytes, extent_shared)

    def _subtree(self, tree, ptr, level) -> int:
        """Return the bytes of nodes and file extents below ptr, cached by address."""
        addr = ptr[0]
        cached = self.subtree_bytes.get(addr)
        if cached is not None:
            return cached
        node = self.vol.read_node(ptr, level, tree)
        total = self.vol.nodesize
        if node.level:
            for child in node.vals:
                total += self._subtree(tree, child, node.level - 1)
        else:
            for key, data in zip(node.keys, node.vals):
                if key[1] == ondisk.EXTENT_DATA and data[8] == ondisk.FILE_EXTENT_REGULAR:
                    total += ondisk.FILE_EXTENT_REG_CODEC.unpack_from(data, 9)[3]
        self.subtree_bytes[addr] = total
        return total

    def path(self, fs: FileSystem, ino: int) -> Usage:
        """Return the file-data Usage of the files at or below inode ino."""
        usage = Usage()
        tree = fs.tree
        shared_cache: dict[int, bool] = {}
        stack = [ino]
        seen = set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            inode = fs.get_inode(current)
            if inode.is_dir:
                stack.extend(child for _, _, child, _ in fs.readdir(current))
                continue
            if not inode.is_reg:
                continue
            for extent in fs.extents(current):
                if extent.kind != ondisk.FILE_EXTENT_REGULAR:
                    continue
                leaf_shared = self._leaf_shared(tree, (current, ondisk.EXTENT_DATA, extent.offset), shared_cache)
                extent_shared = leaf_shared or extent.layer != 0 or self._refs(extent.disk_addr, extent.disk_len) > 1
                usage.add(extent.num_bytes, extent_shared)
        return usage

    def _leaf_shared(self, tree, key, cache) -> bool:
        """Return True when any node on the path to key is shared with another tree."""
        vol = self.vol
        ptr, level = tree.root_ptr, tree.level
        while True:
            addr = ptr[0]
            shared = cache.get(addr)
            if shared is None:
                shared = ptr[2] != 0 or self._refs(addr, vol.nodesize) > 1
                cache[addr] = shared
            if shared:
                return True
            node = vol.read_node(ptr, level, tree)
            if node.level == 0:
                return False
            slot = max(0, bisect_right(node.keys, key) - 1)
            ptr, level = node.vals[slot], node.level - 1
