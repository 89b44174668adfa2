#!/usr/bin/env python3
"""Measure send and receive of the standard library tree, next to tar in the same run.

1. Imports the running Python's standard library (site-packages left out)
   into an image with ``cowtree cp -a`` and snapshots it as s1.
2. Times ``cowtree send a.img@s1 | cowtree receive b.img`` into a new image,
   and ``tar -c | tar -x`` of the same host tree into an empty directory.
3. Changes one file to 4 KiB of new data, snapshots s2, and times
   ``cowtree send -p s1 a.img@s2 | cowtree receive b.img``.
4. Changes ten files, renames a directory and removes another, snapshots
   s3, and times the incremental stream from s2 to s3.

MB/s is the file data of the tree (10**6 bytes per second) over the wall
time of the whole pipeline, both processes' start-up included.  receive
ends with a commit, which flushes the image file with fdatasync; tar -x
does not flush.  Each timing is the best of --runs runs.  A full run
receives into a fresh image, and an incremental one into a fresh copy of
the image that contains the parent.  Stream bytes are the size of the file
``send -f`` writes, and for tar the bytes ``tar -c`` writes.

    python3 tools/bench_send.py [--work DIR] [--runs 3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

COWTREE = [sys.executable, "-m", "cowtree"]


def environment() -> dict:
    env = dict(os.environ)
    env.pop("COWTREE_STRICT", None)       # the self-check after each commit is for tests
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


ENV = environment()


def cowtree(work: str, *args: str) -> None:
    subprocess.run(COWTREE + list(args), cwd=work, check=True, env=ENV)


def timed_pipeline(work: str, first: list, second: list) -> float:
    """Run FIRST | SECOND in work; return the wall time in seconds.

    Dirty pages of earlier steps are written out first, so that their
    writeback does not land inside the timing.
    """
    os.sync()
    start = time.perf_counter()
    producer = subprocess.Popen(first, cwd=work, stdout=subprocess.PIPE, env=ENV)
    consumer = subprocess.Popen(second, cwd=work, stdin=producer.stdout, env=ENV)
    producer.stdout.close()
    if consumer.wait() != 0 or producer.wait() != 0:
        raise SystemExit(f"bench_send: {' '.join(first)} | {' '.join(second)} failed")
    return time.perf_counter() - start


def tree_bytes(path: str) -> tuple[int, int]:
    """Return (files, bytes of file data) of a host tree, site-packages left out."""
    files = 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [name for name in dirnames if name != "site-packages"]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                files += 1
                total += os.path.getsize(full)
    return files, total


def stream_bytes(work: str, *send_args: str) -> int:
    path = os.path.join(work, "measure.stream")
    cowtree(work, "send", *send_args, "-f", path)
    size = os.path.getsize(path)
    os.unlink(path)
    return size


def best_receive(work: str, runs: int, send_args: list, base: str | None) -> float:
    """Return the best time of send | receive into a fresh image, or a fresh copy of base."""
    best = float("inf")
    for _ in range(runs):
        target = os.path.join(work, "target.img")
        if base is None:
            if os.path.exists(target):
                os.unlink(target)
            cowtree(work, "mkfs", target)
        else:
            shutil.copyfile(base, target)
        best = min(best, timed_pipeline(work, COWTREE + ["send", *send_args], COWTREE + ["receive", target]))
    return best


def best_tar(work: str, stdlib: str, runs: int) -> float:
    parent, name = os.path.split(stdlib.rstrip("/"))
    best = float("inf")
    for _ in range(runs):
        dest = os.path.join(work, "tar-out")
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        best = min(best, timed_pipeline(work, ["tar", "-c", "--exclude", "site-packages", "-C", parent, name],
                                        ["tar", "-x", "-C", dest]))
    return best


def tar_bytes(stdlib: str) -> int:
    parent, name = os.path.split(stdlib.rstrip("/"))
    tar = subprocess.Popen(["tar", "-c", "--exclude", "site-packages", "-C", parent, name], stdout=subprocess.PIPE)
    total = 0
    while True:
        chunk = tar.stdout.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    tar.wait()
    return total


def change_files(work: str, image: str, paths: list, size: int) -> None:
    for index, path in enumerate(paths):
        data = os.path.join(work, f"new-{index}")
        with open(data, "wb") as handle:
            handle.write(os.urandom(size))
        cowtree(work, "cp", data, f"{image}:{path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/bench-send", help="directory for the images and streams")
    parser.add_argument("--runs", type=int, default=3, help="runs per timing; the best counts")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    stdlib = sysconfig.get_paths()["stdlib"]
    files, data = tree_bytes(stdlib)

    image = os.path.join(work, "a.img")
    cowtree(work, "mkfs", image)
    cowtree(work, "cp", "-a", "--exclude", "site-packages", stdlib, f"{image}:/stdlib")
    cowtree(work, "snapshot", "create", image, "s1")
    rows = []

    # Rows: (workload, seconds, file data moved, stream bytes, whether MB/s means anything).
    full_time = best_receive(work, args.runs, [f"{image}@s1"], None)
    rows.append(("full: send a.img@s1 piped to receive", full_time, data, stream_bytes(work, f"{image}@s1"), True))
    rows.append(("tar -c piped to tar -x, plain directory", best_tar(work, stdlib, args.runs), data,
                 tar_bytes(stdlib), True))
    has_s1 = os.path.join(work, "has-s1.img")
    os.replace(os.path.join(work, "target.img"), has_s1)

    change_files(work, image, ["/stdlib/json/decoder.py"], 4096)
    cowtree(work, "snapshot", "create", image, "s2")
    one_time = best_receive(work, args.runs, ["-p", "s1", f"{image}@s2"], has_s1)
    rows.append(("incremental: one file now 4 KiB", one_time, 4096, stream_bytes(work, "-p", "s1", f"{image}@s2"),
                 False))
    has_s2 = os.path.join(work, "has-s2.img")
    os.replace(os.path.join(work, "target.img"), has_s2)

    targets = ["/stdlib/json/encoder.py", "/stdlib/email/parser.py", "/stdlib/http/client.py",
               "/stdlib/os.py", "/stdlib/re/_parser.py", "/stdlib/ast.py", "/stdlib/typing.py",
               "/stdlib/pathlib.py", "/stdlib/csv.py", "/stdlib/glob.py"]
    change_files(work, image, targets, 8192)
    cowtree(work, "mv", f"{image}:/stdlib/xml", f"{image}:/stdlib/xml-renamed")
    cowtree(work, "rm", "-r", f"{image}:/stdlib/tkinter")
    cowtree(work, "snapshot", "create", image, "s3")
    few_time = best_receive(work, args.runs, ["-p", "s2", f"{image}@s3"], has_s2)
    rows.append(("incremental: 10 files, a rename, a removed directory", few_time, 10 * 8192,
                 stream_bytes(work, "-p", "s2", f"{image}@s3"), False))

    print(f"stdlib tree: {files} files, {data / 1e6:.1f} MB of file data; best of {args.runs} runs")
    if args.markdown:
        print("| workload | seconds | MB/s | file data bytes | stream bytes |")
        print("|---|---:|---:|---:|---:|")
    for name, seconds, nbytes, stream, rate in rows:
        speed = f"{nbytes / seconds / 1e6:.1f}" if rate else "-"
        if args.markdown:
            print(f"| {name} | {seconds:.2f} | {speed} | {nbytes:,} | {stream:,} |")
        else:
            print(f"{name:<55} {seconds:7.2f} s {speed:>7} MB/s {nbytes:>13,} data {stream:>13,} stream bytes")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
