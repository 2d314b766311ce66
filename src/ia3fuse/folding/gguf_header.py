"""A GGUF header with string keys added: every other byte of the header kept, the data re-aligned.

GGUF (v2/v3) is: magic, version, tensor count, key/value count (24 bytes); the key/value pairs;
the tensor infos, whose data offsets are relative to the data section; zero padding up to
``general.alignment``; the data section. So adding keys means: the input's key/value bytes as
they are (minus the keys being replaced), the new pairs, the input's tensor-info bytes as they
are, new padding. Tensor offsets do not change, and the data section is copied as it is, shifted
by the header's growth (`fold_gguf` streams it).
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import FoldError

__all__ = ["header_with_strings"]

_FIXED = 24  # magic, version, tensor count, key/value count
_STRING = 8  # GGUFValueType.STRING


def _span(field: Any) -> tuple[int, int]:
    return int(field.offset), int(field.offset) + sum(int(part.nbytes) for part in field.parts)


def _string_kv(key: str, value: str) -> bytes:
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", _STRING) + struct.pack("<Q", len(v)) + v


def header_with_strings(reader: Any, replace: tuple[str, ...], values: dict[str, str]) -> tuple[bytes, int]:
    """The header of ``reader``'s file with the keys in ``replace`` dropped and ``values`` added.

    Args:
        reader: a ``gguf.GGUFReader`` of a little-endian file.
        replace: the keys to drop where the file has them (every key of ``values`` must be one).
        values: string keys to add, in this order, after the file's own.

    Returns:
        The new header, padded to the file's alignment (so the data section starts right after
        it), and the offset of the input's data section.
    """
    data = reader.data
    kvs = [(name, _span(f)) for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    infos = [_span(t.field) for t in reader.tensors]
    # the sections must tile the header exactly, or the file is not what this code assumes
    spans = [s for _, s in kvs] + infos
    ends = [_FIXED] + [end for _, end in spans]
    if any(start != end for (start, _), end in zip(spans, ends)):
        raise FoldError("the GGUF header's key/value and tensor-info sections are not contiguous; re-convert the file")
    kv_end = kvs[-1][1][1] if kvs else _FIXED
    info_end = ends[-1]
    if bytes(data[info_end : reader.data_offset]).strip(b"\0") or reader.data_offset - info_end >= reader.alignment:
        raise FoldError("the GGUF header is followed by unexpected bytes before the tensor data; re-convert the file")
    kept = [bytes(data[s:e]) for name, (s, e) in kvs if name not in replace]
    added = [_string_kv(k, v) for k, v in values.items()]
    fixed = bytes(data[:16]) + struct.pack("<Q", len(kept) + len(added))
    header = fixed + b"".join(kept) + b"".join(added) + bytes(data[kv_end:info_end])
    header += b"\0" * (-len(header) % reader.alignment)
    return header, int(reader.data_offset)
