"""On-disk structures of a cowtree image, in one place.

Every structure is defined once as a construct ``Struct``; that definition is
the format.  Hot paths use ``struct.Struct`` codecs generated from the same
definitions by :func:`codec`, because a construct parse costs tens of
microseconds and a ``struct`` unpack well under one.  ``spec/format.md``
contains the offset tables, and a test checks them against these definitions.

All integers are little-endian.  Offsets and sizes are in bytes.
"""

from __future__ import annotations

import struct

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64sl, Int64ul, Padding, Struct

# ---------------------------------------------------------------------------
# Constants

MAGIC = b"CoWtRee\x00"
VERSION = 1

BLOCK_SIZE = 4096            # data blocks, allocation unit, superblock size
DEFAULT_NODE_SIZE = 16384
MIN_NODE_SIZE = 4096
MAX_NODE_SIZE = 65536

# Two superblock copies: generation N is written to copy N % 2, so a torn
# write of the newest copy leaves the previous generation intact in the other.
# They sit in the first two blocks, so an empty overlay image stays small.
SUPERBLOCK_OFFSETS = (0, 4096)
# Nothing is allocated below this address: it holds the superblock copies.
FIRST_ALLOC = 8192

NODE_MAGIC = 0x444E5443      # "CTND" read as little-endian bytes

# Incompatible feature flags: an image with an unknown bit set is refused.
INCOMPAT_LAYERS = 1 << 0     # block pointers may name a base image (layer > 0)
INCOMPAT_KNOWN = INCOMPAT_LAYERS
# Read-only-compatible flags: unknown bits allow opening read-only.
RO_COMPAT_PREALLOC = 1 << 0  # inodes may have INODE_PREALLOC: file extents past the size
RO_COMPAT_KNOWN = RO_COMPAT_PREALLOC
# Compatible flags: unknown bits are ignored.
COMPAT_SUBVOL_UUID = 1 << 0  # the root tree may contain SUBVOL_UUID items
COMPAT_KNOWN = COMPAT_SUBVOL_UUID

# Tree ids (the ``owner`` of a node).  Subvolume trees take ids from 256 on.
ROOT_TREE_ID = 1
EXTENT_TREE_ID = 2
FS_TREE_ID = 5               # the live filesystem, the first subvolume
FIRST_SUBVOL_ID = 256

# Item types, the middle part of a key.  Values follow Btrfs where the
# meaning matches, which keeps dumps readable for people who know Btrfs.
INODE_ITEM = 1
INODE_REF = 12
XATTR_ITEM = 24
ORPHAN_ITEM = 48
DIR_ITEM = 84
DIR_INDEX = 96
EXTENT_DATA = 108
ROOT_ITEM = 132
ROOT_NAME = 136
SUBVOL_UUID = 140
EXTENT_ITEM = 168
CHUNK_ITEM = 192
LAYER_ITEM = 200

ITEM_TYPE_NAMES = {
    INODE_ITEM: "INODE_ITEM", INODE_REF: "INODE_REF", XATTR_ITEM: "XATTR_ITEM",
    ORPHAN_ITEM: "ORPHAN_ITEM", DIR_ITEM: "DIR_ITEM", DIR_INDEX: "DIR_INDEX",
    EXTENT_DATA: "EXTENT_DATA", ROOT_ITEM: "ROOT_ITEM", ROOT_NAME: "ROOT_NAME", SUBVOL_UUID: "SUBVOL_UUID",
    EXTENT_ITEM: "EXTENT_ITEM", CHUNK_ITEM: "CHUNK_ITEM", LAYER_ITEM: "LAYER_ITEM",
}

# Object ids with a fixed meaning inside a filesystem tree.
ROOT_DIR_INO = 256           # the root directory of every subvolume
FIRST_FREE_INO = 257
ORPHAN_OBJECTID = 0xFFFFFFFFFFFFFFFB  # key (ORPHAN_OBJECTID, ORPHAN_ITEM, ino)
# Object id of the CHUNK_ITEMs in the root tree: key (CHUNK_OBJECTID, CHUNK_ITEM, chunk start).
CHUNK_OBJECTID = 0xFFFFFFFFFFFFFFF0

# Free space is tracked per chunk of this many bytes of address space.
CHUNK_SIZE = 32 << 20

MAX_KEY = (0xFFFFFFFFFFFFFFFF, 0xFF, 0xFFFFFFFFFFFFFFFF)
MIN_KEY = (0, 0, 0)

NAME_MAX = 255
SYMLINK_MAX = 4095

# ---------------------------------------------------------------------------
# Superblock
#
# One 4 KiB block at each offset in SUPERBLOCK_OFFSETS.  The magic and the
# version are the first two fields in every version.  ``csum`` is the CRC32C
# of bytes [0, 12) followed by [16, 4096), that is the whole block without
# the checksum field.  On open, every copy is read; the copies whose magic
# and checksum are valid compete and the highest generation wins.
#
# Invariants: nodesize is a power of two in [4096, 65536]; blocksize is 4096;
# image_bytes <= the file's size (a shorter file is truncated and refused);
# when size_limit is not zero, image_bytes <= size_limit.
SUPERBLOCK = Struct(
    "magic" / Bytes(8),
    "version" / Int32ul,
    "csum" / Int32ul,
    "uuid" / Bytes(16),
    "generation" / Int64ul,
    "nodesize" / Int32ul,
    "blocksize" / Int32ul,
    "compat_flags" / Int64ul,
    "ro_compat_flags" / Int64ul,
    "incompat_flags" / Int64ul,
    "size_limit" / Int64ul,
    "image_bytes" / Int64ul,
    "bytes_used" / Int64ul,
    "root_tree_addr" / Int64ul,
    "root_tree_gen" / Int64ul,
    "extent_tree_addr" / Int64ul,
    "extent_tree_gen" / Int64ul,
    "root_tree_level" / Int8ul,
    "extent_tree_level" / Int8ul,
    "reserved1" / Padding(6),
    "created_ns" / Int64sl,
    "label" / Bytes(64),
)
SUPERBLOCK_CSUM_OFFSET = 12

# ---------------------------------------------------------------------------
# Node header
#
# Every tree node starts with this header and fills exactly ``nodesize``
# bytes.  ``csum`` is the CRC32C of bytes [4, nodesize).  ``bytenr`` is the
# node's own address and ``generation`` the transaction that wrote it; the
# block pointer in the parent records both, and a read checks that they
# match.  ``uuid`` is the image's, so a node copied from another image is
# rejected.  Level 0 is a leaf.
#
#   flags: bit 0..7 reserved, always 0.
NODE_HEADER = Struct(
    "csum" / Int32ul,
    "magic" / Int32ul,
    "uuid" / Bytes(16),
    "bytenr" / Int64ul,
    "generation" / Int64ul,
    "owner" / Int64ul,
    "nritems" / Int32ul,
    "level" / Int8ul,
    "flags" / Int8ul,
    "reserved" / Padding(10),
)

# A key orders every item in a tree: by objectid, then type, then offset.
KEY = Struct(
    "objectid" / Int64ul,
    "type" / Int8ul,
    "offset" / Int64ul,
)

# Leaf item header.  Headers follow the node header in key order; the item
# data sit at the end of the node, the first item's data last, so headers
# grow forward and data backward.  ``data_offset`` counts from the end of the
# node header.  Invariant: the data of all items are disjoint and lie after
# the last header.
LEAF_ITEM = Struct(
    "objectid" / Int64ul,
    "type" / Int8ul,
    "offset" / Int64ul,
    "data_offset" / Int32ul,
    "data_size" / Int32ul,
)

# Internal node entry: the first key of the child's range, and a block
# pointer to the child.  ``layer`` 0 is this image; layer n > 0 is the n-th
# base image down the chain (used only with INCOMPAT_LAYERS).
KEY_PTR = Struct(
    "objectid" / Int64ul,
    "type" / Int8ul,
    "offset" / Int64ul,
    "blockptr" / Int64ul,
    "generation" / Int64ul,
    "layer" / Int16ul,
)

# ---------------------------------------------------------------------------
# Items of the root tree

# ROOT_ITEM, key (tree id, ROOT_ITEM, 0): where a subvolume's tree lives.
#
#   flags: bit 0 READONLY, bit 1 DELETING (drop in progress); others 0.
#
# ``last_snapshot`` is the generation of the newest snapshot taken of this
# subvolume (or of the snapshot's own creation); a node with a greater
# generation is reachable from this tree only, so copy-on-write skips the
# reference count look-up for it.  ``drop_*`` record how far a deletion got.
ROOT_ITEM_S = Struct(
    "root_addr" / Int64ul,
    "root_gen" / Int64ul,
    "root_layer" / Int16ul,
    "level" / Int8ul,
    "reserved1" / Padding(5),
    "flags" / Int64ul,
    "generation" / Int64ul,
    "last_snapshot" / Int64ul,
    "parent_id" / Int64ul,
    "created_gen" / Int64ul,
    "created_ns" / Int64sl,
    "next_ino" / Int64ul,
    "drop_objectid" / Int64ul,
    "drop_type" / Int8ul,
    "drop_offset" / Int64ul,
    "drop_level" / Int8ul,
    "reserved2" / Padding(6),
)
ROOT_READONLY = 1
ROOT_DELETING = 2

# ROOT_NAME, key (tree id, ROOT_NAME, 0): the subvolume's name as raw bytes.

# SUBVOL_UUID, key (tree id, SUBVOL_UUID, 0): the identity of a subvolume,
# for send and receive.  Optional: a subvolume made before the item existed has none,
# and its UUID is derived from the image UUID and its ROOT_ITEM instead
# (cowtree.subvolume.derived_uuid).  ``received_uuid`` is all zeros unless
# ``cowtree receive`` made the subvolume.  Then it is the UUID of the sent
# snapshot, ``sent_gen`` that snapshot's generation in the sending image,
# and ``received_gen`` the transaction that received it here.
#
# Invariants: ``uuid`` is not all zeros, and no other subvolume of the image
# has it.  A subvolume with a non-zero ``received_uuid`` is read-only, and no
# other subvolume has the same one.  ``sent_gen`` and ``received_gen`` are 0
# when ``received_uuid`` is zero.
SUBVOL_UUID_S = Struct(
    "uuid" / Bytes(16),
    "parent_uuid" / Bytes(16),
    "received_uuid" / Bytes(16),
    "sent_gen" / Int64ul,
    "received_gen" / Int64ul,
)

# LAYER_ITEM, key (0, LAYER_ITEM, 1): the overlay's direct base image.  Only
# offset 1 is used: a deeper base is found through each base's own
# LAYER_ITEM.  The path follows the fixed part, relative to the overlay's
# directory unless it is absolute.
LAYER_ITEM_S = Struct(
    "uuid" / Bytes(16),
    "generation" / Int64ul,
    "path_len" / Int16ul,
)

# CHUNK_ITEM, key (CHUNK_OBJECTID, CHUNK_ITEM, chunk start), in the root tree:
# the bytes of EXTENT_ITEMs that lie in the chunk [start, start + CHUNK_SIZE),
# an extent that crosses a chunk boundary counting in each chunk for its part.
# It lets the allocator skip full chunks without reading their extent items.
# A chunk without an item contains no extents.
CHUNK_ITEM_S = Struct(
    "used" / Int64ul,
)

# ---------------------------------------------------------------------------
# Items of the extent tree

# EXTENT_ITEM, key (address, EXTENT_ITEM, length): one allocated node or data
# extent and its reference count, the number of block pointers and file
# extent items that point to it.  A data extent's item is followed by one
# CRC32C (u32) per 4 KiB block of the extent; data checksums live here, by
# disk address, so reflinks and snapshots share them.
#
#   flags: bit 0 DATA, bit 1 TREE_BLOCK; exactly one is set.
EXTENT_ITEM_S = Struct(
    "refs" / Int64ul,
    "generation" / Int64ul,
    "flags" / Int64ul,
    "owner" / Int64ul,
)
EXTENT_FLAG_DATA = 1
EXTENT_FLAG_TREE_BLOCK = 2

# ---------------------------------------------------------------------------
# Items of a filesystem tree

# INODE_ITEM, key (ino, INODE_ITEM, 0).  Times are nanoseconds since the
# epoch.  ``nbytes`` counts the bytes of blocks the file's extents cover,
# for st_blocks.  ``seq`` is the next DIR_INDEX offset of a directory.
#
#   flags: bit 0 PREALLOC (file extents may lie past the size, allocated by
#   fallocate with FALLOC_FL_KEEP_SIZE); others 0.
INODE_ITEM_S = Struct(
    "generation" / Int64ul,
    "size" / Int64ul,
    "nbytes" / Int64ul,
    "nlink" / Int32ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "mode" / Int32ul,
    "rdev" / Int64ul,
    "flags" / Int64ul,
    "seq" / Int64ul,
    "atime_ns" / Int64sl,
    "mtime_ns" / Int64sl,
    "ctime_ns" / Int64sl,
    "otime_ns" / Int64sl,
)

INODE_PREALLOC = 1

# INODE_REF, key (ino, INODE_REF, parent ino): one entry per name the inode
# has in that parent, each the fixed part below and then the name.
INODE_REF_ENTRY = Struct(
    "index" / Int64ul,
    "name_len" / Int16ul,
)

# DIR_ITEM, key (dir ino, DIR_ITEM, name hash): entries whose names hash to
# the same value, each the fixed part and then the name; used for look-up.
# DIR_INDEX, key (dir ino, DIR_INDEX, sequence): one entry, in creation
# order; used for readdir, whose offsets stay valid while the directory
# changes.
DIR_ENTRY = Struct(
    "ino" / Int64ul,
    "type" / Int8ul,
    "name_len" / Int16ul,
)

# XATTR_ITEM, key (ino, XATTR_ITEM, name hash): entries whose names hash to
# the same value, each the fixed part, the name and the value.
XATTR_ENTRY = Struct(
    "name_len" / Int16ul,
    "value_len" / Int16ul,
)

# EXTENT_DATA, key (ino, EXTENT_DATA, file offset).  ``kind`` 0 is inline:
# the file's bytes follow the fixed part (only at offset 0, for small files
# and symlink targets).  ``kind`` 1 is regular: ``num_bytes`` bytes of the
# file, block aligned, read from ``disk_addr + extent_offset`` in the data
# extent (disk_addr, disk_len) of layer ``layer``.  Holes have no item.
FILE_EXTENT_HEAD = Struct(
    "generation" / Int64ul,
    "kind" / Int8ul,
)
FILE_EXTENT_REG = Struct(
    "disk_addr" / Int64ul,
    "disk_len" / Int64ul,
    "extent_offset" / Int64ul,
    "num_bytes" / Int64ul,
    "layer" / Int16ul,
)
FILE_EXTENT_INLINE = 0
FILE_EXTENT_REGULAR = 1

# Directory entry types, as in <dirent.h>.
DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12


# ---------------------------------------------------------------------------
# struct codecs generated from the construct definitions

_FORMAT_CODES = {
    "FormatField": None,  # Int8ul etc.: the fmtstr attribute
}


def struct_format(definition: Struct) -> str:
    """Return the ``struct`` format string equivalent to a flat construct Struct."""
    parts = ["<"]
    for sub in definition.subcons:
        inner = getattr(sub, "subcon", sub)
        name = type(inner).__name__
        if name == "FormatField":
            parts.append(inner.fmtstr.lstrip("<>=!"))
        elif name == "BytesInteger":  # pragma: no cover - not used
            raise TypeError("BytesInteger has no struct equivalent")
        elif name == "Bytes":
            parts.append(f"{inner.length}s")
        elif name == "Padded" or name == "Padding":
            parts.append(f"{inner.length}x")
        else:
            # construct.Padding is Padded(n, Pass)
            length = getattr(inner, "length", None)
            if length is None:
                raise TypeError(f"unsupported construct type {name}")
            parts.append(f"{length}x")
    return "".join(parts)


def codec(definition: Struct) -> struct.Struct:
    """Return a ``struct.Struct`` that packs and unpacks the same bytes as definition."""
    codec_struct = struct.Struct(struct_format(definition))
    assert codec_struct.size == definition.sizeof()
    return codec_struct


def field_names(definition: Struct) -> list[str]:
    """Return the names of the fields that carry values (padding excluded)."""
    return [sub.name for sub in definition.subcons if type(getattr(sub, "subcon", sub)).__name__ in ("FormatField", "Bytes")]


SUPERBLOCK_CODEC = codec(SUPERBLOCK)
NODE_HEADER_CODEC = codec(NODE_HEADER)
LEAF_ITEM_CODEC = codec(LEAF_ITEM)
KEY_PTR_CODEC = codec(KEY_PTR)
KEY_CODEC = codec(KEY)
ROOT_ITEM_CODEC = codec(ROOT_ITEM_S)
CHUNK_ITEM_CODEC = codec(CHUNK_ITEM_S)
SUBVOL_UUID_CODEC = codec(SUBVOL_UUID_S)
LAYER_ITEM_CODEC = codec(LAYER_ITEM_S)
EXTENT_ITEM_CODEC = codec(EXTENT_ITEM_S)
INODE_ITEM_CODEC = codec(INODE_ITEM_S)
INODE_REF_CODEC = codec(INODE_REF_ENTRY)
DIR_ENTRY_CODEC = codec(DIR_ENTRY)
XATTR_ENTRY_CODEC = codec(XATTR_ENTRY)
FILE_EXTENT_HEAD_CODEC = codec(FILE_EXTENT_HEAD)
FILE_EXTENT_REG_CODEC = codec(FILE_EXTENT_REG)

HEADER_SIZE = NODE_HEADER_CODEC.size
LEAF_ITEM_SIZE = LEAF_ITEM_CODEC.size
KEY_PTR_SIZE = KEY_PTR_CODEC.size


def max_item_size(nodesize: int) -> int:
    """Return the largest item data a leaf of this node size accepts.

    A quarter of a leaf, so that splitting a full leaf in two always leaves
    room for one more item in either half.
    """
    return (nodesize - HEADER_SIZE) // 4 - LEAF_ITEM_SIZE


def max_data_extent_blocks(nodesize: int) -> int:
    """Return how many 4 KiB blocks one data extent may span.

    Its checksums must fit in one extent item; the cap of 1024 blocks (4 MiB)
    also bounds the space a partly overwritten extent keeps allocated.
    """
    fit = (max_item_size(nodesize) - EXTENT_ITEM_CODEC.size) // 4
    return max(1, min(1024, fit))


def inline_max(nodesize: int) -> int:
    """Return the largest file stored inline in its leaf."""
    return min(max_item_size(nodesize) - FILE_EXTENT_HEAD_CODEC.size, 2048 if nodesize <= 4096 else 4095)
