"""Layered images: an overlay on a read-only base image, and chains of them.

An overlay records its direct base in a LAYER_ITEM of its root tree: the
base's UUID, the base generation it was made on, and its path (relative to
the overlay's directory).  Its live filesystem starts as a block pointer to
the base's live root with layer 1, so creating an overlay copies nothing.
Opening an overlay opens its base read-only (and the base's base, and so on)
and refuses a base whose UUID or generation differs from the record.

Changes land in the overlay: copy-on-write of a base node copies it up
into the overlay, and base blocks never change.  ``commit``, ``rebase`` and
``convert`` all use :func:`sync_tree`, which makes one filesystem tree hold
the items of another, copying data extents between images where needed and
sharing them where both images can reach the same blocks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os

from . import ondisk
from .btree import Tree
from .errors import CowtreeError, ImageInUseError, InvalidArgument, NotAnImageError
from .fs import FileExtent
from .transaction import Volume

log = logging.getLogger(__name__)

LAYER_KEY = (0, ondisk.LAYER_ITEM, 1)
LAYER = ondisk.LAYER_ITEM_CODEC
MAX_CHAIN = 64
MAX_SCAN = 4096     # directory entries looked at for dependent overlays
BASE_CACHE_BYTES = 16 << 20


class BaseImageError(CowtreeError):
    """The base image of an overlay is missing, cannot be read, or has changed."""

    def __init__(self, overlay: str, base: str, record: "LayerRecord", reason: str):
        self.overlay = overlay     # path of the overlay whose base this is
        self.base = base           # path the base was looked for at
        self.record = record       # what the overlay expects of its base
        self.reason = reason       # what is wrong, worded to follow "base image 'PATH'"
        super().__init__(f"{overlay}: base image '{base}' {reason}")


@dataclasses.dataclass
class LayerRecord:
    """The decoded LAYER_ITEM: which base image an overlay was made on."""

    uuid: bytes
    generation: int
    path: str

    def encode(self) -> bytes:
        raw = os.fsencode(self.path)
        return LAYER.pack(self.uuid, self.generation, len(raw)) + raw

    @classmethod
    def decode(cls, data: bytes) -> "LayerRecord":
        uuid, generation, path_len = LAYER.unpack_from(data)
        return cls(uuid, generation, os.fsdecode(data[LAYER.size:LAYER.size + path_len]))


def layer_record(volume: Volume) -> LayerRecord | None:
    data = volume.root_tree.get(LAYER_KEY)
    return LayerRecord.decode(data) if data is not None else None


def base_path(volume: Volume, record: LayerRecord) -> str:
    """Return the base's path as recorded, resolved against the overlay's directory."""
    if os.path.isabs(record.path):
        return record.path
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(volume.path)), record.path))


def attach_bases(volume: Volume, base_override: str | None = None, depth: int = 0) -> None:
    """Open the base chain of an overlay read-only and hang it on volume.layers."""
    record = layer_record(volume)
    if record is None:
        if base_override:
            raise InvalidArgument(f"{volume.path}: not an overlay, so --base does not apply")
        return
    path = base_override or base_path(volume, record)
    if depth >= MAX_CHAIN:
        raise BaseImageError(volume.path, path, record,
                             f"makes the chain of base images longer than {MAX_CHAIN} (a loop?)")
    base = open_base(volume, record, path)
    try:
        attach_bases(base, None, depth + 1)
    except BaseException:
        base.close()
        raise
    volume.layers = [volume] + base.layers
    if base_override and volume.writable:
        record.path = _relative_path(volume.path, base_override)
        volume.root_tree.put(LAYER_KEY, record.encode())


def open_base(volume: Volume, record: LayerRecord, path: str) -> Volume:
    """Open the direct base of overlay volume at path, read-only, without its own bases.

    Raise BaseImageError, naming the overlay and the base, when the file is
    missing, cannot be read as an image, or is not the image the overlay
    was made on.  A base that another process is writing raises
    ImageInUseError, and one with unknown features UnsupportedFeatureError.
    """
    if not os.path.exists(path):
        raise BaseImageError(volume.path, path, record, "not found (give its new place with --base)")
    if os.path.isdir(path):
        raise BaseImageError(volume.path, path, record, "is a directory, not an image")
    try:
        base = Volume.open(path, writable=False, cache_bytes=BASE_CACHE_BYTES)
    except (NotAnImageError, OSError) as exc:
        detail = str(exc) if isinstance(exc, NotAnImageError) else exc.strerror or str(exc)
        detail = detail.removeprefix(f"{path}: ")
        raise BaseImageError(volume.path, path, record, f"cannot be read: {detail}") from exc
    if base.uuid != record.uuid or base.generation != record.generation:
        base.close()
        raise BaseImageError(
            volume.path, path, record,
            f"has changed since the overlay was made (overlay expects UUID {record.uuid.hex()} generation "
            f"{record.generation}, base has UUID {base.uuid.hex()} generation {base.generation})")
    return base


def _relative_path(overlay: str, base: str) -> str:
    return os.path.relpath(os.path.abspath(base), os.path.dirname(os.path.abspath(overlay)))


def create_overlay(path: str, base_file: str, label: str = "", device=None) -> Volume:
    """Write a new overlay image on base_file, and return it open.

    The image goes to ``device`` when given (an empty file opened by
    ``image.mkfs``), else to a new file at path.  Only a root tree, an
    extent tree and two items are written, whatever the base's size.
    """
    from .image import open_image
    if os.path.abspath(path) == os.path.abspath(base_file):
        raise InvalidArgument(f"{path}: an image cannot be its own base")
    base = open_image(base_file, writable=False, cache_bytes=BASE_CACHE_BYTES)
    try:
        base_live = base.tree(ondisk.FS_TREE_ID)
        addr, gen, layer = base_live.root_ptr
        record = LayerRecord(base.uuid, base.generation, _relative_path(path, base_file))
        item = dataclasses.replace(base_live.root_item, root_addr=addr, root_gen=gen, root_layer=layer + 1,
                                   level=base_live.level, last_snapshot=0, created_gen=1, flags=0,
                                   drop_objectid=0, drop_type=0, drop_offset=0, drop_level=0)
        if device is None:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
        # Generation 1 already contains the LAYER_ITEM and the live filesystem's
        # ROOT_ITEM, so nothing is copied on write before the first change.
        volume = Volume.create(path, nodesize=base.nodesize, label=label.encode(), device=device,
                               incompat_flags=ondisk.INCOMPAT_LAYERS,
                               root_items=[(LAYER_KEY, record.encode()),
                                           ((ondisk.FS_TREE_ID, ondisk.ROOT_ITEM, 0), item.encode())])
    except BaseException:
        base.close()
        raise
    volume.layers = [volume] + base.layers
    return volume


@dataclasses.dataclass
class ChainEntry:
    """One image of a chain, for ``info --chain``."""

    depth: int
    path: str
    uuid: str
    generation: int
    image_bytes: int
    bytes_used: int


def chain(volume: Volume) -> list[ChainEntry]:
    return [ChainEntry(depth, layer.path, layer.uuid.hex(), layer.generation, layer.free.high_water,
                       layer.bytes_used) for depth, layer in enumerate(volume.layers)]


# ---------------------------------------------------------------------------
# Making one tree hold another's items


def _normal(data: bytes, key) -> FileExtent:
    """Return an EXTENT_DATA item without its generation, for comparison."""
    extent = FileExtent.decode(key[2], data, f"key {key}")
    return dataclasses.replace(extent, generation=0)


class _ExtentCopier:
    """Maps data extents of a source view to extents the destination image can use."""

    def __init__(self, src: Volume, dst: Volume, shared_layers: dict[int, int], owner: int):
        self.src = src
        self.dst = dst
        self.shared = shared_layers   # source layer -> destination layer, for blocks both reach
        self.owner = owner
        self.copies: dict[tuple, list] = {}
        self.bytes_copied = 0

    def map(self, extent: FileExtent) -> list[FileExtent]:
        """Return the items that store extent in the destination, each holding a reference there.

        Blocks both images reach are shared.  Other data is copied: only
        the range the item uses, so no unreferenced bytes are copied, and
        once per distinct range, so reflinked copies stay shared.
        """
        if extent.kind != ondisk.FILE_EXTENT_REGULAR:
            return [extent]
        target_layer = self.shared.get(extent.layer)
        if target_layer is not None:
            if target_layer == 0:
                self.dst.add_ref(extent.disk_addr, extent.disk_len, +1)
            return [dataclasses.replace(extent, layer=target_layer)]
        key = (extent.layer, extent.disk_addr, extent.extent_offset, extent.num_bytes)
        pieces = self.copies.get(key)
        if pieces is None:
            pieces = []
            step = self.dst.max_extent
            for start in range(0, extent.num_bytes, step):
                length = min(step, extent.num_bytes - start)
                data = self.src.read_data(extent.disk_addr, extent.layer, extent.extent_offset + start, length)
                pieces.extend(self.dst.write_data(data, self.owner))
            self.copies[key] = pieces
            self.bytes_copied += extent.num_bytes
        else:
            for addr, disk_len, _ in pieces:
                self.dst.add_ref(addr, disk_len, +1)
        out = []
        offset = extent.offset
        for addr, disk_len, data_len in pieces:
            num_bytes = -(-data_len // ondisk.BLOCK_SIZE) * ondisk.BLOCK_SIZE
            out.append(FileExtent(offset, extent.generation, ondisk.FILE_EXTENT_REGULAR, addr, disk_len, 0,
                                  num_bytes, 0))
            offset += num_bytes
        return out


def sync_tree(src_tree: Tree, dst_tree: Tree, copier: _ExtentCopier) -> int:
    """Make dst_tree hold exactly src_tree's items; return the number of items changed.

    Both trees are read in key order together.  Equal items are left alone,
    so a destination that already shares most content changes little.
    Changes are applied in batches; ``Tree.items`` finds each next leaf from
    the root, so the destination may change while it is read.
    """
    changes = []
    count = 0
    src_iter = iter(src_tree.items())
    dst_iter = iter(dst_tree.items())
    src_item = next(src_iter, None)
    dst_item = next(dst_iter, None)
    while src_item is not None or dst_item is not None:
        if dst_item is None or (src_item is not None and src_item[0] < dst_item[0]):
            changes.append(("put", src_item[0], src_item[1]))
            src_item = next(src_iter, None)
        elif src_item is None or dst_item[0] < src_item[0]:
            changes.append(("delete", dst_item[0], None))
            dst_item = next(dst_iter, None)
        else:
            key, data = src_item
            if not _same_item(key, data, dst_item[1], copier):
                changes.append(("put", key, data))
            src_item = next(src_iter, None)
            dst_item = next(dst_iter, None)
        if len(changes) >= 1024:
            count += len(changes)
            _apply(changes, dst_tree, copier)
            changes.clear()
    count += len(changes)
    _apply(changes, dst_tree, copier)
    return count


def _same_item(key, data, old, copier) -> bool:
    if key[1] != ondisk.EXTENT_DATA:
        return bytes(data) == bytes(old)
    new_extent = _normal(data, key)
    old_extent = _normal(old, key)
    if new_extent.kind != old_extent.kind:
        return False
    if new_extent.kind == ondisk.FILE_EXTENT_INLINE:
        return new_extent.inline == old_extent.inline
    target_layer = copier.shared.get(new_extent.layer)
    if target_layer is not None:
        return dataclasses.replace(new_extent, layer=target_layer) == old_extent
    if new_extent.num_bytes != old_extent.num_bytes:
        return False
    # Different images, maybe the same bytes: compare the data itself.
    mine = copier.src.read_data(new_extent.disk_addr, new_extent.layer, new_extent.extent_offset,
                                new_extent.num_bytes)
    theirs = copier.dst.read_data(old_extent.disk_addr, old_extent.layer, old_extent.extent_offset,
                                  old_extent.num_bytes)
    return mine == theirs


def _apply(changes, dst_tree: Tree, copier: _ExtentCopier) -> None:
    dst = dst_tree.store
    for action, key, data in changes:
        old = dst_tree.get(key)
        if old is not None and key[1] == ondisk.EXTENT_DATA:
            old_extent = FileExtent.decode(key[2], old, f"key {key}")
            if old_extent.kind == ondisk.FILE_EXTENT_REGULAR and old_extent.layer == 0:
                dst.add_ref(old_extent.disk_addr, old_extent.disk_len, -1)
        if action == "delete":
            dst_tree.delete(key)
            continue
        if key[1] != ondisk.EXTENT_DATA:
            dst_tree.put(key, data)
            continue
        pieces = copier.map(FileExtent.decode(key[2], data, f"key {key}"))
        for piece in pieces:
            piece_data = dataclasses.replace(piece, generation=dst.transid).encode()
            dst_tree.put((key[0], key[1], piece.offset), piece_data)


# ---------------------------------------------------------------------------
# Commands


def convert(volume: Volume, out_path: str, force: bool = False) -> Volume:
    """Write a standalone image at out_path holding the live filesystem of volume."""
    from .image import mkfs
    out = mkfs(out_path, nodesize=volume.nodesize, force=force)
    try:
        src = volume.tree(ondisk.FS_TREE_ID)
        dst = out.tree(ondisk.FS_TREE_ID)
        copier = _ExtentCopier(volume, out, {}, ondisk.FS_TREE_ID)
        sync_tree(src, dst, copier)
        dst.root_item.next_ino = src.root_item.next_ino
        dst.changed = True
        out.commit()
    except BaseException:
        out.abort()
        out.close()
        raise
    return out


def dependent_overlays(images: list, directories: list, skip: list) -> list[str]:
    """Return the image files in directories whose direct base is one of images (open Volumes).

    Such overlays are refused once their base changes.  Files in skip, and
    files that are not cowtree images, are passed over; an image another
    process is writing is listed, since it may be one.
    """
    uuids = {image.uuid for image in images}
    skipped = {os.path.realpath(name) for name in skip}
    found = []
    for directory in dict.fromkeys(os.path.realpath(d) for d in directories):
        try:
            names = sorted(os.listdir(directory))[:MAX_SCAN]
        except OSError:
            continue
        for name in names:
            candidate = os.path.join(directory, name)
            if candidate in skipped or not os.path.isfile(candidate):
                continue
            try:
                with open(candidate, "rb") as handle:
                    if handle.read(len(ondisk.MAGIC)) != ondisk.MAGIC:
                        continue
                volume = Volume.open(candidate, writable=False, cache_bytes=BASE_CACHE_BYTES)
            except CowtreeError as exc:
                if isinstance(exc, ImageInUseError):
                    found.append(candidate)
                continue
            except OSError:
                continue
            try:
                record = layer_record(volume)
            except CowtreeError:
                record = None
            finally:
                volume.close()
            if record is not None and record.uuid in uuids:
                found.append(candidate)
    return found


def commit_to_base(path: str, force: bool = False) -> tuple[str, int]:
    """Merge an overlay's live filesystem into its direct base; return (base path, items changed).

    The overlay is then made anew on the updated base, empty.  Other
    overlays made on the same base, and overlays made on this one, are
    refused from then on, because the image below them changed: without
    force, finding any of them in the directories of the base and the
    overlay stops the commit.
    """
    from .image import open_image
    overlay = open_image(path, writable=True)
    try:
        record = layer_record(overlay)
        if record is None:
            raise InvalidArgument(f"{path}: not an overlay, nothing to commit")
        base_file = base_path(overlay, record)
        others = dependent_overlays([overlay, overlay.layers[1]], [os.path.dirname(os.path.abspath(path)),
                                    os.path.dirname(base_file)], [path, base_file])
        if others and not force:
            raise InvalidArgument(
                f"{path}: other overlays depend on {base_file} or on {path} and would be refused after the "
                f"commit: {', '.join(others)}; use --force to commit anyway")
        if others:
            log.warning("committing %s into %s; these overlays will be refused from now on: %s", path,
                        base_file, ", ".join(others))
        from .subvolume import list_subvolumes
        if len(list_subvolumes(overlay, include_deleting=True)) > 1:
            raise InvalidArgument(f"{path}: overlay has snapshots; delete them before committing it")
        label = overlay.sb.label.decode("utf-8", "replace")
        # The base is opened a second time, for writing.  The overlay's
        # read-only view gives up its shared lock for that, and stays valid:
        # it reads only blocks of the base's last commit, which the writer
        # does not overwrite before its own commit.
        fcntl.flock(overlay.layers[1].dev.fd, fcntl.LOCK_UN)
        base = open_image(base_file, writable=True)
        try:
            src = overlay.tree(ondisk.FS_TREE_ID)
            dst = base.tree(ondisk.FS_TREE_ID)
            shared = {1: 0}
            shared.update({layer: layer - 1 for layer in range(2, len(overlay.layers))})
            copier = _ExtentCopier(overlay, base, shared, ondisk.FS_TREE_ID)
            changed = sync_tree(src, dst, copier)
            dst.root_item.next_ino = max(dst.root_item.next_ino, src.root_item.next_ino)
            dst.changed = True
            base.commit()
        except BaseException:
            base.abort()
            base.close()
            raise
        base.close()
    finally:
        overlay.close()
    os.unlink(path)
    create_overlay(path, base_file, label=label).close()
    return base_file, changed


def rebase(path: str, new_base: str) -> int:
    """Move an overlay onto new_base, keeping its content; return the number of items it keeps.

    new_base should hold (nearly) the content of the old base: only items
    that differ from it are kept in the overlay.
    """
    from .image import check_base, open_image
    # The new base must not be the overlay, nor have it in its chain.
    check_base(path, new_base)
    old = open_image(path, writable=False)
    tmp = path + ".rebase-tmp"
    try:
        from .subvolume import list_subvolumes
        if len(list_subvolumes(old, include_deleting=True)) > 1:
            raise InvalidArgument(f"{path}: overlay has snapshots; delete them before rebasing it")
        if os.path.exists(tmp):
            os.unlink(tmp)
        fresh = create_overlay(tmp, new_base, label=old.sb.label.decode("utf-8", "replace"))
        try:
            copier = _ExtentCopier(old, fresh, {}, ondisk.FS_TREE_ID)
            src = old.tree(ondisk.FS_TREE_ID)
            dst = fresh.tree(ondisk.FS_TREE_ID)
            changed = sync_tree(src, dst, copier)
            dst.root_item.next_ino = max(dst.root_item.next_ino, src.root_item.next_ino)
            dst.changed = True
            fresh.commit()
            fresh.dev.flush()
            # The relative base path is recorded against tmp's directory, which is path's too.
        finally:
            fresh.close()
    except BaseException:
        old.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    old.close()
    os.replace(tmp, path)
    return changed
