#!/usr/bin/env python3
"""Measure layered images: overlay creation time and read speed through chains.

1. Creates a base image holding the running Python's standard library tree
   (site-packages left out) with ``cowtree cp -a``, and a second base with
   ten reflink copies of it, then times ``mkfs --base`` on each: creating an
   overlay should cost the same whatever the base's size.
2. Builds chains of 1, 4 and 16 overlays on the 1x base, each changing a
   few files, and times reading every file through the top of each chain
   next to reading the same content from a standalone image made by
   ``cowtree convert``, measured in the same run.  Page cache is warm for
   both: this measures cowtree's own cost of following layers.

    python3 tools/bench_layers.py [--work DIR]
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

from cowtree import ondisk  # noqa: E402
from cowtree.image import live, mkfs, open_image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_snapshot import clone_tree  # noqa: E402

CHUNK = 1 << 20


def cowtree(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cowtree", *args], check=True)


def read_everything(path: str) -> tuple[int, float]:
    """Read every file of the image's live filesystem; return (bytes, seconds)."""
    start = time.perf_counter()
    volume = open_image(path)
    fs = live(volume)
    total = 0
    stack = [ondisk.ROOT_DIR_INO]
    while stack:
        directory = stack.pop()
        for _, _, ino, _ in fs.readdir(directory):
            inode = fs.get_inode(ino)
            if inode.is_dir:
                stack.append(ino)
            elif inode.is_reg:
                for offset in range(0, inode.size, CHUNK):
                    total += len(fs.read(ino, offset, CHUNK))
    volume.close()
    return total, time.perf_counter() - start


def best_read(path: str, runs: int) -> tuple[int, float]:
    results = [read_everything(path) for _ in range(runs)]
    return results[0][0], min(seconds for _, seconds in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/bench-layers", help="directory for the images")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per measurement (the best counts)")
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    stdlib = sysconfig.get_paths()["stdlib"]

    base1 = os.path.join(work, "base1x.img")
    cowtree("mkfs", base1)
    cowtree("cp", "-a", "--exclude", "site-packages", stdlib, f"{base1}:/stdlib")
    base10 = os.path.join(work, "base10x.img")
    shutil.copyfile(base1, base10)
    volume = open_image(base10, writable=True)
    fs = live(volume)
    source = fs.resolve(b"/stdlib")
    for index in range(1, 10):
        clone_tree(fs, source, ondisk.ROOT_DIR_INO, b"copy%d" % index)
    volume.commit()
    volume.close()

    print("overlay creation (mkfs --base), best of", args.runs)
    create = {}
    for name, base in (("1x", base1), ("10x", base10)):
        times = []
        for run in range(args.runs):
            overlay = os.path.join(work, f"empty-{name}-{run}.img")
            start = time.perf_counter()
            mkfs(overlay, base=base).close()
            times.append(time.perf_counter() - start)
        create[name] = min(times)
        print(f"  base {name:>3}: {os.path.getsize(base) / 1e6:8.1f} MB  overlay made in {create[name] * 1e3:7.2f} ms, "
              f"overlay file {os.path.getsize(overlay)} bytes")
    print(f"  ratio 10x / 1x: {create['10x'] / create['1x']:.2f}")

    files = [b"/stdlib/json/decoder.py", b"/stdlib/os.py", b"/stdlib/email/message.py", b"/stdlib/typing.py"]
    previous = base1
    tops = {}
    for level in range(1, 17):
        path = os.path.join(work, f"layer{level:02d}.img")
        volume = mkfs(path, base=previous)
        fs = live(volume)
        target = fs.resolve(files[level % len(files)])
        fs.write(target, 0, b"# layer %d\n" % level)
        volume.commit()
        volume.close()
        previous = path
        if level in (1, 4, 16):
            tops[level] = path

    print("\nread every file through the top of a chain, best of", args.runs)
    rows = []
    for level, top in tops.items():
        standalone = os.path.join(work, f"standalone{level}.img")
        cowtree("convert", "--force", top, standalone)
        size, chain_seconds = best_read(top, args.runs)
        _, plain_seconds = best_read(standalone, args.runs)
        rows.append((level, size, chain_seconds, plain_seconds))
    print(f"{'layers':>6} {'MB':>8} {'chain MB/s':>11} {'standalone MB/s':>16} {'ratio':>6}")
    for level, size, chain_seconds, plain_seconds in rows:
        print(f"{level:>6} {size / 1e6:>8.1f} {size / chain_seconds / 1e6:>11.1f} {size / plain_seconds / 1e6:>16.1f} "
              f"{plain_seconds / chain_seconds:>6.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
