"""Mount images through FUSE for real and check what everyday tools rely on.

Each mount runs in a subprocess (``cowtree.fuse.mount`` in the foreground)
and is always unmounted by a fixture finalizer, with ``fusermount3 -u -z``
as the fallback.  After every unmount the image must pass the engine's
checker.  Tests skip with the missing piece named: /dev/fuse, fusermount3,
pyfuse3, or a tool such as git, rsync, stress-ng or fio.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time

import pytest

from cowtree.blockdev import ImageFile
from cowtree.check import check_volume
from cowtree.image import live, mkfs, open_image
from cowtree.subvolume import create_snapshot
from cowtree.transaction import Volume

pytestmark = pytest.mark.fuse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOUNT_TIMEOUT = 15.0


def missing_fuse_piece() -> str | None:
    """Return the name of what is missing for a real FUSE mount, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed"
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not installed"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse not readable and writable by this user"
    return None


MISSING = missing_fuse_piece()
if MISSING:
    pytestmark = [pytest.mark.fuse, pytest.mark.skip(reason=MISSING)]


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


# -- mounting -------------------------------------------------------------------------

MOUNT_SCRIPT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from cowtree.fuse import MountOptions, mount
    image, mountpoint, interval, readonly = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "ro"
    path, _, snapshot = image.partition("@")
    mount(MountOptions(path, mountpoint, snapshot or None, readonly=readonly, commit_interval=interval),
          foreground=True)
""")


class MountedImage:
    """A mount process serving one image at one mountpoint."""

    def __init__(self, image: str, mountpoint: str, commit_interval: float = 5.0, readonly: bool = False,
                 script: str = MOUNT_SCRIPT):
        self.image = image.partition("@")[0]
        self.mountpoint = mountpoint
        os.makedirs(mountpoint, exist_ok=True)
        env = dict(os.environ)
        # The mount commits often; the tests check the image once after unmount instead.
        env.pop("COWTREE_STRICT", None)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = mountpoint.rstrip("/") + ".log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, image, mountpoint, str(commit_interval),
             "ro" if readonly else "rw"], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if self.process.poll() is not None:
                self.log.close()
                raise AssertionError(f"mount process exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.unmount()
                raise AssertionError(f"mount not ready after {MOUNT_TIMEOUT} s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        with open(self.log_path, "rb") as log:
            return log.read().decode("utf-8", "replace")

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def unmount(self) -> int:
        """Unmount (lazily if a plain unmount fails), wait for the process, return its exit status."""
        if os.path.ismount(self.mountpoint):
            result = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
            if result.returncode:
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        return self.wait()

    def stop(self, signum: int) -> int:
        """Send signum to the mount process, wait for it and return its exit status, without unmounting."""
        self.process.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        """Wait up to 60 s for the mount process to exit (then kill it) and return its exit status."""
        try:
            status = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self.log.close()
        return status

    def kill(self) -> None:
        """SIGKILL the mount process and detach the dead mount."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        self.log.close()


def listed_in_mounts(mountpoint: str) -> bool:
    """Return True while /proc/self/mounts lists mountpoint, dead mounts included.

    os.path.ismount() returns False for a mount whose process has exited,
    because stat(2) fails there with ENOTCONN.  The file escapes spaces as
    \\040, so this works only for paths without spaces, as the tests use.
    """
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == mountpoint for line in mounts)


def assert_image_clean(image: str) -> Volume:
    """Open image read-only, run the checker, and return the open volume."""
    volume = open_image(image, writable=False)
    report = check_volume(volume)
    assert [str(p) for p in report.problems] == []
    return volume


@pytest.fixture
def mount_image(tmp_path):
    """Return a function that creates (or reuses) an image and mounts it; every mount is undone at teardown."""
    mounts = []

    def make(name: str = "fs.img", create: bool = True, **kwargs) -> MountedImage:
        image = str(tmp_path / name)
        if create and not os.path.exists(image.partition("@")[0]):
            mkfs(image).close()
        mounted = MountedImage(image, str(tmp_path / f"mnt{len(mounts)}"), **kwargs)
        mounts.append(mounted)
        return mounted

    yield make
    statuses = [(m, m.unmount()) for m in mounts if m.process.returncode is None]
    for mounted in mounts:
        if listed_in_mounts(mounted.mountpoint):
            # A mount process that exited without unmounting left a dead mount.
            subprocess.run(["fusermount3", "-u", "-z", mounted.mountpoint], capture_output=True)
    for mounted, status in statuses:
        assert status == 0, f"mount process exited with {status}:\n{mounted.output()}"


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    """One mounted image, with a snapshot called "before", for the POSIX checks; checked after unmount."""
    base = tmp_path_factory.mktemp("posix")
    image = str(base / "posix.img")
    volume = mkfs(image)
    fs = live(volume)
    inode = fs.mknod(256, b"in-snapshot", 0o100644)
    fs.write(inode.ino, 0, b"snapshot data")
    volume.commit()
    create_snapshot(volume, b"before")
    volume.close()
    mounted = MountedImage(image, str(base / "mnt"))
    yield mounted
    status = mounted.unmount()
    assert status == 0, mounted.output()
    assert_image_clean(image).close()


@pytest.fixture
def workdir(shared_mount, request):
    """A fresh directory in the shared mount, named after the test."""
    path = shared_mount.path(request.node.name[:200])
    os.mkdir(path)
    return path


# -- libc calls Python's os module does not offer -------------------------------------------

LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def renameat2(old: str, new: str, flags: int) -> None:
    if LIBC.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if LIBC.utimensat(AT_FDCWD, path.encode(), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def raw_getxattr(path: str, name: bytes, size: int) -> int:
    """Call getxattr(2) with a buffer of size bytes; return its result or raise OSError."""
    buf = ctypes.create_string_buffer(max(size, 1))
    result = LIBC.getxattr(path.encode(), name, buf if size else None, ctypes.c_size_t(size))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return result


def raw_listxattr(path: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    result = LIBC.listxattr(path.encode(), buf if size else None, ctypes.c_size_t(size))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return result


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


# -- POSIX checks -------------------------------------------------------------------------

def test_rename_exchange_swaps(workdir):
    a, b = os.path.join(workdir, "a"), os.path.join(workdir, "b")
    write_file(a, b"content of a")
    os.mkdir(b)
    write_file(os.path.join(b, "inside"), b"x")
    ino_a, ino_b = os.stat(a).st_ino, os.stat(b).st_ino
    renameat2(a, b, RENAME_EXCHANGE)
    assert read_file(b) == b"content of a"
    assert os.path.isdir(a)
    assert os.listdir(a) == ["inside"]
    assert os.stat(b).st_ino == ino_a
    assert os.stat(a).st_ino == ino_b
    assert errno_of(renameat2, a, os.path.join(workdir, "missing"), RENAME_EXCHANGE) == errno.ENOENT


def test_rename_noreplace_keeps_target(workdir):
    a, b, c = (os.path.join(workdir, n) for n in "abc")
    write_file(a, b"A")
    write_file(b, b"B")
    assert errno_of(renameat2, a, b, RENAME_NOREPLACE) == errno.EEXIST
    assert read_file(a) == b"A"
    assert read_file(b) == b"B"
    renameat2(a, c, RENAME_NOREPLACE)
    assert read_file(c) == b"A"
    assert not os.path.exists(a)


def test_unlinked_open_file_stays_readable(workdir):
    path = os.path.join(workdir, "doomed")
    write_file(path, b"still here" * 1000)
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not os.path.exists(path)
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == 10000
        os.pwrite(fd, b"more", 10000)
        assert os.pread(fd, 20000, 0) == b"still here" * 1000 + b"more"
        assert os.fstat(fd).st_size == 10004
    finally:
        os.close(fd)
    assert os.listdir(workdir) == []


def test_rename_over_open_file_keeps_it(workdir):
    old, new = os.path.join(workdir, "old"), os.path.join(workdir, "new")
    write_file(old, b"old content")
    write_file(new, b"new content")
    fd = os.open(old, os.O_RDONLY)
    try:
        os.rename(new, old)
        assert os.pread(fd, 100, 0) == b"old content"
        assert os.fstat(fd).st_nlink == 0
        assert read_file(old) == b"new content"
    finally:
        os.close(fd)


def test_hard_link_attributes_never_stale(workdir):
    a, b = os.path.join(workdir, "a"), os.path.join(workdir, "b")
    write_file(a, b"x")
    assert os.stat(a).st_nlink == 1
    os.link(a, b)
    assert os.stat(b).st_nlink == 2
    assert os.stat(a).st_nlink == 2
    os.chmod(a, 0o600)
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
    os.chown(b, 1234, 5678)
    assert (os.stat(a).st_uid, os.stat(a).st_gid) == (1234, 5678)
    fd = os.open(b, os.O_RDONLY)
    try:
        os.unlink(a)
        assert os.stat(b).st_nlink == 1
        assert os.fstat(fd).st_nlink == 1
        os.link(b, a)
        assert os.fstat(fd).st_nlink == 2
    finally:
        os.close(fd)


def test_readdir_inode_numbers(workdir):
    write_file(os.path.join(workdir, "file"), b"f")
    os.mkdir(os.path.join(workdir, "dir"))
    os.symlink("file", os.path.join(workdir, "link"))
    os.link(os.path.join(workdir, "file"), os.path.join(workdir, "hard"))
    os.mkfifo(os.path.join(workdir, "fifo"))
    entries = {entry.name: entry for entry in os.scandir(workdir)}
    assert sorted(entries) == ["dir", "fifo", "file", "hard", "link"]
    for name, entry in entries.items():
        assert entry.inode() == os.lstat(os.path.join(workdir, name)).st_ino, name
    assert entries["file"].inode() == entries["hard"].inode()
    assert entries["dir"].is_dir(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert os.readlink(os.path.join(workdir, "link")) == "file"
    assert stat.S_ISFIFO(os.lstat(os.path.join(workdir, "fifo")).st_mode)


def test_readdir_resumes_while_directory_changes(workdir):
    names = [f"entry-{i:05d}-{'x' * 40}" for i in range(1500)]
    for name in names:
        os.mknod(os.path.join(workdir, name))
    seen = []
    with os.scandir(workdir) as listing:
        for i, entry in enumerate(listing):
            seen.append(entry.name)
            if i == 100:
                # Remove entries already returned, add new ones: neither may
                # make the listing skip or repeat an entry that stays.
                for name in seen[:50]:
                    os.unlink(os.path.join(workdir, name))
                for j in range(300):
                    os.mknod(os.path.join(workdir, f"added-{j}"))
    old_seen = [name for name in seen if name.startswith("entry-")]
    assert len(old_seen) == len(set(old_seen))
    assert sorted(old_seen) == names


def test_name_of_256_bytes_too_long(workdir):
    long_name = os.path.join(workdir, "n" * 256)
    assert errno_of(write_file, long_name, b"") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, long_name) == errno.ENAMETOOLONG
    assert errno_of(os.stat, long_name) == errno.ENAMETOOLONG
    write_file(os.path.join(workdir, "n" * 255), b"ok")
    assert os.listdir(workdir) == ["n" * 255]


def test_xattr_size_probe_and_erange(workdir):
    path = os.path.join(workdir, "f")
    write_file(path, b"")
    os.setxattr(path, "user.colour", b"blue-green")
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.colour") == b"blue-green"
    assert raw_getxattr(path, b"user.colour", 0) == 10
    assert raw_getxattr(path, b"user.colour", 10) == 10
    assert errno_of(raw_getxattr, path, b"user.colour", 9) == errno.ERANGE
    assert raw_getxattr(path, b"user.empty", 0) == 0
    assert sorted(os.listxattr(path)) == ["user.colour", "user.empty"]
    listing_size = len(b"user.colour\0user.empty\0")
    assert raw_listxattr(path, 0) == listing_size
    assert errno_of(raw_listxattr, path, listing_size - 1) == errno.ERANGE
    assert errno_of(os.getxattr, path, "user.missing") == errno.ENODATA
    assert errno_of(os.setxattr, path, "user.colour", b"red", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, path, "user.missing", b"red", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(path, "user.colour", b"red", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.colour") == b"red"
    os.removexattr(path, "user.colour")
    assert os.listxattr(path) == ["user.empty"]
    assert errno_of(os.removexattr, path, "user.colour") == errno.ENODATA


def test_o_append_writes_at_end(workdir):
    path = os.path.join(workdir, "log")
    write_file(path, b"start:")
    first = os.open(path, os.O_WRONLY | os.O_APPEND)
    second = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(first, b"a")
        os.write(second, b"bb")
        os.write(first, b"ccc")
        os.lseek(second, 0, os.SEEK_SET)
        os.write(second, b"d")
    finally:
        os.close(first)
        os.close(second)
    assert read_file(path) == b"start:abbcccd"


# -- lseek SEEK_DATA/SEEK_HOLE and fallocate through cowtree._fuse_ops ----------------------

NO_SEEK_WARNING = "SEEK_DATA and SEEK_HOLE report the whole file as data"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def missing_fuse_ops_piece() -> str | None:
    """Return what keeps cowtree._fuse_ops from adding lseek and fallocate to mounts, or None."""
    try:
        from cowtree import _fuse_ops
    except ImportError as exc:
        return f"cowtree._fuse_ops not built ({exc}): install gcc and libfuse3-dev, then pip install -e ."
    if not _fuse_ops.INTERPOSITION_BUILT:
        return f"cowtree._fuse_ops built without fuse_session_new: {_fuse_ops.NO_INTERPOSITION_REASON}"
    return None


def require_fuse_ops() -> None:
    """Skip unless cowtree._fuse_ops can add lseek and fallocate to mounts; in CI, fail instead."""
    missing = missing_fuse_ops_piece()
    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}; CI installs gcc and libfuse3-dev, so the extension must be built")
    if missing:
        pytest.skip(missing)


@pytest.fixture
def fuse_ops(shared_mount):
    """Require cowtree._fuse_ops, and check that the shared mount logged no warning about it."""
    require_fuse_ops()
    assert NO_SEEK_WARNING not in shared_mount.output()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raise OSError on failure."""
    if LIBC.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("fallocate"), *args], capture_output=True, text=True)


def make_sparse(path: str) -> None:
    """Write a 1 MiB file whose only data is four bytes at 512 KiB (so one block)."""
    with open(path, "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"data")


def test_seek_data_hole_exact(workdir, fuse_ops):
    path = os.path.join(workdir, "sparse")
    make_sparse(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 512 << 10
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 512 << 10, os.SEEK_HOLE) == (512 << 10) + 4096
        assert os.lseek(fd, (512 << 10) + 100, os.SEEK_DATA) == (512 << 10) + 100
        assert os.lseek(fd, (1 << 20) - 1, os.SEEK_HOLE) == (1 << 20) - 1
        assert errno_of(os.lseek, fd, (512 << 10) + 4096, os.SEEK_DATA) == errno.ENXIO
        assert errno_of(os.lseek, fd, 1 << 20, os.SEEK_DATA) == errno.ENXIO
        assert errno_of(os.lseek, fd, 1 << 20, os.SEEK_HOLE) == errno.ENXIO
    finally:
        os.close(fd)

    small = os.path.join(workdir, "inline")
    write_file(small, b"x" * 100)
    dense = os.path.join(workdir, "dense")
    write_file(dense, b"y" * 10000)
    for name, size in ((small, 100), (dense, 10000)):
        fd = os.open(name, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.lseek(fd, 0, os.SEEK_HOLE) == size
        finally:
            os.close(fd)


def test_seek_in_snapshot(shared_mount, fuse_ops):
    snapshot_file = os.path.join(shared_mount.mountpoint, ".snapshots", "before", "in-snapshot")
    fd = os.open(snapshot_file, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == len(b"snapshot data")
        assert errno_of(fallocate, fd, 0, 0, 4096) == errno.EBADF
    finally:
        os.close(fd)
    assert errno_of(os.open, snapshot_file, os.O_RDWR) == errno.EROFS


def test_posix_fallocate_allocates(shared_mount, workdir, fuse_ops):
    path = os.path.join(workdir, "sparse")
    make_sparse(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 3 << 20)
        st = os.fstat(fd)
        assert st.st_size == 3 << 20
        assert st.st_blocks == (3 << 20) // 512
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 3 << 20
    finally:
        os.close(fd)
    assert read_file(path) == bytes(512 << 10) + b"data" + bytes((3 << 20) - (512 << 10) - 4)


def test_fallocate_syscall_modes(workdir, fuse_ops):
    path = os.path.join(workdir, "f")
    content = bytes(range(256)) * 40
    write_file(path, content)
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 1 << 20)
        st = os.fstat(fd)
        assert (st.st_size, st.st_blocks) == (1 << 20, 2048)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20)
        st = os.fstat(fd)
        assert (st.st_size, st.st_blocks) == (1 << 20, 4096)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        st = os.fstat(fd)
        assert (st.st_size, st.st_blocks) == (1 << 20, 4096 - 16)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 12288
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 100, 200)
        assert os.fstat(fd).st_size == 1 << 20
        # The kernel rejects these before they reach the mount, with the errno cowtree's fallocate uses too.
        assert errno_of(fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 4096) == errno.EOPNOTSUPP
        assert errno_of(fallocate, fd, 0x08, 0, 4096) == errno.EOPNOTSUPP   # FALLOC_FL_COLLAPSE_RANGE
    finally:
        os.close(fd)
    expected = bytearray(content + bytes((1 << 20) - len(content)))
    expected[4096:12288] = bytes(8192)
    expected[100:300] = bytes(200)
    assert read_file(path) == bytes(expected)

    readonly = os.open(path, os.O_RDONLY)
    try:
        assert errno_of(fallocate, readonly, 0, 0, 4096) == errno.EBADF
    finally:
        os.close(readonly)


@pytest.mark.parametrize("args, size, blocks, zeroed", [
    (["-l", "1MiB"], 1 << 20, 2048, None),
    (["--keep-size", "-l", "1MiB"], 10000, 2048, None),
    (["--punch-hole", "-o", "4096", "-l", "4096"], 10000, 16, (4096, 8192)),
    (["--zero-range", "-o", "100", "-l", "200"], 10000, 24, (100, 300)),
    (["--zero-range", "-o", "8000", "-l", "10000"], 18000, 40, (8000, 18000)),
    (["--zero-range", "--keep-size", "-o", "8000", "-l", "10000"], 10000, 40, (8000, 10000)),
], ids=["mode-0", "keep-size", "punch-hole", "zero-range", "zero-range-extends", "zero-range-keep-size"])
def test_fallocate_cli_modes(workdir, fuse_ops, args, size, blocks, zeroed):
    path = os.path.join(workdir, "f")
    content = bytes(range(1, 251)) * 40
    write_file(path, content)
    result = fallocate_cli(*args, path)
    assert result.returncode == 0, result.stderr
    st = os.stat(path)
    assert (st.st_size, st.st_blocks) == (size, blocks)
    expected = bytearray(content.ljust(size, b"\0")[:size])
    if zeroed:
        expected[zeroed[0]:zeroed[1]] = bytes(zeroed[1] - zeroed[0])
    assert read_file(path) == bytes(expected)


def test_fallocate_cli_collapse_not_supported(workdir, fuse_ops):
    path = os.path.join(workdir, "f")
    write_file(path, b"c" * 20000)
    result = fallocate_cli("--collapse-range", "-o", "0", "-l", "4096", path)
    assert result.returncode != 0
    assert "Operation not supported" in result.stderr
    assert read_file(path) == b"c" * 20000


def test_sparse_copies_follow_extents(workdir, fuse_ops, tmp_path):
    # Data: one block at 512 KiB and 256 KiB of written zeros at 768 KiB.  Zero
    # detection would take the zeros for a hole; SEEK_DATA reports them as
    # data, so the archive's size shows that tar used SEEK_DATA and SEEK_HOLE.
    path = os.path.join(workdir, "sparse")
    make_sparse(path)
    with open(path, "r+b") as f:
        f.seek(768 << 10)
        f.write(bytes(256 << 10))
    assert os.stat(path).st_blocks == (260 << 10) // 512
    archive = str(tmp_path / "sparse.tar")
    subprocess.run(["tar", "--hole-detection=seek", "-S", "-C", workdir, "-cf", archive, "sparse"], check=True)
    assert 260 << 10 <= os.path.getsize(archive) < 280 << 10
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(["tar", "-C", str(extracted), "-xf", archive], check=True)
    assert read_file(str(extracted / "sparse")) == read_file(path)

    # cp --sparse=auto (coreutils 9.1) also makes holes of zero runs inside data.
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "--sparse=auto", path, copy], check=True)
    assert read_file(copy) == read_file(path)
    assert os.stat(copy).st_blocks <= (260 << 10) // 512

    # Back into the mount, zero detection makes holes of the zeros.
    back = os.path.join(workdir, "back")
    subprocess.run(["cp", "--sparse=always", copy, back], check=True)
    assert read_file(back) == read_file(path)
    assert os.stat(back).st_blocks == 8


# A mount whose lseek and fallocate handlers return each kind of result, valid or not, that
# cowtree._fuse_ops.set_handlers documents.
BROKEN_HANDLERS_SCRIPT = textwrap.dedent("""
    import errno, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from cowtree import fuse
    mounted = fuse.Mount(fuse.MountOptions(sys.argv[1], sys.argv[2]))

    def lseek(ino, fh, off, whence):
        return {1: -errno.EPERM, 2: "not an offset", 3: 1 << 70, 4: None}.get(off, 12345)

    def fallocate(ino, fh, mode, offset, length):
        if mode == 0:
            raise OSError(errno.EDQUOT, "quota")
        if mode == 0x10:   # FALLOC_FL_ZERO_RANGE: reply through a Reply, which a second deferral leaves alone
            reply = fuse._fuse_ops.defer_reply()
            try:
                fuse._fuse_ops.defer_reply()
            except RuntimeError:
                reply.send(errno.ENOLINK)
            return "ignored once deferred"
        if mode == 0x11:   # FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE: a Reply dropped unsent
            fuse._fuse_ops.defer_reply()
            return None
        raise RuntimeError("handler bug")

    fuse._fuse_ops.set_handlers(lseek, fallocate)
    mounted.serve()
""")


def test_fuse_ops_handler_results(mount_image):
    require_fuse_ops()
    mounted = mount_image(script=BROKEN_HANDLERS_SCRIPT)
    path = mounted.path("f")
    write_file(path, b"x" * 100)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 12345
        assert errno_of(os.lseek, fd, 1, os.SEEK_DATA) == errno.EPERM
        assert errno_of(os.lseek, fd, 2, os.SEEK_HOLE) == errno.EIO
        assert errno_of(os.lseek, fd, 3, os.SEEK_DATA) == errno.EIO
        assert errno_of(os.lseek, fd, 4, os.SEEK_DATA) == errno.EIO
        assert errno_of(fallocate, fd, 0, 0, 4096) == errno.EDQUOT
        assert errno_of(fallocate, fd, FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EIO
        assert errno_of(fallocate, fd, FALLOC_FL_ZERO_RANGE, 0, 4096) == errno.ENOLINK
        assert errno_of(fallocate, fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EIO
    finally:
        os.close(fd)
    assert mounted.unmount() == 0
    log = mounted.output()
    assert "lseek handler raised an unexpected exception; replied EIO" in log
    assert "TypeError: lseek handler returned 'not an offset', expected an int\n" in log
    assert "OverflowError" in log
    assert "lseek handler returned None, expected an int\n" in log
    assert "fallocate handler raised an unexpected exception; replied EIO" in log
    assert "RuntimeError: handler bug" in log
    assert "a deferred reply was dropped without being sent; replied EIO" in log
    assert "quota" not in log


def test_fallocate_enospc_keeps_mount_writable(mount_image, tmp_path):
    require_fuse_ops()
    mkfs(str(tmp_path / "small.img"), size_limit=8 << 20).close()
    mounted = mount_image("small.img", create=False, commit_interval=600)
    path = mounted.path("f")
    write_file(path, b"before")
    fd = os.open(path, os.O_RDWR)
    try:
        assert errno_of(fallocate, fd, 0, 0, 32 << 20) == errno.ENOSPC
        assert errno_of(os.posix_fallocate, fd, 0, 32 << 20) == errno.ENOSPC
        assert os.fstat(fd).st_size == 6
        free_before = os.statvfs(mounted.mountpoint).f_bfree
        fallocate(fd, 0, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        # 1 MiB less the block that had data: 255 blocks of 4 KiB, plus some nodes.
        assert 255 <= free_before - os.statvfs(mounted.mountpoint).f_bfree < 300
    finally:
        os.close(fd)
    write_file(mounted.path("after"), b"still writable")
    assert mounted.unmount() == 0
    volume = assert_image_clean(str(tmp_path / "small.img"))
    try:
        fs = live(volume)
        assert fs.read(fs.resolve(b"/f"), 0, 10) == b"before" + bytes(4)
        assert fs.get_inode(fs.resolve(b"/f")).size == 1 << 20
        assert fs.read(fs.resolve(b"/after"), 0, 100) == b"still writable"
    finally:
        volume.close()


def test_long_fallocate_lets_requests_run(mount_image):
    """Check that lookups and reads get replies while a fallocate runs in pieces.

    Changes wait until the fallocate ends, and everything is kept.
    """
    require_fuse_ops()
    mounted = mount_image(commit_interval=0.2)
    # The waiting create holds the kernel's lock on its directory, which
    # lookups there need too, so the lookups go to another directory.
    os.mkdir(mounted.path("quiet"))
    os.mkdir(mounted.path("busy"))
    write_file(mounted.path("quiet", "other"), b"other file")
    size = 1 << 30
    fds = [os.open(mounted.path(name), os.O_CREAT | os.O_RDWR) for name in ("big", "second")]
    finished = {}

    def allocate(fd, length):
        try:
            fallocate(fd, 0, 0, length)
            finished[fd] = (0, time.monotonic())
        except OSError as exc:
            finished[fd] = (exc.errno, time.monotonic())

    threads = [threading.Thread(target=allocate, args=(fds[0], size))]
    threads[0].start()
    answered = []
    try:
        # The image grows while the zero-filled blocks are written.
        deadline = time.monotonic() + 30
        while os.path.getsize(mounted.image) < 32 << 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        # A second long fallocate and a write to another file wait for the first one.
        threads.append(threading.Thread(target=allocate, args=(fds[1], 64 << 20)))
        threads.append(threading.Thread(target=write_file, args=(mounted.path("busy", "written"), b"w" * 10000)))
        for thread in threads[1:]:
            thread.start()
        while fds[0] not in finished:
            start = time.monotonic()
            assert errno_of(os.stat, mounted.path("quiet", f"missing-{len(answered)}")) == errno.ENOENT
            assert read_file(mounted.path("quiet", "other")) == b"other file"
            answered.append((start, time.monotonic() - start))
    finally:
        for thread in threads:
            thread.join()
        for fd in fds:
            os.close(fd)
    status, end = finished[fds[0]]
    assert status == 0
    assert finished[fds[1]][0] == 0
    during = [latency for start, latency in answered if start + latency < end]
    assert len(during) >= 3, answered
    assert max(during) < 1.0, answered
    assert mounted.unmount() == 0
    volume = assert_image_clean(mounted.image)
    try:
        fs = live(volume)
        for name, length in ((b"big", size), (b"second", 64 << 20)):
            inode = fs.get_inode(fs.lookup(256, name))
            assert (inode.size, inode.nbytes) == (length, length)
        assert fs.read(fs.resolve(b"/busy/written"), 0, 20000) == b"w" * 10000
    finally:
        volume.close()


def test_sparse_file_st_blocks(workdir):
    path = os.path.join(workdir, "sparse")
    with open(path, "wb") as f:
        f.truncate(10 << 20)
    st = os.stat(path)
    assert st.st_size == 10 << 20
    assert st.st_blocks == 0
    with open(path, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"z" * 4096)
    st = os.stat(path)
    assert st.st_size == 10 << 20
    assert st.st_blocks == 8
    assert read_file(path)[(5 << 20) - 1:(5 << 20) + 4097] == b"\0" + b"z" * 4096 + b"\0"


def test_rename_dir_into_own_subtree(workdir):
    top = os.path.join(workdir, "a")
    os.makedirs(os.path.join(top, "b", "c"))
    assert errno_of(os.rename, top, os.path.join(top, "b", "c", "moved")) == errno.EINVAL
    assert errno_of(renameat2, top, os.path.join(top, "b"), RENAME_EXCHANGE) == errno.EINVAL
    assert os.listdir(os.path.join(top, "b")) == ["c"]


def test_utimens_now_and_omit(workdir):
    path = os.path.join(workdir, "f")
    write_file(path, b"")
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    utimensat(path, (0, UTIME_OMIT), (5, 7))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 5_000_000_007)
    before = time.time_ns()
    utimensat(path, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(path)
    assert st.st_atime_ns >= before - 10_000_000
    assert st.st_mtime_ns == 5_000_000_007


def test_truncate_and_chmod(workdir):
    path = os.path.join(workdir, "f")
    write_file(path, b"0123456789" * 1000)
    os.truncate(path, 5)
    assert read_file(path) == b"01234"
    os.truncate(path, 9000)
    assert read_file(path) == b"01234" + bytes(8995)
    os.chmod(path, 0o4751)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4751
    with open(path, "r+b") as f:
        f.truncate(0)
        assert os.fstat(f.fileno()).st_size == 0


def test_statfs_name_max(shared_mount):
    st = os.statvfs(shared_mount.mountpoint)
    assert st.f_namemax == 255
    assert st.f_bsize == 4096
    assert st.f_bavail > 0


def test_snapshot_visible_read_only(shared_mount):
    root = shared_mount.mountpoint
    assert ".snapshots" not in os.listdir(root)
    snapshots = os.path.join(root, ".snapshots")
    assert os.listdir(snapshots) == ["before"]
    snapshot_file = os.path.join(snapshots, "before", "in-snapshot")
    assert read_file(snapshot_file) == b"snapshot data"
    live_ino = os.stat(os.path.join(root, "in-snapshot")).st_ino
    assert os.stat(snapshot_file).st_ino != live_ino
    assert os.stat(snapshot_file).st_ino >> 40 >= 256
    assert errno_of(write_file, snapshot_file, b"x") == errno.EROFS
    assert errno_of(os.mkdir, os.path.join(snapshots, "new")) == errno.EROFS
    assert errno_of(os.unlink, snapshot_file) == errno.EROFS
    assert os.stat(os.path.join(snapshots, "before", "..")).st_ino == os.stat(snapshots).st_ino


def make_image_with_real_snapshots_entry(image: str, kind: str, snapshot: bool) -> None:
    """Create an image whose live root has a real entry .snapshots (a directory with a file in it, or a file)."""
    volume = mkfs(image)
    fs = live(volume)
    if kind == "dir":
        directory = fs.mkdir(256, b".snapshots")
        inode = fs.mknod(directory.ino, b"real-file", 0o100644)
    else:
        inode = fs.mknod(256, b".snapshots", 0o100644)
    fs.write(inode.ino, 0, b"real content")
    fs.mkdir(256, b"dir")
    volume.commit()
    if snapshot:
        create_snapshot(volume, b"s1")
    volume.close()


def cli_listing(operand: str) -> list[str]:
    result = cowtree_cli("ls", operand)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "no-snapshot"])
def test_snapshots_name_always_virtual(mount_image, tmp_path, kind, snapshot):
    image = str(tmp_path / "fs.img")
    make_image_with_real_snapshots_entry(image, kind, snapshot)
    mounted = mount_image(create=False, commit_interval=3600)
    root = mounted.mountpoint
    snapshots = mounted.path(".snapshots")

    # The root's listing leaves the name out, and it still means the virtual directory afterwards.
    assert sorted(os.listdir(root)) == ["dir"]
    for _ in range(2):
        assert os.listdir(snapshots) == (["s1"] if snapshot else [])
        assert os.stat(snapshots).st_ino == 2
        assert errno_of(read_file, snapshots) == errno.EISDIR
        os.listdir(root)

    # Creating the name fails with EEXIST, removing or renaming it away with EBUSY.
    assert errno_of(os.mkdir, snapshots) == errno.EEXIST
    assert errno_of(os.open, snapshots, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.mknod, snapshots) == errno.EEXIST
    assert errno_of(os.symlink, "dir", snapshots) == errno.EEXIST
    write_file(mounted.path("file"), b"f")
    assert errno_of(os.link, mounted.path("file"), snapshots) == errno.EEXIST
    assert errno_of(renameat2, mounted.path("dir"), snapshots, 0) == errno.EEXIST
    assert errno_of(renameat2, mounted.path("dir"), snapshots, RENAME_EXCHANGE) == errno.EBUSY
    assert errno_of(os.rename, mounted.path("file"), snapshots) == errno.EISDIR
    assert errno_of(os.rename, snapshots, mounted.path("moved")) == errno.EBUSY
    assert errno_of(os.rmdir, snapshots) == errno.EBUSY
    assert errno_of(os.unlink, snapshots) == errno.EISDIR
    if snapshot:
        with pytest.raises(OSError):
            shutil.rmtree(snapshots)
    else:
        shutil.rmtree(snapshots, ignore_errors=True)
    assert os.path.isdir(snapshots)
    assert mounted.unmount() == 0

    # The real entry is untouched and reachable through the CLI.
    assert_image_clean(image).close()
    if kind == "dir":
        assert cli_listing(f"{image}:/.snapshots") == ["real-file"]
        assert cowtree_cli("cat", f"{image}:/.snapshots/real-file").stdout == "real content"
    else:
        assert cowtree_cli("cat", f"{image}:/.snapshots").stdout == "real content"
    assert sorted(cli_listing(f"{image}:/")) == ["dir", "file"]


def test_snapshot_mount_shows_real_snapshots_entry(mount_image, tmp_path):
    """A mount of one snapshot has no virtual directory, so .snapshots there is an ordinary name."""
    image = str(tmp_path / "fs.img")
    make_image_with_real_snapshots_entry(image, "dir", snapshot=True)
    mounted = mount_image("fs.img@s1", create=False)
    assert sorted(os.listdir(mounted.mountpoint)) == [".snapshots", "dir"]
    assert os.listdir(mounted.path(".snapshots")) == ["real-file"]
    assert read_file(mounted.path(".snapshots", "real-file")) == b"real content"
    assert errno_of(os.rmdir, mounted.path(".snapshots")) == errno.EROFS


# -- real workloads against the same workload on a plain directory -----------------------------

@pytest.fixture(scope="module")
def stdlib_tar(tmp_path_factory):
    """A tar of the standard library without tests, site-packages, caches and the static library."""
    stdlib = sysconfig.get_paths()["stdlib"]
    path = str(tmp_path_factory.mktemp("tar") / "stdlib.tar")
    excludes = ["site-packages", "test", "tests", "__pycache__", "idlelib", "tkinter", "config-*", "lib2to3"]
    subprocess.run(["tar", "-C", stdlib, "-cf", path] + [f"--exclude={e}" for e in excludes] + ["."],
                   check=True)
    return path


def tar_listing(directory: str) -> str:
    """Create a tar of directory (sorted) and return its verbose listing."""
    archive = subprocess.run(["tar", "-C", directory, "--sort=name", "-cf", "-", "."], check=True,
                             capture_output=True).stdout
    listing = subprocess.run(["tar", "-tv", "--full-time", "-f", "-"], input=archive, check=True,
                             capture_output=True).stdout
    return listing.decode()


def test_tar_extract_and_create(shared_mount, workdir, stdlib_tar, tmp_path):
    plain = str(tmp_path / "plain")
    os.mkdir(plain)
    for target in (plain, workdir):
        subprocess.run(["tar", "-C", target, "-xpf", stdlib_tar], check=True)
    assert tar_listing(workdir) == tar_listing(plain)
    subprocess.run(["diff", "-r", plain, workdir], check=True)


def test_cp_a_and_diff(shared_mount, workdir, tmp_path):
    source = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    plain = str(tmp_path / "plain")
    subprocess.run(["cp", "-a", source, plain], check=True)
    target = os.path.join(workdir, "email")
    subprocess.run(["cp", "-a", source, target], check=True)
    subprocess.run(["diff", "-r", plain, target], check=True)
    assert tar_listing(target) == tar_listing(plain)


def test_compileall_inside_mount(shared_mount, workdir, tmp_path):
    source = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    plain = str(tmp_path / "json")
    target = os.path.join(workdir, "json")
    shutil.copytree(source, plain, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for directory in (plain, target):
        # -d gives both trees the same file names inside the pyc files.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-d", "json", directory], check=True)
    compiled = sorted(os.listdir(os.path.join(target, "__pycache__")))
    assert compiled == sorted(os.listdir(os.path.join(plain, "__pycache__")))
    for name in compiled:
        # Timestamp-based pycs embed the source's mtime and size, which copytree kept.
        assert read_file(os.path.join(target, "__pycache__", name)) == \
            read_file(os.path.join(plain, "__pycache__", name)), name
    result = subprocess.run([sys.executable, "-c", "import json; print(json.__file__)"], cwd=workdir,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == os.path.join(target, "__init__.py")


def git(directory: str, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid", GIT_AUTHOR_DATE="2020-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2020-01-01T00:00:00Z", HOME=directory)
    result = subprocess.run(["git", "-c", "init.defaultBranch=main", "-c", "safe.directory=*", *args],
                            cwd=directory, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"git {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def test_git_commit_inside_mount(shared_mount, workdir, tmp_path):
    need_tool("git")
    source = os.path.join(sysconfig.get_paths()["stdlib"], "http")
    plain = str(tmp_path / "repo")
    target = os.path.join(workdir, "repo")
    heads = []
    for directory in (plain, target):
        shutil.copytree(source, directory, ignore=shutil.ignore_patterns("__pycache__"))
        git(directory, "init", "-q")
        git(directory, "add", "-A")
        git(directory, "commit", "-q", "-m", "import")
        assert git(directory, "status", "--porcelain") == ""
        git(directory, "fsck", "--strict")
        heads.append(git(directory, "rev-parse", "HEAD"))
    assert heads[0] == heads[1]


def test_rsync_checksum_in(shared_mount, workdir):
    need_tool("rsync")
    source = os.path.join(sysconfig.get_paths()["stdlib"], "asyncio") + "/"
    subprocess.run(["rsync", "-a", "--checksum", source, workdir + "/"], check=True)
    again = subprocess.run(["rsync", "-a", "--checksum", "--dry-run", "--itemize-changes", source, workdir + "/"],
                           check=True, capture_output=True, text=True)
    assert again.stdout == ""


STRESSORS = [
    ["--dir", "1", "--dir-dirs", "200"],
    ["--rename", "1"],
    ["--link", "1"],
    ["--symlink", "1"],
    ["--xattr", "1"],
    ["--hdd", "1", "--hdd-bytes", "8m", "--hdd-write-size", "64k"],
    ["--fallocate", "1", "--fallocate-bytes", "8m"],
]


@pytest.mark.parametrize("stressor", STRESSORS, ids=[s[0].lstrip("-") for s in STRESSORS])
def test_stress_ng(shared_mount, workdir, stressor):
    need_tool("stress-ng")
    if stressor[0] == "--fallocate" and missing_fuse_ops_piece() is None:
        # With the mount's fallocate handler, the stressor's calls reach the filesystem.
        assert NO_SEEK_WARNING not in shared_mount.output()
    result = subprocess.run(["stress-ng", *stressor, "--timeout", "3s", "--verify", "--metrics-brief",
                             "--temp-path", workdir], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fail" not in result.stdout.lower() + result.stderr.lower().replace("failed: 0", "")


def test_fio_verify(shared_mount, workdir):
    need_tool("fio")
    result = subprocess.run(["fio", "--name=verify", f"--directory={workdir}", "--size=16m", "--bs=4k",
                             "--rw=randwrite", "--ioengine=psync", "--verify=crc32c", "--do_verify=1",
                             "--verify_fatal=1", "--time_based=0", "--numjobs=1"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: bad" not in result.stdout + result.stderr


# -- durability ------------------------------------------------------------------------

def committed_generation(image: str) -> int:
    """Return the generation of the newest superblock, read without the image lock."""
    volume = Volume.open(image, writable=False, device=ImageFile(image, False, lock=False))
    try:
        return volume.generation
    finally:
        volume.close()


def test_kill_during_writes_keeps_last_commit(mount_image):
    mounted = mount_image(commit_interval=0.3)
    durable = mounted.path("durable")
    with open(durable, "wb") as f:
        f.write(b"d" * 100_000)
        f.flush()
        os.fsync(f.fileno())
    orphan = mounted.path("orphan")
    write_file(orphan, b"o" * 50_000)
    orphan_fd = os.open(orphan, os.O_RDONLY)
    os.unlink(orphan)
    os.fsync(orphan_fd)
    generation = committed_generation(mounted.image)

    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set():
            try:
                write_file(mounted.path(f"w{i}"), os.urandom(1000) * 50)
            except OSError:
                return
            written.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.5)
    mounted.kill()
    stop.set()
    thread.join()
    try:
        os.close(orphan_fd)
    except OSError as exc:
        # The release cannot reach the dead mount process.
        assert exc.errno == errno.ENOTCONN
    assert len(written) > 5

    volume = assert_image_clean(mounted.image)
    try:
        assert volume.generation > generation
        fs = live(volume)
        assert fs.read(fs.lookup(256, b"durable"), 0, 200_000) == b"d" * 100_000
        assert len(fs.orphans()) == 1
        for key in fs.readdir(256):
            assert key[1] == b"durable" or key[1].startswith(b"w")
    finally:
        volume.close()

    # The next mount frees the inode that was open and unlinked at the crash.
    again = mount_image(create=False, commit_interval=0.3)
    assert read_file(again.path("durable")) == b"d" * 100_000
    assert again.unmount() == 0
    volume = assert_image_clean(mounted.image)
    try:
        assert live(volume).orphans() == []
    finally:
        volume.close()


def test_unmount_commits_and_checks_clean(mount_image):
    mounted = mount_image(commit_interval=3600)
    write_file(mounted.path("f"), b"unmount commits this")
    os.mkdir(mounted.path("d"))
    assert mounted.unmount() == 0
    volume = assert_image_clean(mounted.image)
    try:
        fs = live(volume)
        assert fs.read(fs.lookup(256, b"f"), 0, 100) == b"unmount commits this"
    finally:
        volume.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["TERM", "INT", "HUP"])
def test_stop_signal_unmounts_and_commits(mount_image, signum):
    mounted = mount_image(commit_interval=3600)
    write_file(mounted.path("f"), b"written before the signal")
    os.mkdir(mounted.path("d"))
    status = mounted.stop(signum)
    assert status == 0, mounted.output()
    assert not listed_in_mounts(mounted.mountpoint)
    assert f"received {signal.Signals(signum).name}: unmounting" in mounted.output()
    volume = assert_image_clean(mounted.image)
    try:
        fs = live(volume)
        assert fs.read(fs.lookup(256, b"f"), 0, 100) == b"written before the signal"
        assert fs.get_inode(fs.lookup(256, b"d")).is_dir
    finally:
        volume.close()


def test_stop_signal_lets_request_finish(mount_image):
    """A fallocate that the mount is handling when SIGTERM arrives succeeds and is committed."""
    require_fuse_ops()
    mounted = mount_image(commit_interval=3600)
    size = 512 << 20
    fd = os.open(mounted.path("big"), os.O_CREAT | os.O_RDWR)
    result = {}

    def allocate():
        try:
            fallocate(fd, 0, 0, size)
            result["errno"] = 0
        except OSError as exc:
            result["errno"] = exc.errno

    thread = threading.Thread(target=allocate)
    thread.start()
    try:
        # The image grows while the zero-filled blocks are written.
        deadline = time.monotonic() + 30
        while os.path.getsize(mounted.image) < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "errno" not in result, "fallocate ended before the signal"
        status = mounted.stop(signal.SIGTERM)
    finally:
        thread.join()
        try:
            os.close(fd)
        except OSError as exc:
            # The release cannot reach the mount process, which has exited.
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert result["errno"] == 0
    assert status == 0, mounted.output()
    assert not listed_in_mounts(mounted.mountpoint)
    volume = assert_image_clean(mounted.image)
    try:
        fs = live(volume)
        inode = fs.get_inode(fs.lookup(256, b"big"))
        assert (inode.size, inode.nbytes) == (size, size)
    finally:
        volume.close()


def test_read_only_mount_rejects_writes(mount_image):
    mounted = mount_image()
    write_file(mounted.path("f"), b"x")
    assert mounted.unmount() == 0
    readonly = mount_image(create=False, readonly=True)
    assert read_file(readonly.path("f")) == b"x"
    assert errno_of(write_file, readonly.path("g"), b"y") == errno.EROFS


def test_mount_snapshot_is_read_only(mount_image, tmp_path):
    image = str(tmp_path / "snap.img")
    volume = mkfs(image)
    fs = live(volume)
    fs.mkdir(256, b"dir")
    volume.commit()
    create_snapshot(volume, b"s1")
    fs.rmdir(256, b"dir")
    volume.commit()
    volume.close()
    mounted = mount_image(name="snap.img@s1", create=False)
    assert os.listdir(mounted.mountpoint) == ["dir"]
    assert errno_of(os.mkdir, mounted.path("new")) == errno.EROFS


def cowtree_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("COWTREE_STRICT", None)
    return subprocess.run([sys.executable, "-c", "import sys; from cowtree.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_mount_returns_when_ready(tmp_path):
    image = str(tmp_path / "cli.img")
    mkfs(image).close()
    mountpoint = str(tmp_path / "mnt")
    os.mkdir(mountpoint)
    result = cowtree_cli("mount", "--commit-interval", "1", image, mountpoint)
    try:
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mountpoint)
        write_file(os.path.join(mountpoint, "f"), b"through the daemon")
        busy = cowtree_cli("mount", image, str(tmp_path))
        assert busy.returncode == 4, busy.stderr
        assert "in use" in busy.stderr
    finally:
        if os.path.ismount(mountpoint):
            unmounted = cowtree_cli("umount", mountpoint)
            if unmounted.returncode:
                subprocess.run(["fusermount3", "-u", "-z", mountpoint])
            assert unmounted.returncode == 0, unmounted.stderr
    # The daemon commits and releases the image lock after the unmount.
    deadline = time.monotonic() + 30
    while True:
        try:
            volume = assert_image_clean(image)
            break
        except Exception as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        fs = live(volume)
        assert fs.read(fs.lookup(256, b"f"), 0, 100) == b"through the daemon"
    finally:
        volume.close()
    missing = cowtree_cli("mount", f"{image}@nosuch", mountpoint)
    assert missing.returncode == 1
    assert "snapshot 'nosuch' not found" in missing.stderr


def test_enospc_fails_only_that_write(mount_image, tmp_path):
    """A write that finds no space fails alone: earlier uncommitted files stay, the mount stays writable."""
    mkfs(str(tmp_path / "small.img"), size_limit=8 << 20).close()
    mounted = mount_image("small.img", create=False, commit_interval=600)
    write_file(mounted.path("keep"), b"written before the image filled up")
    with pytest.raises(OSError) as caught:
        with open(mounted.path("big"), "wb") as handle:
            for _ in range(32):
                handle.write(os.urandom(1 << 20))
                handle.flush()
    assert caught.value.errno == errno.ENOSPC
    assert read_file(mounted.path("keep")) == b"written before the image filled up"
    os.unlink(mounted.path("big"))
    write_file(mounted.path("after"), b"still writable")
    assert mounted.unmount() == 0
    volume = assert_image_clean(str(tmp_path / "small.img"))
    fs = live(volume)
    assert fs.read(fs.resolve(b"/keep"), 0, 100) == b"written before the image filled up"
    assert fs.read(fs.resolve(b"/after"), 0, 100) == b"still writable"
    volume.close()


def test_enospc_after_small_appends_keeps_every_write(mount_image, tmp_path):
    """4 KiB appends fill an image with small extents; the one that finds no space fails alone.

    Every acknowledged byte survives the unmount, the mount does not turn
    read-only, and the commit at unmount has room for thousands of extent
    items.
    """
    image = str(tmp_path / "appends.img")
    mkfs(image, size_limit=32 << 20).close()
    mounted = mount_image("appends.img", create=False, commit_interval=600)
    write_file(mounted.path("keep"), b"written first")
    acknowledged = 0
    fd = os.open(mounted.path("log"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                acknowledged += os.write(fd, acknowledged.to_bytes(8, "little") * 512)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    assert acknowledged > 16 << 20
    # Not turned read-only: a removal works, and a new directory either
    # fits or finds no space (EROFS would mean the transaction was dropped).
    os.unlink(mounted.path("keep"))
    try:
        os.mkdir(mounted.path("dir"))
        expected_names = [b"dir", b"log"]
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        expected_names = [b"log"]
    assert mounted.unmount() == 0
    volume = assert_image_clean(image)
    fs = live(volume)
    ino = fs.resolve(b"/log")
    assert fs.get_inode(ino).size == acknowledged
    for offset in range(0, acknowledged, 1 << 20):
        assert fs.read(ino, offset, 8) == offset.to_bytes(8, "little")
    assert sorted(entry[1] for entry in fs.readdir(fs.resolve(b"/"))) == expected_names
    volume.close()


def test_space_freed_by_rm_is_usable_before_commit(mount_image, tmp_path):
    """After rm of a committed file, a write that finds no space commits and succeeds, as on Btrfs."""
    mkfs(str(tmp_path / "tight.img"), size_limit=8 << 20).close()
    mounted = mount_image("tight.img", create=False, commit_interval=600)
    with pytest.raises(OSError):
        with open(mounted.path("fill"), "wb") as handle:
            for _ in range(32):
                handle.write(os.urandom(1 << 20))
                handle.flush()
                os.fsync(handle.fileno())
    os.unlink(mounted.path("fill"))
    write_file(mounted.path("after"), b"a" * (1 << 20))
    assert read_file(mounted.path("after")) == b"a" * (1 << 20)
    assert mounted.unmount() == 0
    assert_image_clean(str(tmp_path / "tight.img")).close()
