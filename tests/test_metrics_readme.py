"""Every metric a component exports has one row in the metric tables of README.md + docs/*.md."""

from __future__ import annotations

import re

import pytest

from coordinator.metrics import metric_names as coordinator_names
from gpu_postprocess.metrics import metric_names as postprocess_names
from tests.docs_text import table_rows
from worker.metrics import metric_names as worker_names

# prometheus_client's own process and platform collectors, documented as a group
LIBRARY_PREFIXES = ("process_", "python_")
SUFFIXES = ("_bucket", "_sum", "_count")


def _families(names: set[str]) -> set[str]:
    """Sample names as the README writes them: a histogram once, by its family name."""
    return {_family(name) for name in names if not name.startswith(LIBRARY_PREFIXES)}


def _family(name: str) -> str:
    suffix = next((s for s in SUFFIXES if name.endswith(s)), "")
    return name.removesuffix(suffix) if suffix else name


def _rows() -> list[str]:
    """The metrics each table row documents (those named in its first cell), row by row."""
    first_cells = [ln.split("|")[1] for ln in table_rows()]
    return [m for cell in first_cells for m in re.findall(r"`(pairfarm_[a-z_]+)`", cell)]


def _documented() -> set[str]:
    return set(_rows())


@pytest.mark.parametrize("names", [coordinator_names, worker_names, postprocess_names],
                         ids=["coordinator", "worker", "postprocess"])
def test_every_exported_metric_has_a_readme_row(names: object) -> None:
    exported = _families(names())  # type: ignore[operator]
    assert exported, "the component exports no pairfarm_ metric"
    assert exported - _documented() == set()


def test_no_readme_row_names_a_metric_nobody_exports() -> None:
    every = _families(coordinator_names() | worker_names() | postprocess_names())
    assert _documented() - every == set()


def test_each_metric_is_documented_in_one_row_only() -> None:
    rows = _rows()
    assert sorted({m for m in rows if rows.count(m) > 1}) == []
