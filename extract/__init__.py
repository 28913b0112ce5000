"""Candidates from Common Crawl: WAT files -> (image URL, alt text) parquet shards.

The stage before the coordinator's ingest. ``pairfarm extract`` reads WAT files (gzipped
WARC files of JSON metadata records), takes every HTML ``<img>`` that has an alt text,
resolves its ``src`` against the page URL (and the page's ``<base href>``), filters, labels
the caption's language, removes duplicates (exactly within a run, with a persistent Bloom
filter across runs) and writes parquet shards with img2dataset's ``url`` / ``caption``
columns that ``pairfarm ingest`` reads.

Modules, one idea each:

- ``errors``: the exception tree of this component.
- ``settings``: the typed settings objects and their factory.
- ``sources``: opening a local file or an http(s) URL as a byte stream.
- ``wat``: WARC records -> WAT JSON -> pages with their image links.
- ``links``: alt-text cleaning and URL resolution, the filters and their drop reasons.
- ``language``: the language labeller (en / other code / nolang).
- ``fileworker``: one WAT file -> an arrow table of candidates (runs in a worker process).
- ``dedup``: exact dedup within a run, the persistent Bloom filter across runs.
- ``shards``: the parquet shard writer (temporary name, rename when complete).
- ``counters``: the per-file and per-run counts, the summary.
- ``ingest``: handing finished shards to ``pairfarm ingest``.
- ``runner``: the process pool, the progress bar, the order of results.
- ``cli``: the ``pairfarm extract`` command.
- ``watbuild``: writes WAT files in Common Crawl's layout (tests, benchmark, demos).
"""
