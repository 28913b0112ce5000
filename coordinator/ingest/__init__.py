"""``pairfarm ingest``: load candidate (URL, caption) files into the coordinator.

reader (parquet / csv / tsv / jsonl, gzipped too, as Arrow record batches)
→ validate (vectorised Arrow compute: reasons per rejected row)
→ load (``COPY`` into a temporary staging table, one ``INSERT ... ON CONFLICT DO NOTHING``
per chunk; one transaction per file).
"""
