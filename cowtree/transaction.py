"""An open image: the node cache, copy-on-write with reference counts, data
extents, and the commit that swaps the superblock.

One transaction is always running on a writable volume.  ``commit`` ends it
and starts the next; ``abort`` drops it and returns to the last commit.

The copy-on-write rule (:meth:`Volume.cow`): a node written in the running
transaction is changed in place.  Any other node is copied to a new address
first.  If the old node was shared (its reference count is above one) the
copy takes a new reference on each of its children, as Rodeh's lazy
reference counting does, and the old node loses one reference; otherwise the
children simply move to the copy.  A node born after its tree's last
snapshot cannot be shared, so that case skips the reference count look-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid as uuid_module
from collections import OrderedDict

from . import ondisk
from .alloc import DelayedRef, FreeSpace
from .blockdev import ImageFile, Superblock, read_superblocks, write_superblock
from .btree import Tree
from .checksum import crc32c
from .errors import CorruptionError, CowtreeError, NoSpaceError, NotAnImageError, ReadOnly, UnsupportedFeatureError
from .node import HEADER_SIZE, ITEM_SIZE, Node, decode, encode

log = logging.getLogger(__name__)

EXTENT = ondisk.EXTENT_ITEM_CODEC
ROOT = ondisk.ROOT_ITEM_CODEC
FE_HEAD = ondisk.FILE_EXTENT_HEAD_CODEC
FE_REG = ondisk.FILE_EXTENT_REG_CODEC
BLOCK = ondisk.BLOCK_SIZE
KIND_REGULAR = ondisk.FILE_EXTENT_REGULAR
FE_LAYER_OFFSET = FE_REG.size - 2   # the layer is the last field of a regular extent

# A cache key of a base image's node: its address with the layer in the top bits.
LAYER_SHIFT = 56

DEFAULT_CACHE_BYTES = 96 << 20
DEFAULT_DIRTY_BYTES = 96 << 20
DATA_BUFFER_BYTES = 8 << 20
# Nodes one filesystem operation may copy or add: a few items in a few
# trees, each a root-to-leaf path of at most 8 levels, some with a split.
OPERATION_NODES = 32


@dataclasses.dataclass
class RootItem:
    """The decoded ROOT_ITEM of a subvolume tree."""

    root_addr: int = 0
    root_gen: int = 0
    root_layer: int = 0
    level: int = 0
    flags: int = 0
    generation: int = 0
    last_snapshot: int = 0
    parent_id: int = 0
    created_gen: int = 0
    created_ns: int = 0
    next_ino: int = ondisk.FIRST_FREE_INO
    drop_objectid: int = 0
    drop_type: int = 0
    drop_offset: int = 0
    drop_level: int = 0

    def encode(self) -> bytes:
        return ROOT.pack(self.root_addr, self.root_gen, self.root_layer, self.level, self.flags,
                         self.generation, self.last_snapshot, self.parent_id, self.created_gen,
                         self.created_ns, self.next_ino, self.drop_objectid, self.drop_type,
                         self.drop_offset, self.drop_level)

    @classmethod
    def decode(cls, data: bytes, where: str) -> "RootItem":
        if len(data) != ROOT.size:
            raise CorruptionError("item", where, "ROOT_ITEM has the wrong size", len(data), ROOT.size)
        return cls(*ROOT.unpack(data))


def rebase_node(node: Node, layer: int) -> Node:
    """Return a copy of a base image's node with every pointer's layer raised by layer.

    Inside base image n, layer 0 means that base itself and layer k its k-th
    base, which are layers n and n + k of the image reading it.
    """
    if node.level:
        vals = [(addr, gen, child_layer + layer) for addr, gen, child_layer in node.vals]
    else:
        vals = list(node.vals)
        for slot, key in enumerate(node.keys):
            data = vals[slot]
            if key[1] == ondisk.EXTENT_DATA and len(data) > FE_HEAD.size and data[8] == KIND_REGULAR:
                raw = bytearray(data)
                at = FE_HEAD.size + FE_LAYER_OFFSET
                raw[at:at + 2] = (int.from_bytes(raw[at:at + 2], "little") + layer).to_bytes(2, "little")
                vals[slot] = bytes(raw)
    return Node(node.addr, node.gen, node.level, node.owner, list(node.keys), vals, layer)


class CrashPoint(Exception):
    """Raised by a test hook to stop a commit at a named step."""


class Volume:
    """An open image file and its running transaction."""

    def __init__(self, dev, sb: Superblock, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.dev = dev
        self.path = dev.path
        self.writable = dev.writable
        self.nodesize = sb.nodesize
        self.capacity = sb.nodesize - HEADER_SIZE
        self.uuid = sb.uuid
        self.cache_limit = max(64, cache_bytes // sb.nodesize)
        self.dirty_limit = max(64, DEFAULT_DIRTY_BYTES // sb.nodesize)
        self.crash_hook = None          # tests: called with a step name during commit
        self.strict = bool(os.environ.get("COWTREE_STRICT"))
        self.max_extent = ondisk.max_data_extent_blocks(sb.nodesize) * BLOCK
        # layers[0] is this image; layers[n] the n-th base image down the chain,
        # opened read-only by the layer code above (cowtree.layers).
        self.layers = [self]
        self.opened_size = dev.size()
        self._load(sb)
        if self.writable and self.opened_size > sb.image_bytes:
            # Blocks past the committed end belong to a transaction that never
            # committed, cut off by a crash: nothing reaches them.
            log.info("%s: giving back %d bytes past the end of generation %d", self.path,
                     self.opened_size - sb.image_bytes, sb.generation)
            dev.truncate(sb.image_bytes)
            self.opened_size = sb.image_bytes

    # -- opening and creating -------------------------------------------------

    @classmethod
    def open(cls, path: str, writable: bool = False, device=None, **kwargs) -> "Volume":
        """Open an image, choosing the newest valid superblock copy."""
        dev = device or ImageFile(path, writable)
        try:
            scan = read_superblocks(dev)
            sb = scan.chosen
            if sb.incompat_flags & ~ondisk.INCOMPAT_KNOWN:
                raise UnsupportedFeatureError(
                    f"{path}: image uses unknown incompatible features {sb.incompat_flags & ~ondisk.INCOMPAT_KNOWN:#x}")
            if writable and sb.ro_compat_flags & ~ondisk.RO_COMPAT_KNOWN:
                raise UnsupportedFeatureError(
                    f"{path}: image uses unknown features {sb.ro_compat_flags:#x}; it can only be opened read-only")
            size = dev.size()
            if size < sb.image_bytes:
                raise NotAnImageError(
                    f"{path}: image is truncated: superblock generation {sb.generation} needs {sb.image_bytes} bytes, "
                    f"the file has {size}")
            volume = cls(dev, sb, **kwargs)
            volume.superblock_scan = scan
            return volume
        except BaseException:
            if device is None:
                dev.close()
            raise

    @classmethod
    def create(cls, path: str, nodesize: int = ondisk.DEFAULT_NODE_SIZE, size_limit: int = 0,
               label: bytes = b"", device=None, incompat_flags: int = 0, root_items=()) -> "Volume":
        """Write a new image holding a root tree and an extent tree, and open it.

        ``root_items`` are (key, data) pairs the root tree starts with.  The
        file must exist, and is overwritten.
        """
        dev = device or ImageFile(path, True)
        uuid = uuid_module.uuid4().bytes
        now = time.time_ns()
        # Generation 1 holds an empty root tree and an empty extent tree,
        # each one leaf, written in the first allocatable blocks.
        root_addr = ondisk.FIRST_ALLOC
        extent_addr = root_addr + nodesize
        extent_leaf = Node(extent_addr, 1, 0, ondisk.EXTENT_TREE_ID, [], [])
        chunk_key = (ondisk.CHUNK_OBJECTID, ondisk.CHUNK_ITEM, 0)
        root_items = sorted(list(root_items) + [(chunk_key, ondisk.CHUNK_ITEM_CODEC.pack(2 * nodesize))])
        root_leaf = Node(root_addr, 1, 0, ondisk.ROOT_TREE_ID, [key for key, _ in root_items],
                         [bytes(data) for _, data in root_items])
        for addr, owner in ((root_addr, ondisk.ROOT_TREE_ID), (extent_addr, ondisk.EXTENT_TREE_ID)):
            extent_leaf.keys.append((addr, ondisk.EXTENT_ITEM, nodesize))
            extent_leaf.vals.append(EXTENT.pack(1, 1, ondisk.EXTENT_FLAG_TREE_BLOCK, owner))
        extent_leaf.used = sum(25 + len(v) for v in extent_leaf.vals)
        sb = Superblock(uuid=uuid, generation=1, nodesize=nodesize, size_limit=size_limit,
                        image_bytes=extent_addr + nodesize, bytes_used=2 * nodesize,
                        root_tree_addr=root_addr, root_tree_gen=1, extent_tree_addr=extent_addr,
                        extent_tree_gen=1, created_ns=now, label=label, incompat_flags=incompat_flags)
        dev.pwrite(root_addr, encode(root_leaf, uuid, nodesize))
        dev.pwrite(extent_addr, encode(extent_leaf, uuid, nodesize))
        dev.flush()
        # Both copies, so that the other copy never holds an older image's superblock.
        dev.pwrite(ondisk.SUPERBLOCK_OFFSETS[1], sb.encode())
        sb0 = dataclasses.replace(sb)
        dev.pwrite(ondisk.SUPERBLOCK_OFFSETS[0], sb0.encode())
        dev.flush()
        return cls(dev, sb)

    def _load(self, sb: Superblock) -> None:
        """Set up the in-memory state for the committed superblock sb."""
        self.sb = sb
        self.generation = sb.generation            # last committed
        self.transid = sb.generation + 1           # running transaction
        self.cache: OrderedDict[int, Node] = OrderedDict()
        self.dirty: dict[int, Node] = {}
        self.refs: dict[int, DelayedRef] = {}
        # What the commit will need for the delayed references (see commit_reserve).
        self.new_bytes = 0              # bytes of the extents allocated by this transaction
        self.new_item_bytes = 0         # bytes of the EXTENT_ITEMs the commit will insert for them
        self.old_refs = 0               # committed extents whose EXTENT_ITEM the commit will change
        self.committing = False
        # Feature bits that the running transaction starts to use.  The commit adds them to the superblock.
        self.new_compat = 0
        self.new_ro_compat = 0
        self.fresh: set[int] = set()               # addresses allocated in this transaction
        self.pinned: list[tuple[int, int]] = []
        self.bytes_used = sb.bytes_used
        self.csum_cache: OrderedDict[int, bytes] = OrderedDict()
        self.data_buffer: list = []
        self.data_buffer_start = 0
        self.data_buffer_len = 0
        # Counts the changes made to the running transaction, so that a caller
        # can tell whether a failed operation left anything to undo.
        self.changes = 0
        self.root_tree = Tree(self, ondisk.ROOT_TREE_ID, (sb.root_tree_addr, sb.root_tree_gen, 0),
                              sb.root_tree_level, name="root tree")
        self.chunk_used = self._read_chunk_items()
        self.chunk_delta: dict[int, int] = {}
        self.free = FreeSpace(self._scan_extents, ondisk.FIRST_ALLOC, sb.image_bytes, sb.size_limit, BLOCK,
                              self.chunk_used)
        self.extent_tree = Tree(self, ondisk.EXTENT_TREE_ID, (sb.extent_tree_addr, sb.extent_tree_gen, 0),
                                sb.extent_tree_level, name="extent tree")
        self.trees: dict[int, Tree] = {}
        # Check the two roots now, so that a damaged image fails at open.
        self.root_tree.root()
        self.extent_tree.root()

    def _read_chunk_items(self) -> dict[int, int]:
        """Return the committed bytes in use per chunk index, from the CHUNK_ITEMs of the root tree."""
        used = {}
        lo = (ondisk.CHUNK_OBJECTID, ondisk.CHUNK_ITEM, 0)
        hi = (ondisk.CHUNK_OBJECTID, ondisk.CHUNK_ITEM + 1, 0)
        for key, data in self.root_tree.items(lo, hi):
            if len(data) != ondisk.CHUNK_ITEM_CODEC.size or key[2] % ondisk.CHUNK_SIZE:
                raise CorruptionError("item", f"root tree key {key}", "invalid CHUNK_ITEM",
                                      f"{len(data)} bytes at {key[2]}", f"{ondisk.CHUNK_ITEM_CODEC.size} bytes "
                                      f"at a multiple of {ondisk.CHUNK_SIZE}")
            used[key[2] // ondisk.CHUNK_SIZE] = ondisk.CHUNK_ITEM_CODEC.unpack(data)[0]
        return used

    def _count_chunks(self, addr: int, length: int, sign: int) -> None:
        """Add sign times the bytes of extent [addr, addr + length) to each chunk it lies in."""
        size = ondisk.CHUNK_SIZE
        end = addr + length
        while addr < end:
            chunk = addr // size
            part = min(end, (chunk + 1) * size) - addr
            self.chunk_delta[chunk] = self.chunk_delta.get(chunk, 0) + sign * part
            addr += part

    def set_chunk_used(self, chunk: int, used: int) -> None:
        """Rewrite the CHUNK_ITEM of chunk index chunk to used bytes (fsck repair)."""
        key = (ondisk.CHUNK_OBJECTID, ondisk.CHUNK_ITEM, chunk * ondisk.CHUNK_SIZE)
        if used:
            self.chunk_used[chunk] = used
            self.root_tree.put(key, ondisk.CHUNK_ITEM_CODEC.pack(used))
        else:
            self.chunk_used.pop(chunk, None)
            self.root_tree.delete(key)

    def _write_chunk_items(self) -> None:
        """Record the chunk deltas of the extents applied so far in CHUNK_ITEMs."""
        deltas = self.chunk_delta
        self.chunk_delta = {}
        for chunk, delta in sorted(deltas.items()):
            if not delta:
                continue
            used = self.chunk_used.get(chunk, 0) + delta
            key = (ondisk.CHUNK_OBJECTID, ondisk.CHUNK_ITEM, chunk * ondisk.CHUNK_SIZE)
            if used < 0:
                raise CorruptionError("item", f"root tree key {key}", "chunk use below zero", used, ">= 0")
            self.set_chunk_used(chunk, used)

    def pending_bytes(self) -> int:
        """Return the bytes of extents allocated by the running transaction.

        bytes_used counts committed extents only; this adds what the next
        commit will add.  Extents freed by the running transaction still
        count until then, because their space is not free before it.
        """
        return self.new_bytes

    @property
    def reserve(self) -> int:
        """Bytes of the size limit kept for deletions: 64 nodes, at least 1 MiB."""
        return max(1 << 20, 64 * self.nodesize)

    def close(self) -> None:
        for volume in self.layers[1:]:
            volume.dev.close()
        self.dev.close()

    # -- subvolume trees --------------------------------------------------------

    def tree(self, tree_id: int) -> Tree:
        """Return the open Tree of a subvolume; raise KeyError when it does not exist."""
        tree = self.trees.get(tree_id)
        if tree is not None:
            return tree
        data = self.root_tree.get((tree_id, ondisk.ROOT_ITEM, 0))
        if data is None:
            raise KeyError(tree_id)
        item = RootItem.decode(data, f"in root tree key ({tree_id}, ROOT_ITEM, 0)")
        tree = Tree(self, tree_id, (item.root_addr, item.root_gen, item.root_layer), item.level,
                    item.last_snapshot, name=f"subvolume {tree_id}")
        tree.root_item = item
        self.trees[tree_id] = tree
        return tree

    def create_tree(self, tree_id: int, item: RootItem | None = None) -> Tree:
        """Create an empty subvolume tree with id tree_id."""
        self.check_writable()
        tree = Tree(self, tree_id, (0, 0, 0), 0, name=f"subvolume {tree_id}")
        leaf = self.new_node(0, tree)
        tree.root_ptr = leaf.ptr
        tree.changed = True
        tree.root_item = item or RootItem(created_gen=self.transid, created_ns=time.time_ns())
        self.trees[tree_id] = tree
        return tree

    def subvolume_ids(self) -> list[int]:
        return [key[0] for key, _ in self.root_tree.items((0, ondisk.ROOT_ITEM, 0))
                if key[1] == ondisk.ROOT_ITEM]

    # -- nodes --------------------------------------------------------------

    def read_node(self, ptr, level, tree) -> Node:
        """Return the checked node at block pointer ptr (address, generation, layer)."""
        addr, gen, layer = ptr
        if layer:
            return self._read_base_node(addr, gen, layer, level, tree)
        node = self.cache.get(addr)
        if node is not None and node.gen == gen:
            self.cache.move_to_end(addr)
            return node
        self._flush_data()
        buf = self.dev.pread(addr, self.nodesize)
        node = decode(buf, self.uuid, self.nodesize, addr, gen, level, layer, tree.name if tree else "")
        if node.owner != tree.tree_id and tree.tree_id in (ondisk.ROOT_TREE_ID, ondisk.EXTENT_TREE_ID):
            raise CorruptionError("node", f"at block {addr} in {tree.name}", "node belongs to another tree",
                                  node.owner, tree.tree_id)
        self._cache_put(node)
        return node

    def _read_base_node(self, addr: int, gen: int, layer: int, level, tree) -> Node:
        """Return the node at addr in base image ``layer``, its pointers renumbered for this image."""
        key = addr | layer << LAYER_SHIFT
        node = self.cache.get(key)
        if node is not None and node.gen == gen:
            self.cache.move_to_end(key)
            return node
        if layer >= len(self.layers):
            raise CorruptionError("block pointer", f"to block {addr} in {tree.name}",
                                  "names a base layer this image does not have", layer, f"< {len(self.layers)}")
        base = self.layers[layer]
        try:
            node = rebase_node(base.read_node((addr, gen, 0), level, tree), layer)
        except CorruptionError as exc:
            exc.where += f" of base image {base.path}"
            exc.args = (exc._message(),)
            raise
        self._cache_put(node, key)
        return node

    def _cache_put(self, node: Node, key: int | None = None) -> None:
        cache = self.cache
        key = node.addr if key is None else key
        cache[key] = node
        if len(cache) > self.cache_limit:
            self._evict(key)

    def _evict(self, keep: int) -> None:
        """Evict least recently used clean nodes down to 90% of the cache limit.

        Dirty nodes stay until they are written: read_node looks only in the
        cache, so a dirty node outside it would be read again from disk and
        its changes lost.  The node at ``keep`` was just inserted and also
        stays, because its caller may make it dirty in place next.  Dirty
        nodes passed over move to the recent end, so the next eviction does
        not scan them again.
        """
        cache = self.cache
        excess = len(cache) - self.cache_limit * 9 // 10
        victims = []
        skipped = []
        for addr, cached in cache.items():
            if cached.dirty or addr == keep:
                skipped.append(addr)
                continue
            victims.append(addr)
            if len(victims) >= excess:
                break
        for addr in victims:
            del cache[addr]
        for addr in skipped:
            cache.move_to_end(addr)
        cache.move_to_end(keep)

    def use_features(self, compat: int = 0, ro_compat: int = 0) -> None:
        """Record that the running transaction writes structures behind these feature bits."""
        self.new_compat |= compat & ~self.sb.compat_flags
        self.new_ro_compat |= ro_compat & ~self.sb.ro_compat_flags

    def check_writable(self) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.path}: image is open read-only")

    def new_node(self, level: int, tree) -> Node:
        """Allocate an empty node of the running transaction."""
        addr = self._allocate(self.nodesize)
        node = Node(addr, self.transid, level, tree.tree_id, [], [])
        node.dirty = True
        self.dirty[addr] = node
        self._cache_put(node)
        self._add_new_ref(addr, DelayedRef(self.nodesize, 1, True, ondisk.EXTENT_FLAG_TREE_BLOCK, tree.tree_id,
                                           generation=self.transid))
        return node

    def before_change(self) -> None:
        """Write dirty nodes out early when there are too many to keep.

        Called by a tree before an operation starts, never during one, since
        a node written here must not change afterwards without being marked
        dirty again.  The addresses are new in this transaction, so writing
        them before the commit overwrites nothing the last commit reaches.
        """
        self.changes += 1
        if len(self.dirty) > self.dirty_limit:
            self._flush_data()
            self._write_dirty_nodes()

    def cow(self, node: Node, tree) -> Node:
        """Return a node of the running transaction with node's content (see module doc)."""
        if node.gen == self.transid and node.layer == 0:
            node.dirty = True
            self.dirty[node.addr] = node
            return node
        self.check_writable()
        copy = self.new_node(node.level, tree)
        copy.keys = list(node.keys)
        copy.vals = list(node.vals)
        copy.used = node.used
        if node.layer:
            shared = True
        elif node.gen > tree.last_snapshot:
            shared = False
        else:
            shared = self.refcount(node.addr, self.nodesize) > 1
        if shared:
            self.ref_children(node, +1)
        if node.layer == 0:
            self.add_ref(node.addr, self.nodesize, -1)
        log.debug("cow %s block %d gen %d -> %d shared=%s", tree.name, node.addr, node.gen, copy.addr, shared)
        return copy

    def ref_children(self, node: Node, delta: int) -> None:
        """Add delta to the count of every extent node points to."""
        if node.level:
            for addr, _gen, layer in node.vals:
                if layer == 0:
                    self.add_ref(addr, self.nodesize, delta)
            return
        for key, data in zip(node.keys, node.vals):
            if key[1] == ondisk.EXTENT_DATA and data[8] == KIND_REGULAR:
                disk_addr, disk_len, _, _, layer = FE_REG.unpack_from(data, FE_HEAD.size)
                if layer == 0 and disk_addr:
                    self.add_ref(disk_addr, disk_len, delta)

    def discard(self, node: Node) -> None:
        """Free a node of the running transaction that nothing points to."""
        node.dirty = False
        self.dirty.pop(node.addr, None)
        self.cache.pop(node.addr, None)
        self.add_ref(node.addr, self.nodesize, -1)

    def forget_node(self, addr: int) -> None:
        """Drop a node from the caches once the caller has released its last reference."""
        self.dirty.pop(addr, None)
        self.cache.pop(addr, None)

    # -- reference counts ----------------------------------------------------

    def add_ref(self, addr: int, length: int, delta: int) -> None:
        """Record a pending change of delta to the count of extent (addr, length)."""
        self.changes += 1
        ref = self.refs.get(addr)
        if ref is None:
            self.refs[addr] = DelayedRef(length, delta)
            self.old_refs += 1
            return
        ref.delta += delta
        if ref.new and ref.delta == 0:
            # Allocated and freed in this transaction: never committed.
            self._drop_new_ref(addr)
            self.csum_cache.pop(addr, None)

    def _add_new_ref(self, addr: int, ref: DelayedRef) -> None:
        self.refs[addr] = ref
        self.new_bytes += ref.length
        self.new_item_bytes += ITEM_SIZE + EXTENT.size + len(ref.csums)

    def _drop_new_ref(self, addr: int) -> None:
        """Forget extent addr allocated by this transaction, and free its space."""
        ref = self.refs.pop(addr)
        self.new_bytes -= ref.length
        self.new_item_bytes -= ITEM_SIZE + EXTENT.size + len(ref.csums)
        self.fresh.discard(addr)
        self.free.release(addr, ref.length)

    # -- space for the commit --------------------------------------------------

    def commit_reserve(self) -> int:
        """Return the bytes of new nodes the next commit may need, at most.

        The commit inserts an EXTENT_ITEM for every extent this transaction
        allocated, into leaves that splits leave half full, and copies the
        extent tree leaf of every committed extent whose count changes.  A
        leaf holds many of those, but how many is not known here, so each
        counts as one leaf, up to the leaves that an extent tree covering
        every used block could have.  The root tree, chunk items and paths
        add OPERATION_NODES.
        """
        nodesize = self.nodesize
        extent_leaves = self.bytes_used // BLOCK * (ITEM_SIZE + EXTENT.size + 4) * 2 // nodesize + 1
        return (2 * self.new_item_bytes + min(self.old_refs, extent_leaves) * nodesize
                + OPERATION_NODES * nodesize)

    def check_space(self, data_bytes: int = 0) -> None:
        """Raise NoSpaceError unless an operation adding data_bytes leaves room for the commit.

        Called before an operation that adds items or data changes
        anything, so that running out of space fails the operation alone
        instead of the commit after it.  Operations that only remove skip
        it, and may use the reserve that this keeps.
        """
        limit = self.free.size_limit
        if not limit:
            return
        left = limit - ondisk.FIRST_ALLOC - self.bytes_used - self.new_bytes
        need = data_bytes + OPERATION_NODES * self.nodesize + self.commit_reserve() + self.reserve
        if left < need:
            raise NoSpaceError(f"No space left on device: about {need} bytes needed, {max(left, 0)} left "
                               f"before the commit reserve")

    def extent_item(self, addr: int):
        """Return (key, refs, generation, flags, owner, csums) of the committed item at addr, or None."""
        found = self.extent_tree.first((addr, ondisk.EXTENT_ITEM, 0), (addr, ondisk.EXTENT_ITEM + 1, 0))
        if found is None:
            return None
        key, data = found
        refs, gen, flags, owner = EXTENT.unpack_from(data)
        return key, refs, gen, flags, owner, data[EXTENT.size:]

    def refcount(self, addr: int, length: int) -> int:
        """Return the count of extent addr, pending changes included."""
        ref = self.refs.get(addr)
        if ref is not None and ref.new:
            return ref.delta
        item = self.extent_item(addr)
        if item is None:
            raise CorruptionError("extent", f"at block {addr}", "no EXTENT_ITEM for a referenced extent")
        return item[1] + (ref.delta if ref is not None else 0)

    # -- allocation ------------------------------------------------------------

    def _allocate(self, length: int, minimum: int | None = None) -> int | tuple:
        # Data (minimum given) leaves the whole reserve unused, nodes half of
        # it: once data no longer fits, the metadata changes of deletions and
        # of the operation under way still do.
        # The commit itself may use the whole reserve: check_space kept room
        # for it before the changes it writes out were made.
        if self.committing:
            reserve = 0
        else:
            reserve = self.reserve if minimum is not None else self.reserve // 2
        addr, got = self.free.allocate(length, reserve, minimum)
        self.fresh.add(addr)
        if minimum is None:
            return addr
        return addr, got

    # -- data extents ----------------------------------------------------------

    def write_data(self, data, owner: int) -> list[tuple[int, int, int]]:
        """Write data to new extents; return [(address, disk length, data length)].

        The last block is padded with zeros.  Each extent is at most
        ``max_extent`` bytes; free space in the image is used before the
        image grows, so one write may land in several extents.
        """
        self.check_writable()
        out = []
        try:
            self._write_pieces(memoryview(data), owner, out)
        except BaseException:
            # Give back the extents of this call, so that a failed write
            # (no space) leaves the transaction as it was.
            for addr, _, _ in out:
                self._drop_new_ref(addr)
            raise
        self.changes += 1
        return out

    def _write_pieces(self, view, owner: int, out: list) -> None:
        total = len(view)
        pos = 0
        while pos < total:
            want = min(total - pos, self.max_extent)
            want_blocks = -(-want // BLOCK) * BLOCK
            addr, got = self._allocate(want_blocks, BLOCK)
            piece_len = min(got, want)
            piece = view[pos:pos + piece_len]
            if piece_len % BLOCK:
                piece = bytes(piece) + bytes(BLOCK - piece_len % BLOCK)
            csums = bytearray(got // BLOCK * 4)
            for i in range(0, got, BLOCK):
                csums[i // BLOCK * 4:i // BLOCK * 4 + 4] = crc32c(piece[i:i + BLOCK]).to_bytes(4, "little")
            self._buffer_data(addr, piece)
            self._add_new_ref(addr, DelayedRef(got, 1, True, ondisk.EXTENT_FLAG_DATA, owner, bytes(csums),
                                               self.transid))
            out.append((addr, got, piece_len))
            pos += piece_len

    def _buffer_data(self, addr: int, piece) -> None:
        if self.data_buffer and addr != self.data_buffer_start + self.data_buffer_len:
            self._flush_data()
        if not self.data_buffer:
            self.data_buffer_start = addr
        self.data_buffer.append(piece)
        self.data_buffer_len += len(piece)
        if self.data_buffer_len >= DATA_BUFFER_BYTES:
            self._flush_data()

    def _flush_data(self) -> None:
        if not self.data_buffer:
            return
        self.dev.pwrite(self.data_buffer_start, b"".join(self.data_buffer))
        self.data_buffer = []
        self.data_buffer_len = 0

    def _extent_csums(self, addr: int, layer: int) -> bytes:
        csums = self.csum_cache.get(addr)
        if csums is not None:
            return csums
        ref = self.refs.get(addr)
        if ref is not None and ref.new:
            csums = ref.csums
        else:
            item = self.extent_item(addr)
            if item is None or not item[3] & ondisk.EXTENT_FLAG_DATA:
                raise CorruptionError("data extent", f"at block {addr}", "no data EXTENT_ITEM for a file extent")
            csums = item[5]
        self.csum_cache[addr] = csums
        if len(self.csum_cache) > 4096:
            self.csum_cache.popitem(last=False)
        return csums

    def read_data(self, addr: int, layer: int, offset: int, length: int, context: str = "") -> bytes:
        """Read length bytes at offset inside the data extent at addr, checking each block."""
        if layer:
            if layer >= len(self.layers):
                raise CorruptionError("file extent", context.strip(" ()") or f"data at {addr}",
                                      "names a base layer this image does not have", layer, f"< {len(self.layers)}")
            base = self.layers[layer]
            try:
                return base.read_data(addr, 0, offset, length, context)
            except CorruptionError as exc:
                exc.where += f" of base image {base.path}"
                exc.args = (exc._message(),)
                raise
        self._flush_data()
        first = offset - offset % BLOCK
        last = -(-(offset + length) // BLOCK) * BLOCK
        buf = self.dev.pread(addr + first, last - first)
        csums = self._extent_csums(addr, layer)
        if len(buf) != last - first:
            raise CorruptionError("data block", f"at {addr + first + len(buf) - len(buf) % BLOCK}{context}",
                                  "short read, past the end of the image")
        view = memoryview(buf)
        for block in range(first, last, BLOCK):
            index = block // BLOCK
            stored = int.from_bytes(csums[index * 4:index * 4 + 4], "little")
            part = view[block - first:block - first + BLOCK]
            if crc32c(part) != stored:
                raise CorruptionError("data block", f"at {addr + block}{context}", "checksum mismatch",
                                      f"{crc32c(part):#010x}", f"{stored:#010x}")
        return buf[offset - first:offset - first + length]

    # -- commit ------------------------------------------------------------------

    def _crash(self, step: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(step)

    def has_changes(self) -> bool:
        return bool(self.dirty or self.refs or self.root_tree.changed or self.extent_tree.changed
                    or any(t.changed for t in self.trees.values()))

    def commit(self) -> int:
        """Make the running transaction durable; return its generation."""
        if not self.writable or not self.has_changes():
            return self.generation
        transid = self.transid

        # Record the root of every changed subvolume tree in the root tree.
        for tree_id, tree in sorted(self.trees.items()):
            if tree.changed:
                item = tree.root_item
                item.root_addr, item.root_gen, item.root_layer = tree.root_ptr
                item.level = tree.level
                item.generation = transid
                item.last_snapshot = tree.last_snapshot
                self.root_tree.put((tree_id, ondisk.ROOT_ITEM, 0), item.encode())

        # Apply the delayed reference counts until the extent tree stops changing.
        self.committing = True
        try:
            self._run_delayed_refs()
        finally:
            self.committing = False
        self.new_bytes = self.new_item_bytes = self.old_refs = 0
        self._crash("before-write")

        # Write new nodes and data, then flush: the superblock must never
        # reach the disk before what it points to.
        self._flush_data()
        self._write_dirty_nodes()
        if self.dev.size() < self.free.high_water:
            # Blocks allocated at the end and freed unwritten leave the file
            # short of the high-water mark; a shorter file reads as truncated.
            self.dev.truncate(self.free.high_water)
        self._crash("before-flush")
        self.dev.flush()
        self._crash("before-superblock")

        # Write the superblock copy of this generation, then flush.
        sb = dataclasses.replace(
            self.sb, generation=transid, bytes_used=self.bytes_used, image_bytes=self.free.high_water,
            compat_flags=self.sb.compat_flags | self.new_compat,
            ro_compat_flags=self.sb.ro_compat_flags | self.new_ro_compat,
            root_tree_addr=self.root_tree.root_ptr[0], root_tree_gen=self.root_tree.root_ptr[1],
            root_tree_level=self.root_tree.level, extent_tree_addr=self.extent_tree.root_ptr[0],
            extent_tree_gen=self.extent_tree.root_ptr[1], extent_tree_level=self.extent_tree.level)
        write_superblock(self.dev, sb)
        self._crash("before-superblock-flush")
        self.dev.flush()
        self._crash("after-commit")

        # Generation transid is durable: release what it freed, start the next.
        for addr, length in self.pinned:
            self.free.release(addr, length)
        self.free.excluded = []
        self.pinned = []
        self.free.new_transaction()
        self.sb = sb
        self.new_compat = self.new_ro_compat = 0
        self.generation = transid
        self.transid = transid + 1
        self.fresh = set()
        for tree in (self.root_tree, self.extent_tree, *self.trees.values()):
            tree.changed = False
        log.debug("committed generation %d: %d bytes used, image %d bytes", transid, self.bytes_used,
                  self.free.high_water)
        if self.strict:
            from .check import check_volume
            check_volume(self).raise_if_errors()
        return transid

    def _run_delayed_refs(self) -> None:
        extent_tree = self.extent_tree
        rounds = 0
        while self.refs or self.chunk_delta:
            if not self.refs:
                # Recording chunk use may copy root tree nodes, which adds
                # references for the next round.
                self._write_chunk_items()
                continue
            rounds += 1
            if rounds > 1000:
                raise RuntimeError("delayed reference updates do not converge")
            pending = self.refs
            self.refs = {}
            for addr in sorted(pending):
                ref = pending[addr]
                if ref.new:
                    if ref.delta <= 0:
                        raise RuntimeError(f"new extent {addr} has count {ref.delta}")
                    extent_tree.put((addr, ondisk.EXTENT_ITEM, ref.length),
                                    EXTENT.pack(ref.delta, ref.generation, ref.flags, ref.owner) + ref.csums)
                    self.bytes_used += ref.length
                    self._count_chunks(addr, ref.length, +1)
                    continue
                if not ref.delta:
                    continue
                key = (addr, ondisk.EXTENT_ITEM, ref.length)
                data = extent_tree.get(key)
                if data is None:
                    raise CorruptionError("extent", f"at block {addr} length {ref.length}",
                                          "reference count change for an extent without EXTENT_ITEM")
                refs, gen, flags, owner = EXTENT.unpack_from(data)
                refs += ref.delta
                if refs < 0:
                    raise CorruptionError("extent", f"at block {addr}", "reference count below zero", refs, ">= 0")
                if refs == 0:
                    extent_tree.delete(key)
                    self.bytes_used -= ref.length
                    self._count_chunks(addr, ref.length, -1)
                    self.csum_cache.pop(addr, None)
                    if addr in self.fresh:
                        self.fresh.discard(addr)
                        self.free.release(addr, ref.length)
                    else:
                        self.pinned.append((addr, ref.length))
                        self.free.excluded.append((addr, ref.length))
                else:
                    extent_tree.put(key, EXTENT.pack(refs, gen, flags, owner) + data[EXTENT.size:])

    def _write_dirty_nodes(self) -> None:
        """Encode and write every dirty node, in address order, coalescing neighbours."""
        if not self.dirty:
            return
        run_start = None
        run: list[bytes] = []
        nodesize = self.nodesize
        for addr in sorted(self.dirty):
            node = self.dirty[addr]
            buf = encode(node, self.uuid, nodesize)
            node.dirty = False
            if run and addr == run_start + len(run) * nodesize and len(run) < 256:
                run.append(buf)
                continue
            if run:
                self.dev.pwrite(run_start, b"".join(run))
            run_start = addr
            run = [buf]
        if run:
            self.dev.pwrite(run_start, b"".join(run))
        self.dirty = {}

    def abort(self) -> None:
        """Drop the running transaction and return to the last commit.

        The image file is cut back to the length the last commit needs, or
        the length it had when it was opened if that is longer, so that data
        written by the dropped transaction does not keep host disk space.
        """
        self.data_buffer = []
        self.data_buffer_len = 0
        if self.writable:
            keep = max(self.sb.image_bytes, self.opened_size)
            if self.dev.size() > keep:
                self.dev.truncate(keep)
        self._retract_superblock()
        trees = self.trees
        self._load(self.sb)
        # Keep Tree objects that callers hold pointing at the committed state.
        for tree_id, tree in trees.items():
            try:
                fresh_tree = self.tree(tree_id)
            except KeyError:
                tree.root_ptr = None
                continue
            tree.root_ptr, tree.level = fresh_tree.root_ptr, fresh_tree.level
            tree.root_item = fresh_tree.root_item
            tree.last_snapshot = fresh_tree.last_snapshot
            tree.changed = False
            self.trees[tree_id] = tree

    def _retract_superblock(self) -> None:
        """Overwrite the superblock copy that a stopped commit of the running transaction wrote.

        That copy may still reach the disk, and the transaction after the
        abort reuses the blocks it points to.  It is replaced by the last
        commit's superblock and flushed, so both copies name the last commit.
        """
        if not self.writable:
            return
        index = self.transid % len(ondisk.SUPERBLOCK_OFFSETS)
        offset = ondisk.SUPERBLOCK_OFFSETS[index]
        try:
            written = Superblock.decode(self.dev.pread(offset, ondisk.BLOCK_SIZE), index)
        except CowtreeError:
            return
        if written.generation != self.transid:
            return
        self.dev.pwrite(offset, self.sb.encode())
        self.dev.flush()
        log.warning("%s: aborted a commit whose superblock (generation %d) was written; copy %d now contains "
                    "generation %d again", self.path, self.transid, index, self.sb.generation)

    def _scan_extents(self, lo: int, hi: int):
        """Yield (address, length) of the extents that overlap [lo, hi), in address order."""
        before = self.extent_tree.floor((lo - 1, 0xFF, 0xFFFFFFFFFFFFFFFF)) if lo else None
        if before is not None and before[0][1] == ondisk.EXTENT_ITEM and before[0][0] + before[0][2] > lo:
            yield before[0][0], before[0][2]
        for key, _ in self.extent_tree.items((lo, 0, 0), (hi, 0, 0)):
            if key[1] == ondisk.EXTENT_ITEM:
                yield key[0], key[2]
