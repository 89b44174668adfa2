#!/usr/bin/env python3
"""Benchmark importing host files into a new cowtree image.

Every speed is printed with a ratio against a reference measured in the
same run:

- the running interpreter's standard library directory (sysconfig
  ``stdlib`` without ``site-packages`` and ``dist-packages``), imported
  with the FileSystem methods (mkdir, mknod, write, symlink, link,
  setattr), and with ``cowtree cp -a`` when the CLI has that option.  The
  references are ``cp -a`` into a plain directory and, when run as root
  with mkfs.btrfs installed, ``cp -a`` into a loop-mounted btrfs image
  followed by ``sync``;
- one 1 GiB file of random data, through the library API; against
  ``dd bs=4M conv=fdatasync``;
- peak RSS of each import, measured in the child process that runs it;
- the start-up time of ``cowtree --help`` against ``python3 -c pass``;
- CRC32C MB/s of the ``crc32c`` package against crcmod's C extension.

Every import and reference reads its input once before timing, so all of
them read from the page cache.  The image commits once, at the end, and its
commit ends with fdatasync, so the btrfs reference includes ``sync``.

Usage: python3 tools/bench_import.py [--dir DIR] [--skip-big] [--skip-btrfs]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHUNK = 4 << 20              # bytes read from a host file per write call
BIG_FILE_BYTES = 1 << 30
BTRFS_IMAGE_BYTES = 2 << 30


# -- the import, run in a child process ------------------------------------------


def import_tree(source: str, image: str) -> dict:
    """Copy the tree at source into a new image with the FileSystem API, and return the counts."""
    from cowtree import ondisk
    from cowtree.image import live, mkfs

    volume = mkfs(image)
    fs = live(volume)
    files = 0
    data_bytes = 0
    inodes: dict[str, int] = {source: ondisk.ROOT_DIR_INO}
    links: dict[tuple[int, int], int] = {}
    directories = []
    for parent, dirnames, filenames in os.walk(source):
        parent_ino = inodes[parent]
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(parent, name)
            st = os.lstat(path)
            bname = os.fsencode(name)
            if stat.S_ISDIR(st.st_mode):
                inode = fs.mkdir(parent_ino, bname, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
                inodes[path] = inode.ino
                directories.append((inode.ino, st))
                continue
            files += 1
            if st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
                fs.link(links[(st.st_dev, st.st_ino)], parent_ino, bname)
                continue
            if stat.S_ISLNK(st.st_mode):
                inode = fs.symlink(parent_ino, bname, os.fsencode(os.readlink(path)), st.st_uid, st.st_gid)
            else:
                inode = fs.mknod(parent_ino, bname, st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
                if stat.S_ISREG(st.st_mode):
                    data_bytes += copy_file_data(fs, inode.ino, path)
                fs.setattr(inode.ino, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
            if st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = inode.ino
    # Directory times last: adding entries changes them.
    for ino, st in directories:
        fs.setattr(ino, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
    volume.commit()
    volume.close()
    return {"files": files, "bytes": data_bytes}


def copy_file_data(fs, ino: int, path: str) -> int:
    """Write the host file at path into inode ino, CHUNK bytes at a time, and return its size."""
    offset = 0
    with open(path, "rb", buffering=0) as src:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                return offset
            fs.write(ino, offset, chunk)
            offset += len(chunk)


def import_file(source: str, image: str) -> dict:
    """Copy one host file into the root of a new image, and return its size."""
    from cowtree import ondisk
    from cowtree.image import live, mkfs

    volume = mkfs(image)
    fs = live(volume)
    inode = fs.mknod(ondisk.ROOT_DIR_INO, os.fsencode(os.path.basename(source)), 0o100644)
    size = copy_file_data(fs, inode.ino, source)
    volume.commit()
    volume.close()
    return {"files": 1, "bytes": size}


def child_main(kind: str, source: str, image: str) -> None:
    start = time.perf_counter()
    counts = import_tree(source, image) if kind == "tree" else import_file(source, image)
    counts["seconds"] = time.perf_counter() - start
    counts["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(counts))


def run_child(kind: str, source: str, image: str) -> dict:
    """Run one import in a fresh interpreter, so that its peak RSS is its own."""
    output = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, source, image],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


# -- references --------------------------------------------------------------------


def timed(command: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)
    return time.perf_counter() - start


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """Run command, and return (seconds, its peak RSS in MB) from the resource usage wait4 reports."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return seconds, usage.ru_maxrss / 1024


def btrfs_cp(source: str, workdir: str) -> float | str:
    """Time cp -a into a loop-mounted btrfs image plus sync, and return the seconds or why it was skipped."""
    if os.geteuid() != 0:
        return "skipped: needs root for mount"
    if shutil.which("mkfs.btrfs") is None:
        return "skipped: mkfs.btrfs not found (apt-get install -y btrfs-progs)"
    image = os.path.join(workdir, "btrfs.img")
    mountpoint = os.path.join(workdir, "btrfs.mnt")
    os.mkdir(mountpoint)
    with open(image, "wb") as handle:
        handle.truncate(BTRFS_IMAGE_BYTES)
    subprocess.run(["mkfs.btrfs", "-q", image], check=True)
    mounted = False
    try:
        subprocess.run(["mount", "-o", "loop", image, mountpoint], check=True)
        mounted = True
        start = time.perf_counter()
        subprocess.run(["cp", "-a", source, os.path.join(mountpoint, "stdlib")], check=True)
        subprocess.run(["sync"], check=True)
        return time.perf_counter() - start
    finally:
        if mounted:
            subprocess.run(["umount", mountpoint], check=False)
        os.rmdir(mountpoint)
        os.unlink(image)


def warm(path: str) -> None:
    """Read every file under path once, so that the timed runs read from the page cache."""
    if os.path.isfile(path):
        paths = [path]
    else:
        paths = [os.path.join(parent, name) for parent, _, names in os.walk(path) for name in names]
    for file_path in paths:
        if os.path.isfile(file_path) and not os.path.islink(file_path):
            with open(file_path, "rb", buffering=0) as handle:
                while handle.read(CHUNK):
                    pass


def stdlib_copy(workdir: str) -> str:
    """Copy the stdlib without site-packages into workdir and return the copy's path.

    The copy is the input of every tree import, so that each one reads
    exactly the same files.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    copy = os.path.join(workdir, "stdlib")
    shutil.copytree(stdlib, copy, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "dist-packages"))
    return copy


def median_seconds(command: list[str], runs: int = 5) -> float:
    times = sorted(timed(command, stdout=subprocess.DEVNULL) for _ in range(runs))
    return times[runs // 2]


def crc_speeds() -> tuple[float, float]:
    """Return MB/s of (crc32c package, crcmod) over 64 MiB in 4 KiB blocks."""
    from cowtree.checksum import _fast_crc32c, crcmod_crc32c

    data = os.urandom(64 << 20)
    view = memoryview(data)
    blocks = [bytes(view[i:i + 4096]) for i in range(0, len(data), 4096)]
    speeds = []
    for function in (_fast_crc32c, crcmod_crc32c):
        if function is None:
            speeds.append(float("nan"))
            continue
        start = time.perf_counter()
        for block in blocks:
            function(block)
        speeds.append(len(data) / 1e6 / (time.perf_counter() - start))
    return speeds[0], speeds[1]


# -- report --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory for images and copies (default: a new temporary one)")
    parser.add_argument("--skip-big", action="store_true", help="leave out the 1 GiB file")
    parser.add_argument("--skip-btrfs", action="store_true", help="leave out the btrfs reference")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SOURCE", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_import.") as workdir:
        source = stdlib_copy(workdir)
        warm(source)
        files = sum(len(names) for _, _, names in os.walk(source))
        total = sum(os.lstat(os.path.join(parent, name)).st_size
                    for parent, _, names in os.walk(source) for name in names)
        print(f"tree: {source} ({files} files, {total / 1e6:.0f} MB)")

        plain_s, plain_rss = peak_rss_of(["cp", "-a", source, os.path.join(workdir, "plain")])
        btrfs = None if args.skip_btrfs else btrfs_cp(source, workdir)
        api = run_child("tree", source, os.path.join(workdir, "api.img"))
        cli_s = cli_rss = None
        if "archive" in open(os.path.join(REPO, "cowtree", "cli.py")).read():
            image = os.path.join(workdir, "cli.img")
            subprocess.run([sys.executable, "-m", "cowtree", "mkfs", image], check=True)
            cli_s, cli_rss = peak_rss_of([sys.executable, "-m", "cowtree", "cp", "-a", source + "/",
                                          f"{image}:/"])

        print(f"{'tree import':<28} {'s':>7} {'files/s':>8} {'MB/s':>7} {'peak RSS MB':>12} {'x cp -a':>8} {'x btrfs':>8}")
        rows = [("cp -a, plain directory", plain_s, plain_rss)]
        if isinstance(btrfs, float):
            rows.append(("cp -a, btrfs loop + sync", btrfs, None))
        rows.append(("cowtree API", api["seconds"], api["peak_rss_mb"]))
        if cli_s is not None:
            rows.append(("cowtree cp -a", cli_s, cli_rss))
        for name, seconds, rss in rows:
            # Ratios are time against the reference: 2.0 takes twice as long.
            btrfs_ratio = f"{seconds / btrfs:>8.2f}" if isinstance(btrfs, float) else f"{'-':>8}"
            rss_text = f"{rss:>12.0f}" if rss is not None else f"{'-':>12}"
            print(f"{name:<28} {seconds:>7.2f} {files / seconds:>8.0f} {total / 1e6 / seconds:>7.1f} {rss_text}"
                  f" {seconds / plain_s:>8.2f} {btrfs_ratio}")
        if isinstance(btrfs, str):
            print(f"btrfs reference: {btrfs}")
        else:
            ratio = api["seconds"] / btrfs
            print(f"target tree import within 2x of btrfs + sync: {'met' if ratio <= 2 else 'missed'} ({ratio:.2f}x)")
        shutil.rmtree(os.path.join(workdir, "plain"), ignore_errors=True)
        for name in ("api.img", "cli.img"):
            if os.path.exists(os.path.join(workdir, name)):
                os.unlink(os.path.join(workdir, name))
        peak = max(api["peak_rss_mb"], cli_rss or 0)

        if not args.skip_big:
            big = os.path.join(workdir, "big.bin")
            block = os.urandom(64 << 20)
            with open(big, "wb") as handle:
                for _ in range(BIG_FILE_BYTES // len(block)):
                    handle.write(block)
            warm(big)
            dd_s = timed(["dd", f"if={big}", f"of={os.path.join(workdir, 'dd.out')}", "bs=4M", "conv=fdatasync"],
                         stderr=subprocess.DEVNULL)
            os.unlink(os.path.join(workdir, "dd.out"))
            result = run_child("file", big, os.path.join(workdir, "big.img"))
            peak = max(peak, result["peak_rss_mb"])
            mb = BIG_FILE_BYTES / 1e6
            print(f"{'1 GiB file':<28} {'s':>7} {'MB/s':>8} {'peak RSS MB':>12} {'x dd':>8}")
            print(f"{'dd bs=4M conv=fdatasync':<28} {dd_s:>7.2f} {mb / dd_s:>8.0f} {'-':>12} {1:>8.2f}")
            speed_ratio = dd_s / result["seconds"]
            print(f"{'cowtree API':<28} {result['seconds']:>7.2f} {mb / result['seconds']:>8.0f}"
                  f" {result['peak_rss_mb']:>12.0f} {speed_ratio:>8.2f}")
            print(f"target 1 GiB import >= 0.7x dd: {'met' if speed_ratio >= 0.7 else 'missed'} ({speed_ratio:.2f}x)")
        print(f"target peak RSS < 200 MB: {'met' if peak < 200 else 'missed'} ({peak:.0f} MB)")

    if shutil.which("cowtree") or os.path.exists(os.path.join(REPO, "cowtree", "cli.py")):
        help_s = median_seconds([sys.executable, "-m", "cowtree", "--help"])
        bare_s = median_seconds([sys.executable, "-c", "pass"])
        print(f"start-up: cowtree --help {help_s * 1000:.0f} ms, python3 -c pass {bare_s * 1000:.0f} ms"
              f" ({help_s / bare_s:.1f}x)")
    fast, reference = crc_speeds()
    print(f"crc32c: crc32c package {fast:.0f} MB/s, crcmod {reference:.0f} MB/s ({fast / reference:.1f}x),"
          f" 4 KiB blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
