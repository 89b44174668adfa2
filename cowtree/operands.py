"""Command-line operands: image locations, sizes, and the error that names
an operand.

This module imports nothing from the engine, so that the CLI can parse its
arguments before it loads anything heavy.

A path inside an image is written ``IMAGE:/path``, as scp and e2tools do,
and a path inside a snapshot ``IMAGE@NAME:/path``.  An argument counts as an
image location when the text before one of its colons names an existing
file (with or without an ``@NAME`` suffix), or, failing that, when the text
after its first colon is empty or starts with ``/``.  Any other argument is
a host path; write ``./a:b`` to name a host file whose name has a colon.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class ImagePath:
    """A location inside an image: the image file, a snapshot name, a path."""

    image: str                 # host path of the image file, as written
    snapshot: str | None       # snapshot name, or None for the live filesystem
    path: bytes                # path inside the image; b"/" for the root

    @property
    def image_text(self) -> str:
        """Return the image part as written: IMAGE or IMAGE@NAME."""
        if self.snapshot is None:
            return self.image
        return f"{self.image}@{self.snapshot}"

    def __str__(self) -> str:
        return f"{self.image_text}:{os.fsdecode(self.path)}"

    def join(self, name: bytes) -> "ImagePath":
        """Return the location of name inside this directory."""
        base = self.path if self.path.endswith(b"/") else self.path + b"/"
        return dataclasses.replace(self, path=base + name)


def _split_image(prefix: str, must_exist: bool) -> tuple[str, str | None] | None:
    """Split IMAGE or IMAGE@NAME into (image, snapshot name).

    With must_exist, return None unless the image file exists.
    """
    if os.path.isfile(prefix):
        return prefix, None
    image, at, name = prefix.rpartition("@")
    if at and image and name and (os.path.isfile(image) or not must_exist):
        return image, name
    if must_exist:
        return None
    return prefix, None


def parse_location(arg: str) -> ImagePath | None:
    """Return the image location that arg names, or None for a host path."""
    start = 0
    while True:
        colon = arg.find(":", start)
        if colon < 0:
            break
        if colon > 0:
            found = _split_image(arg[:colon], must_exist=True)
            if found is not None:
                return ImagePath(found[0], found[1], os.fsencode(arg[colon + 1:]) or b"/")
        start = colon + 1

    colon = arg.find(":")
    if colon > 0:
        rest = arg[colon + 1:]
        if not rest or rest.startswith("/"):
            image, snapshot = _split_image(arg[:colon], must_exist=False)
            return ImagePath(image, snapshot, os.fsencode(rest) or b"/")
    return None


def parse_image_operand(arg: str) -> ImagePath:
    """Return the location that arg names; a bare IMAGE means its root."""
    location = parse_location(arg)
    if location is not None:
        return location
    image, snapshot = _split_image(arg, must_exist=False)
    return ImagePath(image, snapshot, b"/")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """Return the bytes that a size such as 4096, 64K, 2G or 1TiB means.

    Suffixes are binary (K = 1024) and case-insensitive; ``B`` or ``iB`` may
    follow them.  Raise ValueError for anything else.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a whole number with an optional "
                         f"K, M, G or T suffix (powers of 1024)")
    return int(match.group(1)) << _SIZE_SHIFT[match.group(2).upper()]


class CommandError(Exception):
    """An operation on a named operand failed; the cause is an OSError or CowtreeError.

    The message reads ``action 'operand': reason`` ("cannot stat",
    "cannot remove"), or ``operand: reason`` without an action.  ``message``
    replaces the part before the reason; without a cause it is the whole text.
    """

    def __init__(self, action: str | None, operand: str, cause: BaseException | None = None,
                 message: str | None = None):
        self.action = action
        self.operand = operand
        self.cause = cause
        self.message = message
        super().__init__(message or f"{action} '{operand}'")

    def head(self) -> str:
        """Return the message without the reason: ``message``, ``action 'operand'`` or the operand."""
        if self.message is not None:
            return self.message
        if self.action is not None:
            return f"{self.action} '{self.operand}'"
        return self.operand
