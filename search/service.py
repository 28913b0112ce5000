"""One query from its input to its results: text, an uploaded image, or the URL of a kept
sample (its image, read from the shards, is the query), through ``ClipEncoder`` and
``SearchEngine``. ``open_service`` builds it from an index folder.

Error handling: none or several inputs, or a URL that no indexed sample has, raise
``QueryError``; see ``search.engine`` and ``search.encoder`` for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knn.errors import KnnError
from search.encoder import ClipEncoder
from search.engine import Query, Results, SearchEngine
from search.errors import QueryError, SearchDataError
from search.images import ImageStore, shards_folder


@dataclass
class SearchService:
    engine: SearchEngine
    encoder: ClipEncoder
    images: ImageStore
    _urls: dict[str, tuple[str, str]] | None = field(default=None, repr=False)

    def search(self, query: Query, *, text: str | None = None, url: str | None = None,
               image: bytes | None = None) -> Results:
        given = [x for x in (text, url, image) if x is not None]
        if len(given) != 1:
            raise QueryError("give exactly one of text, url (of a kept sample) or image")
        return self.engine.search(self._vector(text, url, image), query)

    def _vector(self, text: str | None, url: str | None, image: bytes | None) -> np.ndarray:
        if text is not None:
            return self.encoder.text(text)
        if image is not None:
            return self.encoder.image(image)
        assert url is not None
        return self.encoder.image(self._sample_image(url))

    def _sample_image(self, url: str) -> bytes:
        sample = self._by_url().get(url)
        if sample is None:
            raise QueryError(f"no indexed sample has the url {url!r}")
        found = self.images.image(*sample)
        if found is None:
            raise QueryError(f"the image of {url!r} is not in {self.images.folder}")
        return found[0]

    def _by_url(self) -> dict[str, tuple[str, str]]:
        """url -> (shard stem, key) of every indexed sample (built on first use)."""
        if self._urls is None:
            table = self.engine.index.table().select(["url", "shard", "key"]).to_pydict()
            self._urls = {u: (s, k) for u, s, k in zip(table["url"], table["shard"],
                                                       table["key"], strict=True) if u}
        return self._urls

    def image_of(self, sample_id: int) -> tuple[bytes, str] | None:
        if not 0 <= sample_id < self.engine.index.ntotal:
            return None
        row = self.engine.index.rows([sample_id])[0]
        assert row is not None
        return self.images.image(str(row["shard"]), str(row["key"]))


def open_service(index_dir: Path, encoder: ClipEncoder, *, source: Path | None = None,
                 images: Path | None = None) -> SearchService:
    """The index in ``index_dir``; its embeddings from ``source`` (default: the folder it
    was built from), its images from ``images`` (default: the tars beside them)."""
    from knn.index import open_index

    try:
        index = open_index(index_dir)
    except KnnError as exc:
        raise SearchDataError(str(exc)) from exc
    encoder.check(index.dim)
    src = source or Path(index.info.source)
    return SearchService(SearchEngine(index, src), encoder,
                         ImageStore(images or shards_folder(src)))
