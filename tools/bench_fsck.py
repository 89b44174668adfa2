#!/usr/bin/env python3
"""Time ``cowtree fsck`` on images with many files and many snapshots.

For each image the check runs in a fresh child process, which prints the
elapsed time, the distinct blocks checked (nodes and data blocks) and its
peak resident set size.  ``--baseline`` also times reading every item of
every subvolume through the B-tree, which is what the file-level pass cost
before it cached summaries by node address.

Usage: tools/bench_fsck.py [--files 10000,100000] [--snapshots 1,100] [--dir DIR] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cowtree import ondisk  # noqa: E402
from cowtree.image import live, mkfs  # noqa: E402
from cowtree.subvolume import create_snapshot  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from cowtree import fsck
from cowtree.btree import Tree
from cowtree.image import open_image
from cowtree.subvolume import list_subvolumes
path, mode = sys.argv[2], sys.argv[3]
start = time.perf_counter()
if mode == "baseline":
    volume = open_image(path)
    items = 0
    for sub in list_subvolumes(volume):
        tree = volume.tree(sub.tree_id)
        items += sum(1 for _ in tree.items())
    volume.close()
    out = {"items": items}
else:
    result = fsck.check_image(path, data=(mode == "data"))
    report = result.report
    out = {"problems": len(result.found), "nodes": report.nodes, "data_blocks": report.data_blocks_checked,
           "exact_passes": report.exact_passes}
out["seconds"] = time.perf_counter() - start
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def build(path: str, files: int, snapshots: int) -> float:
    """Create an image of files files in 100 directories, then snapshots snapshots; return seconds."""
    start = time.perf_counter()
    volume = mkfs(path)
    fs = live(volume)
    dirs = [fs.mkdir(ondisk.ROOT_DIR_INO, b"d%03d" % d).ino for d in range(100)]
    inodes = []
    for index in range(files):
        inode = fs.mknod(dirs[index % 100], b"file%06d" % index, 0o644)
        # Every tenth file has two data blocks; the rest are small and inline.
        size = 8192 if index % 10 == 0 else 100
        fs.write(inode.ino, 0, bytes([index % 251]) * size)
        inodes.append(inode.ino)
        if index % 5000 == 4999:
            volume.commit()
    volume.commit()
    for number in range(snapshots):
        create_snapshot(volume, b"s%03d" % number)
        # One change between snapshots, so that each one differs in a path of nodes.
        fs.write(inodes[(number * 7919) % files], 0, b"changed %d" % number)
        volume.commit()
    volume.close()
    return time.perf_counter() - start


def measure(path: str, mode: str) -> dict:
    env = dict(os.environ)
    env.pop("COWTREE_STRICT", None)
    done = subprocess.run([sys.executable, "-c", CHILD, ROOT, path, mode], check=True, capture_output=True,
                          text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", default="10000,100000", help="comma-separated file counts")
    parser.add_argument("--snapshots", default="1,100", help="comma-separated snapshot counts")
    parser.add_argument("--dir", help="directory for the images (default: a temporary one)")
    parser.add_argument("--baseline", action="store_true", help="also time reading every subvolume item by item")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="cowtree-bench-fsck-")
    os.makedirs(directory, exist_ok=True)
    print("| files | snapshots | image MiB | nodes | data blocks | mode | seconds | µs per block | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for files in map(int, args.files.split(",")):
        for snapshots in map(int, args.snapshots.split(",")):
            path = os.path.join(directory, f"bench-{files}-{snapshots}.img")
            if not os.path.exists(path):
                seconds = build(path, files, snapshots)
                print(f"<!-- built {path} in {seconds:.1f} s -->", file=sys.stderr)
            mib = os.path.getsize(path) / (1 << 20)
            for mode in ("metadata", "data"):
                out = measure(path, mode)
                blocks = out["nodes"] + out["data_blocks"]
                per_block = out["seconds"] / blocks * 1e6
                print(f"| {files} | {snapshots} | {mib:.0f} | {out['nodes']} | {out['data_blocks']} | "
                      f"{'--no-data' if mode == 'metadata' else 'with data'} | {out['seconds']:.2f} | "
                      f"{per_block:.1f} | {out['peak_rss_mib']:.0f} |", flush=True)
                if out["problems"]:
                    print(f"warning: {out['problems']} problems in {path}", file=sys.stderr)
            if args.baseline:
                out = measure(path, "baseline")
                print(f"| {files} | {snapshots} | {mib:.0f} | | | every item of every subvolume "
                      f"({out['items']} items) | {out['seconds']:.2f} | | {out['peak_rss_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
