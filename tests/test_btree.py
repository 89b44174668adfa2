"""The copy-on-write B-tree alone, compared with a dict.

Every test uses the smallest node size (4096 bytes) so that a few hundred
items already split leaves, grow the root to level 2, and merge and collapse
again on deletion.  Keys use item types that the filesystem checks ignore,
so the checker validates the tree structure and the reference counts
without reading the values as inodes or extents.
"""

from __future__ import annotations

import shutil
import tempfile
from bisect import bisect_left, bisect_right

import pytest
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cowtree import ondisk
from cowtree.btree import key_before
from cowtree.check import check_volume
from cowtree.transaction import Volume

NODESIZE = ondisk.MIN_NODE_SIZE
TREE_ID = ondisk.FIRST_SUBVOL_ID
MAX_VALUE = ondisk.max_item_size(NODESIZE)
# Item types that no check reads as filesystem items.
TYPES = (2, 3, 250)

objectids = st.integers(min_value=0, max_value=300)
types = st.sampled_from(TYPES)
offsets = st.integers(min_value=0, max_value=40)
keys = st.tuples(objectids, types, offsets)
values = st.one_of(
    st.binary(max_size=40),
    st.integers(min_value=0, max_value=MAX_VALUE).map(lambda n: bytes([n % 251]) * n),
)


def new_volume(directory: str) -> Volume:
    """Create an image holding one empty tree TREE_ID, committed."""
    path = f"{directory}/btree.img"
    open(path, "wb").close()
    volume = Volume.create(path, nodesize=NODESIZE)
    volume.create_tree(TREE_ID)
    volume.commit()
    return volume


def assert_clean(volume) -> None:
    report = check_volume(volume)
    assert report.problems == [], "\n".join(map(str, report.problems))


def value_for(key, size: int) -> bytes:
    """Return a value of size bytes that differs between keys."""
    seed = f"{key}".encode()
    return (seed * (size // len(seed) + 1))[:size]


@pytest.fixture
def volume(tmp_path):
    vol = new_volume(str(tmp_path))
    yield vol
    vol.close()


class BTreeMachine(RuleBasedStateMachine):
    """One tree against a dict, with commit, abort and reopen."""

    @initialize()
    def create(self):
        self.directory = tempfile.mkdtemp(prefix="cowtree-btree-")
        self.volume = new_volume(self.directory)
        self.dirty_limit = self.volume.dirty_limit
        self.model: dict = {}
        self.committed: dict = {}

    def teardown(self):
        if hasattr(self, "volume"):
            self.volume.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def tree(self):
        return self.volume.tree(TREE_ID)

    def sorted_keys(self) -> list:
        return sorted(self.model)

    # -- changes ---------------------------------------------------------------

    @rule(key=keys, value=values)
    def put(self, key, value):
        self.tree.put(key, value)
        self.model[key] = value

    @rule(start=objectids, count=st.integers(min_value=20, max_value=400),
          size=st.integers(min_value=0, max_value=MAX_VALUE), type_=types)
    def put_many(self, start, count, size, type_):
        """Insert a run of keys, enough to split leaves and grow the root."""
        for index in range(count):
            key = (start + index // 40, type_, index % 40)
            value = value_for(key, size)
            self.tree.put(key, value)
            self.model[key] = value

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_existing(self, data):
        key = data.draw(st.sampled_from(self.sorted_keys()))
        assert self.tree.delete(key) is True
        del self.model[key]

    @rule(key=keys)
    def delete_any(self, key):
        assert self.tree.delete(key) is (key in self.model)
        self.model.pop(key, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_range(self, data):
        """Delete a contiguous run of existing keys, enough to merge leaves."""
        ordered = self.sorted_keys()
        first = data.draw(st.integers(min_value=0, max_value=len(ordered) - 1))
        count = data.draw(st.integers(min_value=1, max_value=len(ordered) - first))
        for key in ordered[first:first + count]:
            assert self.tree.delete(key) is True
            del self.model[key]

    # -- reads -----------------------------------------------------------------

    @rule(key=keys)
    def get(self, key):
        assert self.tree.get(key) == self.model.get(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get_existing(self, data):
        key = data.draw(st.sampled_from(self.sorted_keys()))
        assert self.tree.get(key) == self.model[key]

    @rule(lo=keys, hi=st.one_of(st.none(), keys))
    def range_items(self, lo, hi):
        ordered = self.sorted_keys()
        end = len(ordered) if hi is None else bisect_left(ordered, hi)
        expected = [(key, self.model[key]) for key in ordered[bisect_left(ordered, lo):end]]
        assert list(self.tree.items(lo, hi)) == expected

    @rule(key=keys)
    def floor(self, key):
        ordered = self.sorted_keys()
        slot = bisect_right(ordered, key) - 1
        expected = (ordered[slot], self.model[ordered[slot]]) if slot >= 0 else None
        assert self.tree.floor(key) == expected

    # -- transactions ----------------------------------------------------------

    @rule()
    def commit(self):
        self.volume.commit()
        self.committed = dict(self.model)
        event(f"committed tree of level {self.tree.level}")
        assert_clean(self.volume)

    @rule(early=st.booleans())
    def write_back_early(self, early):
        """Write dirty nodes before every change, or only past the usual limit.

        Nodes written early stay in this transaction and are changed in place
        again, after look-ups may have built their integer keys.
        """
        self.volume.dirty_limit = 0 if early else self.dirty_limit

    @rule()
    def abort(self):
        self.volume.abort()
        self.model = dict(self.committed)

    @rule()
    def reopen(self):
        """Close without committing, then open again: the last commit comes back."""
        self.volume.close()
        self.volume = Volume.open(f"{self.directory}/btree.img", writable=True)
        self.model = dict(self.committed)
        assert_clean(self.volume)

    @invariant()
    def contents_match(self):
        if hasattr(self, "volume"):
            assert list(self.tree.items()) == sorted(self.model.items())


# The tree machine is cheap per step, so it runs three times the profile's examples.
BTreeMachine.TestCase.settings = settings(settings.default, max_examples=3 * settings.default.max_examples)
TestBTreeStateful = pytest.mark.slow(BTreeMachine.TestCase)


# -- unit tests -------------------------------------------------------------------


def fill(volume, count: int, size: int = 200) -> dict:
    """Put count items of size bytes (a few per leaf) into the tree; return the model."""
    tree = volume.tree(TREE_ID)
    model = {}
    for index in range(count):
        key = (index // 7, TYPES[index % 3], index % 7)
        value = value_for(key, size)
        tree.put(key, value)
        model[key] = value
    return model


def test_get_after_in_place_change(volume):
    """Check look-ups in a node that had integer keys and was changed in place.

    With a dirty limit of 0 every change first writes the dirty nodes, so
    the leaves are clean (and searchable) between changes but still belong
    to the running transaction, which changes them in place.
    """
    volume.dirty_limit = 0
    tree = volume.tree(TREE_ID)
    model = fill(volume, 60)
    for _ in range(2):
        for key, value in model.items():
            assert tree.get(key) == value
    first = min(model)
    leaf = tree._leaf_for(first)[0]
    assert isinstance(leaf.search, list), "the look-ups above should have built integer keys"
    added = (first[0], first[1], first[2] + 1000)
    tree.put(added, b"added")
    assert tree._leaf_for(first)[0] is leaf, "the leaf should have been changed in place"
    assert tree.get(added) == b"added"
    assert tree.delete(first) is True
    assert tree.get(first) is None
    for key, value in model.items():
        if key != first:
            assert tree.get(key) == value
    volume.commit()
    assert_clean(volume)
    for _ in range(2):
        assert tree.get(added) == b"added"
    tree.put(added, b"changed after the commit")
    assert tree.get(added) == b"changed after the commit"


def test_range_iteration_in_order(volume, rng):
    model = fill(volume, 1500)
    tree = volume.tree(TREE_ID)
    assert tree.level >= 2, "the tree must have internal nodes above internal nodes"
    volume.commit()
    ordered = sorted(model)

    assert [key for key, _ in tree.items()] == ordered
    for _ in range(200):
        lo = rng.choice(ordered)
        hi = rng.choice(ordered)
        lo = (lo[0], lo[1], lo[2] + rng.choice((0, 1)))
        got = list(tree.items(lo, hi))
        want = [(key, model[key]) for key in ordered[bisect_left(ordered, lo):bisect_left(ordered, hi)]]
        assert got == want, f"items({lo}, {hi})"


def test_range_iteration_empty_ranges(volume):
    fill(volume, 300)
    tree = volume.tree(TREE_ID)
    assert list(tree.items((5, 3, 0), (5, 3, 0))) == []
    assert list(tree.items((9, 0, 0), (5, 0, 0))) == []
    assert list(tree.items((10**9, 0, 0))) == []
    assert tree.first((10**9, 0, 0), (10**9 + 1, 0, 0)) is None


def test_range_iteration_survives_deletes_between_leaves(volume):
    """Deleting already-yielded items while iterating skips nothing after them."""
    model = fill(volume, 800)
    volume.commit()
    tree = volume.tree(TREE_ID)
    seen = []
    for key, _ in tree.items():
        seen.append(key)
        tree.delete(key)
    assert seen == sorted(model)
    assert list(tree.items()) == []


def test_floor_across_leaf_boundaries(volume):
    model = fill(volume, 600)
    tree = volume.tree(TREE_ID)
    ordered = sorted(model)
    for index, key in enumerate(ordered):
        assert tree.floor(key) == (key, model[key])
        before = key_before(key)
        expected = (ordered[index - 1], model[ordered[index - 1]]) if index else None
        assert tree.floor(before) == expected, f"floor({before})"
    assert tree.floor((0, 0, 0)) is None


def test_key_before_wraps_each_part():
    assert key_before((5, 2, 7)) == (5, 2, 6)
    assert key_before((5, 2, 0)) == (5, 1, 0xFFFFFFFFFFFFFFFF)
    assert key_before((5, 0, 0)) == (4, 0xFF, 0xFFFFFFFFFFFFFFFF)
    assert key_before((0, 0, 0)) is None


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_delete_down_to_empty(volume, rng, order):
    fresh_used = volume.bytes_used
    model = fill(volume, 2000)
    volume.commit()
    tree = volume.tree(TREE_ID)
    assert tree.level >= 2

    ordered = sorted(model)
    if order == "descending":
        ordered.reverse()
    elif order == "random":
        rng.shuffle(ordered)
    for count, key in enumerate(ordered, 1):
        assert tree.delete(key) is True
        del model[key]
        if count % 250 == 0:
            volume.commit()
            assert_clean(volume)
            assert list(tree.items()) == sorted(model.items())
    volume.commit()
    assert_clean(volume)

    assert tree.level == 0, "the root must collapse back to a leaf"
    assert tree.root().keys == []
    assert list(tree.items()) == []
    assert volume.bytes_used == fresh_used, "every node but the empty root leaf is freed"


def test_delete_missing_key_changes_nothing(volume):
    fill(volume, 50)
    volume.commit()
    generation = volume.generation
    assert volume.tree(TREE_ID).delete((10**6, 2, 0)) is False
    assert volume.commit() == generation, "a delete of a missing key must leave nothing to commit"


def test_replace_value_grows_and_shrinks(volume):
    """Replacing a small value with the largest allowed one splits the leaf it sits in."""
    model = fill(volume, 200, size=10)
    tree = volume.tree(TREE_ID)
    for key in sorted(model)[::5]:
        model[key] = bytes(MAX_VALUE)
        tree.put(key, model[key])
    volume.commit()
    assert_clean(volume)
    assert list(tree.items()) == sorted(model.items())
    for key in sorted(model)[::5]:
        model[key] = b""
        tree.put(key, b"")
    volume.commit()
    assert_clean(volume)
    assert list(tree.items()) == sorted(model.items())


def test_abort_returns_to_last_commit(volume):
    committed = fill(volume, 500)
    volume.commit()
    tree = volume.tree(TREE_ID)
    for key in sorted(committed)[:300]:
        tree.delete(key)
    tree.put((999, 2, 0), b"uncommitted")
    volume.abort()
    assert list(volume.tree(TREE_ID).items()) == sorted(committed.items())
    assert_clean(volume)


def test_old_root_still_reads_old_contents(volume):
    """A committed root stays readable after later commits replaced it (copy-on-write)."""
    first = fill(volume, 400)
    volume.commit()
    tree = volume.tree(TREE_ID)
    old_root = (tree.root_ptr, tree.level)
    for key in sorted(first)[:200]:
        tree.delete(key)
    tree.put((1000, 2, 0), b"new")
    volume.commit()

    from cowtree.btree import Tree
    old = Tree(volume, TREE_ID, old_root[0], old_root[1], name="old root")
    assert list(old.items()) == sorted(first.items())
