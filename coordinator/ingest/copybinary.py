"""Rows as the data of ``COPY ... FROM STDIN (FORMAT binary)``, encoded with Arrow and numpy.

The ingest writes ``candidates`` and ``pending_chunks`` this way. In CSV the server scans
every byte of a row for delimiters, quotes and line ends (``CopyReadLine``,
``CopyReadAttributesCSV``), and the chunks' JSON fragments are full of quotes, each
doubled in CSV; in the binary format each field comes with its length and is copied as
it is.

The format (PostgreSQL's documentation of ``COPY``, "Binary Format"): a 19-byte header;
each row an int16 field count, then each field an int32 length (-1: NULL) and its bytes
in the type's binary form; a trailer of int16 -1. All integers are big-endian. ``text``
and ``json``: the UTF-8 bytes (the database's encoding is UTF-8). ``bigint``: 8 bytes,
``integer``: 4. A one-dimensional ``bigint[]`` without NULLs: ndim (1), a has-NULL flag
(0), the element type's OID (20, int8), the dimension's length and lower bound (1), then
each element as a field (length 8, value).

Each function answers an Arrow ``large_binary`` array with one encoded field (or row) per
element, so a row is one ``binary_join_element_wise`` of its fields; 64-bit offsets, as a
chunk of 131,072 rows near the length limits (8,192-character URLs, 4,096-character
captions, extra columns) can pass the 2 GB that 32-bit offsets hold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
TRAILER = b"\xff\xff"
#: the OID of int8, the element type of bigint[]
INT8_OID = 20
_EMPTY = pa.scalar(b"", pa.large_binary())


def _fixed(values: np.ndarray, count: int) -> pa.Array:
    """``count`` records of ``values`` (each record ``values.dtype.itemsize`` bytes) as a
    large binary array."""
    width = values.dtype.itemsize
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), count,
                                                 [None, pa.py_buffer(values.view(np.uint8))])
    return fixed.cast(pa.large_binary())


def int8_fields(values: np.ndarray) -> pa.Array:
    """``bigint`` fields of ``values`` (no NULLs)."""
    out = np.empty(len(values), np.dtype([("len", ">i4"), ("v", ">i8")]))
    out["len"] = 8
    out["v"] = values
    return _fixed(out, len(values))


def int4_fields(value: int, count: int) -> pa.Array:
    """``count`` ``integer`` fields, each ``value``."""
    out = np.empty(count, np.dtype([("len", ">i4"), ("v", ">i4")]))
    out["len"] = 4
    out["v"] = value
    return _fixed(out, count)


def text_fields(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``text`` (or ``json``) fields of the strings ``values``; NULL where they are null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    count = len(values)
    lengths = pc.fill_null(pc.binary_length(values), -1).to_numpy(zero_copy_only=False)
    return pc.binary_join_element_wise(_fixed(lengths.astype(">i4"), count),
                                       pc.fill_null(values.cast(pa.large_binary()), _EMPTY), _EMPTY)


def id_array_fields(first_id: int, count: int, size: int) -> pa.Array:
    """``bigint[]`` fields of the ids ``first_id`` .. ``first_id + count - 1`` in
    consecutive groups of ``size`` (the last group smaller when ``size`` does not divide
    ``count``)."""
    whole, rest = divmod(count, size)
    parts = []
    if whole:
        parts.append(_id_groups(first_id, whole, size))
    if rest:
        parts.append(_id_groups(first_id + whole * size, 1, rest))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.large_binary())


def _id_groups(first_id: int, groups: int, size: int) -> pa.Array:
    element = np.dtype([("len", ">i4"), ("v", ">i8")])
    layout = np.dtype([("len", ">i4"), ("head", ">i4", (5,)), ("ids", element, (size,))])
    out = np.empty(groups, layout)
    out["len"] = layout.itemsize - 4
    out["head"] = (1, 0, INT8_OID, size, 1)
    out["ids"]["len"] = 8
    out["ids"]["v"] = np.arange(first_id, first_id + groups * size,
                                dtype=np.int64).reshape(groups, size)
    return _fixed(out, groups)


def copy_data(fields: list[pa.Array]) -> bytes:
    """The rows whose fields are ``fields`` (one large binary array per column, of one length,
    each element an encoded field) as the whole data of a binary ``COPY``."""
    count = len(fields[0])
    field_count = pa.scalar(len(fields).to_bytes(2, "big"), pa.large_binary())
    rows = pc.binary_join_element_wise(field_count, *fields, _EMPTY)
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    offsets = np.frombuffer(rows.buffers()[1], np.int64, count + 1, rows.offset * 8)
    body = rows.buffers()[2]
    assert body is not None
    return b"".join((HEADER, memoryview(body)[offsets[0]:offsets[-1]], TRAILER))
