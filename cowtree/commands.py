"""What each CLI command does, apart from parsing its arguments.

Every function opens its images through a :class:`~cowtree.session.Session`,
so a command that writes runs as one transaction: committed when the
function returns, aborted when it raises.  Failures are raised as
:class:`~cowtree.operands.CommandError` naming the operand.  A command that
takes many operands (cat, stat, mkdir, rm, rmdir) goes on after an error
that concerns one operand only, as coreutils does: it passes the error to
``report``, commits what the other operands changed, and returns exit
status 1.  Output goes to the binary stream ``out`` because names are
bytes; warnings go through ``warn``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import stat as stat_module
import sys
import time

from . import listing, ondisk
from .copying import (ERRORS, Copier, CopyOptions, HostSink, HostSource, ImageSink, ImageSource, Progress,
                      join_text)
from .errors import CrossDevice, Exists, InvalidArgument, IsADirectory, NotADirectory
from .operands import CommandError, ImagePath, parse_image_operand, parse_location
from .session import Session

log = logging.getLogger(__name__)

CHUNK = 4 << 20
RECURSION_LIMIT = 10000

# Errors that concern one operand only.  Any other failure (a corrupt node,
# no space left, an I/O error, an image in use) stops the command and drops
# every change it made.
OPERAND_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
                            errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS, errno.EXDEV,
                            errno.EPERM, errno.EACCES})


def _concerns_operand(exc: CommandError) -> bool:
    """Return whether exc is an error in one operand that the next operand does not share."""
    cause = exc.cause
    if cause is None:
        return True
    return isinstance(cause, OSError) and cause.errno in OPERAND_ERRNOS


def _each_operand(operands: list, body, report) -> int:
    """Call body(operand) for every operand and return the exit status.

    An operand error goes to report (when there is one), the loop goes on,
    and the status becomes 1.  Other errors propagate.
    """
    status = 0
    for operand in operands:
        try:
            body(operand)
        except CommandError as exc:
            if report is None or not _concerns_operand(exc):
                raise
            report(exc)
            status = 1
    return status


def _resolve(fs, location: ImagePath, follow: bool = True) -> int:
    """Return the inode at location; a trailing slash requires a directory."""
    ino = fs.resolve(location.path, follow=follow)
    if location.path.endswith(b"/") and len(location.path) > 1 and not fs.get_inode(ino).is_dir:
        raise NotADirectory("Not a directory")
    return ino


def _split(path: bytes) -> tuple[bytes, bytes]:
    """Split an image path into (directory, last name), ignoring trailing slashes."""
    head, name = posixpath.split(path.rstrip(b"/"))
    return head or b"/", name


def _write_json(out, value) -> None:
    out.write(json.dumps(value, indent=2).encode() + b"\n")


# ---------------------------------------------------------------------------
# mkfs, df, info


def mkfs(image: str, size: int, node_size: int, label: str, force: bool, base: str | None = None) -> dict:
    from . import image as image_module
    volume = image_module.mkfs(image, size_limit=size, nodesize=node_size, label=label, force=force, base=base)
    try:
        return listing.info_object(image, volume)
    finally:
        volume.close()


def df(images: list[str], as_json: bool, out) -> None:
    results = []
    with Session() as session:
        for text in images:
            opened = session.open(parse_image_operand(text).image, writable=False)
            vfs = os.statvfs(os.path.dirname(os.path.abspath(opened.path)))
            results.append(listing.space_object(opened.path, opened.volume, vfs.f_bavail * vfs.f_frsize))
    if as_json:
        _write_json(out, results if len(results) > 1 else results[0])
        return
    out.write("\n".join(listing.space_text(obj) for obj in results).encode())


def info(images: list[str], as_json: bool, out, chain: bool = False, report=None) -> int:
    """Print the superblock and trees of each image, or with chain its layers.

    With chain, an overlay whose base is missing, unreadable or changed
    still gets its chain printed, with the reason on the broken base's
    line.  The error then goes to report and the status is 1.
    """
    from .layers import BaseImageError
    results = []
    broken = []
    with Session() as session:
        for text in images:
            image = parse_image_operand(text).image
            try:
                opened = session.open(image, writable=False)
            except BaseImageError as exc:
                if not chain:
                    raise
                # The chain is what a user looks at when a base is missing or changed.
                results.append(_broken_chain(image))
                broken.append(exc)
                continue
            results.append(listing.info_object(opened.path, opened.volume))
    if as_json:
        _write_json(out, results if len(results) > 1 else results[0])
    else:
        render = listing.chain_text if chain else listing.info_text
        out.write("\n".join(render(obj) for obj in results).encode())
    out.flush()
    if broken and report is None:
        raise broken[0]
    for error in broken:
        report(error)
    return 1 if broken else 0


def _broken_chain(image: str) -> dict:
    """Return the chain of an overlay whose chain is broken: its intact layers, then the broken base.

    Each layer is opened on its own and checked against the record of the
    layer above it, as opening the overlay does, so the reason lands on the
    line of the base that fails the check.
    """
    from .layers import MAX_CHAIN, BaseImageError, base_path, layer_record, open_base
    from .transaction import Volume
    chain = []
    volume = Volume.open(image, writable=False)
    try:
        for depth in range(MAX_CHAIN + 1):
            chain.append(listing.layer_object(depth, volume.path, volume))
            record = layer_record(volume)
            if record is None:
                break
            # The global --base option names the direct base only.
            override = os.environ.get("COWTREE_BASE") if depth == 0 else None
            path = override or base_path(volume, record)
            try:
                base = open_base(volume, record, path)
            except BaseImageError as exc:
                chain.append(listing.broken_layer_object(depth + 1, path, record.uuid, record.generation,
                                                         exc.reason))
                break
            volume.close()
            volume = base
    finally:
        volume.close()
    return {"image": image, "chain": chain}


# ---------------------------------------------------------------------------
# ls, stat, cat


def ls(operands: list[str], long: bool, show_all: bool, recursive: bool, as_json: bool, out,
       report=None) -> int:
    """List operands as coreutils ls does: files first, then each directory, each group sorted by name.

    Errors are reported in command-line order first.  A directory gets a
    header line when there is more than one operand or with -R, and blocks
    are separated by blank lines.
    """
    objects = []
    wants_target = long or as_json
    several = len(operands) > 1
    written = False
    files = []
    directories = []

    def look_up(text: str) -> None:
        location = parse_image_operand(text)
        fs = session.filesystem(location)
        try:
            ino = _resolve(fs, location, follow=not wants_target)
            inode = fs.get_inode(ino)
        except ERRORS as exc:
            raise CommandError("cannot access", str(location), exc) from exc
        if inode.is_dir:
            directories.append((os.fsencode(text), location, fs, ino))
        else:
            target = fs.readlink(ino) if inode.is_symlink and wants_target else None
            files.append((os.fsencode(text), location, inode, target))

    def list_files() -> None:
        nonlocal written
        files.sort(key=lambda file: file[0])
        if as_json:
            objects.extend(listing.entry_object(_split(location.path)[1], location.path, inode, target)
                           for _, location, inode, target in files)
        elif files:
            rows = [(location.path, inode, target) for _, location, inode, target in files]
            out.write(b"\n".join(listing.long_lines(rows) if long else [row[0] for row in rows]) + b"\n")
            written = True

    def list_directory(directory) -> None:
        nonlocal written
        _, location, fs, ino = directory
        pending = [(location.path, ino)]
        while pending:
            path, dir_ino = pending.pop(0)
            where = f"{location.image_text}:{os.fsdecode(path)}"
            try:
                rows, subdirs = _read_dir(fs, dir_ino, path, show_all, wants_target)
            except ERRORS as exc:
                raise CommandError("cannot open directory", where, exc) from exc
            if as_json:
                objects.extend(listing.entry_object(name, _join(path, name), child, target)
                               for name, child, target in rows)
            else:
                if several or recursive:
                    header = os.fsencode(where) if several else path
                    out.write((b"\n" if written else b"") + header + b":\n")
                if long:
                    total = sum(-(-child.nbytes // 1024) for _, child, _ in rows)
                    out.write(f"total {total}\n".encode())
                    lines = listing.long_lines(rows)
                else:
                    lines = [name for name, _, _ in rows]
                if lines:
                    out.write(b"\n".join(lines) + b"\n")
                written = True
            if recursive:
                # Depth first, in name order, as ls -R prints.
                pending[0:0] = [(_join(path, name), child) for name, child in subdirs]

    with Session() as session:
        status = _each_operand(operands, look_up, report)
        list_files()
        directories.sort(key=lambda directory: directory[0])
        status |= _each_operand(directories, list_directory, report)
    if as_json:
        _write_json(out, objects)
    return status


def _join(path: bytes, name: bytes) -> bytes:
    return path + name if path.endswith(b"/") else path + b"/" + name


def _read_dir(fs, dir_ino: int, path: bytes, show_all: bool, wants_target: bool):
    """Return (rows of (name, inode, target), subdirectories as (name, ino)), sorted by name."""
    rows = []
    subdirs = []
    if show_all:
        rows.append((b".", fs.get_inode(dir_ino), None))
        rows.append((b"..", fs.get_inode(fs.parent_of(dir_ino)), None))
    entries = sorted((name, ino) for _index, name, ino, _dtype in fs.readdir(dir_ino))
    for name, ino in entries:
        if not show_all and name.startswith(b"."):
            continue
        inode = fs.get_inode(ino)
        target = fs.readlink(ino) if wants_target and inode.is_symlink else None
        rows.append((name, inode, target))
        if inode.is_dir:
            subdirs.append((name, ino))
    return rows, subdirs


def stat(operands: list[str], follow: bool, as_json: bool, out, report=None) -> int:
    objects = []
    with Session() as session:
        def stat_one(text: str) -> None:
            location = _image_operand(text)
            fs = session.filesystem(location)
            try:
                ino = _resolve(fs, location, follow=follow)
                inode = fs.get_inode(ino)
                target = fs.readlink(ino) if inode.is_symlink else None
                xattrs = fs.listxattr(ino)
            except ERRORS as exc:
                raise CommandError("cannot stat", text, exc) from exc
            if as_json:
                objects.append(listing.stat_object(location.path, inode, target, xattrs))
            else:
                out.write(listing.stat_text(os.fsencode(text), inode, target, ondisk.BLOCK_SIZE))

        status = _each_operand(operands, stat_one, report)
    if as_json:
        _write_json(out, objects)
    return status


def cat(operands: list[str], out, report=None) -> int:
    with Session() as session:
        def cat_one(text: str) -> None:
            location = _image_operand(text)
            fs = session.filesystem(location)
            try:
                ino = _resolve(fs, location)
                inode = fs.get_inode(ino)
                if inode.is_dir:
                    raise IsADirectory("Is a directory")
                position = 0
                while position < inode.size:
                    data = fs.read(ino, position, CHUNK)
                    if not data:
                        break
                    out.write(data)
                    position += len(data)
            except ERRORS as exc:
                out.flush()
                raise CommandError(None, text, exc) from exc

        status = _each_operand(operands, cat_one, report)
        out.flush()
    return status


def _image_operand(text: str) -> ImagePath:
    location = parse_location(text)
    if location is None:
        raise CommandError(None, text, message=f"'{text}' is not an image path: write IMAGE:/path")
    return location


# ---------------------------------------------------------------------------
# mkdir, rm, rmdir, mv, ln


def mkdir(operands: list[str], parents: bool, mode: int | None, report=None) -> int:
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o777 & ~umask if mode is None else mode
    with Session() as session:
        def mkdir_one(text: str) -> None:
            location = _image_operand(text)
            fs = session.filesystem(location, writable=True)
            try:
                if parents:
                    _make_parents(fs, location.path, mode)
                elif posixpath.basename(location.path.rstrip(b"/")) in (b"", b".", b".."):
                    # The root, '.' or '..': an existing directory, if the path resolves.
                    fs.resolve(location.path)
                    raise Exists("File exists")
                else:
                    dir_ino, name = fs.resolve_parent(location.path)
                    fs.mkdir(dir_ino, name, mode, os.getuid(), os.getgid())
            except ERRORS as exc:
                raise CommandError("cannot create directory", text, exc) from exc

        return _each_operand(operands, mkdir_one, report)


def _make_parents(fs, path: bytes, mode: int) -> None:
    """Create path and any missing parents; an existing directory is fine."""
    current = ondisk.ROOT_DIR_INO
    names = [part for part in path.split(b"/") if part and part != b"."]
    for index, name in enumerate(names):
        # Each step resolves one name from the directory reached so far, so
        # a deep path costs one look-up per level.
        try:
            current = fs.resolve(name, cwd=current)
        except FileNotFoundError:
            current = fs.mkdir(current, name, mode, os.getuid(), os.getgid()).ino
            continue
        if not fs.get_inode(current).is_dir:
            raise Exists("File exists") if index == len(names) - 1 else NotADirectory("Not a directory")


def rm(operands: list[str], recursive: bool, force: bool, report=None) -> int:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    with Session() as session:
        def rm_one(text: str) -> None:
            location = _image_operand(text)
            fs = session.filesystem(location, writable=True)
            _reject_root_or_dot(location.path, text)
            try:
                dir_ino, name = fs.resolve_parent(location.path)
                ino = fs.lookup(dir_ino, name)
                inode = fs.get_inode(ino)
                if location.path.endswith(b"/") and not inode.is_dir:
                    _remove_through_slash(fs, location.path, inode, recursive, text)
                if inode.is_dir and not recursive:
                    raise IsADirectory("Is a directory")
            except CommandError:
                raise
            except ERRORS as exc:
                # Like coreutils 9.1 rm -f, which also ignores "Not a directory".
                if force and getattr(exc, "errno", None) in (errno.ENOENT, errno.ENOTDIR):
                    return
                raise CommandError("cannot remove", text, exc) from exc
            _remove(fs, dir_ino, name, ino, text)

        return _each_operand(operands, rm_one, report)


def _reject_root_or_dot(path: bytes, text: str) -> None:
    """Reject removing the root directory, '.' or '..', as coreutils rm does."""
    stripped = path.rstrip(b"/")
    if not stripped:
        raise CommandError(None, text, message=f"refusing to remove the root directory '{text}'")
    if posixpath.basename(stripped) in (b".", b".."):
        raise CommandError(None, text, message=f"refusing to remove '.' or '..' directory: skipping '{text}'")


def _remove_through_slash(fs, path: bytes, inode, recursive: bool, text: str) -> None:
    """Handle rm of a non-directory named with a trailing slash; always raises.

    This follows GNU coreutils 9.1 rm: the slash makes a symlink to a
    directory stand for that directory, so without -r the error is "Is a
    directory", and with -r its contents are removed before removing the
    symlink fails with "Not a directory".  Anything else is "Not a directory".
    """
    if inode.is_symlink:
        try:
            target = fs.resolve(path.rstrip(b"/"))
        except FileNotFoundError:
            target = None
        if target is not None and fs.get_inode(target).is_dir:
            if not recursive:
                raise IsADirectory("Is a directory")
            if target == ondisk.ROOT_DIR_INO:
                raise CommandError(None, text, message=f"refusing to remove the root directory '{text}'")
            for _index, child_name, child_ino, _dtype in list(fs.readdir(target)):
                _remove(fs, target, child_name, child_ino, join_text(text, os.fsdecode(child_name)))
    raise NotADirectory("Not a directory")


def _remove(fs, dir_ino: int, name: bytes, ino: int, text: str) -> None:
    """Remove name from dir_ino, and for a directory everything below it."""
    try:
        inode = fs.get_inode(ino)
        if inode.is_dir:
            for _index, child_name, child_ino, _dtype in list(fs.readdir(ino)):
                _remove(fs, ino, child_name, child_ino, join_text(text, os.fsdecode(child_name)))
            fs.rmdir(dir_ino, name)
        else:
            fs.unlink(dir_ino, name)
    except CommandError:
        raise
    except ERRORS as exc:
        raise CommandError("cannot remove", text, exc) from exc


def rmdir(operands: list[str], report=None) -> int:
    with Session() as session:
        def rmdir_one(text: str) -> None:
            location = _image_operand(text)
            fs = session.filesystem(location, writable=True)
            try:
                if not location.path.rstrip(b"/"):
                    raise InvalidArgument("Invalid argument: the root directory cannot be removed")
                dir_ino, name = fs.resolve_parent(location.path)
                if location.path.endswith(b"/") and _names_linked_directory(fs, dir_ino, name):
                    raise CommandError(None, text, message=f"failed to remove '{text}': Symbolic link not followed")
                fs.rmdir(dir_ino, name)
            except CommandError:
                raise
            except ERRORS as exc:
                raise CommandError("failed to remove", text, exc) from exc

        return _each_operand(operands, rmdir_one, report)


def _names_linked_directory(fs, dir_ino: int, name: bytes) -> bool:
    """Return whether name is a symlink to a directory, or to nothing.

    coreutils 9.1 rmdir reports such an operand with a trailing slash as
    "Symbolic link not followed" instead of "Not a directory".
    """
    ino = fs.lookup(dir_ino, name)
    if not fs.get_inode(ino).is_symlink:
        return False
    try:
        target = fs.resolve(name, cwd=dir_ino)
    except FileNotFoundError:
        return True
    return fs.get_inode(target).is_dir


def mv(sources: list[str], dest: str) -> None:
    dst_location = _image_operand(dest)
    with Session() as session:
        fs = session.filesystem(dst_location, writable=True)
        try:
            dest_ino = _resolve(fs, dst_location)
            dest_is_dir = fs.get_inode(dest_ino).is_dir
        except FileNotFoundError:
            dest_is_dir = False
        except ERRORS as exc:
            raise CommandError("cannot stat", dest, exc) from exc
        if len(sources) > 1 and not dest_is_dir:
            raise CommandError(None, dest, message=f"target '{dest}' is not a directory")
        for text in sources:
            location = _image_operand(text)
            failed_move = f"cannot move '{text}' to '{dest}'"
            if session.filesystem(location, writable=True) is not fs:
                raise CommandError(None, text, CrossDevice("Invalid cross-device link"), message=failed_move)
            try:
                old_dir, old_name = fs.resolve_parent(location.path)
                fs.lookup(old_dir, old_name)
            except InvalidArgument as exc:   # the root, which has no parent
                raise CommandError(None, text, exc, message=failed_move) from exc
            except ERRORS as exc:
                raise CommandError("cannot stat", text, exc) from exc
            try:
                if dest_is_dir:
                    new_dir, new_name = dest_ino, old_name
                else:
                    new_dir, new_name = fs.resolve_parent(dst_location.path)
                fs.rename(old_dir, old_name, new_dir, new_name)
            except ERRORS as exc:
                raise CommandError(None, text, exc, message=failed_move) from exc


def ln(target: str, link: str, symbolic: bool) -> None:
    link_location = _image_operand(link)
    with Session() as session:
        fs = session.filesystem(link_location, writable=True)
        target_location = None
        if not symbolic:
            target_location = _image_operand(target)
            if session.filesystem(target_location, writable=True) is not fs:
                raise CommandError(None, link, CrossDevice("Invalid cross-device link"),
                                   message=f"failed to create hard link '{link}' => '{target}'")
        try:
            try:
                link_ino = _resolve(fs, link_location)
                into_dir = fs.get_inode(link_ino).is_dir
            except FileNotFoundError:
                into_dir = False
            if into_dir:
                dir_ino = link_ino
                source_path = target_location.path if target_location else os.fsencode(target)
                name = _split(source_path)[1]
            else:
                dir_ino, name = fs.resolve_parent(link_location.path)
            if symbolic:
                fs.symlink(dir_ino, name, os.fsencode(target), os.getuid(), os.getgid())
            else:
                ino = fs.resolve(target_location.path, follow=False)
                fs.link(ino, dir_ino, name)
        except ERRORS as exc:
            if symbolic:
                raise CommandError(None, link, exc, message=f"failed to create symbolic link '{link}' -> '{target}'") \
                    from exc
            raise CommandError(None, link, exc, message=f"failed to create hard link '{link}' => '{target}'") from exc


# ---------------------------------------------------------------------------
# cp


class OpenImageFile(OSError):
    """The copy would overwrite or remove an image file that this command has open."""

    def __init__(self):
        super().__init__(errno.EBUSY, "it is an image this command has open")


def cp(sources: list[str], dest: str, options: CopyOptions, warn, progress_enabled: bool) -> int:
    """Copy sources to dest; return the exit status (1 when a directory was left out)."""
    # The walk recurses about three frames per directory level; this allows
    # about 3,000 levels, which tests/test_cli.py checks.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    dst_location = parse_location(dest)
    src_locations = [parse_location(text) for text in sources]
    progress = Progress(progress_enabled)
    with Session() as session:
        if dst_location is not None:
            sink = ImageSink(session.filesystem(dst_location, writable=True), options)
            dst_path = dst_location.path
        else:
            sink = ProtectedHostSink(options, warn)
            dst_path = dest

        # Look at every source before copying anything.
        plans = []
        omitted = []
        open_images = set()
        for text, location in zip(sources, src_locations):
            if location is None:
                source = HostSource(skip=open_images, warn=warn)
                path = text
                base = os.fsencode(os.path.basename(text.rstrip("/")))
            else:
                source = ImageSource(session.filesystem(location))
                path = location.path
                base = _split(location.path)[1]
            try:
                handle, meta = source.top(path, follow=not options.recursive)
            except ERRORS as exc:
                raise CommandError("cannot stat", text, exc) from exc
            if stat_module.S_ISDIR(meta.mode) and not options.recursive:
                omitted.append(text)
                continue
            plans.append((source, handle, meta, text, base))
        for opened in session.images.values():
            st = opened.volume.dev.stat()
            open_images.add((st.st_dev, st.st_ino))
        if isinstance(sink, ProtectedHostSink):
            sink.protect = open_images
        for text in omitted:
            warn(f"-r not specified; omitting directory '{text}'")
        if omitted:
            return 1

        try:
            kind = sink.probe(dst_path)
        except ERRORS as exc:
            raise CommandError("cannot stat", dest, exc) from exc
        if len(plans) > 1 and kind != "dir":
            raise CommandError(None, dest, message=f"target '{dest}' is not a directory")
        links: dict = {}
        try:
            for source, handle, meta, text, base in plans:
                copier = Copier(source, sink, options, progress)
                copier.links = links
                _copy_operand(copier, handle, meta, text, base, dst_path, dest, kind)
        finally:
            progress.done()
    log.info("copied %d files, %d bytes in %.2f s", progress.files, progress.bytes,
             time.monotonic() - progress.start)
    return 0


def _copy_operand(copier: Copier, handle, meta, src_text: str, base: bytes, dst_path, dest: str, kind) -> None:
    """Copy one command-line source to the destination operand."""
    sink = copier.sink
    is_dir = stat_module.S_ISDIR(meta.mode)
    contents = base in (b"", b".", b"..")
    if kind == "dir":
        try:
            dir_handle = sink.open_dir(dst_path)
        except ERRORS as exc:
            raise CommandError("cannot access", dest, exc) from exc
        try:
            if contents:
                _check_not_inside(copier, handle, dir_handle, src_text, dest)
                copier.copy_children(handle, dir_handle, src_text, dest, False)
                copier.finish_dir(handle, dir_handle, meta, False, src_text, dest)
                return
            target_text = join_text(dest, os.fsdecode(base))
            _check_same(copier, handle, meta, dir_handle, base, src_text, target_text)
            copier.copy(handle, meta, dir_handle, base, src_text, target_text, False)
        finally:
            sink.close_dir(dir_handle)
        return

    action = "cannot create directory" if is_dir else "cannot create regular file"
    if kind is None and not is_dir and _ends_with_slash(dst_path):
        raise CommandError(action, dest, NotADirectory("Not a directory"))
    if kind == "other" and is_dir:
        raise CommandError(None, dest, message=f"cannot overwrite non-directory '{dest}' with directory '{src_text}'")
    if isinstance(dst_path, bytes):
        parent_path, name = _split(dst_path)
    else:
        parent_path, name_text = os.path.split(dst_path.rstrip("/"))
        name = os.fsencode(name_text)
    try:
        parent = sink.open_dir(parent_path)
    except ERRORS as exc:
        raise CommandError(action, dest, exc) from exc
    try:
        _check_same(copier, handle, meta, parent, name, src_text, dest)
        copier.copy(handle, meta, parent, name, src_text, dest, False)
    finally:
        sink.close_dir(parent)


def _ends_with_slash(path) -> bool:
    return path.endswith(b"/" if isinstance(path, bytes) else "/")


def _same_fs(copier: Copier) -> bool:
    return copier.source.kind == "image" and copier.sink.kind == "image" and copier.source.fs is copier.sink.fs


def _check_not_inside(copier: Copier, src_ino: int, dir_ino: int, src_text: str, dst_text: str) -> None:
    """Raise when directory src_ino is dir_ino or one of its ancestors, in the same filesystem."""
    if not _same_fs(copier):
        return
    fs = copier.source.fs
    current = dir_ino
    while True:
        if current == src_ino:
            raise CommandError(None, dst_text,
                               message=f"cannot copy a directory, '{src_text}', into itself, '{dst_text}'")
        if current == ondisk.ROOT_DIR_INO:
            return
        current = fs.parent_of(current)


def _check_same(copier: Copier, handle, meta, parent, name: bytes, src_text: str, dst_text: str) -> None:
    """Reject copying an entry onto itself or a directory into its own tree."""
    if not _same_fs(copier):
        return
    if stat_module.S_ISDIR(meta.mode):
        _check_not_inside(copier, handle, parent, src_text, dst_text)
        return
    if copier.sink.inode_of(parent, name) == handle:
        raise CommandError(None, dst_text, message=f"'{src_text}' and '{dst_text}' are the same file")


class ProtectedHostSink(HostSink):
    """A HostSink that never truncates or removes an image file this command has open."""

    protect: set = frozenset()

    def _guard(self, parent_fd: int, name: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) in self.protect:
            raise OpenImageFile()

    def _clear(self, parent_fd, name, fresh):
        if not fresh:
            self._guard(parent_fd, name)
        super()._clear(parent_fd, name, fresh)

    def create_file(self, parent_fd, name, meta, fresh):
        if not fresh:
            self._guard(parent_fd, name)
        return super().create_file(parent_fd, name, meta, fresh)
