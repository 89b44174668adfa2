"""cowtree send and receive on the command line: pipes, files, messages and exit statuses,
and the standard library sent whole and as one changed file."""

from __future__ import annotations

import io
import json
import os
import pty
import stat
import subprocess
import sys

import pytest

from cowtree import send
from cowtree.image import open_image

from sendutil import assert_same_subvolume, count_node_reads, split_stream
from test_cli import build_tree, cowtree, error_of, host_supports_user_xattrs, json_of
from treeutil import stdlib_dir


def pipe(cwd, sender: list, receiver: list) -> tuple:
    """Run cowtree SENDER | cowtree RECEIVER in cwd; return both CompletedProcess-like results."""
    command = [sys.executable, "-m", "cowtree"]
    first = subprocess.Popen(command + sender, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = subprocess.Popen(command + receiver, cwd=cwd, stdin=first.stdout, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    first.stdout.close()
    out, err = second.communicate()
    first_err = first.stderr.read()
    first.stderr.close()
    first.wait()
    return (subprocess.CompletedProcess(sender, first.returncode, b"", first_err),
            subprocess.CompletedProcess(receiver, second.returncode, out, err))


def generation(cwd, image: str) -> int:
    return json_of(cowtree(cwd, "info", "--json", image))["generation"]


def host_meta(root) -> dict:
    """Return {relative path: (mode, mtime_ns, size, symlink target, link count, xattrs)} of a host tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            xattrs = None
            if not stat.S_ISLNK(st.st_mode):
                try:
                    xattrs = sorted((key, os.getxattr(path, key)) for key in os.listxattr(path))
                except OSError:
                    xattrs = None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, size, target, st.st_nlink, xattrs)
    return out


def assert_same_host_trees(expected, found) -> None:
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(expected), str(found)], capture_output=True,
                          text=True)
    # diff compares no contents of fifos, and lists each pair; host_meta checks their types.
    differences = [line for line in diff.stdout.splitlines() if not line.endswith(" is a fifo")]
    assert diff.returncode in (0, 1), diff.stderr
    assert differences == [], diff.stdout[:2000]
    before = host_meta(expected)
    after = host_meta(found)
    assert sorted(after) == sorted(before)
    for path, meta in before.items():
        assert after[path] == meta, path


@pytest.fixture
def images(tmp_path):
    """tmp_path with a.img holding snapshots s1 and s2 of a small tree, and an empty b.img."""
    build_tree(tmp_path / "src", host_supports_user_xattrs(tmp_path))
    cowtree(tmp_path, "mkfs", "a.img")
    cowtree(tmp_path, "mkfs", "b.img")
    cowtree(tmp_path, "cp", "-a", "src", "a.img:/")
    cowtree(tmp_path, "snapshot", "create", "a.img", "s1")
    cowtree(tmp_path, "mv", "a.img:/src/dir", "a.img:/src/moved")
    cowtree(tmp_path, "rm", "a.img:/src/linked-a")
    (tmp_path / "new.txt").write_bytes(b"new file\n")
    cowtree(tmp_path, "cp", "new.txt", "a.img:/src/moved/new.txt")
    cowtree(tmp_path, "snapshot", "create", "a.img", "s2")
    return tmp_path


def test_send_pipe_to_receive(images):
    for sender in (["send", "a.img@s1"], ["send", "-p", "s1", "a.img@s2"]):
        sent, received = pipe(images, sender, ["receive", "b.img"])
        assert sent.returncode == 0, error_of(sent)
        assert received.returncode == 0, error_of(received)
        assert received.stdout == b""
        assert error_of(received) == ""
    for image in ("a.img", "b.img"):
        assert cowtree(images, "fsck", image, check=False).returncode == 0
    cowtree(images, "cp", "-a", "a.img@s2:/src", "from-a")
    cowtree(images, "cp", "-a", "b.img@s2:/src", "from-b")
    assert_same_host_trees(images / "from-a", images / "from-b")
    listing = json_of(cowtree(images, "snapshot", "list", "--json", "b.img"))
    assert [row["name"] for row in listing] == ["s1", "s2"]
    assert all(row["readonly"] for row in listing)
    origin = json_of(cowtree(images, "snapshot", "list", "--json", "a.img"))
    assert [row["received_uuid"] for row in listing] == [row["uuid"] for row in origin]
    assert listing[1]["parent_uuid"] == listing[0]["uuid"]


def test_send_and_receive_files(images):
    cowtree(images, "send", "a.img@s1", "-f", "full.stream")
    cowtree(images, "send", "-p", "s1", "a.img@s2", "--file", "incremental.stream")
    assert (images / "full.stream").stat().st_size > (images / "incremental.stream").stat().st_size
    cowtree(images, "receive", "-f", "full.stream", "b.img")
    cowtree(images, "receive", "b.img", "--file", "incremental.stream")
    text = cowtree(images, "snapshot", "list", "--uuids", "b.img").stdout.decode()
    assert "UUID" in text.splitlines()[0]
    assert "RECEIVED UUID" in text.splitlines()[0]
    assert len(text.splitlines()) == 3


def test_terminal_refused(images):
    controller, terminal = pty.openpty()
    try:
        sent = subprocess.run([sys.executable, "-m", "cowtree", "send", "a.img@s1"], cwd=images,
                              stdout=terminal, stderr=subprocess.PIPE)
        received = subprocess.run([sys.executable, "-m", "cowtree", "receive", "b.img"], cwd=images,
                                  stdin=terminal, stderr=subprocess.PIPE)
    finally:
        os.close(terminal)
        os.close(controller)
    assert sent.returncode == 1
    assert error_of(sent) == ("cowtree: send: not writing a send stream to a terminal; redirect standard "
                              "output or use -f FILE\n")
    assert received.returncode == 1
    assert error_of(received) == ("cowtree: receive: not reading a send stream from a terminal; redirect "
                                  "standard input or use -f FILE\n")


def test_receive_failures_leave_image(images):
    cowtree(images, "send", "a.img@s1", "-f", "full.stream")
    cowtree(images, "send", "-p", "s1", "a.img@s2", "-f", "incremental.stream")
    full = (images / "full.stream").read_bytes()
    header, records = split_stream(full)
    (images / "cut.stream").write_bytes(full[:len(header) + sum(map(len, records[:3]))])
    damaged = bytearray(full)
    damaged[len(header) + 30] ^= 1
    (images / "damaged.stream").write_bytes(bytes(damaged))
    before = generation(images, "b.img")
    cases = [
        ("cut.stream", "cowtree: receive: b.img: truncated stream: it ends after record 3, before its END "
                       "record\n"),
        ("damaged.stream", "cowtree: receive: b.img: invalid stream: record 1 (CREATE): checksum mismatch"),
        ("incremental.stream", "cowtree: receive: b.img: stream does not apply: its parent snapshot "),
    ]
    for stream, message in cases:
        result = cowtree(images, "receive", "-f", stream, "b.img", check=False)
        assert result.returncode == 1, stream
        assert error_of(result).startswith(message), error_of(result)
        assert "Traceback" not in error_of(result)
        assert generation(images, "b.img") == before
    assert json_of(cowtree(images, "snapshot", "list", "--json", "b.img")) == []
    cowtree(images, "receive", "-f", "full.stream", "b.img")
    again = cowtree(images, "receive", "-f", "full.stream", "b.img", check=False)
    assert again.returncode == 1
    assert error_of(again) == "cowtree: receive: b.img: File exists (snapshot 's1' already exists)\n"
    assert cowtree(images, "fsck", "b.img", check=False).returncode == 0


def test_send_and_receive_usage_errors(images):
    wrong = cowtree(images, "send", "a.img", "-f", "x.stream", check=False)
    assert wrong.returncode == 2
    assert "expected IMAGE@SNAP" in error_of(wrong)
    missing = cowtree(images, "send", "a.img@nosuch", "-f", "x.stream", check=False)
    assert missing.returncode == 1
    assert error_of(missing) == ("cowtree: send: a.img@nosuch: No such file or directory "
                                 "(snapshot 'nosuch' not found)\n")
    assert not (images / "x.stream").exists()
    onto_image = cowtree(images, "send", "a.img@s1", "-f", "a.img", check=False)
    assert onto_image.returncode == 1
    assert "not overwriting it with a stream" in error_of(onto_image)
    assert cowtree(images, "fsck", "a.img", check=False).returncode == 0
    no_image = cowtree(images, "receive", "-f", "x.stream", "c.img", check=False)
    assert no_image.returncode == 1
    assert error_of(no_image) == "cowtree: receive: cannot open 'x.stream': No such file or directory\n"
    (images / "empty.stream").write_bytes(b"")
    absent = cowtree(images, "receive", "-f", "empty.stream", "c.img", check=False)
    assert error_of(absent) == "cowtree: receive: cannot open image 'c.img': No such file or directory\n"


# ---------------------------------------------------------------------------
# The standard library


@pytest.mark.slow
def test_stdlib_send_and_receive(tmp_path):
    """The stdlib and a tree of every kind of entry, sent whole and then as one changed 4 KiB file."""
    stdlib = stdlib_dir()
    source = tmp_path / "source"
    source.mkdir()
    build_tree(source / "kinds", host_supports_user_xattrs(tmp_path))
    cowtree(tmp_path, "mkfs", "a.img")
    cowtree(tmp_path, "mkfs", "b.img")
    cowtree(tmp_path, "cp", "-a", "--exclude", "site-packages", stdlib, "a.img:/stdlib")
    cowtree(tmp_path, "cp", "-a", "source/kinds", "a.img:/kinds")
    cowtree(tmp_path, "snapshot", "create", "a.img", "s1")

    sent, received = pipe(tmp_path, ["send", "a.img@s1"], ["receive", "b.img"])
    assert sent.returncode == 0, error_of(sent)
    assert received.returncode == 0, error_of(received)
    cowtree(tmp_path, "cp", "-a", "b.img@s1:/", "out")
    diff = subprocess.run(["diff", "-r", "--no-dereference", "--exclude", "site-packages", stdlib,
                           str(tmp_path / "out" / "stdlib")], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:2000]
    copied = host_meta(tmp_path / "out" / "stdlib")
    for path, meta in copied.items():
        st = os.lstat(os.path.join(stdlib, path))
        assert (meta[0], meta[1]) == (st.st_mode, st.st_mtime_ns), path
    assert_same_host_trees(source / "kinds", tmp_path / "out" / "kinds")
    kinds = tmp_path / "out" / "kinds"
    assert os.stat(kinds / "linked-a").st_ino == os.stat(kinds / "dir" / "linked-b").st_ino
    assert os.stat(kinds / "sparse").st_blocks * 512 <= 1 << 20
    for image in ("a.img", "b.img"):
        assert cowtree(tmp_path, "fsck", image, check=False).returncode == 0

    # One file of the tree becomes 4 KiB of new data.
    victim = "stdlib/json/decoder.py"
    (tmp_path / "new-4k").write_bytes(os.urandom(4096))
    cowtree(tmp_path, "cp", "new-4k", f"a.img:/{victim}")
    cowtree(tmp_path, "snapshot", "create", "a.img", "s2")
    cowtree(tmp_path, "send", "-p", "s1", "a.img@s2", "-f", "incremental.stream")
    size = (tmp_path / "incremental.stream").stat().st_size
    volume = open_image(str(tmp_path / "a.img"))
    try:
        assert size < 4096 + 1024, size
        assert size < 4096 + 2 * volume.nodesize
        stats = []
        incremental = count_node_reads(volume, lambda: stats.append(
            send.send(volume, b"s2", io.BytesIO(), parent=b"s1")))
        full = count_node_reads(volume, lambda: send.send(volume, b"s2", io.BytesIO()))
        assert incremental <= 30, incremental
        assert full > 50 * incremental, (full, incremental)
        assert stats[0].data_bytes == 4096
    finally:
        volume.close()
    cowtree(tmp_path, "receive", "-f", "incremental.stream", "b.img")
    assert cowtree(tmp_path, "cat", f"b.img@s2:/{victim}").stdout == (tmp_path / "new-4k").read_bytes()
    origin = open_image(str(tmp_path / "a.img"))
    copy = open_image(str(tmp_path / "b.img"))
    try:
        assert_same_subvolume(origin, b"s2", copy, b"s2")
    finally:
        origin.close()
        copy.close()
    for image in ("a.img", "b.img"):
        assert cowtree(tmp_path, "fsck", image, check=False).returncode == 0
    assert json.loads(cowtree(tmp_path, "snapshot", "list", "--json", "b.img").stdout)[1]["name"] == "s2"
