"""Power loss at every point of a workload's write stream.

A workload runs on a volume whose device is a :class:`RecordingDevice`, and
a frozen model is kept for every committed generation.  The recorded writes
are split into 4 KiB pieces, because a disk may persist part of a large
write.  Then, from a copy of the image as it was before the workload:

- every prefix of the pieces is replayed: the image must open at the
  generation of the last superblock piece in the prefix, pass the checker,
  and show exactly the model of that generation;
- every superblock piece is replayed torn (only its first 512 bytes): the
  image must open at the previous generation;
- between two flushes a disk may persist any subset of the writes in any
  order, so random subsets of each such window, shuffled, are replayed on
  top of everything before the window.

The named crash points of ``Volume.commit`` are exercised separately with
``crash_hook``.
"""

from __future__ import annotations

import random

import pytest

from cowtree import ondisk
from cowtree.blockdev import ImageFile, RecordingDevice, Superblock
from cowtree.check import check_volume
from cowtree.image import live, mkfs, open_image
from cowtree.transaction import CrashPoint, Volume

from fsmodel import ROOT, Driver, FsModel, assert_matches

pytestmark = [pytest.mark.crash, pytest.mark.slow]

BLOCK = ondisk.BLOCK_SIZE
NAMES = [b"a", b"b", b"c", b"d", b"sub"]
COMMIT_STEPS = ["before-write", "before-flush", "before-superblock", "before-superblock-flush", "after-commit"]


# -- a workload ---------------------------------------------------------------------


def random_operation(driver: Driver, rng: random.Random) -> None:
    """Apply one random operation through driver (errors the model predicts count as done)."""
    model = driver.model
    fs = driver.fs
    directory = rng.choice(model.directories())
    name = rng.choice(NAMES)
    files = model.files()
    names = model.names()
    choice = rng.randrange(12)
    if choice < 2 or not files:
        driver.create(directory, name)
    elif choice < 5:
        ino = rng.choice(files)
        size = len(model.inodes[ino].data)
        offset = rng.choice([0, fs.inline_max - 1, BLOCK - 3, 2 * BLOCK, size, size + BLOCK + 100])
        length = rng.choice([10, 500, fs.inline_max + 1, BLOCK, 3 * BLOCK + 7, 9000])
        driver.write(ino, max(0, offset), rng.randbytes(length))
    elif choice == 5:
        ino = rng.choice(files)
        driver.truncate(ino, rng.choice([0, 100, fs.inline_max + 5, BLOCK + 1, 5 * BLOCK]))
    elif choice == 6:
        driver.mkdir(directory, name)
    elif choice == 7 and names:
        old_dir, old_name = rng.choice(names)
        driver.rename(old_dir, old_name, directory, name)
    elif choice == 8 and names:
        entry_dir, entry_name = rng.choice(names)
        if model.inodes[model.entries[entry_dir][entry_name]].kind == "dir":
            driver.rmdir(entry_dir, entry_name)
        else:
            driver.unlink(entry_dir, entry_name)
    elif choice == 9 and names:
        entry_dir, entry_name = rng.choice(names)
        driver.link(model.entries[entry_dir][entry_name], directory, name)
    elif choice == 10:
        driver.setxattr(rng.choice(sorted(model.inodes)), b"user.k", rng.randbytes(rng.randrange(1, 300)))
    else:
        driver.symlink(directory, name, b"target-" + rng.randbytes(8).hex().encode())


class Recorded:
    """A workload's recorded write stream and the model of every generation it committed."""

    def __init__(self, start: bytes, log: list, generations: dict):
        self.start = start
        self.generations = generations
        self.pieces = split_pieces(log)

    def superblock_generation(self, piece) -> int | None:
        """Return the generation a superblock piece writes, or None for any other piece."""
        if piece[0] != "write" or piece[1] not in ondisk.SUPERBLOCK_OFFSETS:
            return None
        return Superblock.decode(piece[2], ondisk.SUPERBLOCK_OFFSETS.index(piece[1])).generation


def split_pieces(log: list) -> list:
    """Split each write of the log into 4 KiB pieces; flushes stay as they are."""
    pieces = []
    for entry in log:
        if entry[0] != "write":
            pieces.append(entry)
            continue
        _, offset, data = entry
        for start in range(0, len(data), BLOCK):
            pieces.append(("write", offset + start, data[start:start + BLOCK]))
    return pieces


def record_workload(tmp_path, rng: random.Random, nodesize: int, commits: int, operations: int) -> Recorded:
    """Run commits rounds of random operations on a new image, recording every write."""
    path = str(tmp_path / "recorded.img")
    volume = mkfs(path, nodesize=nodesize)
    fs = live(volume)
    model = FsModel(fs.get_inode(ROOT).mode & 0o7777)
    # A first commit with some content, so the recorded part starts from a non-empty tree.
    driver = Driver(fs, model)
    for index in range(30):
        inode = driver.create(ROOT, b"base%02d" % index)
        driver.write(inode.ino, 0, bytes([index]) * (index * 300))
    volume.commit()
    generations = {volume.generation: model.copy()}
    volume.close()
    with open(path, "rb") as image:
        start = image.read()

    device = RecordingDevice(ImageFile(path, True))
    volume = Volume.open(path, writable=True, device=device)
    driver = Driver(live(volume), generations[volume.generation].copy())
    for _ in range(commits):
        for _ in range(operations):
            random_operation(driver, rng)
        if rng.random() < 0.2:
            # An aborted transaction writes nothing that a commit relies on.
            volume.abort()
            driver.model = generations[volume.generation].copy()
            for _ in range(operations):
                random_operation(driver, rng)
        generation = volume.commit()
        generations[generation] = driver.model.copy()
    volume.close()
    assert len(generations) == commits + 1, "every round must commit something"
    return Recorded(start, device.log, generations)


# -- replaying ----------------------------------------------------------------------


def resize(image: bytearray, size: int) -> None:
    """Apply a recorded truncate: cut the image or extend it with zeros."""
    if size < len(image):
        del image[size:]
    else:
        image.extend(bytes(size - len(image)))


def apply_write(image: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(image):
        image.extend(bytes(end - len(image)))
    image[offset:end] = data


def build_image(path: str, start: bytes, writes) -> None:
    """Write a fresh image file: start, then every (offset, data) of writes in order."""
    image = bytearray(start)
    for offset, data in writes:
        apply_write(image, offset, data)
    with open(path, "wb") as out:
        out.write(image)


def assert_opens_at(path: str, recorded: Recorded, generation: int, label: str) -> None:
    """Open the image and check that it is exactly committed generation `generation`."""
    volume = open_image(path)
    try:
        assert volume.generation == generation, f"{label}: opened at the wrong generation"
        report = check_volume(volume)
        assert report.problems == [], f"{label}:\n" + "\n".join(map(str, report.problems))
        assert_matches(live(volume), recorded.generations[generation], label)
    finally:
        volume.close()


@pytest.fixture(params=[4096, 16384], ids=["node4k", "node16k"])
def recorded(request, tmp_path, rng):
    return record_workload(tmp_path, rng, nodesize=request.param, commits=8, operations=10)


def test_every_prefix_opens_at_a_commit(recorded, tmp_path):
    path = str(tmp_path / "replay.img")
    generation = min(recorded.generations)
    image = bytearray(recorded.start)
    checked = 0
    for index, piece in enumerate(recorded.pieces):
        if piece[0] == "truncate":
            resize(image, piece[1])
        if piece[0] != "write":
            continue
        apply_write(image, piece[1], piece[2])
        generation = recorded.superblock_generation(piece) or generation
        with open(path, "wb") as out:
            out.write(image)
        assert_opens_at(path, recorded, generation, f"after piece {index} of {len(recorded.pieces)}")
        checked += 1
    assert generation == max(recorded.generations), "the full stream must reach the last commit"
    assert checked > 20, "the workload must write enough to make the test meaningful"


def test_torn_superblock_falls_back(recorded, tmp_path):
    """A superblock write cut inside its used bytes leaves the previous generation in charge."""
    path = str(tmp_path / "torn.img")
    image = bytearray(recorded.start)
    generation = min(recorded.generations)
    torn_cases = 0
    for index, piece in enumerate(recorded.pieces):
        if piece[0] == "truncate":
            resize(image, piece[1])
        if piece[0] != "write":
            continue
        new_generation = recorded.superblock_generation(piece)
        if new_generation is not None:
            offset, data = piece[1], piece[2]
            old = bytes(image[offset:offset + BLOCK]).ljust(BLOCK, b"\0")
            for cut in (8, 24, 40, 100, 180):
                torn = data[:cut] + old[cut:]
                expected = new_generation if torn == data else generation
                build_image(path, bytes(image), [(offset, torn)])
                assert_opens_at(path, recorded, expected, f"superblock piece {index} torn after {cut} bytes")
                torn_cases += 1
            generation = new_generation
        apply_write(image, piece[1], piece[2])
    assert torn_cases >= 5 * (len(recorded.generations) - 1)


def test_lost_and_reordered_writes_since_last_flush(recorded, tmp_path, rng):
    path = str(tmp_path / "window.img")
    durable: list = []
    window: list = []
    generation = min(recorded.generations)
    trials = 0
    for piece in recorded.pieces + [("flush",)]:
        if piece[0] == "truncate":
            # An empty write at the new size extends the file as the truncate
            # did; like a write, the next flush makes it durable.
            window.append(("write", piece[1], b""))
            continue
        if piece[0] == "write":
            window.append(piece)
            continue
        # A flush ends the window: try lost and reordered subsets of it.
        for attempt in range(4 if len(window) > 1 else 1):
            chosen = [p for p in window if rng.random() < 0.5] if attempt else []
            rng.shuffle(chosen)
            expected = generation
            for p in chosen:
                expected = recorded.superblock_generation(p) or expected
            build_image(path, recorded.start, durable + [(p[1], p[2]) for p in chosen])
            assert_opens_at(path, recorded, expected,
                            f"window of {len(window)} writes after {len(durable)} durable ones, "
                            f"{len(chosen)} persisted")
            trials += 1
        for p in window:
            durable.append((p[1], p[2]))
            generation = recorded.superblock_generation(p) or generation
        window = []
    assert trials > 10


# -- the named crash points of Volume.commit ------------------------------------------------


def stop_at(step: str):
    def hook(name: str) -> None:
        if name == step:
            raise CrashPoint(name)
    return hook


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_commit_crash_point_then_reopen(tmp_path, rng, step):
    """A commit stopped at a step leaves the image at the old or the new generation, whole."""
    path = str(tmp_path / "crash.img")
    volume = mkfs(path, nodesize=4096)
    driver = Driver(live(volume), FsModel(live(volume).get_inode(ROOT).mode & 0o7777))
    for _ in range(20):
        random_operation(driver, rng)
    old_generation = volume.commit()
    old_model = driver.model.copy()
    for _ in range(20):
        random_operation(driver, rng)
    new_model = driver.model.copy()

    volume.crash_hook = stop_at(step)
    with pytest.raises(CrashPoint):
        volume.commit()
    volume.close()

    # Without a power loss every issued write reached the file, so the new
    # generation is there as soon as its superblock was written.
    superblock_written = COMMIT_STEPS.index(step) >= COMMIT_STEPS.index("before-superblock-flush")
    expected_generation = old_generation + 1 if superblock_written else old_generation
    expected_model = new_model if superblock_written else old_model
    volume = open_image(path, writable=True)
    try:
        assert volume.generation == expected_generation
        report = check_volume(volume)
        assert report.problems == [], "\n".join(map(str, report.problems))
        fs = live(volume)
        assert_matches(fs, expected_model, f"reopened after a crash at {step}")

        # The reopened image accepts new work.
        driver = Driver(fs, expected_model.copy())
        for _ in range(10):
            random_operation(driver, rng)
        volume.commit()
        assert_matches(fs, driver.model, "after a commit on the reopened image")
    finally:
        volume.close()


@pytest.mark.parametrize("step", ["before-write", "before-flush", "before-superblock"])
def test_commit_crash_point_then_abort(tmp_path, rng, step):
    """A commit that fails before its superblock is written can be aborted and retried."""
    path = str(tmp_path / "abort.img")
    volume = mkfs(path, nodesize=4096)
    fs = live(volume)
    driver = Driver(fs, FsModel(fs.get_inode(ROOT).mode & 0o7777))
    for _ in range(20):
        random_operation(driver, rng)
    volume.commit()
    committed = driver.model.copy()
    for _ in range(20):
        random_operation(driver, rng)

    volume.crash_hook = stop_at(step)
    with pytest.raises(CrashPoint):
        volume.commit()
    volume.crash_hook = None
    volume.abort()
    assert_matches(fs, committed, f"after abort of a commit stopped at {step}")

    driver.model = committed.copy()
    for _ in range(20):
        random_operation(driver, rng)
    volume.commit()
    report = check_volume(volume)
    assert report.problems == [], "\n".join(map(str, report.problems))
    expected = driver.model.copy()
    volume.close()

    volume = open_image(path)
    try:
        assert_matches(live(volume), expected, "reopened after the retried commit")
    finally:
        volume.close()


def test_abort_after_superblock_written_then_power_loss(tmp_path, rng):
    """A commit stopped after writing its superblock, then aborted: no later write may damage that superblock's tree.

    The superblock of the stopped commit is already in the file, so after a
    power loss the image may open at it.  The transaction that follows the
    abort must therefore not reuse the blocks that superblock points to.
    Every prefix of the write stream must open at a whole generation: the
    one before, the stopped commit's, or the one committed after the abort.
    """
    path = str(tmp_path / "stopped.img")
    volume = mkfs(path, nodesize=4096)
    fs = live(volume)
    driver = Driver(fs, FsModel(fs.get_inode(ROOT).mode & 0o7777))
    for _ in range(30):
        random_operation(driver, rng)
    volume.commit()
    before = driver.model.copy()
    volume.close()
    with open(path, "rb") as image:
        start = image.read()

    device = RecordingDevice(ImageFile(path, True))
    volume = Volume.open(path, writable=True, device=device)
    driver = Driver(live(volume), before.copy())
    for _ in range(30):
        random_operation(driver, rng)
    stopped = driver.model.copy()
    volume.crash_hook = stop_at("before-superblock-flush")
    with pytest.raises(CrashPoint):
        volume.commit()
    volume.crash_hook = None
    stopped_pieces = len(split_pieces(device.log))
    volume.abort()
    aborted_pieces = len(split_pieces(device.log))

    driver.model = before.copy()
    for _ in range(30):
        random_operation(driver, rng)
    volume.commit()
    after = driver.model.copy()
    volume.close()

    pieces = split_pieces(device.log)
    replay = str(tmp_path / "replay.img")
    image = bytearray(start)
    expected = before
    for index, piece in enumerate(pieces):
        if piece[0] == "truncate":
            resize(image, piece[1])
        if piece[0] != "write":
            continue
        apply_write(image, piece[1], piece[2])
        if piece[1] in ondisk.SUPERBLOCK_OFFSETS:
            # The stopped commit's superblock, one that abort wrote, or the next commit's.
            if index < stopped_pieces:
                expected = stopped
            elif index < aborted_pieces:
                expected = before
            else:
                expected = after
        with open(replay, "wb") as out:
            out.write(image)
        opened = open_image(replay)
        try:
            report = check_volume(opened)
            assert report.problems == [], f"after piece {index}:\n" + "\n".join(map(str, report.problems))
            assert_matches(live(opened), expected, f"after piece {index} of {len(pieces)}")
        finally:
            opened.close()
