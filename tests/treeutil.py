"""Helpers for tests that put real directory trees into images and read them back."""

from __future__ import annotations

import os
import stat
import sysconfig

from cowtree import ondisk

CHUNK = 4 << 20


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def import_tree(fs, host_dir: str, dir_ino: int = ondisk.ROOT_DIR_INO, limit: int | None = None) -> int:
    """Copy host_dir's regular files, directories and symlinks into fs; return the files copied.

    site-packages and __pycache__ are skipped; ``limit`` stops after that many files.
    """
    count = 0
    stack = [(host_dir, dir_ino)]
    while stack:
        host, ino = stack.pop()
        with os.scandir(host) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name in ("site-packages", "__pycache__"):
                    continue
                name = os.fsencode(entry.name)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    child = fs.mkdir(ino, name, st.st_mode & 0o7777)
                    stack.append((entry.path, child.ino))
                elif stat.S_ISLNK(st.st_mode):
                    fs.symlink(ino, name, os.fsencode(os.readlink(entry.path)))
                elif stat.S_ISREG(st.st_mode):
                    child = fs.mknod(ino, name, stat.S_IFREG | (st.st_mode & 0o7777))
                    with open(entry.path, "rb") as handle:
                        offset = 0
                        while True:
                            data = handle.read(CHUNK)
                            if not data:
                                break
                            fs.write(child.ino, offset, data)
                            offset += len(data)
                    count += 1
                    if limit is not None and count >= limit:
                        return count
    return count


def snapshot_tree(fs, ino: int = ondisk.ROOT_DIR_INO, prefix: bytes = b"") -> dict:
    """Return {path: (mode, content or symlink target)} for everything below directory ino."""
    out = {}
    for _, name, child, _ in fs.readdir(ino):
        path = prefix + b"/" + name
        inode = fs.get_inode(child)
        if inode.is_dir:
            out[path] = (inode.mode, None)
            out.update(snapshot_tree(fs, child, path))
        elif inode.is_symlink:
            out[path] = (inode.mode, fs.readlink(child))
        else:
            out[path] = (inode.mode, read_all(fs, child))
    return out


def read_all(fs, ino: int) -> bytes:
    size = fs.get_inode(ino).size
    parts = []
    for offset in range(0, size, CHUNK):
        parts.append(fs.read(ino, offset, CHUNK))
    return b"".join(parts)
