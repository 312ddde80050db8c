"""Bounds-checked reading and writing of the SecAgg+ message structs."""

from __future__ import annotations

import struct

from fedtune.errors import InvalidInput

MAGIC = b"FS"
VERSION = 1


def header(kind: int) -> bytes:
    """The 4-byte header of a message of this kind."""
    return MAGIC + struct.pack(">BB", VERSION, kind)


def read_header(data: bytes, kind: int, what: str) -> Reader:
    """A reader past the header, after checking it names this version and kind.

    Raises:
        InvalidInput: If the header is missing or names another version or message.
    """
    r = Reader(data, what)
    if r.take(2) != MAGIC:
        raise InvalidInput(f"{what} does not start with the secagg magic bytes")
    version, got = r.u8(), r.u8()
    if version != VERSION or got != kind:
        raise InvalidInput(
            f"{what} has version {version}, kind {got}; expected version {VERSION}, kind {kind}"
        )
    return r


class Reader:
    """Reads big-endian fields off a byte string, raising InvalidInput instead of IndexError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        end = self._pos + n
        if end > len(self._data):
            raise InvalidInput(f"{self._what} is truncated")
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def u8(self) -> int:
        """The next unsigned byte."""
        return int(struct.unpack(">B", self.take(1))[0])

    def u16(self) -> int:
        """The next big-endian uint16."""
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        """The next big-endian uint32."""
        return int(struct.unpack(">I", self.take(4))[0])

    def done(self) -> None:
        """Raises InvalidInput if bytes are left over."""
        if self._pos != len(self._data):
            raise InvalidInput(f"{self._what} has {len(self._data) - self._pos} trailing bytes")
