#!/usr/bin/env python3
"""Benchmark a cowtree FUSE mount beside a minimal Python passthrough mount.

Both mounts run in subprocesses in the same run, on the same host
filesystem: cowtree over a new image (tools' default: in a temporary
directory), the passthrough (tools/passthrough_fuse.py) over an empty host
directory.  Each gets the same workload:

1. sequential write: one file of --size MiB in 1 MiB write(2) calls, then
   fsync, timed together (cowtree commits on fsync);
2. sequential read: the mount is unmounted and mounted again, so the
   kernel's page cache for the mount is empty, then the file is read in
   1 MiB calls (the host page cache still contains the image or the file, so
   this measures the FUSE and filesystem path, not the disk);
3. creates: --files empty files created and closed in one directory, then
   fsync of the directory.

The output is a table with MB/s (10**6 bytes) and files/s per mount and
the cowtree/passthrough ratio; --markdown prints it as a Markdown table.

Usage: python3 tools/bench_fuse.py [--size 256] [--files 2000] [--dir DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cowtree.image import mkfs  # noqa: E402

CHUNK = 1 << 20
MOUNT_TIMEOUT = 15.0

COWTREE_SCRIPT = ("import sys; from cowtree.fuse import MountOptions, mount; "
                  "mount(MountOptions(sys.argv[1], sys.argv[2]), foreground=True)")


class Mounted:
    """A mount process started with command, serving mountpoint."""

    def __init__(self, command: list[str], mountpoint: str):
        self.mountpoint = mountpoint
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("COWTREE_STRICT", None)
        self.process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"mount at {mountpoint} failed: {' '.join(command)}")
            time.sleep(0.05)

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            if subprocess.run(["fusermount3", "-u", self.mountpoint]).returncode:
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint])
        self.process.wait(timeout=120)


def start_cowtree(image: str, mountpoint: str) -> Mounted:
    return Mounted([sys.executable, "-c", COWTREE_SCRIPT, image, mountpoint], mountpoint)


def start_passthrough(source: str, mountpoint: str) -> Mounted:
    return Mounted([sys.executable, os.path.join(ROOT, "tools", "passthrough_fuse.py"), source, mountpoint],
                   mountpoint)


def write_sequential(path: str, size_mib: int) -> float:
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_mib):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_sequential(path: str) -> tuple[float, int]:
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            total += len(data)
    finally:
        os.close(fd)
    return time.perf_counter() - start, total


def create_files(directory: str, count: int) -> float:
    os.mkdir(directory)
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(os.path.join(directory, f"f{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def run_workload(start_mount, mountpoint: str, size_mib: int, files: int) -> dict[str, float]:
    """Run the three steps on a mount made by start_mount(); return MB/s and files/s."""
    mounted = start_mount()
    try:
        write_seconds = write_sequential(os.path.join(mountpoint, "big"), size_mib)
    finally:
        mounted.unmount()
    mounted = start_mount()
    try:
        read_seconds, read_bytes = read_sequential(os.path.join(mountpoint, "big"))
        create_seconds = create_files(os.path.join(mountpoint, "many"), files)
    finally:
        mounted.unmount()
    if read_bytes != size_mib * CHUNK:
        raise RuntimeError(f"read {read_bytes} bytes back, expected {size_mib * CHUNK}")
    return {
        "write": size_mib * CHUNK / write_seconds / 1e6,
        "read": read_bytes / read_seconds / 1e6,
        "create": files / create_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="size of the sequential file in MiB")
    parser.add_argument("--files", type=int, default=2000, help="number of files to create")
    parser.add_argument("--dir", default=None, help="directory for the image, the host directory and mountpoints")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_fuse.", dir=args.dir)
    try:
        image = os.path.join(work, "bench.img")
        mkfs(image).close()
        cowtree_mnt = os.path.join(work, "cowtree")
        host_dir = os.path.join(work, "host")
        passthrough_mnt = os.path.join(work, "passthrough")
        for directory in (cowtree_mnt, host_dir, passthrough_mnt):
            os.mkdir(directory)
        cowtree = run_workload(lambda: start_cowtree(image, cowtree_mnt), cowtree_mnt, args.size, args.files)
        passthrough = run_workload(lambda: start_passthrough(host_dir, passthrough_mnt), passthrough_mnt,
                                   args.size, args.files)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("sequential write + fsync", "MB/s", "write"),
        ("sequential read (cold mount)", "MB/s", "read"),
        ("file creates + fsync", "files/s", "create"),
    ]
    print(f"# {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.size} MiB file, {args.files} files")
    if args.markdown:
        print("| workload | unit | cowtree | passthrough | cowtree / passthrough |")
        print("|---|---|---:|---:|---:|")
        for label, unit, key in rows:
            print(f"| {label} | {unit} | {cowtree[key]:.1f} | {passthrough[key]:.1f} | "
                  f"{cowtree[key] / passthrough[key]:.2f} |")
        return
    print(f"{'workload':30} {'unit':8} {'cowtree':>10} {'passthrough':>12} {'ratio':>7}")
    for label, unit, key in rows:
        print(f"{label:30} {unit:8} {cowtree[key]:10.1f} {passthrough[key]:12.1f} "
              f"{cowtree[key] / passthrough[key]:7.2f}")


if __name__ == "__main__":
    main()
