"""Search over what the farm built: text or image -> CLIP embedding -> the kNN index.

``pairfarm serve-search`` (``search.server``) serves ``GET/POST /api/v1/search``, the
sample images and a search page; ``pairfarm search`` runs one query in-process. It is a
process of its own, not a route of the coordinator: it holds a CLIP model (torch) and a
faiss index in memory, which the coordinator (installed without torch, serving thousands
of workers' leases) should not load or share its CPU with.
"""
