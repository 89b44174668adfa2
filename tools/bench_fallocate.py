#!/usr/bin/env python3
"""Measure a long fallocate(2) on a cowtree FUSE mount and the latency of lookups meanwhile.

Each run mounts a new image (in a temporary directory under --dir), opens a
new file and calls fallocate(2) with mode 0 for --size GiB.  Meanwhile a
thread looks up a missing name in the mount every 10 ms: the kernel
caches neither the entry nor its attributes, so every lookup is a request
to the mount process.  A run prints the fallocate time and, for the lookups that started
during it, how many there were and their median and maximum latency.  The
util-linux fallocate(1) tool would also fsync the file when it closes it,
and that commit is left out here.

Usage: python3 tools/bench_fallocate.py [--size 3] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time

# bench_fuse puts this checkout first on sys.path, so cowtree comes from it.
from bench_fuse import start_cowtree

from cowtree.image import mkfs

LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
LOOKUP_INTERVAL = 0.01


def fallocate(fd: int, length: int) -> None:
    if LIBC.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_once(work: str, size: int) -> tuple[float, list[float]]:
    """Return the fallocate time and the latencies of the lookups that started during it, in seconds."""
    image = os.path.join(work, "bench.img")
    mountpoint = os.path.join(work, "mnt")
    mkfs(image).close()
    os.mkdir(mountpoint)
    mounted = start_cowtree(image, mountpoint)
    lookups: list[tuple[float, float]] = []
    stop = threading.Event()

    def look_up() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                os.stat(os.path.join(mountpoint, f"missing-{len(lookups)}"))
            except FileNotFoundError:
                pass
            lookups.append((start, time.monotonic() - start))
            time.sleep(LOOKUP_INTERVAL)

    try:
        fd = os.open(os.path.join(mountpoint, "big"), os.O_CREAT | os.O_RDWR)
        thread = threading.Thread(target=look_up)
        thread.start()
        try:
            begin = time.monotonic()
            fallocate(fd, size)
            end = time.monotonic()
        finally:
            stop.set()
            thread.join()
            os.close(fd)
    finally:
        mounted.unmount()
        shutil.rmtree(work, ignore_errors=True)
    return end - begin, [latency for start, latency in lookups if begin <= start < end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=3, help="fallocate length in GiB")
    parser.add_argument("--runs", type=int, default=3, help="number of runs, each on a new image")
    parser.add_argument("--dir", default=None, help="directory for the images and mountpoints")
    args = parser.parse_args()

    print(f"# {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"fallocate of {args.size} GiB")
    for _ in range(args.runs):
        elapsed, latencies = run_once(tempfile.mkdtemp(prefix="bench_fallocate.", dir=args.dir), args.size << 30)
        if latencies:
            summary = (f"median {statistics.median(latencies) * 1000:.1f} ms, "
                       f"max {max(latencies) * 1000:.0f} ms")
        else:
            summary = "none"
        print(f"fallocate {elapsed:.2f} s; lookups during it: {len(latencies)}, {summary}")


if __name__ == "__main__":
    main()
