"""A copy-on-write B+tree of (key, bytes) items.

Writers go down from the root in one pass, as in Rodeh's "B-trees,
Shadowing, and Clones" (2008): every node on the path is made writable
through ``store.cow`` before it is changed, a child that could overflow is
split before the descent enters it, and a child that is too empty is merged
with or refilled from a sibling before the descent enters it.  Nothing ever
walks back up, so no parent pointers or path stacks are kept.

The tree never touches reference counts or disk space itself.  It asks its
*store* (the transaction) for four things:

``store.read_node(ptr, level, tree)``
    the checked node a block pointer names;
``store.cow(node, tree)``
    a node of the current transaction with the same content, which may be
    ``node`` itself when it was already copied in this transaction;
``store.new_node(level, tree)``
    an empty node of the current transaction;
``store.discard(node)``
    forget a node of the current transaction that nothing points to any more.

``store.transid`` is the current transaction and ``store.capacity`` the
bytes a node holds after its header.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .node import ITEM_SIZE, PTR_SIZE, Node

_MAX_U64 = 0xFFFFFFFFFFFFFFFF


def key_before(key: tuple) -> tuple | None:
    """Return the greatest key smaller than key, or None for the smallest key."""
    objectid, typ, offset = key
    if offset:
        return (objectid, typ, offset - 1)
    if typ:
        return (objectid, typ - 1, _MAX_U64)
    if objectid:
        return (objectid - 1, 0xFF, _MAX_U64)
    return None


class Tree:
    """One B-tree, named by the block pointer of its root."""

    def __init__(self, store, tree_id: int, root_ptr: tuple, level: int, last_snapshot: int = 0, name: str = ""):
        self.store = store
        self.tree_id = tree_id
        self.root_ptr = root_ptr
        self.level = level
        self.last_snapshot = last_snapshot
        self.name = name or f"tree {tree_id}"
        self.changed = False

    # -- reading ---------------------------------------------------------

    def root(self) -> Node:
        return self.store.read_node(self.root_ptr, self.level, self)

    def _leaf_for(self, key):
        """Return (leaf, next_key, low_key) for the leaf whose range contains key.

        ``next_key`` is the first key of the next leaf's range (None for the
        last leaf); ``low_key`` is the first key of this leaf's range (None
        for the first leaf).
        """
        store = self.store
        node = store.read_node(self.root_ptr, self.level, self)
        next_key = None
        low_key = None
        while node.level:
            keys = node.keys
            slot = bisect_right(keys, key) - 1
            if slot < 0:
                slot = 0
            elif slot:
                low_key = keys[slot]
            if slot + 1 < len(keys):
                next_key = keys[slot + 1]
            node = store.read_node(node.vals[slot], node.level - 1, self)
        return node, next_key, low_key

    def get(self, key):
        """Return the data of the item with this key, or None."""
        # The descent of _leaf_for without its range bookkeeping: point
        # look-ups are the hottest path of the engine.  A node searched
        # before is searched through its integer keys (see Node.search).
        int_key = key[0] << 72 | key[1] << 64 | key[2]
        read_node = self.store.read_node
        node = read_node(self.root_ptr, self.level, self)
        while True:
            keys = node.search
            if keys is None or keys is False:
                keys = _int_keys(node)
            if keys is None:
                keys, probe = node.keys, key
            else:
                probe = int_key
            if not node.level:
                break
            slot = bisect_right(keys, probe) - 1
            node = read_node(node.vals[slot if slot > 0 else 0], node.level - 1, self)
        slot = bisect_left(keys, probe)
        if slot < len(keys) and keys[slot] == probe:
            return node.vals[slot]
        return None

    def floor(self, key):
        """Return (key, data) of the greatest item whose key is at most key, or None."""
        while key is not None:
            leaf, _, low_key = self._leaf_for(key)
            slot = bisect_right(leaf.keys, key) - 1
            if slot >= 0:
                return leaf.keys[slot], leaf.vals[slot]
            if low_key is None:
                return None
            key = key_before(low_key)
        return None

    def items(self, lo=(0, 0, 0), hi=None):
        """Yield (key, data) for every item with lo <= key < hi, in key order.

        The tree may change between leaves: each leaf's items are copied
        before they are yielded, and the next leaf is found from the root.
        """
        key = lo
        while True:
            leaf, next_key, _ = self._leaf_for(key)
            keys = leaf.keys
            start = bisect_left(keys, key)
            chunk_keys = keys[start:]
            chunk_vals = leaf.vals[start:]
            for item_key, data in zip(chunk_keys, chunk_vals):
                if hi is not None and item_key >= hi:
                    return
                yield item_key, data
            if next_key is None or (hi is not None and next_key >= hi):
                return
            key = next_key

    def first(self, lo, hi):
        """Return the first (key, data) with lo <= key < hi, or None."""
        for item in self.items(lo, hi):
            return item
        return None

    # -- writing ---------------------------------------------------------

    def _cow(self, node: Node) -> Node:
        """Return store.cow(node), with no integer keys: the caller changes it."""
        node = self.store.cow(node, self)
        node.search = None
        return node

    def _writable_root(self) -> Node:
        store = self.store
        store.before_change()
        root = store.read_node(self.root_ptr, self.level, self)
        if root.gen != store.transid or not root.dirty:
            root = self._cow(root)
            self.root_ptr = root.ptr
        self.changed = True
        return root

    def _grow(self, root: Node) -> Node:
        """Put a new root above root, and return it."""
        store = self.store
        top = store.new_node(root.level + 1, self)
        top.keys = [root.keys[0] if root.keys else (0, 0, 0)]
        top.vals = [root.ptr]
        top.used = PTR_SIZE
        self.root_ptr = top.ptr
        self.level = top.level
        return top

    def put(self, key, data: bytes) -> None:
        """Insert an item, or replace the data of the item with this key."""
        store = self.store
        cap = store.capacity
        need = ITEM_SIZE + len(data)
        if need * 4 > cap + 3:
            raise ValueError(f"item {key} of {len(data)} bytes is larger than a quarter of a leaf")
        node = self._writable_root()
        if node.level == 0:
            full = node.used + need > cap
        else:
            full = node.used + PTR_SIZE > cap
        if full:
            node = self._grow(node)
        transid = store.transid
        read_node = store.read_node
        while node.level:
            keys = node.keys
            slot = bisect_right(keys, key) - 1
            if slot < 0:
                slot = 0
                keys[0] = key
            child = read_node(node.vals[slot], node.level - 1, self)
            if child.gen != transid or not child.dirty:
                child = self._cow(child)
                node.vals[slot] = child.ptr
            if child.level == 0:
                full = child.used + need > cap
            else:
                full = child.used + PTR_SIZE > cap
            if full:
                right = self._split(node, slot, child)
                if key >= right.keys[0]:
                    child = right
            node = child
        keys = node.keys
        slot = bisect_left(keys, key)
        if slot < len(keys) and keys[slot] == key:
            node.used += len(data) - len(node.vals[slot])
            node.vals[slot] = data
        else:
            keys.insert(slot, key)
            node.vals.insert(slot, data)
            node.used += need

    def _split(self, parent: Node, slot: int, child: Node) -> Node:
        """Move the upper half of child into a new right sibling; return it."""
        store = self.store
        right = store.new_node(child.level, self)
        keys = child.keys
        cut = _middle(child.level, keys, child.vals, child.used)
        right.keys = keys[cut:]
        right.vals = child.vals[cut:]
        del child.keys[cut:]
        del child.vals[cut:]
        _recount(child)
        _recount(right)
        parent.keys.insert(slot + 1, right.keys[0])
        parent.vals.insert(slot + 1, right.ptr)
        parent.used += PTR_SIZE
        return right

    def delete(self, key) -> bool:
        """Delete the item with this key; return False when there is none."""
        if self.get(key) is None:
            return False
        store = self.store
        transid = store.transid
        node = self._writable_root()
        while node.level:
            slot = bisect_right(node.keys, key) - 1
            if slot < 0:
                slot = 0
            child = store.read_node(node.vals[slot], node.level - 1, self)
            if child.gen != transid or not child.dirty:
                child = self._cow(child)
                node.vals[slot] = child.ptr
            if child.used * 3 < store.capacity and len(node.keys) > 1:
                child = self._refill(node, slot, child, key)
            node = child
        slot = bisect_left(node.keys, key)
        del node.keys[slot]
        data = node.vals.pop(slot)
        node.used -= ITEM_SIZE + len(data)
        self._shrink()
        return True

    def _refill(self, parent: Node, slot: int, child: Node, key) -> Node:
        """Merge child with a sibling, or move items over from it.

        Return the node whose range now contains key.
        """
        store = self.store
        if slot + 1 < len(parent.keys):
            left_slot = slot
        else:
            left_slot = slot - 1
        right_slot = left_slot + 1
        left_ptr, right_ptr = parent.vals[left_slot], parent.vals[right_slot]
        level = child.level
        if left_slot == slot:
            left = child
            right = store.read_node(right_ptr, level, self)
            if right.gen != store.transid or not right.dirty:
                right = self._cow(right)
                parent.vals[right_slot] = right.ptr
        else:
            right = child
            left = store.read_node(left_ptr, level, self)
            if left.gen != store.transid or not left.dirty:
                left = self._cow(left)
                parent.vals[left_slot] = left.ptr
        cap = store.capacity
        if left.used + right.used <= cap:
            left.keys.extend(right.keys)
            left.vals.extend(right.vals)
            left.used += right.used
            del parent.keys[right_slot]
            del parent.vals[right_slot]
            parent.used -= PTR_SIZE
            store.discard(right)
            return left
        keys = left.keys + right.keys
        vals = left.vals + right.vals
        cut = _middle(level, keys, vals, left.used + right.used)
        left.keys, left.vals = keys[:cut], vals[:cut]
        right.keys, right.vals = keys[cut:], vals[cut:]
        _recount(left)
        _recount(right)
        parent.keys[right_slot] = right.keys[0]
        return right if key >= right.keys[0] else left

    def _shrink(self) -> None:
        """Drop root nodes that have a single child."""
        store = self.store
        while self.level:
            root = store.read_node(self.root_ptr, self.level, self)
            if len(root.keys) != 1:
                return
            child_ptr = root.vals[0]
            store.discard(root)
            self.root_ptr = child_ptr
            self.level -= 1


def _int_keys(node: Node) -> list | None:
    """Return node's keys as integers once it is searched a second time, else None.

    A dirty node can still change, so it gets none.  A node
    read for a single look-up (a cold cache) is not worth the list.
    """
    if node.dirty:
        return None
    if node.search is None:
        node.search = False
        return None
    node.search = [objectid << 72 | typ << 64 | offset for objectid, typ, offset in node.keys]
    return node.search


def _middle(level: int, keys: list, vals: list, used: int) -> int:
    """Return where to cut a node's items in two: half the bytes for a leaf, half the pointers otherwise.

    Both halves keep at least one item.
    """
    if level:
        return len(keys) // 2
    half = used // 2
    total = 0
    cut = 0
    for cut in range(len(keys)):
        total += ITEM_SIZE + len(vals[cut])
        if total >= half:
            break
    return max(1, min(cut + 1, len(keys) - 1))


def _recount(node: Node) -> None:
    if node.level == 0:
        node.used = ITEM_SIZE * len(node.keys) + sum(map(len, node.vals))
    else:
        node.used = PTR_SIZE * len(node.keys)
