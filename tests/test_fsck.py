"""cowtree fsck: clean images pass, every planted defect is reported, repairs leave clean images.

The defects come from tests/corrupt_cases.py (ids ``NNN-short-name``).
The fuzz test damages real images at random and runs open, readdir, read
and fsck: only CowtreeError subclasses may escape, within a time limit.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from cowtree import fsck, ondisk
from cowtree.errors import CorruptionError, CowtreeError
from cowtree.image import live, mkfs, open_filesystem, open_image
from cowtree.subvolume import create_snapshot

from corrupt_cases import CASES, build_image, plant

pytestmark = pytest.mark.corruption


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsck")
    path = str(directory / "clean.img")
    contents = build_image(path)
    return path, contents


def copy_of(clean, tmp_path, name="damaged.img") -> str:
    path = str(tmp_path / name)
    shutil.copyfile(clean[0], path)
    return path


def read_all(path: str, snapshot=None) -> dict:
    """Return {path: content} of every regular file reachable from the root."""
    volume = open_image(path)
    try:
        fs = open_filesystem(volume, snapshot)
        out = {}
        stack = [(ondisk.ROOT_DIR_INO, b"")]
        while stack:
            ino, prefix = stack.pop()
            for _index, name, child, dtype in fs.readdir(ino):
                if dtype == ondisk.DT_DIR:
                    stack.append((child, prefix + b"/" + name))
                elif dtype == ondisk.DT_REG:
                    out[prefix + b"/" + name] = fs.read(child, 0, 1 << 30)
        return out
    finally:
        volume.close()


# -- clean images --------------------------------------------------------------


def test_clean_image_reports_nothing(clean):
    result = fsck.check_image(clean[0])
    assert result.found == [], [str(p) for p in result.found]
    assert result.exit_status == fsck.EXIT_CLEAN


@pytest.mark.parametrize("nodesize", [4096, 16384])
def test_clean_kinds_report_nothing(tmp_path, nodesize):
    path = str(tmp_path / "kinds.img")
    volume = mkfs(path, nodesize=nodesize)
    fs = live(volume)
    sparse = fs.mknod(ondisk.ROOT_DIR_INO, b"sparse", 0o644)
    fs.write(sparse.ino, 10 * 1024 * 1024, b"end")
    fs.truncate(sparse.ino, 20 * 1024 * 1024)
    for index in range(600):
        inode = fs.mknod(ondisk.ROOT_DIR_INO, b"n%04d" % index, 0o644)
        fs.setxattr(inode.ino, b"user.a", b"v" * (index % 50))
    volume.commit()
    create_snapshot(volume, b"ro")
    create_snapshot(volume, b"rw", writable=True)
    rw = open_filesystem(volume, "rw")
    rw.unlink(ondisk.ROOT_DIR_INO, b"n0001")
    target = rw.mknod(ondisk.ROOT_DIR_INO, b"clone", 0o644)
    rw.clone_file(fs, sparse.ino, target.ino)
    volume.commit()
    volume.close()
    result = fsck.check_image(path)
    assert result.found == [], [str(p) for p in result.found]


def test_empty_image_reports_nothing(tmp_path):
    path = str(tmp_path / "empty.img")
    mkfs(path).close()
    assert fsck.run(path, out=io.StringIO()) == fsck.EXIT_CLEAN


# -- planted defects -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_defect_reported(case, clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(case, path)
    result = fsck.check_image(path)
    whys = [p.why for p in result.found]
    assert any(case.must_report in why for why in whys), f"{case.id} ({case.damage}): {whys}"
    assert result.exit_status == case.exit_before, [str(p) for p in result.found]


@pytest.mark.parametrize("case", [c for c in CASES if c.repairable], ids=[c.id for c in CASES if c.repairable])
def test_defect_repaired(case, clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(case, path)
    result = fsck.repair_image(path)
    assert result.remaining == [], [str(p) for p in result.remaining]
    assert result.exit_status == fsck.EXIT_REPAIRED
    again = fsck.check_image(path)
    assert again.found == [], [str(p) for p in again.found]
    files = read_all(path)
    for name, content in clean[1].items():
        if name == b"/dir/f003" and case.id == "007-entry-removed":
            assert files[b"/lost+found/" + str(_ino_of(clean[0], name)).encode()] == content
            continue
        assert files[name] == content, name


def _ino_of(path: str, name: bytes) -> int:
    volume = open_image(path)
    try:
        return live(volume).resolve(name)
    finally:
        volume.close()


def test_unrepairable_defect_keeps_exit_2(clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(CASES[0], path)
    out = io.StringIO()
    assert fsck.run(path, repair=True, out=out) == fsck.EXIT_ERRORS
    assert "verdict: errors found" in out.getvalue()


# -- reads of damaged blocks ---------------------------------------------------


def test_damaged_data_names_file(clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(CASES[1], path)
    volume = open_image(path)
    try:
        fs = live(volume)
        with pytest.raises(CorruptionError) as caught:
            fs.read(fs.resolve(b"/big"), 0, 1 << 20)
        message = str(caught.value)
        assert f"inode {fs.resolve(b'/big')}" in message
        assert "cowtree fsck" in message
        assert fs.read(fs.resolve(b"/f010"), 0, 1 << 20) == clean[1][b"/f010"]
    finally:
        volume.close()


# -- output and exit status ----------------------------------------------------


def test_json_output(clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(CASES[8], path)
    out = io.StringIO()
    status = fsck.run(path, as_json=True, out=out)
    doc = json.loads(out.getvalue())
    assert status == fsck.EXIT_LEAKS
    assert doc["exit_status"] == fsck.EXIT_LEAKS
    assert doc["summary"]["leaks"] == 1
    assert doc["problems"][0]["kind"] == "leak"


def test_text_output_one_line_per_problem(clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(CASES[7], path)
    out = io.StringIO()
    fsck.run(path, out=out)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("error: inode ") and "(found 2, expected 1)" in line for line in lines), lines
    assert "errors: 1" in lines
    assert lines[-1] == "verdict: errors found"


def test_missing_image_is_operational_failure(tmp_path):
    err = io.StringIO()
    assert fsck.run(str(tmp_path / "nothing.img"), out=io.StringIO(), err=err) == fsck.EXIT_OPERATIONAL
    assert "no such file" in err.getvalue()


def test_no_data_skips_data_blocks(clean, tmp_path):
    path = copy_of(clean, tmp_path)
    plant(CASES[1], path)
    assert fsck.check_image(path, data=False).found == []
    assert fsck.check_image(path).found != []


# -- fuzzing -------------------------------------------------------------------


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def exercise(path: str) -> None:
    """Open, list, read and fsck a possibly damaged image; let only CowtreeError escape."""
    try:
        volume = open_image(path)
    except CowtreeError:
        volume = None
    if volume is not None:
        try:
            fs = live(volume)
            stack = [ondisk.ROOT_DIR_INO]
            seen = 0
            while stack and seen < 2000:
                ino = stack.pop()
                try:
                    for _index, _name, child, dtype in fs.readdir(ino):
                        seen += 1
                        try:
                            if dtype == ondisk.DT_DIR:
                                stack.append(child)
                            elif dtype == ondisk.DT_REG:
                                fs.read(child, 0, 1 << 20)
                        except CowtreeError:
                            pass
                except CowtreeError:
                    pass
        finally:
            volume.close()
    try:
        fsck.check_image(path)
    except CowtreeError:
        pass


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["flip", "truncate", "zero"]), where=st.floats(0, 1), length=st.integers(1, 9000),
       bit=st.integers(0, 7))
def test_fuzz_damaged_images(clean, tmp_path_factory, kind, where, length, bit):
    directory = tmp_path_factory.mktemp("fuzz")
    path = str(directory / "fuzz.img")
    shutil.copyfile(clean[0], path)
    size = os.path.getsize(path)
    offset = min(size - 1, int(where * size))
    with open(path, "r+b") as image:
        if kind == "flip":
            image.seek(offset)
            byte = image.read(1)[0]
            image.seek(offset)
            image.write(bytes([byte ^ (1 << bit)]))
        elif kind == "truncate":
            image.truncate(offset)
        else:
            image.seek(offset)
            image.write(bytes(min(length, size - offset)))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    tracemalloc.start()
    try:
        exercise(path)
        _, peak = tracemalloc.get_traced_memory()
    except _Timeout:
        pytest.fail(f"{kind} at {offset} (length {length}): open, read or fsck ran over 60 seconds")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        tracemalloc.stop()
    assert peak < 256 << 20, f"{kind} at {offset}: peak memory {peak} bytes"
