"""kNN over the farm's embeddings: the LAION2B/SISAP export and a faiss index.

Modules, one idea each:

``source``   reads post-processing's clip-retrieval layout (``embeddings/img_emb``,
             ``embeddings/metadata``) shard by shard, NSFW rows removed
``exact``    brute-force k nearest neighbours (the gold standard), streamed in chunks
``choose``   the faiss index key for a size, width and memory budget (autofaiss's rules)
``build``    builds or extends an index folder, tunes its search parameter, measures recall
``index``    ``open_index(folder) -> KnnIndex``: the loading and query API
``sisap``    the ``pairfarm export sisap`` layout (HDF5, PCA, sketches, gold standards)
``sisap_layout``  the ``sisap`` layout of ``pairfarm export`` (a ``DatasetLayout``)
``command``  the ``pairfarm index`` click command

Nothing here imports the coordinator or the worker; faiss and h5py are imported only by
the modules that need them (the ``knn`` extra).
"""
