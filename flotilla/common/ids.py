"""Image identifiers and the object keys derived from them."""

from __future__ import annotations

import re
import uuid

from flotilla.errors import InvalidImageUuid

_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_SHOWN_CHARS = 40  # how much of a bad uuid an error message repeats


def shorten(text: str, limit: int = _SHOWN_CHARS) -> str:
    """``text`` as an error message repeats it: cut at ``limit`` characters (a caller may send anything)."""
    return text if len(text) <= limit else text[:limit] + "..."


def new_image_uuid() -> str:
    return str(uuid.uuid4())


def check_image_uuid(value: str) -> str:
    """``value`` in canonical form (lower case) if it is a textual UUID, else raise InvalidImageUuid.

    Only the 36-character 8-4-4-4-12 hex form is accepted, which also rules
    out anything path-like (``../x``, ``a/b``) before it can reach a key. Hex
    digits of either case name the same UUID (RFC 9562), so an upper-case one
    is lowered: every key is written and read in lower case, and ``ABC...``
    finds the image uploaded as ``abc...``.
    """
    if not value:
        raise InvalidImageUuid("image_uuid is empty; upload the JPEG first and send its uuid")
    if len(value) != 36 or not _CANONICAL_UUID.fullmatch(value):
        shown = shorten(value)
        raise InvalidImageUuid(
            f"image_uuid {shown!r} ({len(value)} chars) is not a canonical UUID "
            "like 123e4567-e89b-12d3-a456-426614174000"
        )
    return value.lower()


def object_key(image_uuid: str) -> str:
    """The object store key of an image: ``<uuid>.jpg``, the uuid in lower case."""
    return f"{check_image_uuid(image_uuid)}.jpg"
