"""Compare two B-trees item by item, reading only the nodes where they differ.

Two snapshots of one subvolume share every node that neither changed since
the older one was taken, and a shared node is named by the same block
pointer (address, generation, layer) on both sides.  :class:`TreeDiff`
walks both trees from their roots at once and skips every subtree whose
block pointer is the same on both sides, so the nodes it reads follow the
number of changed items, not the size of the trees.  This is the
comparison that ``cowtree send -p`` is built on, as Btrfs send compares
trees (``btrfs_compare_trees`` in fs/btrfs/send.c of Linux).

Each side keeps a stack of pending elements in key order, smallest on
top: items, and subtrees not read yet together with a lower bound of their
keys.  Every step either drops a pair of identical subtrees, reports the
smaller item, or reads one pending subtree to replace it by its children.
Invariant: every key already reported or skipped on either side is below
every key still pending on both sides.  So an item that is smaller than
everything pending on the other side cannot be in the other tree.
"""

from __future__ import annotations

from .btree import Tree

_ITEM = 0
_SUBTREE = 1


class TreeDiff:
    """The differences between an old and a new tree; ``old`` None compares with an empty tree.

    ``nodes_read`` counts the node reads so far, of both trees; a node read
    by two calls of :meth:`changes` counts twice.
    """

    def __init__(self, old: Tree | None, new: Tree):
        self.old = old
        self.new = new
        self.nodes_read = 0

    def changes(self, report_equal: bool = False):
        """Yield (key, old data, new data) in key order for each key whose item differs.

        The old or the new data is None where that tree has no item with
        the key.  With report_equal, identical items that the walk meets in
        leaves it had to read are yielded too (old data == new data); those
        in skipped subtrees are not.
        """
        old_stack = self._start(self.old)
        new_stack = self._start(self.new)
        while old_stack or new_stack:
            if not new_stack:
                element = old_stack.pop()
                if element[0] == _SUBTREE:
                    self._expand(self.old, element, old_stack)
                else:
                    yield element[1], element[2], None
                continue
            if not old_stack:
                element = new_stack.pop()
                if element[0] == _SUBTREE:
                    self._expand(self.new, element, new_stack)
                else:
                    yield element[1], None, element[2]
                continue
            old_top = old_stack[-1]
            new_top = new_stack[-1]
            if old_top[0] == _SUBTREE and new_top[0] == _SUBTREE:
                if old_top[2] == new_top[2]:
                    # The same node: the same items on both sides.
                    old_stack.pop()
                    new_stack.pop()
                elif old_top[3] != new_top[3]:
                    # Read the taller one first, so that the two sides meet
                    # at one level, where equal pointers can be seen.
                    if old_top[3] > new_top[3]:
                        self._expand(self.old, old_stack.pop(), old_stack)
                    else:
                        self._expand(self.new, new_stack.pop(), new_stack)
                elif old_top[1] < new_top[1]:
                    self._expand(self.old, old_stack.pop(), old_stack)
                elif new_top[1] < old_top[1]:
                    self._expand(self.new, new_stack.pop(), new_stack)
                else:
                    self._expand(self.old, old_stack.pop(), old_stack)
                    self._expand(self.new, new_stack.pop(), new_stack)
                continue
            if old_top[0] == _SUBTREE:
                if new_top[1] < old_top[1]:
                    new_stack.pop()
                    yield new_top[1], None, new_top[2]
                else:
                    self._expand(self.old, old_stack.pop(), old_stack)
                continue
            if new_top[0] == _SUBTREE:
                if old_top[1] < new_top[1]:
                    old_stack.pop()
                    yield old_top[1], old_top[2], None
                else:
                    self._expand(self.new, new_stack.pop(), new_stack)
                continue
            old_key = old_top[1]
            new_key = new_top[1]
            if old_key < new_key:
                old_stack.pop()
                yield old_key, old_top[2], None
            elif new_key < old_key:
                new_stack.pop()
                yield new_key, None, new_top[2]
            else:
                old_stack.pop()
                new_stack.pop()
                if old_top[2] != new_top[2] or report_equal:
                    yield old_key, old_top[2], new_top[2]

    def _start(self, tree: Tree | None) -> list:
        if tree is None:
            return []
        return [(_SUBTREE, (0, 0, 0), tree.root_ptr, tree.level)]

    def _expand(self, tree: Tree, element: tuple, stack: list) -> None:
        """Read the subtree element and push its children (or items), smallest last."""
        _, low, ptr, level = element
        node = tree.store.read_node(ptr, level, tree)
        self.nodes_read += 1
        keys = node.keys
        if node.level == 0:
            for slot in range(len(keys) - 1, -1, -1):
                stack.append((_ITEM, keys[slot], node.vals[slot]))
            return
        for slot in range(len(keys) - 1, 0, -1):
            stack.append((_SUBTREE, keys[slot], node.vals[slot], node.level - 1))
        # Key 0 of a node may be smaller than every key below it; the
        # parent's bound may be tighter.
        stack.append((_SUBTREE, max(keys[0], low), node.vals[0], node.level - 1))
