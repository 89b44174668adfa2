"""Tree nodes in memory, and their encoding to and from ``nodesize`` bytes.

Every node read from disk passes :func:`decode`, the one place that checks a
node: checksum, magic, image UUID, its own address, the generation and level
its parent expects, item count, key order and item bounds.  A failure raises
:class:`~cowtree.errors.CorruptionError` naming the node and the reason.
"""

from __future__ import annotations

import struct
from itertools import accumulate, islice, repeat
from operator import lt, sub

from . import ondisk
from .checksum import crc32c
from .errors import CorruptionError

HEADER = ondisk.NODE_HEADER_CODEC
HEADER_SIZE = ondisk.HEADER_SIZE
ITEM = ondisk.LEAF_ITEM_CODEC
ITEM_SIZE = ondisk.LEAF_ITEM_SIZE
PTR = ondisk.KEY_PTR_CODEC
PTR_SIZE = ondisk.KEY_PTR_SIZE

# Views of the same bytes as PTR that skip fields, so that ``iter_unpack``
# returns key tuples and block pointer tuples directly instead of a Python
# loop taking each entry apart.  The formats are cut from the ondisk codec
# at the end of the key it starts with.
_KEY_FORMAT = ondisk.KEY_CODEC.format
_KEY_SIZE = ondisk.KEY_CODEC.size
if not PTR.format.startswith(_KEY_FORMAT):
    raise ImportError("key pointers must start with a key")
PTR_KEY = struct.Struct(f"{_KEY_FORMAT}{PTR_SIZE - _KEY_SIZE}x")
PTR_CHILD = struct.Struct(f"<{_KEY_SIZE}x{PTR.format[len(_KEY_FORMAT):]}")


class Node:
    """A decoded node.

    ``keys`` are (objectid, type, offset) tuples in ascending order.  In a
    leaf, ``vals`` holds each item's data as bytes and ``used`` counts the
    bytes the items take (headers and data).  In an internal node, ``vals``
    holds block pointers (address, generation, layer), and ``keys[i]`` is at
    most every key below ``vals[i]``.

    ``search`` speeds up point look-ups in nodes that are read again and
    again.  It is None for a node not yet searched, False after the first
    search, and from the second search on a list of the keys as integers,
    ``objectid << 72 | type << 64 | offset``, which order the same way as
    the tuples and compare faster.  Only :class:`~cowtree.btree.Tree` reads
    and sets it: it builds the list only for a node that is not dirty, and
    resets it to None whenever it makes a node writable.
    """

    __slots__ = ("addr", "gen", "layer", "level", "owner", "keys", "vals", "used", "dirty", "search")

    def __init__(self, addr: int, gen: int, level: int, owner: int, keys: list, vals: list, layer: int = 0):
        self.addr = addr
        self.gen = gen
        self.layer = layer
        self.level = level
        self.owner = owner
        self.keys = keys
        self.vals = vals
        self.dirty = False
        self.search = None
        if level == 0:
            self.used = ITEM_SIZE * len(keys) + sum(map(len, vals))
        else:
            self.used = PTR_SIZE * len(keys)

    @property
    def ptr(self) -> tuple:
        return (self.addr, self.gen, self.layer)

    def __repr__(self) -> str:
        return f"<Node {self.addr}@{self.layer} gen {self.gen} level {self.level} items {len(self.keys)}>"


def encode(node: Node, uuid: bytes, nodesize: int) -> bytes:
    """Return the on-disk bytes of node, checksum included.

    A leaf's item headers follow the node header in key order, and the data
    of item 0 ends at the end of the node, the data of item 1 right before
    it, and so on, with zeros between the last header and the lowest data.
    """
    buf = bytearray(nodesize)
    count = len(node.keys)
    capacity = nodesize - HEADER_SIZE
    if count and node.level == 0:
        vals = node.vals
        sizes = list(map(len, vals))
        total = sum(sizes)
        if count * ITEM_SIZE > capacity - total:
            raise ValueError(f"leaf {node.addr} overflows: {node.used} bytes of items")
        data_offsets = map(sub, repeat(capacity), accumulate(sizes))
        objectids, types, offsets = zip(*node.keys)
        headers = b"".join(map(ITEM.pack, objectids, types, offsets, data_offsets, sizes))
        buf[HEADER_SIZE:HEADER_SIZE + len(headers)] = headers
        buf[nodesize - total:] = b"".join(reversed(vals))
    elif count:
        if count * PTR_SIZE > capacity:
            raise ValueError(f"node {node.addr} overflows: {count} pointers")
        objectids, types, offsets = zip(*node.keys)
        addrs, gens, layers = zip(*node.vals)
        entries = b"".join(map(PTR.pack, objectids, types, offsets, addrs, gens, layers))
        buf[HEADER_SIZE:HEADER_SIZE + len(entries)] = entries
    HEADER.pack_into(buf, 0, 0, ondisk.NODE_MAGIC, uuid, node.addr, node.gen, node.owner, count, node.level, 0)
    buf[0:4] = crc32c(memoryview(buf)[4:]).to_bytes(4, "little")
    return bytes(buf)


def decode(buf: bytes, uuid: bytes, nodesize: int, addr: int, gen: int | None, level: int | None,
           layer: int = 0, tree: str = "") -> Node:
    """Decode and check a node read from ``addr``.

    ``gen`` and ``level`` are what the parent's block pointer expects; None
    skips that check (a root read from the superblock has no expected level).
    """
    where = f"at block {addr}"
    if tree:
        where += f" in {tree}"
    if layer:
        where += f" of layer {layer}"
    if len(buf) != nodesize:
        raise CorruptionError("node", where, "short read, past the end of the image", len(buf), nodesize)
    stored = int.from_bytes(buf[0:4], "little")
    computed = crc32c(memoryview(buf)[4:])
    if stored != computed:
        raise CorruptionError("node", where, "checksum mismatch", f"{stored:#010x}", f"{computed:#010x}")
    _, magic, node_uuid, bytenr, node_gen, owner, count, node_level, _flags = HEADER.unpack_from(buf)
    if magic != ondisk.NODE_MAGIC:
        raise CorruptionError("node", where, "bad magic", f"{magic:#x}", f"{ondisk.NODE_MAGIC:#x}")
    if node_uuid != uuid:
        raise CorruptionError("node", where, "node belongs to another image", node_uuid.hex(), uuid.hex())
    if bytenr != addr:
        raise CorruptionError("node", where, "wrong own address", bytenr, addr)
    if gen is not None and node_gen != gen:
        raise CorruptionError("node", where, "generation differs from the parent's pointer", node_gen, gen)
    if level is not None and node_level != level:
        raise CorruptionError("node", where, "wrong level", node_level, level)
    what = "leaf" if node_level == 0 else "node"
    capacity = nodesize - HEADER_SIZE
    if node_level == 0:
        if count * ITEM_SIZE > capacity:
            raise CorruptionError(what, where, "item count exceeds the leaf", count, f"at most {capacity // ITEM_SIZE}")
        keys = []
        vals = []
        base = HEADER_SIZE
        headers_end = count * ITEM_SIZE
        spans = []
        for slot, (objectid, typ, offset, data_offset, size) in enumerate(
                ITEM.iter_unpack(buf[HEADER_SIZE:HEADER_SIZE + headers_end])):
            if data_offset < headers_end or data_offset + size > capacity:
                raise CorruptionError(what, f"{where} slot {slot}", "item data out of bounds",
                                      f"{data_offset}+{size}", f"within [{headers_end}, {capacity}]")
            keys.append((objectid, typ, offset))
            vals.append(buf[base + data_offset:base + data_offset + size])
            spans.append((data_offset, size))
        spans.sort()
        for (off_a, size_a), (off_b, _) in zip(spans, spans[1:]):
            if off_a + size_a > off_b:
                raise CorruptionError(what, where, "item data overlap", f"{off_a}+{size_a}", f"end at most {off_b}")
    else:
        if count == 0:
            raise CorruptionError(what, where, "internal node without pointers", 0, "at least 1")
        if count * PTR_SIZE > capacity:
            raise CorruptionError(what, where, "pointer count exceeds the node", count, f"at most {capacity // PTR_SIZE}")
        entries = buf[HEADER_SIZE:HEADER_SIZE + count * PTR_SIZE]
        keys = list(PTR_KEY.iter_unpack(entries))
        vals = list(PTR_CHILD.iter_unpack(entries))
    if not all(map(lt, keys, islice(keys, 1, None))):
        for slot in range(1, len(keys)):
            if keys[slot - 1] >= keys[slot]:
                raise CorruptionError(what, f"{where} slot {slot}", "keys out of order", keys[slot],
                                      f"greater than {keys[slot - 1]}")
    node = Node(addr, node_gen, node_level, owner, keys, vals, layer)
    return node
