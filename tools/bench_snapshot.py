#!/usr/bin/env python3
"""Show that making a snapshot costs the same whatever the tree's size.

Builds three images holding 1x, 10x and 100x the running Python's standard
library tree (site-packages left out).  The 1x tree is imported with
``cowtree cp -a``; the larger ones add reflink copies of it, so their
metadata really is 10 and 100 times larger while their data stays shared.
For each image it then times ``create_snapshot`` (best of several runs,
each on a fresh snapshot name) and counts the nodes the snapshot wrote, and
prints both with their ratio to the 1x image.

    python3 tools/bench_snapshot.py [--work DIR] [--scales 1,10,100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cowtree import ondisk, subvolume  # noqa: E402
from cowtree.blockdev import ImageFile, RecordingDevice  # noqa: E402
from cowtree.image import live, open_image  # noqa: E402
from cowtree.transaction import Volume  # noqa: E402


def clone_tree(fs, src_dir: int, dst_parent: int, name: bytes) -> int:
    """Copy directory src_dir into dst_parent as name, sharing file data by reflink; return files."""
    count = 0
    top = fs.mkdir(dst_parent, name, 0o755)
    stack = [(src_dir, top.ino)]
    while stack:
        src, dst = stack.pop()
        for _, entry, ino, _ in list(fs.readdir(src)):
            inode = fs.get_inode(ino)
            if inode.is_dir:
                child = fs.mkdir(dst, entry, inode.mode & 0o7777)
                stack.append((ino, child.ino))
            elif inode.is_symlink:
                fs.symlink(dst, entry, fs.readlink(ino))
            else:
                child = fs.mknod(dst, entry, inode.mode)
                fs.clone_file(fs, ino, child.ino)
                count += 1
    return count


def build(path: str, scale: int, stdlib: str) -> int:
    subprocess.run([sys.executable, "-m", "cowtree", "mkfs", "--force", path], check=True)
    subprocess.run([sys.executable, "-m", "cowtree", "cp", "-a", "--exclude", "site-packages",
                    stdlib, f"{path}:/copy0"], check=True)
    volume = open_image(path, writable=True)
    volume.strict = False
    fs = live(volume)
    source = fs.resolve(b"/copy0")
    files = sum(1 for _ in walk_files(fs, source))
    total = files
    for index in range(1, scale):
        total += clone_tree(fs, source, ondisk.ROOT_DIR_INO, b"copy%d" % index)
        if index % 10 == 0:
            volume.commit()
    volume.commit()
    volume.close()
    return total


def walk_files(fs, ino):
    for _, _, child, _ in fs.readdir(ino):
        inode = fs.get_inode(child)
        if inode.is_dir:
            yield from walk_files(fs, child)
        else:
            yield child


def measure(path: str, runs: int) -> tuple[float, int, int]:
    """Return (best seconds, nodes written, tree levels) for making one snapshot."""
    best = float("inf")
    nodes = 0
    for run in range(runs):
        device = RecordingDevice(ImageFile(path, True))
        volume = Volume.open(path, writable=True, device=device)
        volume.strict = False
        level = volume.tree(ondisk.FS_TREE_ID).level
        start = time.perf_counter()
        subvolume.create_snapshot(volume, b"bench%d" % run)
        best = min(best, time.perf_counter() - start)
        nodes = sum(len(entry[2]) // volume.nodesize for entry in device.log
                    if entry[0] == "write" and entry[1] >= ondisk.FIRST_ALLOC)
        volume.close()
    return best, nodes, level + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/bench-snapshot", help="directory for the images")
    parser.add_argument("--scales", default="1,10,100", help="comma-separated tree sizes, in stdlib trees")
    parser.add_argument("--runs", type=int, default=5, help="snapshots timed per image (the best counts)")
    args = parser.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for scale in (int(text) for text in args.scales.split(",")):
        path = os.path.join(args.work, f"tree{scale}x.img")
        start = time.perf_counter()
        files = build(path, scale, stdlib)
        built = time.perf_counter() - start
        seconds, nodes, depth = measure(path, args.runs)
        rows.append((scale, files, depth, seconds, nodes, os.path.getsize(path), built))
        print(f"built {scale}x: {files} files in {built:.1f} s", flush=True)
    base_time = rows[0][3]
    base_nodes = rows[0][4]
    print()
    print(f"{'tree':>6} {'files':>9} {'levels':>6} {'snapshot ms':>12} {'x 1x':>6} {'nodes written':>14} {'x 1x':>6} "
          f"{'image MB':>9}")
    for scale, files, depth, seconds, nodes, size, _ in rows:
        print(f"{scale:>5}x {files:>9} {depth:>6} {seconds * 1e3:>12.2f} {seconds / base_time:>6.2f} {nodes:>14} "
              f"{nodes / base_nodes:>6.2f} {size / 1e6:>9.1f}")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
