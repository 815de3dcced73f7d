"""Decompress module files by their magic bytes, not their names."""

from __future__ import annotations

import lzma
import zlib

import zstandard

from kmodgate.errors import UserError

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


def compression_of(data: bytes) -> str | None:
    """'xz', 'zstd', 'gzip' or None for data stored as is."""
    if data.startswith(XZ_MAGIC):
        return "xz"
    if data.startswith(ZSTD_MAGIC):
        return "zstd"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    return None


def decompress(data: bytes, where: str) -> bytes:
    """The payload of a possibly compressed file; UserError if it is corrupt."""
    kind = compression_of(data)
    try:
        if kind == "xz":
            return lzma.decompress(data, format=lzma.FORMAT_XZ)
        if kind == "zstd":
            return _zstd_frames(data, where)
        if kind == "gzip":
            return zlib.decompress(data, wbits=zlib.MAX_WBITS | 16)
    except (lzma.LZMAError, zstandard.ZstdError, zlib.error, EOFError) as exc:
        raise UserError(f"corrupt {kind} data ({exc})", where=where) from None
    return data


def _zstd_frames(data: bytes, where: str) -> bytes:
    """Every frame of a zstd stream; a frame cut short is corruption, not an end.

    zstd(1) writes modules in streaming mode, without a content size, and a
    stream reader would quietly return what it got from a truncated file.
    """
    dctx = zstandard.ZstdDecompressor()
    parts = []
    while data:
        frame = dctx.decompressobj()
        parts.append(frame.decompress(data))
        if not frame.eof:
            raise UserError("corrupt zstd data (truncated)", where=where)
        data = frame.unused_data
    return b"".join(parts)
