"""A minimal pyfuse3 filesystem that passes every request to a host directory.

It is the baseline of tools/bench_fuse.py: the same Python, pyfuse3 and
kernel round trips as the cowtree mount, with no B-tree, copy-on-write or
checksums behind them, so the ratio of the two shows what cowtree costs.
It implements only what the benchmark and simple tools need.

Usage: python tools/passthrough_fuse.py SOURCE_DIR MOUNTPOINT
"""

from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    """Inode-level operations over the host directory tree below root."""

    def __init__(self, root: str):
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: root}
        self.lookups: dict[int, int] = {}
        self.files: dict[int, int] = {}      # file handle -> host file descriptor

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        attr = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                      "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attr, field, getattr(st, field))
        attr.st_ino = pyfuse3.ROOT_INODE if path == self.paths[pyfuse3.ROOT_INODE] else st.st_ino
        attr.entry_timeout = attr.attr_timeout = 1.0
        self.paths[attr.st_ino] = path
        return attr

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.paths[parent], os.fsdecode(name))

    @staticmethod
    def _run(call, *args):
        try:
            return call(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def lookup(self, parent_inode, name, ctx=None):
        attr = self._run(self._entry, self._child(parent_inode, name))
        self.lookups[attr.st_ino] = self.lookups.get(attr.st_ino, 0) + 1
        return attr

    async def forget(self, inode_list):
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)

    async def getattr(self, inode, ctx=None):
        return self._run(self._entry, self.paths[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.paths[inode]
        if fields.update_size:
            self._run(os.truncate, path, attr.st_size)
        if fields.update_mode:
            self._run(os.chmod, path, attr.st_mode & 0o7777)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            self._run(os.utime, path, None, ns=(atime, mtime))
        return self._run(self._entry, path)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        self._run(os.mkdir, path, mode)
        return await self.lookup(parent_inode, name)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = self._run(os.open, path, flags | os.O_CREAT, mode)
        self.files[fd] = fd
        return pyfuse3.FileInfo(fh=fd), await self.lookup(parent_inode, name)

    async def open(self, inode, flags, ctx):
        fd = self._run(os.open, self.paths[inode], flags & ~os.O_CREAT)
        self.files[fd] = fd
        return pyfuse3.FileInfo(fh=fd)

    async def read(self, fh, off, size):
        return self._run(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        return self._run(os.pwrite, fh, buf, off)

    async def release(self, fh):
        self.files.pop(fh, None)
        os.close(fh)

    async def fsync(self, fh, datasync):
        self._run(os.fsync, fh)

    async def unlink(self, parent_inode, name, ctx):
        self._run(os.unlink, self._child(parent_inode, name))

    async def rmdir(self, parent_inode, name, ctx):
        self._run(os.rmdir, self._child(parent_inode, name))

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        names = sorted(os.listdir(self.paths[fh]))
        for index, name in enumerate(names[start_id:], start_id + 1):
            attr = self._run(self._entry, os.path.join(self.paths[fh], name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index):
                return
            self.lookups[attr.st_ino] = self.lookups.get(attr.st_ino, 0) + 1

    async def releasedir(self, fh):
        return None

    async def statfs(self, ctx):
        host = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        stats = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(stats, field, getattr(host, field))
        return stats

    async def flush(self, fh):
        return None

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: passthrough_fuse.py SOURCE_DIR MOUNTPOINT")
    source, mountpoint = sys.argv[1:]
    options = set(pyfuse3.default_options)
    options.add("fsname=passthrough")
    pyfuse3.init(Passthrough(os.path.abspath(source)), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
