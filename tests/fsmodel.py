"""An in-memory model of one cowtree filesystem, and a driver that applies
each operation to the engine and to the model and checks that they agree.

The model keeps what a user can observe: the directory entries, and per
inode its type, permission bits, content (file data or symlink target) and
xattrs.  Link counts and sizes are derived from those.  Times are not
modelled.

:class:`Driver` computes the error the engine must raise (``None`` when the
operation must succeed) from the model alone, calls the engine, checks that
the outcome matches, and updates the model only on success.
"""

from __future__ import annotations

import copy
import dataclasses
import stat

from cowtree import errors, ondisk
from cowtree.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, RENAME_EXCHANGE, FileSystem

ROOT = ondisk.ROOT_DIR_INO
KIND_FORMAT = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "lnk": stat.S_IFLNK}
KIND_DTYPE = {"reg": ondisk.DT_REG, "dir": ondisk.DT_DIR, "lnk": ondisk.DT_LNK}


@dataclasses.dataclass
class ModelInode:
    """One inode as the model stores it."""

    kind: str                  # "reg", "dir" or "lnk"
    perm: int
    data: bytes = b""          # file content, or the symlink target
    xattrs: dict = dataclasses.field(default_factory=dict)


class FsModel:
    """Directory entries and inodes, keyed by the inode numbers the engine assigned."""

    def __init__(self, root_perm: int = 0o755):
        self.inodes: dict[int, ModelInode] = {ROOT: ModelInode("dir", root_perm)}
        self.entries: dict[int, dict[bytes, int]] = {ROOT: {}}
        self.removed: set[int] = set()   # inode numbers that must no longer exist

    def copy(self) -> "FsModel":
        return copy.deepcopy(self)

    def nlink(self, ino: int) -> int:
        if self.inodes[ino].kind == "dir":
            return 2 + sum(1 for child in self.entries[ino].values() if self.inodes[child].kind == "dir")
        return sum(1 for names in self.entries.values() for child in names.values() if child == ino)

    def size(self, ino: int) -> int:
        inode = self.inodes[ino]
        if inode.kind == "dir":
            return 2 * sum(len(name) for name in self.entries[ino])
        return len(inode.data)

    def is_within(self, ino: int, directory: int) -> bool:
        """Return True when directory is ino or lies below it."""
        pending = [ino]
        while pending:
            current = pending.pop()
            if current == directory:
                return True
            pending.extend(child for child in self.entries.get(current, {}).values()
                           if self.inodes[child].kind == "dir")
        return False

    def files(self) -> list[int]:
        return sorted(ino for ino, inode in self.inodes.items() if inode.kind == "reg")

    def directories(self) -> list[int]:
        return sorted(self.entries)

    def names(self) -> list[tuple[int, bytes]]:
        return sorted((directory, name) for directory, names in self.entries.items() for name in names)

    def _forget_if_unlinked(self, ino: int) -> None:
        if self.nlink(ino) == 0:
            del self.inodes[ino]
            self.removed.add(ino)

    def _drop_directory(self, ino: int) -> None:
        del self.inodes[ino]
        del self.entries[ino]
        self.removed.add(ino)


def assert_matches(fs: FileSystem, model: FsModel, label: str = "") -> None:
    """Assert that the engine's filesystem shows exactly what the model holds."""
    prefix = f"{label}: " if label else ""
    for directory, names in model.entries.items():
        listed = {name: (ino, dtype) for _, name, ino, dtype in fs.readdir(directory)}
        expected = {name: (ino, KIND_DTYPE[model.inodes[ino].kind]) for name, ino in names.items()}
        assert listed == expected, f"{prefix}entries of directory {directory}"
        for name, ino in names.items():
            assert fs.lookup(directory, name) == ino, f"{prefix}lookup of {name!r} in directory {directory}"
    for ino, expected in model.inodes.items():
        inode = fs.get_inode(ino)
        where = f"{prefix}inode {ino} ({expected.kind})"
        assert stat.S_IFMT(inode.mode) == KIND_FORMAT[expected.kind], f"{where}: type"
        assert inode.mode & 0o7777 == expected.perm, f"{where}: permission bits"
        assert inode.nlink == model.nlink(ino), f"{where}: nlink"
        assert inode.size == model.size(ino), f"{where}: size"
        if expected.kind == "reg":
            content = fs.read(ino, 0, inode.size + 4096)
            assert len(content) == len(expected.data), f"{where}: length read"
            assert content == expected.data, f"{where}: content differs from byte {first_difference(content, expected.data)}"
        elif expected.kind == "lnk":
            assert fs.readlink(ino) == expected.data, f"{where}: symlink target"
        assert sorted(fs.listxattr(ino)) == sorted(expected.xattrs), f"{where}: xattr names"
        for name, value in expected.xattrs.items():
            assert fs.getxattr(ino, name) == value, f"{where}: xattr {name!r}"
    for ino in model.removed - set(model.inodes):
        try:
            fs.get_inode(ino)
        except errors.NotFound:
            continue
        raise AssertionError(f"{prefix}inode {ino} was removed but still exists")


def first_difference(left: bytes, right: bytes) -> int:
    for index, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return index
    return min(len(left), len(right))


class Driver:
    """Apply operations to the engine and the model; check that their outcomes agree."""

    def __init__(self, fs: FileSystem, model: FsModel):
        self.fs = fs
        self.model = model

    def _run(self, expected_error, call):
        """Call the engine; return its result, or None when expected_error was raised as predicted."""
        if expected_error is None:
            return call()
        try:
            call()
        except expected_error:
            return None
        raise AssertionError(f"expected {expected_error.__name__}, but the engine raised nothing")

    # -- creating ---------------------------------------------------------------

    def create(self, directory: int, name: bytes, perm: int = 0o644):
        error = errors.Exists if name in self.model.entries[directory] else None
        inode = self._run(error, lambda: self.fs.mknod(directory, name, stat.S_IFREG | perm))
        if inode is not None:
            self.model.inodes[inode.ino] = ModelInode("reg", perm)
            self.model.entries[directory][name] = inode.ino
        return inode

    def mkdir(self, directory: int, name: bytes, perm: int = 0o755):
        error = errors.Exists if name in self.model.entries[directory] else None
        inode = self._run(error, lambda: self.fs.mkdir(directory, name, perm))
        if inode is not None:
            self.model.inodes[inode.ino] = ModelInode("dir", perm)
            self.model.entries[inode.ino] = {}
            self.model.entries[directory][name] = inode.ino
        return inode

    def symlink(self, directory: int, name: bytes, target: bytes):
        limit = min(ondisk.SYMLINK_MAX, self.fs.inline_max)
        if len(target) > limit:
            error = errors.NameTooLong
        elif name in self.model.entries[directory]:
            error = errors.Exists
        else:
            error = None
        inode = self._run(error, lambda: self.fs.symlink(directory, name, target))
        if inode is not None:
            self.model.inodes[inode.ino] = ModelInode("lnk", 0o777, target)
            self.model.entries[directory][name] = inode.ino
        return inode

    def link(self, ino: int, directory: int, name: bytes):
        if self.model.inodes[ino].kind == "dir":
            error = errors.NotPermitted
        elif name in self.model.entries[directory]:
            error = errors.Exists
        else:
            error = None
        if self._run(error, lambda: self.fs.link(ino, directory, name)) is not None:
            self.model.entries[directory][name] = ino

    # -- removing ---------------------------------------------------------------

    def unlink(self, directory: int, name: bytes):
        ino = self.model.entries[directory].get(name)
        if ino is None:
            error = errors.NotFound
        elif self.model.inodes[ino].kind == "dir":
            error = errors.IsADirectory
        else:
            error = None
        if self._run(error, lambda: self.fs.unlink(directory, name)) is not None:
            del self.model.entries[directory][name]
            self.model._forget_if_unlinked(ino)

    def rmdir(self, directory: int, name: bytes):
        ino = self.model.entries[directory].get(name)
        if ino is None:
            error = errors.NotFound
        elif self.model.inodes[ino].kind != "dir":
            error = errors.NotADirectory
        elif self.model.entries[ino]:
            error = errors.NotEmpty
        else:
            error = None
        self._run(error, lambda: self.fs.rmdir(directory, name) or True)
        if error is None:
            del self.model.entries[directory][name]
            self.model._drop_directory(ino)

    def rename(self, old_dir: int, old_name: bytes, new_dir: int, new_name: bytes):
        model = self.model
        src = model.entries[old_dir].get(old_name)
        dst = model.entries[new_dir].get(new_name)
        error = None
        if src is None:
            error = errors.NotFound
        elif src == dst:
            error = None
        elif model.inodes[src].kind == "dir" and new_dir != old_dir and model.is_within(src, new_dir):
            error = errors.InvalidArgument
        elif dst is not None:
            src_dir = model.inodes[src].kind == "dir"
            dst_dir = model.inodes[dst].kind == "dir"
            if src_dir and not dst_dir:
                error = errors.NotADirectory
            elif dst_dir and not src_dir:
                error = errors.IsADirectory
            elif dst_dir and model.entries[dst]:
                error = errors.NotEmpty
        self._run(error, lambda: self.fs.rename(old_dir, old_name, new_dir, new_name) or True)
        if error is not None or src == dst:
            return
        del model.entries[old_dir][old_name]
        if dst is not None:
            del model.entries[new_dir][new_name]
            if model.inodes[dst].kind == "dir":
                model._drop_directory(dst)
            else:
                model._forget_if_unlinked(dst)
        model.entries[new_dir][new_name] = src

    def exchange(self, old_dir: int, old_name: bytes, new_dir: int, new_name: bytes):
        """Swap two existing entries (rename with RENAME_EXCHANGE)."""
        model = self.model
        src = model.entries[old_dir].get(old_name)
        dst = model.entries[new_dir].get(new_name)
        error = None
        if src is None or dst is None:
            error = errors.NotFound
        elif src != dst and new_dir != old_dir:
            if model.inodes[src].kind == "dir" and model.is_within(src, new_dir):
                error = errors.InvalidArgument
            elif model.inodes[dst].kind == "dir" and model.is_within(dst, old_dir):
                error = errors.InvalidArgument
        self._run(error, lambda: self.fs.rename(old_dir, old_name, new_dir, new_name, RENAME_EXCHANGE) or True)
        if error is None:
            model.entries[old_dir][old_name] = dst
            model.entries[new_dir][new_name] = src

    # -- file data --------------------------------------------------------------

    def write(self, ino: int, offset: int, data: bytes):
        inode = self.model.inodes[ino]
        assert self.fs.write(ino, offset, data) == len(data)
        if data:
            content = inode.data[:offset].ljust(offset, b"\0")
            inode.data = content + data + inode.data[offset + len(data):]

    def truncate(self, ino: int, size: int):
        self.fs.truncate(ino, size)
        inode = self.model.inodes[ino]
        inode.data = inode.data[:size].ljust(size, b"\0")

    def fallocate(self, ino: int, mode: int, offset: int, length: int):
        """Apply fallocate.  Only PUNCH_HOLE and ZERO_RANGE change bytes (to zeros), and the size grows unless KEEP_SIZE."""
        self.fs.fallocate(ino, mode, offset, length)
        inode = self.model.inodes[ino]
        content = inode.data
        end = offset + length
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and offset < len(content):
            content = content[:offset] + bytes(min(end, len(content)) - offset) + content[end:]
        if not mode & FALLOC_FL_KEEP_SIZE and end > len(content):
            content = content.ljust(end, b"\0")
        inode.data = content

    def seek(self, ino: int, offset: int):
        """Check SEEK_DATA and SEEK_HOLE from offset: the bytes they skip read as zeros."""
        content = self.model.inodes[ino].data
        if offset >= len(content):
            self._run(errors.NoSuchOffset, lambda: self.fs.seek_data(ino, offset))
            self._run(errors.NoSuchOffset, lambda: self.fs.seek_hole(ino, offset))
            return
        hole = self.fs.seek_hole(ino, offset)
        assert offset <= hole <= len(content)
        if any(content[offset:]):
            data = self.fs.seek_data(ino, offset)
            assert offset <= data < len(content)
            assert not any(content[offset:data]), f"SEEK_DATA from {offset} to {data} skipped data"
        if hole < len(content) and any(content[hole:]):
            following = self.fs.seek_data(ino, hole)
            assert not any(content[hole:following]), f"the hole at {hole} to {following} contains data"

    def chmod(self, ino: int, perm: int):
        self.fs.setattr(ino, mode=perm)
        self.model.inodes[ino].perm = perm

    # -- xattrs -------------------------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes):
        self.fs.setxattr(ino, name, value)
        self.model.inodes[ino].xattrs[name] = value

    def removexattr(self, ino: int, name: bytes):
        xattrs = self.model.inodes[ino].xattrs
        error = None if name in xattrs else errors.NoData
        self._run(error, lambda: self.fs.removexattr(ino, name) or True)
        if error is None:
            del xattrs[name]
