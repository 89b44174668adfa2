"""Images as users see them: create, open, and reach the live filesystem.

This is the subvolume level of the stack.  The live filesystem is the
subvolume with tree id FS_TREE_ID; snapshots are further subvolumes.
"""

from __future__ import annotations

import logging
import os

from . import ondisk
from .errors import Exists, NotAnImageError
from .fs import FileSystem
from .transaction import RootItem, Volume

log = logging.getLogger(__name__)


def mkfs(path: str, size_limit: int = 0, nodesize: int = ondisk.DEFAULT_NODE_SIZE, label: str = "",
         force: bool = False, uid: int | None = None, gid: int | None = None, base: str | None = None) -> Volume:
    """Create a new image at path, and return it open.

    The image holds an empty live filesystem, or, with ``base``, is an
    overlay whose live filesystem starts as the base image's.
    """
    if nodesize < ondisk.MIN_NODE_SIZE or nodesize > ondisk.MAX_NODE_SIZE or nodesize & (nodesize - 1):
        raise ValueError(f"invalid node size {nodesize}: must be a power of two from 4096 to 65536")
    if size_limit and size_limit < ondisk.FIRST_ALLOC + 64 * nodesize + (1 << 20):
        raise ValueError(f"size {size_limit} is too small: at least "
                         f"{ondisk.FIRST_ALLOC + 64 * nodesize + (1 << 20)} bytes are needed")
    if len(label.encode()) > 64:
        raise ValueError("label is longer than 64 bytes")
    if base is not None:
        check_base(path, base)
    exists = os.path.exists(path)
    if exists and not force:
        if os.path.isdir(path):
            raise NotAnImageError(f"{path}: is a directory")
        if os.path.getsize(path) > 0:
            raise Exists(f"{path}: file exists (use --force to overwrite it)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.close(fd)
    from .blockdev import ImageFile
    dev = ImageFile(path, True)
    try:
        os.ftruncate(dev.fd, 0)
        if base is not None:
            from .layers import create_overlay
            return create_overlay(path, base, label=label, device=dev)
        volume = Volume.create(path, nodesize=nodesize, size_limit=size_limit, label=label.encode(), device=dev)
        tree = volume.create_tree(ondisk.FS_TREE_ID, RootItem(created_gen=volume.transid))
        fs = FileSystem(volume, ondisk.FS_TREE_ID)
        fs.init_root(uid=os.getuid() if uid is None else uid, gid=os.getgid() if gid is None else gid)
        del tree
        volume.commit()
    except BaseException:
        dev.close()
        raise
    return volume


def check_base(path: str, base: str) -> None:
    """Raise unless base is an image that can carry an overlay at path.

    Runs before mkfs touches path, so that a bad --base loses nothing even
    with --force.
    """
    from .errors import InvalidArgument
    target = same_file_key(path)
    if target is not None and same_file_key(base) == target:
        raise InvalidArgument(f"{path}: an image cannot be its own base")
    volume = open_image(base, writable=False)
    try:
        for layer in volume.layers:
            st = layer.dev.stat()
            if (st.st_dev, st.st_ino) == target:
                raise InvalidArgument(f"{path}: is already in the chain below {base}; "
                                      f"making it an overlay would put it below itself")
    finally:
        volume.close()


def same_file_key(path: str):
    """Return (st_dev, st_ino) of path, which names the file however it is spelled or linked; None if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def open_image(path: str, writable: bool = False, base: str | None = None, **kwargs) -> Volume:
    """Open an existing image, and the chain of base images below an overlay.

    ``base`` names the direct base's file when it moved; a writable open
    records the new place.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    if os.path.isdir(path):
        raise NotAnImageError(f"{path}: is a directory, not an image")
    volume = Volume.open(path, writable=writable, **kwargs)
    try:
        from .layers import attach_bases
        attach_bases(volume, base)
    except BaseException:
        volume.close()
        raise
    return volume


def live(volume: Volume) -> FileSystem:
    """Return the live filesystem of an open image."""
    return FileSystem(volume, ondisk.FS_TREE_ID)


def open_filesystem(volume: Volume, name: bytes | str | None = None) -> FileSystem:
    """Return the FileSystem of the snapshot called name, or the live one for None."""
    from .subvolume import open_filesystem as open_subvolume
    return open_subvolume(volume, name)
