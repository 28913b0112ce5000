"""Reading WAT files made here with warcio's WARC writer: pages, links, corrupt input."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import pytest

from extract.dedup import KeyMode
from extract.errors import CorruptRecord, SourceError, TruncatedSource
from extract.fileworker import FileSettings, process_file
from extract.sources import HttpPolicy
from extract.wat import iter_payloads, parse_page
from extract.watbuild import Img, WatBuilder, WatPage, write_wat

SETTINGS = FileSettings(min_alt_chars=5, language_threshold=0.5, key_mode=KeyMode.URL_ALT,
                        http=HttpPolicy(timeout=5.0))


def rows(path: Path) -> list[dict[str, object]]:
    result = process_file(str(path), SETTINGS)
    assert result.error is None, result.error
    return result.table.to_pylist()


def test_a_page_gives_its_images_with_alt_resolved_against_the_page(tmp_path: Path) -> None:
    page = WatPage("http://example.com/shop/item.html", [
        Img("photos/red-shoe.jpg", "A red running shoe"),
        Img("https://img.example.net/blue.jpg", "A blue running shoe"),
        Img("/logo.png"),  # no alt attribute
        Img("/spacer.gif", ""),  # empty alt
    ], anchors=["/about", "https://other.example.org/"])
    path = write_wat(tmp_path / "a.wat.gz", [page])

    got = rows(path)

    assert [(r["url"], r["caption"], r["page_url"]) for r in got] == [
        ("http://example.com/shop/photos/red-shoe.jpg", "A red running shoe", page.url),
        ("https://img.example.net/blue.jpg", "A blue running shoe", page.url),
    ]
    assert {r["language"] for r in got} == {"en"}
    assert {r["source"] for r in got} == {str(path)}


def test_base_href_changes_where_relative_sources_point(tmp_path: Path) -> None:
    pages = [
        WatPage("https://example.com/a/b/page.html", [Img("x/cat.jpg", "A sleeping cat")],
                base_href="https://cdn.example.org/static/"),
        WatPage("https://example.com/a/b/page2.html", [Img("dog.jpg", "A running dog")],
                base_href="/root/"),
    ]
    got = rows(write_wat(tmp_path / "b.wat.gz", pages))
    assert [r["url"] for r in got] == [
        "https://cdn.example.org/static/x/cat.jpg",
        "https://example.com/root/dog.jpg",
    ]


def test_filters_are_counted_by_reason(tmp_path: Path) -> None:
    page = WatPage("https://example.com/", [
        Img("data:image/png;base64,iVBORw0KGgo=", "An inline data image"),
        Img("javascript:show()", "A scripted image"),
        Img("a.jpg", "logo"),
        Img("b.jpg"),
        Img("c.jpg", "A kept caption"),
        Img("c.jpg", "A kept caption"),  # same URL and alt on the same page
        Img("c.jpg", "Another caption"),  # same URL, other alt: kept with url+alt keys
    ])
    result = process_file(str(write_wat(tmp_path / "c.wat.gz", [page])), SETTINGS)

    assert result.counts.images == 7
    assert dict(result.counts.dropped) == {
        "not_http": 2, "short_alt": 1, "no_alt": 1, "dup_in_run": 1,
    }
    assert result.table.column("caption").to_pylist() == ["A kept caption", "Another caption"]
    assert len(set(result.keys)) == 2


def test_url_key_mode_counts_the_same_url_once(tmp_path: Path) -> None:
    page = WatPage("https://example.com/", [Img("c.jpg", "First caption"),
                                            Img("c.jpg", "Second caption")])
    settings = FileSettings(5, 0.5, KeyMode.URL, HttpPolicy())
    result = process_file(str(write_wat(tmp_path / "d.wat.gz", [page])), settings)
    assert result.table.column("caption").to_pylist() == ["First caption"]


def test_unicode_and_html_entities_in_alt(tmp_path: Path) -> None:
    page = WatPage("https://example.jp/", [
        Img("1.jpg", "東京タワーの夜景と街の明かり"),
        Img("2.jpg", "Fish &amp; chips at the seaside &ndash; summer"),
        Img("3.jpg", "Crème brûlée au caramel, déjà servie"),
        Img("4.jpg", "\U0001F600 smiling face emoji with open mouth"),
    ])
    got = rows(write_wat(tmp_path / "e.wat.gz", [page]))
    assert [r["caption"] for r in got] == [
        "東京タワーの夜景と街の明かり",
        "Fish & chips at the seaside \u2013 summer",
        "Crème brûlée au caramel, déjà servie",
        "\U0001F600 smiling face emoji with open mouth",
    ]
    assert [r["language"] for r in got][:3] == ["ja", "en", "fr"]


def test_request_and_metadata_records_are_records_not_pages(tmp_path: Path) -> None:
    pages = [WatPage(f"https://example.com/{i}", [Img(f"{i}.jpg", "A photo of a tree")])
             for i in range(3)]
    result = process_file(str(write_wat(tmp_path / "f.wat.gz", pages)), SETTINGS)
    assert (result.counts.records, result.counts.pages, result.counts.images) == (9, 3, 3)


def test_a_non_json_record_is_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "g.wat.gz"
    with WatBuilder(path) as wat:
        wat.page(WatPage("https://example.com/1", [Img("1.jpg", "A photo before")]))
        wat.raw_record("https://example.com/broken", b"{\"Envelope\": {not json")
        wat.raw_record("https://example.com/list", b"[1, 2, 3]")
        wat.json_record("https://example.com/odd", {"Envelope": {"Payload-Metadata": 7}})
        wat.page(WatPage("https://example.com/2", [Img("2.jpg", "A photo after")]))
    result = process_file(str(path), SETTINGS)
    assert result.error is None
    assert result.counts.corrupt_records == 3
    assert result.counts.records == 9
    assert result.table.column("caption").to_pylist() == ["A photo before", "A photo after"]


def test_parse_page_raises_corrupt_record_for_non_wat_payloads() -> None:
    for payload in (b"\xff\xfe", b"null", b'{"Envelope": {}}', b'{"Envelope": []}'):
        with pytest.raises(CorruptRecord):
            parse_page(payload)


def test_truncated_gzip_reports_the_file_and_keeps_what_came_before(tmp_path: Path) -> None:
    pages = [WatPage(f"https://example.com/{i}", [Img(f"{i}.jpg", f"A photo number {i}")])
             for i in range(20)]
    whole = write_wat(tmp_path / "whole.wat.gz", pages).read_bytes()
    cut = tmp_path / "cut.wat.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])

    result = process_file(str(cut), SETTINGS)

    assert result.error is not None and "ends inside a record" in result.error
    kept = result.table.num_rows
    assert 0 < kept < 20
    assert result.table.column("caption").to_pylist() == [f"A photo number {i}"
                                                           for i in range(kept)]


def member_ends(data: bytes) -> set[int]:
    """Offsets where a gzip member of ``data`` ends (a cut there leaves a valid WAT file)."""
    ends, offset = set(), 0
    while offset < len(data):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        inflater.decompress(data[offset:])
        offset = len(data) - len(inflater.unused_data)
        ends.add(offset)
    return ends


def test_truncation_is_detected_wherever_the_file_is_cut(tmp_path: Path) -> None:
    pages = [WatPage(f"https://example.com/{i}", [Img(f"{i}.jpg", "A photo of a lake")])
             for i in range(3)]
    whole = write_wat(tmp_path / "w.wat.gz", pages).read_bytes()
    boundaries = member_ends(whole)
    assert len(boundaries) == 10  # warcinfo + 3 records per page
    path = tmp_path / "cut.wat.gz"
    for cut in range(0, len(whole), 5):
        path.write_bytes(whole[:cut])
        if cut in boundaries:
            continue
        with pytest.raises(SourceError):
            for _ in iter_payloads(str(path)):
                pass


def test_a_file_that_is_not_a_warc_is_reported(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a WARC file\n")
    gz = tmp_path / "text.gz"
    gz.write_bytes(gzip.compress(b"still not a WARC file\n" * 10))
    for path in (text, gz):
        result = process_file(str(path), SETTINGS)
        assert result.error is not None and "not a readable WARC" in result.error
        assert result.table.num_rows == 0


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    result = process_file(str(tmp_path / "absent.wat.gz"), SETTINGS)
    assert result.error == "no such file"


def test_truncated_source_is_a_source_error() -> None:
    assert issubclass(TruncatedSource, SourceError)
