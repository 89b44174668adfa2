"""Overlay images on read-only bases, chains of them, convert, commit and rebase."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from cowtree import layers, ondisk
from cowtree.check import check_volume
from cowtree.errors import NotFound
from cowtree.image import live, mkfs, open_image

from treeutil import import_tree, read_all, snapshot_tree, stdlib_dir

ROOT = ondisk.ROOT_DIR_INO


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def base_image(tmp_path):
    """A base image holding part of the standard library, closed; returns (path, tree snapshot)."""
    path = str(tmp_path / "base.img")
    volume = mkfs(path)
    fs = live(volume)
    import_tree(fs, os.path.join(stdlib_dir(), "json"), fs.mkdir(ROOT, b"json").ino)
    import_tree(fs, os.path.join(stdlib_dir(), "email"), fs.mkdir(ROOT, b"email").ino)
    big = fs.mknod(ROOT, b"blocks.bin", 0o100644)
    fs.write(big.ino, 0, bytes(range(256)) * 64)   # 16 KiB: four full blocks
    volume.commit()
    content = snapshot_tree(fs)
    volume.close()
    return path, content


def overlay(tmp_path, base: str, name: str = "top.img"):
    path = str(tmp_path / name)
    mkfs(path, base=base).close()
    return path


def test_overlay_starts_small_and_matches_base(tmp_path, base_image):
    base, content = base_image
    digest = sha256(base)
    top = overlay(tmp_path, base)
    assert os.path.getsize(top) <= 64 << 10
    volume = open_image(top, writable=True)
    fs = live(volume)
    assert snapshot_tree(fs) == content
    before = os.path.getsize(top)
    ino = fs.resolve(b"/json/decoder.py")
    fs.write(ino, 0, b"# changed\n")
    volume.commit()
    depth = volume.tree(ondisk.FS_TREE_ID).level + 1
    grown = os.path.getsize(top) - before
    # One path of the filesystem tree copied up, the new data, and the
    # paths of the overlay's own root and extent trees.
    assert grown <= (depth + 6) * volume.nodesize + 8192
    assert not check_volume(volume).problems
    volume.close()
    assert sha256(base) == digest


def test_base_data_never_shows_through(tmp_path, base_image):
    base, content = base_image
    digest = sha256(base)
    volume = open_image(overlay(tmp_path, base), writable=True)
    fs = live(volume)
    fs.unlink(fs.resolve(b"/json"), b"encoder.py")
    scanner = fs.resolve(b"/json/scanner.py")
    fs.truncate(scanner, 10)
    fs.truncate(scanner, 5000)
    decoder = fs.resolve(b"/json/decoder.py")
    size = fs.get_inode(decoder).size
    fs.write(decoder, 0, b"x" * size)
    blocks = fs.resolve(b"/blocks.bin")
    fs.write(blocks, 4100, b"PARTIAL")
    email = fs.resolve(b"/email")
    for _, name, child, _ in list(fs.readdir(email)):
        if fs.get_inode(child).is_dir:
            continue
        fs.unlink(email, name)
    volume.commit()
    volume.close()

    volume = open_image(str(tmp_path / "top.img"))
    fs = live(volume)
    with pytest.raises(NotFound):
        fs.resolve(b"/json/encoder.py")
    scanner_data = read_all(fs, fs.resolve(b"/json/scanner.py"))
    assert scanner_data == content[b"/json/scanner.py"][1][:10] + bytes(4990)
    assert read_all(fs, fs.resolve(b"/json/decoder.py")) == b"x" * size
    original = bytes(range(256)) * 64
    expected = original[:4100] + b"PARTIAL" + original[4107:]
    assert read_all(fs, fs.resolve(b"/blocks.bin")) == expected
    volume.close()
    assert sha256(base) == digest


def test_recreated_directory_is_empty(tmp_path, base_image):
    base, _ = base_image
    volume = open_image(overlay(tmp_path, base), writable=True)
    fs = live(volume)
    json_dir = fs.resolve(b"/json")
    for _, name, child, _ in list(fs.readdir(json_dir)):
        if fs.get_inode(child).is_dir:
            sub = child
            for _, inner, _, _ in list(fs.readdir(sub)):
                fs.unlink(sub, inner)
            fs.rmdir(json_dir, name)
        else:
            fs.unlink(json_dir, name)
    fs.rmdir(ROOT, b"json")
    fs.mkdir(ROOT, b"json")
    volume.commit()
    assert list(fs.readdir(fs.resolve(b"/json"))) == []
    assert not check_volume(volume).problems
    volume.close()


def _change_in_child(path: str, name: bytes, queue) -> None:
    try:
        volume = open_image(path, writable=True)
        fs = live(volume)
        fs.write(fs.resolve(b"/json/__init__.py"), 0, name)
        fs.mknod(ROOT, name, 0o100644)
        volume.commit()
        volume.close()
        queue.put(None)
    except BaseException as exc:  # the parent reports it
        queue.put(repr(exc))


def test_two_overlays_share_one_base(tmp_path, base_image):
    base, content = base_image
    digest = sha256(base)
    first = overlay(tmp_path, base, "first.img")
    second = overlay(tmp_path, base, "second.img")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_change_in_child, args=(path, name, queue))
               for path, name in ((first, b"FIRST"), (second, b"SECOND"))]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert results == [None, None]
    for path, mine, other in ((first, b"FIRST", b"SECOND"), (second, b"SECOND", b"FIRST")):
        volume = open_image(path)
        fs = live(volume)
        assert fs.read(fs.resolve(b"/json/__init__.py"), 0, len(mine)) == mine
        fs.resolve(b"/" + mine)
        with pytest.raises(NotFound):
            fs.resolve(b"/" + other)
        volume.close()
    assert sha256(base) == digest


def test_chain_of_sixteen(tmp_path, base_image, rng):
    base, content = base_image
    model = {path: data for path, (mode, data) in content.items() if data is not None}
    files = sorted(path for path, (mode, data) in content.items()
                   if data is not None and not (mode & 0o170000) == 0o120000)
    previous = base
    for level in range(16):
        path = overlay(tmp_path, previous, f"layer{level:02d}.img")
        volume = open_image(path, writable=True)
        fs = live(volume)
        for _ in range(3):
            name = rng.choice(files)
            stamp = b"level %d " % level
            offset = rng.randrange(0, 6000)
            fs.write(fs.resolve(name), offset, stamp)
            old = model[name]
            model[name] = old[:offset].ljust(offset, b"\0") + stamp + old[offset + len(stamp):]
        victim = files.pop(rng.randrange(len(files)))
        parent, _, leaf = victim.rpartition(b"/")
        fs.unlink(fs.resolve(parent or b"/"), leaf)
        del model[victim]
        volume.commit()
        volume.close()
        previous = path
    top = open_image(previous)
    assert len(top.layers) == 17
    fs = live(top)
    for name in files:
        assert read_all(fs, fs.resolve(name)) == model[name], name
    converted = layers.convert(top, str(tmp_path / "standalone.img"))
    assert len(converted.layers) == 1
    conv_fs = live(converted)
    assert snapshot_tree(conv_fs) == snapshot_tree(fs)
    assert not check_volume(converted).problems
    converted.close()
    top.close()
    standalone = open_image(str(tmp_path / "standalone.img"))
    assert layers.layer_record(standalone) is None
    standalone.close()
    expected = None
    top = open_image(previous)
    expected = snapshot_tree(live(top))
    top.close()
    base_file, _ = layers.commit_to_base(previous)
    merged = open_image(base_file)
    assert snapshot_tree(live(merged)) == expected
    assert not check_volume(merged).problems
    merged.close()
    again = open_image(previous)
    assert snapshot_tree(live(again)) == expected
    again.close()


def test_changed_base_is_refused(tmp_path, base_image):
    base, _ = base_image
    top = overlay(tmp_path, base)
    volume = open_image(base, writable=True)
    live(volume).mknod(ROOT, b"late", 0o100644)
    volume.commit()
    volume.close()
    with pytest.raises(layers.BaseImageError, match="has changed since the overlay was made"):
        open_image(top)


def test_missing_base_names_expected_path(tmp_path, base_image):
    base, _ = base_image
    top = overlay(tmp_path, base)
    moved = str(tmp_path / "moved.img")
    os.rename(base, moved)
    with pytest.raises(layers.BaseImageError, match="base.img' not found"):
        open_image(top)
    volume = open_image(top, writable=True, base=moved)
    volume.commit()
    volume.close()
    volume = open_image(top)
    assert layers.base_path(volume, layers.layer_record(volume)) == moved
    volume.close()


def test_rebase_onto_copy(tmp_path, base_image):
    base, _ = base_image
    top = overlay(tmp_path, base)
    volume = open_image(top, writable=True)
    fs = live(volume)
    fs.write(fs.resolve(b"/json/tool.py"), 0, b"rebased change")
    volume.commit()
    expected = snapshot_tree(fs)
    volume.close()
    copy = str(tmp_path / "copy.img")
    source = open_image(base)
    layers.convert(source, copy).close()
    source.close()
    changed = layers.rebase(top, copy)
    assert 0 < changed < 20
    volume = open_image(top)
    assert layers.base_path(volume, layers.layer_record(volume)) == copy
    assert snapshot_tree(live(volume)) == expected
    assert not check_volume(volume).problems
    volume.close()


def run_cli(cwd, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cowtree", *args], cwd=cwd, capture_output=True)
    if check and result.returncode != 0:
        raise AssertionError(f"cowtree {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


@pytest.mark.slow
def test_every_command_on_a_deep_chain(tmp_path, base_image):
    """The CLI gives the same results on the top of 16 overlays as on a standalone copy."""
    base, _ = base_image
    previous = "base.img"
    os.rename(base, tmp_path / previous)
    digest = sha256(tmp_path / previous)
    for level in range(16):
        name = f"layer{level:02d}.img"
        run_cli(tmp_path, "mkfs", "--base", previous, name)
        run_cli(tmp_path, "mkdir", "-p", f"{name}:/levels/{level}")
        previous = name
    run_cli(tmp_path, "convert", previous, "standalone.img")
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "new.txt").write_bytes(b"new file\n")
    outputs = {}
    for image in (previous, "standalone.img"):
        steps = [
            ("ls", "-lR", f"{image}:/json"),
            ("cat", f"{image}:/json/decoder.py"),
            ("cp", "host/new.txt", f"{image}:/json/new.txt"),
            ("mv", f"{image}:/json/new.txt", f"{image}:/email/moved.txt"),
            ("rm", "-r", f"{image}:/email/mime"),
            ("snapshot", "create", image, "snap"),
            ("rm", f"{image}:/json/tool.py"),
            ("cat", f"{image}@snap:/json/tool.py"),
            ("snapshot", "list", "--json", "--no-usage", image),
            ("du", "--json", f"{image}@snap:/json"),
            ("snapshot", "delete", image, "snap"),
            ("ls", "-R", f"{image}:/"),
            ("fsck", image),
        ]
        results = []
        for step in steps:
            result = run_cli(tmp_path, *step)
            text = result.stdout.replace(image.encode(), b"IMAGE")
            if step[0] == "snapshot" and step[1] == "list":
                rows = json.loads(text)
                image_specific = ("created_ns", "generation", "uuid", "parent_uuid", "received_uuid")
                text = json.dumps([{k: v for k, v in row.items() if k not in image_specific}
                                   for row in rows]).encode()
            if step[0] == "ls" and "-lR" in step:
                text = b"\n".join(line for line in text.splitlines() if not line.startswith(b"total"))
            if step[0] == "fsck":
                text = b""   # the counts of nodes checked differ; exit status 0 is what matters
            results.append(text)
        outputs[image] = results
    for index, (top, standalone) in enumerate(zip(outputs[previous], outputs["standalone.img"])):
        assert top == standalone, (index, top[:300], standalone[:300])
    assert sha256(tmp_path / "base.img") == digest


def test_commit_refuses_with_dependent_overlays(tmp_path, base_image):
    base, _ = base_image
    top = overlay(tmp_path, base, "top.img")
    sibling = overlay(tmp_path, base, "sibling.img")
    volume = open_image(top, writable=True)
    live(volume).mkdir(ROOT, b"from-top")
    volume.commit()
    volume.close()
    with pytest.raises(OSError, match="sibling.img"):
        layers.commit_to_base(top)
    check = open_image(base)
    with pytest.raises(NotFound):
        live(check).resolve(b"/from-top")
    check.close()
    layers.commit_to_base(top, force=True)
    check = open_image(base)
    live(check).resolve(b"/from-top")
    check.close()
    with pytest.raises(layers.BaseImageError):
        open_image(sibling)


def test_fsck_data_reads_base_blocks(tmp_path, base_image):
    """A damaged base data block shows in the overlay's data check, naming the base file."""
    base, _ = base_image
    top = overlay(tmp_path, base)
    volume = open_image(base)
    fs = live(volume)
    extent = next(fs.extents(fs.resolve(b"/blocks.bin")))
    volume.close()
    with open(base, "r+b") as handle:
        handle.seek(extent.disk_addr + 100)
        byte = handle.read(1)
        handle.seek(extent.disk_addr + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    volume = open_image(top)
    report = check_volume(volume, check_data=True)
    volume.close()
    problems = [str(p) for p in report.problems]
    assert any("checksum mismatch" in p and "base.img" in p for p in problems), problems


def test_rebase_refuses_loops(tmp_path, base_image):
    """Rebasing onto the overlay itself, or onto an overlay above it, is refused and loses nothing."""
    base, _ = base_image
    top = overlay(tmp_path, base)
    volume = open_image(top, writable=True)
    live(volume).mkdir(ROOT, b"mine")
    volume.commit()
    volume.close()
    above = overlay(tmp_path, top, "above.img")
    for new_base in (top, above):
        with pytest.raises(OSError, match="own base|already in the chain"):
            layers.rebase(top, new_base)
    volume = open_image(top)
    live(volume).resolve(b"/mine")
    volume.close()


def test_mkfs_force_through_hard_link_refused(tmp_path, base_image):
    base, content = base_image
    link = str(tmp_path / "link.img")
    os.link(base, link)
    with pytest.raises(OSError, match="own base"):
        mkfs(base, base=link, force=True)
    volume = open_image(base)
    assert snapshot_tree(live(volume)) == content
    volume.close()


def test_overlay_snapshot_usage_counts_base_as_shared(tmp_path, base_image):
    from cowtree import subvolume
    base, _ = base_image
    volume = open_image(overlay(tmp_path, base), writable=True)
    subvolume.create_snapshot(volume, b"s1")
    fs = live(volume)
    json_dir = fs.resolve(b"/json")
    for _, name, child, _ in list(fs.readdir(json_dir)):
        if not fs.get_inode(child).is_dir:
            fs.unlink(json_dir, name)
    volume.commit()
    usage = subvolume.UsageCounter(volume).subvolume(subvolume.find(volume, b"s1").tree_id)
    before = volume.bytes_used
    subvolume.delete_subvolume(volume, b"s1")
    freed = before - volume.bytes_used
    assert usage.exclusive == freed
    volume.close()


def test_info_chain_shows_changed_base(tmp_path, base_image):
    base, _ = base_image
    top = overlay(tmp_path, base)
    change_image(base)
    result = run_cli(tmp_path, "info", "--chain", top, check=False)
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith(f"layer 0: {top}")
    assert lines[1].startswith("layer 1:")
    assert "has changed since the overlay was made" in lines[1]
    errors = result.stderr.decode().splitlines()
    assert len(errors) == 1
    assert errors[0].startswith(f"cowtree: {top}: ")
    assert "has changed since the overlay was made" in errors[0]


def change_image(path: str) -> None:
    """Commit a new directory /late to the image at path, so that overlays made on it are rejected."""
    volume = open_image(path, writable=True)
    live(volume).mkdir(ROOT, b"late")
    volume.commit()
    volume.close()


def test_base_replaced_by_directory(tmp_path, base_image):
    """A directory where the base was is named as the base, not as the overlay."""
    base, _ = base_image
    top = overlay(tmp_path, base)
    os.rename(base, tmp_path / "base.keep")
    os.mkdir(base)
    expected = f"cowtree: {top}: base image '{base}' is a directory, not an image\n"
    result = run_cli(tmp_path, "ls", f"{top}:/", check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == expected
    result = run_cli(tmp_path, "info", "--chain", top, check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == expected
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"layer 0: {top} uuid ")
    assert lines[1].startswith(f"layer 1: {base} expected uuid ")
    assert lines[1].endswith(": base image is a directory, not an image")


def test_base_replaced_by_other_file(tmp_path, base_image):
    """A base that is no image is a broken chain (status 1) that info --chain still prints."""
    base, _ = base_image
    top = overlay(tmp_path, base)
    with open(base, "wb") as handle:
        handle.write(b"not an image\n")
    result = run_cli(tmp_path, "info", "--chain", top, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"cowtree: {top}: base image '{base}' cannot be read: "
                                             f"not a cowtree image (")
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith(f"layer 1: {base} expected uuid ")
    assert ": base image cannot be read: not a cowtree image (" in lines[1]
    [chain] = [json.loads(run_cli(tmp_path, "info", "--chain", "--json", top, check=False).stdout)]
    assert [layer["depth"] for layer in chain["chain"]] == [0, 1]
    assert chain["chain"][1]["error"].startswith("cannot be read: not a cowtree image (")


def test_info_chain_names_broken_layer(tmp_path, base_image):
    """Only the layer whose base changed carries the reason; the layers above it are listed whole."""
    base, _ = base_image
    middle = overlay(tmp_path, base, "middle.img")
    top = overlay(tmp_path, middle, "top.img")
    change_image(base)
    result = run_cli(tmp_path, "info", "--chain", top, check=False)
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"layer 0: {top} uuid ")
    assert lines[1].startswith(f"layer 1: {middle} uuid ")
    assert "expected" not in lines[1]
    assert " image bytes " in lines[1]
    assert lines[2].startswith(f"layer 2: {base} expected uuid ")
    assert ": base image has changed since the overlay was made (" in lines[2]
    assert result.stderr.decode().startswith(f"cowtree: {middle}: base image '{base}' has changed since ")


def test_missing_base_message_once(tmp_path, base_image):
    """The overlay is named once, and layer 1 shows the path --base gave."""
    base, _ = base_image
    top = overlay(tmp_path, base)
    os.rename(base, tmp_path / "base.keep")
    result = run_cli(tmp_path, "info", "--chain", top, check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == f"cowtree: {top}: base image '{base}' not found (give its new place with --base)\n"
    result = run_cli(tmp_path, "--base", "moved.img", "info", "--chain", top, check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == (f"cowtree: {top}: base image 'moved.img' not found "
                                      f"(give its new place with --base)\n")
    lines = result.stdout.decode().splitlines()
    assert lines[1].startswith("layer 1: moved.img expected uuid ")
    result = run_cli(tmp_path, "--base", "base.keep", "info", "--chain", top)
    assert result.stdout.decode().splitlines()[1].startswith("layer 1: base.keep uuid ")
