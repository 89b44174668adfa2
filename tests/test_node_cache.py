"""The node cache and early writes of dirty nodes under small limits.

With both limits at their minimum, dirty nodes written early by
``Volume.before_change`` become clean, are evicted and are read back from
disk while the same transaction keeps changing them.  Every item must
survive that, before and after the commit.
"""

from __future__ import annotations

from cowtree import ondisk
from cowtree.check import check_volume
from cowtree.transaction import Volume

TREE_ID = ondisk.FIRST_SUBVOL_ID
# An item type that no check reads as a filesystem item.
ITEM_TYPE = 2


def small_limit_volume(path: str) -> Volume:
    open(path, "wb").close()
    volume = Volume.create(path, nodesize=ondisk.MIN_NODE_SIZE)
    volume.cache_limit = 64
    volume.dirty_limit = 64
    return volume


def test_small_cache_keeps_every_item(tmp_path, rng):
    volume = small_limit_volume(str(tmp_path / "cache.img"))
    tree = volume.create_tree(TREE_ID)
    expected = {}
    for i in range(12000):
        key = (rng.getrandbits(64), ITEM_TYPE, rng.getrandbits(64))
        expected[key] = i.to_bytes(32, "little")
        tree.put(key, expected[key])

    missing = [key for key, value in expected.items() if tree.get(key) != value]
    assert missing == []

    volume.commit()
    missing = [key for key, value in expected.items() if tree.get(key) != value]
    assert missing == []
    assert [key for key, _ in tree.items()] == sorted(expected)
    assert check_volume(volume).problems == []
    volume.close()


def test_inserted_node_survives_its_own_eviction(tmp_path):
    volume = small_limit_volume(str(tmp_path / "cache.img"))
    tree = volume.create_tree(TREE_ID)
    for i in range(3000):
        tree.put((i, ITEM_TYPE, 0), bytes(32))
        # Every node read or created must still be in the cache afterwards.
        assert tree.root_ptr[0] in volume.cache
    assert all(addr in volume.cache for addr in volume.dirty)
    volume.close()
