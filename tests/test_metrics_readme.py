"""Every metric a component exports is documented in the README's metric tables."""

from __future__ import annotations

import re

import pytest

from coordinator.metrics import metric_names as coordinator_names
from gpu_postprocess.metrics import metric_names as postprocess_names
from tests.conftest import REPO
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


def _documented() -> set[str]:
    rows = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("|")]
    return {m for ln in rows for m in re.findall(r"`(pairfarm_[a-z_]+)`", ln)}


@pytest.mark.parametrize("names", [coordinator_names, worker_names, postprocess_names],
                         ids=["coordinator", "worker", "postprocess"])
def test_every_exported_metric_has_a_readme_row(names: object) -> None:
    exported = _families(names())  # type: ignore[operator]
    assert exported, "the component exports no pairfarm_ metric"
    assert exported - _documented() == set()


def test_no_readme_row_names_a_metric_nobody_exports() -> None:
    every = _families(coordinator_names() | worker_names() | postprocess_names())
    assert _documented() - every == set()
