"""CRC32C: the fast implementation against crcmod's, the reference."""

from __future__ import annotations

from hypothesis import given, strategies as st

from cowtree import checksum


def test_known_check_value():
    # The standard check value of CRC-32C for the ASCII digits 1 to 9.
    assert checksum.crc32c(b"123456789") == 0xE3069283
    assert checksum.crcmod_crc32c(b"123456789") == 0xE3069283


@given(st.binary(max_size=9000))
def test_fast_equals_crcmod(data):
    assert checksum.crc32c(data) == checksum.crcmod_crc32c(data)


@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_continuation_equals_whole(first, second):
    """Checksumming in two parts, continuing from the first result, equals one pass."""
    whole = checksum.crcmod_crc32c(first + second)
    assert checksum.crc32c(second, checksum.crc32c(first)) == whole
    assert checksum.crcmod_crc32c(second, checksum.crcmod_crc32c(first)) == whole


def test_memoryview_accepted():
    block = bytes(range(256)) * 16
    assert checksum.crc32c(memoryview(block)[100:200]) == checksum.crcmod_crc32c(block[100:200])
