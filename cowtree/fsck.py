"""``cowtree fsck``: prove an image consistent, list every fault, repair the safe ones.

Caveats first:

- Only the superblock copy in use and the trees it reaches are checked in
  depth.  The other copy is checked for its magic, version, checksum, UUID
  and generation, not for the trees it names.
- A node that cannot be read hides everything below it: the problems
  inside such a subtree are not listed, and the filesystem cross-checks of
  the subvolumes that reach it are skipped.
- ``--repair`` changes the image only through normal copy-on-write
  transactions.  The last good superblock and every block it reaches stay
  untouched until the repair's own commit is durable, so a crash during a
  repair leaves the image as it was before that commit.  Damaged nodes and
  data blocks are not repaired, because their content is lost.

The checks themselves live in :mod:`cowtree.check`; this module adds the
superblock copies, the output, the repairs and the exit status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from . import ondisk
from .check import add_to_chunks, Problem, Report, check_volume
from .errors import CorruptionError, CowtreeError, ImageInUseError, NotAnImageError, UnsupportedFeatureError
from .fs import FileSystem, decode_dirents, decode_refs, encode_dirent, name_hash
from .transaction import EXTENT

log = logging.getLogger(__name__)

EXIT_CLEAN = 0          # nothing found
EXIT_REPAIRED = 1       # problems found, and all of them repaired
EXIT_ERRORS = 2         # errors remain
EXIT_LEAKS = 3          # only leaked space remains
EXIT_OPERATIONAL = 4    # usage error, or the image could not be opened at all

LOST_FOUND = b"lost+found"
REPAIR_ROUNDS = 4
EXTENT_REPAIRS = {"leak", "refs", "bytes_used", "superblock_copy", "chunks"}
ENTRY_REPAIRS = {"dangling", "dangling_item", "stale_ref", "orphan", "orphan_item"}
COUNT_REPAIRS = {"nlink", "dirsize"}
ROOT_ITEM_REPAIRS = {"subvol_uuid"}


class FsckError(CowtreeError):
    """fsck could not run: the image is missing, unreadable, locked or of an unknown format."""


@dataclasses.dataclass
class FsckResult:
    """The findings and repairs of one fsck run."""

    image: str
    found: list = dataclasses.field(default_factory=list)       # problems of the first check
    remaining: list = dataclasses.field(default_factory=list)   # problems after the repairs
    repaired: list = dataclasses.field(default_factory=list)    # repairs applied, as text
    superblocks: list = dataclasses.field(default_factory=list)
    report: Report | None = None
    repair_failed: str = ""

    @property
    def exit_status(self) -> int:
        if any(p.kind == "error" for p in self.remaining):
            return EXIT_ERRORS
        if self.remaining:
            return EXIT_LEAKS
        return EXIT_REPAIRED if self.found else EXIT_CLEAN

    @property
    def verdict(self) -> str:
        return {EXIT_CLEAN: "clean", EXIT_REPAIRED: "all problems repaired", EXIT_ERRORS: "errors found",
                EXIT_LEAKS: "only leaked space found"}[self.exit_status]


# ---------------------------------------------------------------------------
# Checking


def _superblock_problems(volume, result: FsckResult) -> list:
    """Check every superblock copy against the one in use."""
    problems = []
    scan = volume.superblock_scan
    chosen = scan.chosen
    for index, copy in enumerate(scan.copies):
        where = f"copy {index} at offset {ondisk.SUPERBLOCK_OFFSETS[index]}"
        if isinstance(copy, Exception):
            why = getattr(copy, "why", None) or str(copy).split(": ", 1)[-1]
            problems.append(Problem("superblock", where, f"invalid: {why}", repair=("superblock_copy", index)))
            result.superblocks.append({"copy": index, "valid": False, "in_use": False, "reason": str(copy)})
            continue
        in_use = index == chosen.copy_index
        result.superblocks.append({"copy": index, "valid": True, "in_use": in_use, "generation": copy.generation})
        if in_use:
            continue
        if copy.uuid != chosen.uuid:
            problems.append(Problem("superblock", where, "belongs to another image", copy.uuid.hex(),
                                    chosen.uuid.hex(), repair=("superblock_copy", index)))
        elif copy.nodesize != chosen.nodesize:
            problems.append(Problem("superblock", where, "node size differs from the copy in use", copy.nodesize,
                                    chosen.nodesize, repair=("superblock_copy", index)))
    size = volume.dev.size()
    if size < chosen.image_bytes:
        problems.append(Problem("superblock", f"copy {chosen.copy_index}", "image file is shorter than recorded",
                                size, f">= {chosen.image_bytes}"))
    return problems


def _open(path: str, writable: bool):
    """Open path for fsck; raise FsckError when fsck cannot run at all."""
    from .image import open_image
    from .layers import BaseImageError
    if not os.path.exists(path):
        raise FsckError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FsckError(f"{path}: is a directory, not an image")
    try:
        return open_image(path, writable=writable, base=os.environ.get("COWTREE_BASE") or None)
    except BaseImageError as exc:
        raise FsckError(str(exc)) from exc   # it names the overlay and the base
    except (ImageInUseError, UnsupportedFeatureError, PermissionError) as exc:
        raise FsckError(f"{path}: cannot open the image: {exc}") from exc


def check_image(path: str, data: bool = True, progress=None, writable: bool = False) -> FsckResult:
    """Check the image at path; return what was found (nothing is changed)."""
    result = FsckResult(path)
    try:
        volume = _open(path, writable)
    except NotAnImageError as exc:
        result.found = result.remaining = [Problem("superblock", "of the image", str(exc))]
        return result
    except CorruptionError as exc:
        # The superblock is valid but the root tree or extent tree root is not.
        result.found = result.remaining = [Problem(exc.what, exc.where, exc.why, exc.found, exc.expected)]
        return result
    try:
        result.found = _check_open(volume, result, data, progress)
        result.remaining = list(result.found)
    finally:
        volume.close()
    return result


def _check_open(volume, result: FsckResult, data: bool, progress) -> list:
    problems = _superblock_problems(volume, result)
    report = check_volume(volume, check_files=True, check_data=data, progress=progress, report_unknown_items=True)
    result.report = report
    return problems + report.problems


# ---------------------------------------------------------------------------
# Repairing


def repair_image(path: str, data: bool = True, progress=None) -> FsckResult:
    """Check the image at path and repair what can be repaired safely."""
    result = check_image(path, data, progress)
    if result.report is not None and result.report.unread_nodes:
        # Below an unreadable node nothing was counted: its blocks would look
        # leaked, shared extents would look overcounted and its inodes
        # missing, and "repairing" that would free and unlink live data.
        count = result.report.unread_nodes
        result.repair_failed = (f"{count} {'node' if count == 1 else 'nodes'} could not be read, so the "
                                f"counts are incomplete; nothing was repaired (repairing would free the "
                                f"blocks and unlink the files below them, and a damaged node's content "
                                f"cannot be rebuilt)")
        log.error("%s: %s", path, result.repair_failed)
        return result
    if not any(p.repair for p in result.found):
        return result
    volume = _open(path, True)
    volume.strict = False   # the self-check after each commit would raise on the problems not fixed yet
    try:
        _repair_rounds(volume, result, data)
    except CowtreeError as exc:
        log.error("%s: repair failed: %s", path, exc)
        result.repair_failed = str(exc)
        volume.abort()
    finally:
        volume.close()
    final = check_image(path, data)
    result.remaining = final.remaining
    result.report = final.report
    return result


def _repair_rounds(volume, result: FsckResult, data: bool) -> None:
    problems = result.found
    for _ in range(REPAIR_ROUNDS):
        kinds = {p.repair[0] for p in problems if p.repair}
        if kinds & EXTENT_REPAIRS:
            _repair_extents(volume, [p for p in problems if p.repair and p.repair[0] in EXTENT_REPAIRS], result)
        elif kinds & ENTRY_REPAIRS:
            _repair_entries(volume, [p for p in problems if p.repair and p.repair[0] in ENTRY_REPAIRS], result)
        elif kinds & COUNT_REPAIRS:
            _repair_counts(volume, [p for p in problems if p.repair and p.repair[0] in COUNT_REPAIRS], result)
        elif kinds & ROOT_ITEM_REPAIRS:
            _repair_root_items(volume, [p for p in problems if p.repair and p.repair[0] in ROOT_ITEM_REPAIRS],
                               result)
        else:
            return
        volume.commit()
        # The first commit rewrote the damaged superblock copy, if any.
        problems = check_volume(volume, check_files=True, check_data=False, report_unknown_items=True).problems


def _repair_extents(volume, problems: list, result: FsckResult) -> None:
    """Drop leaked extent items, rewrite wrong reference counts, and fix bytes_used."""
    # Load all free space first, so that a dropped item frees nothing that
    # this transaction could allocate again before its commit.
    while volume.free._load_next_chunk():
        pass
    extent_tree = volume.extent_tree
    for problem in problems:
        fix = problem.repair
        if fix[0] == "leak":
            _, addr, length = fix
            if extent_tree.delete((addr, ondisk.EXTENT_ITEM, length)):
                result.repaired.append(f"dropped the EXTENT_ITEM of leaked extent {addr}+{length}")
        elif fix[0] == "refs":
            _, addr, length, expected = fix
            key = (addr, ondisk.EXTENT_ITEM, length)
            old = extent_tree.get(key)
            if old is None:
                continue
            refs, gen, flags, owner = EXTENT.unpack_from(old)
            extent_tree.put(key, EXTENT.pack(expected, gen, flags, owner) + old[EXTENT.size:])
            result.repaired.append(f"reference count of extent {addr}+{length}: {refs} -> {expected}")
        elif fix[0] == "superblock_copy":
            result.repaired.append(f"rewrote superblock copy {fix[1]}")
    # bytes_used must equal the extent tree the commit starts from; the
    # commit then adds and subtracts the extents of this transaction.
    total = 0
    sums: dict[int, int] = {}
    for key, _ in extent_tree.items():
        if key[1] == ondisk.EXTENT_ITEM:
            total += key[2]
            add_to_chunks(sums, key[0], key[2])
    if total != volume.bytes_used:
        result.repaired.append(f"bytes_used in the superblock: {volume.bytes_used} -> {total}")
        volume.bytes_used = total
    # CHUNK_ITEMs likewise; the commit adds this transaction's changes to them.
    for chunk in sorted(set(sums) | set(volume.chunk_used)):
        if sums.get(chunk, 0) != volume.chunk_used.get(chunk, 0):
            result.repaired.append(f"bytes in use of chunk {chunk}: {volume.chunk_used.get(chunk, 0)} -> "
                                   f"{sums.get(chunk, 0)}")
            volume.set_chunk_used(chunk, sums.get(chunk, 0))
    # A commit writes the superblock copy that the next generation selects,
    # which is never the copy in use, even when no tree changed.
    volume.root_tree.changed = True


def _repair_root_items(volume, problems: list, result: FsckResult) -> None:
    """Delete invalid SUBVOL_UUID items, so that their subvolumes get the derived UUID."""
    for problem in problems:
        key = problem.repair[1]
        if volume.root_tree.delete(key):
            result.repaired.append(f"deleted the invalid SUBVOL_UUID item of subvolume {key[0]}")


def _filesystem(volume, cache: dict, tree_id: int) -> FileSystem:
    fs = cache.get(tree_id)
    if fs is None:
        fs = cache[tree_id] = FileSystem(volume, tree_id, readonly=False)
    return fs


def _repair_entries(volume, problems: list, result: FsckResult) -> None:
    """Remove dangling entries and stale INODE_REFs, and move orphan inodes to /lost+found."""
    filesystems: dict = {}
    for problem in problems:
        fix = problem.repair
        fs = _filesystem(volume, filesystems, fix[1])
        tree = fs.tree
        if fix[0] == "dangling":
            _, _, dir_ino, index, name = fix
            _drop_dir_item(tree, dir_ino, name)
            tree.delete((dir_ino, ondisk.DIR_INDEX, index))
            result.repaired.append(f"removed dangling entry {name!r} from directory {dir_ino} in subvolume {fix[1]}")
        elif fix[0] == "dangling_item":
            _, _, dir_ino, name, _child = fix
            _drop_dir_item(tree, dir_ino, name)
            result.repaired.append(f"removed DIR_ITEM {name!r} from directory {dir_ino} in subvolume {fix[1]}")
        elif fix[0] == "stale_ref":
            _, _, child, parent, name = fix
            _drop_ref(tree, child, parent, name)
            result.repaired.append(f"removed stale INODE_REF {name!r} of inode {child} in subvolume {fix[1]}")
        elif fix[0] == "orphan_item":
            tree.delete((ondisk.ORPHAN_OBJECTID, ondisk.ORPHAN_ITEM, fix[2]))
            result.repaired.append(f"removed ORPHAN_ITEM of missing inode {fix[2]} in subvolume {fix[1]}")
        elif fix[0] == "orphan":
            name = _move_to_lost_found(fs, fix[2])
            result.repaired.append(f"moved orphan inode {fix[2]} to /lost+found/{name.decode()} "
                                   f"in subvolume {fix[1]}")


def _drop_dir_item(tree, dir_ino: int, name: bytes) -> None:
    key = (dir_ino, ondisk.DIR_ITEM, name_hash(name))
    data = tree.get(key)
    if data is None:
        return
    keep = [encode_dirent(ino, dtype, entry) for ino, dtype, entry in decode_dirents(data, f"dir {dir_ino}")
            if entry != name]
    if keep:
        tree.put(key, b"".join(keep))
    else:
        tree.delete(key)


def _drop_ref(tree, child: int, parent: int, name: bytes) -> None:
    key = (child, ondisk.INODE_REF, parent)
    data = tree.get(key)
    if data is None:
        return
    keep = [ondisk.INODE_REF_CODEC.pack(index, len(entry)) + entry
            for index, entry in decode_refs(data, f"inode {child}") if entry != name]
    if keep:
        tree.put(key, b"".join(keep))
    else:
        tree.delete(key)


def _move_to_lost_found(fs: FileSystem, ino: int) -> bytes:
    """Link orphan inode ino into /lost+found under its number; return the name."""
    root = ondisk.ROOT_DIR_INO
    try:
        lost = fs.lookup(root, LOST_FOUND)
    except FileNotFoundError:
        lost = fs.mkdir(root, LOST_FOUND, 0o700).ino
    tree = fs.tree
    # Its INODE_REFs name entries that no longer exist.
    for key in [key for key, _ in tree.items((ino, ondisk.INODE_REF, 0), (ino, ondisk.INODE_REF + 1, 0))]:
        tree.delete(key)
    name = b"%d" % ino
    suffix = 0
    while True:
        try:
            fs.lookup(lost, name)
        except FileNotFoundError:
            break
        suffix += 1
        name = b"%d.%d" % (ino, suffix)
    inode = fs.get_inode(ino)
    fs._add_entry(fs.get_inode(lost), name, inode)
    if inode.is_dir:
        parent = fs.get_inode(lost)
        parent.nlink += 1
        fs.put_inode(parent)
    else:
        inode.nlink = 1
        fs.put_inode(inode)
    return name


def _repair_counts(volume, problems: list, result: FsckResult) -> None:
    """Rewrite link counts and directory sizes to the values the directory entries imply."""
    filesystems: dict = {}
    for problem in problems:
        fix = problem.repair
        fs = _filesystem(volume, filesystems, fix[1])
        inode = fs.get_inode(fix[2])
        if fix[0] == "nlink":
            result.repaired.append(f"link count of inode {fix[2]} in subvolume {fix[1]}: {inode.nlink} -> {fix[3]}")
            inode.nlink = fix[3]
        else:
            result.repaired.append(f"size of directory {fix[2]} in subvolume {fix[1]}: {inode.size} -> {fix[3]}")
            inode.size = fix[3]
        fs.put_inode(inode)


# ---------------------------------------------------------------------------
# Output


def format_problem(problem: Problem) -> str:
    """Return the one-line form of a problem: kind, what, where, why, found and expected."""
    return f"{problem.kind}: {problem}"


def _problem_json(problem: Problem) -> dict:
    def plain(value):
        return value if value is None or isinstance(value, (int, str)) else str(value)
    return {"kind": problem.kind, "what": problem.what, "where": problem.where, "why": problem.why,
            "found": plain(problem.found), "expected": plain(problem.expected),
            "repairable": problem.repair is not None}


def summary(result: FsckResult, nodesize: int | None = None) -> dict:
    """Return the counts that end every fsck output."""
    report = result.report or Report()
    size = nodesize or 0
    return {
        "nodes checked": report.nodes,
        "data blocks checked": report.data_blocks_checked,
        "bytes checked": report.nodes * size + report.data_blocks_checked * ondisk.BLOCK_SIZE,
        "subvolumes": report.subvolumes,
        "errors": sum(1 for p in result.found if p.kind == "error"),
        "leaks": sum(1 for p in result.found if p.kind == "leak"),
        "repaired": len(result.repaired),
        "errors remaining": sum(1 for p in result.remaining if p.kind == "error"),
        "leaks remaining": sum(1 for p in result.remaining if p.kind == "leak"),
    }


class _Progress:
    """A progress line on a terminal, redrawn at most five times a second."""

    def __init__(self, stream):
        self.stream = stream
        self.last = 0.0
        self.shown = False

    def __call__(self, report: Report) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        self.shown = True
        self.stream.write(f"\rfsck: {report.nodes} nodes, {report.data_blocks_checked} data blocks checked ")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _nodesize(path: str) -> int | None:
    try:
        with open(path, "rb") as image:
            for offset in ondisk.SUPERBLOCK_OFFSETS:
                image.seek(offset)
                block = image.read(ondisk.BLOCK_SIZE)
                if block[:8] == ondisk.MAGIC:
                    return ondisk.SUPERBLOCK_CODEC.unpack_from(block)[5]
    except OSError:
        return None
    return None


def run(path: str, repair: bool = False, as_json: bool = False, verbose: bool = False, data: bool = True,
        out=None, err=None) -> int:
    """Check (and with repair, fix) the image at path, print the findings, and return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    progress = _Progress(err) if not as_json and hasattr(err, "isatty") and err.isatty() else None
    started = time.monotonic()
    try:
        result = repair_image(path, data, progress) if repair else check_image(path, data, progress)
    except FsckError as exc:
        if progress:
            progress.clear()
        err.write(f"cowtree fsck: {exc}\n")
        return EXIT_OPERATIONAL
    except OSError as exc:
        if progress:
            progress.clear()
        err.write(f"cowtree fsck: {path}: {exc.strerror or exc}\n")
        return EXIT_OPERATIONAL
    if progress:
        progress.clear()
    elapsed = time.monotonic() - started
    counts = summary(result, _nodesize(path))
    status = result.exit_status
    if as_json:
        doc = {"image": path, "problems": [_problem_json(p) for p in result.found],
               "remaining": [_problem_json(p) for p in result.remaining], "repaired": result.repaired,
               "superblocks": result.superblocks, "summary": counts, "seconds": round(elapsed, 3),
               "verdict": result.verdict, "exit_status": status}
        if result.repair_failed:
            doc["repair_failed"] = result.repair_failed
        out.write(json.dumps(doc, indent=2) + "\n")
        return status
    if verbose:
        for copy in result.superblocks:
            state = "in use" if copy["in_use"] else ("valid" if copy["valid"] else "invalid")
            generation = f", generation {copy['generation']}" if copy.get("generation") is not None else ""
            out.write(f"superblock copy {copy['copy']}: {state}{generation}\n")
    for problem in result.found:
        out.write(format_problem(problem) + "\n")
    for text in result.repaired:
        out.write(f"repaired: {text}\n")
    if repair:
        for problem in result.remaining:
            out.write(f"remaining {format_problem(problem)}\n")
    if result.repair_failed:
        out.write(f"repair failed: {result.repair_failed}\n")
    for key, value in counts.items():
        if key.endswith("remaining") and not repair:
            continue
        out.write(f"{key}: {value}\n")
    if verbose:
        out.write(f"seconds: {elapsed:.3f}\n")
    out.write(f"verdict: {result.verdict}\n")
    return status
