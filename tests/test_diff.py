"""TreeDiff: the changes between two snapshots' trees, found by reading only where they differ."""

from __future__ import annotations

import stat

from cowtree import ondisk
from cowtree import subvolume as sv
from cowtree.diff import TreeDiff

ROOT = ondisk.ROOT_DIR_INO


def all_items(tree) -> dict:
    return {key: bytes(data) for key, data in tree.items()}


def naive_changes(old: dict, new: dict) -> list:
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def found_changes(old_tree, new_tree) -> list:
    return [(key, None if a is None else bytes(a), None if b is None else bytes(b))
            for key, a, b in TreeDiff(old_tree, new_tree).changes()]


def random_round(fs, rng, files: list) -> None:
    """Apply a few random creates, writes, renames and removals to fs."""
    for _ in range(rng.randrange(1, 40)):
        choice = rng.random()
        if choice < 0.35 or not files:
            name = b"f%06d" % rng.randrange(10 ** 6)
            try:
                inode = fs.mknod(ROOT, name, stat.S_IFREG | 0o644)
            except FileExistsError:
                continue
            fs.write(inode.ino, 0, bytes([rng.randrange(256)]) * rng.randrange(1, 6000))
            files.append(name)
        elif choice < 0.6:
            name = rng.choice(files)
            fs.write(fs.lookup(ROOT, name), rng.randrange(8000), b"x" * rng.randrange(1, 100))
        elif choice < 0.8:
            old = files.pop(rng.randrange(len(files)))
            new = b"r%06d" % rng.randrange(10 ** 6)
            fs.rename(ROOT, old, ROOT, new)
            files.append(new)
        else:
            fs.unlink(ROOT, files.pop(rng.randrange(len(files))))


def test_diff_matches_full_comparison(make_image, rng):
    _, volume, fs = make_image(nodesize=4096)
    files: list = []
    names = []
    for round_number in range(8):
        random_round(fs, rng, files)
        if round_number == 2:
            # Grow the tree by levels, so that trees of different heights are compared.
            for index in range(1500):
                inode = fs.mknod(ROOT, b"bulk%05d" % index, stat.S_IFREG | 0o644)
                fs.write(inode.ino, 0, b"%d" % index)
        if round_number == 5:
            for index in range(0, 1500, 2):
                fs.unlink(ROOT, b"bulk%05d" % index)
        volume.commit()
        name = b"s%d" % round_number
        sv.create_snapshot(volume, name)
        names.append(name)
    trees = [volume.tree(sv.find(volume, name).tree_id) for name in names]
    assert trees[0].level < trees[-1].level
    contents = [all_items(tree) for tree in trees]
    for first in range(len(trees)):
        assert found_changes(None, trees[first]) == naive_changes({}, contents[first]), f"empty -> {first}"
        for second in range(len(trees)):
            expected = naive_changes(contents[first], contents[second])
            assert found_changes(trees[first], trees[second]) == expected, f"{first} -> {second}"


def test_diff_reads_few_nodes_for_one_change(make_image):
    _, volume, fs = make_image(nodesize=4096)
    inodes = []
    for index in range(3000):
        inode = fs.mknod(ROOT, b"file%05d" % index, stat.S_IFREG | 0o644)
        fs.write(inode.ino, 0, b"%d" % index)
        inodes.append(inode.ino)
    volume.commit()
    sv.create_snapshot(volume, b"before")
    fs.write(inodes[1500], 0, b"changed")
    volume.commit()
    sv.create_snapshot(volume, b"after")
    old = volume.tree(sv.find(volume, b"before").tree_id)
    new = volume.tree(sv.find(volume, b"after").tree_id)
    diff = TreeDiff(old, new)
    changes = list(diff.changes())
    assert [key for key, _, _ in changes] == [(inodes[1500], ondisk.INODE_ITEM, 0),
                                              (inodes[1500], ondisk.EXTENT_DATA, 0)]
    total = TreeDiff(None, new)
    assert len(list(total.changes())) > 10000
    assert new.level >= 2
    # One path from the root down on each side, and perhaps a neighbour.
    assert diff.nodes_read <= 2 * (new.level + 1) + 2, diff.nodes_read
    assert total.nodes_read > 20 * diff.nodes_read


def test_diff_reports_equal_items_of_read_leaves(make_image):
    _, volume, fs = make_image()
    changed_file = fs.mknod(ROOT, b"one", stat.S_IFREG | 0o644)
    fs.mknod(ROOT, b"two", stat.S_IFREG | 0o644)
    volume.commit()
    sv.create_snapshot(volume, b"before")
    fs.write(changed_file.ino, 0, b"data")
    volume.commit()
    sv.create_snapshot(volume, b"after")
    old = volume.tree(sv.find(volume, b"before").tree_id)
    new = volume.tree(sv.find(volume, b"after").tree_id)
    everything = list(TreeDiff(old, new).changes(report_equal=True))
    changed = [change for change in everything if change[1] != change[2]]
    assert changed == list(TreeDiff(old, new).changes())
    # The tree is one leaf, so every item of both sides is met.
    assert {key for key, _, _ in everything} == set(all_items(old)) | set(all_items(new))
