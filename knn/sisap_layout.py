"""``pairfarm export sisap SOURCE DEST``: the SISAP export as a ``pairfarm export`` layout.

A ``DatasetLayout`` (``export.layouts.base``): the whole folder in one call, since PCA,
sketches and gold standards are computed over every row. Its options come as
``--layout-option KEY=VALUE`` (``-O``):

    queries=10000       size of the public query set
    query-shards=1      leading shards that form part 0 (the queries' part)
    neighbours=100      neighbours per query in the gold standards
    seed=0              seed of the query sample and the sketch planes
    keep-untagged=0     1: keep rows without an NSFW score

Every run writes the export anew (the PCA, the query split and the gold standards
depend on every row). Errors of the knn component become ``LayoutError``s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from export.errors import LayoutError
from export.settings import ExportResult, ExportSettings
from knn.errors import KnnError

OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "queries": ("queries", int),
    "query-shards": ("query_shards", int),
    "neighbours": ("neighbours", int),
    "seed": ("seed", int),
    "keep-untagged": ("keep_untagged", lambda v: v.lower() in ("1", "true", "yes", "on")),
}


def sisap_settings(options: Mapping[str, str]) -> Any:
    """``knn.sisap.SisapSettings`` from the ``-O KEY=VALUE`` options."""
    from knn.sisap import SisapSettings

    values: dict[str, Any] = {}
    for key, raw in options.items():
        name, parse = OPTIONS.get(key.replace("_", "-"), (None, str))
        if name is None:
            raise LayoutError(f"the sisap layout has no option {key!r} "
                              f"(it takes {', '.join(OPTIONS)})")
        try:
            values[name] = parse(raw)
        except ValueError:
            raise LayoutError(f"sisap option {key}={raw!r} is not a number") from None
    return SisapSettings(**values)


class SisapLayout:
    name = "sisap"

    def export(self, settings: ExportSettings, *, advance: Callable[[int], None],
               on_total: Callable[[int], None]) -> ExportResult:
        from knn.sisap import export_sisap

        seen = {"rows": 0}

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "database rows":
                if seen["rows"] == 0:
                    on_total(total)
                advance(done - seen["rows"])
                seen["rows"] = done

        try:
            result = export_sisap(settings.source, settings.dest,
                                  sisap_settings(settings.options), progress)
        except KnnError as exc:
            raise LayoutError(str(exc)) from exc
        shards = len(result.database_shards) + len(result.query_shards)
        return ExportResult(batches=shards, samples=result.n + result.queries,
                            shards=len(result.files), total=result.n + result.queries)


LAYOUT = SisapLayout()
