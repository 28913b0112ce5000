"""``pairfarm ingest``: load candidate (URL, caption) files into the coordinator.

reader (parquet / csv / tsv / jsonl, gzipped too, as Arrow record batches)
→ validate (vectorised Arrow compute: reasons per rejected row)
→ load (each URL's 128-bit hash into ``url_hashes``, the exact dedup; then ``COPY`` of the
new candidates, with ids the loader reserved, and of their ``pending_chunks``; one
transaction per file).
"""
