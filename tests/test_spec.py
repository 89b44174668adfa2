"""Check spec/format.md against cowtree/ondisk.py, and spec/stream.md against
cowtree/stream.py, so the specs cannot drift.

Each table in a spec follows an HTML comment that names what it documents:
``<!-- struct: NAME -->`` for the construct Struct ``NAME`` of the module,
``<!-- flags: NAME.field -->`` for the bits of a flags word,
``<!-- item-types -->``, ``<!-- record-types -->``, ``<!-- constants -->``,
``<!-- limits -->`` and ``<!-- name-hash -->``.
"""

from __future__ import annotations

import ast
import pathlib
import re

import construct
import pytest

from cowtree import ondisk, stream
from cowtree.checksum import crc32c, crcmod_crc32c
from cowtree.fs import name_hash

SPEC = pathlib.Path(__file__).resolve().parent.parent / "spec" / "format.md"
STREAM_SPEC = SPEC.parent / "stream.md"
ONDISK_SOURCE = pathlib.Path(ondisk.__file__).read_text()

MARKER = re.compile(r"<!--\s*([a-z-]+)(?::\s*([A-Za-z0-9_.]+))?\s*-->")

# construct FormatField format strings and the type names the spec uses for them.
INT_TYPES = {"<B": "u8", "<H": "u16", "<L": "u32", "<I": "u32", "<Q": "u64", "<q": "s64"}


def spec_text(path: pathlib.Path = SPEC) -> str:
    return path.read_text()


def tables(path: pathlib.Path = SPEC) -> dict[tuple[str, str | None], list[list[str]]]:
    """Return every marked table of a spec: (kind, name) -> data rows as lists of cells."""
    lines = spec_text(path).splitlines()
    found: dict[tuple[str, str | None], list[list[str]]] = {}
    for number, line in enumerate(lines):
        match = MARKER.fullmatch(line.strip())
        if match is None:
            continue
        rows = []
        position = number + 1
        while position < len(lines) and lines[position].startswith("|"):
            cells = [cell.strip() for cell in lines[position].strip().strip("|").split("|")]
            rows.append(cells)
            position += 1
        assert len(rows) >= 2, f"{path.name} line {number + 1}: marker {line.strip()} is not followed by a table"
        key = (match.group(1), match.group(2))
        assert key not in found, f"{path.name}: marker {line.strip()} appears twice"
        found[key] = rows[2:]  # skip the header row and the |---| row
    return found


def structs_of(module) -> dict[str, construct.Struct]:
    return {name: value for name, value in vars(module).items() if isinstance(value, construct.Struct)}


def ondisk_structs() -> dict[str, construct.Struct]:
    return structs_of(ondisk)


def unquote(cell: str) -> str:
    return cell.strip("`").replace("**", "")


def construct_type(sub) -> str:
    """Return the spec's type name for one field of a flat construct Struct."""
    inner = getattr(sub, "subcon", sub)
    kind = type(inner).__name__
    if kind == "FormatField":
        return INT_TYPES[inner.fmtstr]
    if kind == "Bytes":
        return f"bytes[{inner.length}]"
    if kind == "Padded":
        return f"pad[{inner.length}]"
    raise AssertionError(f"field {sub.name}: construct type {kind} has no spec type name")


# ---------------------------------------------------------------------------
# Offset tables


def test_every_struct_has_table():
    documented = {name for kind, name in tables() if kind == "struct"}
    defined = set(ondisk_structs())
    assert defined - documented == set(), "construct Structs in ondisk.py without an offset table in spec/format.md"
    assert documented - defined == set(), "offset tables in spec/format.md for Structs that ondisk.py lacks"


@pytest.mark.parametrize("name", sorted(ondisk_structs()))
def test_offset_table_matches_struct(name):
    rows = tables().get(("struct", name))
    assert rows is not None, f"spec/format.md has no <!-- struct: {name} --> table"
    check_offset_table(name, ondisk_structs()[name], rows)


def check_offset_table(name: str, definition: construct.Struct, rows: list) -> None:
    """Assert that an offset table's rows give the fields, offsets, sizes and types of definition."""
    *fields, total = rows

    assert unquote(total[3]) == "total", f"{name}: the last row of the table must be the total row"
    assert int(total[1]) == definition.sizeof(), f"{name}: total size"

    spec_names = [unquote(row[3]) for row in fields]
    code_names = [sub.name for sub in definition.subcons]
    assert spec_names == code_names, f"{name}: field names and order"

    offset = 0
    for row, sub in zip(fields, definition.subcons):
        assert int(row[0]) == offset, f"{name}.{sub.name}: offset"
        assert int(row[1]) == sub.sizeof(), f"{name}.{sub.name}: size"
        assert row[2] == construct_type(sub), f"{name}.{sub.name}: type"
        assert row[4], f"{name}.{sub.name}: empty description"
        offset += sub.sizeof()
    assert offset == definition.sizeof(), f"{name}: field sizes do not add up to sizeof()"


def test_superblock_fits_its_block():
    assert ondisk.SUPERBLOCK.sizeof() <= ondisk.BLOCK_SIZE
    assert f"first {ondisk.SUPERBLOCK.sizeof()} bytes of a 4096-byte block" in " ".join(spec_text().split())


def test_superblock_magic_and_version_first():
    names = [sub.name for sub in ondisk.SUPERBLOCK.subcons]
    assert names[:2] == ["magic", "version"]


def test_superblock_csum_offset():
    offset = 0
    for sub in ondisk.SUPERBLOCK.subcons:
        if sub.name == "csum":
            break
        offset += sub.sizeof()
    assert offset == ondisk.SUPERBLOCK_CSUM_OFFSET


# ---------------------------------------------------------------------------
# Item types, constants and flags


def item_type_constants() -> dict[str, int]:
    """Return the item type constants assigned in ondisk.py's "Item types" block."""
    start = ONDISK_SOURCE.index("# Item types")
    end = ONDISK_SOURCE.index("ITEM_TYPE_NAMES", start)
    block = ONDISK_SOURCE[start:end]
    return {name: int(value) for name, value in re.findall(r"^([A-Z_]+) = (\d+)\s*$", block, re.MULTILINE)}


def test_item_type_block_matches_names():
    constants = item_type_constants()
    assert constants, "no item type constants found in ondisk.py"
    assert constants == {name: value for value, name in ondisk.ITEM_TYPE_NAMES.items()}


def test_item_type_table_matches_ondisk():
    rows = tables()[("item-types", None)]
    documented = {unquote(row[0]): int(row[1]) for row in rows}
    assert documented == item_type_constants(), "item type table in spec/format.md differs from ondisk.py"


def test_item_types_named_with_number():
    text = spec_text()
    for name, value in item_type_constants().items():
        assert re.search(rf"\|\s*{name}\s*\|\s*{value}\s*\|", text), f"{name} = {value} missing from spec/format.md"


def test_constants_table_matches_ondisk():
    rows = tables()[("constants", None)]
    assert rows
    for row in rows:
        name = unquote(row[0])
        value = ast.literal_eval(unquote(row[1]))
        assert hasattr(ondisk, name), f"spec/format.md documents {name}, which ondisk.py lacks"
        assert getattr(ondisk, name) == value, f"{name}: spec {value!r}, ondisk.py {getattr(ondisk, name)!r}"


@pytest.mark.parametrize("struct_name, field, prefix", [
    ("ROOT_ITEM_S", "flags", "ROOT_"),
    ("EXTENT_ITEM_S", "flags", "EXTENT_FLAG_"),
    ("SUPERBLOCK", "incompat_flags", "INCOMPAT_"),
    ("SUPERBLOCK", "ro_compat_flags", "RO_COMPAT_"),
    ("SUPERBLOCK", "compat_flags", "COMPAT_"),
    ("INODE_ITEM_S", "flags", "INODE_"),
])
def test_flag_table_matches_ondisk(struct_name, field, prefix):
    rows = tables()[("flags", f"{struct_name}.{field}")]
    documented = {unquote(row[1]): 1 << int(row[0]) for row in rows}
    for name, bit in documented.items():
        assert getattr(ondisk, name) == bit, f"{name}: spec bit {bit:#x}"
    defined = {name: value for name, value in vars(ondisk).items()
               if name.startswith(prefix) and isinstance(value, int) and not name.endswith("_KNOWN")
               and name not in item_type_constants() and name not in ("ROOT_TREE_ID", "ROOT_DIR_INO")}
    assert defined == documented, f"{struct_name}.{field}: flag constants in ondisk.py and the spec differ"


def test_known_feature_masks_documented():
    incompat = tables()[("flags", "SUPERBLOCK.incompat_flags")]
    mask = 0
    for row in incompat:
        mask |= 1 << int(row[0])
    assert mask == ondisk.INCOMPAT_KNOWN
    for field, known in (("ro_compat_flags", ondisk.RO_COMPAT_KNOWN), ("compat_flags", ondisk.COMPAT_KNOWN)):
        mask = 0
        for row in tables()[("flags", f"SUPERBLOCK.{field}")]:
            mask |= 1 << int(row[0])
        assert mask == known, field


# ---------------------------------------------------------------------------
# Limits


def test_limits_table_matches_ondisk():
    rows = tables()[("limits", None)]
    sizes = [int(row[0]) for row in rows]
    expected_sizes = []
    size = ondisk.MIN_NODE_SIZE
    while size <= ondisk.MAX_NODE_SIZE:
        expected_sizes.append(size)
        size *= 2
    assert sizes == expected_sizes
    header = ondisk.NODE_HEADER.sizeof()
    for row in rows:
        nodesize = int(row[0])
        assert int(row[1]) == ondisk.max_item_size(nodesize), f"nodesize {nodesize}: max item size"
        assert int(row[2]) == ondisk.inline_max(nodesize), f"nodesize {nodesize}: inline_max"
        assert int(row[3]) == ondisk.max_data_extent_blocks(nodesize), f"nodesize {nodesize}: max_data_blocks"
        assert int(row[4]) == (nodesize - header) // ondisk.LEAF_ITEM.sizeof(), f"nodesize {nodesize}: items"
        assert int(row[5]) == (nodesize - header) // ondisk.KEY_PTR.sizeof(), f"nodesize {nodesize}: pointers"


@pytest.mark.parametrize("nodesize", [4096, 8192, 16384, 32768, 65536])
def test_limit_formulas_in_spec(nodesize):
    """The formulas written in the limits section give the same numbers as ondisk.py."""
    header = ondisk.NODE_HEADER.sizeof()
    max_item = (nodesize - header) // 4 - ondisk.LEAF_ITEM.sizeof()
    assert max_item == ondisk.max_item_size(nodesize)
    assert min(max_item - 9, 2048 if nodesize == 4096 else 4095) == ondisk.inline_max(nodesize)
    assert min(1024, (max_item - 32) // 4) == ondisk.max_data_extent_blocks(nodesize)
    checksums = ondisk.max_data_extent_blocks(nodesize) * 4
    assert ondisk.EXTENT_ITEM_S.sizeof() + checksums <= max_item


# ---------------------------------------------------------------------------
# Checksums


def crc32c_bitwise(data: bytes, register: int = 0xFFFFFFFF) -> int:
    """Compute CRC32C bit by bit from the parameters the spec states."""
    for byte in data:
        register ^= byte
        for _ in range(8):
            register = (register >> 1) ^ (0x82F63B78 if register & 1 else 0)
    return register ^ 0xFFFFFFFF


def test_crc_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crcmod_crc32c(b"123456789") == 0xE3069283
    assert "0xe3069283" in spec_text()


def test_crc_parameters_match_implementation():
    samples = [b"", b"a", bytes(range(256)), b"\xff" * 4096]
    for sample in samples:
        assert crc32c_bitwise(sample) == crc32c(sample), f"CRC32C of {sample[:8]!r}..."


def test_name_hash_table():
    rows = tables()[("name-hash", None)]
    assert rows
    for row in rows:
        name = unquote(row[0]).encode()
        value = int(row[1], 16)
        assert name_hash(name) == value, f"name hash of {name!r}"
        assert crc32c_bitwise(name, register=0x00000001) == value, f"register form of the name hash of {name!r}"


# ---------------------------------------------------------------------------
# The send stream


def test_every_stream_struct_has_table():
    documented = {name for kind, name in tables(STREAM_SPEC) if kind == "struct"}
    defined = set(structs_of(stream))
    assert defined - documented == set(), "construct Structs in stream.py without an offset table in spec/stream.md"
    assert documented - defined == set(), "offset tables in spec/stream.md for Structs that stream.py lacks"


@pytest.mark.parametrize("name", sorted(structs_of(stream)))
def test_stream_offset_table_matches_struct(name):
    rows = tables(STREAM_SPEC).get(("struct", name))
    assert rows is not None, f"spec/stream.md has no <!-- struct: {name} --> table"
    check_offset_table(name, structs_of(stream)[name], rows)


def test_stream_header_magic_and_version_first():
    names = [sub.name for sub in stream.STREAM_HEADER.subcons]
    assert names[:2] == ["magic", "version"]
    assert len(stream.STREAM_MAGIC) == stream.STREAM_HEADER.subcons[0].sizeof()


def test_stream_record_types_match():
    rows = tables(STREAM_SPEC)[("record-types", None)]
    documented = {unquote(row[0]): int(row[1]) for row in rows}
    assert documented == {name: value for value, name in stream.RECORD_NAMES.items()}
    for name, value in documented.items():
        assert getattr(stream, f"RECORD_{name}") == value, name


def test_stream_constants_match():
    rows = tables(STREAM_SPEC)[("constants", None)]
    assert rows
    for row in rows:
        name = unquote(row[0])
        value = ast.literal_eval(unquote(row[1]))
        assert getattr(stream, name) == value, f"{name}: spec {value!r}, stream.py {getattr(stream, name)!r}"


def test_stream_header_flags_match():
    rows = tables(STREAM_SPEC)[("flags", "STREAM_HEADER.flags")]
    documented = {unquote(row[1]): 1 << int(row[0]) for row in rows}
    defined = {name: value for name, value in vars(stream).items()
               if name.startswith("STREAM_") and isinstance(value, int) and name not in ("STREAM_VERSION",)
               and not name.endswith("_KNOWN")}
    assert defined == documented
    mask = 0
    for bit in documented.values():
        mask |= bit
    assert mask == stream.STREAM_FLAGS_KNOWN
