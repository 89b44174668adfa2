"""Text and JSON views of inodes and images for ls, stat, df and info.

Names are bytes and are printed as they are, like coreutils ls writing to a
pipe.  In JSON a name is the string ``os.fsdecode`` makes of it, so a byte
that is not UTF-8 appears as a lone surrogate escape (``\\udcXX``).
"""

from __future__ import annotations

import grp
import pwd
import stat as stat_module
import time
import uuid as uuid_module

from . import ondisk

TYPE_NAMES = {
    stat_module.S_IFREG: "file",
    stat_module.S_IFDIR: "directory",
    stat_module.S_IFLNK: "symlink",
    stat_module.S_IFIFO: "fifo",
    stat_module.S_IFSOCK: "socket",
    stat_module.S_IFCHR: "char",
    stat_module.S_IFBLK: "block",
}

STAT_TYPE_NAMES = {
    stat_module.S_IFREG: "regular file",
    stat_module.S_IFDIR: "directory",
    stat_module.S_IFLNK: "symbolic link",
    stat_module.S_IFIFO: "fifo",
    stat_module.S_IFSOCK: "socket",
    stat_module.S_IFCHR: "character special file",
    stat_module.S_IFBLK: "block special file",
}

SIX_MONTHS_NS = 183 * 24 * 3600 * 10**9

_user_names: dict[int, str] = {}
_group_names: dict[int, str] = {}


def user_name(uid: int) -> str:
    name = _user_names.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _user_names[uid] = name
    return name


def group_name(gid: int) -> str:
    name = _group_names.get(gid)
    if name is None:
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        _group_names[gid] = name
    return name


def human_size(value: int) -> str:
    """Format a byte count the way df -h does: 1023, 1.0K, 15M, 2.3G."""
    if value < 1024:
        return str(value)
    for suffix in "KMGTPE":
        value /= 1024
        if value < 1024 or suffix == "E":
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    raise AssertionError("unreachable")


def blocks_512(inode) -> int:
    """Return the 512-byte blocks an inode's data takes, as st_blocks counts them."""
    return -(-inode.nbytes // 512)


def ls_time(ns: int, now_ns: int) -> str:
    """Format a time as ls -l does: hour and minute for the last six months, else the year."""
    local = time.localtime(ns // 10**9)
    if now_ns - SIX_MONTHS_NS < ns <= now_ns + 3600 * 10**9:
        return time.strftime("%b %e %H:%M", local)
    return time.strftime("%b %e  %Y", local)


def full_time(ns: int) -> str:
    """Format a time as stat does: 2024-12-04 20:32:01.123456789 +0000."""
    local = time.localtime(ns // 10**9)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', local)}.{ns % 10**9:09d} {time.strftime('%z', local)}"


def entry_object(name: bytes, path: bytes, inode, target: bytes | None) -> dict:
    """Return the JSON object ls --json prints for one entry."""
    obj = {
        "name": name.decode("utf-8", "surrogateescape"),
        "path": path.decode("utf-8", "surrogateescape"),
        "type": TYPE_NAMES.get(stat_module.S_IFMT(inode.mode), "unknown"),
        "mode": inode.mode,
        "size": inode.size,
        "nlink": inode.nlink,
        "uid": inode.uid,
        "gid": inode.gid,
        "mtime_ns": inode.mtime_ns,
        "ino": inode.ino,
    }
    if target is not None:
        obj["target"] = target.decode("utf-8", "surrogateescape")
    return obj


def long_lines(rows: list[tuple[bytes, object, bytes | None]]) -> list[bytes]:
    """Return ls -l lines for rows of (name, inode, symlink target or None), columns aligned."""
    now = time.time_ns()
    cells = []
    for name, inode, target in rows:
        if stat_module.S_ISCHR(inode.mode) or stat_module.S_ISBLK(inode.mode):
            size = f"{inode.rdev >> 8 & 0xfff}, {inode.rdev & 0xff}"
        else:
            size = str(inode.size)
        cells.append((stat_module.filemode(inode.mode), str(inode.nlink), user_name(inode.uid),
                      group_name(inode.gid), size, ls_time(inode.mtime_ns, now), name, target))
    if not cells:
        return []
    widths = [max(len(cell[i]) for cell in cells) for i in range(5)]
    lines = []
    for mode, nlink, user, group, size, when, name, target in cells:
        head = (f"{mode} {nlink:>{widths[1]}} {user:<{widths[2]}} {group:<{widths[3]}} "
                f"{size:>{widths[4]}} {when} ")
        line = head.encode() + name
        if target is not None:
            line += b" -> " + target
        lines.append(line)
    return lines


def stat_object(path: bytes, inode, target: bytes | None, xattr_names: list[bytes]) -> dict:
    """Return the JSON object stat --json prints for one inode."""
    return {
        "path": path.decode("utf-8", "surrogateescape"),
        "type": TYPE_NAMES.get(stat_module.S_IFMT(inode.mode), "unknown"),
        "ino": inode.ino,
        "mode": inode.mode,
        "nlink": inode.nlink,
        "uid": inode.uid,
        "gid": inode.gid,
        "rdev": inode.rdev,
        "size": inode.size,
        "blocks": blocks_512(inode),
        "generation": inode.generation,
        "atime_ns": inode.atime_ns,
        "mtime_ns": inode.mtime_ns,
        "ctime_ns": inode.ctime_ns,
        "birth_ns": inode.otime_ns,
        "target": None if target is None else target.decode("utf-8", "surrogateescape"),
        "xattrs": [name.decode("utf-8", "surrogateescape") for name in xattr_names],
    }


def stat_text(display: bytes, inode, target: bytes | None, block_size: int) -> bytes:
    """Return stat's text for one inode, laid out like coreutils stat."""
    kind = STAT_TYPE_NAMES.get(stat_module.S_IFMT(inode.mode), "unknown")
    if kind == "regular file" and inode.size == 0:
        kind = "regular empty file"
    head = b"  File: " + display
    if target is not None:
        head += b" -> " + target
    mode = inode.mode
    lines = [
        f"  Size: {inode.size:<10}\tBlocks: {blocks_512(inode):<10} IO Block: {block_size:<6} {kind}",
        f" Inode: {inode.ino:<11} Links: {inode.nlink}",
        f"Access: ({mode & 0o7777:04o}/{stat_module.filemode(mode)})  "
        f"Uid: ({inode.uid:>5}/{user_name(inode.uid):>8})   Gid: ({inode.gid:>5}/{group_name(inode.gid):>8})",
        f"Access: {full_time(inode.atime_ns)}",
        f"Modify: {full_time(inode.mtime_ns)}",
        f"Change: {full_time(inode.ctime_ns)}",
        f" Birth: {full_time(inode.otime_ns)}",
    ]
    return head + b"\n" + "\n".join(lines).encode() + b"\n"


def space_object(path: str, volume, host_free: int | None) -> dict:
    """Return df's numbers for an open volume.

    With a size limit, free space is what the limit leaves after the used
    bytes, the superblock area and the reserve kept for deletions.  Without
    one it is the free space inside the image plus what the host filesystem
    has free (host_free).  Both are estimates: new metadata takes some of it.
    """
    sb = volume.sb
    used = sb.bytes_used
    limit = sb.size_limit
    inside = max(0, sb.image_bytes - ondisk.FIRST_ALLOC - used)
    if limit:
        free = max(0, limit - volume.reserve - ondisk.FIRST_ALLOC - used)
    else:
        free = inside + (host_free or 0)
    return {
        "image": path,
        "size_limit": limit,
        "image_bytes": sb.image_bytes,
        "file_bytes": volume.dev.size(),
        "used_bytes": used,
        "free_bytes": free,
        "free_inside_bytes": inside,
        "reserve_bytes": volume.reserve,
        "base_bytes": sum(base.sb.bytes_used for base in volume.layers[1:]),
    }


def space_text(obj: dict) -> str:
    limit = obj["size_limit"]
    used = obj["used_bytes"]
    free = obj["free_bytes"]
    percent = 100 * used // (used + free) if used + free else 0
    lines = [
        f"image: {obj['image']}",
        f"size limit: {human_size(limit) if limit else 'none (grows while the host has space)'}",
        f"used: {human_size(used)}",
        f"free: {human_size(free)}",
        f"use: {percent}%",
        f"image file: {human_size(obj['file_bytes'])}",
    ]
    if obj.get("base_bytes"):
        lines.append(f"read from base images: {human_size(obj['base_bytes'])}")
    return "\n".join(lines) + "\n"


def info_object(path: str, volume) -> dict:
    """Return what info prints: superblock fields, the copies, and every tree's root."""
    sb = volume.sb
    scan = getattr(volume, "superblock_scan", None)
    copies = []
    if scan is not None:
        for index, copy in enumerate(scan.copies):
            entry = {"copy": index, "offset": ondisk.SUPERBLOCK_OFFSETS[index]}
            if isinstance(copy, Exception):
                entry["error"] = str(copy)
            else:
                entry["generation"] = copy.generation
            copies.append(entry)
    trees = []
    for name, tree in (("root tree", volume.root_tree), ("extent tree", volume.extent_tree)):
        trees.append({"name": name, "id": tree.tree_id, "root": tree.root_ptr[0], "generation": tree.root_ptr[1],
                      "level": tree.level})
    for tree_id in volume.subvolume_ids():
        tree = volume.tree(tree_id)
        item = tree.root_item
        trees.append({"name": f"subvolume {tree_id}", "id": tree_id, "root": item.root_addr,
                      "root_layer": item.root_layer,
                      "generation": item.root_gen, "level": item.level, "next_ino": item.next_ino,
                      "last_snapshot": item.last_snapshot, "flags": item.flags})
    return {
        "image": path,
        "uuid": str(uuid_module.UUID(bytes=bytes(sb.uuid))),
        "label": sb.label.decode("utf-8", "replace"),
        "version": sb.version,
        "generation": sb.generation,
        "superblock_copy": sb.copy_index,
        "superblock_offset": ondisk.SUPERBLOCK_OFFSETS[sb.copy_index] if sb.copy_index >= 0 else None,
        "superblock_copies": copies,
        "node_size": sb.nodesize,
        "block_size": sb.blocksize,
        "size_limit": sb.size_limit,
        "image_bytes": sb.image_bytes,
        "bytes_used": sb.bytes_used,
        "file_bytes": volume.dev.size(),
        "created_ns": sb.created_ns,
        "compat_flags": sb.compat_flags,
        "ro_compat_flags": sb.ro_compat_flags,
        "incompat_flags": sb.incompat_flags,
        "trees": trees,
        "chain": [layer_object(depth, layer.path, layer) for depth, layer in enumerate(volume.layers)],
    }


def layer_object(depth: int, path: str, volume) -> dict:
    """Return the entry of info --chain for an image that opened: depth 0 is the top."""
    return {"depth": depth, "image": path, "uuid": str(uuid_module.UUID(bytes=bytes(volume.uuid))),
            "generation": volume.generation, "image_bytes": volume.sb.image_bytes,
            "bytes_used": volume.sb.bytes_used}


def broken_layer_object(depth: int, path: str, uuid: bytes, generation: int, reason: str) -> dict:
    """Return the entry of info --chain for a base that cannot be used: what the layer above expects, and why."""
    return {"depth": depth, "image": path, "uuid": str(uuid_module.UUID(bytes=uuid)), "generation": generation,
            "error": reason}


def info_text(obj: dict) -> str:
    limit = obj["size_limit"]
    lines = [
        f"image: {obj['image']}",
        f"uuid: {obj['uuid']}",
        f"label: {obj['label']}",
        f"format version: {obj['version']}",
        f"generation: {obj['generation']}",
        f"superblock copy in use: {obj['superblock_copy']} (offset {obj['superblock_offset']})",
    ]
    for copy in obj["superblock_copies"]:
        state = f"generation {copy['generation']}" if "generation" in copy else f"invalid: {copy['error']}"
        lines.append(f"superblock copy {copy['copy']}: {state}")
    lines += [
        f"node size: {obj['node_size']}",
        f"block size: {obj['block_size']}",
        f"size limit: {f'{limit} ({human_size(limit)})' if limit else 'none'}",
        f"image bytes: {obj['image_bytes']} ({human_size(obj['image_bytes'])})",
        f"bytes used: {obj['bytes_used']} ({human_size(obj['bytes_used'])})",
        f"file bytes: {obj['file_bytes']}",
        f"created: {full_time(obj['created_ns'])}",
        f"flags: compat {obj['compat_flags']:#x}, ro_compat {obj['ro_compat_flags']:#x}, "
        f"incompat {obj['incompat_flags']:#x}",
    ]
    for tree in obj["trees"]:
        text = f"{tree['name']}: root block {tree['root']}, generation {tree['generation']}, level {tree['level']}"
        if tree.get("root_layer"):
            text += f" in base layer {tree['root_layer']}"
        if "next_ino" in tree:
            text += f", next inode {tree['next_ino']}, last snapshot generation {tree['last_snapshot']}"
        lines.append(text)
    return "\n".join(lines) + "\n"


def chain_text(obj: dict) -> str:
    """Return the chain of base images below an image, one line each, top first."""
    lines = []
    for layer in obj["chain"]:
        if "error" in layer:
            lines.append(f"layer {layer['depth']}: {layer['image']} expected uuid {layer['uuid']} generation "
                         f"{layer['generation']}: base image {layer['error']}")
            continue
        lines.append(f"layer {layer['depth']}: {layer['image']} uuid {layer['uuid']} generation "
                     f"{layer['generation']} image bytes {layer['image_bytes']} used {layer['bytes_used']} "
                     f"({human_size(layer['bytes_used'])})")
    return "\n".join(lines) + "\n"
