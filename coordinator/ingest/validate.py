"""Row validation, vectorised with Arrow compute (pure logic, no database).

A row is rejected with the first reason that applies, in this order:

=====================  ==================================================================
``missing_url``        no URL, or an empty one
``not_http``           a scheme other than http:// or https://
``bad_url``            no host, a user name or password, a bad host or port
``url_too_long``       longer than ``MAX_URL_CHARS`` (8,192) once cleaned
``missing_caption``    no caption
``caption_too_short``  under 5 characters after cleaning (the LAION rule)
``caption_too_long``   longer than ``MAX_CAPTION_CHARS``
=====================  ==================================================================

Cleaning comes first. URLs are cleaned by ``pairfarm.urls.clean_url``, as a browser
requests them (the rules are in that module; ``pairfarm extract`` writes the same form):
a column is checked at once against ``UNCHANGED_PATTERN`` and only the rows that may
change (white space, non-ASCII, an uppercase host, a port, ...) are cleaned one by one.
In captions control characters (U+0000-U+001F, U+007F) are replaced by a space, then the
caption is trimmed. ``language`` is kept when it is at
most 35 characters (a BCP 47 tag), else dropped. Extra columns are kept as the input had
them (numbers, booleans, strings; NaN becomes null; anything else is JSON text).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from coordinator.errors import IngestError
from pairfarm.urls import (
    DOT_SEGMENT_PATTERN,
    MAX_URL_CHARS,
    UNCHANGED_PATTERN,
    UrlProblem,
    clean_url,
)

MAX_CAPTION_CHARS = 4096
MIN_CAPTION_CHARS = 5
MAX_LANGUAGE_CHARS = 35
CONTROL = "[\\x00-\\x1f\\x7f]"
REASONS = ("missing_url", "not_http", "bad_url", "url_too_long", "missing_caption",
           "caption_too_short", "caption_too_long")


@dataclass(frozen=True)
class Columns:
    """Which input columns hold what (img2dataset's ``--url-col`` / ``--caption-col``)."""

    url: str = "url"
    caption: str = "caption"
    language: str | None = None
    #: extra columns to keep; None keeps every other column
    extra: tuple[str, ...] | None = None

    def text_columns(self) -> tuple[str, ...]:
        return tuple(c for c in (self.url, self.caption, self.language) if c)


@dataclass(frozen=True)
class Validated:
    good: pa.Table  # row, url, caption, language, then the extra columns by their names
    rejected: Counter[str]
    rejects: pa.Table  # row, reason, url


def extra_names(schema: pa.Schema, columns: Columns) -> list[str]:
    used = set(columns.text_columns())
    if columns.extra is not None:
        missing = [c for c in columns.extra if c not in schema.names]
        if missing:
            raise IngestError(f"extra columns {missing} not in the file ({schema.names})")
        return list(columns.extra)
    return [n for n in schema.names if n not in used]


def validate(batch: pa.RecordBatch, columns: Columns, first_row: int) -> Validated:
    """Clean and check one batch; ``first_row`` is the 1-based number of its first row."""
    _require(batch.schema, columns)
    url, url_reason = _urls(_text(batch.column(columns.url)))
    caption = _clean(_text(batch.column(columns.caption)), " ")
    reason = pc.coalesce(url_reason, _caption_reasons(caption))
    rows = pa.arange(first_row, first_row + batch.num_rows)
    keep = pc.is_null(reason)
    good = {"row": rows, "url": url, "caption": caption,
            "language": _language(batch, columns)}
    for name in extra_names(batch.schema, columns):
        good[name] = _extra(batch.column(name))
    good_table = pa.table(good).filter(keep)
    bad = pc.invert(keep)
    rejects = pa.table({"row": rows, "reason": reason,
                        "url": _text(batch.column(columns.url))}).filter(bad)
    counts = Counter(dict(zip(*_value_counts(rejects.column("reason")), strict=True)))
    return Validated(good=good_table, rejected=counts, rejects=rejects)


def _require(schema: pa.Schema, columns: Columns) -> None:
    for role, name in (("URL", columns.url), ("caption", columns.caption),
                       ("language", columns.language)):
        if name and name not in schema.names:
            flag = {"URL": "--url-col", "caption": "--caption-col"}.get(role, "--language-col")
            raise IngestError(f"no {role} column {name!r} (columns: {schema.names}); "
                              f"choose one with {flag}")


def _text(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise IngestError(f"a text column holds values that are not text: {exc}") from exc


def _clean(values: pa.Array, replacement: str) -> pa.Array:
    """Control characters replaced, white space trimmed. The strings are rewritten only
    when one holds a control character: a match costs a third of a rewrite."""
    if pc.any(pc.match_substring_regex(values, CONTROL)).as_py():
        values = pc.replace_substring_regex(values, CONTROL, replacement)
    return pc.utf8_trim_whitespace(values)


def _urls(raw: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The cleaned URLs and their reject reasons (null: kept). A row that matches
    ``UNCHANGED_PATTERN`` is its own cleaned form; the others go through ``clean_url``."""
    kept = pc.fill_null(pc.and_not(pc.match_substring_regex(raw, UNCHANGED_PATTERN),
                                   pc.match_substring_regex(raw, DOT_SEGMENT_PATTERN)), False)
    too_long = pc.and_(kept, pc.greater(pc.binary_length(raw), MAX_URL_CHARS))
    reason = pc.if_else(too_long, UrlProblem.TOO_LONG.value, pa.scalar(None, pa.string()))
    others = pc.invert(kept)
    if not pc.any(others).as_py():
        return raw, reason
    cleaned = [UrlProblem.MISSING if text is None else clean_url(text)
               for text in raw.filter(others).to_pylist()]
    urls = pa.array([None if isinstance(c, UrlProblem) else c for c in cleaned], pa.string())
    problems = pa.array([c.value if isinstance(c, UrlProblem) else None for c in cleaned],
                        pa.string())
    return (pc.replace_with_mask(raw, others, urls),
            pc.replace_with_mask(reason, others, problems))


def _caption_reasons(caption: pa.Array) -> pa.Array:
    cap_len = pc.utf8_length(caption)
    checks = [
        ("missing_caption", pc.is_null(caption)),
        ("caption_too_short", pc.less(cap_len, MIN_CAPTION_CHARS)),
        ("caption_too_long", pc.greater(cap_len, MAX_CAPTION_CHARS)),
    ]
    reason = pa.nulls(len(caption), pa.string())
    for name, failed in reversed(checks):
        reason = pc.if_else(pc.fill_null(failed, True), name, reason)
    return reason


def _language(batch: pa.RecordBatch, columns: Columns) -> pa.Array:
    if not columns.language:
        return pa.nulls(batch.num_rows, pa.string())
    lang = pc.utf8_trim_whitespace(_text(batch.column(columns.language)))
    ok = pc.and_(pc.greater(pc.utf8_length(lang), 0),
                 pc.less_equal(pc.utf8_length(lang), MAX_LANGUAGE_CHARS))
    return pc.if_else(pc.fill_null(ok, False), lang, pa.scalar(None, pa.string()))


def _extra(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = values.type
    if pa.types.is_floating(kind):  # JSON has no NaN or infinity
        return pc.if_else(pc.is_finite(values), values, pa.scalar(None, kind))
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return values
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pc.replace_substring(pc.cast(values, pa.string()), "\x00", "")
    return pa.array([None if v is None else json.dumps(v, default=str)
                     for v in values.to_pylist()], pa.string())


def _value_counts(reasons: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(reasons.combine_chunks())
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()
