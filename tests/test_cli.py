"""Command-line tests: each runs the real ``python -m cowtree`` on image files in tmp_path.

Messages are checked word for word, because scripts grep them, and every
failing command is checked to leave its image at the last commit.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import sysconfig

import pytest

from cowtree import image as image_module
from cowtree import ondisk
from cowtree.fs import dtype_of, encode_dirent

MTIME_NS = 1_234_567_890_123_456_789
ATIME_NS = 1_111_111_111_222_333_444


def cowtree(cwd, *args, check: bool = True, stdin=None):
    """Run cowtree with args in cwd; return the CompletedProcess (stdout as bytes)."""
    result = subprocess.run([sys.executable, "-m", "cowtree", *args], cwd=cwd, capture_output=True,
                            stdin=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"cowtree {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


def error_of(result) -> str:
    return result.stderr.decode()


def host_supports_user_xattrs(path) -> bool:
    probe = os.path.join(path, "xattr-probe")
    with open(probe, "w"):
        pass
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


def json_of(result):
    return json.loads(result.stdout)


@pytest.fixture
def workdir(tmp_path):
    """tmp_path with an empty image disk.img in it."""
    cowtree(tmp_path, "mkfs", "disk.img")
    return tmp_path


ODD_NAMES = [b"caf\xe9", b"sp ace", b"new\nline", b"-dash", b"colon:name", b"\x01ctl"]


def build_tree(root, with_xattr: bool) -> None:
    """Make a small tree with every kind of entry and attribute the copy must keep."""
    os.mkdir(root)
    os.mkdir(root / "dir", 0o750)
    (root / "dir" / "plain.txt").write_bytes(b"plain contents\n")
    os.chmod(root / "dir" / "plain.txt", 0o640)
    (root / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o755)
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3 << 20) + b"tail")

    # A sparse file: 64 MiB with one byte of data in the middle.
    with open(root / "sparse", "wb") as handle:
        handle.truncate(64 << 20)
        handle.seek(32 << 20)
        handle.write(b"x")

    (root / "linked-a").write_bytes(b"shared by two names\n")
    os.link(root / "linked-a", root / "dir" / "linked-b")
    os.symlink("dir/plain.txt", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "fifo")
    for name in ODD_NAMES:
        (root / os.fsdecode(name)).write_bytes(name)
    if with_xattr:
        os.setxattr(root / "dir" / "plain.txt", "user.comment", b"kept by cp -a")

    # Times last, children before their parents.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(ATIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(ATIME_NS, MTIME_NS))


def snapshot_tree(root) -> dict:
    """Return {relative path: (mode, mtime_ns, size, symlink target, contents)} for a host tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            contents = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    contents = handle.read()
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, st.st_size, target, contents)
    return out


# ---------------------------------------------------------------------------
# Round trips


def test_round_trip_keeps_attributes(workdir):
    with_xattr = host_supports_user_xattrs(workdir)
    src = workdir / "src"
    build_tree(src, with_xattr)
    cowtree(workdir, "cp", "-a", "src", "disk.img:/")
    cowtree(workdir, "cp", "-a", "disk.img:/src", "out")

    before = snapshot_tree(src)
    after = snapshot_tree(workdir / "out")
    assert sorted(after) == sorted(before)
    for path, expected in before.items():
        assert after[path] == expected, path
    assert os.stat(workdir / "out").st_mtime_ns == MTIME_NS

    linked_a = os.stat(workdir / "out" / "linked-a")
    linked_b = os.stat(workdir / "out" / "dir" / "linked-b")
    assert linked_a.st_ino == linked_b.st_ino
    assert linked_a.st_nlink == 2

    sparse = os.stat(workdir / "out" / "sparse")
    assert sparse.st_size == 64 << 20
    assert sparse.st_blocks * 512 <= 1 << 20
    if with_xattr:
        assert os.getxattr(workdir / "out" / "dir" / "plain.txt", "user.comment") == b"kept by cp -a"


def test_round_trip_inside_image(workdir):
    with_xattr = host_supports_user_xattrs(workdir)
    build_tree(workdir / "src", with_xattr)
    cowtree(workdir, "cp", "-a", "src", "disk.img:/")

    [plain] = json_of(cowtree(workdir, "stat", "--json", "disk.img:/src/dir/plain.txt"))
    assert plain["mtime_ns"] == MTIME_NS
    assert plain["atime_ns"] == ATIME_NS
    assert stat.S_IMODE(plain["mode"]) == 0o640
    if with_xattr:
        assert plain["xattrs"] == ["user.comment"]

    [link] = json_of(cowtree(workdir, "stat", "--json", "disk.img:/src/rel-link"))
    assert link["type"] == "symlink"
    assert link["target"] == "dir/plain.txt"

    [sparse] = json_of(cowtree(workdir, "stat", "--json", "disk.img:/src/sparse"))
    assert sparse["size"] == 64 << 20
    assert sparse["blocks"] * 512 <= 1 << 20

    listing = json_of(cowtree(workdir, "ls", "--json", "disk.img:/src"))
    names = {entry["name"] for entry in listing}
    assert {os.fsdecode(name) for name in ODD_NAMES} <= names


def test_copy_without_archive_uses_umask_and_now(workdir):
    build_tree(workdir / "src", False)
    cowtree(workdir, "cp", "-r", "src", "disk.img:/plain")
    [plain] = json_of(cowtree(workdir, "stat", "--json", "disk.img:/plain/dir/plain.txt"))
    assert plain["mtime_ns"] != MTIME_NS
    assert plain["uid"] == os.getuid()


def test_image_to_image_copy(workdir):
    (workdir / "f").write_bytes(b"data")
    cowtree(workdir, "mkfs", "other.img")
    cowtree(workdir, "cp", "f", "disk.img:/f")
    cowtree(workdir, "cp", "disk.img:/f", "other.img:/g")
    cowtree(workdir, "cp", "disk.img:/f", "disk.img:/h")
    assert cowtree(workdir, "cat", "other.img:/g", "disk.img:/h").stdout == b"datadata"


def test_cat_writes_holes_as_zeros(workdir):
    with open(workdir / "holey", "wb") as handle:
        handle.truncate(10000)
        handle.seek(9000)
        handle.write(b"end")
    cowtree(workdir, "cp", "holey", "disk.img:/holey")
    data = cowtree(workdir, "cat", "disk.img:/holey").stdout
    assert len(data) == 10000
    assert data[9000:9003] == b"end"
    assert data[:9000] == bytes(9000)


def test_ls_long_and_json(workdir):
    (workdir / "f").write_bytes(b"12345")
    cowtree(workdir, "mkdir", "disk.img:/d")
    cowtree(workdir, "cp", "f", "disk.img:/d/f")
    cowtree(workdir, "ln", "-s", "f", "disk.img:/d/s")
    long = cowtree(workdir, "ls", "-l", "disk.img:/d").stdout.decode().splitlines()
    assert long[0].startswith("total ")
    assert long[1].startswith("-rw-")
    assert long[1].endswith(" f")
    assert long[2].startswith("lrwxrwxrwx")
    assert long[2].endswith(" s -> f")
    entries = json_of(cowtree(workdir, "ls", "--json", "disk.img:/d"))
    assert [entry["name"] for entry in entries] == ["f", "s"]
    assert set(entries[0]) >= {"name", "type", "mode", "size", "nlink", "uid", "gid", "mtime_ns", "ino"}
    assert entries[0]["size"] == 5
    assert entries[1]["target"] == "f"


def test_namespace_commands(workdir):
    cowtree(workdir, "mkdir", "-p", "disk.img:/a/b/c")
    cowtree(workdir, "mkdir", "-p", "disk.img:/a/b/c")
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/a/f")
    cowtree(workdir, "ln", "disk.img:/a/f", "disk.img:/a/hard")
    cowtree(workdir, "mv", "disk.img:/a/f", "disk.img:/a/b")
    assert cowtree(workdir, "cat", "disk.img:/a/b/f").stdout == b"x"
    [hard] = json_of(cowtree(workdir, "stat", "--json", "disk.img:/a/hard"))
    assert hard["nlink"] == 2
    cowtree(workdir, "rm", "disk.img:/a/hard")
    cowtree(workdir, "rm", "-f", "disk.img:/a/missing")
    cowtree(workdir, "rmdir", "disk.img:/a/b/c")
    cowtree(workdir, "rm", "-r", "disk.img:/a")
    assert json_of(cowtree(workdir, "ls", "--json", "disk.img")) == []


def test_df_and_info_json(workdir):
    space = json_of(cowtree(workdir, "df", "--json", "disk.img"))
    assert space["used_bytes"] > 0
    assert space["free_bytes"] > 0
    assert space["image_bytes"] >= ondisk.FIRST_ALLOC
    info = json_of(cowtree(workdir, "info", "--json", "disk.img"))
    assert info["node_size"] == ondisk.DEFAULT_NODE_SIZE
    assert info["generation"] >= 1
    assert {tree["name"] for tree in info["trees"]} >= {"root tree", "extent tree", f"subvolume {ondisk.FS_TREE_ID}"}
    text = cowtree(workdir, "info", "disk.img").stdout.decode()
    assert f"generation: {info['generation']}\n" in text


def test_mkfs_sizes_and_force(tmp_path):
    cowtree(tmp_path, "mkfs", "--size", "8M", "--node-size", "4K", "--label", "test", "small.img")
    info = json_of(cowtree(tmp_path, "info", "--json", "small.img"))
    assert info["size_limit"] == 8 << 20
    assert info["node_size"] == 4096
    assert info["label"] == "test"

    refused = cowtree(tmp_path, "mkfs", "small.img", check=False)
    assert refused.returncode == 1
    assert error_of(refused) == "cowtree: small.img: file exists and is not empty; use --force to overwrite it\n"
    cowtree(tmp_path, "mkfs", "--force", "small.img")

    bad = cowtree(tmp_path, "mkfs", "--size", "12Q", "x.img", check=False)
    assert bad.returncode == 2


# ---------------------------------------------------------------------------
# Errors


def test_missing_path_message(workdir):
    result = cowtree(workdir, "stat", "disk.img:/x", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot stat 'disk.img:/x': No such file or directory\n"


def test_rmdir_not_empty_message(workdir):
    cowtree(workdir, "mkdir", "-p", "disk.img:/a/b")
    result = cowtree(workdir, "rmdir", "disk.img:/a", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: failed to remove 'disk.img:/a': Directory not empty\n"


def test_operand_errors_do_not_stop(workdir):
    """Each bad operand gets its message; the good ones before and after still count."""
    result = cowtree(workdir, "mkdir", "disk.img:/a", "disk.img:/missing/b", "disk.img:/c", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot create directory 'disk.img:/missing/b': No such file or directory\n"
    names = [entry["name"] for entry in json_of(cowtree(workdir, "ls", "--json", "disk.img"))]
    assert names == ["a", "c"]

    (workdir / "one").write_bytes(b"one\n")
    (workdir / "two").write_bytes(b"two\n")
    cowtree(workdir, "cp", "one", "two", "disk.img:/a")
    result = cowtree(workdir, "cat", "disk.img:/a/one", "disk.img:/nope", "disk.img:/a", "disk.img:/a/two",
                     check=False)
    assert result.returncode == 1
    assert result.stdout == b"one\ntwo\n"
    assert error_of(result) == ("cowtree: disk.img:/nope: No such file or directory\n"
                                "cowtree: disk.img:/a: Is a directory\n")

    result = cowtree(workdir, "stat", "disk.img:/nope", "disk.img:/a/one", check=False)
    assert result.returncode == 1
    assert b"disk.img:/a/one" in result.stdout

    result = cowtree(workdir, "rm", "disk.img:/a/one", "disk.img:/a", "disk.img:/a/two", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot remove 'disk.img:/a': Is a directory\n"
    assert json_of(cowtree(workdir, "ls", "--json", "disk.img:/a")) == []

    result = cowtree(workdir, "rmdir", "disk.img:/a", "disk.img:/", "disk.img:/c", check=False)
    assert result.returncode == 1
    assert json_of(cowtree(workdir, "ls", "--json", "disk.img")) == []


def test_ls_several_operands(workdir):
    """Files first, then each directory under a header, blank lines between."""
    cowtree(workdir, "mkdir", "disk.img:/a", "disk.img:/b")
    (workdir / "f").write_bytes(b"f")
    cowtree(workdir, "cp", "f", "disk.img:/a/f")
    result = cowtree(workdir, "ls", "disk.img:/a", "disk.img:/nope", "disk.img:/b", "disk.img:/a/f", check=False)
    assert result.returncode == 1
    assert result.stdout == b"/a/f\n\ndisk.img:/a:\nf\n\ndisk.img:/b:\n"
    assert error_of(result) == "cowtree: cannot access 'disk.img:/nope': No such file or directory\n"
    listed = json_of(cowtree(workdir, "ls", "--json", "disk.img:/a", "disk.img:/a"))
    assert [entry["path"] for entry in listed] == ["/a/f", "/a/f"]


def test_ls_sorts_operands(workdir):
    """Files, then directories, each sorted by name, whatever the command-line order."""
    cowtree(workdir, "mkdir", "-p", "disk.img:/b/sub", "disk.img:/a")
    (workdir / "small").write_bytes(b"x")
    (workdir / "large").write_bytes(b"x" * 12345)
    cowtree(workdir, "cp", "small", "disk.img:/zf")
    cowtree(workdir, "cp", "large", "disk.img:/af")
    cowtree(workdir, "cp", "small", "disk.img:/b/x")
    operands = ["disk.img:/zf", "disk.img:/b", "disk.img:/nope", "disk.img:/a", "disk.img:/af"]
    result = cowtree(workdir, "ls", *operands, check=False)
    assert result.returncode == 1
    assert result.stdout == b"/af\n/zf\n\ndisk.img:/a:\n\ndisk.img:/b:\nsub\nx\n"
    assert error_of(result) == "cowtree: cannot access 'disk.img:/nope': No such file or directory\n"

    listed = json_of(cowtree(workdir, "ls", "--json", *operands, check=False))
    assert [entry["path"] for entry in listed] == ["/af", "/zf", "/b/sub", "/b/x"]

    long = cowtree(workdir, "ls", "-l", "disk.img:/zf", "disk.img:/af").stdout.decode().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in long] == ["/af", "/zf"]
    assert len(long[0]) == len(long[1])   # one block, so the size column is aligned


def test_ls_recursive_headers(workdir):
    """With -R the header is the path for one operand, IMAGE:/path for several."""
    cowtree(workdir, "mkdir", "-p", "disk.img:/b/sub", "disk.img:/a")
    assert cowtree(workdir, "ls", "-R", "disk.img:/b").stdout == b"/b:\nsub\n\n/b/sub:\n"
    result = cowtree(workdir, "ls", "-R", "disk.img:/b", "disk.img:/a")
    assert result.stdout == b"disk.img:/a:\n\ndisk.img:/b:\nsub\n\ndisk.img:/b/sub:\n"
    help_text = cowtree(workdir, "ls", "--help").stdout.decode()
    assert "(/dir:)" in help_text
    assert "IMAGE:/dir:" in help_text


def test_no_space_in_one_operand_drops_all(tmp_path):
    """No space left is not an operand error: nothing the command did stays."""
    cowtree(tmp_path, "mkfs", "--size", "3M", "--node-size", "4K", "small.img")
    before = cowtree(tmp_path, "ls", "-R", "--json", "small.img").stdout
    names = [f"small.img:/{'d' * 200}{index:05d}" for index in range(3000)]
    result = cowtree(tmp_path, "mkdir", *names, check=False)
    assert result.returncode == 1
    assert "No space left on device" in error_of(result)
    assert error_of(result).count("\n") == 1
    assert cowtree(tmp_path, "ls", "-R", "--json", "small.img").stdout == before


def test_name_too_long(workdir):
    name = "n" * 256
    result = cowtree(workdir, "mkdir", f"disk.img:/{name}", check=False)
    assert result.returncode == 1
    assert error_of(result) == f"cowtree: cannot create directory 'disk.img:/{name}': File name too long\n"

    (workdir / "f").write_bytes(b"x")
    result = cowtree(workdir, "cp", "f", f"disk.img:/{name}", check=False)
    assert result.returncode == 1
    assert error_of(result) == f"cowtree: cannot create regular file 'disk.img:/{name}': File name too long\n"


def test_rm_long_name_is_operand_error(workdir):
    """A name too long concerns its operand only: the operands around it still count."""
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/victim")
    long_operand = "disk.img:/" + "a" * 256
    result = cowtree(workdir, "rm", "-r", "disk.img:/victim", long_operand, "disk.img:/nope", check=False)
    assert result.returncode == 1
    assert error_of(result) == (f"cowtree: cannot remove '{long_operand}': File name too long\n"
                                "cowtree: cannot remove 'disk.img:/nope': No such file or directory\n")
    assert json_of(cowtree(workdir, "ls", "--json", "disk.img")) == []


def test_long_name_in_each_command(workdir):
    """Every command names the operand whose name is too long, and goes on with the next."""
    cowtree(workdir, "mkdir", "disk.img:/d")
    long_operand = "disk.img:/" + "a" * 256
    cases = [
        (("ls", long_operand, "disk.img:/d"), f"cannot access '{long_operand}'"),
        (("stat", long_operand, "disk.img:/d"), f"cannot stat '{long_operand}'"),
        (("cat", long_operand), long_operand),
        (("mkdir", long_operand, "disk.img:/e"), f"cannot create directory '{long_operand}'"),
        (("rmdir", long_operand, "disk.img:/e"), f"failed to remove '{long_operand}'"),
        (("rm", "-f", long_operand), f"cannot remove '{long_operand}'"),
        (("cp", "-r", long_operand, "disk.img:/c"), f"cannot stat '{long_operand}'"),
        (("cp", "-r", "disk.img:/d", long_operand), f"cannot create directory '{long_operand}'"),
        (("mv", long_operand, "disk.img:/m"), f"cannot stat '{long_operand}'"),
        (("mv", "disk.img:/d", long_operand), f"cannot stat '{long_operand}'"),
        (("ln", "-s", "d", long_operand), f"failed to create symbolic link '{long_operand}' -> 'd'"),
        (("ln", "disk.img:/d", long_operand), f"failed to create hard link '{long_operand}' => 'disk.img:/d'"),
    ]
    for args, head in cases:
        result = cowtree(workdir, *args, check=False)
        assert result.returncode == 1, args
        assert error_of(result) == f"cowtree: {head}: File name too long\n", args
    names = [entry["name"] for entry in json_of(cowtree(workdir, "ls", "--json", "disk.img"))]
    assert names == ["d"]


def test_rm_trailing_slash(workdir):
    """A trailing slash requires a directory, as in coreutils 9.1 rm."""
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/tf")
    cowtree(workdir, "mkdir", "-p", "disk.img:/d/sub", "disk.img:/e")
    cowtree(workdir, "cp", "f", "disk.img:/d/x")
    cowtree(workdir, "ln", "-s", "d", "disk.img:/sl")
    cowtree(workdir, "ln", "-s", "tf", "disk.img:/slf")
    cowtree(workdir, "ln", "-s", "nowhere", "disk.img:/dang")
    cases = [
        (("rm", "disk.img:/tf/"), "cannot remove 'disk.img:/tf/': Not a directory"),
        (("rm", "-r", "disk.img:/tf/"), "cannot remove 'disk.img:/tf/': Not a directory"),
        (("rm", "disk.img:/tf/x"), "cannot remove 'disk.img:/tf/x': Not a directory"),
        (("rm", "-r", "disk.img:/slf/"), "cannot remove 'disk.img:/slf/': Not a directory"),
        (("rm", "disk.img:/dang/"), "cannot remove 'disk.img:/dang/': Not a directory"),
        (("rm", "disk.img:/sl/"), "cannot remove 'disk.img:/sl/': Is a directory"),
        (("rm", "-r", "disk.img:/d/."), "refusing to remove '.' or '..' directory: skipping 'disk.img:/d/.'"),
    ]
    for args, message in cases:
        result = cowtree(workdir, *args, check=False)
        assert result.returncode == 1, args
        assert error_of(result) == f"cowtree: {message}\n", args
    names = [entry["name"] for entry in json_of(cowtree(workdir, "ls", "--json", "disk.img"))]
    assert names == ["d", "dang", "e", "sl", "slf", "tf"]

    quiet = cowtree(workdir, "rm", "-f", "disk.img:/tf/", "disk.img:/tf/x", "disk.img:/dang/")
    assert error_of(quiet) == ""
    cowtree(workdir, "rm", "-r", "disk.img:/e/")

    # Like coreutils, rm -r removes what the linked directory contains, then
    # fails to remove the symlink itself.
    result = cowtree(workdir, "rm", "-r", "disk.img:/sl/", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot remove 'disk.img:/sl/': Not a directory\n"
    assert json_of(cowtree(workdir, "ls", "--json", "disk.img:/d")) == []
    names = [entry["name"] for entry in json_of(cowtree(workdir, "ls", "--json", "disk.img"))]
    assert names == ["d", "dang", "sl", "slf", "tf"]


def test_rmdir_trailing_slash(workdir):
    """rmdir follows no symlink named with a trailing slash, as in coreutils 9.1 rmdir."""
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/tf")
    cowtree(workdir, "mkdir", "disk.img:/d", "disk.img:/e")
    cowtree(workdir, "ln", "-s", "d", "disk.img:/sl")
    cowtree(workdir, "ln", "-s", "tf", "disk.img:/slf")
    cowtree(workdir, "ln", "-s", "nowhere", "disk.img:/dang")
    cases = [
        ("disk.img:/tf/", "Not a directory"),
        ("disk.img:/tf/x", "Not a directory"),
        ("disk.img:/slf/", "Not a directory"),
        ("disk.img:/sl", "Not a directory"),
        ("disk.img:/sl/", "Symbolic link not followed"),
        ("disk.img:/dang/", "Symbolic link not followed"),
        ("disk.img:/d/.", "Invalid argument"),
    ]
    for operand, reason in cases:
        result = cowtree(workdir, "rmdir", operand, check=False)
        assert result.returncode == 1, operand
        assert error_of(result) == f"cowtree: failed to remove '{operand}': {reason}\n", operand
    cowtree(workdir, "rmdir", "disk.img:/e/")
    names = [entry["name"] for entry in json_of(cowtree(workdir, "ls", "--json", "disk.img"))]
    assert names == ["d", "dang", "sl", "slf", "tf"]


def test_rm_link_to_root_rejected(workdir):
    cowtree(workdir, "mkdir", "disk.img:/d")
    cowtree(workdir, "ln", "-s", "/", "disk.img:/top")
    result = cowtree(workdir, "rm", "-r", "disk.img:/top/", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: refusing to remove the root directory 'disk.img:/top/'\n"
    names = [entry["name"] for entry in json_of(cowtree(workdir, "ls", "--json", "disk.img"))]
    assert names == ["d", "top"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_error_names_no_operand(workdir):
    """A full standard output is a write error, as in coreutils, not a problem of the image."""
    (workdir / "f").write_bytes(os.urandom(1 << 20))
    cowtree(workdir, "cp", "f", "disk.img:/f")
    cases = [(("cat", "disk.img:/f"), 1), (("ls", "disk.img:/"), 1), (("stat", "--json", "disk.img:/f"), 1),
             (("info", "disk.img"), 1), (("snapshot", "list", "disk.img"), 1), (("fsck", "disk.img"), 4)]
    for args, status in cases:
        with open("/dev/full", "wb") as full:
            result = subprocess.run([sys.executable, "-m", "cowtree", *args], cwd=workdir, stdout=full,
                                    stderr=subprocess.PIPE)
        assert result.returncode == status, args
        assert result.stderr.decode() == "cowtree: write error: No space left on device\n", args


def test_closed_pipe_ends_quietly(workdir):
    """Like coreutils cat, cat into a pipe whose reader has gone dies of SIGPIPE without a message."""
    (workdir / "f").write_bytes(os.urandom(4 << 20))
    cowtree(workdir, "cp", "f", "disk.img:/f")
    process = subprocess.Popen([sys.executable, "-m", "cowtree", "cat", "disk.img:/f"], cwd=workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(process.stdout.read(1)) == 1
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == -signal.SIGPIPE
    assert stderr == b""


def test_mkdir_existing_root_or_dot(workdir):
    """mkdir of the root, '.' or '..' finds a directory that exists, as coreutils mkdir does."""
    cowtree(workdir, "mkdir", "disk.img:/d")
    cases = [("disk.img:/", "File exists"), ("disk.img:/d/.", "File exists"), ("disk.img:/d/..", "File exists"),
             ("disk.img:/nope/..", "No such file or directory")]
    for operand, reason in cases:
        result = cowtree(workdir, "mkdir", operand, check=False)
        assert result.returncode == 1, operand
        assert error_of(result) == f"cowtree: cannot create directory '{operand}': {reason}\n", operand
    cowtree(workdir, "mkdir", "-p", "disk.img:/", "disk.img:/d/..")


def test_directory_onto_file(workdir):
    (workdir / "d").mkdir()
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/f")
    result = cowtree(workdir, "cp", "-r", "d", "disk.img:/f", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot overwrite non-directory 'disk.img:/f' with directory 'd'\n"


def test_directory_without_recursive(workdir):
    (workdir / "d").mkdir()
    (workdir / "f").write_bytes(b"x")
    result = cowtree(workdir, "cp", "d", "f", "disk.img:/", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: -r not specified; omitting directory 'd'\n"
    assert json_of(cowtree(workdir, "ls", "--json", "disk.img")) == []


def test_copy_into_itself(workdir):
    cowtree(workdir, "mkdir", "-p", "disk.img:/a/b")
    result = cowtree(workdir, "cp", "-r", "disk.img:/a", "disk.img:/a/b", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot copy a directory, 'disk.img:/a', into itself, 'disk.img:/a/b/a'\n"


def test_second_writer_gets_in_use(workdir):
    fd = os.open(workdir / "disk.img", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for args in (("mkdir", "disk.img:/x"), ("ls", "disk.img")):
            result = cowtree(workdir, *args, check=False)
            assert result.returncode == 4
            assert error_of(result) == "cowtree: disk.img: image is in use by another process\n"
    finally:
        os.close(fd)


def test_readers_share_the_lock(workdir):
    fd = os.open(workdir / "disk.img", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert cowtree(workdir, "ls", "disk.img").returncode == 0
        writer = cowtree(workdir, "mkdir", "disk.img:/x", check=False)
        assert writer.returncode == 4
    finally:
        os.close(fd)


def test_full_image_is_left_unchanged(tmp_path):
    cowtree(tmp_path, "mkfs", "--size", "3M", "--node-size", "4K", "small.img")
    (tmp_path / "small").write_bytes(b"fits")
    cowtree(tmp_path, "cp", "small", "small.img:/small")
    before_listing = cowtree(tmp_path, "ls", "-R", "--json", "small.img").stdout
    before_info = json_of(cowtree(tmp_path, "info", "--json", "small.img"))
    size_before = os.path.getsize(tmp_path / "small.img")

    (tmp_path / "big").write_bytes(os.urandom(8 << 20))
    result = cowtree(tmp_path, "cp", "big", "small.img:/big", check=False)
    assert result.returncode == 1
    assert error_of(result).startswith("cowtree: error writing 'small.img:/big': No space left on device")

    assert cowtree(tmp_path, "ls", "-R", "--json", "small.img").stdout == before_listing
    after_info = json_of(cowtree(tmp_path, "info", "--json", "small.img"))
    assert after_info["generation"] == before_info["generation"]
    assert os.path.getsize(tmp_path / "small.img") == size_before


def test_not_an_image(tmp_path):
    (tmp_path / "junk.img").write_bytes(b"junk" * 5000)
    result = cowtree(tmp_path, "ls", "junk.img", check=False)
    assert result.returncode == 3
    assert error_of(result).startswith("cowtree: junk.img: not a cowtree image (")


def test_missing_image(tmp_path):
    result = cowtree(tmp_path, "ls", "nothing.img", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: cannot open image 'nothing.img': No such file or directory\n"


def test_corrupt_node_reported(workdir):
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/f")
    info = json_of(cowtree(workdir, "info", "--json", "disk.img"))
    [live] = [tree for tree in info["trees"] if tree["id"] == ondisk.FS_TREE_ID]
    with open(workdir / "disk.img", "r+b") as handle:
        handle.seek(live["root"] + 100)
        handle.write(b"\xff" * 16)
    result = cowtree(workdir, "ls", "disk.img", check=False)
    assert result.returncode == 3
    assert error_of(result).startswith("cowtree: cannot access 'disk.img:/': corrupt ")
    assert "Traceback" not in error_of(result)


def test_corrupt_superblocks_reported(workdir):
    with open(workdir / "disk.img", "r+b") as handle:
        for offset in ondisk.SUPERBLOCK_OFFSETS:
            handle.seek(offset + 40)
            handle.write(b"\xff" * 8)
    result = cowtree(workdir, "info", "disk.img", check=False)
    assert result.returncode == 3
    assert error_of(result).startswith("cowtree: disk.img: not a cowtree image (no valid superblock: ")


def test_missing_snapshot(workdir):
    result = cowtree(workdir, "ls", "disk.img@nosuch:/", check=False)
    assert result.returncode == 1
    assert error_of(result) == "cowtree: disk.img: snapshot 'nosuch' not found\n"


def test_usage_errors_exit_2(workdir):
    assert cowtree(workdir, "cp", "only-one", check=False).returncode == 2
    assert cowtree(workdir, "cp", "host-a", "host-b", check=False).returncode == 2
    assert cowtree(workdir, "frobnicate", check=False).returncode == 2


def test_mount_commit_interval_checked(workdir):
    """A commit interval that is not a finite number of seconds above 0 is a usage error."""
    (workdir / "mnt").mkdir()
    for value in ("nan", "NaN", "inf", "-inf", "1e400", "0", "-0.0", "-1", "five", ""):
        result = cowtree(workdir, "mount", "--commit-interval", value, "disk.img", "mnt", check=False)
        assert result.returncode == 2, value
        assert (f"Invalid value for '--commit-interval': {value!r} is not a finite number of seconds above 0"
                in error_of(result)), value
    assert not os.path.ismount(workdir / "mnt")


def test_help_loads_no_engine(tmp_path):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "cowtree", "--help"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "cowtree.cli" in imported
    assert not imported & {"cowtree.fs", "cowtree.transaction", "cowtree.btree", "construct"}


# ---------------------------------------------------------------------------
# Copying out of a hostile image


def craft_hostile_image(path, outside) -> None:
    """Make an image whose root lists 'evil' twice: a symlink to outside, then a directory.

    It also holds an entry named '../escape', which no valid image can have.
    """
    volume = image_module.open_image(str(path), writable=True)
    try:
        fs = image_module.live(volume)
        root = ondisk.ROOT_DIR_INO
        fs.symlink(root, b"evil", os.fsencode(str(outside)))
        real_dir = fs.mkdir(root, b"real", 0o755)
        payload = fs.mknod(real_dir.ino, b"payload", stat.S_IFREG | 0o644)
        fs.write(payload.ino, 0, b"must stay inside the destination")
        root_inode = fs.get_inode(root)
        fs.tree.put((root, ondisk.DIR_INDEX, 1000), encode_dirent(real_dir.ino, dtype_of(real_dir.mode), b"evil"))
        fs.tree.put((root, ondisk.DIR_INDEX, 1001),
                    encode_dirent(payload.ino, dtype_of(payload.mode), b"../escape"))
        root_inode.seq = 1002
        fs.put_inode(root_inode)
        volume.commit()
    finally:
        volume.close()


def test_hostile_image_stays_in_destination(workdir, monkeypatch):
    outside = workdir / "outside"
    outside.mkdir()
    monkeypatch.setenv("COWTREE_STRICT", "")
    craft_hostile_image(workdir / "disk.img", outside)

    result = cowtree(workdir, "cp", "-r", "disk.img:/", "dest", check=False)
    assert result.returncode != 0
    assert "Traceback" not in error_of(result)
    assert list(outside.iterdir()) == []
    assert not (workdir / "escape").exists()
    assert os.path.islink(workdir / "dest" / "evil")


def test_hostile_name_rejected(workdir, monkeypatch):
    monkeypatch.setenv("COWTREE_STRICT", "")
    volume = image_module.open_image(str(workdir / "disk.img"), writable=True)
    try:
        fs = image_module.live(volume)
        file_inode = fs.mknod(ondisk.ROOT_DIR_INO, b"file", stat.S_IFREG | 0o644)
        fs.tree.put((ondisk.ROOT_DIR_INO, ondisk.DIR_INDEX, 1000),
                    encode_dirent(file_inode.ino, dtype_of(file_inode.mode), b"../escape"))
        volume.commit()
    finally:
        volume.close()
    (workdir / "dest").mkdir()
    result = cowtree(workdir, "cp", "-r", "disk.img:/", "dest", check=False)
    assert result.returncode == 3
    assert "invalid name b'../escape'" in error_of(result)
    assert not (workdir / "escape").exists()


def test_symlink_in_destination_not_followed(workdir):
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    (workdir / "src" / "sub").mkdir(parents=True)
    (workdir / "src" / "sub" / "file").write_bytes(b"copied")
    (workdir / "src" / "victim").write_bytes(b"replacement")
    cowtree(workdir, "cp", "-r", "src", "disk.img:/")

    dest = workdir / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "sub")
    os.symlink(outside / "victim", dest / "victim")
    result = cowtree(workdir, "cp", "-r", "disk.img:/src/victim", "disk.img:/src/sub", "dest", check=False)
    assert result.returncode == 1
    assert error_of(result) == ("cowtree: cannot overwrite non-directory 'dest/sub' with directory "
                                "'disk.img:/src/sub'\n")
    assert list(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"original"
    assert not os.path.islink(dest / "victim")
    assert (dest / "victim").read_bytes() == b"replacement"


def test_copy_out_refuses_open_image(workdir):
    (workdir / "f").write_bytes(b"x")
    cowtree(workdir, "cp", "f", "disk.img:/f")
    result = cowtree(workdir, "cp", "disk.img:/f", "disk.img", check=False)
    assert result.returncode == 1
    assert error_of(result) == ("cowtree: cannot create regular file 'disk.img': "
                                "it is an image this command has open\n")
    assert cowtree(workdir, "cat", "disk.img:/f").stdout == b"x"


def test_deep_tree_copy_and_remove(workdir, monkeypatch):
    monkeypatch.setenv("COWTREE_STRICT", "")
    volume = image_module.open_image(str(workdir / "disk.img"), writable=True)
    try:
        fs = image_module.live(volume)
        ino = ondisk.ROOT_DIR_INO
        for _ in range(3000):
            ino = fs.mkdir(ino, b"d", 0o755).ino
        fs.mknod(ino, b"leaf", stat.S_IFREG | 0o644)
        volume.commit()
    finally:
        volume.close()
    cowtree(workdir, "cp", "-r", "disk.img:/d", "disk.img:/copy")
    cowtree(workdir, "rm", "-r", "disk.img:/d")
    leaf = "disk.img:/copy" + "/d" * 2999 + "/leaf"
    [entry] = json_of(cowtree(workdir, "stat", "--json", leaf))
    assert entry["type"] == "file"


# ---------------------------------------------------------------------------
# The standard library, both ways


@pytest.mark.slow
def test_stdlib_round_trip(workdir):
    stdlib = sysconfig.get_paths()["stdlib"]
    cowtree(workdir, "cp", "-a", "--exclude", "site-packages", stdlib, "disk.img:/stdlib")
    cowtree(workdir, "cp", "-a", "disk.img:/stdlib", "out")
    diff = subprocess.run(["diff", "-r", "--no-dereference", "--exclude", "site-packages", stdlib, str(workdir / "out")],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:2000]
    for dirpath, _dirnames, filenames in os.walk(workdir / "out"):
        for name in filenames:
            copied = os.path.join(dirpath, name)
            original = os.path.join(stdlib, os.path.relpath(copied, workdir / "out"))
            copied_st = os.lstat(copied)
            original_st = os.lstat(original)
            assert copied_st.st_mode == original_st.st_mode, copied
            assert copied_st.st_mtime_ns == original_st.st_mtime_ns, copied


@pytest.mark.parametrize("nodesize, limit", [(4096, 979), (16384, 4051), (65536, 16339)])
def test_xattr_limit_in_readme(make_image, nodesize, limit):
    """The README's limit on an xattr's name and value together is what setxattr enforces."""
    _path, volume, fs = make_image(nodesize=nodesize)
    ino = fs.mknod(ondisk.ROOT_DIR_INO, b"f", stat.S_IFREG | 0o644).ino
    name = b"user.comment"
    fs.setxattr(ino, name, b"v" * (limit - len(name)))
    with pytest.raises(OSError) as raised:
        fs.setxattr(ino, name, b"v" * (limit - len(name) + 1))
    assert raised.value.errno == errno.E2BIG
    volume.commit()
    readme = " ".join((pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert f"{limit:,} bytes at" in readme or f"{limit:,} at" in readme


def test_errno_names_match_host():
    # The messages above are the host's strerror texts; check the two the tests rely on most.
    assert os.strerror(errno.ENOENT) == "No such file or directory"
    assert os.strerror(errno.ENAMETOOLONG) == "File name too long"
